"""`herder robot` and `herder job` as a user runs them: a `herder up` stack and `herder robot run` agents
as subprocesses, driven through the CLI alone.

One stack serves the module; every test registers robots of its own (agents run one job at a time, and a
test's jobs never land on another test's robot), so the tests do not depend on each other's jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import HERDER, assert_one_line_error, processes_under
from tests.support import wait_until

pytestmark = pytest.mark.e2e


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# A CLI call costs a few tenths of a second: polling faster than this only loads the machine.
POLL_S = 0.3
HEARTBEAT_S = "0.5"
# Variables of the user's shell that would point the CLI elsewhere or lend it a token.
_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_ROBOT_TOKEN", "HERDER_DB")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
    env.update(extra)
    return env


def parsed(result: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a successful `--json` command printed on stdout."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stop_process(process: subprocess.Popen[Any], timeout: float = 20) -> int:
    """SIGTERM (what Ctrl-C and systemd do), then SIGKILL if it does not go; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class Stack:
    """A `herder up` running as a subprocess, and the CLI pointed at it."""

    process: subprocess.Popen[bytes]
    root: Path
    log: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "stack"

    @property
    def env(self) -> dict[str, str]:
        return _clean_env(HERDER_DATA_DIR=str(self.data_dir))

    def herder(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run one CLI command against this stack."""
        return subprocess.run(
            [HERDER, *args], capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})}
        )

    def robot(self, name: str) -> dict[str, Any]:
        return parsed(self.herder("robot", "show", name, "--json"))  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return parsed(self.herder("job", "show", job_id, "--json"))  # type: ignore[no-any-return]

    def wait_robot(self, name: str, status: str, timeout: float = 30) -> dict[str, Any]:
        return wait_until(lambda: (r := self.robot(name))["status"] == status and r, timeout=timeout, interval=POLL_S)

    def wait_job(self, job_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
        return wait_until(lambda: (j := self.job(job_id))["state"] == state and j, timeout=timeout, interval=POLL_S)

    def start_job(self, *args: str) -> dict[str, Any]:
        """`herder job start ARGS --json`, without waiting: the job as created."""
        return parsed(self.herder("job", "start", *args, "--json"))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("jobs-e2e")
    log = root / "up.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [HERDER, "up", "--data-dir", str(root / "stack"), "--port", "0", "--log-format", "json"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
        )
    started = Stack(process=process, root=root, log=log)

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        context = started.data_dir / "context.json"
        return context.exists() and json.loads(context.read_text()).get("pid") == process.pid

    try:
        wait_until(ready, timeout=60)
        for example in ("hello", "long-task"):
            published = started.herder("package", "publish", str(EXAMPLES / example))
            assert published.returncode == 0, published.stderr
        yield started
    finally:
        assert stop_process(process, timeout=30) == 0, log.read_text()[-2000:]
        # No nats-server, robot agent or job script of this module outlives it.
        wait_until(lambda: processes_under(root) == [], timeout=15)


@dataclass
class Agent:
    """A `herder robot run` running as a subprocess."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    """Robots one test registers and runs; their agents stop when the test ends."""

    stack: Stack
    folder: Path
    agents: list[Agent] = field(default_factory=list)

    def add(self, name: str, *extra: str) -> Path:
        """`herder robot add NAME --type unattended --host h-NAME EXTRA --save-token FILE`; the file."""
        token_file = self.folder / f"{name}.token"
        added = self.stack.herder(
            "robot", "add", name, "--type", "unattended", "--host", f"h-{name}", *extra, "--save-token", str(token_file)
        )
        assert added.returncode == 0, added.stderr
        return token_file

    def start(self, name: str, token_file: Path | None = None, *, env: dict[str, str] | None = None) -> Agent:
        """`herder robot run NAME` in the background, without waiting for it to connect."""
        log = self.folder / f"{name}.agent.log"
        args = [HERDER, "robot", "run", name, "--heartbeat", HEARTBEAT_S, "--work-dir", str(self.folder / name)]
        if token_file is not None:
            args += ["--token-file", str(token_file)]
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [*args, "--log-format", "json"],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**self.stack.env, **(env or {})},
            )
        agent = Agent(name=name, process=process, log=log)
        self.agents.append(agent)
        return agent

    def connected(self, agent: Agent) -> Agent:
        """Wait until the agent says it is connected (it listens for commands by then)."""

        def said_so() -> bool:
            assert agent.process.poll() is None, agent.output()
            return f"robot {agent.name} (unattended" in agent.output()

        wait_until(said_so, timeout=30)
        return agent

    def run(self, name: str, *extra: str) -> Agent:
        """A registered, connected robot of its own."""
        return self.connected(self.start(name, self.add(name, *extra)))

    def stop_all(self) -> None:
        for agent in self.agents:
            stop_process(agent.process)


@pytest.fixture
def fleet(up: Stack, tmp_path: Path) -> Iterator[Fleet]:
    # The agents' folders live under the stack's root, so the module's leftover check sees their scripts.
    folder = up.root / tmp_path.name
    folder.mkdir()
    robots = Fleet(stack=up, folder=folder)
    try:
        yield robots
    finally:
        robots.stop_all()


def _log_records(up: Stack, job_id: str) -> list[dict[str, Any]]:
    result = up.herder("job", "logs", job_id, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _steps(records: list[dict[str, Any]]) -> int:
    return sum(1 for record in records if record["message"] == "long_task.step")


# --- robots ---


def test_robots_are_added_listed_shown_and_come_online_when_run(up: Stack, fleet: Fleet) -> None:
    token_file = fleet.folder / "ra-one.token"
    added = up.herder(
        "robot", "add", "ra-one", "--type", "unattended", "--host", "ts01", "--group", "ra-pool",
        "--group", "ra-night", "--save-token", str(token_file),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert token_file.stat().st_mode & 0o777 == 0o600
    secret = token_file.read_text().strip()
    assert secret.startswith("hd_")
    assert secret not in added.stdout + added.stderr
    assert f"--token-file {token_file}" in added.stdout
    assert "added unattended robot ra-one on host ts01 in ra-night, ra-pool" in added.stderr

    # Without --save-token the token is printed once, on stdout alone, so `> file` captures it.
    printed = up.herder("robot", "add", "ra-two", "--type", "unattended", "--host", "ts01")
    assert printed.returncode == 0, printed.stderr
    token = printed.stdout.strip()
    assert token.startswith("hd_") and printed.stdout.splitlines() == [token]
    assert token not in printed.stderr and "hd_" not in printed.stderr
    assert "HERDER_ROBOT_TOKEN" in printed.stderr

    table = up.herder("robot", "list")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("ra-one "))
    assert row.split()[:5] == ["ra-one", "unattended", "ts01", "Disconnected", "never"]
    assert "ra-night, ra-pool" in row
    listed = {robot["name"]: robot for robot in parsed(up.herder("robot", "list", "--json"))}
    assert (listed["ra-one"]["type"], listed["ra-one"]["host"]) == ("unattended", "ts01")
    assert (listed["ra-one"]["groups"], listed["ra-one"]["status"]) == (["ra-night", "ra-pool"], "Disconnected")
    assert listed["ra-two"]["groups"] == []
    in_pool = parsed(up.herder("robot", "list", "--group", "ra-pool", "--json"))
    assert [robot["name"] for robot in in_pool] == ["ra-one"]
    shown = up.robot("ra-one")
    assert (shown["status"], shown["last_heartbeat"], shown["agent_version"]) == ("Disconnected", None, None)

    one = fleet.start("ra-one", token_file)
    two = fleet.start("ra-two", env={"HERDER_ROBOT_TOKEN": token})  # the other way to give the token
    online = up.wait_robot("ra-one", "Available")
    assert online["heartbeat_interval_s"] == float(HEARTBEAT_S)
    assert online["last_heartbeat"] is not None and online["agent_version"]
    up.wait_robot("ra-two", "Available")
    text = up.herder("robot", "show", "ra-one")
    assert text.returncode == 0, text.stderr
    fields = {line[:16].strip(): line[17:] for line in text.stdout.splitlines()}
    assert (fields["type"], fields["host"], fields["groups"]) == ("unattended", "ts01", "ra-night, ra-pool")
    assert fields["status"].startswith("Available since ") and fields["heartbeat every"] == "0.5 s"
    assert "is connected to" in fleet.connected(one).output()

    # Ctrl-C or SIGTERM: the agent says goodbye and exits 0; the robot is Disconnected at once, not after
    # missed heartbeats.
    assert stop_process(one.process) == 0, one.output()
    assert "robot ra-one is stopping" in one.output()
    up.wait_robot("ra-one", "Disconnected", timeout=10)
    assert stop_process(two.process) == 0, two.output()
    up.wait_robot("ra-two", "Disconnected", timeout=10)

    removed = up.herder("robot", "remove", "ra-two")
    assert (removed.returncode, removed.stdout.strip()) == (0, "removed robot ra-two"), removed.stderr
    assert_one_line_error(up.herder("robot", "show", "ra-two"), "no robot named 'ra-two'", "[not_found]")


def test_robot_add_and_remove_refusals(up: Stack, fleet: Fleet) -> None:
    fleet.add("rr-taken")
    assert_one_line_error(
        up.herder("robot", "add", "rr-taken", "--type", "unattended", "--host", "h"),
        "already has a robot named 'rr-taken'",
        "[conflict]",
    )
    existing = fleet.folder / "rr-taken.token"
    assert_one_line_error(
        up.herder("robot", "add", "rr-new", "--type", "unattended", "--host", "h", "--save-token", str(existing)),
        f"{existing} exists already",
    )
    assert_one_line_error(
        up.herder("robot", "add", "rr-dotted", "--type", "unattended", "--host", "ts01.corp.local"),
        "host",
        "[bad_request]",
    )
    assert_one_line_error(
        up.herder("robot", "add", "rr bad", "--type", "unattended", "--host", "h"), "name", "[bad_request]"
    )
    assert_one_line_error(up.herder("robot", "remove", "rr-nobody"), "no robot named 'rr-nobody'", "[not_found]")
    names = [robot["name"] for robot in parsed(up.herder("robot", "list", "--json"))]
    assert "rr-dotted" not in names and "rr-new" not in names and "rr bad" not in names


def test_robot_run_refuses_missing_wrong_and_command_line_tokens(up: Stack, fleet: Fleet) -> None:
    fleet.add("rt-robot")
    work = ["--work-dir", str(fleet.folder / "rt-robot")]

    missing = up.herder("robot", "run", "rt-robot", *work)
    assert_one_line_error(missing, "--token-file", "HERDER_ROBOT_TOKEN", "herder robot add")

    wrong = fleet.folder / "wrong.token"
    wrong.write_text("hd_not-the-robots-token\n")
    for result in (
        up.herder("robot", "run", "rt-robot", "--token-file", str(wrong), *work),
        up.herder("robot", "run", "rt-robot", *work, env={"HERDER_ROBOT_TOKEN": "hd_not-the-robots-token"}),
    ):
        assert_one_line_error(result, "[unauthenticated]")
        assert "hd_not-the-robots-token" not in result.stderr
    empty = fleet.folder / "empty.token"
    empty.write_text("\n")
    assert_one_line_error(up.herder("robot", "run", "rt-robot", "--token-file", str(empty), *work), "is empty")

    for args in (["--token", "hd_x"], ["--token=hd_x"]):
        leaked = up.herder("robot", "run", "rt-robot", *args, *work)
        assert leaked.returncode == 2
        assert_one_line_error(leaked, "tokens are not taken on the command line", "--token-file")
        assert "hd_x" not in leaked.stderr + leaked.stdout
    # None of these attempts connected it.
    assert up.robot("rt-robot")["status"] == "Disconnected"


@pytest.mark.parametrize("how", ["wrong-token", "token-option"])
def test_robot_run_errors_name_the_robot_token_variable(up: Stack, fleet: Fleet, how: str) -> None:
    fleet.add(f"rv-{how}")
    wrong = fleet.folder / "wrong.token"
    wrong.write_text("hd_wrong\n")
    args = ["--token-file", str(wrong)] if how == "wrong-token" else ["--token", "hd_wrong"]
    line = assert_one_line_error(up.herder("robot", "run", f"rv-{how}", *args))
    assert "HERDER_ROBOT_TOKEN" in line
    assert "HERDER_TOKEN" not in line.replace("HERDER_ROBOT_TOKEN", "")


def test_a_token_file_that_cannot_be_written_registers_nothing(up: Stack, fleet: Fleet) -> None:
    unwritable = fleet.folder / "no-such-folder" / "rw.token"
    assert_one_line_error(
        up.herder("robot", "add", "rw-lost", "--type", "unattended", "--host", "h", "--save-token", str(unwritable)),
        str(unwritable),
    )
    # The user fixes the path and tries again; that must work.
    again = up.herder(
        "robot", "add", "rw-lost", "--type", "unattended", "--host", "h", "--save-token", str(fleet.folder / "rw.token")
    )
    assert again.returncode == 0, again.stderr


def test_another_robots_token_is_refused(up: Stack, fleet: Fleet) -> None:
    token_file = fleet.add("ri-real")
    impostor = fleet.start("ri-impostor", token_file)

    def settled() -> bool:
        return impostor.process.poll() is not None or "is connected to" in impostor.output()

    wait_until(settled, timeout=30)
    assert impostor.process.poll() is not None, f"it runs: {impostor.output()}"
    # The expected refusal: one line on stderr saying whose token it is, no JSON log events around it.
    lines = [line for line in impostor.output().splitlines() if not line.startswith("{")]
    assert impostor.process.returncode != 0 and len(lines) == 1, impostor.output()
    assert lines[0].startswith("herder: ") and ("ri-impostor" in lines[0] or "ri-real" in lines[0]), lines[0]
    assert up.robot("ri-real")["status"] == "Disconnected"


@pytest.mark.parametrize(
    "args",
    [
        ["robot", "add", "rx-dotted", "--type", "unattended", "--host", "ts01.corp.local"],
        ["robot", "add", "rx bad", "--type", "unattended", "--host", "h"],
        ["job", "show", "zzzz"],
    ],
    ids=["dotted-host", "bad-name", "bad-job-id"],
)
def test_argument_errors_are_said_in_words(up: Stack, args: list[str]) -> None:
    line = assert_one_line_error(up.herder(*args), "[bad_request]")
    assert "should match pattern" not in line and "invalid RobotAdd" not in line and "invalid JobShow" not in line


# --- jobs ---


def test_hello_runs_to_successful_with_its_states_logs_and_output(up: Stack, fleet: Fleet) -> None:
    fleet.run("rj-hello")
    waited = up.herder("job", "start", "hello", "--robot", "rj-hello", "--input", '{"name": "Ada"}', "--wait")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    out = waited.stdout
    lines = out.splitlines()
    first = lines[0]
    assert first.startswith("job ") and " hello 1.0.0: " in first
    job_id = first.split()[1]
    # Each state once: the start line says Running, or Pending and then the change to Running.
    states = [line for line in lines if line.startswith(f"job {job_id[:12]}")]
    assert sum("Running on robot rj-hello" in line for line in states) == 1, out
    assert first.endswith(": Running on robot rj-hello") or "Pending → Running on robot rj-hello" in out, out
    assert "Running → Successful (completed)" in out
    assert "Hello, Ada!" in out and "hello.greeting name=Ada" in out
    assert out.index("Running on robot rj-hello") < out.index("Hello, Ada!") < out.index("→ Successful")
    # Last, what the job left.
    assert lines[-1] == '  output {"greeting": "Hello, Ada!"}', out

    as_json = up.herder(
        "job", "start", "hello", "--robot", "rj-hello", "--input", '{"name": "Ada"}', "--wait", "--json"
    )
    job = parsed(as_json)  # stdout is the final job alone; the states and lines went to stderr
    assert (job["state"], job["output"], job["robot"]) == ("Successful", {"greeting": "Hello, Ada!"}, "rj-hello")
    assert job["input"] == {"name": "Ada"} and job["error"] is None
    assert "→ Successful" in as_json.stderr and "Hello, Ada!" in as_json.stderr
    assert "  output " not in as_json.stderr  # the output is in the job printed

    shown = up.herder("job", "show", job_id[:8])
    assert shown.returncode == 0, shown.stderr
    fields = {line[:14].strip(): line[15:] for line in shown.stdout.splitlines()}
    assert fields["id"] == job_id
    assert (fields["state"], fields["reason"]) == ("Successful", "completed")
    assert fields["robot"] == "rj-hello on host h-rj-hello"
    assert json.loads(fields["output"]) == {"greeting": "Hello, Ada!"}

    table = up.herder("job", "list", "--robot", "rj-hello")
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    # Newest first: the --json run, then the text one.
    assert [row[:5] for row in rows] == [
        [newest[:12], "hello", "1.0.0", "Successful", "rj-hello"] for newest in (job["id"], job_id)
    ]
    successful = parsed(up.herder("job", "list", "--state", "Successful", "--json"))
    assert {job_id, job["id"]} <= {entry["id"] for entry in successful}
    assert {entry["state"] for entry in successful} == {"Successful"}

    assert_one_line_error(up.herder("job", "stop", job_id), "already ended (Successful)", "[conflict]")
    assert_one_line_error(up.herder("job", "kill", job_id[:8]), "already ended", "[conflict]")
    assert_one_line_error(up.herder("job", "show", "0000"), "no job 0000", "[not_found]")
    assert_one_line_error(up.herder("job", "logs", "0000"), "no job 0000", "[not_found]")


def test_a_failing_script_faults_and_says_why(up: Stack, fleet: Fleet, tmp_path: Path) -> None:
    folder = tmp_path / "failing"
    folder.mkdir()
    (folder / "herder.toml").write_text('name = "failing"\nversion = "1.0.0"\n[entry]\npython = "main:main"\n')
    (folder / "main.py").write_text('def main() -> None:\n    raise ValueError("bad")\n')
    assert up.herder("package", "publish", str(folder)).returncode == 0
    fleet.run("rj-failing")

    waited = up.herder("job", "start", "failing", "--robot", "rj-failing", "--wait")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "Running → Faulted (ValueError: bad)" in waited.stdout
    assert 'raise ValueError("bad")' in waited.stdout  # the script's traceback, from its stderr
    assert waited.stdout.splitlines()[-1] == "  error ValueError: bad", waited.stdout
    assert "  output " not in waited.stdout  # a Faulted job has none
    job_id = waited.stdout.split()[1]
    job = up.job(job_id)
    assert (job["state"], job["error"], job["output"]) == ("Faulted", "ValueError: bad", None)
    shown = up.herder("job", "show", job_id)
    assert "error          ValueError: bad" in shown.stdout.splitlines()

    as_json = up.herder("job", "start", "failing", "--robot", "rj-failing", "--wait", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["state"] == "Faulted"


def test_job_start_refusals(up: Stack, fleet: Fleet) -> None:
    fleet.add("rs-robot")
    assert_one_line_error(
        up.herder("job", "start", "hello", "--robot", "rs-robot", "--input", "not json"),
        "--input: not valid JSON",
        "[bad_request]",
    )
    assert_one_line_error(
        up.herder("job", "start", "hello", "--robot", "rs-robot", "--input", "[1]"),
        "--input: not a JSON object",
        "[bad_request]",
    )
    for where in ([], ["--robot", "rs-robot", "--group", "rs-pool"]):
        result = up.herder("job", "start", "hello", *where)
        assert result.returncode == 2
        assert_one_line_error(result, "--robot NAME or --group NAME")
    assert_one_line_error(
        up.herder("job", "start", "rs-nothing", "--robot", "rs-robot"), "no process named 'rs-nothing'", "[not_found]"
    )
    assert_one_line_error(
        up.herder("job", "start", "hello", "--robot", "rs-nobody"), "no robot named 'rs-nobody'", "[not_found]"
    )
    assert_one_line_error(
        up.herder("job", "start", "hello", "--group", "rs-nogroup"), "no robot is in group", "[not_found]"
    )
    assert_one_line_error(
        up.herder("job", "start", "hello", "--robot", "rs-robot", "--version", "9.9.9"),
        "has no version '9.9.9'",
        "[not_found]",
    )
    desk = up.herder("robot", "add", "rs-desk", "--type", "attended", "--host", "h", "--group", "rs-desks")
    assert desk.returncode == 0, desk.stderr
    assert_one_line_error(up.herder("job", "start", "hello", "--robot", "rs-desk"), "attended", "[conflict]")
    assert_one_line_error(up.herder("job", "start", "hello", "--group", "rs-desks"), "attended", "[conflict]")
    # Nothing was created by any of them.
    assert parsed(up.herder("job", "list", "--robot", "rs-robot", "--json")) == []
    mine = [job for job in parsed(up.herder("job", "list", "--json")) if job["target_robot"] in ("rs-robot", "rs-desk")]
    assert mine == []


def json_error(result: subprocess.CompletedProcess[str], code: str) -> str:
    """A failure under --json: non-zero exit, exactly one JSON line on stderr with `code`; its message."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    error = json.loads(lines[0])
    assert list(error) == ["error"] and sorted(error["error"]) == ["code", "message"], error
    assert error["error"]["code"] == code, error
    message: str = error["error"]["message"]
    assert message and "\n" not in message
    return message


def test_errors_under_json_are_one_json_line_with_their_code(up: Stack, fleet: Fleet, tmp_path: Path) -> None:
    fleet.add("re-robot")
    missing = up.herder("job", "show", "0000", "--json")
    assert json_error(missing, "not_found") == "no job 0000"
    assert (missing.returncode, missing.stdout) == (1, "")
    assert_one_line_error(up.herder("job", "show", "0000"), "no job 0000", "[not_found]")  # and without --json

    assert "not valid JSON" in json_error(
        up.herder("job", "start", "hello", "--robot", "re-robot", "--input", "{", "--json"), "bad_request"
    )
    assert "no process named 're-nothing'" in json_error(
        up.herder("job", "start", "re-nothing", "--robot", "re-robot", "--wait", "--json"), "not_found"
    )
    unplaced = up.herder("job", "start", "hello", "--json")
    assert "--robot NAME or --group NAME" in json_error(unplaced, "usage") and unplaced.returncode == 2
    assert "--limit" in json_error(up.herder("job", "list", "--limit", "0", "--json"), "usage")
    token = up.herder("robot", "list", "--json", "--token", "hd_secret")
    assert "--token-file" in json_error(token, "usage") and "hd_secret" not in token.stderr
    nowhere = up.herder("package", "list", "--json", "--data-dir", str(tmp_path / "nowhere"))
    assert "herder up" in json_error(nowhere, "setup")
    # After `--` it is an argument, not the option: the error is a line for people.
    assert_one_line_error(up.herder("job", "show", "0000", "--", "--json"), "unexpected extra argument")


def test_a_long_task_stops_softly_and_its_logs_read_back(up: Stack, fleet: Fleet) -> None:
    fleet.run("rj-long")
    job_id = up.start_job("long-task", "--robot", "rj-long", "--input", '{"step_s": 0.2}')["id"]
    up.wait_job(job_id, "Running")

    stopping = up.herder("job", "stop", job_id[:8])
    assert stopping.returncode == 0, stopping.stderr
    assert stopping.stdout.strip() == f"job {job_id[:12]}: Stopping (soft stop asked by admin)"
    job = up.wait_job(job_id, "Stopped")
    assert job["reason"] == "stopped on request"
    assert job["output"]["stopped"] is True and job["output"]["done"] >= 1

    text = up.herder("job", "logs", job_id[:8])
    assert text.returncode == 0, text.stderr
    assert "long_task.step step=1 steps=600" in text.stdout
    assert "long_task.stopped" in text.stdout
    assert text.stdout.splitlines()[-1].endswith("job Stopped: stopped on request")
    records = _log_records(up, job_id)
    assert len(records) == len(text.stdout.splitlines())
    assert {record["job_id"] for record in records} == {job_id}
    assert len({(record["stream"], record["seq"]) for record in records}) == len(records)
    assert _steps(records) == job["output"]["done"]


def test_a_task_that_ignores_stops_stays_stopping_until_killed(up: Stack, fleet: Fleet) -> None:
    fleet.run("rj-stubborn")
    job_id = up.start_job(
        "long-task", "--robot", "rj-stubborn", "--input", '{"honour_stop": false, "step_s": 0.2}', "--kill-grace", "2"
    )["id"]
    up.wait_job(job_id, "Running")
    stopping = up.herder("job", "stop", job_id[:8])
    assert stopping.returncode == 0, stopping.stderr
    assert "Stopping" in stopping.stdout

    # It keeps working through a soft stop: three more steps later it is still Stopping.
    after_stop = _steps(_log_records(up, job_id))
    wait_until(lambda: _steps(_log_records(up, job_id)) >= after_stop + 3, timeout=30, interval=POLL_S)
    job = up.job(job_id)
    assert (job["state"], job["reason"]) == ("Stopping", "soft stop asked by admin")

    killed = up.herder("job", "kill", job_id[:8])
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout.strip() == f"job {job_id[:12]}: Terminating (hard stop asked by admin)"
    job = up.wait_job(job_id, "Stopped")
    assert "hard-stopped" in job["reason"]
    shown = up.herder("job", "show", job_id)
    assert f"reason         {job['reason']}" in shown.stdout.splitlines()
    assert up.wait_robot("rj-stubborn", "Available")["current_job"] is None


def test_a_robot_shutting_down_hard_stops_its_job(up: Stack, fleet: Fleet) -> None:
    agent = fleet.run("rj-shutdown")
    job_id = up.start_job("long-task", "--robot", "rj-shutdown", "--input", '{"step_s": 0.2}')["id"]
    up.wait_job(job_id, "Running")
    assert up.robot("rj-shutdown")["current_job"] == job_id

    assert stop_process(agent.process) == 0, agent.output()
    job = up.wait_job(job_id, "Stopped", timeout=15)
    assert "the robot agent shut down" in job["reason"]
    assert up.wait_robot("rj-shutdown", "Disconnected", timeout=10)["current_job"] is None


def test_a_job_for_an_offline_robot_waits_and_follow_sees_it_through(up: Stack, fleet: Fleet) -> None:
    token_file = fleet.add("rj-late")
    job = up.start_job("hello", "--robot", "rj-late", "--input", '{"name": "Bo"}')
    job_id = job["id"]
    assert job["state"] == "Pending" and "offline" in job["reason"], job
    shown = up.herder("job", "show", job_id[:8])
    reason = next(line for line in shown.stdout.splitlines() if line.startswith("reason "))
    assert "robot rj-late is offline" in reason and "the job starts when" in reason
    table = up.herder("job", "list", "--state", "Pending")
    row = next(line for line in table.stdout.splitlines() if line.startswith(job_id[:12]))
    assert "Pending" in row and "offline" in row
    empty = up.herder("job", "logs", job_id)
    assert (empty.returncode, empty.stdout) == (0, ""), empty.stderr
    assert "no log lines" in empty.stderr

    follow = subprocess.Popen(
        [HERDER, "job", "logs", job_id[:8], "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=up.env,
    )
    try:
        fleet.connected(fleet.start("rj-late", token_file))
        out, err = follow.communicate(timeout=45)  # it ends by itself when the job has ended
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert any(line.endswith("stdout Hello, Bo!") for line in lines), out
    assert lines[-1].endswith("job Successful: completed"), out
    assert up.job(job_id)["state"] == "Successful"

    # Following a job that has ended prints its lines and returns at once.
    again = up.herder("job", "logs", job_id, "--follow", "--json")
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["message"] for line in again.stdout.splitlines()][-1] == "job Successful: completed"


def _cancelled_job(up: Stack, robot: str) -> str:
    """A job for a robot that never runs, cancelled while Pending: it has ended, with one log line."""
    job_id: str = up.start_job("hello", "--robot", robot)["id"]
    stopped = up.herder("job", "stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"job {job_id[:12]}: Stopped (cancelled by admin before it started)"
    return job_id


def test_a_pending_job_can_be_cancelled(up: Stack, fleet: Fleet) -> None:
    fleet.add("rj-cancel")
    job_id = _cancelled_job(up, "rj-cancel")
    job = up.job(job_id)
    assert (job["state"], job["reason"], job["started_at"]) == ("Stopped", "cancelled by admin before it started", None)
    logs = up.herder("job", "logs", job_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.strip().endswith("end    job Stopped: cancelled by admin before it started")
    assert_one_line_error(up.herder("job", "kill", job_id), "already ended (Stopped)", "[conflict]")


def test_job_logs_to_a_reader_that_goes_away_exits(up: Stack, fleet: Fleet) -> None:
    fleet.add("rj-pipe")
    job_id = _cancelled_job(up, "rj-pipe")
    # Unbuffered output (PYTHONUNBUFFERED=1, common in containers and CI) meets the closed pipe on the
    # first line; buffered output does the same once a log passes the buffer's size (8 KiB).
    logs = subprocess.Popen(
        [HERDER, "job", "logs", job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**up.env, "PYTHONUNBUFFERED": "1"},
    )
    assert logs.stdout is not None and logs.stderr is not None
    logs.stdout.close()  # like `| head -0`: the reader has gone
    try:
        logs.wait(timeout=6)  # it takes half a second with a reader
    except subprocess.TimeoutExpired:
        pytest.fail("herder job logs was still running 6 s after its reader went away")
    finally:
        if logs.poll() is None:
            logs.kill()
            logs.wait()
        err = logs.stderr.read().decode()
        logs.stderr.close()
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["robot"],
        ["robot", "add"],
        ["robot", "run"],
        ["job"],
        ["job", "start"],
        ["job", "logs"],
        ["package", "publish"],
    ],
)
def test_every_robot_and_job_command_explains_itself(command: list[str]) -> None:
    result = subprocess.run([HERDER, *command, "--help"], capture_output=True, text=True, timeout=30, env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    assert f"herder {' '.join(command)}" in result.stdout
