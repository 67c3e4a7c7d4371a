"""The verifier station as people run it, through the CLI alone: a `herder up` stack, queues made and
filled with `herder queue`, an unattended robot agent checking invoices, and `herder robot run DESK
--run verify` on an attended robot deciding the doubtful ones by hand (examples/verifier/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import HERDER, Up, assert_one_line_error, running_up
from tests.support import wait_until

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_ROBOT_TOKEN", "HERDER_BUNDLE")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One `herder up` for the module, with both processes of the example published."""
    with running_up(tmp_path_factory.mktemp("verifier")) as up:
        for process in ("invoices", "verify"):
            published = run_herder(up, "package", "publish", str(EXAMPLES / "verifier" / process))
            assert published.returncode == 0, published.stderr
        yield up


def run_herder(up: Up, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The `herder` command against the stack, as a user at a terminal of their own would run it."""
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
    return subprocess.run(
        [HERDER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, **up.env},
        stdin=subprocess.DEVNULL,
    )


def succeeds(up: Up, *args: str) -> str:
    """What a command that must succeed printed."""
    done = run_herder(up, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_robot(up: Up, name: str, kind: str, folder: Path) -> Path:
    """`herder robot add NAME --type KIND --save-token FILE`; the token's file."""
    token = folder / f"{name}.token"
    added = run_herder(up, "robot", "add", name, "--type", kind, "--host", f"h-{name}", "--save-token", str(token))
    assert added.returncode == 0, added.stderr
    return token


def robot_run(up: Up, name: str, token: Path, work: Path, *extra: str) -> list[str]:
    return ["robot", "run", name, "--token-file", str(token), "--heartbeat", "0.5", "--work-dir", str(work), *extra]


class Agent:
    """`herder robot run NAME` in the background, until the test ends."""

    def __init__(self, up: Up, name: str, token: Path, folder: Path) -> None:
        self.name = name
        self.log = folder / f"{name}.agent.log"
        env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [HERDER, *robot_run(up, name, token, folder / name), "--log-format", "json"],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**env, **up.env},
            )
        wait_until(self._connected, timeout=30)

    def _connected(self) -> bool:
        text = self.log.read_text(errors="replace")
        assert self.process.poll() is None, text
        return f"robot {self.name} (" in text and "is connected" in text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def queue_states(up: Up, queue: str) -> dict[str, tuple[str, Any]]:
    """`herder queue items QUEUE --json`: each item's state and output (or reason), by reference."""
    items = json.loads(succeeds(up, "queue", "items", queue, "--json"))
    return {item["reference"] or item["id"]: (item["state"], item["output"] or item["reason"]) for item in items}


def test_an_attended_robot_decides_by_hand_what_the_unattended_one_doubted(
    stack: Up, tmp_path: Path, agents: list[Agent]
) -> None:
    for queue in ("invoices", "invoices-verify"):
        succeeds(stack, "queue", "create", queue)
    invoices: list[dict[str, Any]] = [
        {"number": "INV-1", "supplier": "ACME", "amount": 120.0},
        {"number": "INV-2", "supplier": "ACME", "amount": 50_000},
        {"number": "INV-3", "supplier": "Unknown Ltd", "amount": 80},
    ]
    for invoice in invoices:
        succeeds(stack, "queue", "add", "invoices", "--reference", invoice["number"], "--content", json.dumps(invoice))

    agents.append(Agent(stack, "checker", add_robot(stack, "checker", "unattended", tmp_path), tmp_path))
    succeeds(stack, "job", "start", "invoices", "--robot", "checker", "--wait")
    assert set(queue_states(stack, "invoices-verify")) == {"INV-2", "INV-3"}

    desk = add_robot(stack, "desk", "attended", tmp_path)
    decide = json.dumps({"decide": {"INV-2": "reject", "*": "approve"}})
    verified = run_herder(
        stack, *robot_run(stack, "desk", desk, tmp_path / "desk", "--run", "verify", "--input", decide)
    )
    assert verified.returncode == 0, verified.stderr
    # The script's own prints come on the terminal; its output is the last line of stdout.
    stdout = verified.stdout.strip().splitlines()
    assert "Nothing left to verify." in stdout
    assert json.loads(stdout[-1]) == {"approved": 1, "rejected": 1, "skipped": 0}
    assert "verify.decided" in verified.stderr
    assert verified.stderr.strip().splitlines()[-1].startswith("verify 1.0.0 ended Successful")
    assert "Traceback" not in verified.stderr

    states = queue_states(stack, "invoices-verify")
    assert states["INV-2"] == ("Failed", "decided by the job's input")
    assert states["INV-3"][0] == "Successful" and states["INV-3"][1]["decision"] == "approved"
    shown = json.loads(run_herder(stack, "robot", "show", "desk", "--json").stdout)
    assert shown["status"] == "Disconnected"  # it said goodbye

    # Nothing is left to verify: the run succeeds with nothing done.
    again = run_herder(stack, *robot_run(stack, "desk", desk, tmp_path / "desk", "--run", "verify", "--input", decide))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"approved": 0, "rejected": 0, "skipped": 0}


def test_an_unattended_robot_runs_nothing_by_hand(stack: Up, tmp_path: Path) -> None:
    token = add_robot(stack, "worker", "unattended", tmp_path)
    refused = run_herder(stack, *robot_run(stack, "worker", token, tmp_path / "w", "--run", "verify"))
    assert_one_line_error(
        refused, "robot worker is unattended: herder starts its jobs", "herder job start PROCESS --robot worker"
    )


def test_a_run_by_hand_waits_for_no_agent_of_the_same_robot(stack: Up, tmp_path: Path, agents: list[Agent]) -> None:
    token = add_robot(stack, "desk2", "attended", tmp_path)
    agents.append(Agent(stack, "desk2", token, tmp_path))
    both = run_herder(stack, *robot_run(stack, "desk2", token, tmp_path / "desk2", "--run", "verify"))
    assert_one_line_error(both, f"robot desk2 runs already from {tmp_path / 'desk2'}", "stop that agent first")
    assert agents[0].process.poll() is None  # the agent that was there goes on


def test_run_options_without_run_are_a_usage_error(stack: Up) -> None:
    wrong = run_herder(stack, "robot", "run", "desk", "--version", "1.0.0")
    assert wrong.returncode == 2
    assert_one_line_error(wrong, "--version and --input go with --run PROCESS")
