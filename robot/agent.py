"""The robot agent: connects a robot to herder, heartbeats, and runs the jobs it is sent.

One agent runs one robot, one job at a time:

1. it starts a session with the registry (`robot_connect`, with the robot's own token) and learns
   its command subject, `hd.<tenant>.cmd.<host>.<robot>`;
2. it heartbeats on `hd.<tenant>.tel.<robot>.heartbeat`, and at once when a job starts or ends;
3. a `start` command fetches the package (checking its sha256), runs its entry point in a child
   process, and streams the child's output and SDK records to the job's log subject; `stop` raises
   the flag `should_stop()` reads; `kill` terminates the child's process group after a grace period;
4. when the child ends it reports the outcome to the jobs service, with the attempt number the
   start carried, until the report is taken or refused as stale.

Each run gets a channel of its own (`robot.channel`): a private socket through which the script's
SDK takes, adds and finishes queue items, sent on by the agent with the robot's identity. It closes
when the run ends, however it ends.

An attended robot is never sent jobs: a person runs a process on it by hand (`run_attended`, behind
`herder robot run NAME --run PROCESS`), with the same runner and a channel, on the person's terminal.

Every command is acknowledged; a repeated command (same job and attempt) is acknowledged again
without acting twice. Commands meant for another session of the same robot are ignored: only the
agent that connected last runs the robot's jobs.

Outages are normal. The agent's reports and log lines go through an on-disk spool (`robot.spool`),
delivered by one task in the order they were made, and exactly once (reports by attempt, log lines
by `Nats-Msg-Id`); while NATS is away the job goes on and the spool fills, and a restarted agent
delivers what its last run left there. The agent says at once that it was cut off, retries with a
jittered backoff (so that a fleet does not reconnect in lockstep), heartbeats as soon as it is back,
and asks herder whether to go on with its run (`jobs.resume`): a job herder ended meanwhile is killed
at once. It asks the same after a freeze (its clock jumped: the process was stopped or the machine
slept).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from herder.client.backoff import backoff
from herder.client.requests import Client
from herder.client.sealing import load_or_create_key, public_text
from herder.client.tasks import Supervisor
from herder.packaging.archive import MAX_UNPACKED_BYTES
from herder.protocol import codec, subjects
from herder.protocol.codec import Header
from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, Unavailable
from herder.protocol.jobs import (
    MAX_REPORT_ERROR_CHARS,
    Command,
    CommandAck,
    JobReport,
    JobResume,
    KillCommand,
    LogLevel,
    LogRecord,
    LogStream,
    Outcome,
    StartCommand,
    StopCommand,
)
from herder.protocol.messages import new_id, utcnow
from herder.protocol.packages import PackageRef, PackageResolve
from herder.protocol.queues import ExceptionKind, ItemResult, ItemResultRequest, ItemState
from herder.protocol.registry import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    Heartbeat,
    RemovedCommand,
    RobotConnect,
    RobotGoodbye,
    RobotInfo,
    RobotType,
)
from herder.protocol.secrets import RobotKeySet
from herder.protocol.version import VERSION
from herder.robot.cache import PackageCache, PackageFetchError, PackageHashMismatch, PackageTooLarge
from herder.robot.channel import DEFAULT_RIDE_OUT_S, Channel, Secrets, sweep_stale
from herder.robot.masking import Masks
from herder.robot.runner import JobProcess, LogLine, RunnerError, RunResult, RunSpec
from herder.robot.spool import Entry, Kind, Spool

DELIVERY_RETRY_S = 0.5
DELIVERY_RETRY_MAX_S = 15.0
RECONNECT_BASE_S = 0.25
RECONNECT_MAX_S = 10.0
LOG_PUBLISH_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 10.0
# How long a clean shutdown waits for the spool to empty before leaving the rest to the next start.
SHUTDOWN_DRAIN_S = 15.0
# How long after a job the robot waits for its next one before it heartbeats that it is idle.
IDLE_BEAT_DELAY_S = 0.25
# A heartbeat this many intervals late means the process was frozen (SIGSTOP, a sleeping laptop).
FROZEN_INTERVALS = 3
SPOOL_DIR = "spool"
# The robot's sealing key (X25519, private, 0600) in its work folder.
KEY_FILE = "sealing.key"
# While the secrets service is away, the key's registration is tried again up to this often.
KEY_RETRY_MAX_S = 30.0
# A key refused (another was registered before) is tried again this long after, for an operator's reset.
KEY_REFUSED_RETRY_S = 60.0
# A robot runs one job at a time, so only a few end reports can wait in its spool; the newest counts.
SPOOL_REPORTS_SCANNED = 100
# A run herder ended while the robot was away is killed at once: its outcome no longer counts.
ORPHAN_GRACE_S = 0.0
# How many ended runs an agent remembers, so that a start sent again after it ran is not run twice.
RAN_REMEMBERED = 1000
# A run by hand that its person interrupts (Ctrl-C) gets this long to end on its SIGINT, and as long
# again between the SIGTERM and the SIGKILL that follow if it does not.
ATTENDED_KILL_GRACE_S = 5.0
ATTENDED_DIR = "attended"

log = structlog.get_logger("herder.robot")


@dataclass
class JobRun:
    """The job an agent runs now."""

    command: StartCommand
    process: JobProcess | None = None
    stop_asked: bool = False
    kill_grace_s: float | None = None  # set once a hard stop is asked
    kill_sent: bool = False
    killed_because: str = ""
    # herder ended the job while the robot was away: it is killed, and its end is not reported.
    orphaned: bool = False
    orphaned_because: str = ""
    task: asyncio.Task[None] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    # The script's channel to the agent, open while the run is.
    channel: Channel | None = None

    @property
    def key(self) -> tuple[str, int]:
        """The job and attempt this run is."""
        return (self.command.job_id, self.command.attempt)


class NotAttended(Conflict):
    """Only an attended robot runs a process by hand; herder starts the jobs of unattended ones."""


class RobotAgent:
    """Runs one robot: its session, heartbeats, commands, jobs and reports.

    Give the connection's events to `connection_lost` and `connection_back`, and pace its reconnects
    with `reconnect_delay`: `ConnectionEvents` does that for a connection opened before the agent.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        robot: str,
        token: str,
        tenant: str = subjects.DEFAULT_TENANT,
        work_dir: Path,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        max_package_bytes: int = MAX_UNPACKED_BYTES,
        queue_wait_s: float = DEFAULT_RIDE_OUT_S,
    ) -> None:
        self.nc = nc
        # How long a script's queue call waits for herder to come back (see `robot.channel`).
        self.queue_wait_s = queue_wait_s
        self.robot = subjects.check_token(robot, "robot")
        self.tenant = tenant
        self.work_dir = work_dir
        self.heartbeat_interval_s = heartbeat_interval_s
        self.session = new_id()[:16]
        self.info: RobotInfo | None = None
        self.current: JobRun | None = None
        self._client = Client(nc, token=token, tenant=tenant)
        self._js = nc.jetstream()
        self._cache = PackageCache(work_dir / "packages", self._js, tenant, max_unpacked_bytes=max_package_bytes)
        self._subscription: Subscription | None = None
        # The robot's X25519 key: credentials come sealed to it (made on the first start, 0600).
        self._seal_key: X25519PrivateKey | None = None
        self._beat_now = asyncio.Event()
        self._stopped = False
        # The runs this agent has ended, newest last: a start it receives again (herder sends an
        # unacknowledged start again, and its acknowledgement may have been lost in an outage) is
        # acknowledged, not run a second time; the run's report is on its way.
        self._ran: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._connected_again = asyncio.Event()  # wakes the delivery of the spool when NATS is back
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spool: Spool | None = None
        self._supervisor = Supervisor(log=log.bind(robot=robot))
        self._cut_off_at: float | None = None
        self._log = log.bind(robot=robot, session=self.session)
        # Set when herder says the robot was removed: the agent stops, its token will not work again.
        self.removed = asyncio.Event()
        self.removed_because = ""

    @property
    def spool(self) -> Spool:
        """The agent's spool of reports and log lines (open once `start` has run)."""
        if self._spool is None:
            raise RuntimeError("the robot agent is not started yet: call start() first")
        return self._spool

    # --- lifecycle ---

    async def start(self) -> RobotInfo:
        """Open the spool, start a session with the registry, listen for commands, and start
        heartbeating and delivering."""
        await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
        swept = await asyncio.to_thread(sweep_stale)
        if swept:
            self._log.info("robot.channels_swept", count=swept, reason="left by agents that were killed")
        self._seal_key = await asyncio.to_thread(load_or_create_key, self.work_dir / KEY_FILE)
        # What a previous run of this agent could not deliver is delivered now, first.
        self._spool = await asyncio.to_thread(Spool, self.work_dir / SPOOL_DIR)
        # Runs whose end reports a previous agent left in the spool ended: a start of one is not run again.
        for entry in self._spool.pending(RAN_REMEMBERED, kind=Kind.REPORT):
            with contextlib.suppress(BadRequest):
                report = codec.load(JobReport, entry.payload)
                self._ran[(report.job_id, report.attempt)] = None
        # Listen before connecting: the moment the registry says the robot is there, a job may be sent.
        # The connect request queues behind the subscription, so the server has it before the registry hears.
        self._subscription = await self.nc.subscribe(
            subjects.command_listen(self.tenant, self.robot), cb=self._on_command
        )
        try:
            connected = await self._client.request(
                RobotConnect(
                    robot=self.robot,
                    session=self.session,
                    heartbeat_interval_s=self.heartbeat_interval_s,
                    agent_version=VERSION,
                )
            )
        except BaseException:
            await self._subscription.unsubscribe()
            self._subscription = None
            self.spool.close()
            raise
        self.info = connected.robot
        self._supervisor.watch("robot.sealing_key", self._register_key)
        self._supervisor.watch("robot.heartbeat", self._heartbeat_forever)
        self._supervisor.watch("robot.delivery", self._deliver_forever)
        self._log.info(
            "robot.connected",
            host=connected.robot.host,
            type=connected.robot.type.value,
            commands=connected.command_subject,
            heartbeat_s=self.heartbeat_interval_s,
        )
        return connected.robot

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Shut down cleanly: take no more commands, hard-stop a running job and report it, deliver what
        the spool holds (what cannot be delivered now waits there for the next start), say goodbye."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None
        run = self.current
        if run is not None:
            self._log.warning("robot.stopping_job", job_id=run.command.job_id)
            self._kill(run, min(grace_s, run.command.kill_grace_s), because="the robot agent shut down")
            if run.task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(run.task), grace_s + SHUTDOWN_DRAIN_S)
            if run.channel is not None:
                await run.channel.close()  # the run outlived its grace: its script asks nothing more of herder
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=SHUTDOWN_DRAIN_S)
        drained = await self._drained(SHUTDOWN_DRAIN_S) if self._spool is not None else True
        await self._supervisor.stop()
        if self._spool is not None:
            if not drained:
                stats = self._spool.stats()
                self._log.warning("robot.spool_kept", disk_bytes=stats.disk_bytes, reason="herder is unreachable")
            await asyncio.to_thread(self._spool.close)
        # Goodbye only once everything was delivered: otherwise the next start delivers it, and herder
        # keeps counting the robot as cut off rather than gone. A removed robot's token opens nothing.
        if drained and not self.removed.is_set():
            with contextlib.suppress(HerderError):
                await self._client.request(RobotGoodbye(session=self.session), timeout=2.0)
        self._stopped = True
        self._log.info("robot.disconnected")

    async def _drained(self, timeout_s: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.spool.empty:
            if asyncio.get_running_loop().time() >= deadline or not self.nc.is_connected:
                return False
            await asyncio.sleep(0.02)
        return True

    # --- the connection ---

    async def connection_lost(self) -> None:
        """NATS is gone: say so once; the job goes on, and what it reports waits in the spool."""
        # Closing the connection is no outage, nor is the closing of an agent that never started.
        if self._cut_off_at is None and not self._stopped and self.info is not None:
            self._cut_off_at = time.monotonic()
            job = self.current.command.job_id if self.current else None
            self._log.warning("robot.cut_off", job_id=job, reason="the connection to NATS is lost; retrying")

    def reconnect_delay(self, attempt: int) -> float:
        """The pause before the `attempt`-th try in a row to get NATS back (with jitter), said in the log."""
        pause = backoff(attempt, base_s=RECONNECT_BASE_S, max_s=RECONNECT_MAX_S)
        self._log.info("robot.reconnecting", attempt=attempt, retry_in_s=round(pause, 2))
        return pause

    async def connection_back(self) -> None:
        """NATS is back: heartbeat at once, deliver what waited, and ask whether to go on with the run."""
        away = time.monotonic() - self._cut_off_at if self._cut_off_at is not None else 0.0
        self._cut_off_at = None
        self._log.info("robot.reconnected", away_s=round(away, 1))
        self._beat_now.set()
        self._connected_again.set()
        self._spawn(self._resume("the connection to NATS was back"))

    async def _resume(self, why: str) -> None:
        """Tell herder what this robot runs (if anything) after being away; kill a run it ended meanwhile."""
        run = self.current
        # A run that ended while herder was away still counts as this robot's until its report is in:
        # said to run nothing, herder would run that job again elsewhere before the report arrives.
        ran = (run.command.job_id, run.command.attempt) if run else await asyncio.to_thread(self._spooled_end)
        request = JobResume(session=self.session, job_id=ran[0] if ran else None, attempt=ran[1] if ran else None)
        try:
            answer = await self._client.request(request)
        except HerderError as exc:
            self._log.warning("robot.resume_unanswered", error=exc.message)
            return
        if run is None or answer.keep_running or self.current is not run:
            return
        self._orphan(run, answer.reason, why=why)

    def _spooled_end(self) -> tuple[str, int] | None:
        """The job and attempt of the newest end report still waiting in the spool, if any."""
        reports = self.spool.pending(SPOOL_REPORTS_SCANNED, kind=Kind.REPORT)
        if not reports:
            return None
        report = codec.load(JobReport, reports[-1].payload)
        return report.job_id, report.attempt

    def _orphan(self, run: JobRun, reason: str, *, why: str) -> None:
        """Kill a run herder ended without this robot; it is not reported (its outcome no longer counts)."""
        run.orphaned = True
        run.orphaned_because = reason
        self._log.warning("robot.orphan_killed", job_id=run.command.job_id, why=why, reason=reason)
        self._kill(run, ORPHAN_GRACE_S, because="herder had ended the job")

    # --- heartbeats ---

    async def _register_key(self) -> None:
        """Register the robot's sealing key with the secrets service, until it is registered: herder
        may be starting, or run no secrets service yet. A key refused (the robot registered another
        before) is logged, and tried again now and then, once an operator has reset it."""
        assert self._seal_key is not None
        request = RobotKeySet(public_key=public_text(self._seal_key.public_key()))
        attempt = 0
        while True:
            try:
                await self._client.request(request)
                self._log.info("robot.sealing_key_registered")
                return
            except Forbidden as exc:
                self._log.error("robot.sealing_key_refused", reason=exc.message)
                await asyncio.sleep(KEY_REFUSED_RETRY_S)
            except HerderError as exc:
                attempt += 1
                if attempt == 1:
                    self._log.info("robot.sealing_key_waiting", reason=exc.message)
                await asyncio.sleep(backoff(attempt, base_s=0.5, max_s=KEY_RETRY_MAX_S))

    async def _heartbeat_forever(self) -> None:
        subject = subjects.heartbeat(self.tenant, self.robot)
        last = time.monotonic()
        while True:
            beat = Heartbeat(
                session=self.session,
                interval_s=self.heartbeat_interval_s,
                current_job=self.current.command.job_id if self.current else None,
                sent_at=utcnow(),
            )
            if self.nc.is_connected:
                try:
                    await self.nc.publish(subject, codec.dump(beat))
                except Exception as exc:  # the connection just went: heartbeats resume when it is back
                    self._log.warning("robot.heartbeat_failed", error=repr(exc))
            self._beat_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.heartbeat_interval_s)
            now = time.monotonic()
            if now - last > FROZEN_INTERVALS * self.heartbeat_interval_s and self.nc.is_connected:
                # The clock jumped: this process was frozen. herder may have given up on its job.
                self._log.warning("robot.was_frozen", for_s=round(now - last, 1))
                self._spawn(self._resume("the robot agent was frozen"))
            last = now

    async def _beat_if_still_idle(self) -> None:
        """Tell the registry the robot is idle, unless its next job comes first (a robot working through
        a queue goes from one job to the next without being Available in between)."""
        await asyncio.sleep(IDLE_BEAT_DELAY_S)
        if self.current is None:
            self._beat_now.set()

    # --- commands ---

    async def _on_command(self, msg: Msg) -> None:
        try:
            command = codec.load(Command, msg.data, codec.content_type_of(msg.headers)).command
        except BadRequest as exc:
            data, headers = codec.error_reply(exc, codec.content_type_of(msg.headers), None)
            await self._respond(msg, data, headers)
            return
        if isinstance(command, RemovedCommand):
            self._removed(command)
            await self._respond(msg, b"", None)
            return
        if command.session != self.session:
            return  # for another agent of this robot (this one was replaced, or is the replacement)
        if isinstance(command, StartCommand):
            ack = self._start(command)
        elif isinstance(command, StopCommand):
            ack = self._stop(command)
        else:
            ack = self._kill_command(command)
        await self._respond(msg, codec.dump(ack), None)

    async def _respond(self, msg: Msg, data: bytes, headers: dict[str, str] | None) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, data, headers=headers)

    def _removed(self, command: RemovedCommand) -> None:
        by = f" by {command.removed_by}" if command.removed_by else ""
        self.removed_because = f"removed{by}"
        self._log.error("robot.removed", removed_by=command.removed_by)
        self.removed.set()

    def _ack(
        self, command: StartCommand | StopCommand | KillCommand, *, accepted: bool = True, detail: str = ""
    ) -> CommandAck:
        return CommandAck(
            job_id=command.job_id, attempt=command.attempt, session=self.session, accepted=accepted, detail=detail
        )

    def _start(self, command: StartCommand) -> CommandAck:
        if (command.job_id, command.attempt) in self._ran:
            return self._ack(command, detail="already ran; its report is on its way")
        run = self.current
        if run is not None:
            if run.key == (command.job_id, command.attempt):
                return self._ack(command, detail="already running")
            busy = self._ack(command, accepted=False, detail=f"busy with job {run.command.job_id}")
            return busy.model_copy(update={"busy_job": run.command.job_id, "busy_attempt": run.command.attempt})
        run = self.current = JobRun(command=command)
        run.task = asyncio.create_task(self._run(run), name=f"robot.job.{command.job_id[:12]}")
        self._beat_now.set()
        return self._ack(command)

    def _running(self, command: StopCommand | KillCommand) -> JobRun | None:
        run = self.current
        return run if run is not None and run.key == (command.job_id, command.attempt) else None

    def _stop(self, command: StopCommand) -> CommandAck:
        run = self._running(command)
        if run is None:
            return self._ack(command, accepted=False, detail="not running that job")
        if not run.stop_asked:
            run.stop_asked = True
            if run.process is not None:
                run.process.request_stop()
        return self._ack(command)

    def _kill_command(self, command: KillCommand) -> CommandAck:
        run = self._running(command)
        if run is None:
            return self._ack(command, accepted=False, detail="not running that job")
        if command.orphan:
            self._orphan(run, "it ended without this robot", why="herder said so")
        else:
            self._kill(run, command.grace_s, because="")
        return self._ack(command)

    def _kill(self, run: JobRun, grace_s: float, *, because: str) -> None:
        if run.kill_grace_s is not None:
            return  # already being killed
        run.kill_grace_s = grace_s
        run.killed_because = because
        self._deliver_kill(run)

    def _deliver_kill(self, run: JobRun) -> None:
        if run.process is not None and run.kill_grace_s is not None and not run.kill_sent:
            run.kill_sent = True
            self._spawn(run.process.kill(run.kill_grace_s))

    # --- running a job ---

    async def _run(self, run: JobRun) -> None:
        command = run.command
        logs = JobLog(self.spool, command.job_id, command.attempt)
        work = self.work_dir / "jobs" / f"{command.job_id}-{command.attempt}"
        try:
            result = await self._execute(run, logs, work)
        except Exception as exc:  # a bug here must still end the job, not leave it Running
            self._log.exception("robot.job_failed", job_id=command.job_id)
            result = RunResult(
                outcome=Outcome.FAULTED, exit_code=None, reason="the robot agent failed", error=repr(exc), output=None
            )
        finally:
            if run.channel is not None:
                await run.channel.close()
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
        self._ran[run.key] = None
        while len(self._ran) > RAN_REMEMBERED:
            self._ran.popitem(last=False)
        self.current = None
        self._spawn(self._beat_if_still_idle())
        if run.orphaned:
            # herder ended this job while the robot was away; it was killed here, and that is all.
            why = run.orphaned_because
            logs.agent(
                f"killed what was left of the job: herder had ended it meanwhile ({why})", level=LogLevel.WARNING
            )
            return
        logs.agent(f"ended {result.outcome.value}: {result.reason}", level=_LEVELS[result.outcome])
        self._report(_report_of(command, result))

    async def _execute(self, run: JobRun, logs: JobLog, work: Path) -> RunResult:
        command = run.command
        package = command.package
        logs.agent(f"fetching {package.process} {package.version} (sha256 {package.sha256[:12]}…)")
        folder = await self._fetch(package)
        if isinstance(folder, RunResult):
            return folder
        if run.kill_grace_s is not None or run.stop_asked:
            return RunResult(Outcome.STOPPED, None, "stopped before the script started", None, None)
        await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True, mode=0o700)
        channel = await self._open_channel(command.job_id, logs.masks)
        if isinstance(channel, RunResult):
            return channel
        run.channel = channel
        spec = RunSpec(
            job_id=command.job_id,
            attempt=command.attempt,
            entry=package.entry,
            package_dir=folder,
            work_dir=work,
            input=command.input,
            channel=channel.path,
        )
        try:
            process = run.process = await JobProcess.start(spec, logs.line)
        except RunnerError as exc:
            return _faulted(str(exc), str(exc))
        logs.agent(f"started {package.entry.describe()} (pid {process.pid})")
        if run.stop_asked:
            process.request_stop()
        self._deliver_kill(run)  # a hard stop asked while the script was starting
        if command.timeout_s is None:
            return self._explain(run, await process.wait())
        finished = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait({finished}, timeout=command.timeout_s)
        if done:
            return self._explain(run, finished.result())
        because = f"timed out after {command.timeout_s:g} s"
        logs.agent(f"{because}; hard-stopping (SIGKILL after {command.kill_grace_s:g} s)", level=LogLevel.WARNING)
        self._report(
            JobReport(
                job_id=command.job_id,
                attempt=command.attempt,
                outcome=Outcome.TERMINATING,
                reason=f"{because}; hard-stopping",
            )
        )
        self._kill(run, command.kill_grace_s, because=because)
        return self._explain(run, await finished)

    async def _fetch(self, package: PackageRef) -> Path | RunResult:
        """The package's unpacked folder, or the Faulted result of a run that cannot have it."""
        try:
            return await self._cache.fetch(package)
        except PackageHashMismatch as exc:
            return _faulted("package hash mismatch", str(exc))
        except PackageTooLarge as exc:
            return _faulted("the package is too large for this robot", str(exc))
        except PackageFetchError as exc:
            return _faulted("the package could not be fetched", str(exc))

    async def _open_channel(
        self, job_id: str, masks: Masks | None = None, *, herder_job: bool = True
    ) -> Channel | RunResult:
        """The channel of a run (of a herder job, or by hand), or the Faulted result of a run that cannot have one."""
        secrets = Secrets(self._seal_key, self.tenant) if self._seal_key is not None else None
        try:
            return await Channel.open(
                self._client,
                job_id,
                robot=self.robot,
                ride_out_s=self.queue_wait_s,
                secrets=secrets,
                masks=masks,
                herder_job=herder_job,
            )
        except OSError as exc:
            problem = f"cannot open the channel for the script's queue calls: {exc.strerror or exc}"
            return _faulted("the robot could not open the script's channel", problem)

    @staticmethod
    def _explain(run: JobRun, result: RunResult) -> RunResult:
        """A hard stop the robot made itself says why (a timeout, the agent shutting down) instead of how."""
        if run.killed_because and result.outcome is Outcome.STOPPED:
            how = result.reason.removeprefix("hard-stopped").strip(" ()")
            reason = f"hard-stopped: {run.killed_because}" + (f" ({how})" if how and how != "ended on SIGTERM" else "")
            return RunResult(result.outcome, result.exit_code, reason, result.error, result.output)
        return result

    # --- a run by hand, on an attended robot ---

    def check_attended(self) -> None:
        """`NotAttended` unless this robot is attended: herder starts the jobs of unattended ones."""
        if self.info is None:
            raise RuntimeError("the robot agent is not started yet: call start() first")
        if self.info.type is not RobotType.ATTENDED:
            raise NotAttended(
                f"robot {self.robot} is unattended: herder starts its jobs ('herder job start PROCESS --robot "
                f"{self.robot}'); only an attended robot runs a process by hand"
            )

    async def resolve(self, request: PackageResolve) -> PackageRef:
        """The package a process's version (its newest, when the request names none) is, asked of the
        packages service as this robot."""
        try:
            return await self._client.request(request)
        except Forbidden as exc:
            raise Forbidden(
                f"robot {self.robot} may not look packages up: {exc.message}; the stack must let robots "
                "call packages.resolve for 'herder robot run --run'"
            ) from None

    async def run_attended(
        self,
        package: PackageRef,
        input_: dict[str, Any],
        *,
        job_id: str,
        on_log: Callable[[LogLine], None],
        interrupt: asyncio.Event | None = None,
        grace_s: float = ATTENDED_KILL_GRACE_S,
        terminal: bool = True,
    ) -> RunResult:
        """Run `package` once, by hand, as job `job_id` (a local id: herder has no such job), with a channel
        for its queue calls, on this process's terminal (with `terminal`; else its stdout and stderr come
        as log lines too). Its log lines go to `on_log`, not to herder, and nothing is reported. Setting
        `interrupt` interrupts it (SIGINT), then hard-stops it after `grace_s`. Items the run still holds
        when it ends are failed as application exceptions, as herder does when a job ends.

        `NotAttended` for an unattended robot: herder starts its jobs.
        """
        self.check_attended()
        log = self._log.bind(job_id=job_id, process=package.process, version=package.version)
        folder = await self._fetch(package)
        if isinstance(folder, RunResult):
            return folder
        if interrupt is not None and interrupt.is_set():
            return RunResult(Outcome.STOPPED, None, "stopped before the script started", None, None)
        channel = await self._open_channel(job_id, herder_job=False)
        if isinstance(channel, RunResult):
            return channel
        work = self.work_dir / ATTENDED_DIR / job_id
        try:
            await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True, mode=0o700)
            spec = RunSpec(
                job_id=job_id,
                attempt=1,
                entry=package.entry,
                package_dir=folder,
                work_dir=work,
                input=input_,
                channel=channel.path,
                terminal=terminal,
            )
            try:
                process = await JobProcess.start(spec, on_log)
            except RunnerError as exc:
                return _faulted(str(exc), str(exc))
            log.info("robot.attended_started", pid=process.pid)
            result = await _until_interrupted(process, interrupt, grace_s)
            log.info("robot.attended_ended", outcome=result.outcome.value, reason=result.reason)
            await self._fail_held(channel, result, on_log)
            return result
        finally:
            await channel.close()
            await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)

    async def _fail_held(self, channel: Channel, result: RunResult, on_log: Callable[[LogLine], None]) -> None:
        """Fail (application) the items a run by hand still holds, as herder does those of a job that ends
        without their results: herder has no job for this run, so only the agent can tell it the run ended."""
        held = channel.holdings.held()
        if not held:
            return
        ended = result.outcome.value.capitalize()
        reason = f"the run by hand on robot {self.robot} ended {ended} without a result for the item"
        failures = await asyncio.gather(
            *(self._fail_item(item_id, lease, reason) for item_id, lease in held.items()), return_exceptions=True
        )
        failed = sum(1 for failure in failures if failure is None)
        line = f"failed {failed} of the {len(held)} items the run held without a result (application exception)"
        on_log(LogLine(time=utcnow(), stream=LogStream.AGENT, level=LogLevel.WARNING, message=line))

    async def _fail_item(self, item_id: str, lease: int, reason: str) -> None:
        result = ItemResult(
            id=item_id, lease=lease, state=ItemState.FAILED, exception=ExceptionKind.APPLICATION, reason=reason
        )
        try:
            await self._client.request(ItemResultRequest(results=[result]))
        except HerderError as exc:
            # herder takes it from the robot when the robot goes (Abandoned), or someone took it already.
            self._log.warning("robot.held_item_not_failed", item=item_id, code=exc.code.value, reason=exc.message)
            raise

    # --- delivery: reports and log lines, through the spool ---

    def _report(self, report: JobReport) -> None:
        """Queue a report: it is delivered after every log line logged before it, in order."""
        self.spool.append_report(f"{report.job_id}.{report.attempt}.{report.outcome.value}", codec.dump(report))

    async def _deliver_forever(self) -> None:
        """Deliver the spool in order, for as long as the agent runs; wait (with jitter) while herder is away."""
        failures = 0
        while True:
            await self.spool.wait()
            batch = self.spool.pending()
            delivered = await self._deliver(batch) if self.nc.is_connected else []
            if delivered:
                await asyncio.to_thread(self.spool.ack, delivered)
            if len(delivered) == len(batch):
                failures = 0
                self._note_dropped()
                continue
            failures += 1
            # The next try comes after the backoff, or at once when NATS is back.
            self._connected_again.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff(failures, base_s=DELIVERY_RETRY_S, max_s=DELIVERY_RETRY_MAX_S)):
                    await self._connected_again.wait()

    async def _deliver(self, batch: list[Entry]) -> list[Entry]:
        """The first entries of `batch` that were delivered (or refused for good), in order."""
        delivered: list[Entry] = []
        index = 0
        while index < len(batch):
            if batch[index].kind is Kind.REPORT:
                if not await self._deliver_report(batch[index]):
                    return delivered
                delivered.append(batch[index])
                index += 1
                continue
            lines = list(itertools.takewhile(lambda entry: entry.kind is Kind.LOG, batch[index:]))
            stored = await self._deliver_lines(lines)
            delivered += lines[:stored]
            if stored < len(lines):
                return delivered
            index += len(lines)
        return delivered

    async def _deliver_report(self, entry: Entry) -> bool:
        report = codec.load(JobReport, entry.payload)
        try:
            await self._client.request(report)
        except Unavailable as exc:
            self._log.info("robot.report_delayed", job_id=report.job_id, reason=exc.message)
            return False
        except Conflict as exc:
            self._log.warning("robot.report_refused", job_id=report.job_id, reason=exc.message)
        except HerderError as exc:
            self._log.error("robot.report_failed", job_id=report.job_id, code=exc.code.value, reason=exc.message)
        return True

    async def _deliver_lines(self, lines: list[Entry]) -> int:
        """Publish log lines to the log stream, pipelined; how many, from the first, were stored."""
        acks = []
        for entry in lines:
            record = codec.load(LogRecord, entry.payload)
            subject = subjects.job_log(self.tenant, self.robot, record.job_id)
            try:
                acks.append(
                    await self._js.publish_async(
                        subject, entry.payload, headers={Header.MSG_ID: entry.key}, wait_stall=LOG_PUBLISH_TIMEOUT_S
                    )
                )
            except Exception as exc:
                self._log.info("robot.log_delayed", error=repr(exc))
                break
        stored = 0
        for ack in acks:
            try:
                await asyncio.wait_for(ack, LOG_PUBLISH_TIMEOUT_S)
            except Exception as exc:
                self._log.info("robot.log_delayed", error=repr(exc))
                break
            stored += 1
        return stored

    def _note_dropped(self) -> None:
        """Once the spool is drained, say in each job's log how many of its lines the bound dropped."""
        for group, dropped in self.spool.take_dropped().items():
            job_id, _, attempt = group.partition(".")
            note = JobLog(self.spool, job_id, int(attempt) if attempt.isdigit() else 0, first_seq=0)
            note.agent(
                f"{dropped.count} log lines were dropped while herder was unreachable (the spool was full)",
                level=LogLevel.WARNING,
                key=f"{group}.dropped.{dropped.last_key}",
            )

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_LEVELS = {
    Outcome.SUCCESSFUL: LogLevel.INFO,
    Outcome.STOPPED: LogLevel.WARNING,
    Outcome.FAULTED: LogLevel.ERROR,
    Outcome.TERMINATING: LogLevel.WARNING,
}


async def _until_interrupted(process: JobProcess, interrupt: asyncio.Event | None, grace_s: float) -> RunResult:
    """How the run ends: by itself, or once `interrupt` is set, interrupted as Ctrl-C would (SIGINT: a
    script may give back what it holds) and hard-stopped if it has not ended `grace_s` later (SIGTERM,
    then SIGKILL after as long again); at once when the caller is cancelled."""
    ended = asyncio.ensure_future(process.wait())
    waiting: set[asyncio.Future[Any]] = {ended}
    interrupted = asyncio.ensure_future(interrupt.wait()) if interrupt is not None else None
    if interrupted is not None:
        waiting.add(interrupted)
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not ended.done():
            process.interrupt()
            await asyncio.wait({ended}, timeout=grace_s)
        if not ended.done():
            await process.kill(grace_s)
        return await ended
    except asyncio.CancelledError:
        await asyncio.shield(process.kill(0.0))
        raise
    finally:
        if interrupted is not None:
            interrupted.cancel()


def _faulted(reason: str, error: str) -> RunResult:
    return RunResult(outcome=Outcome.FAULTED, exit_code=None, reason=reason, error=error, output=None)


def _report_of(command: StartCommand, result: RunResult) -> JobReport:
    """The report of a run; a run whose facts cannot be reported as they are is reported Faulted, saying
    why, so that the job ends and the robot goes on."""
    try:
        return JobReport(
            job_id=command.job_id,
            attempt=command.attempt,
            outcome=result.outcome,
            reason=result.reason,
            error=result.error,
            output=result.output,
            exit_code=result.exit_code,
        )
    except ValidationError as exc:
        problem = codec.invalid("the run's report", exc).message
        return JobReport(
            job_id=command.job_id,
            attempt=command.attempt,
            outcome=Outcome.FAULTED,
            reason="the run could not be reported as it ended",
            error=problem[:MAX_REPORT_ERROR_CHARS],
            exit_code=result.exit_code,
        )


class JobLog:
    """One job's log lines, appended to the agent's spool in order (the agent delivers them to
    `hd.<tenant>.tel.<robot>.log.<job>`, each under `Nats-Msg-Id` `<job>.<attempt>.<seq>`)."""

    def __init__(self, spool: Spool, job_id: str, attempt: int, *, first_seq: int = 1) -> None:
        self._spool = spool
        self._job_id = job_id
        self._attempt = attempt
        self._seq = first_seq - 1
        # The passwords the run's channel handed to the script: masked in every line from then on.
        self.masks = Masks()

    def line(self, line: LogLine) -> None:
        """Keep a line the runner read from the script."""
        self._put(line.stream, line.level, line.message, line.fields, line.time)

    def agent(self, message: str, level: LogLevel = LogLevel.INFO, *, key: str | None = None) -> None:
        """Keep a line of the agent's own about the job."""
        self._put(LogStream.AGENT, level, message, {}, datetime.now(UTC), key=key)

    def _put(
        self,
        stream: LogStream,
        level: LogLevel,
        message: str,
        fields: dict[str, Any],
        time: datetime,
        *,
        key: str | None = None,
    ) -> None:
        self._seq += 1
        if self.masks:
            message, fields = self.masks.text(message), self.masks.value(fields)
        record = LogRecord(
            job_id=self._job_id,
            attempt=self._attempt,
            seq=self._seq,
            time=time,
            stream=stream,
            level=level,
            message=message,
            fields=fields,
        )
        try:
            payload = codec.dump(record)
        except (TypeError, ValueError, OverflowError) as exc:
            # A field msgpack cannot carry (an integer past 64 bits): the line is kept, its fields not.
            payload = codec.dump(record.model_copy(update={"fields": {"dropped_fields": repr(exc)[:200]}}))
        self._spool.append_log(key or f"{self._job_id}.{self._attempt}.{self._seq}", payload)


class ConnectionEvents:
    """The connection's callbacks for an agent made once the connection is open: `options()` go to
    `client.connection.connect`, and they reach the agent from `attach` on (a connection lost before
    there is an agent is nothing to tell; its reconnects are paced alike)."""

    def __init__(self) -> None:
        self._agent: RobotAgent | None = None

    def attach(self, agent: RobotAgent) -> None:
        self._agent = agent

    def options(self) -> dict[str, Any]:
        return {"on_disconnected": self._lost, "on_reconnected": self._back, "reconnect_delay": self._pace}

    async def _lost(self) -> None:
        if self._agent is not None:
            await self._agent.connection_lost()

    async def _back(self) -> None:
        if self._agent is not None:
            await self._agent.connection_back()

    def _pace(self, attempt: int) -> float:
        if self._agent is not None:
            return self._agent.reconnect_delay(attempt)
        return backoff(attempt, base_s=RECONNECT_BASE_S, max_s=RECONNECT_MAX_S)
