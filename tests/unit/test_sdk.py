"""The SDK scripts import, in this process: with herder's environment, and without it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from herder.protocol.jobs import Priority
from herder.robot import sdk


@pytest.fixture
def outside_herder(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HERDER_* variable, as when a script is developed by hand."""
    for name in list(os.environ):
        if name.startswith("HERDER_"):
            monkeypatch.delenv(name)


@dataclass
class Job:
    """The files and log pipe of a job, as the runner would set them up."""

    folder: Path
    log_r: int

    def records(self) -> list[dict[str, object]]:
        """The SDK records written so far."""
        os.set_blocking(self.log_r, False)
        data = b""
        try:
            while chunk := os.read(self.log_r, 65536):
                data += chunk
        except BlockingIOError:
            pass
        return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def in_herder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Job]:
    """The environment the runner gives a script, pointing at files under tmp_path and a real pipe."""
    (tmp_path / "input.json").write_text('{"name": "Ada", "items": [1, 2]}')
    log_r, log_w = os.pipe()
    variables = {
        sdk.ENV_INPUT_FILE: "input.json",
        sdk.ENV_OUTPUT_FILE: "output.json",
        sdk.ENV_STOP_FILE: "stop",
        sdk.ENV_ERROR_FILE: "error.txt",
    }
    for name, file in variables.items():
        monkeypatch.setenv(name, str(tmp_path / file))
    monkeypatch.setenv(sdk.ENV_LOG_FD, str(log_w))
    try:
        yield Job(folder=tmp_path, log_r=log_r)
    finally:
        os.close(log_r)
        os.close(log_w)


@pytest.mark.usefixtures("outside_herder")
def test_outside_herder_the_sdk_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert sdk.job_input() == {}
    assert sdk.should_stop() is False
    sdk.log.info("invoice.read", number=42, customer="ACME Ltd")
    sdk.set_output({"total": 12.5})
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("INFO    invoice.read number=42 customer='ACME Ltd'")
    assert err[1] == 'output: {"total": 12.5}'


def test_the_input_is_read_once_and_handed_out_fresh(in_herder: Job) -> None:
    first = sdk.job_input()
    assert first == {"name": "Ada", "items": [1, 2]}
    first["name"] = "changed"
    (in_herder.folder / "input.json").write_text("{}")
    assert sdk.job_input() == {"name": "Ada", "items": [1, 2]}


def test_records_are_json_lines_with_level_and_fields(in_herder: Job) -> None:
    sdk.log.debug("a", n=1)
    sdk.log.info("b", who="me")
    sdk.log.warning("c")
    sdk.log.error("d", when=Path("/x"))  # what JSON cannot hold is logged as its str()
    records = in_herder.records()
    assert [(r["level"], r["message"], r["fields"]) for r in records] == [
        ("debug", "a", {"n": 1}),
        ("info", "b", {"who": "me"}),
        ("warning", "c", {}),
        ("error", "d", {"when": "/x"}),
    ]
    assert all(isinstance(r["time"], str) and r["time"].endswith("+00:00") for r in records)


def test_a_huge_record_is_shortened_to_fit_a_line(in_herder: Job) -> None:
    sdk.log.info("big", blob="x" * 100_000, n=3)
    sdk.log.info("many", **{f"f{i}": "y" * 200 for i in range(100)})
    big, many = in_herder.records()
    assert big["fields"] == {"blob": "x" * 256 + "…", "n": 3, "cut": True}
    assert many["fields"]["cut"] is True  # type: ignore[index]
    assert len(json.dumps(many).encode()) <= sdk.MAX_RECORD_BYTES


def test_a_log_fd_that_is_not_a_pipe_falls_back_to_stderr(
    in_herder: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with (tmp_path / "other").open("w") as other:
        monkeypatch.setenv(sdk.ENV_LOG_FD, str(other.fileno()))
        sdk.log.warning("where.am.i")
    assert "WARNING where.am.i" in capsys.readouterr().err
    assert (tmp_path / "other").read_text() == ""


def test_the_output_is_replaced_atomically(in_herder: Job) -> None:
    sdk.set_output({"a": 1})
    sdk.set_output({"b": [True, None, "ü"]})
    assert json.loads((in_herder.folder / "output.json").read_text()) == {"b": [True, None, "ü"]}
    assert sorted(p.name for p in in_herder.folder.iterdir()) == ["input.json", "output.json"]


@pytest.mark.parametrize("value", [["a"], {"when": object()}, {1: "int key"}, {"x": float("nan")}])
def test_an_output_that_is_not_a_json_object_is_a_type_error(in_herder: Job, value: object) -> None:
    with pytest.raises(TypeError):
        sdk.set_output(value)  # type: ignore[arg-type]
    assert not (in_herder.folder / "output.json").exists()


def test_an_output_too_large_for_a_report_is_refused(in_herder: Job) -> None:
    with pytest.raises(ValueError, match="more than"):
        sdk.set_output({"blob": "x" * sdk.MAX_OUTPUT_BYTES})


def test_should_stop_leaves_a_marker_the_first_time_it_is_true(in_herder: Job) -> None:
    stop = in_herder.folder / "stop"
    marker = Path(sdk.stop_seen_marker(str(stop)))
    assert sdk.should_stop() is False
    assert not marker.exists()
    stop.touch()
    assert sdk.should_stop() is True
    assert marker.exists()
    assert sdk.should_stop() is True


# --- work queues, against a tiny channel server of the test's ---

Answer = Callable[[str, dict[str, Any]], dict[str, Any] | None]
ITEM_ID = "ab" * 16


def item_info(item_id: str = ITEM_ID, **changes: Any) -> dict[str, Any]:
    """An item as the agent hands it on (herder's ItemInfo in JSON)."""
    info: dict[str, Any] = {
        "id": item_id,
        "queue": "invoices",
        "state": "InProgress",
        "content": {"number": "INV-7", "amount": 12.5},
        "reference": "INV-7",
        "priority": "High",
        "deadline": "2030-01-02T03:04:05Z",
        "tags": ["urgent"],
        "lease": 3,
        "attempt": 2,
        "created_at": "2030-01-01T00:00:00Z",
    }
    info.update(changes)
    return info


def reply(body: dict[str, Any]) -> dict[str, Any]:
    return {"reply": body}


class FakeAgent:
    """Serves the channel's protocol on a Unix socket, answering every call (each in a thread of its own,
    so answers can overtake each other) with what `answer(verb, body)` returns: `{"reply": …}`,
    `{"error": …}`, or None to close the connection unanswered."""

    def __init__(self, path: str, answer: Answer) -> None:
        self.path = path
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lines: list[bytes] = []
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        with contextlib.suppress(OSError), conn.makefile("rb") as lines:
            for line in lines:
                self.lines.append(line)
                message = json.loads(line)
                self.calls.append((message["verb"], message["body"]))
                threading.Thread(target=self._answer, args=(conn, lock, message), daemon=True).start()

    def _answer(self, conn: socket.socket, lock: threading.Lock, message: dict[str, Any]) -> None:
        answer = self.answer(message["verb"], message["body"])
        with lock, contextlib.suppress(OSError):
            if answer is None:
                conn.shutdown(socket.SHUT_RDWR)
                return
            conn.sendall(json.dumps({"id": message["id"], **answer}).encode() + b"\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._server.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def channel_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Answer], FakeAgent]]:
    """Start a `FakeAgent` and point the SDK at it, as the runner does with HERDER_JOB_CHANNEL."""
    folder = tempfile.mkdtemp(prefix="sdk-")  # short: a socket's path has a limit
    monkeypatch.setattr(sdk, "CHANNEL_CALL_TIMEOUT_S", 10.0)  # a test that hangs fails soon
    agents: list[FakeAgent] = []

    def start(answer: Answer) -> FakeAgent:
        agent = FakeAgent(os.path.join(folder, f"c{len(agents)}.sock"), answer)
        agents.append(agent)
        monkeypatch.setenv(sdk.ENV_CHANNEL, agent.path)
        return agent

    try:
        yield start
    finally:
        for agent in agents:
            agent.close()
        shutil.rmtree(folder, ignore_errors=True)


def answer_with(**replies: dict[str, Any]) -> Answer:
    return lambda verb, _body: replies[verb]


@pytest.mark.usefixtures("outside_herder")
def test_outside_herder_a_queue_call_says_queues_need_a_robot() -> None:
    invoices = sdk.queue("invoices")  # naming a queue is fine; using it needs a robot
    needs = r"queues, assets, credentials and storage need a robot: run this script as a herder job"
    with pytest.raises(sdk.NotOnRobot, match=needs) as refused:
        invoices.next()
    assert "herder robot run ROBOT --run PROCESS" in str(refused.value)
    with pytest.raises(sdk.NotOnRobot):
        sdk.queues(["a", "b"]).next_batch(3)
    with pytest.raises(sdk.NotOnRobot):
        invoices.add({"number": 1})


def test_add_sends_one_item_with_what_differs_from_the_defaults(channel_at: Callable[[Answer], FakeAgent]) -> None:
    agent = channel_at(answer_with(item_add=reply({"queue": "invoices", "ids": ["i1"]})))
    deadline = datetime(2030, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    before = datetime.now(UTC)
    new = sdk.queue("invoices").add(
        {"number": "INV-7"},
        reference="INV-7",
        priority="high",
        deadline=deadline,
        postpone=timedelta(hours=1),
        tags=("a", "b"),
    )
    assert new == "i1"
    assert sdk.queue("invoices").add({"n": 2}) == "i1"
    (verb, body), (_, plain) = agent.calls
    assert verb == "item_add"
    item = body["items"][0]
    assert item.pop("postpone_until") >= (before + timedelta(hours=1)).isoformat()
    assert body == {
        "queue": "invoices",
        "items": [
            {
                "content": {"number": "INV-7"},
                "reference": "INV-7",
                "priority": "High",
                "deadline": "2030-05-01T12:00:00+02:00",
                "tags": ["a", "b"],
            }
        ],
    }
    assert plain == {"queue": "invoices", "items": [{"content": {"n": 2}}]}
    assert agent.lines[0].startswith(b'{"id":1,')  # the id first: the agent finds it even in a line it refuses


def test_a_naive_datetime_is_refused_before_anything_is_sent(channel_at: Callable[[Answer], FakeAgent]) -> None:
    agent = channel_at(answer_with())
    with pytest.raises(ValueError, match=r"deadline: 2030-05-01T12:00:00 has no time zone"):
        sdk.queue("q").add({}, deadline=datetime(2030, 5, 1, 12, 0))
    with pytest.raises(TypeError, match="a datetime with a time zone"):
        sdk.queue("q").add({}, deadline=20300501)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority must be one of High, Normal, Low"):
        sdk.queue("q").add({}, priority="urgent")
    assert agent.calls == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (["not", "a", "dict"], "content: not a JSON object but a list"),
        ({"when": datetime(2030, 1, 1, tzinfo=UTC)}, "content.when: a datetime is not a JSON value"),
        ({"lines": [{"qty": 1}, {"qty": {1, 2}}]}, "content.lines[1].qty: a set is not a JSON value"),
        ({"by id": {7: "x"}}, "content['by id']: the key 7 is a int; JSON keys are strings"),
        ({"amount": float("nan")}, "content.amount: nan is not a number JSON can hold"),
    ],
)
def test_content_json_cannot_hold_is_a_bad_request_naming_the_path(
    channel_at: Callable[[Answer], FakeAgent], content: Any, problem: str
) -> None:
    agent = channel_at(answer_with())
    with pytest.raises(sdk.QueueError) as refused:
        sdk.queue("q").add(content)
    assert refused.value.code == "bad_request"
    assert str(refused.value).startswith(problem)
    assert agent.calls == []


def test_content_nested_in_a_loop_is_refused_not_followed_forever(channel_at: Callable[[Answer], FakeAgent]) -> None:
    channel_at(answer_with())
    looped: dict[str, Any] = {}
    looped["again"] = looped
    with pytest.raises(sdk.QueueError, match="nested deeper than 32 levels"):
        sdk.queue("q").add(looped)


def test_herder_refusals_raise_queue_error_with_code_message_and_details(
    channel_at: Callable[[Answer], FakeAgent],
) -> None:
    error = {
        "code": "bad_request",
        "message": "invalid item_add request: items.0.content.amount: 1e+400 is not finite",
        "details": {"errors": [{"field": "items.0.content.amount", "problem": "not finite"}]},
    }
    channel_at(answer_with(item_add={"error": error}))
    with pytest.raises(sdk.QueueError) as refused:
        sdk.queue("q").add({"amount": 1})
    assert refused.value.code == "bad_request"
    assert str(refused.value) == error["message"]
    assert refused.value.details["errors"][0]["field"] == "items.0.content.amount"


def test_add_many_takes_items_and_plain_contents_all_in_one_call(channel_at: Callable[[Answer], FakeAgent]) -> None:
    agent = channel_at(answer_with(item_add=reply({"queue": "q", "ids": ["a", "b", "c"]})))
    ids = sdk.queue("q").add_many(
        [
            {"content": {"n": 1}, "reference": "R1", "priority": "Low"},
            {"n": 2},  # the content itself
            # A line of a `herder queue add --file` file, as json.loads reads it.
            {"content": {"n": 3}, "deadline": "2030-06-01T17:00:00Z", "postpone_until": None, "tags": ["eu"]},
        ]
    )
    assert ids == ["a", "b", "c"]
    ((_, body),) = agent.calls
    assert body["items"] == [
        {"content": {"n": 1}, "reference": "R1", "priority": "Low"},
        {"content": {"n": 2}},
        {"content": {"n": 3}, "deadline": "2030-06-01T17:00:00+00:00", "tags": ["eu"]},
    ]
    assert sdk.queue("q").add_many([]) == []
    assert len(agent.calls) == 1


def test_add_many_refuses_what_it_cannot_read_before_anything_is_sent(
    channel_at: Callable[[Answer], FakeAgent],
) -> None:
    agent = channel_at(answer_with())
    with pytest.raises(sdk.QueueError, match=r"^items\[1\]\.content\.x: a bytes is not a JSON value"):
        sdk.queue("q").add_many([{"n": 1}, {"content": {"x": b"raw"}}])
    # A misspelt key is not taken for content: it would turn the item into something else.
    with pytest.raises(ValueError, match=r"items\[0\]: an item has no 'referense'"):
        sdk.queue("q").add_many([{"content": {"n": 1}, "referense": "R1"}])
    with pytest.raises(ValueError, match=r"deadline: 2030-06-01T17:00:00 has no time zone"):
        sdk.queue("q").add_many([{"content": {}, "deadline": "2030-06-01T17:00:00"}])
    with pytest.raises(ValueError, match="is not an ISO 8601 time"):
        sdk.queue("q").add_many([{"content": {}, "deadline": "next Tuesday"}])
    assert agent.calls == []


def test_a_call_too_large_for_the_channel_is_refused_before_it_is_sent(
    channel_at: Callable[[Answer], FakeAgent],
) -> None:
    agent = channel_at(answer_with())
    with pytest.raises(sdk.QueueError, match="more than the 1200000 one call may carry") as refused:
        sdk.queue("q").add_many([{"blob": "x" * 1000}] * 1300)
    assert refused.value.code == "bad_request"
    assert agent.calls == []


def test_next_takes_an_item_with_its_fields_or_gives_none(channel_at: Callable[[Answer], FakeAgent]) -> None:
    answers = iter([reply({"items": [item_info()]}), reply({"items": []})])
    agent = channel_at(lambda verb, body: next(answers))
    item = sdk.queue("invoices").next(tags=["urgent", "-manual"], reference="INV-*", priority="high")
    assert item is not None
    assert (item.id, item.queue, item.reference, item.priority, item.attempt, item.lease) == (
        ITEM_ID,
        "invoices",
        "INV-7",
        "High",
        2,
        3,
    )
    assert item.content == {"number": "INV-7", "amount": 12.5}
    assert item.deadline == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert item.tags == ["urgent"]
    assert item.state == "InProgress" and not item.finished
    assert sdk.queue("invoices").next() is None
    assert agent.calls[0] == (
        "item_next",
        {
            "queues": [{"name": "invoices"}],
            "order": "strict",
            "count": 1,
            "tags": "urgent;-manual",
            "reference": "INV-*",
            "priority": "High",
        },
    )


def test_several_queues_by_order_or_weight(channel_at: Callable[[Answer], FakeAgent]) -> None:
    agent = channel_at(answer_with(item_next=reply({"items": [item_info("1" * 32), item_info("2" * 32)]})))
    taken = sdk.queues(["urgent", "routine"], order="weighted", weights=[3, 1]).next_batch(5)
    assert [item.id for item in taken] == ["1" * 32, "2" * 32]
    sdk.queues(["urgent", "routine"], order="weighted", weights={"urgent": 4}).next()
    sdk.queues(["urgent", "routine"]).next()
    assert [body["queues"] for _, body in agent.calls] == [
        [{"name": "urgent", "weight": 3}, {"name": "routine", "weight": 1}],
        [{"name": "urgent", "weight": 4}, {"name": "routine", "weight": 1}],
        [{"name": "urgent"}, {"name": "routine"}],
    ]
    assert [body["order"] for _, body in agent.calls] == ["weighted", "weighted", "strict"]
    assert agent.calls[0][1]["count"] == 5
    with pytest.raises(ValueError, match="2 weights for 3 queues"):
        sdk.queues(["a", "b", "c"], order="weighted", weights=[1, 2])
    with pytest.raises(ValueError, match="order must be 'strict' or 'weighted'"):
        sdk.queues(["a"], order="random")
    with pytest.raises(TypeError, match="a list of names"):
        sdk.queues("ab")
    with pytest.raises(ValueError, match="at least 1"):
        sdk.queue("a").next_batch(0)


def take_one(channel_at: Callable[[Answer], FakeAgent], **answers: dict[str, Any]) -> tuple[FakeAgent, sdk.Item]:
    agent = channel_at(answer_with(item_next=reply({"items": [item_info()]}), **answers))
    item = sdk.queue("invoices").next()
    assert item is not None
    return agent, item


def test_complete_sends_the_output_under_the_lease_and_finishes_the_item_once(
    channel_at: Callable[[Answer], FakeAgent],
) -> None:
    done = reply({"items": [item_info(state="Successful")]})
    agent, item = take_one(channel_at, item_result=done)
    item.complete({"booked": True})
    assert agent.calls[-1] == (
        "item_result",
        {"results": [{"id": ITEM_ID, "lease": 3, "state": "Successful", "output": {"booked": True}}]},
    )
    assert (item.finished, item.state) == (True, "Successful")
    finishes: list[Callable[[], None]] = [
        item.complete,
        lambda: item.fail("no"),
        lambda: item.postpone(timedelta(1)),
        lambda: item.progress("x"),
    ]
    for again in finishes:
        with pytest.raises(sdk.QueueError, match=f"item {ITEM_ID} of queue invoices was completed already") as twice:
            again()
        assert twice.value.code == "conflict"
    assert len(agent.calls) == 2


def test_fail_names_the_kind_and_cuts_a_long_reason(channel_at: Callable[[Answer], FakeAgent]) -> None:
    agent, item = take_one(channel_at, item_result=reply({"items": [item_info(state="Retried")]}))
    with pytest.raises(ValueError, match="kind must be 'business' or 'application'"):
        item.fail("x", kind="Business")
    item.fail("timeout\n" * 1000, kind="application")
    (result,) = agent.calls[-1][1]["results"]
    assert (result["state"], result["exception"], len(result["reason"])) == ("Failed", "application", 2000)
    assert item.state == "Retried"  # herder retries it: a new New copy is made


def test_postpone_and_progress(channel_at: Callable[[Answer], FakeAgent]) -> None:
    agent, item = take_one(
        channel_at,
        item_progress=reply(item_info(progress="half")),
        item_postpone=reply(item_info(state="New")),
    )
    item.progress("half")
    assert agent.calls[-1] == ("item_progress", {"id": ITEM_ID, "lease": 3, "progress": "half"})
    assert not item.finished
    until = datetime(2030, 6, 1, tzinfo=UTC)
    item.postpone(until, reason="the supplier answers on Monday")
    assert agent.calls[-1] == (
        "item_postpone",
        {"id": ITEM_ID, "lease": 3, "until": "2030-06-01T00:00:00+00:00", "reason": "the supplier answers on Monday"},
    )
    assert (item.finished, item.state) == (True, "New")
    with pytest.raises(ValueError, match=r"until: .* has no time zone"):
        take_one(channel_at)[1].postpone(datetime(2030, 1, 1))


def test_a_refused_finish_leaves_the_item_held(channel_at: Callable[[Answer], FakeAgent]) -> None:
    answers = iter(
        [
            reply({"items": [item_info()]}),
            {"error": {"code": "unavailable", "message": "no reply from hd.default.svc.queues.item_result within 5 s"}},
            reply({"items": [item_info(state="Successful")]}),
        ]
    )
    channel_at(lambda verb, body: next(answers))
    item = sdk.queue("invoices").next()
    assert item is not None
    with pytest.raises(sdk.QueueError) as refused:
        item.complete()
    assert refused.value.code == "unavailable"
    assert not item.finished
    item.complete()  # tried again, it goes through
    assert item.finished


def test_threads_share_one_socket_and_each_gets_its_own_answer(channel_at: Callable[[Answer], FakeAgent]) -> None:
    release = threading.Event()

    def answer(verb: str, body: dict[str, Any]) -> dict[str, Any]:
        number = body["items"][0]["content"]["n"]
        if number == 0:
            release.wait(5)  # the first call is answered last
        return reply({"queue": "q", "ids": [f"id-{number}"]})

    agent = channel_at(answer)
    results: dict[int, str] = {}

    def add(number: int) -> None:
        results[number] = sdk.queue("q").add({"n": number})
        if len(results) == 8:
            release.set()

    threads = [threading.Thread(target=add, args=(number,)) for number in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {number: f"id-{number}" for number in range(9)}
    assert agent.connections == 1


def test_a_channel_the_agent_closed_is_opened_again_by_the_next_call(
    channel_at: Callable[[Answer], FakeAgent],
) -> None:
    answers = iter([None, reply({"queue": "q", "ids": ["after"]})])
    agent = channel_at(lambda verb, body: next(answers))
    with pytest.raises(sdk.QueueError, match="closed before it answered") as closed:
        sdk.queue("q").add({})
    assert closed.value.code == "unavailable"
    assert sdk.queue("q").add({}) == "after"
    assert agent.connections == 2


def test_a_channel_that_is_gone_is_unavailable(channel_at: Callable[[Answer], FakeAgent]) -> None:
    agent = channel_at(answer_with())
    agent.close()
    os.unlink(agent.path)
    with pytest.raises(sdk.QueueError, match="cannot reach the robot agent through its channel") as gone:
        sdk.queue("q").next()
    assert gone.value.code == "unavailable"


def test_the_sdk_cuts_texts_where_herder_would_refuse_them() -> None:
    from herder.protocol import queues

    assert sdk.MAX_REASON_CHARS == queues.MAX_REASON_CHARS
    assert sdk.MAX_PROGRESS_CHARS == queues.MAX_PROGRESS_CHARS
    assert tuple(priority.value for priority in Priority) == sdk.PRIORITIES
    assert tuple(kind.value for kind in queues.ExceptionKind) == sdk.EXCEPTION_KINDS


# --- starting jobs, against the same tiny channel server ---

CHILD_ID = "cd" * 16


def started(**changes: Any) -> dict[str, Any]:
    """A job as the agent hands on herder's answer to a start (JobInfo in JSON)."""
    info: dict[str, Any] = {
        "id": CHILD_ID,
        "tenant": "default",
        "process": "report",
        "version": "1.2.0",
        "state": "Pending",
        "reason": "robot r2 is busy with job 0123",
        "priority": "High",
        "target_robot": "r2",
        "parent_job": "ef" * 16,
        "created_at": "2030-01-01T00:00:00Z",
    }
    info.update(changes)
    return info


def test_start_job_sends_what_differs_from_the_defaults_under_a_random_key(
    channel_at: Callable[[Answer], FakeAgent],
) -> None:
    agent = channel_at(answer_with(job_start=reply(started())))
    job = sdk.start_job(
        "report", robot="r2", input={"month": "2030-05"}, version="1.2.0", priority="high", timeout_s=90
    )
    assert job == sdk.StartedJob(
        id=CHILD_ID,
        process="report",
        version="1.2.0",
        state="Pending",
        robot=None,
        reason="robot r2 is busy with job 0123",
    )
    sdk.start_job("report", group="finance")
    (verb, body), (_, plain) = agent.calls
    assert verb == "job_start"
    key = body.pop("request_id")
    assert body == {
        "process": "report",
        "robot": "r2",
        "input": {"month": "2030-05"},
        "version": "1.2.0",
        "priority": "High",
        "timeout_s": 90.0,
    }
    assert plain.pop("request_id") != key  # each start its own key: two starts are two jobs
    assert plain == {"process": "report", "group": "finance", "input": {}}
    assert len(key) == 32 and int(key, 16) >= 0
    assert "job_id" not in body  # the agent names the parent, never the script


@pytest.mark.parametrize(
    ("arguments", "error", "problem"),
    [
        ({}, ValueError, "say where the job runs: robot='NAME' or group='NAME', one of them"),
        ({"robot": "r1", "group": "g"}, ValueError, "one of them"),
        ({"robot": 7}, TypeError, "a robot's name is a str, not int"),
        ({"group": "g", "version": 1.2}, TypeError, "a version is a str"),
        ({"robot": "r1", "priority": "urgent"}, ValueError, "priority must be one of High, Normal, Low"),
        ({"robot": "r1", "timeout_s": 0}, ValueError, "timeout_s is a number of seconds greater than 0"),
        ({"robot": "r1", "timeout_s": float("inf")}, ValueError, "greater than 0, not inf"),
        ({"robot": "r1", "timeout_s": "60"}, TypeError, "timeout_s is a number of seconds, not str"),
        ({"robot": "r1", "wait": "yes"}, TypeError, "wait is True or False"),
    ],
)
def test_start_job_arguments_are_checked_before_anything_is_sent(
    channel_at: Callable[[Answer], FakeAgent], arguments: dict[str, Any], error: type[Exception], problem: str
) -> None:
    agent = channel_at(answer_with())
    with pytest.raises(error, match=re.escape(problem)):
        sdk.start_job("report", **arguments)
    with pytest.raises(TypeError, match="a process's name is a str"):
        sdk.start_job(None, robot="r1")  # type: ignore[arg-type]
    assert agent.calls == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (["not", "a", "dict"], "input: not a JSON object but a list"),
        ({"when": datetime(2030, 1, 1, tzinfo=UTC)}, "input.when: a datetime is not a JSON value"),
        ({"amount": float("nan")}, "input.amount: nan is not a number JSON can hold"),
    ],
)
def test_an_input_json_cannot_hold_is_a_bad_request_naming_the_path(
    channel_at: Callable[[Answer], FakeAgent], value: Any, problem: str
) -> None:
    agent = channel_at(answer_with())
    with pytest.raises(sdk.CallError) as refused:
        sdk.start_job("report", robot="r1", input=value)
    assert (refused.value.code, str(refused.value)[: len(problem)]) == ("bad_request", problem)
    assert agent.calls == []


def test_waiting_follows_the_job_until_it_ends(
    channel_at: Callable[[Answer], FakeAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk, "_WAIT_FIRST_S", 0.0)
    states = iter(
        [
            started(state="Running", robot="r2", reason=""),
            started(state="Successful", robot="r2", reason="", output={"total": 3}),
        ]
    )

    def answer(verb: str, body: dict[str, Any]) -> dict[str, Any]:
        return reply(started() if verb == "job_start" else next(states))

    agent = channel_at(answer)
    job = sdk.start_job("report", robot="r1", wait=True)
    assert (job.state, job.output, job.ended) == ("Successful", {"total": 3}, True)
    assert [verb for verb, _body in agent.calls] == ["job_start", "job_state", "job_state"]
    assert agent.calls[1][1] == {"id": CHILD_ID}


def test_a_start_the_channel_dropped_is_sent_again_under_the_same_key(
    channel_at: Callable[[Answer], FakeAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk, "_START_JOB_PAUSE_S", 0.0)
    answers = iter([None, None, reply(started(state="Running", robot="r2", reason=""))])
    agent = channel_at(lambda verb, body: next(answers))
    job = sdk.start_job("report", robot="r2")
    assert (job.state, job.robot) == ("Running", "r2")
    keys = [body["request_id"] for _, body in agent.calls]
    assert len(keys) == sdk.START_JOB_ATTEMPTS and len(set(keys)) == 1
    assert agent.connections == 3  # each on a new connection: the agent closed the one before

    agent = channel_at(lambda verb, body: None)  # the channel never carries it: the last failure is raised
    with pytest.raises(sdk.CallError, match="closed before it answered") as dropped:
        sdk.start_job("report", robot="r2")
    assert dropped.value.code == "unavailable"
    assert len(agent.calls) == sdk.START_JOB_ATTEMPTS


def test_a_start_herder_refused_is_not_sent_again(channel_at: Callable[[Answer], FakeAgent]) -> None:
    error = {"code": "not_found", "message": "no process named 'report'"}
    unanswered = {"code": "unavailable", "message": "no reply from hd.default.svc.jobs.robot_start within 5 s"}
    answers = iter([{"error": error}, {"error": unanswered}])
    agent = channel_at(lambda verb, body: next(answers))
    with pytest.raises(sdk.CallError) as refused:
        sdk.start_job("report", robot="r2")
    assert (refused.value.code, str(refused.value)) == ("not_found", "no process named 'report'")
    # herder (not the channel) gave no reply: the agent's client sent it again under the key already.
    with pytest.raises(sdk.CallError, match="no reply from"):
        sdk.start_job("report", robot="r2")
    assert len(agent.calls) == 2


def test_a_start_without_its_answer_is_internal(channel_at: Callable[[Answer], FakeAgent]) -> None:
    channel_at(answer_with(job_start=reply({"state": "Pending"})))
    with pytest.raises(sdk.CallError, match="holds no job") as odd:
        sdk.start_job("report", robot="r2")
    assert odd.value.code == "internal"


@pytest.mark.usefixtures("outside_herder")
def test_outside_herder_starting_a_job_says_it_needs_a_herder_job() -> None:
    with pytest.raises(sdk.NotOnRobot, match=r"sdk.start_job starts jobs from a herder job: run this script as one"):
        sdk.start_job("report", robot="r1")
    with pytest.raises(ValueError, match="one of them"):  # the arguments are checked first, robot or not
        sdk.start_job("report")
