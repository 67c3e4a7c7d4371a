"""The scheduler service: triggers that start jobs on a schedule, when a queue fills, or by hand.

There is no leader. Every replica holds every enabled cron trigger with its next fire time and wakes
when the earliest is due; at each wake it claims the due fires in one transaction (an insert per
fire that does nothing when another replica's came first), counts their runs, and starts the jobs
of the fires it won through the jobs service, each under the fire's key (`fires.fire_key`), then
writes how each ended. A replica that dies between claiming and finishing leaves unfinished fires;
another takes them over after `TAKE_OVER_AFTER_S` and starts the same jobs under the same keys,
which the jobs service answers with the job already made, if it was. So each due fire is one job,
or one recorded skip, however many replicas run and whichever of them dies.

Queue triggers are re-evaluated on the events of their queue (items added, items ending) and of
their jobs ending, and every `QUEUE_CHECK_INTERVAL_S` besides; the jobs service's count of a
trigger's open jobs, taken in the transaction that would create one more, keeps them within
`max_jobs` whichever replica asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from herder.client.requests import Client
from herder.protocol import codec
from herder.protocol.auth import Permission
from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, NotFound
from herder.protocol.jobs import JobListRequest, JobStartBatch, JobState
from herder.protocol.messages import Event, Model, new_id, utcnow
from herder.protocol.packages import PackageResolve
from herder.protocol.queues import QueueShow
from herder.protocol.registry import RobotListRequest, RobotShow
from herder.protocol.scheduler import (
    NEXT_FIRES_SHOWN,
    SHOWN_FIRES,
    FireInfo,
    TriggerAdd,
    TriggerChangedEvent,
    TriggerDetails,
    TriggerDisable,
    TriggerEnable,
    TriggerFireNow,
    TriggerInfo,
    TriggerKind,
    TriggerList,
    TriggerListRequest,
    TriggerRemove,
    TriggerShow,
)
from herder.protocol.secrets import AssetGet, AssetType
from herder.services.common import database
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.scheduler import fires
from herder.services.scheduler.mail_wiring import MailTriggers
from herder.services.scheduler.repository import FireRow, TriggerRepository
from herder.services.scheduler.triggers import (
    MISFIRE_GRACE_S,
    Timing,
    TriggerRecord,
    exhausted,
    limit_reason,
    queue_jobs_to_start,
    timing,
)

# Every replica reads all triggers again this often, in case it missed a change event.
RELOAD_INTERVAL_S = 30.0
# A fire claimed this long ago and still unfinished is taken over by another replica.
TAKE_OVER_AFTER_S = 5.0
TAKE_OVER_INTERVAL_S = 1.0
QUEUE_CHECK_INTERVAL_S = 10.0
# Queue events are gathered this long before the triggers of their queues are evaluated.
QUEUE_SETTLE_S = 0.2
# Fires whose jobs are being started at once, one by one (by hand, taken over), per replica.
MAX_STARTING = 64
# Scheduled fires due together are started in batches of this many (`jobs.start_batch`), this many
# batches at once per replica.
START_BATCH = 100
MAX_BATCHES = 8
# Fires of one schedule are at least this far apart (cron's finest field is the second).
ONE_FIRE = timedelta(seconds=1)
# Fire results are written together, at most this long after the first of them.
FINISH_BATCH_S = 0.02
FIRE_HISTORY_DAYS = 30
PRUNE_INTERVAL_S = 3600.0
JOBS_TIMEOUT_S = 10.0
# The longest the clock sleeps, so that a lost wake-up costs at most this.
MAX_SLEEP_S = 1.0

_NEVER = datetime.min.replace(tzinfo=UTC)
_OPEN = [JobState.PENDING, JobState.RUNNING, JobState.STOPPING, JobState.TERMINATING]
# Answers of the jobs service that end a fire as skipped: asking again would get the same.
_FINAL_REFUSALS = (BadRequest, Conflict, NotFound, Forbidden)
_FINAL_CODES = frozenset({"bad_request", "conflict", "not_found", "forbidden"})


@dataclass
class _Plan:
    """A cron trigger as this replica's clock holds it."""

    record: TriggerRecord
    timing: Timing
    # Every fire up to here is decided, as far as this replica knows.
    cursor: datetime
    next_at: datetime | None
    version: int = 0


@dataclass
class _Batch:
    """Fires whose outcome is waiting to be written."""

    done: list[FireRow] = field(default_factory=list)
    # Triggers with a run to count (a job made for a fire whose run was not counted at its claim).
    counted: list[str] = field(default_factory=list)
    released: list[tuple[str, str | None]] = field(default_factory=list)


class SchedulerService(Service):
    """Triggers: cron schedules and queue triggers, with no single scheduler node."""

    name = "scheduler"

    async def setup(self) -> None:
        self.repo = TriggerRepository()
        self.jobs: Client = self.runtime.service_client(self.name, timeout=JOBS_TIMEOUT_S)
        self.mail = MailTriggers(
            self.runtime, tasks=self.tasks, repo=self.repo, instance_id=self.instance_id, log=self.log
        )
        self._plans: dict[str, _Plan] = {}
        # The `updated_at` of each enabled cron trigger as this replica last read it.
        self._loaded: dict[str, datetime | None] = {}
        self._heap: list[tuple[datetime, str, int]] = []
        self._wake = asyncio.Event()
        self._calendars: dict[tuple[str, str], frozenset[date]] = {}
        self._starting = asyncio.Semaphore(MAX_STARTING)
        self._batches = asyncio.Semaphore(MAX_BATCHES)
        self._batch = _Batch()
        self._flusher: asyncio.Task[None] | None = None
        self._dirty_queues: set[tuple[str, str]] = set()
        # (tenant, queue) of every enabled queue trigger, as last read (by `check_queues`, and on a
        # change here): the queue events worth reading. One another replica adds is seen within
        # QUEUE_CHECK_INTERVAL_S.
        self._watched_queues: set[tuple[str, str]] = set()
        self._queue_checker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Fires this replica is starting the jobs of: not for `take_over`, however long they take.
        self._in_flight: set[str] = set()
        # Triggers with limits of runs whose counted runs were given back: read again after the flush.
        self._released: set[str] = set()
        await self.reload()
        async with database.read(self.engine) as connection:
            queued = await self.repo.enabled(connection, TriggerKind.QUEUE)
        self._watched_queues = {(record.tenant, record.queue.queue) for record in queued if record.queue}
        self._subscriptions: list[Subscription] = [
            await self.runtime.nc.subscribe("hd.*.evt.scheduler.trigger_changed", cb=self._on_trigger_event),
            await self.runtime.nc.subscribe("hd.*.evt.secrets.asset_changed", cb=self._on_asset_event),
            await self.runtime.nc.subscribe("hd.*.evt.queues.item_added", cb=self._on_queue_event),
            await self.runtime.nc.subscribe("hd.*.evt.queues.item_state_changed", cb=self._on_queue_event),
            await self.runtime.nc.subscribe("hd.*.evt.jobs.job_state_changed", cb=self._on_job_event),
        ]
        self.tasks.watch("scheduler.clock", self._clock)
        self.tasks.periodic("scheduler.reload", self.reload, RELOAD_INTERVAL_S)
        self.tasks.periodic("scheduler.take_over", self.take_over, TAKE_OVER_INTERVAL_S)
        self.tasks.periodic("scheduler.queues", self.check_queues, QUEUE_CHECK_INTERVAL_S)
        self.tasks.periodic("scheduler.prune", self._prune, PRUNE_INTERVAL_S)

    async def teardown(self) -> None:
        await self.mail.stop()
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        for name in ("scheduler.clock", "scheduler.reload", "scheduler.take_over", "scheduler.queues"):
            await self.tasks.cancel(name)
        # Nothing of this instance may hold a database connection once the engine is disposed.
        if self._queue_checker is not None:
            await _cancelled(self._queue_checker)
        if self._background:
            _done, late = await asyncio.wait(set(self._background), timeout=JOBS_TIMEOUT_S)
            for task in late:
                await _cancelled(task)
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await self._flusher
        await self._flush(delay_s=0)

    # --- people and programs ---

    @endpoint(permission=Permission.TRIGGERS_MANAGE, idempotent=True)
    async def trigger_add(self, request: TriggerAdd, ctx: RequestContext) -> TriggerInfo:
        """Add a trigger, after checking that what it names exists and that its schedule fires."""
        asker = ctx.on_behalf(self.runtime.client)
        if request.schedule is not None:
            timing_ = timing(request.schedule)  # the schedule itself first: its errors are the likeliest
            if request.schedule.calendar is not None:
                off_days = await self._calendar(asker, ctx.tenant, request.schedule.calendar)
                timing_ = timing(request.schedule, off_days)
            if not fires.next_times(timing_.schedule, utcnow(), 1, rules=timing_.rules):
                raise BadRequest("schedule: it never fires from now on (its window, calendar or validity end first)")
        await self._check_names(asker, ctx.tenant, request)
        if request.mail is not None:
            await self.mail.check(asker, ctx.principal, request.mail)
        now = utcnow()
        record = TriggerRecord(
            id=new_id(),
            tenant=ctx.tenant,
            name=request.name,
            kind=_kind(request),
            enabled=request.enabled,
            job=request.job,
            schedule=request.schedule,
            queue=request.queue,
            mail=request.mail,
            considered_until=now,
            created_at=now,
            created_by=ctx.actor,
            updated_at=now,
        )
        async with self.runtime.events.transaction() as tx:
            await ctx.claim(tx.connection, record.id)
            if await self.repo.by_name(tx.connection, ctx.tenant, request.name) is not None:
                raise Conflict(f"a trigger named {request.name!r} exists; remove it first or choose another name")
            await self.repo.insert(tx.connection, record)
            tx.emit(_changed(record, "added", ctx.actor))
        ctx.log.info("trigger.added", trigger=record.name, kind=record.kind.value)
        self._install(record)
        await self.mail.install(record)
        if record.queue is not None and record.enabled:
            self._watched_queues.add((record.tenant, record.queue.queue))
            self._mark_queue(record.tenant, record.queue.queue)
        return self._info(record, None)

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        """A repeated `trigger_add` or `trigger_fire_now`, answered from what the first one made."""
        async with database.read(self.engine) as connection:
            if verb == TriggerFireNow.verb:
                fire = await self.repo.fire(connection, object_id)
                return fire.info() if fire is not None else None
            record = await self.repo.by_id(connection, object_id)
            last = await self.repo.last_of(connection, object_id) if record is not None else None
        return self._info(record, last) if record is not None else None

    @endpoint(permission=Permission.JOBS_READ)
    async def trigger_list(self, request: TriggerListRequest, ctx: RequestContext) -> TriggerList:
        """The tenant's triggers, each with its next fire and its last."""
        async with database.read(self.engine) as connection:
            found = await self.repo.listing(connection, ctx.tenant)
        return TriggerList(triggers=[self._info(record, last, count=1) for record, last in found])

    @endpoint(permission=Permission.JOBS_READ)
    async def trigger_show(self, request: TriggerShow, ctx: RequestContext) -> TriggerDetails:
        """One trigger, its next five fire times and its last fires."""
        async with database.read(self.engine) as connection:
            record = await self._find(connection, ctx.tenant, request.name)
            recent = await self.repo.recent(connection, record.id, SHOWN_FIRES)
            last = await self.repo.last_of(connection, record.id)
        return TriggerDetails(
            trigger=self._info(record, last, count=NEXT_FIRES_SHOWN), fires=[fire.info() for fire in recent]
        )

    @endpoint(permission=Permission.TRIGGERS_MANAGE)
    async def trigger_enable(self, request: TriggerEnable, ctx: RequestContext) -> TriggerInfo:
        """Let a trigger fire again, from now on."""
        return await self._set_enabled(ctx, request.name, True)

    @endpoint(permission=Permission.TRIGGERS_MANAGE)
    async def trigger_disable(self, request: TriggerDisable, ctx: RequestContext) -> TriggerInfo:
        """Stop a trigger firing; its jobs go on."""
        return await self._set_enabled(ctx, request.name, False)

    @endpoint(permission=Permission.TRIGGERS_MANAGE)
    async def trigger_remove(self, request: TriggerRemove, ctx: RequestContext) -> TriggerInfo:
        """Remove a trigger and its fire history; its jobs go on."""
        async with self.runtime.events.transaction() as tx:
            record = await self._find(tx.connection, ctx.tenant, request.name)
            last = await self.repo.last_of(tx.connection, record.id)
            await self.repo.remove(tx.connection, record.id)
            tx.emit(_changed(record, "removed", ctx.actor))
        self._uninstall(record.id)
        await self.mail.uninstall(record.id)
        ctx.log.info("trigger.removed", trigger=record.name)
        return self._info(replace(record, enabled=False), last, count=0)

    @endpoint(permission=Permission.JOBS_START, idempotent=True)
    async def trigger_fire_now(self, request: TriggerFireNow, ctx: RequestContext) -> FireInfo:
        """Fire a trigger now, whatever its schedule (its limits on open jobs still apply)."""
        now = utcnow()
        async with database.read(self.engine) as connection:
            found = await self._find(connection, ctx.tenant, request.name)
        if found.kind is TriggerKind.MAIL:
            # A mail trigger's job needs a mail: firing it by hand looks in its mailbox now.
            started = await self.mail.poll_now(found.id)
            return FireInfo(
                trigger=found.name, fired_at=utcnow(), cause="by hand", skipped=None if started else "no new mail"
            )
        async with self.runtime.events.transaction() as tx:
            record = await self._find(tx.connection, ctx.tenant, request.name)
            fire = FireRow(
                id=new_id(),
                tenant=ctx.tenant,
                trigger_id=record.id,
                trigger_name=record.name,
                scheduled_at=None,
                cause="by hand",
                claimed_by=self.instance_id,
                claimed_at=now,
            )
            await ctx.claim(tx.connection, fire.id)
            await self.repo.add_fire(tx.connection, fire)
            await self.repo.count_runs(tx.connection, [record.id])
        done = await self._start_job(record, fire, month=None)
        await self._flush(delay_s=0)
        ctx.log.info("trigger.fired_by_hand", trigger=record.name, job_id=done.job_id, skipped=done.skipped)
        return done.info()

    # --- the clock ---

    async def _clock(self) -> None:
        """Wake at the earliest due fire (or when the triggers change), and fire what is due."""
        while True:
            now = utcnow()
            due: list[_Plan] = []
            while self._heap and self._heap[0][0] <= now:
                _at, trigger_id, version = heapq.heappop(self._heap)
                plan = self._plans.get(trigger_id)
                if plan is not None and plan.version == version:
                    due.append(plan)
            if due:
                await self._fire_due(due, now)
                continue
            self._wake.clear()
            pause = MAX_SLEEP_S
            if self._heap:
                pause = min(pause, max((self._heap[0][0] - utcnow()).total_seconds(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=pause)

    async def _fire_due(self, due: list[_Plan], now: datetime) -> None:
        """Claim the fires of `due` up to `now`, and start the jobs of those this replica won."""
        claims: list[tuple[_Plan, FireRow]] = []
        grace = timedelta(seconds=MISFIRE_GRACE_S)
        on_time: list[_Plan] = []
        for plan in due:
            if plan.next_at is not None and plan.next_at > plan.cursor and now - plan.next_at < ONE_FIRE:
                # The common case: its next fire is due, on time, and alone (a schedule fires at most
                # once a second). When it fires after that is worked out once the jobs are on their way.
                claims.append((plan, _scheduled_fire(plan.record, plan.next_at, self.instance_id, now)))
                plan.cursor = max(plan.cursor, now)
                on_time.append(plan)
                continue
            moments = fires.due(
                plan.timing.schedule,
                last_considered=plan.cursor,
                now=now,
                rules=plan.timing.rules,
                misfire=plan.timing.misfire,
                grace=grace,
            )
            for moment in moments:
                claims.append((plan, _scheduled_fire(plan.record, moment, self.instance_id, now)))
            plan.cursor = max(plan.cursor, now)
            self._schedule(plan, after=now)
        # A batch of fires is claimed, and its jobs started, before the next batch is claimed: the
        # jobs service works on the first while the scheduler claims the next.
        for start in range(0, len(claims), START_BATCH):
            won = await self._claim(claims[start : start + START_BATCH], now)
            by_tenant: dict[str, list[tuple[TriggerRecord, FireRow, str | None]]] = {}
            for plan, fire, counted_in in won:
                by_tenant.setdefault(plan.record.tenant, []).append((plan.record, fire, counted_in))
            for items in by_tenant.values():
                await self._batches.acquire()
                self._spawn(self._start_claimed_batch(items))
        for plan in on_time:
            self._schedule(plan, after=now)

    async def _claim(
        self, claims: list[tuple[_Plan, FireRow]], now: datetime
    ) -> list[tuple[_Plan, FireRow, str | None]]:
        """Claim fires in one transaction; those this replica won, with the month each counted its
        run in (None: a trigger without limits of runs, whose run is counted once its job exists).
        A trigger with limits counts the run now, and a fire its limits forbid is skipped."""
        skipped: list[FireRow] = []
        won: list[tuple[_Plan, FireRow, str | None]] = []
        async with self.engine.begin() as connection:
            claimed = await self.repo.claim(connection, [fire for _plan, fire in claims])
            for plan, fire in claims:
                if fire.id not in claimed:
                    continue
                assert fire.scheduled_at is not None
                record, schedule = plan.record, plan.record.schedule
                month = fires.month_key(fire.scheduled_at, plan.timing.schedule)
                if schedule is None or (schedule.max_runs is None and schedule.max_runs_per_month is None):
                    won.append((plan, fire, None))
                    continue
                why: str | None = limit_reason(record, fire.scheduled_at, plan.timing)
                if why is None and await self.repo.reserve_run(
                    connection, record.id, month, schedule.max_runs, schedule.max_runs_per_month
                ):
                    plan.record = replace(
                        record, runs=record.runs + 1, month=month, month_runs=_month_runs(record, month)
                    )
                    won.append((plan, fire, month))
                else:
                    why = why or "the trigger has run all the runs it may"
                    skipped.append(replace(fire, skipped=why, fired_at=now))
                if exhausted(plan.record):
                    self._uninstall(record.id)  # it may never run again
            await self.repo.finish(connection, skipped)
        for fire in skipped:
            self.log.info("trigger.skipped", trigger=fire.trigger_name, reason=fire.skipped)
        return won

    async def _start_claimed(self, record: TriggerRecord, fire: FireRow, month: str | None) -> None:
        self._in_flight.add(fire.id)
        try:
            await self._start_job(record, fire, month=month)
        finally:
            self._in_flight.discard(fire.id)
            self._starting.release()

    async def _start_claimed_batch(self, items: list[tuple[TriggerRecord, FireRow, str | None]]) -> None:
        """Start the jobs of claimed fires of one tenant with one request (`jobs.start_batch`), each
        under its fire's key; what fails for a moment stays unfinished, for `take_over`."""
        fire_ids = [fire.id for _record, fire, _month in items]
        self._in_flight.update(fire_ids)
        try:
            starts = [record.job_start(request_id=_job_key(fire)) for record, fire, _month in items]
            try:
                reply = await self.jobs.request(JobStartBatch(starts=starts), tenant=items[0][0].tenant)
            except HerderError as exc:
                self.log.warning("trigger.fires_unfinished", count=len(items), error=exc.message)
                return
            for (record, fire, month), result in zip(items, reply.results, strict=True):
                if result.job is not None:
                    self._finished_fire(record, fire, month, job_id=result.job.id)
                elif result.error is not None and result.error.code in _FINAL_CODES:
                    self._finished_fire(record, fire, month, skipped=result.error.message)
                else:
                    why = result.error.message if result.error is not None else "no answer"
                    self.log.warning("trigger.fire_unfinished", trigger=record.name, fire=fire.id, error=why)
        finally:
            self._in_flight.difference_update(fire_ids)
            self._batches.release()

    def _finished_fire(
        self,
        record: TriggerRecord,
        fire: FireRow,
        month: str | None,
        *,
        job_id: str | None = None,
        skipped: str | None = None,
    ) -> FireRow:
        """Queue how a fire ended, to be written with the others (`_flush`); a skipped fire gives its
        counted run back."""
        done = replace(fire, job_id=job_id, skipped=skipped, fired_at=utcnow())
        counted = month is not None or fire.cause == "by hand"
        if job_id is not None and not counted:
            self._batch.counted.append(record.id)
        if skipped is not None and counted:
            self._batch.released.append((record.id, month))
            self.log.info("trigger.skipped", trigger=record.name, reason=skipped)
            if fire.cause == "schedule" and record.schedule is not None and record.schedule.max_runs is not None:
                # The run counted for this fire is given back: the clock must count it back too (a
                # trigger it let go as having run all its runs may run again).
                self._released.add(record.id)
        self._batch.done.append(done)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="scheduler.finish")
        return done

    async def _start_job(self, record: TriggerRecord, fire: FireRow, *, month: str | None) -> FireRow:
        """Start the job of one claimed fire under its key; queue how the fire ended, and return it.
        A failure that may pass (the jobs service unreachable) leaves the fire unfinished, for
        `take_over` to try again under the same key."""
        key = _job_key(fire)
        try:
            job = await self.jobs.request(record.job_start(), tenant=record.tenant, idempotency_key=key)
        except _FINAL_REFUSALS as exc:
            return self._finished_fire(record, fire, month, skipped=exc.message)
        except HerderError as exc:
            self.log.warning("trigger.fire_unfinished", trigger=record.name, fire=fire.id, error=exc.message)
            return fire
        return self._finished_fire(record, fire, month, job_id=job.id)

    async def _flush(self, delay_s: float = FINISH_BATCH_S) -> None:
        """Write the fires that ended since the last flush, in one transaction."""
        if delay_s:
            await asyncio.sleep(delay_s)
        batch, self._batch = self._batch, _Batch()
        if not batch.done and not batch.released:
            return
        # Every fire up to a decided scheduled one has been decided: a scheduler that starts after an
        # outage reckons missed fires from there.
        decided = [(fire.trigger_id, fire.scheduled_at) for fire in batch.done if fire.scheduled_at is not None]
        try:
            async with self.engine.begin() as connection:
                await self.repo.finish(connection, batch.done)
                await self.repo.count_runs(connection, batch.counted)
                await self.repo.release_runs(connection, batch.released)
                await self.repo.advance(connection, decided)
        except Exception as exc:  # the fires stay unfinished: `take_over` starts them again, same keys
            self.log.warning("scheduler.fires_unsaved", count=len(batch.done), error=repr(exc))
        released, self._released = self._released, set()
        for trigger_id in released:
            await self._reload_one(trigger_id)

    async def take_over(self) -> None:
        """Finish the fires a replica claimed and left: start their jobs under the same keys."""
        now = utcnow()
        async with database.read(self.engine) as connection:
            left = await self.repo.unfinished(connection, now - timedelta(seconds=TAKE_OVER_AFTER_S))
        for fire in left:
            if fire.id in self._in_flight:
                continue  # this replica is on it (the jobs service is slow to answer)
            async with self.engine.begin() as connection:
                if not await self.repo.take_over(connection, fire, self.instance_id, now):
                    continue
                record = await self.repo.by_id(connection, fire.trigger_id)
            if record is None:
                continue
            self.log.warning(
                "trigger.fire_taken_over", trigger=record.name, fire=fire.id, from_instance=fire.claimed_by
            )
            await self._starting.acquire()
            self._spawn(self._start_claimed(record, replace(fire, claimed_by=self.instance_id, claimed_at=now), None))

    # --- what the clock holds ---

    async def reload(self) -> None:
        """Catch up with changes to the enabled cron triggers that no event brought: read the ones
        added or changed since they were last read here (by their `updated_at`), let go of the ones
        gone. Reading only those keeps a reload of ten thousand triggers a matter of milliseconds."""
        async with database.read(self.engine) as connection:
            versions = await self.repo.versions(connection, TriggerKind.CRON)
            changed = [trigger_id for trigger_id, at in versions.items() if self._loaded.get(trigger_id, _NEVER) != at]
            records = await self.repo.by_ids(connection, changed)
            mail_records = await self.repo.enabled(connection, TriggerKind.MAIL)
        await self.mail.sync(mail_records)
        for record in records:
            await self._install_loaded(record)
        for trigger_id in set(self._loaded) - set(versions):
            self._uninstall(trigger_id)

    async def _install_loaded(self, record: TriggerRecord) -> None:
        if record.schedule is not None and record.schedule.calendar is not None:
            key = (record.tenant, record.schedule.calendar)
            if key not in self._calendars:
                try:
                    self._calendars[key] = await self._calendar(self.jobs, record.tenant, record.schedule.calendar)
                except HerderError as exc:
                    self.log.warning("trigger.calendar_unreadable", trigger=record.name, error=exc.message)
                    self._calendars[key] = frozenset()
        self._install(record)
        await self.mail.install(record)

    def _install(self, record: TriggerRecord) -> None:
        """Hold (or update) a cron trigger in the clock; a disabled or exhausted one is let go."""
        if record.kind is not TriggerKind.CRON or record.schedule is None or not record.enabled or exhausted(record):
            self._uninstall(record.id)
            if record.kind is TriggerKind.CRON and record.enabled:
                self._loaded[record.id] = record.updated_at  # exhausted: read again only once it changes
            return
        self._loaded[record.id] = record.updated_at
        off_days = self._calendars.get((record.tenant, record.schedule.calendar or ""), frozenset())
        held = self._plans.get(record.id)
        cursor = record.considered_until or record.created_at
        if held is not None:
            cursor = max(cursor, held.cursor)
            unchanged = held.record.schedule == record.schedule and held.timing.rules.off_days == off_days
            if unchanged and held.cursor >= cursor:
                held.record = record  # the same schedule: its place in the clock stands
                return
        try:
            timing_ = timing(record.schedule, off_days)
        except BadRequest as exc:  # a time zone this machine lacks, say: logged, and the others go on
            self.log.warning("trigger.unschedulable", trigger=record.name, error=exc.message)
            return
        now = utcnow()
        plan = _Plan(
            record=record, timing=timing_, cursor=cursor, next_at=None, version=(held.version + 1) if held else 0
        )
        self._plans[record.id] = plan
        # A fire missed since the cursor is due now (the misfire policy decides it).
        self._schedule(plan, after=min(cursor, now))

    def _schedule(self, plan: _Plan, *, after: datetime, known: list[datetime] | None = None) -> None:
        found = (
            known if known is not None else fires.next_times(plan.timing.schedule, after, 1, rules=plan.timing.rules)
        )
        plan.version += 1
        plan.next_at = found[0] if found else None
        if plan.next_at is not None:
            heapq.heappush(self._heap, (plan.next_at, plan.record.id, plan.version))
            if self._heap[0][1] == plan.record.id:
                self._wake.set()

    def _uninstall(self, trigger_id: str) -> None:
        self._plans.pop(trigger_id, None)
        self._loaded.pop(trigger_id, None)

    # --- events ---

    async def _on_trigger_event(self, msg: Msg) -> None:
        event = _event(msg)
        trigger_id = event.data.get("trigger_id") if event else None
        if not isinstance(trigger_id, str):
            return
        self._spawn(self._reload_one(trigger_id))

    async def _reload_one(self, trigger_id: str) -> None:
        async with database.read(self.engine) as connection:
            record = await self.repo.by_id(connection, trigger_id)
        if record is None:
            self._uninstall(trigger_id)
            await self.mail.uninstall(trigger_id)
        else:
            await self._install_loaded(record)

    async def _on_asset_event(self, msg: Msg) -> None:
        event = _event(msg)
        name = event.data.get("name") if event else None
        if event is None or not isinstance(name, str) or (event.tenant, name) not in self._calendars:
            return
        del self._calendars[(event.tenant, name)]
        users = [
            plan.record
            for plan in self._plans.values()
            if plan.record.schedule and plan.record.schedule.calendar == name
        ]
        for record in users:
            self._spawn(self._install_loaded(record))

    async def _on_queue_event(self, msg: Msg) -> None:
        if not self._watched_queues:
            return  # no queue trigger anywhere: a queue's events concern no one here
        event = _event(msg)
        queue = event.data.get("queue") if event else None
        if event is not None and isinstance(queue, str) and (event.tenant, queue) in self._watched_queues:
            self._mark_queue(event.tenant, queue)

    async def _on_job_event(self, msg: Msg) -> None:
        # A job that ended may leave room for a queue trigger's next job; which trigger made it the
        # event does not say, so the tenant's queue triggers are looked at (gathered, see `_mark_queue`).
        if not self._watched_queues:
            return
        event = _event(msg)
        if event is None or not any(tenant == event.tenant for tenant, _queue in self._watched_queues):
            return
        if event.data.get("state") in {"Successful", "Faulted", "Stopped"}:
            self._mark_queue(event.tenant, "")

    def _mark_queue(self, tenant: str, queue: str) -> None:
        """Have the queue triggers of `queue` (of every queue of the tenant, for "") looked at shortly."""
        self._dirty_queues.add((tenant, queue))
        if self._queue_checker is None or self._queue_checker.done():
            self._queue_checker = asyncio.create_task(self._check_dirty(), name="scheduler.queue_events")
            self._queue_checker.add_done_callback(self._finished)

    async def _check_dirty(self) -> None:
        await asyncio.sleep(QUEUE_SETTLE_S)
        dirty, self._dirty_queues = self._dirty_queues, set()
        async with database.read(self.engine) as connection:
            records: dict[str, TriggerRecord] = {}
            for tenant, queue in dirty:
                if queue:
                    found = await self.repo.of_queue(connection, tenant, queue)
                else:
                    found = [r for r in await self.repo.enabled(connection, TriggerKind.QUEUE) if r.tenant == tenant]
                records.update({record.id: record for record in found})
        await self._evaluate(records.values())

    async def check_queues(self) -> None:
        """Look at every enabled queue trigger (what no event caused: a job lost, an item postponed)."""
        async with database.read(self.engine) as connection:
            records = await self.repo.enabled(connection, TriggerKind.QUEUE)
        self._watched_queues = {(record.tenant, record.queue.queue) for record in records if record.queue}
        await self._evaluate(records)

    async def _evaluate(self, records: Iterable[TriggerRecord]) -> None:
        for record in records:
            try:
                await self._evaluate_one(record)
            except HerderError as exc:
                self.log.warning("trigger.queue_unreadable", trigger=record.name, error=exc.message)

    async def _evaluate_one(self, record: TriggerRecord) -> None:
        """Start the jobs a queue trigger wants now: one per `min_items` New items, up to `max_jobs` open."""
        rule = record.queue
        if rule is None or not record.enabled:
            return
        details = await self.jobs.request(QueueShow(name=rule.queue), tenant=record.tenant)
        new_items = details.stats.counts.get("New", 0)
        if new_items < rule.min_items:
            return
        open_jobs = await self.jobs.request(
            JobListRequest(trigger=record.name, states=_OPEN, limit=min(rule.max_jobs, 1000)), tenant=record.tenant
        )
        wanted = queue_jobs_to_start(rule, new_items, len(open_jobs.jobs))
        for _ in range(wanted):
            fire = FireRow(
                id=new_id(),
                tenant=record.tenant,
                trigger_id=record.id,
                trigger_name=record.name,
                scheduled_at=None,
                cause="queue",
                claimed_by=self.instance_id,
                claimed_at=utcnow(),
            )
            try:
                job = await self.jobs.request(record.job_start(), tenant=record.tenant, idempotency_key=_job_key(fire))
            except Conflict:
                return  # another replica started the job that fills the last place
            except _FINAL_REFUSALS as exc:
                done = replace(fire, skipped=exc.message, fired_at=utcnow())
            else:
                done = replace(fire, job_id=job.id, fired_at=utcnow())
            async with self.engine.begin() as connection:
                await self.repo.add_fire(connection, done)
                await self.repo.finish(connection, [done])
                if done.job_id is not None:
                    await self.repo.count_runs(connection, [record.id])
            self.log.info("trigger.queue_fired", trigger=record.name, job_id=done.job_id, skipped=done.skipped)
            if done.skipped:
                return

    async def _prune(self) -> None:
        async with self.engine.begin() as connection:
            await self.repo.prune(connection, utcnow() - timedelta(days=FIRE_HISTORY_DAYS))

    # --- helpers ---

    async def _set_enabled(self, ctx: RequestContext, name: str, enabled: bool) -> TriggerInfo:
        now = utcnow()
        async with self.runtime.events.transaction() as tx:
            record = await self._find(tx.connection, ctx.tenant, name)
            await self.repo.set_enabled(tx.connection, record, enabled, now)
            after = replace(
                record, enabled=enabled, updated_at=now, considered_until=now if enabled else record.considered_until
            )
            tx.emit(_changed(after, "enabled" if enabled else "disabled", ctx.actor))
            last = await self.repo.last_of(tx.connection, record.id)
        if enabled:
            held = self._plans.get(record.id)
            if held is not None:
                held.cursor = now
            await self._install_loaded(after)
            if after.queue is not None:
                self._watched_queues.add((after.tenant, after.queue.queue))
                self._mark_queue(after.tenant, after.queue.queue)
        else:
            self._uninstall(record.id)
            await self.mail.uninstall(record.id)
        ctx.log.info("trigger.enabled" if enabled else "trigger.disabled", trigger=name)
        return self._info(after, last)

    async def _find(self, connection: Any, tenant: str, name: str) -> TriggerRecord:
        record = await self.repo.by_name(connection, tenant, name)
        if record is None:
            raise NotFound(f"no trigger {name!r}; see 'herder trigger list'")
        return record

    def _info(self, record: TriggerRecord, last: FireInfo | None, *, count: int = 1) -> TriggerInfo:
        next_fires: list[datetime] = []
        held = self._plans.get(record.id)
        if count == 1 and held is not None and held.next_at is not None and held.record.schedule == record.schedule:
            # The clock knows it already (a listing of thousands of triggers computes none).
            next_fires = [held.next_at]
        elif record.enabled and record.schedule is not None and count and not exhausted(record):
            off_days = self._calendars.get((record.tenant, record.schedule.calendar or ""), frozenset())
            try:
                timing_ = timing(record.schedule, off_days)
                next_fires = fires.next_times(timing_.schedule, utcnow(), count, rules=timing_.rules)
            except BadRequest:
                next_fires = []
        return record.info(next_fires=next_fires, last_fire=last)

    async def _calendar(self, client: Client, tenant: str, name: str) -> frozenset[date]:
        """The non-working days of calendar asset `name`; `not_found` or `bad_request` if there is
        none or it is not a calendar."""
        try:
            asset = await client.request(AssetGet(name=name), tenant=tenant)
        except NotFound:
            raise NotFound(
                f"no calendar asset {name!r}; make one with 'herder asset set {name} --type calendar'"
            ) from None
        if asset.type is not AssetType.CALENDAR:
            raise BadRequest(f"schedule.calendar: asset {name!r} is a {asset.type.value}, not a calendar")
        days = frozenset(date.fromisoformat(day) for day in asset.value)
        self._calendars[(tenant, name)] = days
        return days

    async def _check_names(self, client: Client, tenant: str, request: TriggerAdd) -> None:
        """`not_found` for a process, robot, group or queue the trigger names that does not exist."""
        job = request.job
        await client.request(PackageResolve(process=job.process, version=job.version), tenant=tenant)
        if job.robot is not None:
            await client.request(RobotShow(name=job.robot), tenant=tenant)
        elif job.group is not None:
            members = await client.request(RobotListRequest(group=job.group), tenant=tenant)
            if not members.robots:
                raise NotFound(f"no robot is in group {job.group!r}")
        if request.queue is not None:
            await client.request(QueueShow(name=request.queue.queue), tenant=tenant)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("scheduler.background_failed", error=repr(task.exception()))


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _kind(request: TriggerAdd) -> TriggerKind:
    if request.schedule is not None:
        return TriggerKind.CRON
    return TriggerKind.MAIL if request.mail is not None else TriggerKind.QUEUE


def _scheduled_fire(record: TriggerRecord, moment: datetime, instance: str, now: datetime) -> FireRow:
    return FireRow(
        id=new_id(),
        tenant=record.tenant,
        trigger_id=record.id,
        trigger_name=record.name,
        scheduled_at=moment.astimezone(UTC),
        cause="schedule",
        claimed_by=instance,
        claimed_at=now,
    )


def _job_key(fire: FireRow) -> str:
    """The idempotency key of a fire's job: the trigger and scheduled time for a scheduled fire (the
    same on every replica), the fire's own id for one by hand or by a queue."""
    if fire.scheduled_at is not None:
        return fires.fire_key(fire.trigger_id, fire.scheduled_at)
    return f"fire:{hashlib.sha256(fire.id.encode()).hexdigest()[:40]}"


def _month_runs(record: TriggerRecord, month: str) -> int:
    return record.month_runs + 1 if record.month == month else 1


def _changed(record: TriggerRecord, change: str, actor: str | None) -> Event:
    return Event.of(
        TriggerChangedEvent(trigger_id=record.id, name=record.name, change=change), tenant=record.tenant, actor=actor
    )


def _event(msg: Msg) -> Event | None:
    try:
        return codec.load(Event, msg.data)
    except BadRequest:
        return None
