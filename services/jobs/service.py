"""The jobs service: creates jobs, gives them to robots, stops them, and records how they end.

Decisions come from the pure modules (`states` for the state machine, `decisions` for what becomes
of a job when something happens to it, `allocation` for who runs what and why a job waits); this
module reads requests and rows, asks them, writes rows, sends commands and publishes events. Work
after a commit (sending the start, the next allocation) never turns a request that committed into
an error: it is logged, and the sweep finishes it.

Allocation is safe with any number of replicas: a robot takes its next job in one transaction that
checks it holds none and moves the job from Pending by a conditional update, and the schema lets a
robot hold one active job at most. Every replica mirrors the robots' presence and reacts to its
changes (a robot that connects gets work; one that is lost loses its jobs); the reactions are
conditional updates too, so whichever replica comes first does the work once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from nats.aio.msg import Msg

from herder.protocol import codec, subjects
from herder.protocol.auth import Permission, PrincipalKind
from herder.protocol.codec import Header
from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, NotFound
from herder.protocol.jobs import (
    DEFAULT_KILL_GRACE_S,
    CommandAck,
    JobCreatedEvent,
    JobInfo,
    JobKill,
    JobList,
    JobListRequest,
    JobOutcomeCorrectedEvent,
    JobReport,
    JobRequestList,
    JobRequestListRequest,
    JobResume,
    JobResumed,
    JobShow,
    JobStart,
    JobStartBatch,
    JobStartResult,
    JobStartResults,
    JobState,
    JobStateChangedEvent,
    JobStop,
    KillCommand,
    LogLevel,
    LogRecord,
    LogStream,
    RobotJob,
    RobotJobStart,
    StartCommand,
    StopCommand,
    Strategy,
)
from herder.protocol.messages import ErrorBody, Event, Model, new_id, utcnow
from herder.protocol.packages import PackageRef
from herder.protocol.registry import RobotPresence, RobotStatus, RobotType
from herder.services.common import database, idempotency
from herder.services.common.bus import ensure_bucket
from herder.services.common.events import Transaction
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.jobs import allocation, commands, decisions, states
from herder.services.jobs.allocation import Target
from herder.services.jobs.commands import CommandSender
from herder.services.jobs.directory import RobotDirectory
from herder.services.jobs.packages import PackageVersions
from herder.services.jobs.records import JobRecord, requeued, started
from herder.services.jobs.repository import JobRepository
from herder.services.jobs.requests import JobRequests

SWEEP_INTERVAL_S = 1.0
# A start the robot has not confirmed after this long is sent again.
START_RESEND_AFTER_S = 5.0
MOVE_ATTEMPTS = 3
# Start confirmations are written in batches, at most this long after they arrive.
ACK_BATCH_S = 0.25


class JobsService(Service):
    """Jobs: starting, stopping and following them on unattended robots."""

    name = "jobs"

    async def setup(self) -> None:
        self.repo = JobRepository()
        self.commands = CommandSender(self.runtime.nc)
        await self.commands.start()
        js = self.runtime.js
        robots_kv = await ensure_bucket(js, subjects.ROBOTS_BUCKET, self.runtime.jetstream)
        self.directory = RobotDirectory(robots_kv, on_change=self._robot_changed, supervisor=self.tasks)
        await self.directory.start()
        self.packages = PackageVersions(self.runtime.nc)
        await self.packages.start()
        self._last_given: dict[tuple[str, str], float] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._acks: list[tuple[str, int, datetime]] = []
        self._ack_writer: asyncio.Task[None] | None = None
        self.tasks.periodic("jobs.sweep", self.sweep, SWEEP_INTERVAL_S)
        self.requests = JobRequests(self)  # durable job requests (hd.<tenant>.req.jobs) of integrators
        await self.requests.start()

    async def teardown(self) -> None:
        await self.requests.stop()
        await self.tasks.cancel("jobs.sweep")
        await self.directory.stop()
        if self._background:
            await asyncio.wait(set(self._background), timeout=commands.ACK_TIMEOUT_S)
        for task in self._background:
            task.cancel()
        await self.commands.stop()
        await self.packages.stop()
        if self._ack_writer is not None:
            self._ack_writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_writer
        if self._acks:
            await self._write_acks(delay_s=0)

    # --- people and programs ---

    @endpoint(permission=Permission.JOBS_START, idempotent=True)
    async def start(self, request: JobStart, ctx: RequestContext) -> JobInfo:
        """Create a job and, when a robot it may run on is free, start it there at once."""
        if request.trigger is not None and (ctx.principal is None or ctx.principal.kind is not PrincipalKind.SERVICE):
            raise Forbidden("only the scheduler names the trigger of a job; leave trigger out")
        return await self.create(request, ctx, trigger=request.trigger, max_concurrent=request.max_concurrent)

    @endpoint(permission=Permission.ROBOT_AGENT, idempotent=True)
    async def robot_start(self, request: RobotJobStart, ctx: RequestContext) -> JobInfo:
        """A running script starts another job through its agent; the new job records it as its parent."""
        robot = ctx.robot_name()
        async with database.read(self.engine) as connection:
            parent = await self.repo.get(connection, ctx.tenant, request.job_id)
        if parent is None or parent.robot != robot:
            raise NotFound(f"robot {robot} has no job {request.job_id}")
        if not parent.state.active:
            raise Conflict(f"job {parent.id[:12]} is {parent.state.value}: only a running job starts others")
        return await self.create(request, ctx, parent_job=parent.id)

    async def create(
        self,
        request: JobStart | RobotJobStart,
        ctx: RequestContext,
        *,
        trigger: str | None = None,
        max_concurrent: int | None = None,
        parent_job: str | None = None,
    ) -> JobInfo:
        """Create the job `request` asks for (of a trigger, or started by another job) in one
        transaction with the caller's idempotency key, and start it at once when a robot is free.

        Refused with `conflict`, and nothing stored, when the trigger already has `max_concurrent`
        jobs open, or when the request says to skip while every robot it may run on is busy."""
        target = Target(robot=request.robot, group=request.group)
        record = await self._new_record(request, ctx, trigger=trigger, parent_job=parent_job)
        given: list[JobRecord] = []
        async with self.runtime.events.transaction(defer=True) as tx:
            await ctx.claim(tx.connection, record.id)
            open_jobs = 0
            if trigger is not None and max_concurrent is not None:
                open_jobs = await self.repo.open_of_trigger(tx.connection, ctx.tenant, trigger)
            busy = await self.repo.busy(tx.connection, ctx.tenant)
            robots = self.directory.robots(ctx.tenant)
            candidates = allocation.idle_candidates(target, robots, busy, self._given(ctx.tenant))
            refusal = decisions.refused_start(
                trigger=trigger,
                max_concurrent=max_concurrent,
                open_jobs=open_jobs,
                target=target,
                robot_free=bool(candidates),
                when_busy=request.when_busy,
            )
            if refusal is not None:
                raise refusal
            if not candidates and request.strategy is Strategy.FEWEST_PENDING:
                record = await self._to_least_waited_for(tx.connection, record, target, robots)
                target = record.target
            await self.repo.insert(tx.connection, record)
            tx.emit(_created(record, ctx, ctx.idempotency_key))
            # A free robot takes its next job in the same transaction: usually this one. One robot at
            # most: a transaction that held one robot's place while reaching for another's could
            # deadlock with one doing the same the other way round (PostgreSQL).
            if candidates:
                job = await self._take_next(tx, candidates[0])
                given += [job] if job is not None else []
        ctx.log.info("job.created", job_id=record.id, process=record.process, version=record.version)
        try:
            return await self._after_start(ctx, record, target, candidates, given, busy, robots)
        except Exception:
            # The job exists: say so. Whatever failed here, the sweep finishes (starts, allocation).
            ctx.log.exception("job.after_create_failed", job_id=record.id)
            return record.info("created; herder gives it to a robot shortly")

    async def _new_record(
        self, request: JobStart | RobotJobStart, ctx: RequestContext, *, trigger: str | None, parent_job: str | None
    ) -> JobRecord:
        """The Pending job `request` asks for, once its target and package check out."""
        return _record_of(request, ctx, await self._checked(request, ctx), trigger=trigger, parent_job=parent_job)

    async def _checked(self, request: JobStart | RobotJobStart, ctx: RequestContext) -> PackageRef:
        """The package `request` runs, once its target checks out; `not_found` or `conflict` if not."""
        await self._check_target(ctx.tenant, Target(robot=request.robot, group=request.group))
        return await self.packages.resolve(ctx.on_behalf(self.runtime.client), request.process, request.version)

    @endpoint(permission=Permission.JOBS_START)
    async def start_batch(self, request: JobStartBatch, ctx: RequestContext) -> JobStartResults:
        """Create many jobs in one transaction, each under its own idempotency key (a repeated key
        answers the job it made before); the new jobs go to free robots just after."""
        if any(start.trigger is not None for start in request.starts) and (
            ctx.principal is None or ctx.principal.kind is not PrincipalKind.SERVICE
        ):
            raise Forbidden("only the scheduler names the trigger of a job; leave trigger out")
        results: list[JobStartResult | None] = [None] * len(request.starts)
        scope = idempotency.Scope(ctx.tenant, self.name, JobStart.verb)
        prepared: list[tuple[int, JobStart, JobRecord, idempotency.Claim]] = []
        # Starts of a batch mostly share their target and process (a trigger's fires): each is checked once.
        checked: dict[tuple[str | None, str | None, str, str | None], PackageRef | HerderError] = {}
        for index, start in enumerate(request.starts):
            what = (start.robot, start.group, start.process, start.version)
            if what not in checked:
                try:
                    checked[what] = await self._checked(start, ctx)
                except HerderError as exc:
                    checked[what] = exc
            package = checked[what]
            if isinstance(package, HerderError):
                results[index] = _refused(package)
                continue
            record = _record_of(start, ctx, package, trigger=start.trigger, parent_job=None)
            assert start.request_id is not None  # the batch's validator saw to it
            digest = idempotency.request_digest(start, ctx.principal)
            prepared.append((index, start, record, idempotency.Claim(scope=scope, key=start.request_id, digest=digest)))
        made: list[tuple[int, JobRecord]] = []
        repeated: dict[int, idempotency.Claim] = {}
        async with self.runtime.events.transaction(defer=True) as tx:
            busy = await self.repo.busy(tx.connection, ctx.tenant)
            robots = self.directory.robots(ctx.tenant)
            given = self._given(ctx.tenant)
            open_jobs: dict[str, int] = {}
            accepted: list[tuple[int, JobRecord, idempotency.Claim]] = []
            for index, start, record, claim in prepared:
                target = record.target
                if start.trigger is not None and start.max_concurrent is not None and start.trigger not in open_jobs:
                    open_jobs[start.trigger] = await self.repo.open_of_trigger(tx.connection, ctx.tenant, start.trigger)
                robot_free = bool(allocation.idle_candidates(target, robots, busy, given))
                refusal = decisions.refused_start(
                    trigger=start.trigger,
                    max_concurrent=start.max_concurrent,
                    open_jobs=open_jobs.get(start.trigger or "", 0),
                    target=target,
                    robot_free=robot_free,
                    when_busy=start.when_busy,
                )
                if refusal is not None:
                    results[index] = _refused(refusal)
                    continue
                if not robot_free and start.strategy is Strategy.FEWEST_PENDING:
                    record = await self._to_least_waited_for(tx.connection, record, target, robots)
                if start.trigger is not None:
                    open_jobs[start.trigger] = open_jobs.get(start.trigger, 0) + 1
                accepted.append((index, record, claim))
            claimed = await idempotency.claim_many(
                tx.connection, [(claim, record.id) for _i, record, claim in accepted]
            )
            for index, record, claim in accepted:
                if claim.hashed_key in claimed:
                    made.append((index, record))
                else:
                    repeated[index] = claim
            await self.repo.insert_many(tx.connection, [record for _index, record in made])
            for index, record in made:
                tx.emit(_created(record, ctx, request.starts[index].request_id))
            # Read in the same transaction, which holds SQLite's one connection already: why each new
            # job waits (no query while no robot it may run on is free), and what repeated keys made.
            reasons = await self._pending_reasons(tx.connection, ctx.tenant, [record for _index, record in made], busy)
            earlier = await idempotency.lookup_many(
                tx.connection, scope, [claim.hashed_key for claim in repeated.values()]
            )
            for index, claim in repeated.items():
                results[index] = await self._repeated_start(
                    tx.connection, ctx.tenant, claim, earlier.get(claim.hashed_key)
                )
        for index, record in made:
            results[index] = JobStartResult(job=record.info(reasons.get(record.id)))
        if made:
            ctx.log.info("jobs.created", count=len(made))
            self._spawn(self._allocate_for(ctx.tenant, {record.target for _index, record in made}))
        return JobStartResults(
            results=[result or _refused(Conflict("not started; send it again")) for result in results]
        )

    async def _repeated_start(
        self, connection: Any, tenant: str, claim: idempotency.Claim, earlier: idempotency.Record | None
    ) -> JobStartResult:
        """The answer to a start of a batch whose key an earlier start claimed: the job it made."""
        if earlier is None:  # claimed and expired in between, or taken by a start still running
            return _refused(Conflict("a start with this key is under way; send it again in a moment"))
        if earlier.request_digest != claim.digest:
            return _refused(
                Conflict(
                    f"idempotency key {idempotency.shown(claim.key)!r} was used for a different request; "
                    "send a new key with a new request"
                )
            )
        record = await self.repo.get(connection, tenant, earlier.object_id)
        if record is None:
            return _refused(Conflict("a start with this key is under way; send it again in a moment"))
        return JobStartResult(job=record.info())

    async def _to_least_waited_for(
        self, connection: Any, record: JobRecord, target: Target, robots: list[RobotPresence]
    ) -> JobRecord:
        """`record` aimed at the robot of its group that has the fewest Pending jobs waiting for it by
        name (online robots first, then by name), when every robot of the group is busy."""
        members = [robot for robot in allocation.members(target, robots) if robot.type is not RobotType.ATTENDED]
        if not members:
            return record
        waiting = await self.repo.pending_by_robot(connection, record.tenant)
        chosen = min(members, key=lambda robot: (not robot.status.online, waiting.get(robot.name, 0), robot.name))
        return replace(
            record,
            target_robot=chosen.name,
            target_group=None,
            reason=f"aimed at {chosen.name}, the robot of group {target.group} with the fewest jobs waiting",
        )

    async def _after_start(
        self,
        ctx: RequestContext,
        record: JobRecord,
        target: Target,
        candidates: list[RobotPresence],
        given: list[JobRecord],
        busy: dict[str, str],
        robots: list[RobotPresence],
    ) -> JobInfo:
        """What follows a committed start: send it, try the other free robots, and say where the job is."""
        await self._dispatch(given)
        # The first free robot took an older job (or was taken meanwhile): try the others, each in a
        # transaction of its own.
        for robot in candidates[1:]:
            if any(job.id == record.id for job in given):
                break
            job = await self.allocate(ctx.tenant, robot.name)
            given += [job] if job is not None else []
        for job in given:
            if job.id == record.id:
                return job.info()
            busy[job.robot or ""] = job.id
        if not allocation.idle_candidates(target, robots, busy, {}):
            # No robot is free: why it waits follows from what this transaction read.
            return record.info((await self._pending_reasons(None, ctx.tenant, [record], busy))[record.id])
        return await self._info(record)

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        """The job a repeated start created, as it is now (its first reply was never stored)."""
        async with database.read(self.engine) as connection:
            record = await self.repo.get(connection, ctx.tenant, object_id)
        return await self._info(record) if record is not None else None

    @endpoint(permission=Permission.JOBS_READ)
    async def list_jobs(self, request: JobListRequest, ctx: RequestContext) -> JobList:
        """Jobs, newest first; a Pending job says why it waits."""
        async with database.read(self.engine) as connection:
            records = await self.repo.listing(
                connection,
                ctx.tenant,
                states=request.states,
                process=request.process,
                robot=request.robot,
                group=request.group,
                trigger=request.trigger,
                parent_job=request.parent_job,
                limit=request.limit,
            )
            reasons = await self._pending_reasons(connection, ctx.tenant, records)
        return JobList(jobs=[record.info(reasons.get(record.id)) for record in records])

    @endpoint(permission=Permission.JOBS_READ)
    async def show(self, request: JobShow, ctx: RequestContext) -> JobInfo:
        """One job; a Pending one says why it waits."""
        async with database.read(self.engine) as connection:
            record = await self._find(connection, ctx.tenant, request.id)
        return await self._info(record)

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def robot_job(self, request: RobotJob, ctx: RequestContext) -> JobInfo:
        """The calling robot's own job, or a job one of its jobs started (`sdk.start_job(wait=True)`
        follows it); another robot's, or none, is `not_found` alike."""
        robot = ctx.robot_name()
        async with database.read(self.engine) as connection:
            record = await self.repo.get(connection, ctx.tenant, request.id)
            parent = None
            if record is not None and record.robot != robot and record.parent_job is not None:
                parent = await self.repo.get(connection, ctx.tenant, record.parent_job)
        if record is None or (record.robot != robot and (parent is None or parent.robot != robot)):
            raise NotFound(f"robot {robot} has no job {request.id}")
        return record.info()

    @endpoint(permission=Permission.JOBS_STOP)
    async def stop(self, request: JobStop, ctx: RequestContext) -> JobInfo:
        """Soft stop: the script sees `should_stop()`; a Pending job is cancelled."""
        return await self._stop(ctx, request.id, hard=False)

    @endpoint(permission=Permission.JOBS_STOP)
    async def kill(self, request: JobKill, ctx: RequestContext) -> JobInfo:
        """Hard stop: terminate, then kill after the job's grace period; a Pending job is cancelled."""
        return await self._stop(ctx, request.id, hard=True)

    async def _stop(self, ctx: RequestContext, prefix: str, *, hard: bool) -> JobInfo:
        decide = states.kill if hard else states.stop
        after = await self._move(
            ctx.tenant, prefix, lambda job: _stopped_by(job, decide(job.state), ctx.actor, hard=hard), actor=ctx.actor
        )
        command: StopCommand | KillCommand | None = None
        session = after.session or ""
        if after.state is JobState.STOPPING:
            command = StopCommand(job_id=after.id, attempt=after.attempt, session=session)
        elif after.state is JobState.TERMINATING:
            command = KillCommand(job_id=after.id, attempt=after.attempt, session=session, grace_s=after.kill_grace_s)
        if command is not None:
            self._spawn(self._command(after, command))
        ctx.log.info("job.kill_asked" if hard else "job.stop_asked", job_id=after.id, state=after.state.value)
        return after.info()

    @endpoint(permission=Permission.JOBS_READ)
    async def list_requests(self, request: JobRequestListRequest, ctx: RequestContext) -> JobRequestList:
        """The verdicts on durable job requests (`hd.<tenant>.req.jobs`), newest first: accepted with
        their job, or refused with the code and reason."""
        verdicts = await self.requests.listing(
            ctx.tenant, state=request.state, request_id=request.request_id, limit=request.limit
        )
        return JobRequestList(requests=[verdict.info() for verdict in verdicts])

    # --- robots ---

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def report(self, request: JobReport, ctx: RequestContext) -> JobInfo:
        """A robot reports on the job it runs; a report of another robot's or an older attempt is refused.

        A late report of the attempt herder ended "robot lost" (the robot was cut off, not dead) is the
        job's outcome: it replaces what herder recorded, and an event says so."""
        robot = ctx.robot_name()
        now = utcnow()
        async with self.runtime.events.transaction(defer=True) as tx:
            job = await self.repo.get(tx.connection, ctx.tenant, request.job_id)
            if job is None:
                raise NotFound(f"no job {request.job_id}")
            decision = decisions.report(job, robot, request, now)
            if decision is None:
                return job.info()
            after = decision.after
            if not await self.repo.move(tx.connection, job, after):
                raise Conflict(f"job {job.id[:12]} changed while the report was read; send it again")
            if decision.corrected:
                self._emit_corrected(tx, job, after)
            elif after.state is not job.state:
                self._emit(tx, job, after, actor=robot)
            # The robot is free: it takes its next job in the same transaction.
            presence = self.directory.get(ctx.tenant, robot) if after.state.final else None
            following = await self._take_next(tx, presence) if presence is not None else None
        ctx.log.info(
            "job.corrected" if decision.corrected else "job.reported",
            job_id=job.id,
            robot=robot,
            outcome=request.outcome.value,
            state=after.state.value,
        )
        try:
            if following is not None:
                await self._dispatch([following])
            if after.state.final and not decision.corrected:
                self._spawn(self._end_log(after))
        except Exception:  # the report is recorded; the sweep sends the next start
            ctx.log.exception("job.after_report_failed", job_id=job.id)
        return after.info()

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def resume(self, request: JobResume, ctx: RequestContext) -> JobResumed:
        """A robot back from an outage (or a freeze) says what it runs: go on, or kill it (a job herder
        ended meanwhile); a job that waited for it to come back goes on, or runs again elsewhere now."""
        robot = ctx.robot_name()
        requeued_jobs: list[JobRecord] = []
        async with self.runtime.events.transaction(defer=True) as tx:
            job = await self.repo.get(tx.connection, ctx.tenant, request.job_id) if request.job_id else None
            answer = decisions.resume(job, robot, request.attempt)
            if job is not None and answer.after is not None and await self.repo.move(tx.connection, job, answer.after):
                self._emit(tx, job, answer.after, actor=robot)
            # Whatever else of this robot waited for it to come back, it does not run: it runs elsewhere now.
            for other in await self.repo.active_on(tx.connection, ctx.tenant, robot):
                if job is not None and other.id == job.id and answer.keep_running:
                    continue
                moved = decisions.not_running(other, robot)
                if moved is not None and await self.repo.move(tx.connection, other, moved):
                    self._emit(tx, other, moved, actor=None)
                    requeued_jobs.append(moved)
        ctx.log.info("robot.resumed", robot=robot, job_id=request.job_id, keep_running=answer.keep_running)
        if requeued_jobs:
            self._spawn(self._allocate_for(ctx.tenant, [moved.target for moved in requeued_jobs]))
        return JobResumed(keep_running=answer.keep_running, state=job.state if job else None, reason=answer.reason)

    # --- allocation ---

    async def allocate(self, tenant: str, robot_name: str) -> JobRecord | None:
        """Give `robot_name` its next job, if it is free and one waits for it; return the job started."""
        robot = self.directory.get(tenant, robot_name)
        if robot is None or not allocation.takes_jobs(robot) or not robot.session:
            return None
        async with self.runtime.events.transaction(defer=True) as tx:
            job = await self._take_next(tx, robot)
        if job is not None:
            await self._dispatch([job])
        return job

    async def _take_next(self, tx: Transaction, robot: RobotPresence) -> JobRecord | None:
        """Within `tx`, give `robot` its next job if it holds none; the caller sends the start once
        `tx` commits. A robot that holds a job already (given by this replica or another) keeps it,
        and the rest of `tx` stands."""
        if not allocation.takes_jobs(robot) or not robot.session:
            return None
        job = await self.repo.next_for(tx.connection, robot.tenant, robot.name, robot.groups)
        if job is None:
            return None
        after = started(job, robot=robot.name, host=robot.host, session=robot.session, at=utcnow(), reason="")
        states.check(job.state, after.state)
        if not await self.repo.take(tx.connection, job, after):
            return None  # the robot is busy, or another replica took this job a moment ago
        self._emit(tx, job, after, actor=None)
        self._last_given[(robot.tenant, robot.name)] = time.monotonic()
        return after

    async def _dispatch(self, jobs: list[JobRecord]) -> None:
        """Put the starts of jobs just given to robots on the wire (their transaction has committed),
        and follow their acknowledgements in the background."""
        for job in jobs:
            if not job.robot or not job.host:
                continue
            try:
                posted = await self.commands.post(job.tenant, job.host, job.robot, _start_command(job))
            except Exception as exc:  # the sweep sends it again
                self.log.warning("job.start_unsent", job_id=job.id, error=repr(exc))
                continue
            self._spawn(self._send_start(job, posted))

    async def _allocate_for(self, tenant: str, targets: Iterable[Target]) -> None:
        """Give every free robot that one of `targets` names its next job, each in a transaction of its own."""
        async with database.read(self.engine) as connection:
            busy = await self.repo.busy(connection, tenant)
        robots, given = self.directory.robots(tenant), self._given(tenant)
        tried: set[str] = set()
        for target in targets:
            for robot in allocation.idle_candidates(target, robots, busy, given):
                if robot.name not in tried:
                    tried.add(robot.name)
                    await self.allocate(tenant, robot.name)

    def _given(self, tenant: str) -> dict[str, float]:
        return {robot: at for (t, robot), at in self._last_given.items() if t == tenant}

    async def _send_start(self, job: JobRecord, posted: asyncio.Future[Msg] | None = None) -> None:
        """Make sure the robot got the start of `job` (`posted`: it was sent already)."""
        ack = await self._command(job, _start_command(job), posted=posted)
        if ack is None:
            return  # the robot is not listening: the sweep sends it again, or its loss ends the job
        if ack.accepted:
            self._acknowledged(job)
            return
        self.log.warning("job.start_refused", job_id=job.id, robot=job.robot, detail=ack.detail)
        await self._refused(job, ack)

    async def _refused(self, job: JobRecord, ack: CommandAck) -> None:
        """A robot refused a start: the job never ran, so it waits for a robot again. When the robot
        is busy with a job that has ended here (it was thought lost, and came back still running it),
        that job is stopped, so the robot is free for the next."""
        async with self.runtime.events.transaction(defer=True) as tx:
            current = await self.repo.get(tx.connection, job.tenant, job.id)
            if current is None or current.state is not JobState.RUNNING or current.attempt != job.attempt:
                return
            states.check(current.state, JobState.PENDING)
            after = requeued(current, reason=f"robot {job.robot} could not start it ({ack.detail})")
            if await self.repo.move(tx.connection, current, after):
                self._emit(tx, current, after, actor=None)
            orphan = await self.repo.get(tx.connection, job.tenant, ack.busy_job) if ack.busy_job else None
        if ack.busy_job is None or ack.busy_attempt is None:
            return
        if orphan is None or orphan.state.final or orphan.attempt != ack.busy_attempt or orphan.robot != job.robot:
            self.log.warning("job.orphan_stopped", job_id=ack.busy_job, robot=job.robot, attempt=ack.busy_attempt)
            grace_s = orphan.kill_grace_s if orphan is not None else DEFAULT_KILL_GRACE_S
            kill = KillCommand(
                job_id=ack.busy_job, attempt=ack.busy_attempt, session=ack.session, grace_s=grace_s, orphan=True
            )
            self._spawn(self.commands.deliver(job.tenant, job.host or "", job.robot or "", kill))

    def _acknowledged(self, job: JobRecord) -> None:
        """Note a confirmed start; confirmations are written together, a moment later, in one transaction."""
        self._acks.append((job.id, job.attempt, utcnow()))
        if self._ack_writer is None or self._ack_writer.done():
            self._ack_writer = asyncio.create_task(self._write_acks(), name="jobs.acks")

    async def _write_acks(self, delay_s: float = ACK_BATCH_S) -> None:
        await asyncio.sleep(delay_s)
        acks, self._acks = self._acks, []
        try:
            async with self.engine.begin() as connection:
                await self.repo.acknowledge_starts(connection, acks)
        except Exception as exc:  # the sweep sends unconfirmed starts again; the robot acknowledges again
            self.log.warning("jobs.acks_unsaved", count=len(acks), error=repr(exc))

    async def _command(
        self,
        job: JobRecord,
        command: StartCommand | StopCommand | KillCommand,
        *,
        posted: asyncio.Future[Msg] | None = None,
    ) -> CommandAck | None:
        if not job.robot or not job.host:
            return None
        return await self.commands.deliver(job.tenant, job.host, job.robot, command, posted=posted)

    # --- robots coming and going ---

    async def _robot_changed(
        self, tenant: str, name: str, before: RobotPresence | None, after: RobotPresence | None
    ) -> None:
        if after is None:
            await self._lose(tenant, name, "was removed", certain=True)
            await self._cancel_waiting_for(tenant, name)
            return
        if not after.status.online:
            # Missed heartbeats may be an outage, not a death; a goodbye says the agent ended its jobs.
            await self._lose(tenant, name, _gone(after), certain=after.status is RobotStatus.DISCONNECTED)
            return
        if before is not None and before.status.online and before.session == after.session:
            return  # still the same agent, still online
        if before is not None and before.session and before.session != after.session:
            # A new agent: its predecessor's job processes died with it.
            await self._lose(tenant, name, "had its agent restarted", certain=True, keep_session=after.session)
        await self.allocate(tenant, name)

    async def _lose(
        self,
        tenant: str,
        robot: str,
        why: str,
        *,
        certain: bool,
        keep_session: str | None = None,
        only: str | None = None,
    ) -> None:
        """Decide the active jobs of a robot that is gone (all but those of `keep_session`): end them,
        hold them for the robot to come back, or re-queue them (`decisions.lose`)."""
        now = utcnow()
        ended: list[JobRecord] = []
        waiting: list[JobRecord] = []
        async with self.runtime.events.transaction(defer=True) as tx:
            for job in await self.repo.active_on(tx.connection, tenant, robot):
                if (keep_session and job.session == keep_session) or (only and job.id != only):
                    continue
                after = decisions.lose(job, why, now, certain=certain)
                if after is None or not await self.repo.move(tx.connection, job, after):
                    continue
                if after.state is not job.state:
                    self._emit(tx, job, after, actor=None)
                if after.state.final:
                    ended.append(after)
                elif after.state is JobState.PENDING:
                    waiting.append(after)
                else:
                    self.log.warning("job.held", job_id=job.id, robot=robot, reason=after.reason)
        for job in ended:
            self.log.warning("job.robot_lost", job_id=job.id, robot=robot, state=job.state.value, reason=job.reason)
            self._spawn(self._end_log(job))
        for job in waiting:
            self.log.warning("job.requeued", job_id=job.id, robot=robot, reason=job.reason)
        if waiting:
            self._spawn(self._allocate_for(tenant, [job.target for job in waiting]))

    async def _cancel_waiting_for(self, tenant: str, robot: str) -> None:
        """A removed robot's Pending jobs would wait forever: end them."""
        cancelled: list[JobRecord] = []
        async with self.runtime.events.transaction(defer=True) as tx:
            for job in await self.repo.pending_for_robot(tx.connection, tenant, robot):
                state = states.check(job.state, JobState.STOPPED)
                after = replace(job, state=state, reason=f"robot {robot} was removed", ended_at=utcnow())
                if await self.repo.move(tx.connection, job, after):
                    self._emit(tx, job, after, actor=None)
                    cancelled.append(after)
        for job in cancelled:
            self._spawn(self._end_log(job))

    async def _end_log(self, job: JobRecord) -> None:
        """Close the job's log with a last line, so that whoever follows it knows it is complete."""
        record = LogRecord(
            job_id=job.id,
            attempt=job.attempt,
            seq=0,
            time=utcnow(),
            stream=LogStream.END,
            level=LogLevel.ERROR if job.state is JobState.FAULTED else LogLevel.INFO,
            message=f"job {job.state.value}: {job.reason}" if job.reason else f"job {job.state.value}",
            fields={"state": job.state.value},
        )
        subject = subjects.job_log(job.tenant, job.robot or subjects.NO_ROBOT, job.id)
        await self.runtime.js.publish(
            subject, codec.dump(record), headers={Header.MSG_ID: f"{job.id}.{job.attempt}.end"}
        )

    # --- the sweep: what no event triggered ---

    async def sweep(self) -> None:
        """Resend unconfirmed starts, decide the jobs of robots that are gone, re-queue jobs whose robot
        did not come back in time, and start jobs that wait for a free robot. Every replica sweeps;
        the conditional updates make it harmless."""
        now = utcnow()
        async with database.read(self.engine) as connection:
            unconfirmed = await self.repo.unacknowledged(connection, now - timedelta(seconds=START_RESEND_AFTER_S))
            active = await self.repo.all_active(connection)
            waiting = await self.repo.pending_targets(connection)
            overrunning = await self.repo.overrunning(connection, now)
        for job in overrunning:
            await self._stop_overrunning(job)
        for job in unconfirmed:
            robot = self.directory.get(job.tenant, job.robot or "")
            if robot is not None and robot.status.online and robot.session == job.session:
                self._spawn(self._send_start(job))
        overdue: list[JobRecord] = []
        for job in active:
            robot = self.directory.get(job.tenant, job.robot or "")
            if robot is None:
                await self._lose(job.tenant, job.robot or "", "was removed", certain=True, only=job.id)
            elif not robot.status.online:
                certain = robot.status is RobotStatus.DISCONNECTED
                await self._lose(job.tenant, job.robot or "", _gone(robot), certain=certain, only=job.id)
            elif job.session and robot.session != job.session:
                await self._lose(job.tenant, job.robot or "", "had its agent restarted", certain=True, only=job.id)
            if decisions.overdue(job, now) is not None:
                overdue.append(job)
        for job in overdue:
            await self._requeue_overdue(job, now)
        for tenant in {tenant for tenant, _target in waiting}:
            await self._allocate_for(tenant, [target for t, target in waiting if t == tenant])

    async def _stop_overrunning(self, job: JobRecord) -> None:
        """Soft-stop a job that has run for its "stop after" duration (its "abort after", the timeout,
        hard-stops it on the robot if it does not end itself)."""
        after = replace(
            job, state=states.stop(job.state), reason=f"soft stop: it ran for its stop-after of {job.stop_after_s:g} s"
        )
        async with self.runtime.events.transaction(defer=True) as tx:
            if not await self.repo.move(tx.connection, job, after):
                return
            self._emit(tx, job, after, actor=None)
        self.log.info("job.stop_after", job_id=job.id, stop_after_s=job.stop_after_s)
        stop = StopCommand(job_id=after.id, attempt=after.attempt, session=after.session or "")
        self._spawn(self._command(after, stop))

    async def _requeue_overdue(self, job: JobRecord, now: datetime) -> None:
        """A job that waited long enough for its robot to come back runs again elsewhere."""
        async with self.runtime.events.transaction(defer=True) as tx:
            current = await self.repo.get(tx.connection, job.tenant, job.id)
            after = decisions.overdue(current, now) if current is not None else None
            if current is None or after is None or not await self.repo.move(tx.connection, current, after):
                return
            self._emit(tx, current, after, actor=None)
        self.log.warning("job.requeued", job_id=job.id, robot=job.robot, reason=after.reason)
        await self._allocate_for(job.tenant, [after.target])

    # --- helpers ---

    async def _check_target(self, tenant: str, target: Target) -> None:
        if target.robot is not None:
            robot = self.directory.get(tenant, target.robot) or await self.directory.fetch(tenant, target.robot)
            if robot is None:
                raise NotFound(f"no robot named {target.robot!r}")
            if robot.type is RobotType.ATTENDED:
                raise Conflict(
                    f"robot {target.robot} is attended: a person starts its work at the machine; "
                    "aim the job at an unattended robot or group"
                )
            return
        robots = allocation.members(target, self.directory.robots(tenant))
        if not robots:
            raise NotFound(f"no robot is in group {target.group!r}")
        if all(robot.type is RobotType.ATTENDED for robot in robots):
            raise Conflict(f"group {target.group} has only attended robots; only unattended robots take jobs")

    async def _find(self, connection: Any, tenant: str, prefix: str) -> JobRecord:
        found = await self.repo.by_prefix(connection, tenant, prefix)
        if not found:
            raise NotFound(f"no job {prefix}")
        if len(found) > 1:
            raise BadRequest(f"{prefix!r} is the start of more than one job id; give more of it")
        return found[0]

    async def _move(self, tenant: str, prefix: str, decide: Any, *, actor: str | None) -> JobRecord:
        """Apply `decide(job) -> job` to the job `prefix` names, retrying if another change got there first."""
        for _ in range(MOVE_ATTEMPTS):
            async with self.runtime.events.transaction(defer=True) as tx:
                job = await self._find(tx.connection, tenant, prefix)
                after: JobRecord = decide(job)
                if await self.repo.move(tx.connection, job, after):
                    self._emit(tx, job, after, actor=actor)
                    break
        else:
            raise Conflict(f"job {prefix} keeps changing; try again")
        if after.state.final:
            self._spawn(self._end_log(after))
        return after

    async def _info(self, record: JobRecord) -> JobInfo:
        if record.state is not JobState.PENDING:
            return record.info()
        async with database.read(self.engine) as connection:
            reasons = await self._pending_reasons(connection, record.tenant, [record])
        return record.info(reasons.get(record.id))

    async def _pending_reasons(
        self, connection: Any, tenant: str, records: list[JobRecord], busy: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Why each Pending job of `records` waits. `busy` (robot -> its job) is read unless given."""
        pending = [record for record in records if record.state is JobState.PENDING]
        if not pending:
            return {}
        robots = self.directory.robots(tenant)
        if busy is None:
            busy = await self.repo.busy(connection, tenant)
        # A job's place in the queue matters only when a robot it could run on is free.
        placed = [record for record in pending if allocation.idle_candidates(record.target, robots, busy, {})]
        places: dict[str, int] = {}
        if len(placed) == 1:  # one job: count what is before it, rather than read the whole queue
            earlier = await self.repo.earlier(connection, placed[0].queued, tenant)
            places = {placed[0].id: allocation.ahead(placed[0].target, earlier, robots)}
        elif placed:
            places = allocation.positions(await self.repo.queue(connection, tenant), robots)
        reasons = {}
        for record in pending:
            why = allocation.pending_reason(record.target, robots, busy, places.get(record.id, 0))
            # A re-queued job keeps saying why it went back to Pending.
            reasons[record.id] = f"{record.reason}; {why}" if record.reason else why
        return reasons

    def _emit_corrected(self, tx: Transaction, before: JobRecord, after: JobRecord) -> None:
        tx.emit(
            Event.of(
                JobOutcomeCorrectedEvent(
                    job_id=after.id,
                    process=after.process,
                    state=after.state,
                    previous=before.state,
                    robot=after.robot,
                    attempt=after.attempt,
                    reason=after.reason,
                ),
                tenant=after.tenant,
                actor=after.robot,
            )
        )

    def _emit(self, tx: Transaction, before: JobRecord, after: JobRecord, *, actor: str | None) -> None:
        tx.emit(
            Event.of(
                JobStateChangedEvent(
                    job_id=after.id,
                    process=after.process,
                    state=after.state,
                    previous=before.state,
                    robot=after.robot or before.robot,
                    attempt=after.attempt,
                    reason=after.reason,
                ),
                tenant=after.tenant,
                actor=actor,
            )
        )

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("jobs.background_failed", error=repr(task.exception()))


def _stopped_by(job: JobRecord, state: JobState, actor: str | None, *, hard: bool) -> JobRecord:
    who = actor or "someone"
    if state is JobState.STOPPED:  # a Pending job, cancelled
        return replace(job, state=state, reason=f"cancelled by {who} before it started", ended_at=utcnow())
    kind = "hard stop" if hard else "soft stop"
    return replace(job, state=state, reason=f"{kind} asked by {who}")


def _record_of(
    request: JobStart | RobotJobStart,
    ctx: RequestContext,
    package: PackageRef,
    *,
    trigger: str | None,
    parent_job: str | None,
) -> JobRecord:
    """The new Pending job `request` asks for, running `package`."""
    return JobRecord(
        id=new_id(),
        tenant=ctx.tenant,
        process=package.process,
        version=package.version,
        package=package,
        priority=request.priority,
        state=JobState.PENDING,
        reason="",
        attempt=0,
        input=request.input,
        created_at=utcnow(),
        target_robot=request.robot,
        target_group=request.group,
        timeout_s=request.timeout_s,
        stop_after_s=request.stop_after_s,
        kill_grace_s=request.kill_grace_s,
        on_robot_lost=request.on_robot_lost,
        lost_after_s=request.lost_after_s,
        trigger=trigger,
        parent_job=parent_job,
        created_by=ctx.actor,
    )


def _refused(error: HerderError) -> JobStartResult:
    return JobStartResult(error=ErrorBody(code=error.code.value, message=error.message, details=error.details))


def _created(record: JobRecord, ctx: RequestContext, request_id: str | None) -> Event:
    """The event of a job just made (under the caller's idempotency key `request_id`)."""
    return Event.of(
        JobCreatedEvent(
            job_id=record.id,
            process=record.process,
            version=record.version,
            priority=record.priority,
            target_robot=record.target_robot,
            target_group=record.target_group,
            trigger=record.trigger,
            parent_job=record.parent_job,
            request_id=request_id,
        ),
        tenant=ctx.tenant,
        actor=ctx.actor,
    )


def _gone(robot: RobotPresence) -> str:
    """Why an offline robot is gone, in words that follow its name."""
    if robot.status is RobotStatus.UNRESPONSIVE:
        return "is Unresponsive (it missed its heartbeats)"
    return f"is {robot.status.value}"


def _start_command(job: JobRecord) -> StartCommand:
    return StartCommand(
        job_id=job.id,
        attempt=job.attempt,
        session=job.session or "",
        package=job.package,
        input=job.input,
        timeout_s=job.timeout_s,
        kill_grace_s=job.kill_grace_s,
    )
