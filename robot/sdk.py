"""What an automation script imports to talk to the herder robot that runs it.

A complete script, `hello.py`, published with `python = "hello:main"` in its `herder.toml`:

    from herder.robot import sdk


    def main(job: dict) -> dict:
        name = job.get("name", "world")
        sdk.log.info("greeting.start", name=name)
        for step in range(10):
            if sdk.should_stop():  # a soft stop was asked for: end cleanly, now
                sdk.log.warning("greeting.stopped", step=step)
                return {"greeting": None, "steps": step}
            print(f"step {step}")  # stdout lands in the job's log too
        return {"greeting": f"Hello, {name}!"}  # the job's output, like sdk.set_output(...)

herder calls `main` with the job's input (a function without parameters is called with none),
collects what it prints, what it logs through `sdk.log` (with levels and fields), and the dict it
returns. An exception fails the job with the exception as its error.

Run by hand (`python -c "import hello; print(hello.main({}))"`), the same script works without
herder: `job_input()` is `{}`, `should_stop()` is `False`, `sdk.log` prints readable lines to
stderr and `set_output` prints the output there too.

Files in storage buckets, shared with people and other processes, through the robot too (it reads and
writes the local files itself):

    shared = sdk.storage("finance")
    shared.get("in/invoices.xlsx", "invoices.xlsx")
    shared.put("out/report.pdf", "report.pdf")
    names = [f["path"] for f in shared.list("out/")]

Work queues, through the robot that runs the script (it holds the token; the script never does):

    invoices = sdk.queue("invoices")
    invoices.add({"number": "INV-7", "amount": 120.5}, reference="INV-7", priority="High")
    while (item := invoices.next()) is not None:
        try:
            book(item.content)
        except InvoiceRefused as exc:
            item.fail(str(exc), kind="business")  # the data is wrong: never retried
        else:
            item.complete({"booked": True})

herder's refusals raise `QueueError` (its `code` is herder's error code, `str()` its one-line
message). Queues need a robot: run by hand, outside herder, a queue call raises `NotOnRobot`.

Other jobs, started by this one (herder records it as their parent; `herder job show` shows the chain):

    report = sdk.start_job("month-end-report", group="finance", input={"month": "2026-05"})
    sdk.log.info("report.started", job=report.id, state=report.state)

Only the standard library is imported here: scripts start fast and need nothing else installed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# The variables the robot sets for the script; the runner and this module share these names.
ENV_JOB_ID = "HERDER_JOB_ID"
ENV_JOB_ATTEMPT = "HERDER_JOB_ATTEMPT"
ENV_JOB_DIR = "HERDER_JOB_DIR"
ENV_INPUT_FILE = "HERDER_JOB_INPUT_FILE"
ENV_OUTPUT_FILE = "HERDER_JOB_OUTPUT_FILE"
ENV_STOP_FILE = "HERDER_JOB_STOP_FILE"
ENV_ERROR_FILE = "HERDER_JOB_ERROR_FILE"
ENV_LOG_FD = "HERDER_JOB_LOG_FD"
ENV_PACKAGE_DIR = "HERDER_PACKAGE_DIR"
# The Unix socket of the run's channel to its robot agent (see herder.robot.channel).
ENV_CHANNEL = "HERDER_JOB_CHANNEL"

# The output travels in the job's report over NATS: keep it well inside a message.
MAX_OUTPUT_BYTES = 256 * 1024
# One log record is one line on the log pipe; the runner cuts lines longer than this.
MAX_RECORD_BYTES = 8 * 1024
_MAX_MESSAGE_CHARS = 1024
_MAX_FIELD_CHARS = 256
LEVELS = ("debug", "info", "warning", "error")
# One request or answer on the channel is one line of at most this; the agent refuses longer ones.
MAX_CHANNEL_LINE_BYTES = 1_200_000

__all__ = [
    "CallError",
    "Credential",
    "Item",
    "Log",
    "NotOnRobot",
    "Queue",
    "QueueError",
    "Queues",
    "Secret",
    "StartedJob",
    "Storage",
    "asset",
    "credential",
    "job_input",
    "log",
    "queue",
    "queues",
    "set_asset",
    "set_credential",
    "set_output",
    "should_stop",
    "start_job",
    "storage",
]


def stop_seen_marker(stop_file: str) -> str:
    """The file `should_stop()` leaves next to the stop file once the script has seen the stop."""
    return stop_file + ".seen"


_inputs: dict[str, str] = {}
_stops_seen: set[str] = set()


def job_input() -> dict[str, Any]:
    """The job's input: a fresh dict on every call, `{}` when the script is not run by herder."""
    path = os.environ.get(ENV_INPUT_FILE)
    if not path:
        return {}
    text = _inputs.get(path)
    if text is None:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise RuntimeError(f"the job input file {path} cannot be read: {exc.strerror}") from None
        _inputs[path] = text
    values = json.loads(text)
    if not isinstance(values, dict):
        raise RuntimeError(f"the job input file {path} does not hold a JSON object")
    return values


def set_output(values: dict[str, Any]) -> None:
    """Make `values` the job's output (replacing any output set before).

    `TypeError` if it is not a dict of JSON values with string keys, `ValueError` if it is larger
    than MAX_OUTPUT_BYTES once encoded. The file is replaced atomically: a job killed meanwhile
    leaves the previous output, never half of one.
    """
    if not isinstance(values, dict):
        raise TypeError(f"the output must be a dict, not {type(values).__name__}")
    for key in values:
        if not isinstance(key, str):
            raise TypeError(f"the output's keys must be strings, not {type(key).__name__} ({key!r})")
    try:
        encoded = json.dumps(values, ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the output must be JSON-serialisable: {exc}") from None
    if len(encoded) > MAX_OUTPUT_BYTES:
        raise ValueError(f"the output is {len(encoded)} bytes once encoded, more than {MAX_OUTPUT_BYTES}")
    path = os.environ.get(ENV_OUTPUT_FILE)
    if not path:
        print(f"output: {encoded.decode()}", file=sys.stderr, flush=True)
        return
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
    with open(partial, "wb") as handle:
        handle.write(encoded)
    os.replace(partial, path)


def should_stop() -> bool:
    """Whether a soft stop was asked for: the script should then end cleanly, and soon.

    The first time this returns True, it tells the robot that the script saw the stop, so that
    the job ends as Stopped rather than Successful. Always False when not run by herder.
    """
    path = os.environ.get(ENV_STOP_FILE)
    if not path or not os.path.exists(path):
        return False
    if path not in _stops_seen:
        try:
            with open(stop_seen_marker(path), "w"):
                pass
        except OSError:
            pass  # the job folder is gone: the job is ending anyway
        _stops_seen.add(path)
    return True


class Log:
    """Structured logging for scripts: `log.info("invoice.read", number=42)`.

    Each call is one record: an event name (or a short message), a level and fields. Run by
    herder, records go to the robot as JSON lines, kept with the job's log; otherwise they are
    printed to stderr for a person to read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def debug(self, event: str, /, **fields: Any) -> None:
        """Log a record at level debug."""
        self._emit("debug", event, fields)

    def info(self, event: str, /, **fields: Any) -> None:
        """Log a record at level info."""
        self._emit("info", event, fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        """Log a record at level warning."""
        self._emit("warning", event, fields)

    def error(self, event: str, /, **fields: Any) -> None:
        """Log a record at level error."""
        self._emit("error", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        fd = _log_fd()
        if fd is None:
            print(_readable(now, level, str(event), fields), file=sys.stderr, flush=True)
            return
        line = _record(now, level, str(event), fields)
        with self._lock:
            try:
                _write_all(fd, line)
            except OSError:
                # The robot stopped reading (it is going away): the line is not lost to the person
                # watching, and the script goes on.
                print(_readable(now, level, str(event), fields), file=sys.stderr, flush=True)


log = Log()


def _log_fd() -> int | None:
    """The log pipe, if herder passed one and it is still a pipe.

    A process the script starts inherits the environment but (usually) not the pipe, and the
    number may then name another file: only a pipe is trusted.
    """
    value = os.environ.get(ENV_LOG_FD)
    if not value:
        return None
    try:
        fd = int(value)
        return fd if stat.S_ISFIFO(os.fstat(fd).st_mode) else None
    except (ValueError, OSError):
        return None


def _record(now: datetime, level: str, event: str, fields: dict[str, Any]) -> bytes:
    """One JSON line, shortened to fit MAX_RECORD_BYTES: long values are cut, then fields dropped."""
    record: dict[str, Any] = {"time": now.isoformat(), "level": level, "message": event, "fields": fields}
    line = _dumps(record)
    if len(line) <= MAX_RECORD_BYTES:
        return line
    record["message"] = event[:_MAX_MESSAGE_CHARS]
    record["fields"] = {key: _shortened(value) for key, value in fields.items()}
    record["fields"]["cut"] = True
    line = _dumps(record)
    if len(line) <= MAX_RECORD_BYTES:
        return line
    record["fields"] = {"cut": True, "dropped": sorted(fields)[:20]}
    return _dumps(record)


def _dumps(record: dict[str, Any]) -> bytes:
    # Logging never fails a script: what JSON cannot hold is logged as its str().
    return json.dumps(record, ensure_ascii=False, default=str).encode() + b"\n"


def _shortened(value: Any) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= _MAX_FIELD_CHARS else text[:_MAX_FIELD_CHARS] + "…"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _readable(now: datetime, level: str, event: str, fields: dict[str, Any]) -> str:
    words = [now.astimezone().strftime("%H:%M:%S"), f"{level.upper():<7}", event]
    for key, value in fields.items():
        shown = value if isinstance(value, bool | int | float) or value is None else repr(value)
        words.append(f"{key}={shown}")
    return " ".join(words)


# --- work queues, through the run's channel to its robot agent ---

# How long the SDK waits to reach the agent's socket, and for an answer. The agent answers every call
# within its own client's timeout (an add, retried under its idempotency key, within about 20 s): this
# only bounds the wait on an agent that stopped answering at all.
CHANNEL_CONNECT_TIMEOUT_S = 5.0
CHANNEL_CALL_TIMEOUT_S = 120.0
PRIORITIES = ("High", "Normal", "Low")
EXCEPTION_KINDS = ("business", "application")
# As herder.protocol.queues takes them: longer reasons and progress texts are cut to fit, not refused.
MAX_REASON_CHARS = 2000
MAX_PROGRESS_CHARS = 2000
_MAX_JSON_DEPTH = 32
# The keys of an item in `add_many`: `add`'s, and `postpone_until` as herder and `herder queue add --file` name it.
_ITEM_KEYS = frozenset({"content", "reference", "priority", "deadline", "postpone", "postpone_until", "tags"})


class CallError(Exception):
    """herder refused a call of the script (a queue's, an asset's, a credential's, a job start), or could not
    serve it.

    `code` is herder's error code (`bad_request`, `not_found`, `conflict`, `forbidden`, `unavailable`,
    `decryption_failed`, `internal`, …), `str()` is the one-line message, and `details` holds what else
    herder said (for `bad_request`, the fields that failed under `errors`). `unavailable` means herder
    could not be reached in time: the call may be tried again later.
    """

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


# The name queue code has always caught.
QueueError = CallError


class _ChannelBroke(CallError):
    """`unavailable` because the channel itself failed (the socket could not be reached, broke, or closed
    before the answer came), not because herder said so: a call under an idempotency key may go again."""


class NotOnRobot(RuntimeError):
    """A call from a script no robot runs: queues, assets, credentials, storage and starting jobs are reached
    through a robot."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "queues, assets, credentials and storage need a robot: run this script as a herder job, or by hand on "
            "an attended robot with "
            f"'herder robot run ROBOT --run PROCESS' ({ENV_CHANNEL} is not set: no robot runs this script)"
        )


def queue(name: str) -> Queue:
    """The work queue `name`, reached through the robot that runs the script."""
    if not isinstance(name, str):
        raise TypeError(f"a queue's name is a str, not {type(name).__name__}")
    return Queue(name)


def queues(
    names: Sequence[str], *, order: str = "strict", weights: Sequence[int] | Mapping[str, int] | None = None
) -> Queues:
    """Several queues to take items from: in the order given (`order="strict"`: the first queue with an
    item gives it), or by weight (`order="weighted"`: a queue of weight 3 is tried first three times as
    often as one of weight 1; `weights` lists them in the order of `names`, or maps names to them)."""
    return Queues(names, order=order, weights=weights)


def asset(name: str) -> Any:
    """The value of asset `name` as this robot reads it (its own, its group's, or the global one), typed:
    a str, bool, int, a JSON value, or a calendar's list of dates (YYYY-MM-DD)."""
    return _call(None, "asset_get", {"name": _name(name, "an asset")})["value"]


def set_asset(name: str, value: Any, *, own: bool = False) -> None:
    """Write asset `name` (one robots may write): its global value, or this robot's own with `own=True`."""
    _call(None, "asset_write", {"name": _name(name, "an asset"), "value": value, "own": bool(own)})


class Secret(str):
    """A secret string: itself wherever a string is used, but `repr()` shows `'***'`, so that a
    debugger, a traceback's locals or Robot Framework's argument logging never shows it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class Credential:
    """A credential as a script reads it. `password` is the secret; `repr()` and `str()` never show it,
    and a log line of this job that contains it is masked by the robot before it leaves."""

    __slots__ = ("expires_on", "name", "password", "username")

    def __init__(self, name: str, username: str, password: str, expires_on: str | None) -> None:
        self.name = name
        self.username = username
        self.password = Secret(password)
        self.expires_on = expires_on

    def __repr__(self) -> str:
        return f"Credential(name={self.name!r}, username={self.username!r}, password='***')"

    __str__ = __repr__


def credential(name: str) -> Credential:
    """Credential `name` for this job (sealed to this robot on the way; opened by its agent)."""
    reply = _call(None, "credential_get", {"name": _name(name, "a credential")})
    return Credential(reply["name"], reply["username"], reply["password"], reply.get("expires_on"))


def set_credential(name: str, username: str, password: str, *, own: bool = False) -> None:
    """Write credential `name` (one robots may write): its global value, or this robot's own with `own=True`."""
    if not isinstance(username, str) or not isinstance(password, str) or not password:
        raise TypeError("a credential's username and password are strings, and the password is not empty")
    body = {"name": _name(name, "a credential"), "username": username, "password": password, "own": bool(own)}
    _call(None, "credential_set", body)


def _name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what}'s name is a str, not {type(name).__name__}")
    return name


# --- storage buckets, through the run's channel: the agent moves the local files itself ---

# A put or a get moves a whole file before the agent answers (the agent bounds each of its requests to
# herder): this only bounds the wait on an agent that stopped answering at all.
STORAGE_CALL_TIMEOUT_S = 3600.0


class Storage:
    """A storage bucket, as a script reaches it through its robot; see `sdk.storage`.

    A file is described by a dict: `bucket`, `path`, `size`, `sha256`, `content_type`, `updated_at`
    (ISO 8601) and `updated_by`. herder's refusals raise `CallError` (`not_found`: no such bucket or
    file; `forbidden`: the bucket does not let this robot in; `bad_request`: over a limit, or a path
    that is not one, like `reports/june.xlsx`).
    """

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket

    def __repr__(self) -> str:
        return f"Storage({self.bucket!r})"

    def put(self, path: str, local_file: str | os.PathLike[str]) -> dict[str, Any]:
        """Upload `local_file` to `path` in the bucket, replacing the file there; the file as stored.
        Nothing is stored unless all of it arrives intact."""
        body = {"bucket": self.bucket, "path": _storage_path(path), "local_file": _local_file(local_file)}
        return _link().call("storage_put", body, timeout_s=STORAGE_CALL_TIMEOUT_S)

    def get(self, path: str, local_file: str | os.PathLike[str]) -> dict[str, Any]:
        """Download `path` of the bucket to `local_file` (into it when it is a folder); the file's info.
        The local file is replaced only once the whole file has arrived with the right sha256."""
        body = {"bucket": self.bucket, "path": _storage_path(path), "local_file": _local_file(local_file)}
        return _link().call("storage_get", body, timeout_s=STORAGE_CALL_TIMEOUT_S)

    def list(self, prefix: str = "") -> list[dict[str, Any]]:
        """The files whose paths start with `prefix` (every file when empty), by path."""
        if not isinstance(prefix, str):
            raise TypeError(f"a prefix is a str, not {type(prefix).__name__}")
        link = _link()
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            body: dict[str, Any] = {"bucket": self.bucket, "prefix": prefix}
            if cursor is not None:
                body["cursor"] = cursor
            reply = link.call("storage_list", body)
            found += list(reply.get("files") or [])
            cursor = reply.get("next_cursor")
            if not cursor:
                return found

    def delete(self, path: str) -> dict[str, Any]:
        """Delete `path` from the bucket; the file as it was."""
        return _call(None, "storage_delete", {"bucket": self.bucket, "path": _storage_path(path)})


def storage(bucket: str) -> Storage:
    """The storage bucket `bucket`, reached through the robot that runs the script."""
    if not isinstance(bucket, str):
        raise TypeError(f"a bucket's name is a str, not {type(bucket).__name__}")
    return Storage(bucket)


def _storage_path(path: object) -> str:
    if not isinstance(path, str):
        raise TypeError(f"a path in a bucket is a str like 'reports/june.xlsx', not {type(path).__name__}")
    return path


def _local_file(local_file: object) -> str:
    """A local file as the agent takes it: absolute (the agent does not run in the script's folder)."""
    if not isinstance(local_file, str | os.PathLike):
        raise TypeError(f"a local file is a str or a path, not {type(local_file).__name__}")
    return os.path.abspath(os.fspath(local_file))


# --- jobs the script starts, through its robot: herder records this job as their parent ---

# A start that the channel failed to carry (not one herder refused) is sent again under the same key,
# this many times in all, so that it starts one job whatever the channel did with the first.
START_JOB_ATTEMPTS = 3
_START_JOB_PAUSE_S = 0.2
_NOT_A_JOB = (
    f"sdk.start_job starts jobs from a herder job: run this script as one ('herder job start PROCESS "
    f"--robot ROBOT'); {ENV_CHANNEL} is not set: no robot runs this script"
)
# How often `start_job(wait=True)` asks after the job it started: soon at first, then every few seconds.
_WAIT_FIRST_S = 0.2
_WAIT_MAX_S = 3.0
_FINAL_STATES = frozenset({"Successful", "Faulted", "Stopped"})


@dataclass(frozen=True)
class StartedJob:
    """A job the script started (`sdk.start_job`), as herder answered the start: `state` is Pending (it waits
    for a robot, `reason` says why) or Running (a robot was free and took it: `robot`)."""

    id: str
    process: str
    version: str
    state: str
    robot: str | None = None
    reason: str = ""
    # With wait=True, what the job returned once it ended Successful.
    output: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        """Whether the job has ended (Successful, Faulted or Stopped)."""
        return self.state in _FINAL_STATES


def start_job(
    process: str,
    *,
    robot: str | None = None,
    group: str | None = None,
    input: Mapping[str, Any] | None = None,
    version: str | None = None,
    priority: str = "Normal",
    wait: bool = False,
    timeout_s: float | None = None,
) -> StartedJob:
    """Start `process` as a new job on `robot`, or on any available robot of `group` (name one of them);
    herder records this script's job as its parent (`herder job show` shows the chain).

    `input` is a dict of JSON values (the new job's `job_input()`), `version` the version to run (the
    newest by default), `priority` High, Normal or Low, `timeout_s` how long the new job may run before
    its robot hard-stops it. The start returns at once; with `wait=True` it returns once the new job has
    ended (its `state` and `output`), or when this job is asked to stop (`should_stop()`), whichever
    comes first. herder's refusals raise `CallError`: `not_found` (no such process, version,
    robot or group), `bad_request` (an input herder will not take), `conflict` (an attended robot or
    group, or this job is ending). A start the channel failed to carry is sent again under the same
    idempotency key: it never starts two jobs.
    """
    if not isinstance(process, str):
        raise TypeError(f"a process's name is a str, not {type(process).__name__}")
    if (robot is None) == (group is None):
        raise ValueError("say where the job runs: robot='NAME' or group='NAME', one of them")
    where = {"robot": robot} if robot is not None else {"group": group}
    for key, value in where.items():
        if not isinstance(value, str):
            raise TypeError(f"a {key}'s name is a str, not {type(value).__name__}")
    if version is not None and not isinstance(version, str):
        raise TypeError(f"a version is a str like '1.2.0', not {type(version).__name__}")
    body: dict[str, Any] = {"process": process, **where, "input": _json_object({} if input is None else input, "input")}
    if version is not None:
        body["version"] = version
    if priority != "Normal":
        body["priority"] = _priority(priority, "priority")
    if timeout_s is not None:
        body["timeout_s"] = _seconds(timeout_s, "timeout_s")
    if not isinstance(wait, bool):
        raise TypeError(f"wait is True or False, not {type(wait).__name__}")
    # Random, chosen once for this start: every sending of it, by the channel or by this loop, carries it.
    body["request_id"] = uuid.uuid4().hex
    link = _link(_NOT_A_JOB)
    for attempt in range(1, START_JOB_ATTEMPTS + 1):
        try:
            reply = link.call("job_start", body)
            break
        except _ChannelBroke:
            if attempt == START_JOB_ATTEMPTS:
                raise
            time.sleep(_START_JOB_PAUSE_S * attempt)
    started = _started_job(reply)
    pause = _WAIT_FIRST_S
    while wait and not started.ended and not should_stop():
        time.sleep(pause)
        pause = min(pause * 2, _WAIT_MAX_S)
        started = _started_job(link.call("job_state", {"id": started.id}))
    return started


def _started_job(reply: Mapping[str, Any]) -> StartedJob:
    try:
        output = reply.get("output")
        return StartedJob(
            id=str(reply["id"]),
            process=str(reply["process"]),
            version=str(reply["version"]),
            state=str(reply["state"]),
            robot=reply.get("robot"),
            reason=str(reply.get("reason") or ""),
            output=dict(output) if isinstance(output, dict) else None,
        )
    except KeyError:
        raise CallError("internal", "the robot agent's answer holds no job") from None


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is a number of seconds, not {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{what} is a number of seconds greater than 0, not {value!r}")
    return float(value)


@dataclass(eq=False)
class Item:
    """A queue item the robot now holds, under `lease`.

    Finish it once: `complete` (Successful), `fail` (Failed: `business` when the data is wrong, never
    retried; `application` when a system misbehaved, retried while the queue allows) or `postpone`
    (back to New until a later time). `progress` says how far it has got and renews the lease: an item
    whose lease lapses is taken away (Abandoned). A finished item cannot be finished again.
    """

    id: str
    queue: str
    content: dict[str, Any]
    reference: str | None
    priority: str
    deadline: datetime | None
    tags: list[str]
    attempt: int
    lease: int
    # InProgress while held; once finished, what herder made of it (Successful, Failed, Retried, New).
    state: str = "InProgress"
    _link: _Link | None = field(default=None, repr=False)
    _finished: str = field(default="", repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(self, output: Mapping[str, Any] | None = None) -> None:
        """Mark the item Successful, with `output` (a dict of JSON values) as its result."""
        result: dict[str, Any] = {"id": self.id, "lease": self.lease, "state": "Successful"}
        if output is not None:
            result["output"] = _json_object(output, "output")
        self._finish("completed", "item_result", {"results": [result]})

    def fail(self, reason: str, kind: str = "business") -> None:
        """Mark the item Failed: `kind="business"` (the data is wrong: final) or `"application"` (retried
        while the queue's retries last). A reason longer than MAX_REASON_CHARS is cut to fit."""
        if kind not in EXCEPTION_KINDS:
            raise ValueError(f"kind must be 'business' or 'application', not {kind!r}")
        result = {
            "id": self.id,
            "lease": self.lease,
            "state": "Failed",
            "exception": kind,
            "reason": _cut(reason, MAX_REASON_CHARS),
        }
        self._finish("failed", "item_result", {"results": [result]})

    def postpone(self, until: datetime | timedelta, reason: str = "") -> None:
        """Give the item back as New, to be taken again from `until` on (a datetime with a time zone, or a
        timedelta from now)."""
        body = {
            "id": self.id,
            "lease": self.lease,
            "until": _when(until, "until"),
            "reason": _cut(reason, MAX_REASON_CHARS),
        }
        self._finish("postponed", "item_postpone", body)

    def progress(self, text: str) -> None:
        """Say how far the item has got (shown with it in herder); renews the lease. Cut to MAX_PROGRESS_CHARS."""
        with self._lock:
            self._check_held()
            _call(
                self._link,
                "item_progress",
                {"id": self.id, "lease": self.lease, "progress": _cut(text, MAX_PROGRESS_CHARS)},
            )

    @property
    def finished(self) -> bool:
        """Whether the item was completed, failed or postponed."""
        return bool(self._finished)

    def _finish(self, how: str, verb: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._check_held()
            reply = _call(self._link, verb, body)
            self._finished = how
            shown = reply.get("items", [reply])[0] if verb == "item_result" else reply
            if isinstance(shown, dict) and isinstance(shown.get("state"), str):
                self.state = shown["state"]

    def _check_held(self) -> None:
        if self._finished:
            raise QueueError(
                "conflict",
                f"item {self.id} of queue {self.queue} was {self._finished} already; an item is finished once, "
                "by complete, fail or postpone",
            )


class Queue:
    """One work queue, as a script reaches it through its robot; see `sdk.queue`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    def add(
        self,
        content: Mapping[str, Any],
        *,
        reference: str | None = None,
        priority: str = "Normal",
        deadline: datetime | None = None,
        postpone: datetime | timedelta | None = None,
        tags: Sequence[str] = (),
    ) -> str:
        """Add one item (New): `content` is a dict of JSON values; the new item's id.

        `reference` names it (unique in a queue that says so: a second one is `conflict`), `priority`
        is High, Normal or Low, `deadline` (a datetime with a time zone) makes it go before items
        without one, `postpone` (a datetime, or a timedelta from now) hides it until then.
        """
        item = _new_item(
            content, "content", reference=reference, priority=priority, deadline=deadline, postpone=postpone, tags=tags
        )
        return self._add([item])[0]

    def add_many(self, items: Iterable[Mapping[str, Any]]) -> list[str]:
        """Add items all at once, all or none (one refused refuses them all); their ids, in order.

        Each is a dict with the keys of `add` (`{"content": {...}, "reference": "INV-7", "priority":
        "High"}`), or the content itself (`{"number": "INV-7"}`): a dict with a top-level `content` key
        is an item, any other dict is the content of one, as in the JSON Lines files of `herder queue
        add --file` (whose lines can be given here as they are: times as ISO 8601 text with a time zone,
        `postpone_until` for `postpone`). An item with a key `add` does not know is refused, naming it.
        """
        bodies = []
        for index, spec in enumerate(items):
            where = f"items[{index}]"
            if isinstance(spec, Mapping) and "content" in spec:
                unknown = sorted(str(key) for key in spec if key not in _ITEM_KEYS)
                if unknown:
                    raise ValueError(
                        f"{where}: an item has no {', '.join(map(repr, unknown))}; its keys are "
                        f"{', '.join(sorted(_ITEM_KEYS))} (content with a 'content' key of its own goes in "
                        '{"content": ...})'
                    )
                options = {key: value for key, value in spec.items() if key != "content" and value is not None}
                if "postpone_until" in options:
                    options["postpone"] = options.pop("postpone_until")
                bodies.append(_new_item(spec["content"], f"{where}.content", **options))
            else:
                bodies.append(_new_item(spec, where))
        return self._add(bodies) if bodies else []

    def next(
        self, *, tags: str | Sequence[str] | None = None, reference: str | None = None, priority: str | None = None
    ) -> Item | None:
        """Take the next item, now held by this robot; None when the queue has none to give.

        `tags` keeps items with these tags (`["urgent"]`, or herder's filter `"+urgent;-manual"`),
        `reference` those whose reference matches (`*` for any characters: `"INV-2026-*"`), `priority`
        those of that priority.
        """
        found = self.next_batch(1, tags=tags, reference=reference, priority=priority)
        return found[0] if found else None

    def next_batch(
        self,
        n: int,
        *,
        tags: str | Sequence[str] | None = None,
        reference: str | None = None,
        priority: str | None = None,
    ) -> list[Item]:
        """Take up to `n` items at once (fewer, or none, when the queue has fewer), in processing order."""
        return _take([{"name": self.name}], "strict", n, tags=tags, reference=reference, priority=priority)

    def _add(self, items: list[dict[str, Any]]) -> list[str]:
        reply = _call(_link(), "item_add", {"queue": self.name, "items": items})
        ids = reply.get("ids")
        if not isinstance(ids, list):
            raise QueueError("internal", "the robot agent's answer to item_add holds no ids")
        return [str(value) for value in ids]


class Queues:
    """Several queues taken from together; see `sdk.queues`."""

    def __init__(
        self, names: Sequence[str], *, order: str = "strict", weights: Sequence[int] | Mapping[str, int] | None = None
    ) -> None:
        if isinstance(names, str):
            raise TypeError("give the queues as a list of names, like sdk.queues(['urgent', 'routine'])")
        if order not in ("strict", "weighted"):
            raise ValueError(f"order must be 'strict' or 'weighted', not {order!r}")
        self.names = list(names)
        self.order = order
        self._choices: list[dict[str, Any]]
        if weights is None:
            self._choices = [{"name": name} for name in self.names]
        elif isinstance(weights, Mapping):
            self._choices = [{"name": name, "weight": weights.get(name, 1)} for name in self.names]
        else:
            weights = list(weights)
            if len(weights) != len(self.names):
                raise ValueError(f"{len(weights)} weights for {len(self.names)} queues: give one weight per queue")
            self._choices = [{"name": name, "weight": weight} for name, weight in zip(self.names, weights, strict=True)]

    def __repr__(self) -> str:
        return f"Queues({self.names!r}, order={self.order!r})"

    def next(
        self, *, tags: str | Sequence[str] | None = None, reference: str | None = None, priority: str | None = None
    ) -> Item | None:
        """Take the next item from the first of the queues (by order or weight) that has one; None if none has."""
        found = self.next_batch(1, tags=tags, reference=reference, priority=priority)
        return found[0] if found else None

    def next_batch(
        self,
        n: int,
        *,
        tags: str | Sequence[str] | None = None,
        reference: str | None = None,
        priority: str | None = None,
    ) -> list[Item]:
        """Take up to `n` items across the queues."""
        return _take(self._choices, self.order, n, tags=tags, reference=reference, priority=priority)


def _take(
    choices: list[dict[str, Any]],
    order: str,
    count: int,
    *,
    tags: str | Sequence[str] | None,
    reference: str | None,
    priority: str | None,
) -> list[Item]:
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"the number of items to take must be a whole number of at least 1, not {count!r}")
    body: dict[str, Any] = {"queues": choices, "order": order, "count": count}
    if tags is not None:
        body["tags"] = tags if isinstance(tags, str) else ";".join(tags)
    if reference is not None:
        body["reference"] = reference
    if priority is not None:
        body["priority"] = _priority(priority, "priority")
    link = _link()
    reply = _call(link, "item_next", body)
    return [_item_of(info, link) for info in reply.get("items", [])]


def _item_of(info: Mapping[str, Any], link: _Link) -> Item:
    """An `Item` from the agent's answer (herder's ItemInfo as JSON)."""
    deadline = info.get("deadline")
    return Item(
        id=str(info["id"]),
        queue=str(info["queue"]),
        content=dict(info.get("content") or {}),
        reference=info.get("reference"),
        priority=str(info.get("priority", "Normal")),
        deadline=datetime.fromisoformat(deadline) if isinstance(deadline, str) else None,
        tags=list(info.get("tags") or []),
        attempt=int(info.get("attempt", 1)),
        lease=int(info["lease"]),
        _link=link,
    )


def _new_item(
    content: Any,
    where: str,
    *,
    reference: str | None = None,
    priority: str = "Normal",
    deadline: datetime | str | None = None,
    postpone: datetime | timedelta | str | None = None,
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """One item of an add, as herder's NewItem takes it; only what differs from the defaults is sent."""
    item: dict[str, Any] = {"content": _json_object(content, where)}
    if reference is not None:
        item["reference"] = reference
    if priority != "Normal":
        item["priority"] = _priority(priority, "priority")
    if deadline is not None:
        if isinstance(deadline, timedelta):
            raise TypeError("a deadline is a point in time: give a datetime with a time zone, not a timedelta")
        item["deadline"] = _when(deadline, "deadline")
    if postpone is not None:
        item["postpone_until"] = _when(postpone, "postpone")
    if tags:
        item["tags"] = [tags] if isinstance(tags, str) else list(tags)
    return item


def _priority(value: object, what: str) -> str:
    if isinstance(value, str) and value.capitalize() in PRIORITIES:
        return value.capitalize()
    raise ValueError(f"{what} must be one of {', '.join(PRIORITIES)}, not {value!r}")


def _when(value: object, what: str) -> str:
    """A point in time as herder takes it: ISO 8601 with its time zone, from a datetime, a timedelta from
    now, or ISO 8601 text. One without a time zone is refused."""
    if isinstance(value, timedelta):
        return (datetime.now(UTC) + value).isoformat()
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{what}: {text[:40]!r} is not an ISO 8601 time, like '2030-06-01T17:00:00+02:00'"
            ) from None
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError(
                f"{what}: {value.isoformat()} has no time zone, so it could be any of 24 hours; give one with "
                "a time zone, like datetime.now(UTC) + timedelta(hours=4), or a timedelta from now"
            )
        return value.isoformat()
    raise TypeError(f"{what} must be a datetime with a time zone, or a timedelta from now; not {type(value).__name__}")


def _cut(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_object(value: Any, what: str) -> dict[str, Any]:
    """`value` as a dict of JSON values; `QueueError` `bad_request` naming the path of what JSON cannot hold.

    herder checks the rest (integers within ±(2^53 - 1), no NUL, the size, the queue's schema) and names
    the path too."""
    if not isinstance(value, Mapping):
        raise QueueError(
            "bad_request",
            f'{what}: not a JSON object but a {type(value).__name__}; give a dict, like {{"number": "INV-7"}}',
        )
    stack: list[tuple[str, Any, int]] = [(what, value, 1)]
    while stack:
        path, current, depth = stack.pop()
        if isinstance(current, Mapping | list | tuple) and depth > _MAX_JSON_DEPTH:
            raise QueueError("bad_request", f"{path}: nested deeper than {_MAX_JSON_DEPTH} levels")
        if isinstance(current, Mapping):
            for key, inner in reversed(list(current.items())):
                if not isinstance(key, str):
                    raise QueueError(
                        "bad_request", f"{path}: the key {key!r} is a {type(key).__name__}; JSON keys are strings"
                    )
                stack.append((_key_path(path, key), inner, depth + 1))
        elif isinstance(current, list | tuple):
            stack.extend((f"{path}[{index}]", inner, depth + 1) for index, inner in reversed(list(enumerate(current))))
        elif isinstance(current, float):
            if current != current or current in (float("inf"), float("-inf")):
                raise QueueError("bad_request", f"{path}: {current} is not a number JSON can hold")
        elif not (current is None or isinstance(current, str | int)):
            raise QueueError(
                "bad_request",
                f"{path}: a {type(current).__name__} is not a JSON value; give str, int, float, bool, None, "
                "list or dict (a datetime as its isoformat())",
            )
    return dict(value)


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


class _Waiter:
    """A call waiting for its answer."""

    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: dict[str, Any] = {}


class _Connection:
    """One socket to the agent, and the calls sent on it that wait for their answers, by id.

    `lock` guards `waiting` and `closed` only, never a socket operation: the reader thread must be able
    to hand answers out while a thread is busy sending (or the agent, waiting for its answers to be
    read, would stop reading what is sent).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.waiting: dict[int, _Waiter] = {}
        self.closed = False

    def wait_for(self, call_id: int, waiter: _Waiter) -> bool:
        """Register a call's waiter; False when the connection closed meanwhile."""
        with self.lock:
            if self.closed:
                return False
            self.waiting[call_id] = waiter
            return True

    def answered(self, call_id: int) -> _Waiter | None:
        with self.lock:
            return self.waiting.pop(call_id, None)

    def close(self) -> list[_Waiter]:
        """Mark it closed; the calls that still wait."""
        with self.lock:
            self.closed = True
            left = list(self.waiting.values())
            self.waiting.clear()
        return left


_CLOSED_ANSWER = {
    "error": {
        "code": "unavailable",
        "message": "the channel to the robot agent closed before it answered; the run may be ending",
    }
}


class _Link:
    """The script's end of its channel: one socket per process, shared by its threads.

    Calls go out one line at a time under `_sending`; a reader thread hands every answer to the call
    with its id, so threads may wait for answers together. A socket the agent closed is opened again
    by the next call.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sending = threading.Lock()
        self._connection: _Connection | None = None
        self._ids = itertools.count(1)

    def call(self, verb: str, body: Mapping[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
        """Send one call and wait for its reply (up to `timeout_s`, CHANNEL_CALL_TIMEOUT_S by default);
        `QueueError` for an error answer (or none)."""
        wait_s = CHANNEL_CALL_TIMEOUT_S if timeout_s is None else timeout_s
        try:
            encoded = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise QueueError("bad_request", f"the {verb} call cannot be written as JSON: {exc}") from None
        waiter = _Waiter()
        with self._sending:
            call_id = next(self._ids)
            line = b'{"id":%d,"verb":%s,"body":%s}\n' % (call_id, json.dumps(verb).encode(), encoded)
            if len(line) > MAX_CHANNEL_LINE_BYTES:
                raise QueueError(
                    "bad_request",
                    f"the {verb} call is {len(line)} bytes, more than the {MAX_CHANNEL_LINE_BYTES} one call may "
                    "carry; send fewer or smaller items at a time",
                )
            connection = self._connected()
            if not connection.wait_for(call_id, waiter):  # it closed just now: once more, on a new one
                connection = self._connected()
                if not connection.wait_for(call_id, waiter):
                    raise _ChannelBroke("unavailable", _CLOSED_ANSWER["error"]["message"])
            try:
                connection.sock.sendall(line)
            except OSError as exc:
                connection.answered(call_id)
                _shut(connection.sock)
                raise _ChannelBroke(
                    "unavailable",
                    f"the channel to the robot agent broke ({exc.strerror or exc}); the run may be ending",
                ) from None
        if not waiter.done.wait(wait_s):
            connection.answered(call_id)
            raise QueueError("unavailable", f"the robot agent did not answer {verb} within {wait_s:g} s")
        if waiter.answer is _CLOSED_ANSWER:
            raise _ChannelBroke("unavailable", _CLOSED_ANSWER["error"]["message"])
        error = waiter.answer.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise QueueError("internal", "the robot agent sent an error this SDK cannot read")
            details = error.get("details")
            raise QueueError(
                str(error.get("code", "internal")),
                str(error.get("message", "the robot agent reported an error")),
                details if isinstance(details, dict) else None,
            )
        reply = waiter.answer.get("reply")
        if not isinstance(reply, dict):
            raise QueueError("internal", f"the robot agent's answer to {verb} holds no reply")
        return reply

    def _connected(self) -> _Connection:
        """The open connection, or a new one (with its reader thread); under `_sending`."""
        if self._connection is not None and not self._connection.closed:
            return self._connection
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CHANNEL_CONNECT_TIMEOUT_S)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise _ChannelBroke(
                "unavailable",
                f"cannot reach the robot agent through its channel {self.path} ({exc.strerror or exc}); "
                "the run may be ending",
            ) from None
        sock.settimeout(None)
        connection = self._connection = _Connection(sock)
        threading.Thread(target=self._read, args=(connection,), name="herder-sdk-channel", daemon=True).start()
        return connection

    def _read(self, connection: _Connection) -> None:
        """Hand each answer to its waiting call until the socket closes; then fail the calls still waiting."""
        try:
            with connection.sock.makefile("rb") as lines:
                for line in lines:
                    try:
                        answer = json.loads(line)
                    except ValueError:
                        continue  # not an answer: nothing to hand to anyone
                    if not isinstance(answer, dict) or not isinstance(answer.get("id"), int):
                        continue  # an answer to no call of this SDK's (its line was unreadable)
                    waiter = connection.answered(answer["id"])
                    if waiter is not None:
                        waiter.answer = answer
                        waiter.done.set()
        except (OSError, ValueError):
            pass
        finally:
            for waiter in connection.close():
                waiter.answer = _CLOSED_ANSWER
                waiter.done.set()
            _shut(connection.sock)  # a sender still on it fails at once, rather than later on a reused descriptor
            with self._sending:
                connection.sock.close()


def _shut(sock: socket.socket) -> None:
    """End a broken socket: its reader thread sees the end and cleans up."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_links: dict[str, _Link] = {}
_links_lock = threading.Lock()


def _link(not_on_robot: str | None = None) -> _Link:
    """The channel to the robot that runs this script; `NotOnRobot` (saying `not_on_robot`) when none does."""
    path = os.environ.get(ENV_CHANNEL)
    if not path:
        raise NotOnRobot(not_on_robot)
    with _links_lock:
        link = _links.get(path)
        if link is None:
            link = _links[path] = _Link(path)
    return link


def _call(link: _Link | None, verb: str, body: dict[str, Any]) -> dict[str, Any]:
    return (link or _link()).call(verb, body)


def _forget_links() -> None:
    """In a forked child: the parent's socket and reader thread are not the child's; it opens its own."""
    global _links_lock
    _links.clear()
    _links_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_links)
