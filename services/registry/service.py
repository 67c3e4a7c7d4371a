"""The registry service: registers robots, issues their tokens, and derives their presence from heartbeats.

The database is the system of record. Two projections follow it: each robot's token goes to the
HERDER_TOKENS bucket (as auth does for API tokens), and each robot's identity and status to the
HERDER_ROBOTS bucket, which the jobs service mirrors to decide where jobs can run. Heartbeats
arrive on `hd.<tenant>.tel.<robot>.heartbeat` (queue group `registry`, so replicas share them); a
sweep marks robots Unresponsive when their heartbeats stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from herder.protocol import codec, subjects
from herder.protocol.auth import Permission, PrincipalKind
from herder.protocol.errors import Conflict, Forbidden, HerderError, NotFound
from herder.protocol.jobs import Command
from herder.protocol.messages import Event, Model, utcnow
from herder.protocol.registry import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    Heartbeat,
    RemovedCommand,
    RobotAdd,
    RobotAdded,
    RobotAddedEvent,
    RobotConnect,
    RobotConnected,
    RobotGoodbye,
    RobotInfo,
    RobotList,
    RobotListRequest,
    RobotPresence,
    RobotRemove,
    RobotRemoved,
    RobotRemovedEvent,
    RobotShow,
    RobotStatus,
    RobotStatusChangedEvent,
)
from herder.services.common import database
from herder.services.common.bus import ensure_bucket
from herder.services.common.events import Transaction
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.common.tokens import new_secret, token_hash
from herder.services.registry import presence
from herder.services.registry.repository import RobotRecord, RobotRepository

# A change to a robot's row, made inside a transaction that holds the row.
_Apply = Callable[[Transaction, RobotRecord], RobotRecord]

# The sweep wakes at the next heartbeat deadline, and at least this often to see new robots.
SWEEP_MAX_S = 0.25
RECONCILE_INTERVAL_S = 60.0
# How long a removed robot's agent has to acknowledge that it was told.
REMOVAL_NOTICE_TIMEOUT_S = 1.0


class RegistryService(Service):
    """Robots, the hosts they run on, and their presence."""

    name = "registry"

    async def setup(self) -> None:
        self.repo = RobotRepository()
        self.robots_kv: KeyValue = await ensure_bucket(self.runtime.js, subjects.ROBOTS_BUCKET, self.runtime.jetstream)
        self.tokens_kv: KeyValue = self.runtime.tokens.bucket
        await self.reconcile()
        self._heartbeats: Subscription = await self.runtime.nc.subscribe(
            subjects.heartbeat_listen(), queue=self.name, cb=self._on_heartbeat
        )
        # Heartbeats sent while no registry listened prove nothing: every online robot gets a full grace.
        await self.grant_grace()
        self.runtime.on_reconnected(self.grant_grace)
        self.tasks.watch("registry.sweep", self._sweep_forever)
        self.tasks.periodic("registry.reconcile", self.reconcile, RECONCILE_INTERVAL_S)

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self._heartbeats.unsubscribe()
        await self.tasks.stop()

    # --- people and programs ---

    @endpoint(permission=Permission.ROBOTS_MANAGE, idempotent=True)
    async def robot_add(self, request: RobotAdd, ctx: RequestContext) -> RobotAdded:
        """Register a robot; its token is in this reply and nowhere else."""
        secret = new_secret()
        now = utcnow()
        record = RobotRecord(
            tenant=ctx.tenant,
            name=request.name,
            type=request.type,
            host=request.host,
            groups=tuple(sorted(set(request.groups))),
            token_hash=token_hash(secret),
            status=RobotStatus.DISCONNECTED,
            status_since=now,
            heartbeat_interval_s=DEFAULT_HEARTBEAT_INTERVAL_S,
            created_at=now,
            created_by=ctx.actor,
        )
        async with self.runtime.events.transaction() as tx:
            await ctx.claim(tx.connection, f"{record.tenant}.{record.name}")
            await self.repo.insert(tx.connection, record)
            tx.emit(
                Event.of(
                    RobotAddedEvent(robot=record.name, type=record.type, host=record.host, groups=list(record.groups)),
                    tenant=ctx.tenant,
                    actor=ctx.actor,
                )
            )
        try:
            await self._project_token(record)
            await self._project(record)
        except Exception:
            # The robot exists and its token is in this reply; the reconcile projects both shortly.
            ctx.log.exception("robot.projection_delayed", robot=record.name)
        ctx.log.info("robot.added", robot=record.name, type=record.type.value, host=record.host)
        return RobotAdded(robot=record.info(), token=secret)

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        """A repeated `robot_add` whose first reply was never stored: its token was shown to nobody and
        cannot be shown now (herder keeps only its hash)."""
        name = object_id.partition(".")[2]
        raise Conflict(
            f"robot {name!r} was added by an earlier attempt of this request, whose reply (with the robot's "
            f"token) was lost; remove the robot ('herder robot remove {name}') and add it again"
        )

    @endpoint(permission=Permission.ROBOTS_READ)
    async def robot_list(self, request: RobotListRequest, ctx: RequestContext) -> RobotList:
        """The tenant's robots, by name."""
        async with database.read(self.engine) as connection:
            records = await self.repo.for_tenant(connection, ctx.tenant)
        return RobotList(
            robots=[
                record.info()
                for record in records
                if (request.group is None or request.group in record.groups)
                and (request.host is None or request.host == record.host)
            ]
        )

    @endpoint(permission=Permission.ROBOTS_READ)
    async def robot_show(self, request: RobotShow, ctx: RequestContext) -> RobotInfo:
        """One robot."""
        async with database.read(self.engine) as connection:
            record = await self.repo.get(connection, ctx.tenant, request.name)
        if record is None:
            raise NotFound(f"no robot named {request.name!r}")
        return record.info()

    @endpoint(permission=Permission.ROBOTS_MANAGE)
    async def robot_remove(self, request: RobotRemove, ctx: RequestContext) -> RobotRemoved:
        """Remove a robot that runs no job; its token stops working at once."""
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.get(tx.connection, ctx.tenant, request.name, lock=True)
            if record is None:
                raise NotFound(f"no robot named {request.name!r}")
            if record.status.online and record.current_job:
                raise Conflict(
                    f"robot {record.name!r} is running job {record.current_job}; stop it "
                    f"('herder job stop {record.current_job[:12]}') and try again"
                )
            await self.repo.delete(tx.connection, ctx.tenant, request.name)
            tx.emit(
                Event.of(
                    RobotRemovedEvent(robot=record.name, type=record.type, host=record.host),
                    tenant=ctx.tenant,
                    actor=ctx.actor,
                )
            )
        # Tell a running agent first, while it is still on the bus: it stops rather than retrying a token
        # that is about to be refused. Then the token goes, and with it (the auth service sees to that)
        # the robot's connections.
        await self._tell_removed(record, ctx.actor)
        await self.tokens_kv.delete(record.token_hash)
        await self.robots_kv.delete(record.key)
        ctx.log.info("robot.removed", robot=record.name)
        return RobotRemoved(robot=record.info())

    # --- robot agents ---

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def robot_connect(self, request: RobotConnect, ctx: RequestContext) -> RobotConnected:
        """A robot agent starts a session; it takes over from any earlier session of the same robot."""
        robot = ctx.robot_name()
        if request.robot != robot:
            raise Forbidden(f"this token is robot {robot}'s, not {request.robot}'s; run each robot with its own token")
        now = utcnow()

        def connect(tx: Transaction, record: RobotRecord) -> RobotRecord:
            change = presence.on_connect(record.seen, request.session, request.current_job)
            updated = replace(
                record,
                session=request.session,
                last_heartbeat=now,
                deadline=presence.deadline(now, request.heartbeat_interval_s),
                heartbeat_interval_s=request.heartbeat_interval_s,
                current_job=request.current_job,
                agent_version=request.agent_version or None,
            )
            return updated if change is None else self._changed(tx, updated, record.status, change, now)

        record = await self._update(ctx.tenant, robot, connect)
        ctx.log.info("robot.connected", robot=robot, session=request.session, interval_s=request.heartbeat_interval_s)
        return RobotConnected(
            robot=record.info(), command_subject=subjects.command(record.tenant, record.host, record.name)
        )

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def robot_goodbye(self, request: RobotGoodbye, ctx: RequestContext) -> RobotInfo:
        """A robot agent shuts down cleanly: the robot is Disconnected."""
        robot = ctx.robot_name()
        now = utcnow()

        def goodbye(tx: Transaction, record: RobotRecord) -> RobotRecord:
            change = presence.on_goodbye(record.seen, request.session)
            if change is None:
                return record
            # The session ends with the goodbye: a heartbeat of it still on its way no longer counts.
            ended = replace(record, current_job=None, deadline=None, session=None)
            return self._changed(tx, ended, record.status, change, now)

        record = await self._update(ctx.tenant, robot, goodbye)
        ctx.log.info("robot.disconnected", robot=robot, session=request.session)
        return record.info()

    async def _on_heartbeat(self, msg: Msg) -> None:
        # The fence lets only the robot itself (and services) publish on its telemetry subjects: the
        # subject says whose heartbeat this is.
        try:
            tenant, robot, _kind = subjects.parse_telemetry(msg.subject)
            beat = codec.load(Heartbeat, msg.data, codec.content_type_of(msg.headers))
            await self.heartbeat(tenant, robot, beat)
        except HerderError as exc:
            self.log.warning("heartbeat.refused", subject=msg.subject, code=exc.code.value, reason=exc.message)
        except Exception:
            self.log.exception("heartbeat.failed", subject=msg.subject)

    async def _tell_removed(self, record: RobotRecord, actor: str | None) -> None:
        if not record.status.online:
            return
        notice = Command(command=RemovedCommand(robot=record.name, removed_by=actor))
        subject = subjects.command(record.tenant, record.host, record.name)
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.runtime.nc.request(subject, codec.dump(notice), timeout=REMOVAL_NOTICE_TIMEOUT_S)

    async def heartbeat(self, tenant: str, robot: str, beat: Heartbeat) -> None:
        """Record a heartbeat, and the status it implies."""
        now = utcnow()

        def record_beat(tx: Transaction, record: RobotRecord) -> RobotRecord:
            if not presence.accepts(record.seen, beat.session):
                return record  # a replaced agent: its heartbeats no longer count
            change = presence.on_heartbeat(record.seen, beat.session, beat.current_job)
            updated = replace(
                record,
                last_heartbeat=now,
                deadline=presence.deadline(now, beat.interval_s),
                current_job=beat.current_job,
                heartbeat_interval_s=beat.interval_s,
            )
            return updated if change is None else self._changed(tx, updated, record.status, change, now)

        with contextlib.suppress(NotFound):  # a robot removed while its agent still runs
            await self._update(tenant, robot, record_beat)

    # --- presence ---

    async def grant_grace(self) -> None:
        """Give every online robot a full grace of MISSED_HEARTBEATS intervals from now before it may
        be declared Unresponsive: what happened while this registry was away proves nothing."""
        now = utcnow()
        async with self.runtime.events.transaction() as tx:
            intervals = await self.repo.online_intervals(tx.connection)
            probe = presence.Seen(RobotStatus.AVAILABLE, None, now, 0.0, None)
            deadlines = {
                interval: until
                for interval in intervals
                if (until := presence.grace(replace(probe, interval_s=interval), now)) is not None
            }
            moved = await self.repo.extend_deadlines(tx.connection, deadlines)
        if moved:
            self.log.info("registry.grace_granted", robots=moved)

    async def sweep(self, now: datetime | None = None) -> int:
        """Mark online robots that missed their heartbeats Unresponsive; return how many."""
        now = now or utcnow()
        async with database.read(self.engine) as connection:
            overdue = await self.repo.overdue(connection, now)
        marked = 0
        for tenant, robot in overdue:

            def lose(tx: Transaction, record: RobotRecord) -> RobotRecord:
                change = presence.on_sweep(record.seen, now)
                if change is None:
                    return record  # a heartbeat came in meanwhile, or another replica got here first
                return self._changed(tx, replace(record, deadline=None), record.status, change, now)

            with contextlib.suppress(NotFound):
                after = await self._update(tenant, robot, lose)
                marked += after.status is RobotStatus.UNRESPONSIVE
        return marked

    async def _sweep_forever(self) -> None:
        away = False
        while True:
            delay = SWEEP_MAX_S
            if not self.runtime.nc.is_connected:
                # No heartbeat can arrive while NATS is away: missing ones prove nothing until it is back.
                away = True
                await asyncio.sleep(delay)
                continue
            try:
                if away:
                    await self.grant_grace()  # before anything is judged, whoever notices first
                    away = False
                async with database.read(self.engine) as connection:
                    next_deadline = await self.repo.next_deadline(connection)
                now = utcnow()
                if next_deadline is not None and next_deadline <= now:
                    await self.sweep(now)
                    continue
                if next_deadline is not None:
                    delay = min(SWEEP_MAX_S, (next_deadline - now).total_seconds())
            except Exception as exc:
                self.log.warning("registry.sweep_failed", error=repr(exc))
            await asyncio.sleep(max(delay, 0.005))

    def _changed(
        self, tx: Transaction, record: RobotRecord, previous: RobotStatus, change: presence.Change, now: datetime
    ) -> RobotRecord:
        """`record` in its new status, with the event that says so staged in `tx`."""
        if change.status is not previous:
            tx.emit(
                Event.of(
                    RobotStatusChangedEvent(
                        robot=record.name,
                        type=record.type,
                        host=record.host,
                        status=change.status,
                        previous=previous,
                        current_job=record.current_job,
                        reason=change.reason,
                    ),
                    tenant=record.tenant,
                    actor=record.name,
                )
            )
            self.log.info("robot.status_changed", robot=record.name, status=change.status.value, reason=change.reason)
        return replace(
            record, status=change.status, status_since=now if change.status is not previous else record.status_since
        )

    async def _update(self, tenant: str, robot: str, apply: _Apply) -> RobotRecord:
        """Lock a robot's row, apply a change, write it, and project the robot's presence if that changed.

        Busy and Available look alike in the projection (both are online), so a robot starting or
        ending a job costs its readers nothing; going on or offline, or a new session, moves `seq`.
        """
        async with self.runtime.events.transaction(defer=True) as tx:
            record = await self.repo.get(tx.connection, tenant, robot, lock=True)
            if record is None:
                raise NotFound(f"no robot named {robot!r}")
            updated = apply(tx, record)
            if updated == record:
                return record
            if updated.presence() != record.presence():
                updated = replace(updated, seq=record.seq + 1)
            await self.repo.save(tx.connection, updated)
        if updated.seq != record.seq:
            await self._project(updated)
        return updated

    # --- projections ---

    async def _project(self, record: RobotRecord) -> None:
        """Write a robot's presence to the bucket, then again if a newer change overtook this write."""
        await self.robots_kv.put(record.key, codec.dump(record.presence()))
        async with database.read(self.engine) as connection:
            current = await self.repo.get(connection, record.tenant, record.name)
        if current is None:
            await self.robots_kv.delete(record.key)
        elif current.seq != record.seq:
            await self.robots_kv.put(current.key, codec.dump(current.presence()))

    async def _project_token(self, record: RobotRecord) -> None:
        await self.tokens_kv.put(record.token_hash, codec.dump(record.principal()))
        async with database.read(self.engine) as connection:
            current = await self.repo.get(connection, record.tenant, record.name)
        if current is None or current.token_hash != record.token_hash:
            await self.tokens_kv.delete(record.token_hash)  # removed meanwhile

    async def reconcile(self) -> None:
        """Make both buckets hold exactly what the database says about robots."""
        async with database.read(self.engine) as connection:
            records = await self.repo.all(connection)
        tokens = {key: p for key, p in self.runtime.tokens.snapshot().items() if p.kind is PrincipalKind.ROBOT}
        live_tokens = {record.token_hash: record for record in records}
        for key, record in live_tokens.items():
            if tokens.get(key) != record.principal():
                await self._project_token(record)
        for key in tokens.keys() - live_tokens.keys():
            await self.tokens_kv.delete(key)
        projected = await self._projected()
        wanted = {record.key: record for record in records}
        for key, record in wanted.items():
            if projected.get(key) != record.presence():
                await self.robots_kv.put(key, codec.dump(record.presence()))
        for key in projected.keys() - wanted.keys():
            await self.robots_kv.delete(key)

    async def _projected(self) -> dict[str, RobotPresence | None]:
        try:
            keys = await self.robots_kv.keys()
        except nats.js.errors.NoKeysError:
            return {}
        found: dict[str, RobotPresence | None] = {}
        for key in keys:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await self.robots_kv.get(key)
                found[key] = codec.load(RobotPresence, entry.value) if entry.value else None
        return found
