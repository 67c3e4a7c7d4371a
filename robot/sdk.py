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

Only the standard library is imported here: scripts start fast and need nothing else installed.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from datetime import UTC, datetime
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

# The output travels in the job's report over NATS: keep it well inside a message.
MAX_OUTPUT_BYTES = 256 * 1024
# One log record is one line on the log pipe; the runner cuts lines longer than this.
MAX_RECORD_BYTES = 8 * 1024
_MAX_MESSAGE_CHARS = 1024
_MAX_FIELD_CHARS = 256
LEVELS = ("debug", "info", "warning", "error")

__all__ = ["Log", "job_input", "log", "set_output", "should_stop"]


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
