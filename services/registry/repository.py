"""The registry's table of robots, and every query it makes of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    bindparam,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol import subjects
from herder.protocol.auth import ROLE_PERMISSIONS, Principal, PrincipalKind, Role
from herder.protocol.errors import Conflict
from herder.protocol.registry import RobotInfo, RobotPresence, RobotStatus, RobotType
from herder.services.common.database import UtcDateTime
from herder.services.registry.presence import Seen

metadata = MetaData()

robots = Table(
    "registry_robots",
    metadata,
    Column("tenant", String(128), nullable=False),
    Column("name", String(63), nullable=False),
    Column("type", String(16), nullable=False),
    Column("host", String(63), nullable=False),
    Column("groups", Text(), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("status_since", UtcDateTime(), nullable=False),
    Column("session", String(64)),
    Column("last_heartbeat", UtcDateTime()),
    Column("heartbeat_interval_s", Float(), nullable=False),
    Column("deadline", UtcDateTime()),
    Column("current_job", String(64)),
    Column("agent_version", String(64)),
    Column("seq", Integer(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    PrimaryKeyConstraint("tenant", "name", name="pk_registry_robots"),
    Index("ix_registry_robots_deadline", "status", "deadline"),
)


@dataclass(frozen=True, slots=True)
class RobotRecord:
    """One row of `registry_robots`."""

    tenant: str
    name: str
    type: RobotType
    host: str
    token_hash: str
    status: RobotStatus
    status_since: datetime
    heartbeat_interval_s: float
    created_at: datetime
    seq: int = 0
    groups: tuple[str, ...] = field(default_factory=tuple)
    session: str | None = None
    last_heartbeat: datetime | None = None
    deadline: datetime | None = None
    current_job: str | None = None
    agent_version: str | None = None
    created_by: str | None = None

    @property
    def seen(self) -> Seen:
        """The robot's presence, as the presence rules read it."""
        return Seen(
            status=self.status,
            session=self.session,
            last_heartbeat=self.last_heartbeat,
            interval_s=self.heartbeat_interval_s,
            current_job=self.current_job,
            grace_until=self.deadline,
        )

    def info(self) -> RobotInfo:
        """The robot as shown to people: everything but its token's hash."""
        return RobotInfo(
            name=self.name,
            tenant=self.tenant,
            type=self.type,
            host=self.host,
            groups=list(self.groups),
            status=self.status,
            status_since=self.status_since,
            last_heartbeat=self.last_heartbeat,
            heartbeat_interval_s=self.heartbeat_interval_s,
            current_job=self.current_job,
            agent_version=self.agent_version,
            created_at=self.created_at,
            created_by=self.created_by,
        )

    def presence(self) -> RobotPresence:
        """The robot as projected into the HERDER_ROBOTS bucket: Busy shows as Available there (both
        are online; whether a robot is busy is the jobs service's own knowledge)."""
        return RobotPresence(
            name=self.name,
            tenant=self.tenant,
            type=self.type,
            host=self.host,
            groups=list(self.groups),
            status=RobotStatus.AVAILABLE if self.status is RobotStatus.BUSY else self.status,
            session=self.session,
            seq=self.seq,
        )

    def principal(self) -> Principal:
        """The principal a request carrying this robot's token acts as."""
        return Principal(
            kind=PrincipalKind.ROBOT,
            name=self.name,
            tenant=self.tenant,
            role=Role.ROBOT,
            permissions=ROLE_PERMISSIONS[Role.ROBOT],
        )

    @property
    def key(self) -> str:
        """The robot's key in the HERDER_ROBOTS bucket."""
        return subjects.robot_key(self.tenant, self.name)


def _record(row: RowMapping) -> RobotRecord:
    values: dict[str, Any] = dict(row)
    values["type"] = RobotType(values["type"])
    values["status"] = RobotStatus(values["status"])
    values["groups"] = tuple(json.loads(values["groups"]))
    return RobotRecord(**values)


def _row(record: RobotRecord) -> dict[str, Any]:
    return {
        "tenant": record.tenant,
        "name": record.name,
        "type": record.type.value,
        "host": record.host,
        "groups": json.dumps(list(record.groups)),
        "token_hash": record.token_hash,
        "status": record.status.value,
        "status_since": record.status_since,
        "session": record.session,
        "last_heartbeat": record.last_heartbeat,
        "heartbeat_interval_s": record.heartbeat_interval_s,
        "deadline": record.deadline,
        "current_job": record.current_job,
        "agent_version": record.agent_version,
        "seq": record.seq,
        "created_at": record.created_at,
        "created_by": record.created_by,
    }


# Heartbeats read and write one robot's row many times a second: those statements are built once.
_KEY = (robots.c.tenant == bindparam("key_tenant"), robots.c.name == bindparam("key_name"))
_GET = select(robots).where(*_KEY)
_GET_LOCKED = _GET.with_for_update()
_SAVE = update(robots).where(*_KEY)


class RobotRepository:
    """Reads and writes `registry_robots` on a connection the caller holds."""

    async def insert(self, connection: AsyncConnection, record: RobotRecord) -> None:
        """Store a new robot; `Conflict` when the tenant already has one of that name."""
        try:
            await connection.execute(insert(robots).values(**_row(record)))
        except IntegrityError:
            raise Conflict(
                f"tenant {record.tenant!r} already has a robot named {record.name!r}; "
                "remove it first or choose another name"
            ) from None

    async def get(
        self, connection: AsyncConnection, tenant: str, name: str, *, lock: bool = False
    ) -> RobotRecord | None:
        """The robot of this name; `lock` holds its row until the transaction ends (PostgreSQL)."""
        query = _GET_LOCKED if lock else _GET
        row = (await connection.execute(query, {"key_tenant": tenant, "key_name": name})).mappings().first()
        return _record(row) if row else None

    async def for_tenant(self, connection: AsyncConnection, tenant: str) -> list[RobotRecord]:
        """The tenant's robots, by name."""
        query = select(robots).where(robots.c.tenant == tenant).order_by(robots.c.name)
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def all(self, connection: AsyncConnection) -> list[RobotRecord]:
        """Every robot of every tenant."""
        return [_record(row) for row in (await connection.execute(select(robots))).mappings()]

    async def overdue(self, connection: AsyncConnection, now: datetime) -> list[tuple[str, str]]:
        """(tenant, name) of online robots whose heartbeat deadline has passed."""
        query = select(robots.c.tenant, robots.c.name).where(
            robots.c.status.in_([RobotStatus.AVAILABLE.value, RobotStatus.BUSY.value]), robots.c.deadline <= now
        )
        return [(row.tenant, row.name) for row in await connection.execute(query)]

    async def next_deadline(self, connection: AsyncConnection) -> datetime | None:
        """The earliest heartbeat deadline of an online robot."""
        query = select(robots.c.deadline).where(
            robots.c.status.in_([RobotStatus.AVAILABLE.value, RobotStatus.BUSY.value])
        )
        query = query.order_by(robots.c.deadline).limit(1)
        value: datetime | None = (await connection.execute(query)).scalar()
        return value

    async def extend_deadlines(self, connection: AsyncConnection, deadlines: dict[float, datetime]) -> int:
        """Push the heartbeat deadline of every online robot heartbeating every `interval` (a key) out to
        at least its value; how many robots that moved."""
        moved = 0
        for interval_s, until in deadlines.items():
            result = await connection.execute(
                update(robots)
                .where(
                    robots.c.status.in_([RobotStatus.AVAILABLE.value, RobotStatus.BUSY.value]),
                    robots.c.heartbeat_interval_s == interval_s,
                    or_(robots.c.deadline.is_(None), robots.c.deadline < until),
                )
                .values(deadline=until)
            )
            moved += result.rowcount
        return moved

    async def online_intervals(self, connection: AsyncConnection) -> list[float]:
        """The heartbeat intervals of the online robots, once each."""
        query = select(robots.c.heartbeat_interval_s).where(
            robots.c.status.in_([RobotStatus.AVAILABLE.value, RobotStatus.BUSY.value])
        )
        return [row[0] for row in await connection.execute(query.distinct())]

    async def save(self, connection: AsyncConnection, record: RobotRecord) -> RobotRecord:
        """Write a changed robot back."""
        values = {key: value for key, value in _row(record).items() if key not in ("tenant", "name")}
        await connection.execute(_SAVE, {**values, "key_tenant": record.tenant, "key_name": record.name})
        return record

    async def delete(self, connection: AsyncConnection, tenant: str, name: str) -> None:
        """Remove a robot's row."""
        await connection.execute(delete(robots).where(robots.c.tenant == tenant, robots.c.name == name))
