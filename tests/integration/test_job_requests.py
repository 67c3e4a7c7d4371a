"""Durable job requests (`hd.<tenant>.req.jobs`) against the real stack, on SQLite and PostgreSQL.

Integrators publish through their own connection, as the fence admits it. Jobs are aimed at a
registered robot that is not running, so they stay Pending: what is tested is that each request
makes its job once (or is refused, on record), not how the job runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import PubAck
from sqlalchemy import select

from herder.client.connection import refused
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import Role, TokenCreate
from herder.protocol.codec import Header
from herder.protocol.fence import inbox_prefix
from herder.protocol.jobs import (
    JobInfo,
    JobListRequest,
    JobRequestInfo,
    JobRequestListRequest,
    JobRequestState,
    JobStart,
    JobState,
)
from herder.protocol.messages import Event
from herder.services.auth.service import AuthService
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import HostConfig, ServiceHost
from herder.services.common.runtime import Service
from herder.services.jobs import request_log, requests
from herder.services.jobs.service import JobsService
from herder.services.packages.service import PackagesService
from herder.services.registry.service import RegistryService
from tests.fleet import Fleet, python_process, running_fleet
from tests.support import connect_as, eventually, migrated

ROOT = Path(__file__).resolve().parents[2]
TENANT = subjects.DEFAULT_TENANT
WITHOUT_JOBS: tuple[type[Service], ...] = (AuthService, RegistryService, PackagesService)
WITH_JOBS: tuple[type[Service], ...] = (*WITHOUT_JOBS, JobsService)
HELLO = "def main(data):\n    return {'hello': data.get('name', 'world')}\n"
BAD_TOKEN = "hd_not-a-token-of-this-stack"
REPLY_WAIT_S = 15.0
NPM_INSTALL_TIMEOUT_S = 180.0


@dataclass
class Integrator:
    """An integrator's token and its own connection, with every message that reached its inbox."""

    name: str
    token: str
    nc: NATS
    replies: dict[str, Msg] = field(default_factory=dict)

    @property
    def inbox(self) -> str:
        """The one inbox the fence lets this token listen on."""
        return inbox_prefix(self.token)

    def reply_to(self, tag: str) -> str:
        """A reply subject of this integrator's own inbox."""
        return f"{self.inbox}.jobs.{tag}"

    async def publish(
        self,
        body: bytes,
        *,
        request_id: str | None = None,
        reply_to: str | None = None,
        json_body: bool = True,
        token: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> PubAck:
        """Publish a durable job request as an integrator in any language would: the token, the content
        type, the request id and where to answer in headers."""
        headers = {Header.AUTHORIZATION: f"Bearer {token or self.token}", **(extra or {})}
        if json_body:
            headers[Header.CONTENT_TYPE] = codec.JSON
        if request_id is not None:
            headers[Header.MSG_ID] = request_id
        if reply_to is not None:
            headers[Header.REPLY_TO] = reply_to
        return await self.nc.jetstream().publish(subjects.job_requests(TENANT), body, headers=headers)

    async def reply(self, subject: str, timeout: float = REPLY_WAIT_S) -> Msg:
        """The answer that reached `subject`, once it has."""
        return await eventually(lambda: self.replies.get(subject), timeout=timeout)


@asynccontextmanager
async def integrator(fleet: Fleet, name: str = "erp") -> AsyncIterator[Integrator]:
    """A fresh integrator token, connected through the fence and listening on its inbox."""
    created = await fleet.client.request(TokenCreate(name=name, role=Role.INTEGRATOR))
    nc = await connect_as(fleet.nats_url, created.secret, name=name)
    found = Integrator(name=name, token=created.secret, nc=nc)

    async def keep(msg: Msg) -> None:
        found.replies[msg.subject] = msg

    try:
        await nc.subscribe(f"{found.inbox}.jobs.>", cb=keep)
        await nc.flush()
        yield found
    finally:
        await nc.close()


class Events:
    """Every jobs event published while a test runs, as a service connection hears them."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self.raw: list[bytes] = []

    async def follow(self, nc: NATS) -> None:
        """Start listening."""

        async def keep(msg: Msg) -> None:
            self.raw.append(bytes(msg.data))
            self.seen.append(codec.load(Event, msg.data))

        await nc.subscribe(subjects.events_filter("jobs", tenant=TENANT), cb=keep)
        await nc.flush()

    def of(self, event_type: str) -> list[Event]:
        """The events of one type, in the order they came."""
        return [event for event in self.seen if event.type == event_type]

    async def wait(self, event_type: str, count: int) -> list[Event]:
        """The events of one type, once `count` of them have come."""

        def arrived() -> list[Event] | None:
            found = self.of(event_type)
            return found if len(found) >= count else None

        return await eventually(arrived)


def job_body(**fields: object) -> bytes:
    """A JSON body as another language writes it: a job of `hello` on robot r1, unless told otherwise."""
    return json.dumps({"process": "hello", "robot": "r1", "input": {"name": "Ada"}, **fields}).encode()


def reply_job(msg: Msg) -> JobInfo:
    """The job an answer carries (failing on an error answer)."""
    assert not codec.is_error_reply(msg.headers), (msg.headers, msg.data)
    return codec.load(JobInfo, msg.data, codec.content_type_of(msg.headers))


def reply_error(msg: Msg) -> dict[str, object]:
    """The error an answer carries, as JSON (failing on a success)."""
    assert codec.is_error_reply(msg.headers), msg.data
    body: dict[str, object] = json.loads(msg.data)
    assert msg.headers is not None and body["code"] == msg.headers[Header.ERROR_CODE]
    return body


async def verdicts(fleet: Fleet, **filters: object) -> list[JobRequestInfo]:
    """What `jobs.requests` shows, newest first."""
    return (await fleet.client.request(JobRequestListRequest.model_validate(filters))).requests


async def job_ids(fleet: Fleet) -> set[str]:
    """Every job's id."""
    return {job.id for job in (await fleet.client.request(JobListRequest())).jobs}


async def stream_messages(nc: NATS) -> int:
    """How many requests the tenant's request stream still holds (served ones are removed)."""
    return (await nc.jetstream().stream_info(subjects.requests_stream(TENANT))).state.messages


async def prepared(fleet: Fleet) -> None:
    """A registered robot r1 (not running: its jobs stay Pending) and the process `hello`."""
    await fleet.add_robot("r1")
    await fleet.publish(python_process(fleet.root, "hello", HELLO))


def jobs_host(
    nats_url: str, db_url: str, data_dir: Path, credential: ServiceCredential, *services: type[Service]
) -> ServiceHost:
    """A process running `services` (the jobs service by default) beside the test's fleet."""
    return ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=db_url,
            services=services or (JobsService,),
            credential=credential,
            data_dir=data_dir,
            migrate=False,
        )
    )


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    """auth, registry, packages and jobs on SQLite and on PostgreSQL."""
    async with running_fleet(nats_url, db_url, tmp_path, credential, WITH_JOBS) as started:
        yield started


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database, for what does not depend on the database."""
    return migrated(f"sqlite:///{tmp_path / 'herder.db'}")


@pytest.fixture
async def lite(nats_url: str, sqlite_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    """auth, registry, packages and jobs on SQLite."""
    async with running_fleet(nats_url, sqlite_url, tmp_path, credential, WITH_JOBS) as started:
        yield started


async def test_json_and_msgpack_requests_make_a_job_an_event_and_an_answer(fleet: Fleet, nc: NATS) -> None:
    await prepared(fleet)
    events = Events()
    await events.follow(nc)
    async with integrator(fleet) as erp:
        # JSON, keyed by the header, with a correlation id.
        ack = await erp.publish(
            job_body(),
            request_id="json-1",
            reply_to=erp.reply_to("json-1"),
            extra={Header.CORRELATION_ID: "order-4711"},
        )
        assert ack.stream == subjects.requests_stream(TENANT) and not ack.duplicate
        # msgpack, keyed by the body's request_id (a caller whose client makes headers awkward).
        packed = codec.dump(JobStart(process="hello", robot="r1", priority="High", request_id="msgpack-1"))
        await erp.publish(packed, json_body=False, reply_to=erp.reply_to("msgpack-1"))

        as_json = await erp.reply(erp.reply_to("json-1"))
        assert as_json.headers is not None and as_json.headers[Header.CONTENT_TYPE] == codec.JSON
        assert as_json.headers[Header.CORRELATION_ID] == "order-4711"
        first = JobInfo.model_validate_json(as_json.data)
        assert (first.process, first.target_robot, first.state) == ("hello", "r1", JobState.PENDING)
        assert first.input == {"name": "Ada"} and first.created_by == "erp"
        as_msgpack = await erp.reply(erp.reply_to("msgpack-1"))
        second = codec.load(JobInfo, as_msgpack.data)
        assert second.priority == "High" and second.id != first.id

    assert await job_ids(fleet) == {first.id, second.id}
    created = await events.wait("jobs.job_created", 2)
    assert len(created) == 2
    assert {(event.data["job_id"], event.data["request_id"]) for event in created} == {
        (first.id, "json-1"),
        (second.id, "msgpack-1"),
    }
    assert all(event.actor == "erp" for event in created)
    recorded = await verdicts(fleet)
    assert [(v.request_id, v.state, v.job_id, v.principal) for v in recorded] == [
        ("msgpack-1", JobRequestState.ACCEPTED, second.id, "erp"),
        ("json-1", JobRequestState.ACCEPTED, first.id, "erp"),
    ]
    assert all(v.tries == 1 and v.process == "hello" and v.published_at is not None for v in recorded)
    await eventually(lambda: _empty(nc))


async def _empty(nc: NATS) -> bool:
    return await stream_messages(nc) == 0


async def test_one_request_id_makes_one_job_however_it_is_sent(fleet: Fleet, nc: NATS) -> None:
    await prepared(fleet)
    events = Events()
    await events.follow(nc)
    async with integrator(fleet) as erp:
        # The same publish three times: the stream stores it once.
        acks = [await erp.publish(job_body(), request_id="dup-1", reply_to=erp.reply_to("dup-1")) for _ in range(3)]
        assert [bool(ack.duplicate) for ack in acks] == [False, True, True]
        assert len({ack.seq for ack in acks}) == 1
        one = reply_job(await erp.reply(erp.reply_to("dup-1")))
        # The same key as a plain `jobs.start` request of the same caller: the same job.
        client = Client(erp.nc, token=erp.token)
        start = JobStart(process="hello", robot="r1", input={"name": "Ada"})
        assert (await client.request(start, idempotency_key="dup-1")).id == one.id

        # Keyed by the body only, the stream cannot tell repeats apart: the jobs service does.
        for attempt in ("a", "b"):
            await erp.publish(job_body(request_id="dup-2"), reply_to=erp.reply_to(f"dup-2-{attempt}"))
        two = reply_job(await erp.reply(erp.reply_to("dup-2-a")))
        assert reply_job(await erp.reply(erp.reply_to("dup-2-b"))).id == two.id

        # A key first sent as a `jobs.start` request, then as a durable one: the first job again.
        three = await client.request(start, idempotency_key="dup-3")
        await erp.publish(job_body(), request_id="dup-3", reply_to=erp.reply_to("dup-3"))
        assert reply_job(await erp.reply(erp.reply_to("dup-3"))).id == three.id

        # The same id with another request: the stream drops a publish under a known Nats-Msg-Id
        # whatever it holds; keyed by the body, the jobs service refuses it, and makes nothing.
        assert (await erp.publish(job_body(priority="Low"), request_id="dup-1")).duplicate
        await erp.publish(job_body(priority="Low", request_id="dup-2"), reply_to=erp.reply_to("dup-2-other"))
        refusal = reply_error(await erp.reply(erp.reply_to("dup-2-other")))
        assert refusal["code"] == "conflict" and "was used for a different request" in str(refusal["message"])

    assert await job_ids(fleet) == {one.id, two.id, three.id}
    await events.wait("jobs.job_created", 3)
    assert sorted(event.data["request_id"] for event in events.of("jobs.job_created")) == ["dup-1", "dup-2", "dup-3"]
    recorded = [(v.request_id, v.state, v.job_id, bool(v.reason)) for v in reversed(await verdicts(fleet))]
    assert recorded == [
        ("dup-1", JobRequestState.ACCEPTED, one.id, False),
        ("dup-2", JobRequestState.ACCEPTED, two.id, False),
        ("dup-2", JobRequestState.ACCEPTED, two.id, True),  # "the job was made by an earlier request with this id"
        ("dup-3", JobRequestState.ACCEPTED, three.id, True),
        ("dup-2", JobRequestState.REFUSED, None, True),
    ]


async def test_requests_published_while_no_jobs_service_runs_are_served_once_when_one_starts(
    nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential, nc: NATS
) -> None:
    events = Events()
    await events.follow(nc)
    async with running_fleet(nats_url, db_url, tmp_path, credential, WITHOUT_JOBS) as fleet:
        await prepared(fleet)
        async with integrator(fleet) as erp:
            for key in ("down-1", "down-2", "down-3"):
                await erp.publish(job_body(), request_id=key, reply_to=erp.reply_to(key))
            assert (await erp.publish(job_body(), request_id="down-2")).duplicate
            assert await stream_messages(nc) == 3  # kept until a jobs service reads them
            await asyncio.sleep(0.5)
            assert erp.replies == {}

            first = jobs_host(nats_url, db_url, tmp_path, credential)
            await first.start()
            try:
                answered = [reply_job(await erp.reply(erp.reply_to(key))) for key in ("down-1", "down-2", "down-3")]
                await eventually(lambda: _empty(nc))
                assert await job_ids(fleet) == {job.id for job in answered}
            finally:
                await first.stop()

        # Another jobs service later finds nothing left to do: each request was served once.
        again = jobs_host(nats_url, db_url, tmp_path, credential)
        await again.start()
        try:
            await asyncio.sleep(1.5)
            assert await job_ids(fleet) == {job.id for job in answered}
            recorded = await verdicts(fleet)
            assert sorted((v.request_id, v.state, v.tries) for v in recorded) == [
                ("down-1", JobRequestState.ACCEPTED, 1),
                ("down-2", JobRequestState.ACCEPTED, 1),
                ("down-3", JobRequestState.ACCEPTED, 1),
            ]
            assert all(v.published_at is not None and v.published_at < v.decided_at for v in recorded)
        finally:
            await again.stop()
    created = events.of("jobs.job_created")
    assert sorted(event.data["request_id"] for event in created) == ["down-1", "down-2", "down-3"]


async def test_refused_requests_are_answered_recorded_and_never_tried_again(fleet: Fleet, nc: NATS) -> None:
    await prepared(fleet)
    events = Events()
    await events.follow(nc)
    # Answers to the unknown token's inbox (its holder could listen there): a service connection hears them.
    stranger: dict[str, Msg] = {}
    command: list[Msg] = []

    async def keep_stranger(msg: Msg) -> None:
        stranger[msg.subject] = msg

    async def keep_command(msg: Msg) -> None:
        command.append(msg)

    await nc.subscribe(f"{inbox_prefix(BAD_TOKEN)}.>", cb=keep_stranger)
    await nc.subscribe(subjects.command(TENANT, "box1", "r1"), cb=keep_command)
    await nc.flush()
    async with integrator(fleet) as erp:
        bad_token_reply = f"{inbox_prefix(BAD_TOKEN)}.jobs.bad-token"
        await erp.publish(job_body(), request_id="bad-token", reply_to=bad_token_reply, token=BAD_TOKEN)
        cases = {
            "no-id": (job_body(), None),
            "unknown-process": (job_body(process="nope"), "unknown-process"),
            "unknown-robot": (job_body(robot="r9"), "unknown-robot"),
            "with-trigger": (job_body(trigger="nightly"), "with-trigger"),
            "bad-body": (json.dumps({"process": "hello", "colour": "red"}).encode(), "bad-body"),
            "not-json": (b"{not json", "not-json"),
        }
        for tag, (body, key) in cases.items():
            await erp.publish(body, request_id=key, reply_to=erp.reply_to(tag))
        # An answer may go only to the sender's own inbox: never, say, to a robot's commands.
        await erp.publish(job_body(), request_id="foreign-reply", reply_to=subjects.command(TENANT, "box1", "r1"))
        # And the consumer goes on with the next request.
        await erp.publish(job_body(), request_id="good", reply_to=erp.reply_to("good"))

        good = reply_job(await erp.reply(erp.reply_to("good")))
        answers = {tag: reply_error(await erp.reply(erp.reply_to(tag))) for tag in cases}
        stranger_answer = await eventually(lambda: stranger.get(bad_token_reply))
        token = erp.token

    unknown = reply_error(stranger_answer)
    assert re.fullmatch(r"[0-9a-f]{32}", str(unknown.pop("correlation_id")))  # made for it, as for any error
    assert unknown == {"code": "unauthenticated", "message": "the token is unknown or revoked", "details": {}}
    assert {tag: answer["code"] for tag, answer in answers.items()} == {
        "no-id": "bad_request",
        "unknown-process": "not_found",
        "unknown-robot": "not_found",
        "with-trigger": "forbidden",
        "bad-body": "bad_request",
        "not-json": "bad_request",
    }
    assert "a durable request needs an id" in str(answers["no-id"]["message"])
    assert "no robot named 'r9'" in str(answers["unknown-robot"]["message"])
    assert "colour" in str(answers["bad-body"]["message"])
    assert await job_ids(fleet) == {good.id}
    assert command == []

    refused_events = await events.wait("jobs.request_refused", 8)
    assert len(refused_events) == 8
    by_id = {event.data["request_id"]: event for event in refused_events}
    assert set(by_id) == {
        None,
        "bad-token",
        "unknown-process",
        "unknown-robot",
        "with-trigger",
        "bad-body",
        "not-json",
        "foreign-reply",
    }
    assert by_id["bad-token"].data["code"] == "unauthenticated" and by_id["bad-token"].actor is None
    assert by_id["unknown-process"].actor == "erp" and by_id["unknown-process"].data["process"] == "nope"
    assert "Hd-Reply-To" in by_id["foreign-reply"].data["reason"]

    recorded = await verdicts(fleet, state=JobRequestState.REFUSED)
    assert len(recorded) == 8 and all(v.job_id is None and v.code and v.reason for v in recorded)
    assert {v.request_id: v.code for v in recorded}["bad-token"] == "unauthenticated"
    assert [v.job_id for v in await verdicts(fleet, request_id="good")] == [good.id]
    # Refusals are final: acknowledged, gone from the stream, not delivered again.
    await eventually(lambda: _empty(nc))
    await asyncio.sleep(1.5)
    assert len(await verdicts(fleet)) == 9 and all(v.tries == 1 for v in await verdicts(fleet))
    # No token, of the integrator or the stranger, is kept or told.
    engine = fleet.host.engine
    assert engine is not None
    async with engine.connect() as connection:
        rows = (await connection.execute(select(request_log.job_requests))).all()
    kept = repr(rows).encode() + b"".join(events.raw)
    assert len(rows) == 9
    for secret in (token, BAD_TOKEN):
        assert secret.encode() not in kept


async def test_a_request_that_keeps_failing_is_refused_after_its_tries(
    nats_url: str, sqlite_url: str, tmp_path: Path, credential: ServiceCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No packages service answers: the request is tried again with a backoff, then given up, on
    record; once the packages service is back, the next request is served."""
    monkeypatch.setattr(requests, "MAX_TRIES", 3)
    monkeypatch.setattr(requests, "RETRY_BASE_S", 0.05)
    monkeypatch.setattr(requests, "RETRY_MAX_S", 0.1)
    services = (AuthService, RegistryService, JobsService)
    async with running_fleet(nats_url, sqlite_url, tmp_path, credential, services) as fleet:
        await fleet.add_robot("r1")
        async with integrator(fleet) as erp:
            await erp.publish(job_body(), request_id="flaky", reply_to=erp.reply_to("flaky"))
            answer = reply_error(await erp.reply(erp.reply_to("flaky"), timeout=30))
            assert answer["code"] == "unavailable"
            assert str(answer["message"]).startswith("gave up after 3 tries: no packages service is running")
            [verdict] = await verdicts(fleet)
            assert (verdict.state, verdict.code, verdict.tries) == (JobRequestState.REFUSED, "unavailable", 3)

            packages = jobs_host(nats_url, sqlite_url, tmp_path, credential, PackagesService)
            await packages.start()
            try:
                await fleet.publish(python_process(fleet.root, "hello", HELLO))
                await erp.publish(job_body(), request_id="after", reply_to=erp.reply_to("after"))
                assert reply_job(await erp.reply(erp.reply_to("after"))).process == "hello"
            finally:
                await packages.stop()
        assert [v.request_id for v in await verdicts(fleet)] == ["after", "flaky"]


async def test_only_principals_that_may_start_jobs_publish_requests(lite: Fleet, nc: NATS) -> None:
    """Through the fence: an integrator's own connection publishes into the request stream; a robot's
    is refused by the server, and nothing reaches the stream."""
    await prepared(lite)
    async with integrator(lite) as erp:
        ack = await erp.publish(job_body(), request_id="from-erp", reply_to=erp.reply_to("from-erp"))
        assert ack.seq >= 1
        reply_job(await erp.reply(erp.reply_to("from-erp")))
    robot_token = await lite.add_robot("r2")
    robot = await connect_as(lite.nats_url, robot_token, name="robot-r2")
    try:
        subject = subjects.job_requests(TENANT)
        await robot.publish(subject, job_body(), headers={Header.AUTHORIZATION: f"Bearer {robot_token}"})
        text = await eventually(lambda: refused(robot, subject))
        assert "publish" in text.lower()
    finally:
        await robot.close()
    await asyncio.sleep(0.5)
    assert [v.request_id for v in await verdicts(lite)] == ["from-erp"]
    assert (await nc.jetstream().stream_info(subjects.requests_stream(TENANT))).state.last_seq == ack.seq


def _docs_example(language: str) -> str:
    """The first block of `language` in docs/integrators.md."""
    found = re.search(rf"```{language}\n(.*?)```", (ROOT / "docs" / "integrators.md").read_text(), re.DOTALL)
    assert found is not None, f"no {language} example in docs/integrators.md"
    return found.group(1)


async def _run(*command: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Run a program without blocking the services running in this process."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _examples_ready(fleet: Fleet) -> str:
    """The README's robot and process, and an integrator's token, as the examples expect them."""
    await fleet.add_robot("invoices-1", host="ts-01")
    await fleet.publish(ROOT / "examples" / "hello")
    created = await fleet.client.request(TokenCreate(name="erp", role=Role.INTEGRATOR))
    return created.secret


async def test_the_nats_py_example_of_the_docs_starts_a_job(lite: Fleet, tmp_path: Path) -> None:
    token = await _examples_ready(lite)
    script = tmp_path / "start_job.py"
    script.write_text(_docs_example("python"))
    env = {"PATH": os.environ.get("PATH", ""), "HERDER_URL": lite.nats_url, "HERDER_TOKEN": token}
    code, out, err = await _run(sys.executable, str(script), cwd=tmp_path, env=env, timeout=60)
    assert code == 0, err
    job_id, state = out.split()
    assert state == "Pending"
    job = await lite.job(job_id)
    assert (job.process, job.target_robot, job.created_by) == ("hello", "invoices-1", "erp")


def _node_modules(tmp_path: Path) -> Path | None:
    """A folder whose node_modules holds the `nats` package: HERDER_TEST_NODE_MODULES (offline, as CI
    gives it), else None (it must be installed from the npm registry)."""
    given = os.environ.get("HERDER_TEST_NODE_MODULES")
    if given:
        folder = Path(given)
        if not (folder / "node_modules" / "nats").is_dir():
            pytest.fail(f"HERDER_TEST_NODE_MODULES={given} has no node_modules/nats; run 'npm install nats' there")
        return folder
    return None


async def test_the_node_example_starts_a_job(lite: Fleet, tmp_path: Path) -> None:
    """examples/integrators/start-job.mjs, with the `nats` npm package, against this test's server."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        pytest.skip("node is not installed: the Node.js example of docs/integrators.md is not run")
    folder = _node_modules(tmp_path)
    if folder is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.skip(
                "CI=true and HERDER_TEST_NODE_MODULES is not set: installing the nats npm package needs the "
                "network; set HERDER_TEST_NODE_MODULES to a folder where 'npm install nats' was run"
            )
        if npm is None:
            pytest.skip("npm is not installed: the nats npm package for the Node.js example cannot be installed")
        folder = tmp_path / "node"
        folder.mkdir()
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
        try:
            code, _out, err = await _run(
                npm, "install", "--no-audit", "--silent", "nats@2", cwd=folder, env=env, timeout=NPM_INSTALL_TIMEOUT_S
            )
        except TimeoutError:
            pytest.skip(f"'npm install nats' took longer than {NPM_INSTALL_TIMEOUT_S:g} s (no registry?)")
        if code != 0:
            pytest.skip(f"'npm install nats' failed (no registry?): {err.strip().splitlines()[-1:]}")
    script = folder / "start-job.mjs"
    shutil.copyfile(ROOT / "examples" / "integrators" / "start-job.mjs", script)
    token = await _examples_ready(lite)
    env = {"PATH": os.environ.get("PATH", ""), "HERDER_URL": lite.nats_url, "HERDER_TOKEN": token}
    code, out, err = await _run(node, str(script), cwd=folder, env=env, timeout=60)
    assert code == 0, err
    job_id, state = out.split()
    assert state == "Pending"
    job = await lite.job(job_id)
    assert (job.process, job.target_robot, job.created_by) == ("hello", "invoices-1", "erp")
    assert [v.job_id for v in await verdicts(lite)] == [job_id]
