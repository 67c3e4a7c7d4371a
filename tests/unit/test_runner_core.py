"""The runner's pure parts: judging how a run ended, the child's environment, lines, SDK records, argv."""

from __future__ import annotations

import os
import signal
import stat
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from herder.protocol.jobs import JobReport, LogLevel, LogStream, Outcome
from herder.protocol.packages import EntryKind, EntryPoint
from herder.robot.runner import (
    Ending,
    JobFiles,
    LineSplitter,
    RunSpec,
    StartError,
    child_environment,
    command_line,
    decode_line,
    judge,
    prepare_work_dir,
    sdk_line,
)


def test_exit_zero_is_successful_with_the_output() -> None:
    result = judge(Ending(kind=EntryKind.PYTHON, returncode=0, output={"n": 1}))
    assert (result.outcome, result.exit_code, result.reason, result.error) == (
        Outcome.SUCCESSFUL,
        0,
        "exited with code 0",
        None,
    )
    assert result.output == {"n": 1}


def test_exit_zero_after_a_stop_the_script_saw_is_stopped() -> None:
    seen = judge(Ending(kind=EntryKind.PYTHON, returncode=0, stop_requested=True, stop_seen=True))
    assert (seen.outcome, seen.reason) == (Outcome.STOPPED, "stopped on request")
    unseen = judge(Ending(kind=EntryKind.PYTHON, returncode=0, stop_requested=True))
    assert unseen.outcome is Outcome.SUCCESSFUL


def test_a_hard_stop_is_stopped_and_says_whether_sigkill_was_needed() -> None:
    gentle = judge(Ending(kind=EntryKind.COMMAND, returncode=-signal.SIGTERM, killed=True, grace_s=10))
    assert (gentle.outcome, gentle.exit_code, gentle.reason) == (
        Outcome.STOPPED,
        None,
        "hard-stopped (ended on SIGTERM)",
    )
    forced = judge(
        Ending(kind=EntryKind.PYTHON, returncode=-signal.SIGKILL, killed=True, sigkill_needed=True, grace_s=10)
    )
    assert forced.reason == "hard-stopped (killed after the 10 s grace period)"
    assert forced.error is None


def test_a_python_failure_carries_the_exception_else_the_last_stderr_line() -> None:
    raised = judge(Ending(kind=EntryKind.PYTHON, returncode=1, error_text="ValueError: bad input"))
    assert (raised.outcome, raised.reason, raised.error) == (
        Outcome.FAULTED,
        "exited with code 1",
        "ValueError: bad input",
    )
    exited = judge(Ending(kind=EntryKind.PYTHON, returncode=2, last_stderr="usage: nope"))
    assert exited.error == "exited with code 2: usage: nope"


def test_a_command_failure_names_the_code_and_the_last_stderr_line() -> None:
    result = judge(Ending(kind=EntryKind.COMMAND, returncode=3, last_stderr="disk full"))
    assert (result.outcome, result.exit_code, result.error) == (Outcome.FAULTED, 3, "exited with code 3: disk full")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (1, "1 test failed"),
        (7, "7 tests failed"),
        (250, "250 or more tests failed"),
        (252, "Robot Framework refused the test data or command line options: [ ERROR ] bad"),
    ],
)
def test_robot_framework_exit_codes_are_explained(code: int, error: str) -> None:
    result = judge(Ending(kind=EntryKind.ROBOT, returncode=code, last_stderr="[ ERROR ] bad"))
    assert (result.outcome, result.error) == (Outcome.FAULTED, error)


@pytest.mark.parametrize("code", [2, 253, -signal.SIGINT])
def test_robot_framework_interrupted_on_request_is_stopped(code: int) -> None:
    result = judge(Ending(kind=EntryKind.ROBOT, returncode=code, stop_requested=True, interrupted=True))
    assert (result.outcome, result.reason) == (Outcome.STOPPED, "stopped on request")


def test_robot_framework_refusing_its_data_is_faulted_even_after_a_stop() -> None:
    result = judge(Ending(kind=EntryKind.ROBOT, returncode=252, stop_requested=True, interrupted=True))
    assert result.outcome is Outcome.FAULTED


def test_death_by_signal_without_a_kill_is_faulted() -> None:
    result = judge(Ending(kind=EntryKind.COMMAND, returncode=-signal.SIGSEGV))
    assert (result.outcome, result.exit_code, result.reason, result.error) == (
        Outcome.FAULTED,
        None,
        "killed by signal SIGSEGV",
        "killed by signal SIGSEGV",
    )


UNSTORABLE = "output.x: 1000000000000000000000000000000 is outside the integers JSON-safe values may hold"


def test_an_output_that_cannot_be_stored_faults_a_run_that_would_have_succeeded() -> None:
    result = judge(Ending(kind=EntryKind.COMMAND, returncode=0, output={"x": 1}, output_problem=UNSTORABLE))
    assert (result.outcome, result.exit_code, result.reason, result.error, result.output) == (
        Outcome.FAULTED,
        0,
        f"output is not storable: {UNSTORABLE}",
        f"output is not storable: {UNSTORABLE}",
        None,
    )


@pytest.mark.parametrize(
    ("ending", "outcome", "reason"),
    [
        (
            Ending(kind=EntryKind.PYTHON, returncode=1, error_text="KeyError: 'a'"),
            Outcome.FAULTED,
            "exited with code 1",
        ),
        (Ending(kind=EntryKind.COMMAND, returncode=-signal.SIGSEGV), Outcome.FAULTED, "killed by signal SIGSEGV"),
        (
            Ending(kind=EntryKind.PYTHON, returncode=0, stop_requested=True, stop_seen=True),
            Outcome.STOPPED,
            "stopped on request",
        ),
        (
            Ending(kind=EntryKind.COMMAND, returncode=-signal.SIGTERM, killed=True),
            Outcome.STOPPED,
            "hard-stopped (ended on SIGTERM)",
        ),
    ],
)
def test_a_run_that_ended_otherwise_keeps_its_own_ending_and_drops_the_output(
    ending: Ending, outcome: Outcome, reason: str
) -> None:
    result = judge(replace(ending, output={"x": "anything"}, output_problem=UNSTORABLE))
    assert (result.outcome, result.reason, result.output) == (outcome, reason, None)
    assert "not storable" not in (result.error or "")


def test_nul_in_what_the_script_wrote_becomes_a_visible_character_the_report_can_carry() -> None:
    raised = judge(Ending(kind=EntryKind.PYTHON, returncode=1, error_text="ValueError: a\x00b" + "\x00" * 3990))
    assert raised.error is not None and raised.error.startswith("ValueError: a\u2400b\u2400")
    exited = judge(Ending(kind=EntryKind.COMMAND, returncode=2, last_stderr="bad\x00byte"))
    assert exited.error == "exited with code 2: bad\u2400byte"
    for result in (raised, exited):
        JobReport(job_id="a" * 32, attempt=1, outcome=result.outcome, reason=result.reason, error=result.error)


def _spec(tmp_path: Path, entry: EntryPoint | None = None, **input_: object) -> RunSpec:
    return RunSpec(
        job_id="a" * 32,
        attempt=2,
        entry=entry or EntryPoint(kind=EntryKind.PYTHON, target="hello:main"),
        package_dir=tmp_path / "package",
        work_dir=tmp_path / "work",
        input=dict(input_),
    )


def test_the_child_environment_hides_herder_and_nats_variables(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    agent = {
        "PATH": "/usr/bin",
        "HOME": "/home/robot",
        "HERDER_TOKEN": "secret",
        "HERDER_ROBOT_TOKEN": "secret",
        "NATS_URL": "nats://secret@host",
        "nats_token": "secret",
        "PYTHONPATH": "/opt/lib",
    }
    env = child_environment(agent, spec, JobFiles.in_folder(spec.work_dir), log_fd=7)
    assert "secret" not in str(sorted(env.values()))
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/robot"
    assert env["PYTHONPATH"] == f"{spec.package_dir}{os.pathsep}/opt/lib"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HERDER_JOB_ID"] == "a" * 32 and env["HERDER_JOB_ATTEMPT"] == "2"
    assert env["HERDER_JOB_LOG_FD"] == "7"
    assert env["HERDER_JOB_STOP_FILE"] == str(spec.work_dir / "stop")
    herder_names = {name for name in env if name.startswith(("HERDER_", "NATS_"))}
    assert herder_names == {
        "HERDER_JOB_ID",
        "HERDER_JOB_ATTEMPT",
        "HERDER_JOB_DIR",
        "HERDER_JOB_INPUT_FILE",
        "HERDER_JOB_OUTPUT_FILE",
        "HERDER_JOB_STOP_FILE",
        "HERDER_JOB_ERROR_FILE",
        "HERDER_JOB_LOG_FD",
        "HERDER_PACKAGE_DIR",
    }


def test_the_work_folder_holds_the_input_for_the_owner_only(tmp_path: Path) -> None:
    spec = _spec(tmp_path, name="Ada")
    (spec.work_dir).mkdir()
    (spec.work_dir / "output.json").write_text("{}")  # left by an earlier attempt
    files = prepare_work_dir(spec)
    assert files.input.read_text() == '{"name": "Ada"}'
    assert stat.S_IMODE(files.input.stat().st_mode) == 0o600
    assert not files.output.exists()


def test_an_input_that_is_not_json_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(StartError, match="cannot be written as JSON"):
        prepare_work_dir(_spec(tmp_path, blob=b"bytes"))


def test_entry_points_become_command_lines(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (package / "hello.robot").write_text("*** Tasks ***\n")
    work = tmp_path / "work"
    python = command_line(EntryPoint(kind=EntryKind.PYTHON, target="hello:main"), package, work, None)
    assert python == [sys.executable, "-m", "herder.robot.entry", "hello:main"]
    robot = command_line(EntryPoint(kind=EntryKind.ROBOT, target="hello.robot", args=["--rpa"]), package, work, None)
    assert robot == [
        sys.executable,
        "-m",
        "robot",
        "--outputdir",
        str(work / "robot"),
        "--consolecolors",
        "off",
        "--rpa",
        "hello.robot",
    ]
    command = command_line(EntryPoint(kind=EntryKind.COMMAND, target="sh", args=["-c", "true"]), package, work, None)
    assert Path(command[0]).name == "sh" and command[1:] == ["-c", "true"]


def test_a_command_is_found_in_the_package_too(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    script = package / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    for target in ("./run.sh", "run.sh"):
        argv = command_line(EntryPoint(kind=EntryKind.COMMAND, target=target), package, tmp_path, "/nonexistent")
        assert argv == [str(package / target)]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (EntryPoint(kind=EntryKind.PYTHON, target="hello"), "must be written module:function"),
        (EntryPoint(kind=EntryKind.COMMAND, target="no-such-program-xyz"), "neither on PATH nor in the package"),
        (EntryPoint(kind=EntryKind.COMMAND, target="./missing.sh"), "is not in the package"),
        (EntryPoint(kind=EntryKind.COMMAND, target="./plain.sh"), r"is not executable: mark it so \(chmod \+x\)"),
        (EntryPoint(kind=EntryKind.ROBOT, target="missing.robot"), "suite 'missing.robot' is not in the package"),
        (EntryPoint(kind=EntryKind.ROBOT, target="../outside.robot"), "is not in the package"),
    ],
)
def test_what_cannot_run_is_one_line(tmp_path: Path, entry: EntryPoint, message: str) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (package / "plain.sh").write_text("echo\n")
    (tmp_path / "outside.robot").write_text("*** Tasks ***\n")
    with pytest.raises(StartError, match=message) as caught:
        command_line(entry, package, tmp_path / "work", os.defpath)
    assert "\n" not in str(caught.value)


def test_a_missing_package_folder_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(StartError, match="does not exist"):
        command_line(EntryPoint(kind=EntryKind.PYTHON, target="a:b"), tmp_path / "gone", tmp_path, None)


def test_lines_are_split_across_reads_and_cut_at_the_limit() -> None:
    splitter = LineSplitter(limit=8)
    assert splitter.feed(b"one\ntw") == [(b"one", 3)]
    assert splitter.feed(b"o\n0123456789abc") == [(b"two", 3)]
    assert splitter.feed(b"def\nlast") == [(b"01234567", 16)]
    assert splitter.finish() == [(b"last", 4)]
    assert splitter.finish() == []


def test_a_cut_line_says_so() -> None:
    assert decode_line(b"abc\r", 4) == "abc"
    assert decode_line(b"01234567", 16, limit=8) == "01234567 … [line cut: 16 bytes, the first 8 kept]"
    assert decode_line(b"caf\xc3", 4) == "caf\ufffd"


def test_sdk_records_keep_their_time_level_and_fields() -> None:
    line = sdk_line(
        '{"time": "2024-05-01T10:00:00+00:00", "level": "warning", "message": "invoice.late", "fields": {"n": 4}}'
    )
    assert line.stream is LogStream.SDK
    assert (line.time, line.level, line.message, line.fields) == (
        datetime(2024, 5, 1, 10, tzinfo=UTC),
        LogLevel.WARNING,
        "invoice.late",
        {"n": 4},
    )


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"level": "info"}'])
def test_what_is_not_an_sdk_record_is_kept_as_text(text: str) -> None:
    line = sdk_line(text)
    assert (line.stream, line.level, line.message, line.fields) == (LogStream.SDK, LogLevel.INFO, text, {})


def test_an_unknown_level_or_bad_time_falls_back() -> None:
    line = sdk_line('{"time": "yesterday", "level": "fatal", "message": "m", "fields": [1]}')
    assert line.level is LogLevel.INFO and line.fields == {}
    assert line.time.tzinfo is not None
