"""The fence, as nats-server enforces it: each robot and client on its own identity, refused what is not its own.

Every refusal here comes from the server (a permissions violation it reports on the connection),
not from herder's services: the forbidden message never reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from herder.client.connection import Credentials as BusCredentials
from herder.client.connection import CredentialsRefused, connect, refusals, refused
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import Role, TokenCreate, TokenRevoke
from herder.protocol.errors import Forbidden
from herder.protocol.fence import inbox_prefix
from herder.protocol.jobs import JobListRequest, JobStart, JobState, JobStateChangedEvent
from herder.protocol.messages import Event
from herder.protocol.registry import RobotRemove, RobotStatus
from herder.services.common.credentials import ServiceCredential
from tests.fleet import Fleet, python_process, running_fleet
from tests.support import connect_as, eventually, migrated

REFUSAL_WAIT_S = 5.0


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database (the fence does not depend on the database)."""
    return migrated(f"sqlite:///{tmp_path / 'herder.db'}")


@pytest.fixture
async def fleet(nats_url: str, sqlite_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    """The whole of herder, on SQLite."""
    async with running_fleet(nats_url, sqlite_url, tmp_path, credential) as started:
        yield started


async def refusal_of(nc: NATS, subject: str) -> str:
    """The server's refusal of `subject` on this connection, once it has arrived."""
    return await eventually(lambda: refused(nc, subject), timeout=REFUSAL_WAIT_S)


async def assert_subscribe_refused(nc: NATS, subject: str) -> None:
    """Subscribing to `subject` is refused by the server, and nothing published there arrives."""
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=keep)
    text = await eventually(lambda: refused(nc, subject, action="subscription"), timeout=REFUSAL_WAIT_S)
    assert "subscription" in text.lower(), text
    assert not got


async def assert_publish_refused(nc: NATS, subject: str, data: bytes = b"x") -> None:
    """Publishing to `subject` is refused by the server."""
    await nc.publish(subject, data)
    text = await refusal_of(nc, subject)
    assert "publish" in text.lower(), text


async def robot_connection(fleet: Fleet, name: str, *, groups: tuple[str, ...] = ()) -> tuple[NATS, str]:
    """A bus connection as a freshly registered robot, and its token."""
    token = await fleet.add_robot(name, groups=groups)
    return await connect_as(fleet.nats_url, token, name=f"robot-{name}"), token


async def test_a_robot_hears_only_its_own_commands_and_inbox(fleet: Fleet) -> None:
    nc, token = await robot_connection(fleet, "r-a")
    await fleet.add_robot("r-b")
    try:
        for subject in (
            "hd.default.cmd.box1.r-b",  # another robot's commands
            "hd.default.cmd.*.*",
            "hd.*.svc.>",  # requests (and their tokens)
            "hd.default.tel.r-b.heartbeat",  # another robot's telemetry
            "hd.default.tel.>",
            "hd.default.evt.>",
            "$JS.API.>",
            "_INBOX.>",
            f"{inbox_prefix('someone else')}.>",
            ">",
        ):
            await assert_subscribe_refused(nc, subject)
        # Its own: no refusal.
        await nc.subscribe("hd.default.cmd.box1.r-a")
        await nc.subscribe(f"{inbox_prefix(token)}.x")
        await nc.flush()
        assert refused(nc, "hd.default.cmd.box1.r-a", action="subscription") is None
    finally:
        await nc.close()


async def test_a_robot_publishes_only_its_telemetry_and_the_robot_verbs(fleet: Fleet) -> None:
    nc, _token = await robot_connection(fleet, "r-a")
    try:
        for subject in (
            "hd.default.cmd.box1.r-b",  # commanding a robot
            "hd.default.evt.jobs.job_state_changed",  # forging history
            "hd.default.tel.r-b.heartbeat",  # impersonating another robot
            "hd.default.tel.r-b.log.0123456789abcdef0123456789abcdef",
            "hd.default.svc.jobs.start",  # a verb robots do not call
            "hd.default.svc.auth.token_create",
            f"$JS.API.STREAM.PURGE.{subjects.events_stream('default')}",
            f"$JS.API.CONSUMER.CREATE.{subjects.events_stream('default')}",  # reading the event stream
            f"$JS.API.CONSUMER.CREATE.{subjects.logs_stream('default')}",
            "$SYS.REQ.USER.AUTH",
        ):
            await assert_publish_refused(nc, subject)
        await nc.publish("hd.default.tel.r-a.heartbeat", b"")
        await nc.flush()
        assert refused(nc, "hd.default.tel.r-a.heartbeat") is None
    finally:
        await nc.close()


async def test_a_client_sends_requests_and_reads_its_tenant_but_hears_no_one(fleet: Fleet) -> None:
    created = await fleet.client.request(TokenCreate(name="ci", role=Role.INTEGRATOR))
    nc = await connect_as(fleet.nats_url, created.secret, name="integrator")
    try:
        for subject in ("hd.*.svc.>", "hd.default.svc.jobs.list", "hd.default.cmd.>", "hd.default.tel.>", ">"):
            await assert_subscribe_refused(nc, subject)
        for subject in (
            "hd.default.evt.jobs.job_state_changed",
            "hd.default.cmd.box1.r1",
            "hd.default.tel.r1.heartbeat",
            "hd.acme.svc.jobs.list",  # another tenant's services
            f"$JS.API.STREAM.DELETE.{subjects.events_stream('default')}",
            f"$JS.API.STREAM.PURGE.{subjects.logs_stream('default')}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.events_stream('default')}.mine",
            f"$O.{subjects.packages_bucket('default')}.C.forged",  # integrators do not upload packages
        ):
            await assert_publish_refused(nc, subject)
        # What it may do, it can: a request, and reading its tenant's event stream.
        listed = await Client(nc, token=created.secret).request(JobListRequest())
        assert listed.jobs == []
        info = await nc.jetstream().stream_info(subjects.events_stream("default"))
        assert info.state.messages >= 1
    finally:
        await nc.close()


async def test_a_request_the_bus_refuses_says_so(fleet: Fleet) -> None:
    created = await fleet.client.request(TokenCreate(name="ci", role=Role.INTEGRATOR))
    nc = await connect_as(fleet.nats_url, created.secret, name="integrator")
    try:
        client = Client(nc, token=created.secret, tenant="acme", timeout=1.0)
        with pytest.raises(Forbidden, match=r"the bus refused .*hd\.acme\.svc\.jobs\.list"):
            await client.request(JobListRequest())
    finally:
        await nc.close()


async def test_a_forged_event_is_impossible_from_a_robot_or_a_client(fleet: Fleet, nc: NATS) -> None:
    js = nc.jetstream()
    stream = subjects.events_stream("default")
    before = (await js.stream_info(stream)).state.last_seq
    robot, _ = await robot_connection(fleet, "r-a")
    created = await fleet.client.request(TokenCreate(name="ops", role=Role.OPERATOR))
    operator = await connect_as(fleet.nats_url, created.secret, name="operator")
    forged = Event.of(
        JobStateChangedEvent(job_id="0" * 32, process="p", state=JobState.SUCCESSFUL, previous=JobState.RUNNING),
        tenant="default",
        actor="forger",
    )
    try:
        for connection in (robot, operator):
            await assert_publish_refused(connection, forged.subject, codec.dump(forged))
            with contextlib.suppress(nats.errors.Error):
                await connection.jetstream().publish(forged.subject, codec.dump(forged), timeout=0.5)
        # The stream holds what services published, and nothing of the forgers.
        after = await js.stream_info(stream)
        for sequence in range(before + 1, after.state.last_seq + 1):
            event = codec.load(Event, (await js.get_msg(stream, sequence)).data or b"")
            assert event.actor != "forger"
    finally:
        await robot.close()
        await operator.close()


async def test_nothing_a_non_service_connection_can_hear_holds_a_token(fleet: Fleet, tmp_path: Path) -> None:
    """While an admin lists jobs and robots heartbeat and run a job, a robot and an integrator listen
    to everything they may: no token of anyone's reaches them."""
    robot_token = await fleet.add_robot("worker", groups=("pool",))
    fleet.start_robot("worker", robot_token)
    await fleet.wait_robot("worker", RobotStatus.AVAILABLE)
    spy_robot, spy_robot_token = await robot_connection(fleet, "spy")
    created = await fleet.client.request(TokenCreate(name="spy", role=Role.INTEGRATOR))
    spy_client = await connect_as(fleet.nats_url, created.secret, name="spy-client")
    heard: list[bytes] = []

    async def keep(msg: Msg) -> None:
        heard.append(msg.subject.encode() + b" " + bytes(msg.data) + repr(msg.headers).encode())

    try:
        await spy_robot.subscribe("hd.default.cmd.*.spy", cb=keep)
        await spy_robot.subscribe(f"{inbox_prefix(spy_robot_token)}.>", cb=keep)
        await spy_client.subscribe(f"{inbox_prefix(created.secret)}.>", cb=keep)
        # And everything it may read through JetStream: the tenant's events and logs.
        js = spy_client.jetstream()
        await js.subscribe("hd.default.evt.>", stream=subjects.events_stream("default"), cb=keep, ordered_consumer=True)
        await js.subscribe("hd.default.tel.>", stream=subjects.logs_stream("default"), cb=keep, ordered_consumer=True)
        await fleet.publish(python_process(tmp_path, "hello", "def main(data):\n    print('hi')\n    return {}\n"))
        job = await fleet.client.request(JobStart(process="hello", group="pool"))
        await fleet.wait_job(job.id, JobState.SUCCESSFUL)
        for _ in range(5):
            await fleet.client.request(JobListRequest())
        await Client(spy_client, token=created.secret).request(JobListRequest())
        await asyncio.sleep(1.5)  # heartbeats every 0.5 s go by meanwhile
        assert heard, "the spies heard nothing at all: the capture is not working"
        everything = b"\n".join(heard)
        for token in (fleet.admin_token, robot_token):
            assert token.encode() not in everything
        # An inbox carries only what was sent to it, and the client's own requests carried its own token.
        assert b"Authorization" not in everything
    finally:
        await spy_robot.close()
        await spy_client.close()


async def test_a_wrong_or_missing_token_is_refused_at_connect(fleet: Fleet) -> None:
    with pytest.raises(CredentialsRefused):
        await connect_as(fleet.nats_url, "hd_not-a-token-of-this-stack")
    with pytest.raises(CredentialsRefused):
        await connect(fleet.nats_url, name="nobody", credentials=BusCredentials(user="nobody", password="guess"))


async def test_a_revoked_token_is_disconnected_within_seconds(fleet: Fleet) -> None:
    created = await fleet.client.request(TokenCreate(name="ci", role=Role.INTEGRATOR))
    nc = await connect_as(fleet.nats_url, created.secret, name="integrator")
    client = Client(nc, token=created.secret, timeout=1.0)
    await client.request(JobListRequest())
    revoked_at = time.monotonic()
    await fleet.client.request(TokenRevoke(name="ci"))
    try:
        await eventually(lambda: not nc.is_connected, timeout=5.0)
        assert time.monotonic() - revoked_at < 5.0
        # Its reconnections are refused: it stays off the bus.
        await asyncio.sleep(1.5)
        assert not nc.is_connected
    finally:
        await nc.close()
    with pytest.raises(CredentialsRefused):
        await connect_as(fleet.nats_url, created.secret)


async def test_a_removed_robot_is_disconnected_and_its_agent_stops_with_a_line(fleet: Fleet) -> None:
    robot = await fleet.run_robot("leaving")
    removed_at = time.monotonic()
    await fleet.client.request(RobotRemove(name="leaving"))
    code = await asyncio.to_thread(robot.process.wait, 10)
    assert time.monotonic() - removed_at < 5.0
    assert code != 0
    lines = [line for line in robot.output().splitlines() if line.startswith("herder: ")]
    assert lines == ["herder: robot leaving was removed from herder (removed by admin); it stops"], robot.output()


async def test_a_connection_is_refused_in_bounded_time_when_no_auth_service_answers(
    nats_url: str, credential: ServiceCredential, nc: NATS
) -> None:
    """No auth service runs: the server refuses the client after its auth timeout; it never hangs."""
    started = time.monotonic()
    with pytest.raises(CredentialsRefused):
        await connect_as(nats_url, "hd_whatever")
    assert time.monotonic() - started < 5.0
    assert refusals(nc) == []  # the service connection itself was never refused anything


async def test_only_roles_that_start_jobs_publish_durable_job_requests(fleet: Fleet) -> None:
    """Integrators (and operators) publish into their tenant's request stream, on `req.jobs` alone; a
    robot may not, nor may anyone publish into another tenant's."""
    created = await fleet.client.request(TokenCreate(name="erp", role=Role.INTEGRATOR))
    integrator = await connect_as(fleet.nats_url, created.secret, name="integrator")
    robot, _token = await robot_connection(fleet, "r-a")
    try:
        ack = await integrator.jetstream().publish(subjects.job_requests("default"), b"{}", timeout=5)
        assert ack.stream == subjects.requests_stream("default")
        assert refused(integrator, subjects.job_requests("default")) is None
        for subject in ("hd.acme.req.jobs", "hd.default.req.queues", "hd.default.req.>"):
            await assert_publish_refused(integrator, subject)
        await assert_publish_refused(robot, subjects.job_requests("default"))
    finally:
        await integrator.close()
        await robot.close()
