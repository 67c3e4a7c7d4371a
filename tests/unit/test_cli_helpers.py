"""Pure parts of the CLI: durations, event lines, the status summary, tables, errors, following a job."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer
from rich.console import Console, RenderableType

from herder.cli.app import app
from herder.cli.jobs import JOB_COLUMNS, _Printer
from herder.cli.output import (
    Column,
    asks_for_json,
    fail,
    fit_widths,
    make_table,
    refuse_tokens_in_arguments,
    report_errors,
)
from herder.cli.packages import PROCESS_COLUMNS
from herder.cli.robots import ROBOT_COLUMNS
from herder.cli.tap import format_line, parse_duration
from herder.cli.tokens import TOKEN_COLUMNS
from herder.client.discovery import summarize
from herder.client.errors import SetupError
from herder.protocol.errors import BadRequest, NotFound, Unauthenticated
from herder.protocol.jobs import JobInfo, JobShow, JobState, JobStateChangedEvent, Priority
from herder.protocol.messages import Event


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("1.5h", 5400),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["", "10", "h", "5 minutes", "-5m", "1x", "m5"])
def test_bad_durations_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(BadRequest, match="30s"):
        parse_duration(bad)


def test_an_event_line_has_time_tenant_subject_actor_and_fields() -> None:
    event = Event(
        id="e1",
        type="auth.token_created",
        tenant="acme",
        time=datetime(2026, 11, 22, 7, 0, 1, 123456, tzinfo=UTC),
        actor="admin",
        data={"token_id": "abc", "name": "ci", "role": "operator", "note": "two words"},
    )
    line = format_line(event, "hd.acme.evt.auth.token_created")
    assert line == (
        '2026-11-22T07:00:01.123Z acme hd.acme.evt.auth.token_created by admin name=ci role=operator note="two words"'
    )


def test_summarize_folds_instances_by_service() -> None:
    replies: list[dict[str, Any]] = [
        {
            "name": "auth",
            "version": "0.1.0",
            "endpoints": [
                {"num_requests": 10, "num_errors": 1, "processing_time": 10_000_000},
                {"num_requests": 0, "num_errors": 0, "processing_time": 0},
            ],
        },
        {
            "name": "auth",
            "version": "0.1.0",
            "endpoints": [{"num_requests": 30, "num_errors": 2, "processing_time": 30_000_000}],
        },
        {"name": "jobs", "version": "0.2.0", "endpoints": []},
        {"no": "name"},
    ]
    auth, jobs = summarize(replies)
    assert (auth.name, auth.instances, auth.requests, auth.errors) == ("auth", 2, 40, 3)
    assert auth.average_ms == pytest.approx(1.0)
    assert (jobs.name, jobs.instances, jobs.average_ms) == ("jobs", 1, None)
    assert jobs.as_dict()["versions"] == ["0.2.0"]


# --- tables that fit the terminal ---

LONG_REASON = "robot rj-late is offline (Disconnected: it is not connected); the job starts when it is back"
JOB_ROWS = [
    ("8b4361cb4108", "long-task", "1.0.0", "Pending", "rj-late", "Normal", "2026-12-01 10:25:20", LONG_REASON),
    ("b2301b74bfb1", "invoice-reconciliation", "12.3.0-rc.1", "Terminating", "group night-pool", "High",
     "2026-12-01 10:25:21", "hard stop asked by admin"),
    ("8d60daa71bc2", "hello", "1.0.0", "Successful", "rj-hello", "Low", "2026-12-01 10:25:07", "completed"),
]  # fmt: skip
PROCESS_ROWS = [
    ("hello", "1.0.0", 1, "2026-12-01 10:22:07", "Greets whoever the input names"),
    (
        "long-task",
        "1.10.2",
        14,
        "2026-12-01 10:22:08",
        "Works step by step for a long time, and stops early when asked",
    ),
    ("sap-invoice-posting", "2.0.0", 3, "2026-12-01 10:22:09", "[beta] Posts the day's invoices into SAP"),
]
ROBOT_ROWS = [
    ("demo-bot", "unattended", "ts01.corp", "Available", "3s ago", None, "night-pool"),
    ("rj-late-robot-07", "unattended", "h2", "Disconnected", "never", "8b4361cb4108",
     "day-pool, invoices-eu-west, night-pool"),
]  # fmt: skip
TOKEN_ROWS = [
    ("admin", "admin", "2026-12-01 10:22:04", "herder", "live"),
    ("ci-nightly-deploys", "operator", "2026-12-01 10:23:04", "admin", "2026-12-02 08:00:00"),
]
TABLES: dict[str, tuple[Sequence[Column], Sequence[Sequence[Any]]]] = {
    "jobs": (JOB_COLUMNS, JOB_ROWS),
    "packages": (PROCESS_COLUMNS, PROCESS_ROWS),
    "robots": (ROBOT_COLUMNS, ROBOT_ROWS),
    "tokens": (TOKEN_COLUMNS, TOKEN_ROWS),
}


def rendered(renderable: RenderableType, width: int) -> list[str]:
    """What a terminal `width` columns wide shows, line by line, trailing blanks stripped."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return [line.rstrip() for line in console.file.getvalue().splitlines()]  # type: ignore[attr-defined]


def header_positions(columns: Sequence[Column], header: str) -> dict[str, int]:
    """Where each shown column's header starts on the header line."""
    return {column.header: header.index(column.header) for column in columns if column.header in header}


def cell(line: str, start: int, end: int | None) -> str:
    return line[start:end].strip()


@pytest.mark.parametrize("width", [80, 100, 200])
@pytest.mark.parametrize("name", TABLES)
def test_a_table_fits_the_terminal_with_what_identifies_whole(name: str, width: int) -> None:
    columns, rows = TABLES[name]
    lines = rendered(make_table(columns, rows, width=width), width)
    assert len(lines) == 1 + len(rows)  # one line per row
    assert all(len(line) <= width for line in lines), lines
    starts = header_positions(columns, lines[0])
    shown = [index for index, column in enumerate(columns) if column.header in starts]
    for column in columns:
        # A column is never squeezed out of sight: it is shown, or (only a droppable one) dropped.
        assert column.header in starts or column.drop is not None, (column, lines[0])
    ends = [*(starts[columns[i].header] for i in shown[1:]), None]
    for line, row in zip(lines[1:], rows, strict=True):
        for i, end in zip(shown, ends, strict=True):
            value, text = str(row[i] if row[i] is not None else "-"), cell(line, starts[columns[i].header], end)
            if columns[i].cut and text != value:
                assert text.endswith("…") and value.startswith(text[:-1]), (text, value)
            else:
                assert text == value, (columns[i].header, text, value)


@pytest.mark.parametrize("width", [80, 100])
def test_a_narrow_job_list_drops_priority_and_created_before_cutting_its_reason_short(width: int) -> None:
    header, *rows = rendered(make_table(JOB_COLUMNS, JOB_ROWS, width=width), width)
    assert {"ID", "PROCESS", "STATE", "REASON"} <= set(header.split())
    assert "PRIORITY" not in header and "CREATED" not in header
    assert "REASON" in header and any(row.endswith("…") for row in rows)
    assert "Terminating" in rows[1] and "invoice-reconciliation" in rows[1]


def test_a_wide_terminal_shows_every_column_whole() -> None:
    lines = rendered(make_table(JOB_COLUMNS, JOB_ROWS, width=220), 220)
    assert lines[0].split() == ["ID", "PROCESS", "VERSION", "STATE", "ROBOT", "PRIORITY", "CREATED", "(UTC)", "REASON"]
    assert lines[1].endswith(LONG_REASON) and "…" not in "".join(lines)


def test_the_package_list_keeps_names_whole_at_80_columns() -> None:
    lines = rendered(make_table(PROCESS_COLUMNS, PROCESS_ROWS, width=80), 80)
    names = [["hello", "1.0.0"], ["long-task", "1.10.2"], ["sap-invoice-posting", "2.0.0"]]
    assert [line.split()[:2] for line in lines[1:]] == names
    assert "[beta] Posts" in lines[3]  # cell text is not rich markup


@pytest.mark.parametrize("width", [60, 80, 100, 200])
@pytest.mark.parametrize("name", TABLES)
def test_wide_shows_every_value_in_full_wrapping_to_the_width(name: str, width: int) -> None:
    columns, rows = TABLES[name]
    lines = rendered(make_table(columns, rows, width=width, wide=True), width)
    assert all(len(line) <= width for line in lines), lines
    text = " ".join(lines)
    assert "…" not in text
    for column in columns:
        assert column.header in text
    words = text.split()
    for row in rows:
        for value in row:
            # Wrapped text is split between words, never inside one.
            for word in str(value if value is not None else "-").split():
                assert word in words, (word, lines)


def test_wide_at_80_columns_wraps_the_reason_in_a_table_when_the_rest_fits() -> None:
    lines = rendered(make_table(PROCESS_COLUMNS, PROCESS_ROWS, width=80, wide=True), 80)
    assert lines[0].split() == ["NAME", "LATEST", "VERSIONS", "UPDATED", "(UTC)", "DESCRIPTION"]
    assert len(lines) > 1 + len(PROCESS_ROWS)  # a description took two lines
    assert [line.split()[:2] for line in lines if not line.startswith(" ")][1:] == [
        ["hello", "1.0.0"],
        ["long-task", "1.10.2"],
        ["sap-invoice-posting", "2.0.0"],
    ]


def test_wide_on_a_terminal_too_narrow_for_the_table_shows_each_row_as_a_block() -> None:
    lines = rendered(make_table(JOB_COLUMNS, JOB_ROWS, width=80, wide=True), 80)
    assert lines[0].split() == ["ID", "8b4361cb4108"]
    assert lines[4].split() == ["ROBOT", "rj-late"]
    assert lines[7].startswith("REASON") and lines[8].startswith(" " * len("CREATED (UTC)"))


def test_piped_output_is_whole_one_line_per_row() -> None:
    lines = rendered(make_table(JOB_COLUMNS, JOB_ROWS, width=None), 1000)
    assert len(lines) == 1 + len(JOB_ROWS)
    assert lines[1].split()[:5] == ["8b4361cb4108", "long-task", "1.0.0", "Pending", "rj-late"]
    assert lines[1].endswith(LONG_REASON)


def test_plain_string_columns_are_kept_whole() -> None:
    lines = rendered(make_table(["SERVICE", "VERSION"], [("jobs", "0.2.0"), (None, "multi\nline")], width=80), 80)
    assert lines == ["SERVICE  VERSION", "jobs     0.2.0", "-        multi line"]


def test_fit_widths_drops_by_rank_then_cuts_free_text_then_leaves_it_out() -> None:
    columns = [Column("A"), Column("B", drop=2), Column("C", drop=1), Column("TEXT", cut=True, min_width=10)]
    natural = [10, 10, 10, 50]
    assert fit_widths(columns, natural, 200) == {0: 10, 1: 10, 2: 10, 3: 50}
    assert fit_widths(columns, natural, 60) == {0: 10, 1: 10, 2: 10, 3: 24}  # cut, still at least 10
    assert fit_widths(columns, natural, 40) == {0: 10, 1: 10, 3: 16}  # C went before TEXT fell under 10
    assert fit_widths(columns, natural, 24) == {0: 10, 3: 12}
    assert fit_widths(columns, natural, 20) == {0: 10}  # no room for 10 of text: none of it
    assert fit_widths(columns, natural, 5) == {0: 10}  # what identifies is never cut (rich folds it)


def test_fit_widths_shares_the_room_among_free_text_columns() -> None:
    columns = [Column("ID"), Column("X", cut=True, min_width=5), Column("Y", cut=True, min_width=5)]
    assert fit_widths(columns, [4, 8, 40], 40) == {0: 4, 1: 8, 2: 24}  # X needs little: Y gets the rest
    assert fit_widths(columns, [4, 40, 40], 40) == {0: 4, 1: 16, 2: 16}


# --- errors: one line, or one JSON object under --json ---


def _raise(exc: BaseException) -> None:
    raise exc


def _failed_request() -> None:
    JobShow(id="zz")


def _usage_error() -> None:
    app(["job", "list", "--limit", "0"], standalone_mode=False)


@pytest.mark.parametrize(
    ("fault", "code", "exit_code"),
    [
        (lambda: _raise(NotFound("no job 0000")), "not_found", 1),
        (lambda: _raise(Unauthenticated("the token was refused")), "unauthenticated", 1),
        (lambda: _raise(SetupError("no herder stack has run from /x")), "setup", 1),
        (lambda: fail("/x exists already"), "setup", 1),
        (lambda: fail("say where to run it", 2), "usage", 2),
        (_usage_error, "usage", 2),
        (lambda: refuse_tokens_in_arguments(["job", "list", "--token=abc"]), "usage", 2),
        (_failed_request, "bad_request", 1),
        (lambda: _raise(RuntimeError("boom\nsecond line")), "internal", 70),
    ],
    ids=["herder", "hinted", "setup", "fail", "fail-usage", "usage", "token", "invalid-request", "internal"],
)
def test_errors_under_json_are_one_json_line_on_stderr(
    fault: Callable[[], None], code: str, exit_code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited, report_errors(json_errors=True):
        fault()
    assert exited.value.code == exit_code
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    error = json.loads(lines[0])
    assert list(error) == ["error"] and set(error["error"]) == {"code", "message"}
    assert error["error"]["code"] == code
    assert error["error"]["message"] and "Traceback" not in err and f"[{code}]" not in err

    with pytest.raises(SystemExit) as again, report_errors():
        fault()
    assert again.value.code == exit_code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("herder: ") and error["error"]["message"] in lines[0]


def test_a_command_that_sets_its_exit_code_prints_no_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited, report_errors(json_errors=True):
        raise typer.Exit(1)
    assert exited.value.code == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("args", "asked"),
    [
        (["job", "list", "--json"], True),
        (["job", "list"], False),
        (["job", "start", "x", "--", "--json"], False),
        (["--json", "status"], True),
    ],
)
def test_json_is_asked_by_a_json_option_before_a_double_dash(args: list[str], asked: bool) -> None:
    assert asks_for_json(args) is asked


# --- following a started job ---


def _job(state: JobState, attempt: int, **fields: Any) -> JobInfo:
    return JobInfo(
        id="d77a666039a8550f1936842f6e2ce807",
        tenant="default",
        process="hello",
        version="1.0.0",
        state=state,
        attempt=attempt,
        priority=Priority.NORMAL,
        robot="rj-hello" if state is not JobState.PENDING else None,
        created_at=datetime(2026, 12, 1, tzinfo=UTC),
        **fields,
    )


def _change(previous: JobState, state: JobState, attempt: int, reason: str = "") -> JobStateChangedEvent:
    return JobStateChangedEvent(
        job_id="d77a666039a8550f1936842f6e2ce807",
        process="hello",
        previous=previous,
        state=state,
        robot="rj-hello",
        attempt=attempt,
        reason=reason,
    )


P, R, OK, F = JobState.PENDING, JobState.RUNNING, JobState.SUCCESSFUL, JobState.FAULTED


def test_a_state_the_start_line_said_is_not_said_again() -> None:
    out = io.StringIO()
    printer = _Printer(out)
    printer.started(_job(R, 1))
    printer.state(_change(P, R, 1))
    printer.state(_change(R, OK, 1, "completed"))
    printer.ended(_job(OK, 1, output={"greeting": "Hello, Ada!"}))
    assert out.getvalue().splitlines() == [
        "job d77a666039a8550f1936842f6e2ce807 hello 1.0.0: Running on robot rj-hello",
        "job d77a666039a8: Running → Successful (completed)",
        '  output {"greeting": "Hello, Ada!"}',
    ]


def test_a_job_started_pending_says_each_later_state_once_even_when_requeued() -> None:
    out = io.StringIO()
    printer = _Printer(out)
    printer.started(_job(P, 0, reason="robot rj-hello is offline"))
    for change in (_change(P, R, 1), _change(R, P, 1, "robot lost"), _change(P, R, 2), _change(R, F, 2, "bad")):
        printer.state(change)
    printer.ended(_job(F, 2, error="ValueError: bad\nsecond line"))
    assert out.getvalue().splitlines() == [
        "job d77a666039a8550f1936842f6e2ce807 hello 1.0.0: Pending (robot rj-hello is offline)",
        "job d77a666039a8: Pending → Running on robot rj-hello",
        "job d77a666039a8: Running → Pending (robot lost)",
        "job d77a666039a8: Pending → Running on robot rj-hello",
        "job d77a666039a8: Running → Faulted (bad)",
        "  error ValueError: bad",
    ]
