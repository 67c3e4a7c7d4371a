"""The robot's channel for scripts: its pure parts (lines, the verb table, errors), and its socket served
with a stand-in for the agent's client (what herder answers is the integration tests' business)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from herder.client.requests import Client
from herder.protocol import fence
from herder.protocol.errors import BadRequest, Conflict, ErrorCode, NotFound, Unavailable
from herder.protocol.jobs import JobInfo, JobState, RobotJob, RobotJobStart
from herder.protocol.messages import Request, utcnow
from herder.protocol.queues import ItemAdd, ItemNext, ItemsAdded, ItemsTaken
from herder.robot import sdk
from herder.robot.channel import (
    JOB_VERBS,
    MAX_LINE_BYTES,
    SECRET_VERBS,
    STORAGE_VERBS,
    VERBS,
    BadCall,
    Call,
    Channel,
    Holdings,
    answer_line,
    error_of,
    leading_id,
    parse_call,
    request_of,
    stale_folder,
    sweep_stale,
)
from herder.robot.runner import LineSplitter
from tests.support import eventually

JOB = "0123456789abcdef0123456789abcdef"
CHILD = "cd" * 16
ITEM = "ab" * 16


def line(message: object) -> tuple[bytes, int]:
    data = json.dumps(message).encode()
    return data, len(data)


# --- the verb table ---


def test_the_channel_serves_the_item_and_asset_verbs_and_nothing_else() -> None:
    items = {"item_add", "item_next", "item_result", "item_postpone", "item_progress"}
    assert set(VERBS) == items | {"asset_get", "asset_write"}
    assert SECRET_VERBS == ("credential_get", "credential_set")
    assert STORAGE_VERBS == ("storage_put", "storage_get", "storage_list", "storage_delete")
    # Every verb it serves is one the fence lets a robot call: the agent sends them with its own token.
    assert {(model.service, model.verb) for model in VERBS.values()} <= set(fence.ROBOT_VERBS)
    assert {("secrets", "credential_fetch"), ("secrets", "credential_write")} <= set(fence.ROBOT_VERBS)
    # What the agent sends for the storage verbs (`herder.client.storage`), with the robot's own token.
    storage = {"file_list", "file_delete", "download", "upload_begin", "upload_chunk", "upload_end", "upload_cancel"}
    assert {("storage", verb) for verb in storage} <= set(fence.ROBOT_VERBS)
    assert all(verb == model.verb for verb, model in VERBS.items())


def test_the_channel_starts_jobs_as_the_run_with_the_verb_robots_may_call() -> None:
    assert JOB_VERBS == ("job_start", "job_state")
    assert {(RobotJobStart.service, RobotJobStart.verb), (RobotJob.service, RobotJob.verb)} <= set(fence.ROBOT_VERBS)
    assert not set(JOB_VERBS) & {*VERBS, *SECRET_VERBS, *STORAGE_VERBS}


def test_the_sdk_and_the_channel_agree_on_the_bound_of_a_line() -> None:
    assert sdk.MAX_CHANNEL_LINE_BYTES == MAX_LINE_BYTES


# --- reading a request line ---


def test_a_request_line_is_read_into_a_call() -> None:
    call = parse_call(*line({"id": 7, "verb": "item_next", "body": {"queues": [{"name": "q"}]}}))
    assert call == Call(id=7, verb="item_next", body={"queues": [{"name": "q"}]})
    assert parse_call(*line({"id": 0, "verb": "item_progress"})).body == {}


@pytest.mark.parametrize(
    ("data", "call_id", "problem"),
    [
        (b'{"id": 3, "verb": "item_next", "body": {', 3, "not valid JSON"),
        (b"\xff\xfe", None, "not UTF-8"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'{"verb": "item_next"}', None, 'needs an "id"'),
        (b'{"id": true, "verb": "item_next"}', None, 'needs an "id"'),
        (b'{"id": -1, "verb": "item_next"}', None, 'needs an "id"'),
        (b'{"id": 4, "verb": "queue_create", "body": {}}', 4, "serves no verb 'queue_create'"),
        (b'{"id": 5, "verb": "item_next", "body": [1]}', 5, '"body" of item_next must be a JSON object'),
        (b'{"id": 6, "verb": "item_next", "token": "x"}', 6, "fields the channel does not know: token"),
    ],
)
def test_what_is_not_a_request_is_refused_under_its_id_when_it_names_one(
    data: bytes, call_id: int | None, problem: str
) -> None:
    with pytest.raises(BadCall) as refused:
        parse_call(data, len(data))
    assert refused.value.call_id == call_id
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert problem in refused.value.message


def test_an_over_long_line_is_refused_by_its_length_under_the_id_it_starts_with() -> None:
    head = b'{"id": 12, "verb": "item_add", "body": {"queue": "q", "items": [{"content": {"blob": "'
    with pytest.raises(BadCall) as refused:
        parse_call(head, MAX_LINE_BYTES + 1)
    assert refused.value.call_id == 12
    assert f"{MAX_LINE_BYTES + 1} bytes" in refused.value.message


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'{"id": 12, "verb"', 12),
        (b'  {"id":0}', 0),
        (b'{"verb": "x", "id": 3}', None),  # the SDK writes the id first; elsewhere it is not looked for
        (b'{"id": "3"}', None),
        (b'{"id": 99999999999999999, ', None),
        (b"", None),
    ],
)
def test_the_leading_id_is_found_only_where_the_sdk_writes_it(head: bytes, expected: int | None) -> None:
    assert leading_id(head) == expected


def test_lines_are_framed_across_reads_and_an_over_long_one_is_counted_not_kept() -> None:
    splitter = LineSplitter(MAX_LINE_BYTES)
    good = json.dumps({"id": 2, "verb": "item_next", "body": {}}).encode()
    long_head = b'{"id": 1, "verb": "item_add", "body": "'
    pieces = [long_head, b"x" * MAX_LINE_BYTES, b'"}\n', good[:10], good[10:] + b"\n"]
    lines = [framed for piece in pieces for framed in splitter.feed(piece)]
    assert [length for _, length in lines] == [len(long_head) + MAX_LINE_BYTES + 2, len(good)]
    assert len(lines[0][0]) == MAX_LINE_BYTES and lines[0][0].startswith(long_head)
    with pytest.raises(BadCall) as refused:
        parse_call(*lines[0])
    assert refused.value.call_id == 1
    assert parse_call(*lines[1]).id == 2


# --- the request a call makes ---


def test_item_next_is_taken_for_the_run_whatever_the_script_says() -> None:
    request = request_of(Call(1, "item_next", {"queues": [{"name": "q"}], "job_id": "f" * 32}), JOB)
    assert isinstance(request, ItemNext)
    assert request.job_id == JOB
    assert request.count == 1


def test_a_body_that_fails_validation_names_the_field_and_the_path_inside_the_content() -> None:
    body = {"queue": "q", "items": [{"content": {"ok": 1}}, {"content": {"invoice": {"amount": 2**60}}}]}
    with pytest.raises(BadRequest) as refused:
        request_of(Call(1, "item_add", body), JOB)
    message = refused.value.message
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert message.startswith("invalid item_add request: items.1.content.invoice.amount: ")
    assert "outside the integers" in message


def test_a_misspelt_field_is_refused_not_ignored() -> None:
    with pytest.raises(BadRequest, match=r"invalid item_progress request: .*progres"):
        request_of(Call(1, "item_progress", {"id": ITEM, "lease": 1, "progres": "half"}), JOB)


def test_every_verb_makes_its_own_request_model() -> None:
    bodies: dict[str, dict[str, Any]] = {
        "item_add": {"queue": "q", "items": [{"content": {}}]},
        "item_next": {"queues": [{"name": "q"}]},
        "item_result": {"results": [{"id": ITEM, "lease": 1, "state": "Failed", "exception": "business"}]},
        "item_postpone": {"id": ITEM, "lease": 1, "until": "2030-01-01T00:00:00+00:00"},
        "item_progress": {"id": ITEM, "lease": 2, "progress": "half way"},
    }
    for verb, body in bodies.items():
        assert type(request_of(Call(1, verb, body), JOB)) is VERBS[verb]


# --- errors and answers ---


def test_herder_errors_keep_their_code_message_and_details() -> None:
    assert error_of(Conflict("stale lease", details={"lease": 3})) == {
        "code": "conflict",
        "message": "stale lease",
        "details": {"lease": 3},
    }
    assert error_of(NotFound("no queue q")) == {"code": "not_found", "message": "no queue q"}


def test_anything_else_is_internal_in_one_line_without_its_text() -> None:
    error = error_of(KeyError("secret-ish detail"))
    assert error["code"] == "internal"
    assert "secret-ish" not in error["message"]
    assert "\n" not in error["message"]


def test_answers_are_one_json_line_each() -> None:
    assert json.loads(answer_line(3, reply={"ids": ["a"]})) == {"id": 3, "reply": {"ids": ["a"]}}
    assert json.loads(answer_line(None, error={"code": "bad_request", "message": "m"})) == {
        "id": None,
        "error": {"code": "bad_request", "message": "m"},
    }
    odd = answer_line(4, error={"code": "conflict", "message": "m", "details": {"x": float("nan")}})
    assert json.loads(odd) == {"id": 4, "error": {"code": "conflict", "message": "m"}}
    assert answer_line(5, reply={"text": "a\nb"}).count(b"\n") == 1


# --- the socket, with a stand-in for the agent's client ---


@dataclass
class StandInNats:
    is_connected: bool = True


@dataclass
class StandInClient:
    """Answers like herder would, in order of release rather than arrival."""

    nc: StandInNats = field(default_factory=StandInNats)
    seen: list[Request[Any]] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    async def request(self, request: Request[Any]) -> Any:
        self.seen.append(request)
        if isinstance(request, ItemAdd):
            reference = request.items[0].reference or ""
            if reference in self.gates:
                await self.gates[reference].wait()
            if reference == "taken":
                raise Conflict("reference taken is in the queue already")
            if reference == "boom":
                raise RuntimeError("a bug")
            return ItemsAdded(queue=request.queue, ids=[reference or "x"])
        if isinstance(request, ItemNext):
            return ItemsTaken(items=[])
        if isinstance(request, RobotJobStart):
            if request.process == "nope":
                raise NotFound("no process named 'nope'")
            return JobInfo(
                id=CHILD,
                tenant="default",
                process=request.process,
                version="1.0.0",
                state=JobState.PENDING,
                priority=request.priority,
                target_robot=request.robot,
                target_group=request.group,
                input=request.input,
                parent_job=request.job_id,
                created_at=utcnow(),
            )
        raise AssertionError(request)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Channel, StandInClient]]:
    client = StandInClient()
    # A channel that does not wait for herder to come back: answers in these tests come at once.
    channel = await Channel.open(cast(Client, client), JOB, robot="r1", ride_out_s=0.0)
    try:
        yield channel, client
    finally:
        await channel.close()


async def exchange(channel: Channel, *lines: bytes, answers: int | None = None) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(channel.path))
    try:
        writer.write(b"".join(lines))
        await writer.drain()
        return [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(answers or len(lines))]
    finally:
        writer.close()


def add(call_id: int, reference: str) -> bytes:
    body = {"queue": "q", "items": [{"content": {}, "reference": reference}]}
    return json.dumps({"id": call_id, "verb": "item_add", "body": body}).encode() + b"\n"


async def test_the_socket_is_private_and_goes_with_its_folder(served: tuple[Channel, StandInClient]) -> None:
    channel, _ = served
    assert stat.S_IMODE(os.stat(channel.path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(channel.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(channel.path).st_mode)
    await channel.close()
    assert not channel.path.parent.exists()
    await channel.close()  # twice is fine


@pytest.mark.parametrize(
    ("verb", "body", "fragment"),
    [
        ("storage_put", {"bucket": "b", "path": "p", "local_file": "/tmp/x", "mode": "w"}, "unknown fields mode"),
        ("storage_put", {"bucket": "b", "path": "p", "local_file": "relative.txt"}, "absolute path"),
        ("storage_get", {"bucket": "b", "path": "p"}, "absolute path"),
        ("storage_get", {"bucket": "b", "path": "../etc/passwd", "local_file": "/tmp/x"}, "'..' part"),
        ("storage_put", {"bucket": "a.b", "path": "p", "local_file": "/tmp/x"}, "bucket"),
        ("storage_list", {"bucket": "b", "local_file": "/tmp/x"}, "unknown fields local_file"),
        ("storage_list", {"bucket": "b", "prefix": "/"}, "prefix"),
        ("storage_delete", {"bucket": "b", "path": "a//b"}, "empty part"),
    ],
)
async def test_storage_calls_are_checked_before_any_file_or_herder_is_touched(
    served: tuple[Channel, StandInClient], verb: str, body: dict[str, Any], fragment: str
) -> None:
    channel, client = served
    with pytest.raises(BadRequest, match=fragment):
        await channel.serve(Call(1, verb, body))
    assert client.seen == []


async def test_calls_in_flight_are_answered_by_id_as_they_finish(served: tuple[Channel, StandInClient]) -> None:
    channel, client = served
    client.gates["slow"] = asyncio.Event()
    reader, writer = await asyncio.open_unix_connection(str(channel.path))
    writer.write(add(1, "slow") + add(2, "fast"))
    first = json.loads(await asyncio.wait_for(reader.readline(), 5))
    client.gates["slow"].set()
    second = json.loads(await asyncio.wait_for(reader.readline(), 5))
    writer.close()
    assert (first["id"], first["reply"]["queue"], first["reply"]["ids"]) == (2, "q", ["fast"])
    assert (second["id"], second["reply"]["ids"]) == (1, ["slow"])


async def test_herder_errors_and_agent_failures_are_answered_and_the_connection_goes_on(
    served: tuple[Channel, StandInClient],
) -> None:
    channel, _ = served
    over_long = b'{"id": 3, "body": "' + b"y" * MAX_LINE_BYTES + b'"}\n'
    answers = await exchange(channel, add(1, "taken"), add(2, "boom"), over_long, b"nonsense\n", add(5, "ok"))
    by_id = {answer["id"]: answer for answer in answers}
    assert by_id[1]["error"] == {"code": "conflict", "message": "reference taken is in the queue already"}
    assert by_id[2]["error"]["code"] == "internal"
    assert by_id[3]["error"]["code"] == "bad_request" and "more than" in by_id[3]["error"]["message"]
    assert by_id[None]["error"]["code"] == "bad_request"
    assert by_id[5]["reply"]["ids"] == ["ok"]


async def test_a_robot_cut_off_from_nats_answers_unavailable_at_once(served: tuple[Channel, StandInClient]) -> None:
    channel, client = served
    client.nc.is_connected = False
    (answer,) = await exchange(channel, add(1, "ok"))
    assert answer["error"]["code"] == Unavailable.code.value
    assert "cut off" in answer["error"]["message"]
    assert client.seen == []


async def test_closing_drops_what_is_in_flight_and_refuses_new_connections(
    served: tuple[Channel, StandInClient], tmp_path: Path
) -> None:
    channel, client = served
    client.gates["never"] = asyncio.Event()
    reader, writer = await asyncio.open_unix_connection(str(channel.path))
    writer.write(add(1, "never"))
    await writer.drain()
    await eventually(lambda: client.seen)
    await asyncio.wait_for(channel.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
    writer.close()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        await asyncio.open_unix_connection(str(channel.path))


def start(call_id: int, body: dict[str, Any]) -> bytes:
    return json.dumps({"id": call_id, "verb": "job_start", "body": body}).encode() + b"\n"


async def test_a_job_start_goes_as_the_runs_own_job_under_the_scripts_key(
    served: tuple[Channel, StandInClient],
) -> None:
    channel, client = served
    key = "ab" * 16
    body = {"process": "report", "group": "finance", "input": {"month": 5}, "priority": "High", "request_id": key}
    answered, refused = await exchange(channel, start(1, body), start(2, {"process": "nope", "robot": "r2"}))
    assert answered["id"] == 1
    assert (answered["reply"]["id"], answered["reply"]["parent_job"], answered["reply"]["state"]) == (
        CHILD,
        JOB,
        "Pending",
    )
    assert refused == {"id": 2, "error": {"code": "not_found", "message": "no process named 'nope'"}}
    sent = client.seen[0]
    assert isinstance(sent, RobotJobStart)
    # The parent is the run's job, as the agent knows it; the key is the script's, so a start sent again
    # (by the SDK after the channel broke, or by the agent's client after no reply) makes one job.
    assert (sent.job_id, sent.request_id, sent.group, sent.input) == (JOB, key, "finance", {"month": 5})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"process": "report", "robot": "r2", "job_id": "f" * 32}, "a script starts jobs as its own job"),
        ({"process": "report", "robot": "r2", "trigger": "nightly"}, "job_start: unknown fields trigger"),
        (
            {"process": "report", "robot": "r2", "group": "g"},
            r"invalid job_start request: \(body\): name exactly one target",
        ),
        ({"process": "report", "robot": "r2", "input": {"n": 2**60}}, "invalid job_start request: input.n"),
    ],
)
async def test_a_script_names_neither_the_parent_nor_what_herder_does_not_take(
    served: tuple[Channel, StandInClient], body: dict[str, Any], fragment: str
) -> None:
    channel, client = served
    with pytest.raises(BadRequest, match=fragment):
        await channel.serve(Call(1, "job_start", body))
    assert client.seen == []


async def test_a_run_by_hand_starts_no_job() -> None:
    client = StandInClient()
    channel = await Channel.open(cast(Client, client), JOB, robot="desk", ride_out_s=0.0, herder_job=False)
    try:
        (answer,) = await exchange(channel, start(1, {"process": "report", "robot": "r2"}))
    finally:
        await channel.close()
    assert answer["error"]["code"] == "conflict"
    assert "a run by hand ('herder robot run --run') is no herder job" in answer["error"]["message"]
    assert client.seen == []


# --- what a run holds ---


def test_holdings_follow_items_taken_and_given_back() -> None:
    holdings = Holdings()
    taken = ItemsTaken.model_validate(
        {
            "items": [
                {"id": "1" * 32, "queue": "q", "state": "InProgress", "lease": 4, "created_at": "2030-01-01T00:00:00Z"},
                {"id": "2" * 32, "queue": "q", "state": "InProgress", "lease": 1, "created_at": "2030-01-01T00:00:00Z"},
                {"id": "3" * 32, "queue": "q", "state": "InProgress", "lease": 2, "created_at": "2030-01-01T00:00:00Z"},
            ]
        }
    )
    holdings.note(request_of(Call(1, "item_next", {"queues": [{"name": "q"}], "count": 3}), JOB), taken)
    assert holdings.held() == {"1" * 32: 4, "2" * 32: 1, "3" * 32: 2}
    done = {"results": [{"id": "1" * 32, "lease": 4, "state": "Successful"}]}
    holdings.note(request_of(Call(2, "item_result", done), JOB), ItemsTaken(items=[]))
    later = {"id": "2" * 32, "lease": 1, "until": "2030-01-01T00:00:00+00:00"}
    holdings.note(request_of(Call(3, "item_postpone", later), JOB), ItemsTaken(items=[]))
    holdings.note(request_of(Call(4, "item_progress", {"id": "3" * 32, "lease": 2, "progress": "x"}), JOB), taken)
    assert holdings.held() == {"3" * 32: 2}


# --- what agents killed outright leave behind ---


@pytest.mark.parametrize(
    ("name", "owned", "expected"),
    [
        ("herder-channel-4242-ab_c9", True, True),  # its agent is gone
        ("herder-channel-7-ab_c9", True, False),  # its agent still runs
        ("herder-channel-4242-ab_c9", False, False),  # another user's
        ("herder-channel-ab_c9", True, False),  # no pid in it: not one of ours
        ("herder-channels-4242-x", True, False),
        ("other-4242-x", True, False),
    ],
)
def test_a_stale_folder_is_ours_and_names_a_pid_that_is_gone(name: str, owned: bool, expected: bool) -> None:
    assert stale_folder(name, owned=owned, alive=lambda pid: pid == 7) is expected


async def test_sweeping_removes_the_folders_of_agents_that_are_gone_and_keeps_the_living(
    served: tuple[Channel, StandInClient],
) -> None:
    channel, _ = served
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()  # its pid names no process now
    left = Path(tempfile.gettempdir()) / f"herder-channel-{gone.pid}-test{os.getpid()}"
    left.mkdir(mode=0o700)
    (left / "channel.sock").touch()
    assert sweep_stale() >= 1
    assert not left.exists()
    assert channel.path.exists()  # this process's channel: alive


async def test_a_call_made_while_cut_off_waits_for_herder_to_come_back() -> None:
    client = StandInClient()
    client.nc.is_connected = False
    channel = await Channel.open(cast(Client, client), JOB, robot="r1", ride_out_s=10.0)

    async def reconnect() -> None:
        await asyncio.sleep(0.5)
        client.nc.is_connected = True

    try:
        back = asyncio.create_task(reconnect())
        (answer,) = await exchange(channel, add(1, "ok"))
        await back
        assert answer == {"id": 1, "reply": {"queue": "q", "ids": ["ok"], "count": 0, "dry_run": False}}
        assert len(client.seen) == 1  # sent once, when it could reach herder
    finally:
        await channel.close()
