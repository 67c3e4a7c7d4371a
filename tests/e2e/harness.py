"""What the end-to-end tests share: running the `herder` command, judging its errors, a `herder up`
stack as a subprocess, and finding the processes a test left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import wait_until

HERDER = str(Path(sys.executable).parent / "herder")


def herder(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `herder` command and capture what it printed."""
    return subprocess.run(
        [HERDER, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def _is_log_event(line: str) -> bool:
    try:
        return "event" in json.loads(line)
    except ValueError:
        return False


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str, logs: bool = False) -> str:
    """A failure a user sees: non-zero exit, one line on stderr naming the cause, no traceback.

    With `logs`, a service process may have written structured log events (JSON) before it.
    """
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    if logs:
        lines = [line for line in lines if not _is_log_event(line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("herder: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def processes_under(root: Path) -> list[int]:
    """Processes whose command line mentions `root`, or that run in a folder under it (job scripts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(root) in cmdline or cwd == str(root) or cwd.startswith(f"{root}/"):
            found.append(int(entry.name))
    return found


@dataclass
class Up:
    """A `herder up` running as a subprocess."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment that points commands at this stack."""
        return {"HERDER_DATA_DIR": str(self.data_dir)}

    def nats_pid(self) -> int:
        """The pid of the stack's bundled nats-server (from the ports file it writes)."""
        ports = list((self.data_dir / "nats" / "ports").glob("*.ports"))
        assert len(ports) == 1, ports
        return int(ports[0].stem.rsplit("_", 1)[1])


@contextmanager
def running_up(folder: Path, *options: str) -> Iterator[Up]:
    """`herder up` on a free port with its data in `folder` (and `options`), ready; stopped (SIGTERM)
    afterwards."""
    data_dir = folder / "stack"
    log = folder / "up.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [HERDER, "up", "--data-dir", str(data_dir), "--port", "0", "--log-format", "json", *options],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    stack = Up(process=process, data_dir=data_dir, log=log)

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        context = data_dir / "context.json"
        return context.exists() and json.loads(context.read_text()).get("pid") == process.pid

    try:
        wait_until(ready, timeout=60)
        yield stack
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
