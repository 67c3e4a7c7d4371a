"""`make demo` as a newcomer runs it: `deploy/demo.sh` with the virtualenv's herder, start to finish."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import HERDER, processes_under
from tests.support import wait_until

pytestmark = pytest.mark.e2e


REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "deploy" / "demo.sh"
# Variables of the user's shell that would point the demo's commands elsewhere or lend them a token.
_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_ROBOT_TOKEN", "HERDER_DB")
_BOLD = re.compile(r"\x1b\[[0-9;]*m")


def _section(out: str, command: str, nth: int = 0) -> list[str]:
    """The lines the demo printed after announcing `$ command` (its `nth` time), up to its next step."""
    lines = out.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith(f"$ {command}")][nth]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("$ ")), len(lines))
    return [line for line in lines[start + 1 : end] if line.strip()]


def test_the_demo_runs_every_step_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
    # The demo makes its folder under TMPDIR: here, so that anything it leaves running is found.
    env.update(HERDER=HERDER, TMPDIR=str(tmp_path))
    try:
        done = subprocess.run(["bash", str(DEMO)], cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    finally:
        # Whatever happened, nothing of the demo's may keep running.
        wait_until(lambda: processes_under(tmp_path) == [], timeout=15)
    out = _BOLD.sub("", done.stdout)
    assert done.returncode == 0, out[-4000:] + done.stderr
    assert "demo failed" not in done.stderr

    assert "database  sqlite  ok" in out  # herder status, once the stack is up
    robots = _section(out, "herder robot run")
    assert robots[0].split()[:4] == ["NAME", "TYPE", "HOST", "STATUS"]
    assert robots[1].split()[0] == "demo-robot" and "Available" in robots[1].split()
    for example in ("hello", "rf-hello", "long-task"):
        assert re.search(rf"^published {example} 1\.0\.0 ", out, re.MULTILINE), example

    hello = _section(out, "herder job start hello")
    assert any(line.endswith("stdout Hello, herder!") for line in hello), hello
    # --wait ends with the job's end and then its output.
    assert hello[-2].endswith("Running → Successful (completed)")
    assert hello[-1] == '  output {"greeting": "Hello, herder!"}'
    assert _section(out, "herder job start rf-hello")[-1].endswith("Running → Successful (completed)")

    soft = _section(out, "herder job stop")
    assert soft[0].endswith("Stopping (soft stop asked by admin)")
    assert soft[-1].endswith("end    job Stopped: stopped on request")
    stubborn = _section(out, "herder job stop", nth=1)
    assert stubborn[0].endswith("Stopping (soft stop asked by admin)")
    assert stubborn[1].split() == ["state", "Stopping"]  # the soft stop has not ended it
    killed = _section(out, "herder job kill")
    assert killed[0].endswith("Terminating (hard stop asked by admin)")
    assert killed[1].split() == ["state", "Stopped"] and "hard-stopped" in killed[2]

    table = _section(out, "herder job list")
    assert table[0].split()[:4] == ["ID", "PROCESS", "VERSION", "STATE"]
    jobs = [(row.split()[1], row.split()[3]) for row in table[1:]]
    assert jobs == [
        ("long-task", "Stopped"),
        ("long-task", "Stopped"),
        ("rf-hello", "Successful"),
        ("hello", "Successful"),
    ]
    assert "hard-stopped" in table[1] and "stopped on request" in table[2]

    assert out.rstrip().endswith("stopped; no robot, script or nats-server left behind")
    assert list(tmp_path.iterdir()) == []  # the demo removed its folder
