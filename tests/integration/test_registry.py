"""The registry on a real bus, on SQLite and PostgreSQL: robots added and removed, tokens, presence."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import select

from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import Role, WhoAmI
from herder.protocol.codec import BEARER, Header
from herder.protocol.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthenticated
from herder.protocol.messages import Event, utcnow
from herder.protocol.registry import (
    Heartbeat,
    RobotAdd,
    RobotConnect,
    RobotGoodbye,
    RobotListRequest,
    RobotPresence,
    RobotRemove,
    RobotShow,
    RobotStatus,
    RobotType,
)
from herder.services.auth.service import AuthService
from herder.services.common.credentials import ServiceCredential
from herder.services.common.events import outbox
from herder.services.registry.repository import robots
from herder.services.registry.service import RegistryService
from tests.fleet import Fleet, running_fleet
from tests.support import connect_as

INTERVAL_S = 0.2


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential, services=(AuthService, RegistryService)) as fleet:
        try:
            yield fleet
        finally:
            while _AGENTS:
                await _AGENTS.pop().close()


_AGENTS: list[FakeAgent] = []


class FakeAgent:
    """What a robot agent says to the registry, said by hand (on the robot's own bus connection) so a
    test controls the timing."""

    def __init__(self, fleet: Fleet, robot: str, token: str, session: str = "s1") -> None:
        self.fleet = fleet
        self.robot = robot
        self.token = token
        self.session = session
        self._nc: NATS | None = None
        _AGENTS.append(self)  # closed with the fleet

    async def _connection(self) -> NATS:
        if self._nc is None:
            self._nc = await connect_as(self.fleet.nats_url, self.token, name=f"fake-{self.robot}-{self.session}")
        return self._nc

    async def connect(self, interval_s: float = INTERVAL_S) -> None:
        client = Client(await self._connection(), token=self.token)
        await client.request(RobotConnect(robot=self.robot, session=self.session, heartbeat_interval_s=interval_s))

    async def beat(self, job: str | None = None) -> None:
        nc = await self._connection()
        beat = Heartbeat(session=self.session, interval_s=INTERVAL_S, current_job=job, sent_at=utcnow())
        await nc.publish(subjects.heartbeat(self.fleet.tenant, self.robot), codec.dump(beat))
        await nc.flush()

    async def goodbye(self, session: str | None = None) -> None:
        client = Client(await self._connection(), token=self.token)
        await client.request(RobotGoodbye(session=session or self.session))

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None


async def status_events(fleet: Fleet, robot: str) -> list[tuple[str, str]]:
    """(previous, status) of every status change event of `robot`, oldest first."""
    js = fleet.nc.jetstream()
    info = await js.stream_info(subjects.events_stream("default"))
    found = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        event = codec.load(Event, (await js.get_msg(subjects.events_stream("default"), sequence)).data or b"")
        if event.type == "registry.robot_status_changed" and event.data["robot"] == robot:
            found.append((event.data["previous"], event.data["status"]))
    return found


async def test_add_list_show_and_remove(fleet: Fleet) -> None:
    added = await fleet.client.request(
        RobotAdd(name="r1", type=RobotType.UNATTENDED, host="ts-01", groups=["finance", "ap", "finance"])
    )
    assert added.token.startswith("hd_")
    assert (added.robot.status, added.robot.groups, added.robot.last_heartbeat) == (
        RobotStatus.DISCONNECTED,
        ["ap", "finance"],
        None,
    )
    await fleet.client.request(RobotAdd(name="r2", type=RobotType.ATTENDED, host="desk-7"))

    names = [r.name for r in (await fleet.client.request(RobotListRequest())).robots]
    assert names == ["r1", "r2"]
    assert [r.name for r in (await fleet.client.request(RobotListRequest(group="ap"))).robots] == ["r1"]
    assert [r.name for r in (await fleet.client.request(RobotListRequest(host="desk-7"))).robots] == ["r2"]
    assert (await fleet.client.request(RobotShow(name="r2"))).type is RobotType.ATTENDED

    with pytest.raises(Conflict, match="already has a robot named 'r1'"):
        await fleet.client.request(RobotAdd(name="r1", type=RobotType.UNATTENDED, host="ts-01"))
    removed = await fleet.client.request(RobotRemove(name="r1"))
    assert removed.robot.name == "r1"
    with pytest.raises(NotFound, match="no robot named 'r1'"):
        await fleet.client.request(RobotShow(name="r1"))
    with pytest.raises(NotFound):
        await fleet.client.request(RobotRemove(name="r1"))
    # The removed robot's token is refused at once.
    with pytest.raises(Unauthenticated):
        await Client(fleet.nc, token=added.token).request(RobotConnect(robot="r1", session="s1"))


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "with space", "type": "unattended", "host": "h"},
        {"name": "r.1", "type": "unattended", "host": "h"},
        {"name": "r1", "type": "sometimes", "host": "h"},
        {"name": "r1", "type": "unattended", "host": "ts01.corp.local"},
        {"name": "r1", "type": "unattended", "host": "h", "groups": ["a b"]},
        {"name": "r1", "type": "unattended"},
    ],
)
async def test_malformed_robots_are_refused_and_nothing_is_stored(fleet: Fleet, fields: dict[str, object]) -> None:
    # As an integrator in another language would send it: JSON, by hand.
    reply = await fleet.nc.request(
        subjects.service(fleet.tenant, "registry", "robot_add"),
        json.dumps(fields).encode(),
        headers={Header.AUTHORIZATION: BEARER + fleet.admin_token, Header.CONTENT_TYPE: codec.JSON},
    )
    with pytest.raises(BadRequest):
        codec.raise_error_reply(reply.data, reply.headers or {})
    assert (await fleet.client.request(RobotListRequest())).robots == []


async def test_robot_tokens_are_hashed_and_only_open_the_robots_own_doors(fleet: Fleet) -> None:
    token = await fleet.add_robot("r1")
    robot = Client(fleet.nc, token=token)
    me = await robot.request(WhoAmI(), service="auth")
    assert (me.kind.value, me.name, me.role) == ("robot", "r1", Role.ROBOT)
    with pytest.raises(Forbidden):
        await robot.request(RobotAdd(name="r2", type=RobotType.UNATTENDED, host="h"))
    with pytest.raises(Forbidden):
        await robot.request(RobotListRequest())
    # An admin token is not a robot: it cannot pose as one.
    with pytest.raises(Forbidden, match="only a robot's own token"):
        await fleet.client.request(RobotConnect(robot="r1", session="s1"))
    # Nor does one robot's token connect another.
    with pytest.raises(Forbidden, match="this token is robot r1's, not r2's"):
        await robot.request(RobotConnect(robot="r2", session="s1"))
    # Nobody makes a robot-role API token through auth, not even by sending the JSON by hand.
    reply = await fleet.nc.request(
        subjects.service(fleet.tenant, "auth", "token_create"),
        json.dumps({"name": "sneaky", "role": "robot"}).encode(),
        headers={Header.AUTHORIZATION: BEARER + fleet.admin_token, Header.CONTENT_TYPE: codec.JSON},
    )
    with pytest.raises(BadRequest, match="robot tokens are issued by 'herder robot add'"):
        codec.raise_error_reply(reply.data, reply.headers or {})

    engine = fleet.host.engine
    assert engine is not None
    async with engine.connect() as connection:
        stored = repr((await connection.execute(select(robots))).all()) + repr(
            (await connection.execute(select(outbox))).all()
        )
    assert token not in stored

    # The auth service's reconcile leaves robot tokens in the shared bucket alone.
    auth = fleet.host.services["auth"]
    assert isinstance(auth, AuthService)
    await auth.reconcile()
    assert (await robot.request(WhoAmI(), service="auth")).name == "r1"


async def test_presence_follows_heartbeats(fleet: Fleet) -> None:
    agent = FakeAgent(fleet, "r1", await fleet.add_robot("r1"))
    await agent.connect()
    assert (await fleet.client.request(RobotShow(name="r1"))).status is RobotStatus.AVAILABLE

    await agent.beat(job="a" * 32)
    busy = await fleet.wait_robot("r1", RobotStatus.BUSY, timeout=5)
    assert busy.current_job == "a" * 32

    # Silence: three missed heartbeats make it Unresponsive, and not much later than that.
    await agent.beat()
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, timeout=5)
    silent_since = time.monotonic()
    await fleet.wait_robot("r1", RobotStatus.UNRESPONSIVE, timeout=5)
    assert time.monotonic() - silent_since >= 3 * INTERVAL_S * 0.9

    await agent.beat()
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, timeout=5)
    await agent.goodbye()
    assert (await fleet.client.request(RobotShow(name="r1"))).status is RobotStatus.DISCONNECTED

    assert await status_events(fleet, "r1") == [
        ("Disconnected", "Available"),
        ("Available", "Busy"),
        ("Busy", "Available"),
        ("Available", "Unresponsive"),
        ("Unresponsive", "Available"),
        ("Available", "Disconnected"),
    ]


async def test_a_new_session_takes_over_and_the_old_one_no_longer_counts(fleet: Fleet, nc: NATS) -> None:
    token = await fleet.add_robot("r1")
    old, new = FakeAgent(fleet, "r1", token, "old"), FakeAgent(fleet, "r1", token, "new")
    await old.connect(interval_s=30)
    await new.connect(interval_s=30)
    await old.beat(job="b" * 32)  # the replaced agent's heartbeat changes nothing
    await old.goodbye()  # nor does its goodbye
    await fleet.nc.flush()
    robot = await fleet.client.request(RobotShow(name="r1"))
    assert (robot.status, robot.current_job) == (RobotStatus.AVAILABLE, None)

    # The bucket other services read says the same, with the new session.
    kv = await nc.jetstream().key_value(subjects.ROBOTS_BUCKET)
    presence = codec.load(RobotPresence, (await kv.get(subjects.robot_key(fleet.tenant, "r1"))).value or b"")
    assert (presence.status, presence.session, presence.host) == (RobotStatus.AVAILABLE, "new", "box1")


async def test_a_heartbeat_speaks_for_the_robot_whose_subject_it_is_on(fleet: Fleet, nc: NATS) -> None:
    """Heartbeats carry no token: only the robot itself may publish on its telemetry subject (the fence
    sees to that; tests/integration/test_fence.py), so the subject says whose heartbeat it is."""
    agent = FakeAgent(fleet, "r1", await fleet.add_robot("r1"))
    await agent.connect(interval_s=30)
    try:
        await agent.beat(job="c" * 32)
        await fleet.wait_robot("r1", RobotStatus.BUSY, timeout=5)
        # A heartbeat that cannot be read changes nothing, and the registry goes on.
        await nc.publish(subjects.heartbeat(fleet.tenant, "r1"), b"not a heartbeat")
        await agent.beat()
        await fleet.wait_robot("r1", RobotStatus.AVAILABLE, timeout=5)
    finally:
        await agent.close()


async def test_a_robot_running_a_job_cannot_be_removed(fleet: Fleet) -> None:
    agent = FakeAgent(fleet, "r1", await fleet.add_robot("r1"))
    await agent.connect(interval_s=30)
    await agent.beat(job="d" * 32)
    await fleet.wait_robot("r1", RobotStatus.BUSY, timeout=5)
    with pytest.raises(Conflict, match="is running job dddddddd"):
        await fleet.client.request(RobotRemove(name="r1"))
    await agent.beat()
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, timeout=5)
    await fleet.client.request(RobotRemove(name="r1"))
