"""Running one job's entry point in a child process on the robot, and deciding how the run ended.

The agent hands `JobProcess.start` a `RunSpec` (the entry point, the unpacked package, a fresh
work folder, the input) and a callback for log lines; it may then `request_stop()` (soft stop),
`kill(grace_s)` (hard stop) and `wait()` for the `RunResult`.

The child runs in a session of its own, with the package folder as its working directory and the
agent's environment minus every `HERDER_*` and `NATS_*` variable (tokens and server URLs never
reach scripts). It talks to the robot through files in the work folder and one pipe:

    input.json     the job's input (mode 0600)              HERDER_JOB_INPUT_FILE
    output.json    the output the script sets               HERDER_JOB_OUTPUT_FILE
    stop           exists once a soft stop is asked for      HERDER_JOB_STOP_FILE
    stop.seen      the script saw it (`should_stop()`)       (next to the stop file)
    error.txt      a Python entry point's exception          HERDER_JOB_ERROR_FILE
    robot/         Robot Framework's output.xml, log, report
    log pipe       the SDK's JSON lines                      HERDER_JOB_LOG_FD
    channel        the agent's socket for queue calls         HERDER_JOB_CHANNEL (see robot/channel.py)

A run by hand on an attended robot (`RunSpec.terminal`) is the person's: the child inherits the
agent's standard input, output and error (the terminal) instead of having them piped, so that its
prompts show as it writes them and not once a line ends (Python's `input()` writes its prompt to
stderr), and only its SDK records come as log lines.

`judge` is the pure core: from the facts of an ending (exit code, stop or kill asked for, what
the script left behind) it decides the outcome, reason and error. An output herder cannot store
(not a JSON-safe object, see protocol/values.py) faults a run that would have succeeded.

A job's processes end with it: when the child exits, whatever it left running in its process
group is killed, and `kill` signals the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from herder.protocol import values
from herder.protocol.errors import BadRequest, ErrorCode, HerderError
from herder.protocol.jobs import MAX_OUTPUT_BYTES, LogLevel, LogStream, Outcome
from herder.protocol.packages import EntryKind, EntryPoint
from herder.robot import sdk

log = structlog.get_logger("herder.robot")

# A line longer than this is cut (and says so); the SDK keeps its records within it.
MAX_LINE_BYTES = sdk.MAX_RECORD_BYTES
# After the job's processes are gone, how long a process that left the job's process group may
# keep its output pipes open before the runner stops reading them.
PIPE_DRAIN_S = 2.0
# How often a hard stop checks whether the process group is gone (nothing notifies it).
KILL_POLL_S = 0.05
MAX_ERROR_CHARS = 4000
MAX_STDERR_LINE_CHARS = 500
# Variables of the agent that must never reach a script: tokens, server URLs, credentials.
HIDDEN_ENV_PREFIXES = ("HERDER_", "NATS_")

INPUT_FILE = "input.json"
OUTPUT_FILE = "output.json"
STOP_FILE = "stop"
ERROR_FILE = "error.txt"
ROBOT_OUTPUT_DIR = "robot"

# Robot Framework's exit codes above the count of failed tests (see its user guide, "Return codes").
_RF_MAX_FAILED = 250
_RF_ERRORS = {
    251: "Robot Framework printed its help or version instead of running",
    252: "Robot Framework refused the test data or command line options",
    253: "Robot Framework execution was stopped by the user",
    255: "Robot Framework failed unexpectedly",
}
_RF_STOPPED_BY_USER = 253
_PR_SET_PDEATHSIG = 1


class RunnerError(HerderError):
    """The runner could not do what was asked of it; the message says why in one line."""


class StartError(RunnerError):
    """The job could not be started (its entry point is missing, say); the message says why in one line."""

    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True)
class RunSpec:
    """Everything needed to run one attempt of a job."""

    job_id: str
    attempt: int
    entry: EntryPoint
    # The unpacked package: the child's working directory. The cache shares it between jobs, and
    # herder never writes to it.
    package_dir: Path
    # A fresh folder for this run, created if missing: input, output, stop and error files and
    # Robot Framework's output.
    work_dir: Path
    input: dict[str, Any] = field(default_factory=dict)
    # The Unix socket of the run's channel to the agent (queue calls), if it has one.
    channel: Path | None = None
    # A person runs it: stdin, stdout and stderr are the agent's own (a terminal), not pipes.
    terminal: bool = False


@dataclass(frozen=True)
class LogLine:
    """One line of a job's log, as the runner hands it to the agent."""

    time: datetime
    stream: LogStream
    level: LogLevel
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    """How a run ended."""

    outcome: Outcome  # SUCCESSFUL, FAULTED or STOPPED
    exit_code: int | None  # None when the process ended by a signal
    reason: str  # one line for people: "exited with code 3", "stopped on request", …
    error: str | None  # for FAULTED: what went wrong, e.g. "ValueError: no invoice number"
    output: dict[str, Any] | None  # what the script left as its output, whatever the outcome


@dataclass(frozen=True)
class Ending:
    """The facts of how a job's process ended, from which `judge` decides the outcome."""

    kind: EntryKind
    returncode: int  # negative: killed by that signal
    killed: bool = False  # `kill()` was called while the process ran
    sigkill_needed: bool = False  # something still ran when the grace period was over
    grace_s: float = 0.0
    stop_requested: bool = False
    interrupted: bool = False  # sent SIGINT: Robot Framework's soft stop, or `interrupt()`
    stop_seen: bool = False  # the script's `should_stop()` returned True
    error_text: str | None = None  # what a Python entry point wrote to the error file
    last_stderr: str | None = None
    output: dict[str, Any] | None = None
    # Why the output the script left cannot be stored ("output.x: … is outside …"); None when it can,
    # or when there is none.
    output_problem: str | None = None


def judge(ending: Ending) -> RunResult:
    """The outcome, reason and error of a run, from how its process ended.

    An output that cannot be stored is never reported. It faults a run that would have been
    Successful; a run Stopped or Faulted anyway keeps that outcome and its own reason."""
    code = ending.returncode
    exit_code = code if code >= 0 else None
    output = ending.output if ending.output_problem is None else None

    def result(outcome: Outcome, reason: str, error: str | None = None) -> RunResult:
        # What the script wrote may hold NUL, which the jobs service cannot store.
        return RunResult(
            outcome=outcome,
            exit_code=exit_code,
            reason=values.without_nul(reason),
            error=values.without_nul(error) if error is not None else None,
            output=output,
        )

    if ending.killed:
        if ending.sigkill_needed:
            return result(Outcome.STOPPED, f"hard-stopped (killed after the {ending.grace_s:g} s grace period)")
        return result(Outcome.STOPPED, "hard-stopped (ended on SIGTERM)")
    if code == 0:
        if ending.stop_requested and ending.stop_seen:
            return result(Outcome.STOPPED, "stopped on request")
        if ending.output_problem is not None:
            unstorable = f"output is not storable: {ending.output_problem}"
            return result(Outcome.FAULTED, unstorable, unstorable)
        return result(Outcome.SUCCESSFUL, "exited with code 0")
    if ending.kind is EntryKind.ROBOT and ending.interrupted and _rf_stopped(code):
        # On its first SIGINT Robot Framework ends the running keyword and fails every test left.
        return result(Outcome.STOPPED, "stopped on request")
    if ending.interrupted and code == -signal.SIGINT:
        # Interrupted as Ctrl-C at a terminal would (`interrupt`), it let the interrupt end it.
        return result(Outcome.STOPPED, "interrupted (SIGINT)")
    if code < 0:
        reason = f"killed by signal {_signal_name(-code)}"
        return result(Outcome.FAULTED, reason, reason)
    reason = f"exited with code {code}"
    tail = f": {ending.last_stderr}" if ending.last_stderr else ""
    if ending.kind is EntryKind.PYTHON:
        return result(Outcome.FAULTED, reason, ending.error_text or reason + tail)
    if ending.kind is EntryKind.ROBOT:
        if code <= _RF_MAX_FAILED:
            failed = "250 or more tests" if code == _RF_MAX_FAILED else f"{code} test{'s' if code > 1 else ''}"
            return result(Outcome.FAULTED, reason, f"{failed} failed")
        return result(Outcome.FAULTED, reason, _RF_ERRORS.get(code, reason) + tail)
    return result(Outcome.FAULTED, reason, reason + tail)


def _rf_stopped(code: int) -> bool:
    return 0 < code <= _RF_MAX_FAILED or code in (_RF_STOPPED_BY_USER, -signal.SIGINT)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


@dataclass(frozen=True)
class JobFiles:
    """Where the files a run shares with its script live."""

    input: Path
    output: Path
    stop: Path
    seen: Path
    error: Path

    @classmethod
    def in_folder(cls, work_dir: Path) -> JobFiles:
        """The files of a run in `work_dir`."""
        stop = work_dir / STOP_FILE
        return cls(
            input=work_dir / INPUT_FILE,
            output=work_dir / OUTPUT_FILE,
            stop=stop,
            seen=Path(sdk.stop_seen_marker(str(stop))),
            error=work_dir / ERROR_FILE,
        )


def child_environment(agent_env: Mapping[str, str], spec: RunSpec, files: JobFiles, log_fd: int) -> dict[str, str]:
    """The script's environment: the agent's without HERDER_* and NATS_*, plus what the SDK reads."""
    env = {name: value for name, value in agent_env.items() if not name.upper().startswith(HIDDEN_ENV_PREFIXES)}
    package_dir = str(spec.package_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_dir, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(
        {
            sdk.ENV_JOB_ID: spec.job_id,
            sdk.ENV_JOB_ATTEMPT: str(spec.attempt),
            sdk.ENV_JOB_DIR: str(spec.work_dir),
            sdk.ENV_INPUT_FILE: str(files.input),
            sdk.ENV_OUTPUT_FILE: str(files.output),
            sdk.ENV_STOP_FILE: str(files.stop),
            sdk.ENV_ERROR_FILE: str(files.error),
            sdk.ENV_LOG_FD: str(log_fd),
            sdk.ENV_PACKAGE_DIR: package_dir,
        }
    )
    if spec.channel is not None:
        env[sdk.ENV_CHANNEL] = str(spec.channel)
    return env


def command_line(entry: EntryPoint, package_dir: Path, work_dir: Path, search_path: str | None) -> list[str]:
    """The argv that runs `entry` from `package_dir`; `StartError` if there is nothing to run."""
    if not package_dir.is_dir():
        raise StartError(f"the package folder {package_dir} does not exist")
    if entry.kind is EntryKind.PYTHON:
        module, sep, function = entry.target.partition(":")
        if not (sep and module and function):
            raise StartError(f"python entry point {entry.target!r} must be written module:function")
        return [sys.executable, "-m", "herder.robot.entry", entry.target, *entry.args]
    if entry.kind is EntryKind.ROBOT:
        suite = (package_dir / entry.target).resolve()
        if not suite.is_relative_to(package_dir.resolve()) or not suite.exists():
            raise StartError(f"the Robot Framework suite {entry.target!r} is not in the package")
        # Never run from the repository root: its folder `robot/` would shadow Robot Framework.
        options = ["--outputdir", str(work_dir / ROBOT_OUTPUT_DIR), "--consolecolors", "off"]
        return [sys.executable, "-m", "robot", *options, *entry.args, entry.target]
    return [_find_program(entry.target, package_dir, search_path), *entry.args]


def _find_program(target: str, package_dir: Path, search_path: str | None) -> str:
    """A command's program: a path (relative to the package), else a name on PATH, else a file in the package."""
    if "/" in target:
        candidate = Path(target) if os.path.isabs(target) else package_dir / target
        if not candidate.is_file():
            where = "does not exist" if os.path.isabs(target) else "is not in the package"
            raise StartError(f"command {target!r} {where}")
        return _executable(candidate, target)
    found = shutil.which(target, path=search_path)
    if found:
        return found
    local = package_dir / target
    if local.is_file():
        return _executable(local, target)
    raise StartError(f"command {target!r} is neither on PATH nor in the package")


def _executable(path: Path, target: str) -> str:
    if not os.access(path, os.X_OK):
        raise StartError(
            f"command {target!r} is not executable: mark it so (chmod +x) or name its interpreter, "
            f'e.g. command = ["bash", "{target}"]'
        )
    return str(path)


def prepare_work_dir(spec: RunSpec) -> JobFiles:
    """Create the work folder, clear what an earlier run there left, and write the input (mode 0600)."""
    try:
        text = json.dumps(spec.input, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StartError(f"the job input cannot be written as JSON: {exc}") from None
    files = JobFiles.in_folder(spec.work_dir)
    try:
        spec.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in (files.output, files.stop, files.seen, files.error):
            stale.unlink(missing_ok=True)
        fd = os.open(files.input, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(fd, 0o600)  # a file left by an earlier run keeps its mode otherwise
            handle.write(text)
    except OSError as exc:
        raise StartError(f"cannot prepare the work folder {spec.work_dir}: {exc.strerror or exc}") from None
    return files


class LineSplitter:
    """Cuts a byte stream into lines, keeping at most `limit` bytes of each and counting the rest."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._limit = limit
        self._kept = bytearray()
        self._length = 0

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """The lines `data` completes, each as (its first `limit` bytes, its full length)."""
        lines = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._take(data[start:end])
            lines.append(self._end())
            start = end + 1
        self._take(data[start:])
        return lines

    def finish(self) -> list[tuple[bytes, int]]:
        """The unterminated last line, if any."""
        return [self._end()] if self._length else []

    def _take(self, piece: bytes) -> None:
        room = self._limit - len(self._kept)
        if room > 0:
            self._kept += piece[:room]
        self._length += len(piece)

    def _end(self) -> tuple[bytes, int]:
        line = (bytes(self._kept), self._length)
        self._kept.clear()
        self._length = 0
        return line


def decode_line(kept: bytes, length: int, limit: int = MAX_LINE_BYTES) -> str:
    """A line's text, saying so when it was cut."""
    text = kept.decode("utf-8", errors="replace").removesuffix("\r")
    if length > limit:
        text += f" … [line cut: {length} bytes, the first {limit} kept]"
    return text


def sdk_line(text: str) -> LogLine:
    """A log line from one line of the SDK's pipe; what is not an SDK record is kept as it is."""
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("message"), str):
        return LogLine(time=datetime.now(UTC), stream=LogStream.SDK, level=LogLevel.INFO, message=text)
    try:
        level = LogLevel(str(record.get("level")))
    except ValueError:
        level = LogLevel.INFO
    fields = record.get("fields")
    return LogLine(
        time=_timestamp(record.get("time")),
        stream=LogStream.SDK,
        level=level,
        message=record["message"],
        fields=fields if isinstance(fields, dict) else {},
    )


def _timestamp(value: Any) -> datetime:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            stamp = datetime.fromisoformat(value)
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return datetime.now(UTC)


class _PipeReader(asyncio.Protocol):
    """Reads one of the child's pipes line by line, without blocking the loop."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._splitter = LineSplitter()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        for kept, length in self._splitter.feed(data):
            self._on_line(decode_line(kept, length))

    def connection_lost(self, exc: Exception | None) -> None:
        for kept, length in self._splitter.finish():
            self._on_line(decode_line(kept, length))
        if not self.closed.done():
            self.closed.set_result(None)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group `pgid` still runs.

    Zombies do not count: in a container whose first process reaps nothing, a killed grandchild
    stays one for ever, and a kill would otherwise wait out its grace period for nothing.
    """
    try:
        os.killpg(pgid, 0)  # cheap, and usually enough: no member at all
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if sys.platform != "linux":
        return True
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                # After the command name (which may hold anything, parentheses too): state, ppid, pgrp.
                state, _, group = handle.read().rsplit(b")", 1)[1].split()[:3]
            if int(group) == pgid and state not in (b"Z", b"X"):
                return True
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return False


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def _die_with_agent() -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGKILL the child when the agent dies (even by `kill -9`).

    prctl is looked up here, in the agent: the hook runs between fork and exec, where it should do
    as little as it can. The signal comes when the *thread* that forked the child ends, so jobs
    are started from the event loop's thread, which lives as long as the agent.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    agent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != agent:
            os._exit(1)  # the agent died before the request took effect

    return hook


class JobProcess:
    """One running entry point: its child process, its log pipes and how it ended."""

    def __init__(
        self,
        spec: RunSpec,
        process: asyncio.subprocess.Process,
        files: JobFiles,
        on_log: Callable[[LogLine], None],
    ) -> None:
        """Use `JobProcess.start`."""
        self.spec = spec
        self.pid = process.pid
        self._process = process
        self._files = files
        self._on_log = on_log
        self._readers: list[tuple[asyncio.BaseTransport, _PipeReader]] = []
        self._last_stderr: str | None = None
        self._stop_requested = False
        self._interrupted = False
        self._killed = False
        self._grace_s = 0.0
        self._sigkill_needed = False
        self._hard_stop: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[RunResult] | None = None

    @classmethod
    async def start(cls, spec: RunSpec, on_log: Callable[[LogLine], None]) -> JobProcess:
        """Start the entry point; `StartError` (one line) if it cannot be started.

        `on_log` is called in the event loop for every line the script prints or logs, in order
        within each stream; it should not block, and what it raises is logged and ignored.
        """
        # The child runs elsewhere: relative paths would name other files there.
        spec = replace(spec, package_dir=spec.package_dir.absolute(), work_dir=spec.work_dir.absolute())
        argv = command_line(spec.entry, spec.package_dir, spec.work_dir, os.environ.get("PATH", os.defpath))
        files = prepare_work_dir(spec)
        # stdout and stderr (unless they are the person's terminal), the SDK's log; -1: no pipe.
        out_r, out_w = (-1, -1) if spec.terminal else os.pipe()
        err_r, err_w = (-1, -1) if spec.terminal else os.pipe()
        log_r, log_w = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=None if spec.terminal else subprocess.DEVNULL,
                stdout=None if spec.terminal else out_w,
                stderr=None if spec.terminal else err_w,
                pass_fds=(log_w,),
                cwd=spec.package_dir,
                env=child_environment(os.environ, spec, files, log_w),
                start_new_session=True,
                preexec_fn=_die_with_agent(),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            for fd in (out_r, err_r, log_r):
                if fd >= 0:
                    os.close(fd)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartError(f"cannot start {spec.entry.describe()}: {reason}") from None
        finally:
            for fd in (out_w, err_w, log_w):
                if fd >= 0:
                    os.close(fd)
        job = cls(spec, process, files, on_log)
        try:
            if out_r >= 0:
                await job._read(out_r, job._stdout_line)
            if err_r >= 0:
                await job._read(err_r, job._stderr_line)
            await job._read(log_r, job._sdk_line)
        except BaseException:
            job._signal_group(signal.SIGKILL)
            await process.wait()
            job._close_readers()
            raise
        job._ended = asyncio.ensure_future(job._supervise())
        return job

    @property
    def running(self) -> bool:
        """Whether the child process has not exited yet."""
        return self._process.returncode is None

    def request_stop(self) -> None:
        """Soft stop: raise the flag `should_stop()` reads (and ask Robot Framework to stop once)."""
        if self._stop_requested:
            return
        self._stop_requested = True
        try:
            self._files.stop.write_text(datetime.now(UTC).isoformat() + "\n")
        except OSError as exc:
            self._agent_line(LogLevel.ERROR, f"cannot raise the stop flag: {exc.strerror or exc}")
        if self.spec.entry.kind is EntryKind.ROBOT and self.running:
            # Robot Framework ends gracefully on its first SIGINT (a second one forces it out).
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGINT)
                self._interrupted = True

    def interrupt(self) -> None:
        """SIGINT to the job's process group, as Ctrl-C at a terminal sends it: a Python script sees
        KeyboardInterrupt (and may give back what it holds before it ends), Robot Framework stops."""
        if not self.running or self._interrupted:
            return
        self._stop_requested = True
        self._interrupted = True
        self._signal_group(signal.SIGINT)

    async def kill(self, grace_s: float) -> None:
        """Hard stop: SIGTERM to the process group, SIGKILL after `grace_s`; returns once it is gone.

        A process that had already ended keeps its own outcome.
        """
        if self._hard_stop is None:
            if not self.running:
                return
            self._killed = True
            self._grace_s = grace_s
            self._hard_stop = asyncio.ensure_future(self._terminate(grace_s))
        await asyncio.shield(self._hard_stop)

    async def wait(self) -> RunResult:
        """How the run ended, once it has and its output has been read."""
        assert self._ended is not None
        return await asyncio.shield(self._ended)

    async def _terminate(self, grace_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        self._signal_group(signal.SIGTERM)
        while self.running or await asyncio.to_thread(group_alive, self.pid):
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._sigkill_needed = self._signal_group(signal.SIGKILL)
                await self._process.wait()
                return
            await asyncio.sleep(min(KILL_POLL_S, remaining))

    async def _supervise(self) -> RunResult:
        returncode = await self._process.wait()
        if self._hard_stop is not None:
            await self._hard_stop  # the rest of the group gets its grace period too
        if await asyncio.to_thread(group_alive, self.pid):
            self._signal_group(signal.SIGKILL)
            self._agent_line(LogLevel.WARNING, "killed the processes the job left running")
        await self._drain()
        output, output_problem = self._read_output()
        ending = Ending(
            kind=self.spec.entry.kind,
            returncode=returncode,
            killed=self._killed,
            sigkill_needed=self._sigkill_needed,
            grace_s=self._grace_s,
            stop_requested=self._stop_requested,
            interrupted=self._interrupted,
            stop_seen=self._files.seen.exists(),
            error_text=self._read_error(),
            last_stderr=self._last_stderr,
            output=output,
            output_problem=output_problem,
        )
        return judge(ending)

    async def _read(self, fd: int, on_line: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            pipe = os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        try:
            transport, reader = await loop.connect_read_pipe(lambda: _PipeReader(on_line), pipe)
        except BaseException:
            pipe.close()
            raise
        self._readers.append((transport, reader))

    async def _drain(self) -> None:
        """Read the pipes to their end; stop reading those a process outside the group holds open."""
        pending = [reader.closed for _, reader in self._readers if not reader.closed.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=PIPE_DRAIN_S)
            if late:
                self._agent_line(LogLevel.WARNING, "stopped reading output still held open by a process of the job")
        self._close_readers()
        await asyncio.gather(*(reader.closed for _, reader in self._readers))

    def _close_readers(self) -> None:
        for transport, _ in self._readers:
            transport.close()

    def _signal_group(self, signum: int) -> bool:
        """Send `signum` to the job's process group; whether anything was there to receive it."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # a member we may not signal: it exists all the same
        return True

    def _read_error(self) -> str | None:
        try:
            text = self._files.error.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None
        return text[:MAX_ERROR_CHARS] or None

    def _read_output(self) -> tuple[dict[str, Any] | None, str | None]:
        """The output the script left (None when it left none), or None and why herder cannot store it."""
        path = self._files.output
        try:
            size = path.stat().st_size
            # A file the SDK writes is exactly as large as the value it measures; a bigger one is not read.
            if size > MAX_OUTPUT_BYTES:
                problem = f"output: the file is {size} bytes, more than the {MAX_OUTPUT_BYTES // 1024} KiB allowed"
            else:
                return values.parse_json_object(path.read_bytes(), what="output", max_bytes=MAX_OUTPUT_BYTES), None
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            problem = f"output: the file cannot be read ({exc.strerror})"
        except BadRequest as exc:
            problem = exc.message
        self._agent_line(LogLevel.WARNING, f"the output is not storable: {problem}")
        return None, problem

    def _stdout_line(self, text: str) -> None:
        if text:
            self._emit(LogLine(time=datetime.now(UTC), stream=LogStream.STDOUT, level=LogLevel.INFO, message=text))

    def _stderr_line(self, text: str) -> None:
        if text.strip():
            self._last_stderr = text.strip()[:MAX_STDERR_LINE_CHARS]
        if text:
            self._emit(LogLine(time=datetime.now(UTC), stream=LogStream.STDERR, level=LogLevel.WARNING, message=text))

    def _sdk_line(self, text: str) -> None:
        if text:
            self._emit(sdk_line(text))

    def _agent_line(self, level: LogLevel, message: str) -> None:
        self._emit(LogLine(time=datetime.now(UTC), stream=LogStream.AGENT, level=level, message=message))

    def _emit(self, line: LogLine) -> None:
        try:
            self._on_log(line)
        except Exception:
            log.exception("runner.on_log_failed", job_id=self.spec.job_id, attempt=self.spec.attempt)
