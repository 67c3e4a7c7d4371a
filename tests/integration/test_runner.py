"""Running real entry points in real child processes: outcomes, logs, stops, kills and the environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from herder.protocol.jobs import JobReport, LogLevel, LogStream, Outcome
from herder.protocol.packages import EntryKind, EntryPoint
from herder.robot.runner import JobProcess, LogLine, RunResult, RunSpec, StartError
from tests.support import eventually, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WAIT_S = 20.0  # generous: the machine may be busy; nothing here asserts on speed


@dataclass
class Run:
    """A started job and the log lines it has produced so far."""

    job: JobProcess
    lines: list[LogLine] = field(default_factory=list)

    def messages(self, stream: LogStream) -> list[str]:
        """The messages of one stream, in order."""
        return [line.message for line in self.lines if line.stream is stream]

    def sdk_events(self) -> list[tuple[LogLevel, str, dict[str, Any]]]:
        """(level, message, fields) of each SDK record, in order."""
        return [(line.level, line.message, line.fields) for line in self.lines if line.stream is LogStream.SDK]

    async def result(self) -> RunResult:
        """Wait for the run to end."""
        return await asyncio.wait_for(self.job.wait(), WAIT_S)


def package(tmp_path: Path, files: dict[str, str], *, executable: tuple[str, ...] = ()) -> Path:
    """A package folder holding `files` (dedented)."""
    folder = tmp_path / "package"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
        if name in executable:
            (folder / name).chmod(0o755)
    return folder


async def start(tmp_path: Path, folder: Path, kind: EntryKind, target: str, *args: str, **input_: Any) -> Run:
    """Start `target` from `folder`, collecting its log lines."""
    run_lines: list[LogLine] = []
    spec = RunSpec(
        job_id="0123456789abcdef0123456789abcdef",
        attempt=1,
        entry=EntryPoint(kind=kind, target=target, args=list(args)),
        package_dir=folder,
        work_dir=tmp_path / "work",
        input=input_,
    )
    job = await JobProcess.start(spec, run_lines.append)
    return Run(job=job, lines=run_lines)


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie nobody reaped yet has ended too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


LEVELS = """
    import sys
    from herder.robot import sdk

    def main(job):
        sdk.log.debug("step.one", n=1)
        print("printed", job["who"])
        sdk.log.info("step.two", who=job["who"], items=[1, 2])
        print("to stderr", file=sys.stderr)
        sdk.log.warning("step.three")
        sdk.log.error("step.four", ok=False)
        return {"greeting": "hi " + job["who"]}
"""


async def test_a_python_entry_succeeds_with_its_output_and_logs_in_order(tmp_path: Path) -> None:
    run = await start(tmp_path, package(tmp_path, {"levels.py": LEVELS}), EntryKind.PYTHON, "levels:main", who="Ada")
    result = await run.result()
    assert (result.outcome, result.exit_code, result.error) == (Outcome.SUCCESSFUL, 0, None)
    assert result.output == {"greeting": "hi Ada"}
    assert run.sdk_events() == [
        (LogLevel.DEBUG, "step.one", {"n": 1}),
        (LogLevel.INFO, "step.two", {"who": "Ada", "items": [1, 2]}),
        (LogLevel.WARNING, "step.three", {}),
        (LogLevel.ERROR, "step.four", {"ok": False}),
    ]
    assert run.messages(LogStream.STDOUT) == ["printed Ada"]
    assert [(line.level, line.message) for line in run.lines if line.stream is LogStream.STDERR] == [
        (LogLevel.WARNING, "to stderr")
    ]


async def test_the_hello_example_greets_the_name_in_its_input(tmp_path: Path) -> None:
    run = await start(tmp_path, EXAMPLES / "hello", EntryKind.PYTHON, "hello:main", name="Ada")
    result = await run.result()
    assert result.outcome is Outcome.SUCCESSFUL
    assert result.output == {"greeting": "Hello, Ada!"}
    assert run.messages(LogStream.STDOUT) == ["Hello, Ada!"]
    assert run.sdk_events() == [(LogLevel.INFO, "hello.greeting", {"name": "Ada"})]


async def test_an_exception_faults_the_job_with_its_summary(tmp_path: Path) -> None:
    folder = package(
        tmp_path,
        {
            "invoices.py": """
                def main(job):
                    raise ValueError("no invoice number")
            """
        },
    )
    run = await start(tmp_path, folder, EntryKind.PYTHON, "invoices:main")
    result = await run.result()
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.FAULTED, 1, "exited with code 1")
    assert result.error == "ValueError: no invoice number"
    stderr = run.messages(LogStream.STDERR)
    assert stderr[0] == "Traceback (most recent call last):"
    assert stderr[-1] == "ValueError: no invoice number"
    assert not any("herder/robot/entry.py" in line or "robot/entry.py" in line for line in stderr)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("nowhere:main", "cannot import module 'nowhere': ModuleNotFoundError: No module named 'nowhere'"),
        ("hello:mian", "module 'hello' has no function 'mian'"),
        ("broken:main", "cannot import module 'broken': ModuleNotFoundError: No module named 'requestz'"),
    ],
)
async def test_a_missing_module_or_function_faults_with_a_clear_error(tmp_path: Path, target: str, error: str) -> None:
    folder = package(tmp_path, {"hello.py": "def main(): pass\n", "broken.py": "import requestz\n"})
    result = await (await start(tmp_path, folder, EntryKind.PYTHON, target)).result()
    assert (result.outcome, result.error) == (Outcome.FAULTED, error)


async def test_functions_without_a_parameter_and_coroutines_are_run_too(tmp_path: Path) -> None:
    folder = package(
        tmp_path,
        {
            "shapes.py": """
                import asyncio, sys
                from herder.robot import sdk

                def plain():
                    sdk.set_output({"args": sys.argv[1:], "input": sdk.job_input()})

                async def later(job):
                    await asyncio.sleep(0)
                    return {"async": job["x"]}
            """
        },
    )
    plain = await (await start(tmp_path, folder, EntryKind.PYTHON, "shapes:plain", "--fast", x=1)).result()
    assert plain.output == {"args": ["--fast"], "input": {"x": 1}}
    later = await (await start(tmp_path, folder, EntryKind.PYTHON, "shapes:later", x=2)).result()
    assert (later.outcome, later.output) == (Outcome.SUCCESSFUL, {"async": 2})


async def test_a_command_succeeds_or_fails_with_its_exit_code(tmp_path: Path) -> None:
    folder = package(
        tmp_path,
        {
            "run.sh": """
                #!/bin/sh
                echo "running in $(basename "$PWD") with $1"
                printf '{"done": true}' > "$HERDER_JOB_OUTPUT_FILE"
            """
        },
        executable=("run.sh",),
    )
    ok = await start(tmp_path, folder, EntryKind.COMMAND, "./run.sh", "--fast")
    result = await ok.result()
    assert (result.outcome, result.exit_code, result.output) == (Outcome.SUCCESSFUL, 0, {"done": True})
    assert ok.messages(LogStream.STDOUT) == ["running in package with --fast"]

    failing = await start(tmp_path, folder, EntryKind.COMMAND, "sh", "-c", "echo partly; echo disk full >&2; exit 3")
    result = await failing.result()
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.FAULTED, 3, "exited with code 3")
    assert result.error == "exited with code 3: disk full"


async def test_an_unknown_command_does_not_start(tmp_path: Path) -> None:
    folder = package(tmp_path, {})
    with pytest.raises(StartError, match="command 'no-such-program-xyz' is neither on PATH nor in the package"):
        await start(tmp_path, folder, EntryKind.COMMAND, "no-such-program-xyz")


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("[1, 2]", 'output: not a JSON object but an array; give an object, like {"name": "Ada"}'),
        ('{"a": ', "output: not valid JSON (Expecting value at line 1 column 7)"),
        ('{"a": NaN}', "output.a: nan is not a finite number; JSON-safe values hold finite numbers only"),
        ('{"a": "' + "x" * 300_000 + '"}', "output: the file is 300009 bytes, more than the 256 KiB allowed"),
    ],
)
async def test_an_output_that_is_not_a_json_safe_object_faults_the_job_and_says_so(
    tmp_path: Path, written: str, problem: str
) -> None:
    folder = package(tmp_path, {"written.json": written})
    run = await start(tmp_path, folder, EntryKind.COMMAND, "sh", "-c", 'cat written.json > "$HERDER_JOB_OUTPUT_FILE"')
    result = await run.result()
    assert (result.outcome, result.reason, result.output) == (
        Outcome.FAULTED,
        f"output is not storable: {problem}",
        None,
    )
    assert run.messages(LogStream.AGENT) == [f"the output is not storable: {problem}"]


async def test_a_returned_output_beyond_json_safe_integers_faults_the_job(tmp_path: Path) -> None:
    folder = package(
        tmp_path,
        {
            "huge.py": """
                def main(job):
                    return {"x": 10**30}
            """
        },
    )
    run = await start(tmp_path, folder, EntryKind.PYTHON, "huge:main")
    result = await run.result()
    problem = (
        "output.x: 1000000000000000000000000000000 is outside the integers JSON-safe values may hold "
        "(±9007199254740991)"
    )
    assert (result.outcome, result.exit_code, result.output) == (Outcome.FAULTED, 0, None)
    assert result.reason == result.error == f"output is not storable: {problem}"
    assert run.messages(LogStream.AGENT) == [f"the output is not storable: {problem}"]
    # The robot can carry the verdict: it is a report the jobs service accepts.
    JobReport(job_id="a" * 32, attempt=1, outcome=result.outcome, reason=result.reason, error=result.error)


async def test_a_line_too_long_is_cut_and_says_so(tmp_path: Path) -> None:
    run = await start(
        tmp_path, package(tmp_path, {}), EntryKind.COMMAND, "sh", "-c", "head -c 20000 /dev/zero | tr '\\0' x"
    )
    await run.result()
    (line,) = run.messages(LogStream.STDOUT)
    assert line == "x" * 8192 + " … [line cut: 20000 bytes, the first 8192 kept]"


async def test_death_by_a_signal_faults_the_job(tmp_path: Path) -> None:
    run = await start(tmp_path, package(tmp_path, {}), EntryKind.COMMAND, "sh", "-c", "ulimit -c 0; kill -SEGV $$")
    result = await run.result()
    assert (result.outcome, result.exit_code, result.error) == (Outcome.FAULTED, None, "killed by signal SIGSEGV")


async def test_a_robot_framework_suite_that_passes_is_successful(tmp_path: Path) -> None:
    run = await start(tmp_path, EXAMPLES / "rf-hello", EntryKind.ROBOT, "hello.robot")
    result = await run.result()
    assert (result.outcome, result.exit_code) == (Outcome.SUCCESSFUL, 0)
    assert any("Hello from Robot Framework!" in line for line in run.messages(LogStream.STDOUT))
    assert (tmp_path / "work" / "robot" / "output.xml").is_file()


async def test_a_robot_framework_suite_that_fails_is_faulted_with_the_count(tmp_path: Path) -> None:
    folder = package(
        tmp_path,
        {
            "checks.robot": """
                *** Test Cases ***
                Passes
                    Should Be Equal    1    1
                Fails
                    Should Be Equal    1    2
            """
        },
    )
    result = await (await start(tmp_path, folder, EntryKind.ROBOT, "checks.robot")).result()
    assert (result.outcome, result.exit_code, result.error) == (Outcome.FAULTED, 1, "1 test failed")


async def test_a_robot_framework_suite_stops_on_request(tmp_path: Path) -> None:
    folder = package(
        tmp_path,
        {
            "slow.robot": """
                *** Tasks ***
                Slow
                    Log To Console    sleeping
                    Sleep    60s
                Next
                    Log To Console    never
            """
        },
    )
    run = await start(tmp_path, folder, EntryKind.ROBOT, "slow.robot")
    await eventually(lambda: any("sleeping" in line for line in run.messages(LogStream.STDOUT)), timeout=WAIT_S)
    run.job.request_stop()
    result = await run.result()
    assert (result.outcome, result.reason) == (Outcome.STOPPED, "stopped on request")
    assert not any("never" in line for line in run.messages(LogStream.STDOUT))


def _steps(run: Run) -> int:
    return sum(1 for line in run.lines if line.message == "long_task.step")


async def test_a_soft_stop_the_script_honours_is_stopped(tmp_path: Path) -> None:
    run = await start(tmp_path, EXAMPLES / "long-task", EntryKind.PYTHON, "long_task:main", step_s=0.02)
    await eventually(lambda: _steps(run) >= 2, timeout=WAIT_S)
    run.job.request_stop()
    result = await run.result()
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.STOPPED, 0, "stopped on request")
    assert result.output is not None and result.output["stopped"] is True
    assert run.sdk_events()[-1][:2] == (LogLevel.WARNING, "long_task.stopped")


async def test_a_soft_stop_the_script_ignores_needs_a_kill(tmp_path: Path) -> None:
    run = await start(
        tmp_path, EXAMPLES / "long-task", EntryKind.PYTHON, "long_task:main", step_s=0.02, honour_stop=False
    )
    await eventually(lambda: _steps(run) >= 2, timeout=WAIT_S)
    run.job.request_stop()
    steps_at_stop = _steps(run)
    await eventually(lambda: _steps(run) >= steps_at_stop + 5, timeout=WAIT_S)
    assert run.job.running
    await run.job.kill(grace_s=10.0)
    assert not run.job.running
    result = await run.result()
    assert (result.outcome, result.exit_code, result.reason) == (
        Outcome.STOPPED,
        None,
        "hard-stopped (ended on SIGTERM)",
    )


async def test_a_script_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    folder = package(
        tmp_path,
        {
            "stubborn.py": """
                import signal, time
                from herder.robot import sdk

                def main():
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    sdk.log.info("ready")
                    while True:
                        time.sleep(0.05)
            """
        },
    )
    run = await start(tmp_path, folder, EntryKind.PYTHON, "stubborn:main")
    await eventually(lambda: run.messages(LogStream.SDK) == ["ready"], timeout=WAIT_S)
    began = time.monotonic()
    await run.job.kill(grace_s=0.5)
    assert time.monotonic() - began >= 0.5
    result = await run.result()
    assert (result.outcome, result.reason) == (Outcome.STOPPED, "hard-stopped (killed after the 0.5 s grace period)")


async def test_a_kill_takes_the_whole_process_group(tmp_path: Path) -> None:
    # The grandchild ignores SIGTERM and outlives its parent: only the group's SIGKILL ends it.
    script = "(trap '' TERM; echo trapped; exec sleep 300) & echo $!; sleep 300 & echo $!; wait"
    run = await start(tmp_path, package(tmp_path, {}), EntryKind.COMMAND, "sh", "-c", script)
    await eventually(lambda: len(run.messages(LogStream.STDOUT)) == 3, timeout=WAIT_S)
    pids = [int(line) for line in run.messages(LogStream.STDOUT) if line.isdigit()]
    assert len(pids) == 2
    assert not any(gone(pid) for pid in pids)
    await run.job.kill(grace_s=0.5)
    result = await run.result()
    assert result.reason == "hard-stopped (killed after the 0.5 s grace period)"
    # A killed process has closed its pipes a moment before it is quite gone.
    await eventually(lambda: all(gone(pid) for pid in pids), timeout=WAIT_S)


async def test_a_group_that_ends_on_sigterm_is_not_said_to_need_sigkill(tmp_path: Path) -> None:
    # Killed grandchildren may stay zombies (a container's first process may reap nothing): they
    # must not hold the kill until the grace period is over.
    run = await start(tmp_path, package(tmp_path, {}), EntryKind.COMMAND, "sh", "-c", "sleep 300 & echo $!; wait")
    await eventually(lambda: run.messages(LogStream.STDOUT), timeout=WAIT_S)
    await run.job.kill(grace_s=60.0)
    result = await run.result()
    assert result.reason == "hard-stopped (ended on SIGTERM)"
    await eventually(lambda: gone(int(run.messages(LogStream.STDOUT)[0])), timeout=WAIT_S)


async def test_what_a_job_leaves_running_ends_with_it(tmp_path: Path) -> None:
    run = await start(tmp_path, package(tmp_path, {}), EntryKind.COMMAND, "sh", "-c", "sleep 300 & echo $!")
    result = await run.result()
    assert result.outcome is Outcome.SUCCESSFUL
    (pid,) = run.messages(LogStream.STDOUT)
    await eventually(lambda: gone(int(pid)), timeout=WAIT_S)
    assert run.messages(LogStream.AGENT) == ["killed the processes the job left running"]


async def test_herder_and_nats_secrets_never_reach_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_TOKEN", "tok-5f1a9c")
    monkeypatch.setenv("HERDER_ROBOT_TOKEN", "tok-77e2b0")
    monkeypatch.setenv("NATS_URL", "nats://tok-c04d31@127.0.0.1:4222")
    monkeypatch.setenv("ROBOT_LOCALE", "kept")
    folder = package(
        tmp_path,
        {
            "env.py": """
                import os

                def main():
                    return {
                        "names": sorted(n for n in os.environ if n.startswith(("HERDER_", "NATS_"))),
                        "secrets": [v for v in os.environ.values() if "tok-" in v],
                        "kept": os.environ.get("ROBOT_LOCALE"),
                        "input_mode": oct(os.stat(os.environ["HERDER_JOB_INPUT_FILE"]).st_mode & 0o777),
                        "cwd": os.getcwd(),
                    }
            """
        },
    )
    result = await (await start(tmp_path, folder, EntryKind.PYTHON, "env:main")).result()
    assert result.output is not None
    assert result.output["secrets"] == []
    assert result.output["names"] == [
        "HERDER_JOB_ATTEMPT",
        "HERDER_JOB_DIR",
        "HERDER_JOB_ERROR_FILE",
        "HERDER_JOB_ID",
        "HERDER_JOB_INPUT_FILE",
        "HERDER_JOB_LOG_FD",
        "HERDER_JOB_OUTPUT_FILE",
        "HERDER_JOB_STOP_FILE",
        "HERDER_PACKAGE_DIR",
    ]
    assert result.output["kept"] == "kept"
    assert result.output["input_mode"] == "0o600"
    assert result.output["cwd"] == str(folder)


AGENT = """
import asyncio, sys
from pathlib import Path
from herder.protocol.packages import EntryKind, EntryPoint
from herder.robot.runner import JobProcess, RunSpec

async def main():
    entry = EntryPoint(kind=EntryKind.COMMAND, target="sleep", args=["300"])  # writes nothing: no EPIPE to end it
    spec = RunSpec("0" * 32, 1, entry, Path(sys.argv[1]), Path(sys.argv[2]))
    job = await JobProcess.start(spec, lambda line: None)
    print(job.pid, flush=True)
    await job.wait()

asyncio.run(main())
"""


def test_a_job_dies_with_its_agent(tmp_path: Path) -> None:
    """Even an agent killed with SIGKILL, which can clean nothing up, leaves no script running."""
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(tmp_path), str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
        assert not gone(pid)
    finally:
        agent.kill()
        agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()
    wait_until(lambda: gone(pid), timeout=WAIT_S)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _children() -> list[int]:
    """This process's children, zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                found.append(int(entry.name))
    return found


async def test_runs_leave_no_open_files_or_zombies(tmp_path: Path) -> None:
    before = _open_fds()
    children_before = set(_children())
    folder = package(tmp_path, {"quick.py": "def main():\n    print('hi')\n"})
    for _ in range(3):
        await (await start(tmp_path, folder, EntryKind.PYTHON, "quick:main")).result()
    killed = await start(tmp_path, EXAMPLES / "long-task", EntryKind.PYTHON, "long_task:main", step_s=0.02)
    await eventually(lambda: _steps(killed) >= 1, timeout=WAIT_S)
    await killed.job.kill(grace_s=5.0)
    await killed.result()
    await eventually(lambda: _open_fds() <= before, timeout=WAIT_S)
    assert set(_children()) <= children_before


def test_the_entry_wrapper_imports_neither_pydantic_nor_nats() -> None:
    probe = (
        "import sys, herder.robot.entry; "
        "print(sorted(m for m in ('pydantic', 'nats', 'herder.protocol', 'structlog') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    assert loaded.stdout.strip() == "[]"


def test_a_script_runs_by_hand_without_herder(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("HERDER_")}
    done = subprocess.run(
        [sys.executable, "hello.py"], cwd=EXAMPLES / "hello", env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines() == ["Hello, world!", "{'greeting': 'Hello, world!'}"]
    assert "INFO    hello.greeting name='world'" in done.stderr
