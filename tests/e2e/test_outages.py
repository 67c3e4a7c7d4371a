"""Real outages: the whole stack goes down while robots run jobs, and comes back.

For each database, four stacks run side by side (they mostly wait): each is killed with SIGKILL or
stopped with SIGTERM, stays down 20 s or 60 s, and is started again on the same data folder and
port, while three real robots run jobs through it — one that asks to fault when its robot is lost,
two that ask to be re-queued, ending before, during and after the outage. Afterwards every job has
the outcome its robot really had (Successful), no job ran twice (each script writes a marker line
when it starts), the robots reconnected by themselves, and each job's log holds every line once, in
order, however much of it was spooled on the robot while herder was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from herder.client.connection import Credentials, connect
from herder.client.requests import Client
from herder.protocol.jobs import JobListRequest
from herder.protocol.messages import Model
from herder.protocol.registry import RobotListRequest
from tests.e2e.harness import HERDER, herder, processes_under
from tests.support import connect_postgres, wait_until

# Four stacks of seven service processes each, outages of up to 60 s: more than the suite's 180 s a
# test may take on a busy 2-core machine.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

HEARTBEAT_S = "0.5"
# Scripts print a step every PAUSE_S seconds.
PAUSE_S = 0.5
READY_TIMEOUT_S = 60.0
FINAL = ("Successful", "Faulted", "Stopped")
POLL_S = 0.5
_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_ROBOT_TOKEN", "HERDER_DB", "HERDER_BUNDLE")

STEPS = """\
import os
import time


def main(data):
    with open(data["marker"], "a") as marker:
        marker.write(f"{os.environ['HERDER_JOB_ID']} {os.environ['HERDER_JOB_ATTEMPT']}\\n")
    for step in range(data["steps"]):
        print(f"step {step}", flush=True)
        time.sleep(data["pause"])
    return {"steps": data["steps"]}
"""


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in _FOREIGN}, **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Scenario:
    """One stack, its robots and its jobs, through one outage."""

    name: str
    root: Path
    how: signal.Signals
    down_s: float
    db: str | None
    port: int = field(default_factory=_free_port)
    up: subprocess.Popen[bytes] | None = None
    robots: list[subprocess.Popen[bytes]] = field(default_factory=list)
    restarts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "stack"

    def env(self, **extra: str) -> dict[str, str]:
        return _env(HERDER_DATA_DIR=str(self.data_dir), **extra)

    def cli(self, *args: str) -> Any:
        result = herder(*args, "--json", env=self.env())
        assert result.returncode == 0, f"{self.name}: herder {' '.join(args)}: {result.stderr}"
        return json.loads(result.stdout)

    def listed(self, what: str) -> list[dict[str, Any]]:
        """The stack's robots or jobs (`what`), as `herder … list --json` shows them. Asked through
        herder's client, not the CLI: a process per poll would take the CPU the scenarios share."""
        context = json.loads((self.data_dir / "context.json").read_text())

        async def ask() -> list[dict[str, Any]]:
            token = context["token"]
            nc = await connect(context["nats_url"], name="outage-probe", credentials=Credentials(token=token))
            try:
                client = Client(nc, token=token)
                if what == "robots":
                    found: list[Model] = list((await client.request(RobotListRequest())).robots)
                else:
                    found = list((await client.request(JobListRequest())).jobs)
                return [item.model_dump(mode="json") for item in found]
            finally:
                await nc.close()

        return asyncio.run(ask())

    def start_up(self) -> None:
        options = ["--db", self.db] if self.db else []
        log = open(self.root / f"up-{self.restarts}.log", "wb")  # noqa: SIM115 - the child writes to it
        self.up = subprocess.Popen(
            [HERDER, "up", "--port", str(self.port), "--log-format", "json", *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        log.close()
        self.restarts += 1
        up = self.up

        def ready() -> bool:
            assert up.poll() is None, (self.root / f"up-{self.restarts - 1}.log").read_text()[-3000:]
            context = self.data_dir / "context.json"
            return context.exists() and json.loads(context.read_text()).get("pid") == up.pid

        wait_until(ready, timeout=READY_TIMEOUT_S)

    def start_robot(self, name: str) -> None:
        token_file = self.root / f"{name}.token"
        self.cli("robot", "add", name, "--type", "unattended", "--host", "box1", "--group", "pool",
                 "--save-token", str(token_file))  # fmt: skip
        log = open(self.root / f"robot-{name}.log", "wb")  # noqa: SIM115 - the child writes to it
        self.robots.append(
            subprocess.Popen(
                [HERDER, "robot", "run", name, "--token-file", str(token_file), "--heartbeat", HEARTBEAT_S,
                 "--work-dir", str(self.root / "robots" / name), "--log-format", "json"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
            )
        )  # fmt: skip
        log.close()

    def stop(self) -> None:
        for process in [*self.robots, self.up]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.robots, self.up]:
            if process is not None:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _package(root: Path) -> Path:
    folder = root / "steps"
    folder.mkdir()
    (folder / "herder.toml").write_text('name = "steps"\nversion = "1.0.0"\n\n[entry]\npython = "main:main"\n')
    (folder / "main.py").write_text(textwrap.dedent(STEPS))
    return folder


def run_through_an_outage(scenario: Scenario) -> dict[str, Any]:
    """The whole story of one scenario; what a test asserts on."""
    scenario.root.mkdir(parents=True)
    scenario.start_up()
    scenario.cli("package", "publish", str(_package(scenario.root)))
    for name in ("r1", "r2", "r3"):
        scenario.start_robot(name)
    wait_until(
        lambda: all(r["status"] == "Available" for r in scenario.listed("robots")) and len(scenario.robots) == 3,
        timeout=READY_TIMEOUT_S,
        interval=POLL_S,
    )
    marker = scenario.root / "marker"
    down = scenario.down_s
    plans = {  # robot -> (policy, steps): ends before the outage is over, during it, and after it
        "r1": ("fault", int(down / PAUSE_S / 2)),
        "r2": ("requeue", int((down + 10) / PAUSE_S)),
        "r3": ("requeue", int(down / PAUSE_S / 3)),
    }
    jobs: dict[str, str] = {}
    for robot, (policy, steps) in plans.items():
        data = json.dumps({"marker": str(marker), "steps": steps, "pause": PAUSE_S})
        options = ["--requeue"] if policy == "requeue" else []
        job = scenario.cli("job", "start", "steps", "--robot", robot, "--input", data, *options)
        jobs[robot] = job["id"]
    wait_until(lambda: len(marker.read_text().splitlines()) == 3 if marker.exists() else False, timeout=30)

    assert scenario.up is not None
    scenario.up.send_signal(scenario.how)
    scenario.up.wait(30)
    # Its nats-server goes with it (herder up's child dies with it, however it ended).
    wait_until(lambda: processes_under(scenario.data_dir) == [], timeout=15)
    time.sleep(down)  # the outage itself: nothing to wait for but time
    scenario.start_up()

    def shown() -> list[dict[str, Any]]:
        listed = {job["id"]: job for job in scenario.listed("jobs")}
        return [listed[job_id] for job_id in jobs.values()]

    def settled() -> bool:
        # Ended, and by the robot's own word: "robot lost" is what herder says without it.
        return all(job["state"] in FINAL and not job["reason"].startswith("robot lost") for job in shown())

    with contextlib.suppress(AssertionError):  # what was recorded instead is asserted below
        wait_until(settled, timeout=down + 90, interval=POLL_S)
    ended = shown()
    wait_until(
        lambda: all(r["status"] in ("Available", "Busy") for r in scenario.listed("robots")),
        timeout=60,
        interval=POLL_S,
    )
    logs = {robot: _log_lines(scenario, job_id) for robot, job_id in jobs.items()}
    result = {
        "jobs": {job["robot"]: job for job in ended},
        "plans": plans,
        "markers": marker.read_text().splitlines(),
        "logs": logs,
        "robots_alive": all(process.poll() is None for process in scenario.robots),
        "robot_logs": [(scenario.root / f"robot-{name}.log").read_text() for name in plans],
    }
    scenario.stop()
    return result


def _log_lines(scenario: Scenario, job_id: str) -> list[dict[str, Any]]:
    result = herder("job", "logs", job_id, "--json", env=scenario.env())
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def databases(request: pytest.FixtureRequest) -> Iterator[list[str | None]]:
    """For each of the four scenarios: None (the stack's own SQLite), or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield [None] * 4
        return
    postgres = connect_postgres()  # skips on a laptop without PostgreSQL, fails in CI
    names = [f"herder_outage_{uuid.uuid4().hex[:8]}" for _ in range(4)]
    for name in names:
        postgres.create(name)
    try:
        yield [postgres.url_of(name) for name in names]
    finally:
        for name in names:
            postgres.drop(name)
        postgres.close()


def test_outages_never_rewrite_an_outcome_run_a_job_twice_or_lose_a_line(
    databases: list[str | None], tmp_path: Path
) -> None:
    scenarios = [
        Scenario(
            name=f"{how.name}-{down_s:g}s", root=tmp_path / f"{how.name}-{down_s:g}s", how=how, down_s=down_s, db=db
        )
        for (how, down_s), db in zip(
            [(signal.SIGKILL, 20.0), (signal.SIGKILL, 60.0), (signal.SIGTERM, 20.0), (signal.SIGTERM, 60.0)],
            databases,
            strict=True,
        )
    ]
    try:
        with ThreadPoolExecutor(max_workers=len(scenarios)) as pool:
            results = dict(zip((s.name for s in scenarios), pool.map(run_through_an_outage, scenarios), strict=True))
    finally:
        for scenario in scenarios:
            scenario.stop()
    for name, result in results.items():
        for robot, job in result["jobs"].items():
            # The outcome its robot really had: every script ran its steps to the end.
            assert job["state"] == "Successful", f"{name} {robot}: {job['state']} ({job['reason']})"
            assert job["attempt"] == 1, f"{name} {robot}: ran again as attempt {job['attempt']}"
            assert job["output"] == {"steps": result["plans"][robot][1]}
        # No job ran twice: one marker line each, of attempt 1.
        assert sorted(result["markers"]) == sorted(f"{job['id']} 1" for job in result["jobs"].values()), name
        assert result["robots_alive"], f"{name}: a robot did not ride out the outage"
        for robot_log in result["robot_logs"]:
            # Each robot said at once that it was cut off, and then each retry.
            assert '"robot.cut_off"' in robot_log and '"robot.reconnecting"' in robot_log, robot_log[-2000:]
        for robot, records in result["logs"].items():
            steps = [r["message"] for r in records if r["stream"] == "stdout"]
            assert steps == [f"step {n}" for n in range(result["plans"][robot][1])], f"{name} {robot}: {steps}"
            seqs = [r["seq"] for r in records if r["stream"] != "end"]
            assert seqs == sorted(set(seqs)), f"{name} {robot}: lines twice or out of order: {seqs}"
            assert [r["stream"] for r in records].count("end") == 1
