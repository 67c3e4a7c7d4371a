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

Every command is acknowledged; a repeated command (same job and attempt) is acknowledged again
without acting twice. Commands meant for another session of the same robot are ignored: only the
agent that connected last runs the robot's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.codec import Header
from herder.protocol.errors import BadRequest, Conflict, HerderError, Unavailable
from herder.protocol.jobs import (
    Command,
    CommandAck,
    JobReport,
    KillCommand,
    LogLevel,
    LogRecord,
    LogStream,
    Outcome,
    StartCommand,
    StopCommand,
)
from herder.protocol.messages import new_id, utcnow
from herder.protocol.registry import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    Heartbeat,
    RemovedCommand,
    RobotConnect,
    RobotGoodbye,
    RobotInfo,
)
from herder.protocol.version import VERSION
from herder.robot.cache import PackageCache, PackageFetchError, PackageHashMismatch
from herder.robot.runner import JobProcess, LogLine, RunnerError, RunResult, RunSpec

REPORT_RETRY_S = 1.0
REPORT_RETRY_MAX_S = 15.0
LOG_PUBLISH_STALL_S = 10.0
SHUTDOWN_GRACE_S = 10.0
# How long after a job the robot waits for its next one before it heartbeats that it is idle.
IDLE_BEAT_DELAY_S = 0.25

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
    task: asyncio.Task[None] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[str, int]:
        """The job and attempt this run is."""
        return (self.command.job_id, self.command.attempt)


class RobotAgent:
    """Runs one robot: its session, heartbeats, commands, jobs and reports."""

    def __init__(
        self,
        nc: NATS,
        *,
        robot: str,
        token: str,
        tenant: str = subjects.DEFAULT_TENANT,
        work_dir: Path,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.nc = nc
        self.robot = subjects.check_token(robot, "robot")
        self.tenant = tenant
        self.work_dir = work_dir
        self.heartbeat_interval_s = heartbeat_interval_s
        self.session = new_id()[:16]
        self.info: RobotInfo | None = None
        self.current: JobRun | None = None
        self._token = token
        self._client = Client(nc, token=token, tenant=tenant)
        self._cache = PackageCache(work_dir / "packages", nc.jetstream(), tenant)
        self._subscription: Subscription | None = None
        self._beat_now = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Reports go out one at a time, in order: a job's "terminating" before its end.
        self._reports: asyncio.Queue[JobReport] = asyncio.Queue()
        self._heartbeats: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._log = log.bind(robot=robot, session=self.session)
        # Set when herder says the robot was removed: the agent stops, its token will not work again.
        self.removed = asyncio.Event()
        self.removed_because = ""

    # --- lifecycle ---

    async def start(self) -> RobotInfo:
        """Start a session with the registry, listen for commands, and start heartbeating."""
        await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
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
            raise
        self.info = connected.robot
        self._heartbeats = asyncio.create_task(self._heartbeat_forever(), name="robot.heartbeat")
        self._reporter = asyncio.create_task(self._report_forever(), name="robot.reports")
        self._log.info(
            "robot.connected",
            host=connected.robot.host,
            type=connected.robot.type.value,
            commands=connected.command_subject,
            heartbeat_s=self.heartbeat_interval_s,
        )
        return connected.robot

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Shut down cleanly: take no more commands, hard-stop a running job and report it, say goodbye."""
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
                    await asyncio.wait_for(asyncio.shield(run.task), grace_s + REPORT_RETRY_MAX_S)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=REPORT_RETRY_MAX_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reports.join(), REPORT_RETRY_MAX_S)
        for task in (self._heartbeats, self._reporter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not self.removed.is_set():  # a removed robot's token no longer opens anything
            with contextlib.suppress(HerderError):
                await self._client.request(RobotGoodbye(session=self.session), timeout=2.0)
        self._log.info("robot.disconnected")

    # --- heartbeats ---

    async def _heartbeat_forever(self) -> None:
        subject = subjects.heartbeat(self.tenant, self.robot)
        while True:
            beat = Heartbeat(
                session=self.session,
                interval_s=self.heartbeat_interval_s,
                current_job=self.current.command.job_id if self.current else None,
                sent_at=utcnow(),
            )
            try:
                await self.nc.publish(subject, codec.dump(beat))
            except Exception as exc:  # a disconnected client: heartbeats resume when it reconnects
                self._log.warning("robot.heartbeat_failed", error=repr(exc))
            self._beat_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.heartbeat_interval_s)

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

    def _ack(
        self, command: StartCommand | StopCommand | KillCommand, *, accepted: bool = True, detail: str = ""
    ) -> CommandAck:
        return CommandAck(
            job_id=command.job_id, attempt=command.attempt, session=self.session, accepted=accepted, detail=detail
        )

    def _removed(self, command: RemovedCommand) -> None:
        by = f" by {command.removed_by}" if command.removed_by else ""
        self.removed_because = f"removed{by}"
        self._log.error("robot.removed", removed_by=command.removed_by)
        self.removed.set()

    def _start(self, command: StartCommand) -> CommandAck:
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
        logs = JobLog(self.nc, self.tenant, self.robot, command.job_id, command.attempt)
        work = self.work_dir / "jobs" / f"{command.job_id}-{command.attempt}"
        try:
            result = await self._execute(run, logs, work)
        except Exception as exc:  # a bug here must still end the job, not leave it Running
            self._log.exception("robot.job_failed", job_id=command.job_id)
            result = RunResult(
                outcome=Outcome.FAULTED, exit_code=None, reason="the robot agent failed", error=repr(exc), output=None
            )
        logs.agent(f"ended {result.outcome.value}: {result.reason}", level=_LEVELS[result.outcome])
        await logs.close()
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
        self.current = None
        self._spawn(self._beat_if_still_idle())
        self._reports.put_nowait(
            JobReport(
                job_id=command.job_id,
                attempt=command.attempt,
                outcome=result.outcome,
                reason=result.reason,
                error=result.error,
                output=result.output,
                exit_code=result.exit_code,
            )
        )

    async def _execute(self, run: JobRun, logs: JobLog, work: Path) -> RunResult:
        command = run.command
        package = command.package
        logs.agent(f"fetching {package.process} {package.version} (sha256 {package.sha256[:12]}…)")
        try:
            folder = await self._cache.fetch(package)
        except PackageHashMismatch as exc:
            return _faulted("package hash mismatch", str(exc))
        except PackageFetchError as exc:
            return _faulted("the package could not be fetched", str(exc))
        if run.kill_grace_s is not None or run.stop_asked:
            return RunResult(Outcome.STOPPED, None, "stopped before the script started", None, None)
        await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True, mode=0o700)
        spec = RunSpec(
            job_id=command.job_id,
            attempt=command.attempt,
            entry=package.entry,
            package_dir=folder,
            work_dir=work,
            input=command.input,
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
        self._reports.put_nowait(
            JobReport(
                job_id=command.job_id,
                attempt=command.attempt,
                outcome=Outcome.TERMINATING,
                reason=f"{because}; hard-stopping",
            )
        )
        self._kill(run, command.kill_grace_s, because=because)
        return self._explain(run, await finished)

    @staticmethod
    def _explain(run: JobRun, result: RunResult) -> RunResult:
        if run.killed_because and result.outcome is Outcome.STOPPED:
            return RunResult(
                result.outcome, result.exit_code, f"{result.reason} ({run.killed_because})", result.error, result.output
            )
        return result

    async def _report_forever(self) -> None:
        while True:
            report = await self._reports.get()
            try:
                await self._report(report)
            finally:
                self._reports.task_done()

    async def _report(self, report: JobReport) -> None:
        """Deliver a report until the jobs service takes it, or refuses it for good."""
        pause = REPORT_RETRY_S
        while True:
            try:
                await self._client.request(report)
                return
            except Unavailable as exc:
                self._log.warning("robot.report_delayed", job_id=report.job_id, error=exc.message)
            except Conflict as exc:
                self._log.warning("robot.report_refused", job_id=report.job_id, reason=exc.message)
                return
            except HerderError as exc:
                self._log.error("robot.report_failed", job_id=report.job_id, code=exc.code.value, reason=exc.message)
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, REPORT_RETRY_MAX_S)

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


def _faulted(reason: str, error: str) -> RunResult:
    return RunResult(outcome=Outcome.FAULTED, exit_code=None, reason=reason, error=error, output=None)


class JobLog:
    """Streams one job's log lines to `hd.<tenant>.tel.<robot>.log.<job>`, in order, without waiting
    for each to be stored; `close` waits until all are."""

    def __init__(self, nc: NATS, tenant: str, robot: str, job_id: str, attempt: int) -> None:
        self._js = nc.jetstream()
        self._subject = subjects.job_log(tenant, robot, job_id)
        self._job_id = job_id
        self._attempt = attempt
        self._seq = 0
        self._queue: asyncio.Queue[LogRecord | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._publish(), name=f"robot.log.{job_id[:12]}")

    def line(self, line: LogLine) -> None:
        """Queue a line the runner read from the script."""
        self._put(line.stream, line.level, line.message, line.fields, line.time)

    def agent(self, message: str, level: LogLevel = LogLevel.INFO) -> None:
        """Queue a line of the agent's own about the job."""
        self._put(LogStream.AGENT, level, message, {}, datetime.now(UTC))

    def _put(self, stream: LogStream, level: LogLevel, message: str, fields: dict[str, Any], time: datetime) -> None:
        self._seq += 1
        self._queue.put_nowait(
            LogRecord(
                job_id=self._job_id,
                attempt=self._attempt,
                seq=self._seq,
                time=time,
                stream=stream,
                level=level,
                message=message,
                fields=fields,
            )
        )

    async def _publish(self) -> None:
        pending: list[asyncio.Future[Any]] = []
        while (record := await self._queue.get()) is not None:
            try:
                pending.append(
                    await self._js.publish_async(
                        self._subject,
                        codec.dump(record),
                        headers={Header.MSG_ID: f"{self._job_id}.{self._attempt}.{record.seq}"},
                        wait_stall=LOG_PUBLISH_STALL_S,
                    )
                )
            except Exception as exc:
                log.warning("robot.log_lost", job_id=self._job_id, seq=record.seq, error=repr(exc))
            pending = [future for future in pending if not future.done()]
        if pending:
            await asyncio.wait(pending, timeout=LOG_PUBLISH_STALL_S)

    async def close(self) -> None:
        """Wait until every queued line is stored."""
        self._queue.put_nowait(None)
        await self._task
