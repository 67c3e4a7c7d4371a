"""Pure parts of `herder queue`: JSON Lines files, chunks under the size limit, times and durations,
settings from options, filters, and how queues and items are shown."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from herder.cli.app import main
from herder.cli.output import EXIT_USAGE, Failed
from herder.cli.queues import (
    ADD_CHUNK_MAX_BYTES,
    ITEM_COLUMNS,
    QUEUE_COLUMNS,
    QUEUE_COLUMNS_NO_COUNTS,
    _counted,
    _FileAdd,
    apply_settings,
    check_item_id,
    chunk_items,
    chunk_key,
    file_digest,
    item_fields,
    item_filter,
    item_row,
    name_lines,
    parse_item_line,
    parse_item_lines,
    parse_moment,
    parse_span,
    queue_row,
    repeated_reference,
    reworded,
    settings_changes,
    settings_fields,
    span,
    stats_fields,
)
from herder.protocol import codec
from herder.protocol.errors import BadRequest, Conflict, Unavailable
from herder.protocol.jobs import Priority
from herder.protocol.messages import IDEMPOTENCY_KEY_PATTERN
from herder.protocol.queues import (
    MAX_ITEM_CONTENT_BYTES,
    MAX_ITEMS_PER_ADD,
    ExceptionKind,
    ItemAdd,
    ItemFilter,
    ItemInfo,
    ItemsChanged,
    ItemState,
    NewItem,
    QueueInfo,
    QueueSettings,
    QueueStats,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _lines(*lines: str) -> bytes:
    return "\n".join(lines).encode()


# --- JSON Lines files ---


def test_a_line_is_the_content_unless_it_has_a_content_key() -> None:
    data = _lines(
        '{"invoice": "INV-1", "amount": 12.5}',
        "",
        '{"content": {"invoice": "INV-2"}, "reference": "INV-2", "priority": "High", "tags": ["eu", "q1"], '
        '"deadline": "2026-03-02T17:00:00+01:00", "postpone_until": "2026-03-02T08:00:00"}',
        "   ",
        '{"content": {"content": "nested"}}',
    )
    items = parse_item_lines(data, source="items.jsonl")
    assert [number for number, _ in items] == [1, 3, 5]  # blank lines are skipped but counted
    first, second, third = (item for _, item in items)
    assert first == NewItem(content={"invoice": "INV-1", "amount": 12.5})
    assert second.content == {"invoice": "INV-2"} and second.reference == "INV-2"
    assert second.priority is Priority.HIGH and second.tags == ["eu", "q1"]
    assert second.deadline == datetime(2026, 3, 2, 16, 0, tzinfo=UTC)
    assert second.postpone_until == datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # no offset: UTC
    assert third.content == {"content": "nested"}


def test_windows_line_ends_and_a_final_newline_are_fine() -> None:
    items = parse_item_lines(b'{"a": 1}\r\n{"a": 2}\r\n', source="f")
    assert [item.content for _, item in items] == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"a": ', "not valid JSON"),
        ("[1, 2]", "not a JSON object but an array"),
        ('"text"', "not a JSON object but a string"),
        ('{"n": 1e400}', "n: "),
        ('{"n": 10000000000000000000}', "n: 10000000000000000000 is outside"),
        ('{"content": {"a": 1}, "colour": "red"}', "colour: Extra inputs are not permitted"),
        ('{"content": [1]}', "content: "),
        ('{"content": {}, "priority": "Urgent"}', "priority: Input should be 'High', 'Normal' or 'Low'"),
        ('{"content": {}, "tags": ["two words"]}', "tags.0: must be 1 to 64 letters"),
        ('{"content": {}, "reference": ""}', "reference: "),
        ('{"content": {}, "deadline": "tomorrow"}', "deadline: "),
        (json.dumps({"blob": "x" * MAX_ITEM_CONTENT_BYTES}), "larger than"),
        (json.dumps({"content": {"blob": "x" * MAX_ITEM_CONTENT_BYTES}}), "content: larger than 64 KiB"),
        ("\xff", "not valid JSON"),
    ],
)
def test_a_bad_line_is_named_by_its_number(line: str, problem: str) -> None:
    good = '{"ok": true}'
    data = _lines(*([good] * 1233), line, good).replace(b"\xc3\xbf", b"\xff")
    with pytest.raises(BadRequest) as refused:
        parse_item_lines(data, source="items.jsonl")
    message = refused.value.message
    assert message.startswith("items.jsonl line 1234: "), message
    assert problem in message, message
    assert "\n" not in message


def test_a_file_without_items_is_refused() -> None:
    with pytest.raises(BadRequest, match="holds no items"):
        parse_item_lines(b"\n  \n", source="empty.jsonl")


def test_a_blank_line_is_no_item() -> None:
    assert parse_item_line("  ", where="x line 1") is None


def test_repeated_references_are_found_with_both_lines() -> None:
    items = [(1, NewItem(reference="A")), (2, NewItem()), (4, NewItem(reference="B")), (9, NewItem(reference="A"))]
    assert repeated_reference(items) == ("A", 1, 9)
    assert repeated_reference(items[:3]) is None


# --- chunks ---


def test_small_items_go_in_chunks_of_at_most_ten_thousand() -> None:
    items = [NewItem(content={"n": n}) for n in range(MAX_ITEMS_PER_ADD + 1)]
    chunks = chunk_items(items, max_bytes=10 * codec.MAX_PAYLOAD_BYTES)
    assert [len(chunk) for chunk in chunks] == [MAX_ITEMS_PER_ADD, 1]
    assert [item for chunk in chunks for item in chunk] == items  # in order, none lost
    # With the real budget, the bytes bind first even for tiny items.
    chunks = chunk_items(items)
    assert len(chunks) == 2 and all(len(chunk) < MAX_ITEMS_PER_ADD for chunk in chunks)
    assert [item for chunk in chunks for item in chunk] == items
    assert len(codec.dump(ItemAdd(queue="q", items=chunks[0]))) <= ADD_CHUNK_MAX_BYTES


def test_large_items_go_in_chunks_under_the_size_limit() -> None:
    # Each item near the content limit: a chunk holds a handful, and its request fits one message.
    items = [NewItem(content={"blob": "é" * 30_000, "n": n}, reference=f"R-{n}") for n in range(40)]
    chunks = chunk_items(items)
    assert len(chunks) > 1
    assert [item for chunk in chunks for item in chunk] == items
    for chunk in chunks:
        size = len(codec.dump(ItemAdd(queue="q" * 63, items=chunk, dry_run=True, request_id="k" * 64)))
        assert size <= ADD_CHUNK_MAX_BYTES < codec.MAX_PAYLOAD_BYTES
        assert len(chunk) <= MAX_ITEMS_PER_ADD


def test_chunk_limits_hold_at_their_edges() -> None:
    items = [NewItem(content={"n": n}) for n in range(10)]
    assert [len(chunk) for chunk in chunk_items(items, max_items=3)] == [3, 3, 3, 1]
    one = len(codec.dump(items[0]))
    assert [len(c) for c in chunk_items(items, max_bytes=2 * one, overhead_bytes=0)] == [2] * 5
    # An item larger than the budget on its own still goes, alone.
    assert [len(c) for c in chunk_items(items, max_bytes=1, overhead_bytes=0)] == [1] * 10
    assert chunk_items([]) == []


def test_chunk_keys_are_the_same_for_the_same_file_and_differ_otherwise() -> None:
    digest = file_digest("invoices", b'{"a": 1}\n')
    keys = [chunk_key(digest, n) for n in range(3)]
    assert keys == [chunk_key(file_digest("invoices", b'{"a": 1}\n'), n) for n in range(3)]
    assert len(set(keys)) == 3
    assert chunk_key(file_digest("other", b'{"a": 1}\n'), 0) != keys[0]
    assert chunk_key(file_digest("invoices", b'{"a": 2}\n'), 0) != keys[0]
    for key in (*keys, chunk_key(digest, 99_999)):
        assert re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key), key


def test_a_services_message_about_an_item_names_the_files_line() -> None:
    numbers = [5, 7, 1234]
    assert name_lines("invalid ItemAdd: items.2.content.amount: must be a number", numbers) == (
        "invalid ItemAdd: line 1234.content.amount: must be a number"
    )
    assert name_lines("items[1]: reference 'A' exists already", numbers) == "line 7: reference 'A' exists already"
    assert name_lines("items.9: out of range", numbers) == "items.9: out of range"
    assert name_lines("no items here", numbers) == "no items here"


# --- times and durations ---


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-03-02T17:00:00Z", datetime(2026, 3, 2, 17, 0, tzinfo=UTC)),
        ("2026-03-02T17:00:00+02:00", datetime(2026, 3, 2, 15, 0, tzinfo=UTC)),
        ("2026-03-02T17:00", datetime(2026, 3, 2, 17, 0, tzinfo=UTC)),
        ("2026-03-02", datetime(2026, 3, 2, tzinfo=UTC)),
        ("+2h", NOW + timedelta(hours=2)),
        ("-1d", NOW - timedelta(days=1)),
        ("+1h30m", NOW + timedelta(minutes=90)),
        ("now", NOW),
    ],
)
def test_times_are_iso_or_relative_and_always_utc(text: str, moment: datetime) -> None:
    parsed = parse_moment(text, what="--deadline", now=NOW)
    assert parsed == moment and parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("bad", ["", "tomorrow", "+", "-", "+2 hours", "2026-13-01", "+-2h"])
def test_a_bad_time_says_how_to_write_one(bad: str) -> None:
    with pytest.raises(Failed) as refused:
        parse_moment(bad, what="--since", now=NOW)
    assert refused.value.exit_code == EXIT_USAGE
    assert refused.value.message.startswith("--since")
    assert "ISO 8601" in refused.value.message or "30s" in refused.value.message


def test_durations_reuse_the_cli_parser() -> None:
    assert parse_span("1h30m", what="--lease") == timedelta(minutes=90)
    with pytest.raises(Failed, match="--lease: '5 minutes' is not a duration"):
        parse_span("5 minutes", what="--lease")


# --- settings ---


def test_create_takes_the_defaults_for_what_is_not_given() -> None:
    settings = apply_settings(QueueSettings(), settings_changes())
    assert settings == QueueSettings()
    assert settings.lease_s == 1800 and settings.max_retries == 0


def test_options_set_their_settings(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "required": ["invoice"]}')
    changes = settings_changes(
        description="Invoices from the EU portal",
        max_retries=3,
        retry_abandoned=True,
        lease="10m",
        abandon_new_after="2d",
        sla="60",
        risk="15",
        schema=str(schema),
        unique_references=True,
        robot_groups=["finance"],
        robots=["r1", "r2"],
    )
    settings = apply_settings(QueueSettings(), changes)
    assert settings.lease_s == 600 and settings.abandon_new_after_s == 2 * 86400
    assert settings.sla_minutes == 60 and settings.risk_minutes == 15
    assert settings.content_schema == {"type": "object", "required": ["invoice"]}
    assert settings.unique_references and settings.retry_abandoned and settings.max_retries == 3
    assert settings.robot_groups == ["finance"] and settings.robots == ["r1", "r2"]


def test_update_changes_only_what_is_given_and_none_clears() -> None:
    current = QueueSettings(
        description="d", max_retries=2, sla_minutes=60, risk_minutes=10, abandon_new_after_s=60, robots=["r1"]
    )
    changed = apply_settings(current, settings_changes(risk="none", abandon_new_after="none", max_retries=5))
    assert changed.risk_minutes is None and changed.abandon_new_after_s is None and changed.max_retries == 5
    assert changed.sla_minutes == 60 and changed.description == "d" and changed.robots == ["r1"]
    assert settings_changes(unique_references=False) == {"unique_references": False}
    assert settings_changes() == {}


def test_any_robot_clears_both_lists_before_the_new_ones() -> None:
    current = QueueSettings(robot_groups=["g"], robots=["r1"])
    assert apply_settings(current, settings_changes(any_robot=True)).robots == []
    changed = apply_settings(current, settings_changes(any_robot=True, robots=["r2"]))
    assert changed.robot_groups == [] and changed.robots == ["r2"]
    kept = apply_settings(current, settings_changes(robots=["r3"]))
    assert kept.robot_groups == ["g"] and kept.robots == ["r3"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"risk": "10"}, "--risk needs --sla"),
        ({"sla": "10", "risk": "10"}, "--risk must be smaller than --sla"),
        ({"robots": ["two words"]}, "--robot: must be 1 to 63"),
        ({"description": "a\x00b"}, "--description: "),
    ],
)
def test_refused_settings_name_the_option(changes: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        apply_settings(QueueSettings(), settings_changes(**changes))  # type: ignore[arg-type]
    assert message in refused.value.message, refused.value.message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lease": "500ms"}, "--lease must be 1s to 7d"),
        ({"lease": "8d"}, "--lease must be 1s to 7d"),
        ({"abandon_new_after": "0s"}, "--abandon-new-after must be more than 0s"),
        ({"sla": "0"}, "--sla must be 1 to 525600 minutes"),
        ({"sla": "an hour"}, "--sla 'an hour' is not a number of minutes"),
        ({"lease": "soon"}, "--lease: 'soon' is not a duration"),
    ],
)
def test_out_of_range_options_are_usage_errors(changes: dict[str, str], message: str) -> None:
    with pytest.raises(Failed) as refused:
        settings_changes(**changes)  # type: ignore[arg-type]
    assert refused.value.exit_code == EXIT_USAGE and message in refused.value.message


# --- filters ---


def test_no_filter_options_give_the_empty_filter() -> None:
    assert item_filter() == ItemFilter()


def test_filter_options_make_the_filter() -> None:
    chosen = item_filter(
        states=[ItemState.FAILED, ItemState.ABANDONED, ItemState.FAILED],
        reference="INV-2026-*",
        tags="+urgent;-manual",
        robot="r1",
        since="-1d",
        until="2026-03-01T11:00:00+01:00",
        now=NOW,
    )
    assert chosen == ItemFilter(
        states=[ItemState.FAILED, ItemState.ABANDONED],
        reference="INV-2026-*",
        tags="+urgent;-manual",
        robot="r1",
        created_after=NOW - timedelta(days=1),
        created_before=datetime(2026, 3, 1, 10, 0, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [({"tags": "a b"}, "--tag: must be tags separated by ';'"), ({"robot": "r.1"}, "--robot: must be 1 to 63")],
)
def test_a_bad_filter_names_its_option(options: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        item_filter(**options)  # type: ignore[arg-type]
    assert message in refused.value.message


def test_item_ids_are_whole() -> None:
    assert check_item_id("0" * 32) == "0" * 32
    with pytest.raises(Failed, match=r"^--id 'abc' is not an item id"):
        check_item_id("abc", "--id")
    with pytest.raises(Failed, match=r"^'A{32}' is not an item id"):
        check_item_id("A" * 32)


# --- showing ---


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.35, "0.35 s"), (4.25, "4.2 s"), (42.4, "42 s"), (1800, "30m"), (5400, "1h 30m"), (90061, "1d 1h")],
)
def test_spans_read_like_people_write_them(seconds: float | None, text: str) -> None:
    assert span(seconds) == text


def _item(**fields: object) -> ItemInfo:
    return ItemInfo.model_validate({"id": "a" * 32, "queue": "invoices", "state": "New", "created_at": NOW, **fields})


def test_every_state_is_counted_in_order_zeros_too() -> None:
    fields = dict(stats_fields(QueueStats(counts={"New": 3, "Failed": 1}, processed=0)))
    assert fields["items"] == "New 3, InProgress 0, Successful 0, Failed 1, Abandoned 0, Retried 0, Deleted 0"
    assert fields["processed"] == "0"
    timed = dict(stats_fields(QueueStats(processed=12, average_processing_s=3.21, p95_processing_s=8.0)))
    assert timed["processed"] == "12 (average 3.2 s, p95 8 s)"


def test_settings_read_as_sentences() -> None:
    fields = dict(settings_fields(QueueSettings(sla_minutes=60, risk_minutes=15, robot_groups=["finance"])))
    assert fields["lease"] == "30m" and fields["abandon New after"] == "never"
    assert fields["SLA"] == "60 min, at risk 15 min before"
    assert fields["robots"] == "groups finance"
    assert dict(settings_fields(QueueSettings()))["robots"] == "every robot of the tenant"


def test_queue_rows_fit_their_columns() -> None:
    queue = QueueInfo(name="invoices", tenant="default", settings=QueueSettings(description="EU"), created_at=NOW)
    with_counts = queue_row(queue, QueueStats(counts={"New": 7, "InProgress": 2}))
    assert with_counts == ("invoices", 7, 2, 0, "30m", None, "EU")
    assert len(with_counts) == len(QUEUE_COLUMNS)
    assert len(queue_row(queue, None)) == len(QUEUE_COLUMNS_NO_COUNTS)


def test_item_rows_and_fields() -> None:
    failed = _item(
        state="Failed", exception="application", reason="portal down", reference="INV-1", tags=["eu"], attempt=2
    )
    row = item_row(failed)
    assert len(row) == len(ITEM_COLUMNS)
    assert row[:3] == ("a" * 32, "Failed (application)", "INV-1") and row[-1] == "portal down"
    postponed = _item(postpone_until=datetime.now(UTC) + timedelta(hours=1))
    assert item_row(postponed)[1] == "New (postponed)"
    fields = dict(
        item_fields(failed.model_copy(update={"content": {"a": [1, 2]}, "exception": ExceptionKind.BUSINESS}))
    )
    assert fields["content"] == '{"a": [1, 2]}' and fields["output"] == "-" and fields["exception"] == "business"
    assert fields["created"] == "2026-03-01 12:00:00 UTC by -"


# --- the commands, before they connect ---


@pytest.mark.parametrize(
    ("args", "message", "exit_code"),
    [
        (["queue", "add", "q"], "say what to add: --content JSON or --file", 2),
        (["queue", "add", "q", "--content", "[1]"], "--content: not a JSON object", 1),
        (["queue", "add", "q", "--content", "{}", "--deadline", "soon"], "--deadline 'soon' is not a time", 2),
        (["queue", "add", "bad name", "--content", "{}"], "name: must be 1 to 63", 1),
        (["queue", "retry", "q"], "say which items to retry", 2),
        (["queue", "delete-items", "q", "--id", "x"], "--id 'x' is not an item id", 2),
        (["queue", "delete-items", "q", "--id", "a" * 32, "--state", "New"], "not both", 2),
        (["queue", "retry", "q", "--state", "Failed"], "add --yes to go ahead", 2),
        (["queue", "item", "xyz"], "'xyz' is not an item id", 2),
        (["queue", "update", "q"], "nothing to change", 2),
        (["queue", "create", "q", "--risk", "5"], "--risk needs --sla", 1),
    ],
)
def test_bad_command_lines_are_one_line_before_connecting(
    args: list[str],
    message: str,
    exit_code: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HERDER_DATA_DIR", str(tmp_path / "no-stack"))  # connecting would fail otherwise
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    monkeypatch.setattr("sys.argv", ["herder", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == exit_code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("herder: ") and message in lines[0], lines


def test_a_bad_line_of_a_file_is_named_before_connecting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f'{{"n": {n}}}\n' for n in range(1, 1234)) + '{"n": }\n{"n": 1235}\n')
    monkeypatch.setenv("HERDER_DATA_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setattr("sys.argv", ["herder", "queue", "add", "q", "--file", str(items), "--json"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    error = json.loads(capsys.readouterr().err)["error"]
    assert error["code"] == "bad_request"
    assert error["message"].startswith(f"{items} line 1234: not valid JSON")


def test_a_deadline_in_another_zone_is_kept_as_the_same_moment() -> None:
    item = parse_item_line('{"content": {}, "deadline": "2026-03-02T17:00:00-05:00"}', where="f line 1")
    assert item is not None and item.deadline is not None
    assert item.deadline.astimezone(UTC) == datetime(2026, 3, 2, 22, 0, tzinfo=UTC)


# --- a service's refusals, in the command line's words ---


def test_a_refusal_of_settings_names_the_options() -> None:
    with pytest.raises(BadRequest) as refused, reworded(r"\bsettings\.([a-z_]+)", lambda m: f"--{m.group(1)}"):
        raise BadRequest("settings.content_schema.type: not a valid JSON Schema", details={"a": 1})
    assert refused.value.message == "--content_schema.type: not a valid JSON Schema"
    assert refused.value.details == {"a": 1}
    untouched = Conflict("queue 'q' exists already")
    with pytest.raises(Conflict) as same, reworded(r"\bsettings\.", lambda m: ""):
        raise untouched
    assert same.value is untouched


def _file(lines: list[tuple[int, NewItem]], *, chunked: int | None = None) -> _FileAdd:
    adding = _FileAdd("q", "f.jsonl", b"", lines, live=False)
    if chunked is not None:  # cut into chunks of `chunked` items, as a large file would be
        adding.chunks = [[item for _, item in lines[n : n + chunked]] for n in range(0, len(lines), chunked)]
        adding.numbers = [[number for number, _ in lines[n : n + chunked]] for n in range(0, len(lines), chunked)]
    return adding


def test_a_refused_chunk_is_named_by_its_lines() -> None:
    lines = [(n, NewItem(reference=f"R-{n}")) for n in (1, 2, 4, 5, 7, 8)]
    adding = _file(lines, chunked=3)
    taken = Conflict("reference 'R-7' is in queue 'q' already; nothing was stored", details={"references": ["R-7"]})
    assert adding._refusal(taken, 1, stored=0).message == (
        "f.jsonl line 7: reference 'R-7' is in queue 'q' already; nothing was stored"
    )
    schema = BadRequest("invalid: items[2].content.n: fails the schema")
    refused = adding._refusal(schema, 1, stored=0)
    assert isinstance(refused, BadRequest)
    assert refused.message == "f.jsonl: invalid: line 8.content.n: fails the schema; nothing was stored"
    down = Unavailable("no reply within 60 s")
    after = adding._refusal(down, 1, stored=3).message
    assert after.startswith("f.jsonl lines 5 to 8: no reply within 60 s; but 3 items of the chunks before it")
    assert "run the same command again" in after


def test_bulk_counts_say_when_a_pass_was_full() -> None:
    assert _counted(ItemsChanged(queue="q", count=1)) == "1 item"
    assert _counted(ItemsChanged(queue="q", count=MAX_ITEMS_PER_ADD)) == f"{MAX_ITEMS_PER_ADD} or more items"
