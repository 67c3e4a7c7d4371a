"""`herder queue create|update|list|show|items|add|retry|delete-items|item`: work queues and their items.

Robots take the items; operators make the queues, fill them (one item, or a JSON Lines file of many),
watch them, and put right a batch that went wrong (retry or delete items by filter). A file is checked
whole before anything is stored: every line locally, then every chunk by the service with `dry_run`,
so a bad line or a refused chunk stores nothing from the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from herder.cli.context import (
    BundleOption,
    DataDirOption,
    JsonOption,
    Target,
    TokenFileOption,
    UrlOption,
    call,
    connected,
    resolve,
)
from herder.cli.output import EXIT_ERROR, EXIT_USAGE, Column, WideOption, fail, print_json, print_table, run, when
from herder.cli.tap import parse_duration
from herder.client.requests import Client
from herder.protocol import codec
from herder.protocol.errors import BadRequest, Conflict, HerderError, error_for
from herder.protocol.jobs import Priority
from herder.protocol.messages import utcnow
from herder.protocol.queues import (
    MAX_ITEM_CONTENT_BYTES,
    MAX_ITEMS_PER_ADD,
    MAX_LEASE_S,
    MAX_RETRIES,
    MAX_SCHEMA_BYTES,
    MIN_LEASE_S,
    ItemAdd,
    ItemDelete,
    ItemDetails,
    ItemFilter,
    ItemInfo,
    ItemListRequest,
    ItemRetry,
    ItemsAdded,
    ItemsChanged,
    ItemShow,
    ItemState,
    NewItem,
    QueueCreate,
    QueueDetails,
    QueueInfo,
    QueueListRequest,
    QueueSettings,
    QueueShow,
    QueueStats,
    QueueUpdate,
)
from herder.protocol.values import parse_json_object

# A file's items go in chunks of at most this many items and bytes (msgpack, as sent): well under
# the 1 MB a message may carry (codec.MAX_PAYLOAD_BYTES), with room for the headers, and for the
# reply, which lists one id per item.
ADD_CHUNK_MAX_BYTES = 512 * 1024
ADD_CHUNK_MAX_ITEMS = MAX_ITEMS_PER_ADD
# What an item-add request holds besides its items: the queue's name, the flags, the array's header.
ADD_REQUEST_OVERHEAD_BYTES = 1024
# Storing 10,000 items (each checked against the queue's schema) takes longer than a plain request.
ADD_TIMEOUT_S = 60.0
# The queues service changes at most this many items per bulk request by filter (the most ids a request
# may name); the CLI sends a filter again while a pass changes that many.
BULK_PASS_ITEMS = MAX_ITEMS_PER_ADD
BULK_TIMEOUT_S = 60.0
# A file of at least this many items shows a progress bar (on a terminal).
PROGRESS_MIN_ITEMS = 1000
# A full-form line holds an item's content and up to this much more: reference, tags, times.
_LINE_EXTRA_BYTES = 4 * 1024
# Bump when the chunking changes: a re-run must cut the same file into the same requests to replay them.
_CHUNK_KEY_VERSION = b"herder.queue-add.v1"
# `queue list` asks each queue for its counts when there are at most this many queues.
LIST_COUNTS_MAX_QUEUES = 25
ITEMS_PAGE_MAX = 1000
DEFAULT_ITEMS_LIMIT = 100
# `--sla none`, `--schema none`, …: `queue update` clears the setting.
NONE = "none"
MAX_SLA_MINUTES = 525_600
MAX_ABANDON_NEW_AFTER_S = 365 * 24 * 3600.0
ITEM_ID = re.compile(r"[0-9a-f]{32}")
STATE_ORDER = tuple(ItemState)

queue_app = typer.Typer(
    help="Work queues: items of work (invoices, applications, tickets) that robots take one at a time.",
    no_args_is_help=True,
)

# `queue list` on a narrow terminal: SLA goes first, then LEASE and MAX RETRIES; DESCRIPTION is cut to
# the room left; NAME and the counts are always whole.
QUEUE_COLUMNS = (
    Column("NAME"),
    Column("NEW"),
    Column("IN PROGRESS"),
    Column("MAX RETRIES", drop=3),
    Column("LEASE", drop=2),
    Column("SLA", drop=1),
    Column("DESCRIPTION", cut=True, min_width=20),
)
QUEUE_COLUMNS_NO_COUNTS = tuple(column for column in QUEUE_COLUMNS if column.header not in ("NEW", "IN PROGRESS"))
# `queue items` on a narrow terminal: TAGS go first, then PRIORITY, ATTEMPT, ROBOT and CREATED; the
# reference and the reason are cut; ID and STATE are always whole (commands take the whole id).
ITEM_COLUMNS = (
    Column("ID"),
    Column("STATE"),
    Column("REFERENCE", cut=True, min_width=12),
    Column("PRIORITY", drop=2),
    Column("ATTEMPT", drop=3),
    Column("ROBOT", drop=4),
    Column("CREATED (UTC)", drop=5),
    Column("TAGS", drop=1, cut=True, min_width=10),
    Column("REASON", cut=True, min_width=16),
)
CHAIN_COLUMNS = (
    Column("ATTEMPT"),
    Column("ID"),
    Column("STATE"),
    Column("EXCEPTION", drop=3),
    Column("ROBOT", drop=2),
    Column("STARTED (UTC)", drop=1),
    Column("ENDED (UTC)"),
    Column("REASON", cut=True, min_width=16),
)

# The option that sets each field of the settings, for errors that name what the user typed.
_SETTING_OPTIONS = {
    "description": "--description",
    "max_retries": "--max-retries",
    "retry_abandoned": "--retry-abandoned",
    "lease_s": "--lease",
    "abandon_new_after_s": "--abandon-new-after",
    "sla_minutes": "--sla",
    "risk_minutes": "--risk",
    "content_schema": "--schema",
    "unique_references": "--unique-references",
    "robot_groups": "--robot-group",
    "robots": "--robot",
}
_ITEM_OPTIONS = {
    "content": "--content",
    "reference": "--reference",
    "priority": "--priority",
    "deadline": "--deadline",
    "postpone_until": "--postpone",
    "tags": "--tag",
}

NameArgument = Annotated[str, typer.Argument(help="The queue's name.", show_default=False)]

# --- the options of `queue create` and `queue update` ---

DescriptionOption = Annotated[str | None, typer.Option("--description", help="What the queue's items are.")]
MaxRetriesOption = Annotated[
    int | None,
    typer.Option(
        "--max-retries",
        help="How many times an item that failed with an application exception is retried "
        "(a business exception is final). New queues: 0.",
        min=0,
        max=MAX_RETRIES,
    ),
]
RetryAbandonedOption = Annotated[
    bool | None,
    typer.Option(
        "--retry-abandoned/--no-retry-abandoned",
        help="Whether an abandoned item (its robot lost, its lease lapsed) is retried while retries last. "
        "New queues: not retried.",
        show_default=False,
    ),
]
LeaseOption = Annotated[
    str | None,
    typer.Option(
        "--lease",
        metavar="DURATION",
        help="How long a robot may hold an item without reporting progress before it is abandoned "
        "(90s, 30m, 2h). New queues: 30m.",
    ),
]
AbandonNewOption = Annotated[
    str | None,
    typer.Option(
        "--abandon-new-after",
        metavar="DURATION",
        help="How long an item may wait as New before it counts as abandoned (2h, 7d; 'none': forever, the default).",
    ),
]
SlaOption = Annotated[
    str | None,
    typer.Option(
        "--sla",
        metavar="MINUTES",
        help="Minutes an item may take from added to ended before it is past its SLA ('none': no SLA).",
    ),
]
RiskOption = Annotated[
    str | None,
    typer.Option(
        "--risk",
        metavar="MINUTES",
        help="Minutes before its SLA from which an open item counts as at risk; needs --sla ('none': off).",
    ),
]
SchemaOption = Annotated[
    str | None,
    typer.Option(
        "--schema",
        metavar="FILE.json",
        help="A JSON Schema (draft 2020-12) the content of every item added from now on must satisfy "
        "('none': any object).",
    ),
]
UniqueOption = Annotated[
    bool | None,
    typer.Option(
        "--unique-references/--no-unique-references",
        help="Whether an item's reference must be unique in the queue (applies to items added from now on). "
        "New queues: not unique.",
        show_default=False,
    ),
]
RobotGroupOption = Annotated[
    list[str] | None,
    typer.Option(
        "--robot-group",
        help="Only robots of this group may take, add and finish items; repeat for several "
        "(with --robot: either). Replaces the queue's groups.",
    ),
]
RobotOption = Annotated[
    list[str] | None,
    typer.Option("--robot", help="Only this robot may take, add and finish items; repeat for several."),
]
AnyRobotOption = Annotated[
    bool,
    typer.Option(
        "--any-robot",
        help="Clear the queue's groups and robots first (every robot of the tenant may use it), "
        "then apply --robot-group and --robot, if given.",
    ),
]

# --- the options that choose items ---

StateOption = Annotated[
    list[ItemState] | None,
    typer.Option("--state", help="Only items in this state; repeat for several.", case_sensitive=False),
]
ReferenceOption = Annotated[
    str | None,
    typer.Option("--reference", help="Only items whose reference matches: '*' stands for anything ('INV-2024-*')."),
]
TagFilterOption = Annotated[
    str | None,
    typer.Option("--tag", help="Only items with these tags: '+urgent;-manual' (tagged urgent, not manual)."),
]
RobotFilterOption = Annotated[str | None, typer.Option("--robot", help="Only items this robot holds or last held.")]
SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        metavar="TIME",
        help="Only items added at or after this time: ISO 8601 (UTC unless it says +02:00) or relative (-2h, -1d).",
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option("--until", metavar="TIME", help="Only items added before this time (as --since)."),
]
IdOption = Annotated[
    list[str] | None,
    typer.Option(
        "--id", metavar="ID", help="This item (its whole id, as 'herder queue items' shows it); repeat for several."
    ),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Count the items it would change; change nothing.")]
YesOption = Annotated[
    bool, typer.Option("--yes", "-y", help="Change the items the filter matches without asking first.")
]

# --- parsing what people type ---


def parse_span(text: str, *, what: str) -> timedelta:
    """`90s`, `30m`, `2h`, `1d`, `1h30m`: a duration, or one line (exit 2) saying how to write one."""
    try:
        return parse_duration(text)
    except BadRequest as exc:
        fail(f"{what}: {exc.message}", EXIT_USAGE)


def parse_moment(text: str, *, what: str, now: datetime | None = None) -> datetime:
    """A point in time, in UTC: ISO 8601 (UTC unless it names its offset), `now`, or relative to now
    (`+2h` ahead, `-1d` back); else one line (exit 2) saying how to write one."""
    stripped = text.strip()
    moment = now or utcnow()
    if stripped == "now":
        return moment
    if len(stripped) > 1 and stripped[0] in "+-":
        offset = parse_span(stripped[1:], what=what)
        return moment + offset if stripped[0] == "+" else moment - offset
    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        fail(
            f"{what} {text!r} is not a time; write it in ISO 8601 (2025-06-01T17:00, UTC unless it says "
            "+02:00) or relative to now (+2h, -1d, -30m)",
            EXIT_USAGE,
        )
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _optional(text: str | None, parse: Callable[[str], Any]) -> Any:
    """`parse(text)`, or None for `none`; `...` (no change) when the option was not given."""
    if text is None:
        return ...
    if text.strip().lower() == NONE:
        return None
    return parse(text)


def _minutes(text: str, what: str) -> int:
    try:
        minutes = int(text)
    except ValueError:
        fail(f"{what} {text!r} is not a number of minutes (or 'none')", EXIT_USAGE)
    if not 1 <= minutes <= MAX_SLA_MINUTES:
        fail(f"{what} must be 1 to {MAX_SLA_MINUTES} minutes (a year)", EXIT_USAGE)
    return minutes


def _lease(text: str) -> float:
    seconds = parse_span(text, what="--lease").total_seconds()
    if not MIN_LEASE_S <= seconds <= MAX_LEASE_S:
        fail(f"--lease must be {MIN_LEASE_S:g}s to {MAX_LEASE_S / 86400:g}d", EXIT_USAGE)
    return seconds


def _abandon_after(text: str) -> float:
    seconds = parse_span(text, what="--abandon-new-after").total_seconds()
    if not 0 < seconds <= MAX_ABANDON_NEW_AFTER_S:
        fail("--abandon-new-after must be more than 0s and at most 365d (or 'none')", EXIT_USAGE)
    return seconds


def _schema(text: str) -> dict[str, Any]:
    path = Path(text)
    try:
        data = sys.stdin.buffer.read() if text == "-" else path.read_bytes()
    except OSError as exc:
        fail(f"cannot read the schema file {path}: {exc.strerror or exc}")
    return parse_json_object(data, what=f"--schema {text}", max_bytes=MAX_SCHEMA_BYTES)


def settings_changes(
    *,
    description: str | None = None,
    max_retries: int | None = None,
    retry_abandoned: bool | None = None,
    lease: str | None = None,
    abandon_new_after: str | None = None,
    sla: str | None = None,
    risk: str | None = None,
    schema: str | None = None,
    unique_references: bool | None = None,
    robot_groups: Sequence[str] | None = None,
    robots: Sequence[str] | None = None,
    any_robot: bool = False,
) -> dict[str, Any]:
    """The settings the options change, by field name (an option not given changes nothing)."""
    changes: dict[str, Any] = {
        "description": description,
        "max_retries": max_retries,
        "retry_abandoned": retry_abandoned,
        "unique_references": unique_references,
    }
    changes = {field: value for field, value in changes.items() if value is not None}
    parsed = {
        "lease_s": ... if lease is None else _lease(lease),
        "abandon_new_after_s": _optional(abandon_new_after, _abandon_after),
        "sla_minutes": _optional(sla, lambda text: _minutes(text, "--sla")),
        "risk_minutes": _optional(risk, lambda text: _minutes(text, "--risk")),
        "content_schema": _optional(schema, _schema),
    }
    changes.update({field: value for field, value in parsed.items() if value is not ...})
    if any_robot:
        changes.update(robot_groups=[], robots=[])
    if robot_groups:
        changes["robot_groups"] = list(robot_groups)
    if robots:
        changes["robots"] = list(robots)
    return changes


def apply_settings(base: QueueSettings, changes: dict[str, Any]) -> QueueSettings:
    """`base` with `changes`, checked; `BadRequest` naming the option when the result is refused."""
    try:
        return QueueSettings.model_validate({**base.model_dump(), **changes})
    except ValidationError as exc:
        raise refused_options(exc, _SETTING_OPTIONS) from None


def refused_options(exc: ValidationError, options: dict[str, str]) -> BadRequest:
    """A validation failure of a model built from options, as one line naming the options."""
    problems = codec.invalid("", exc).details["errors"]
    said = []
    for problem in problems[:3]:
        field = problem["field"].partition(".")[0]
        if field in options:
            said.append(f"{options[field]}: {problem['problem']}")
        else:  # a rule across fields: name the options in its words
            text = problem["problem"]
            for name, option in options.items():
                text = re.sub(rf"\b{name}\b", option, text)
            said.append(text)
    return BadRequest("; ".join(said))


def item_filter(
    *,
    states: Sequence[ItemState] | None = None,
    reference: str | None = None,
    tags: str | None = None,
    robot: str | None = None,
    since: str | None = None,
    until: str | None = None,
    now: datetime | None = None,
) -> ItemFilter:
    """The filter the options give (none given: every item); `BadRequest` naming a refused option."""
    try:
        return ItemFilter(
            states=list(dict.fromkeys(states or ())),
            reference=reference,
            tags=tags,
            robot=robot,
            created_after=parse_moment(since, what="--since", now=now) if since else None,
            created_before=parse_moment(until, what="--until", now=now) if until else None,
        )
    except ValidationError as exc:
        raise refused_options(
            exc, {"states": "--state", "reference": "--reference", "tags": "--tag", "robot": "--robot"}
        ) from None


def check_item_id(text: str, what: str = "") -> str:
    """`text` when it is an item's id (32 hex digits); one line (exit 2) otherwise."""
    if ITEM_ID.fullmatch(text) is None:
        said = f"{what} {text!r}" if what else repr(text)
        fail(f"{said} is not an item id: 32 hex digits, as 'herder queue items' shows them", EXIT_USAGE)
    return text


@contextmanager
def reworded(pattern: str, replace: Callable[[re.Match[str]], str]) -> Iterator[None]:
    """Let a service's refusal through with the words of the command line: what `pattern` matches in
    its message becomes what `replace` makes of it (field names become option names)."""
    try:
        yield
    except HerderError as error:
        message = re.sub(pattern, replace, error.message)
        if message == error.message:
            raise
        raise error_for(error.code.value, message, error.details) from None


# --- files of items ---


def parse_item_line(line: bytes | str, *, where: str) -> NewItem | None:
    """The item one line of a JSON Lines file holds (None for a blank line); `BadRequest` starting with
    `where` ("items.jsonl line 7") saying what is wrong.

    A line is either the item's content, `{"amount": 12}`, or, when it has a top-level "content" key,
    the full form `{"content": {...}, "reference": ..., "priority": ..., "deadline": ...,
    "postpone_until": ..., "tags": [...]}`."""
    if not line.strip():
        return None
    try:
        value = parse_json_object(line, what="", max_bytes=MAX_ITEM_CONTENT_BYTES + _LINE_EXTRA_BYTES)
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc.message}") from None
    try:
        item = NewItem.model_validate(_in_utc(value)) if "content" in value else NewItem(content=value)
    except ValidationError as exc:
        problems = codec.invalid("", exc).details["errors"]
        said = "; ".join(f"{problem['field']}: {problem['problem']}" for problem in problems[:3])
        raise BadRequest(f"{where}: {said}") from None
    return item


def _in_utc(value: dict[str, Any]) -> dict[str, Any]:
    # A time without an offset is UTC, as herder shows times (the wire takes only times that say).
    update = {}
    for field in ("deadline", "postpone_until"):
        text = value.get(field)
        if isinstance(text, str):
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                continue  # the model says what is wrong with it
            if moment.tzinfo is None:
                update[field] = moment.replace(tzinfo=UTC).isoformat()
    return {**value, **update} if update else value


def parse_item_lines(data: bytes, *, source: str) -> list[tuple[int, NewItem]]:
    """Every item of a JSON Lines file, with its line number (from 1; blank lines are skipped); the
    first bad line raises `BadRequest` naming `source` and its number."""
    items = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        item = parse_item_line(line.rstrip(b"\r"), where=f"{source} line {number}")
        if item is not None:
            items.append((number, item))
    if not items:
        raise BadRequest(f"{source} holds no items: give one JSON object per line")
    return items


def repeated_reference(lines: Sequence[tuple[int, NewItem]]) -> tuple[str, int, int] | None:
    """The first reference two lines share, with both line numbers; None when every reference is unique."""
    seen: dict[str, int] = {}
    for number, item in lines:
        if item.reference is None:
            continue
        if item.reference in seen:
            return item.reference, seen[item.reference], number
        seen[item.reference] = number
    return None


def chunk_items(
    items: Sequence[NewItem],
    *,
    max_items: int = ADD_CHUNK_MAX_ITEMS,
    max_bytes: int = ADD_CHUNK_MAX_BYTES,
    overhead_bytes: int = ADD_REQUEST_OVERHEAD_BYTES,
) -> list[list[NewItem]]:
    """`items` in order, cut into chunks of at most `max_items` whose requests stay within `max_bytes`
    (each item measured as encoded, plus `overhead_bytes` per request)."""
    chunks: list[list[NewItem]] = []
    current: list[NewItem] = []
    size = overhead_bytes
    for item in items:
        item_bytes = len(codec.dump(item))
        if current and (len(current) >= max_items or size + item_bytes > max_bytes):
            chunks.append(current)
            current, size = [], overhead_bytes
        current.append(item)
        size += item_bytes
    if current:
        chunks.append(current)
    return chunks


def file_digest(queue: str, data: bytes) -> str:
    """What a file's chunk keys derive from: its bytes, the queue they go to, and how it is chunked."""
    return hashlib.sha256(b"\0".join((_CHUNK_KEY_VERSION, queue.encode(), data))).hexdigest()


def chunk_key(digest: str, number: int) -> str:
    """The idempotency key of chunk `number` (from 0) of a file: the same on every run of the same file.

    Not random, unlike herder's usual keys: a re-run must present it again. That is safe here: the
    reply holds only item ids, and the service refuses a key presented by another principal."""
    return f"queue-add:{digest[:40]}:{number}"


def name_lines(message: str, numbers: Sequence[int]) -> str:
    """A service's message about `items[3]` (or `items.3`) of a chunk, with the file's line numbers."""

    def line(match: re.Match[str]) -> str:
        index = int(match.group(1) or match.group(2))
        return f"line {numbers[index]}" if 0 <= index < len(numbers) else match.group(0)

    return re.sub(r"\bitems(?:\.(\d+)|\[(\d+)\])", line, message)


# --- showing things ---


def span(seconds: float | None) -> str:
    """A duration as people read it: 0.35 s, 42 s, 30m, 1h 30m, 2d."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    parts = []
    rest = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts[:2])


def _sla(settings: QueueSettings) -> str:
    if settings.sla_minutes is None:
        return "none"
    risk = f", at risk {settings.risk_minutes} min before" if settings.risk_minutes else ""
    return f"{settings.sla_minutes} min{risk}"


def _who(settings: QueueSettings) -> str:
    if not settings.robot_groups and not settings.robots:
        return "every robot of the tenant"
    parts = []
    if settings.robot_groups:
        parts.append("groups " + ", ".join(settings.robot_groups))
    if settings.robots:
        parts.append("robots " + ", ".join(settings.robots))
    return "; ".join(parts)


def settings_fields(settings: QueueSettings) -> list[tuple[str, str]]:
    """A queue's settings as label and text, in the order `queue show` prints them."""
    schema = settings.content_schema
    return [
        ("description", settings.description or "-"),
        ("max retries", str(settings.max_retries)),
        ("retry abandoned", "yes" if settings.retry_abandoned else "no"),
        ("lease", span(settings.lease_s)),
        ("abandon New after", span(settings.abandon_new_after_s) if settings.abandon_new_after_s else "never"),
        ("SLA", _sla(settings)),
        ("schema", f"a JSON Schema of {len(json.dumps(schema))} bytes (--json shows it)" if schema else "none"),
        ("unique references", "yes" if settings.unique_references else "no"),
        ("robots", _who(settings)),
    ]


def stats_fields(stats: QueueStats) -> list[tuple[str, str]]:
    """A queue's figures as label and text: items per state (every state, zeros too), times, SLA."""
    counts = ", ".join(f"{state.value} {stats.counts.get(state.value, 0)}" for state in STATE_ORDER)
    times = (
        f"{stats.processed} (average {span(stats.average_processing_s)}, p95 {span(stats.p95_processing_s)})"
        if stats.processed
        else "0"
    )
    return [("items", counts), ("processed", times), ("past SLA", str(stats.past_sla)), ("at risk", str(stats.at_risk))]


def queue_row(queue: QueueInfo, stats: QueueStats | None) -> tuple[Any, ...]:
    """A row of `queue list`; without `stats`, no counts."""
    settings = queue.settings
    row: tuple[Any, ...] = (
        queue.name,
        settings.max_retries,
        span(settings.lease_s),
        f"{settings.sla_minutes} min" if settings.sla_minutes else None,
        settings.description or None,
    )
    if stats is None:
        return row
    counts = (stats.counts.get(ItemState.NEW.value, 0), stats.counts.get(ItemState.IN_PROGRESS.value, 0))
    return (row[0], *counts, *row[1:])


def _state(item: ItemInfo) -> str:
    if item.state is ItemState.NEW and item.postpone_until and item.postpone_until > utcnow():
        return "New (postponed)"
    if item.state is ItemState.FAILED and item.exception:
        return f"Failed ({item.exception.value})"
    return item.state.value


def item_row(item: ItemInfo) -> tuple[Any, ...]:
    """A row of `queue items`."""
    return (
        item.id,
        _state(item),
        item.reference,
        item.priority.value,
        item.attempt,
        item.robot,
        when(item.created_at),
        ";".join(item.tags) or None,
        item.reason or item.progress or None,
    )


def chain_row(item: ItemInfo, shown: str) -> tuple[Any, ...]:
    """A row of an item's retry chain; the item `queue item` shows is marked."""
    return (
        f"{item.attempt} *" if item.id == shown else str(item.attempt),
        item.id,
        item.state.value,
        item.exception.value if item.exception else None,
        item.robot,
        when(item.started_at),
        when(item.ended_at),
        item.reason or None,
    )


def _at(moment: datetime | None, suffix: str = "") -> str:
    return f"{when(moment)} UTC{suffix}" if moment else "-"


def item_fields(item: ItemInfo) -> list[tuple[str, str]]:
    """Every field of an item as label and text, content and output as JSON."""
    holder = "-"
    if item.robot:
        holder = item.robot + (f" (job {item.job_id})" if item.job_id else "")
    lease = "-"
    if item.lease:
        lease = str(item.lease) + (f", expires {_at(item.lease_expires_at)}" if item.lease_expires_at else "")
    return [
        ("id", item.id),
        ("queue", item.queue),
        ("state", item.state.value),
        ("reference", item.reference or "-"),
        ("priority", item.priority.value),
        ("tags", ", ".join(item.tags) or "-"),
        ("deadline", _at(item.deadline)),
        ("postponed until", _at(item.postpone_until)),
        ("progress", item.progress or "-"),
        ("robot", holder),
        ("lease", lease),
        ("attempt", str(item.attempt)),
        ("retry of", item.retry_of or "-"),
        ("retried by", item.retried_by or "-"),
        ("created", _at(item.created_at, f" by {item.created_by or '-'}")),
        ("started", _at(item.started_at)),
        ("ended", _at(item.ended_at)),
        ("updated", _at(item.updated_at)),
        ("exception", item.exception.value if item.exception else "-"),
        ("reason", item.reason or "-"),
        ("content", json.dumps(item.content)),
        ("output", json.dumps(item.output) if item.output is not None else "-"),
    ]


def _print_fields(fields: Sequence[tuple[str, str]]) -> None:
    for label, value in fields:
        print(f"{label:<18} {value}")


def _plural(count: int, word: str = "item") -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@asynccontextmanager
async def _client(target: Target) -> AsyncIterator[Client]:
    async with connected(target, "herder-cli") as nc:
        yield Client(nc, token=target.token, tenant=target.tenant)


# --- the commands ---


@queue_app.command("create")
def create(
    name: NameArgument,
    description: DescriptionOption = None,
    max_retries: MaxRetriesOption = None,
    retry_abandoned: RetryAbandonedOption = None,
    lease: LeaseOption = None,
    abandon_new_after: AbandonNewOption = None,
    sla: SlaOption = None,
    risk: RiskOption = None,
    schema: SchemaOption = None,
    unique_references: UniqueOption = None,
    robot_groups: RobotGroupOption = None,
    robots: RobotOption = None,
    any_robot: AnyRobotOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a queue; what it is not told, it takes from the defaults (see each option)."""
    changes = settings_changes(
        description=description,
        max_retries=max_retries,
        retry_abandoned=retry_abandoned,
        lease=lease,
        abandon_new_after=abandon_new_after,
        sla=sla,
        risk=risk,
        schema=schema,
        unique_references=unique_references,
        robot_groups=robot_groups,
        robots=robots,
        any_robot=any_robot,
    )
    request = QueueCreate(name=name, settings=apply_settings(QueueSettings(), changes))
    target = resolve(data_dir, url, token_file, bundle)
    with reworded(r"\bsettings\.([a-z_]+)", lambda match: _SETTING_OPTIONS.get(match.group(1), match.group(0))):
        created = call(target, lambda c: c.request(request))
    if json_out:
        print_json(created)
        return
    print(f"created queue {created.name}")


@queue_app.command("update")
def update(
    name: NameArgument,
    description: DescriptionOption = None,
    max_retries: MaxRetriesOption = None,
    retry_abandoned: RetryAbandonedOption = None,
    lease: LeaseOption = None,
    abandon_new_after: AbandonNewOption = None,
    sla: SlaOption = None,
    risk: RiskOption = None,
    schema: SchemaOption = None,
    unique_references: UniqueOption = None,
    robot_groups: RobotGroupOption = None,
    robots: RobotOption = None,
    any_robot: AnyRobotOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change a queue's settings: only those given; the rest stay as they are ('none' clears an
    optional one). A new schema or uniqueness rule applies to items added from then on."""
    changes = settings_changes(
        description=description,
        max_retries=max_retries,
        retry_abandoned=retry_abandoned,
        lease=lease,
        abandon_new_after=abandon_new_after,
        sla=sla,
        risk=risk,
        schema=schema,
        unique_references=unique_references,
        robot_groups=robot_groups,
        robots=robots,
        any_robot=any_robot,
    )
    if not changes:
        fail("nothing to change: give the settings to change (see 'herder queue update --help')", EXIT_USAGE)
    QueueShow(name=name)  # a malformed name is refused before connecting
    target = resolve(data_dir, url, token_file, bundle)
    with reworded(r"\bsettings\.([a-z_]+)", lambda match: _SETTING_OPTIONS.get(match.group(1), match.group(0))):
        before, after = run(lambda: _update(target, name, changes))
    if json_out:
        print_json(after)
        return
    old = dict(settings_fields(before.settings))
    changed = [
        f"{label} {old[label]} → {text}" for label, text in settings_fields(after.settings) if old[label] != text
    ]
    print(f"updated queue {after.name}: " + ("; ".join(changed) if changed else "nothing changed"))


async def _update(target: Target, name: str, changes: dict[str, Any]) -> tuple[QueueInfo, QueueInfo]:
    # QueueUpdate takes every setting: read them, change what was asked, send them all back.
    async with _client(target) as client:
        current = (await client.request(QueueShow(name=name))).queue
        settings = apply_settings(current.settings, changes)
        return current, await client.request(QueueUpdate(name=name, settings=settings))


@queue_app.command("list")
def list_queues(
    counts: Annotated[
        bool,
        typer.Option(
            "--counts/--no-counts",
            help=f"Ask each queue for its New and InProgress counts (done for up to {LIST_COUNTS_MAX_QUEUES} "
            "queues; 'herder queue show NAME' has them for any).",
        ),
    ] = True,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the queues, by name, with how many items wait and are in progress.

    With --json, each queue comes with its "stats" (as 'queue show' has them), or null when the
    counts were left out."""
    listed = run(lambda: _list(resolve(data_dir, url, token_file, bundle), counts))
    if json_out:
        print_json(
            [
                {**queue.model_dump(mode="json"), "stats": stats.model_dump(mode="json") if stats else None}
                for queue, stats in listed
            ]
        )
        return
    if not listed:
        print("no queues yet; create one with 'herder queue create NAME'", file=sys.stderr)
        return
    with_counts = all(stats is not None for _, stats in listed)
    if counts and not with_counts:
        print(
            f"more than {LIST_COUNTS_MAX_QUEUES} queues: counts left out ('herder queue show NAME' has them)",
            file=sys.stderr,
        )
    print_table(
        QUEUE_COLUMNS if with_counts else QUEUE_COLUMNS_NO_COUNTS,
        [queue_row(queue, stats) for queue, stats in listed],
        wide=wide,
    )


async def _list(target: Target, counts: bool) -> list[tuple[QueueInfo, QueueStats | None]]:
    # The list has no counts; each queue's come from queue_show, one request per queue (at once), which
    # is cheap enough for the handful of queues a tenant usually has.
    async with _client(target) as client:
        queues = (await client.request(QueueListRequest())).queues
        if not counts or len(queues) > LIST_COUNTS_MAX_QUEUES:
            return [(queue, None) for queue in queues]
        details = await asyncio.gather(*(client.request(QueueShow(name=queue.name)) for queue in queues))
        return [(shown.queue, shown.stats) for shown in details]


@queue_app.command("show")
def show(
    name: NameArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show a queue: its settings, its items per state, processing times, and items past or near their SLA."""
    request = QueueShow(name=name)  # a malformed name is refused before connecting
    shown: QueueDetails = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(request))
    if json_out:
        print_json(shown)
        return
    queue = shown.queue
    _print_fields(
        [
            ("name", queue.name),
            ("created", _at(queue.created_at, f" by {queue.created_by or '-'}")),
            *settings_fields(queue.settings),
            *stats_fields(shown.stats),
        ]
    )


@queue_app.command("items")
def items(
    name: NameArgument,
    states: StateOption = None,
    reference: ReferenceOption = None,
    tags: TagFilterOption = None,
    robot: RobotFilterOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[
        int, typer.Option("--limit", help="At most this many items, oldest first.", min=1)
    ] = DEFAULT_ITEMS_LIMIT,
    every: Annotated[bool, typer.Option("--all", help="Every matching item, however many (page after page).")] = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List a queue's items, oldest first: their state, reference, holder and why they failed."""
    chosen = item_filter(states=states, reference=reference, tags=tags, robot=robot, since=since, until=until)
    QueueShow(name=name)  # a malformed name is refused before connecting
    found, more = run(
        lambda: _items(resolve(data_dir, url, token_file, bundle), name, chosen, None if every else limit)
    )
    if json_out:
        print_json(found)
    else:
        print_table(ITEM_COLUMNS, [item_row(item) for item in found], wide=wide)
    if more:
        print(f"more items follow the first {len(found)}; --limit N or --all shows them", file=sys.stderr)


async def _items(target: Target, queue: str, chosen: ItemFilter, limit: int | None) -> tuple[list[ItemInfo], bool]:
    """Up to `limit` items (None: all), following the pages; and whether more are left."""
    found: list[ItemInfo] = []
    cursor: str | None = None
    async with _client(target) as client:
        while True:
            page_size = ITEMS_PAGE_MAX if limit is None else min(ITEMS_PAGE_MAX, limit - len(found))
            page = await client.request(ItemListRequest(queue=queue, filter=chosen, limit=page_size, cursor=cursor))
            found += page.items
            cursor = page.next_cursor
            if cursor is None or not page.items:
                return found, False
            if limit is not None and len(found) >= limit:
                return found, True


@queue_app.command("add")
def add(
    name: NameArgument,
    content: Annotated[
        str | None,
        typer.Option("--content", metavar="JSON", help="The item's content: a JSON object, like '{\"invoice\": 7}'."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", help="A JSON Lines file of items, one per line ('-': standard input).", show_default=False
        ),
    ] = None,
    reference: Annotated[
        str | None, typer.Option("--reference", help="The item's reference: how people find it (an invoice number).")
    ] = None,
    priority: Annotated[
        Priority | None, typer.Option("--priority", help="Which items robots take first. Default: Normal.")
    ] = None,
    deadline: Annotated[
        str | None,
        typer.Option(
            "--deadline",
            metavar="TIME",
            help="When it must be done: ISO 8601 (UTC unless it says +02:00) or relative (+2h, +1d). "
            "Items with a deadline are taken first.",
        ),
    ] = None,
    postpone: Annotated[
        str | None,
        typer.Option("--postpone", metavar="TIME", help="No robot takes it before this time (as --deadline)."),
    ] = None,
    tags: Annotated[list[str] | None, typer.Option("--tag", help="A tag; repeat for several.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check every item (schema, unique references) and store nothing.")
    ] = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add one item (--content) or every item of a JSON Lines file (--file), all or none.

    Each line of the file is one item, in either of two forms. A line with a top-level "content" key
    is the full form; any other object is the content itself:

    \b
        {"invoice": "INV-7", "amount": 120.5}
        {"content": {"invoice": "INV-8"}, "reference": "INV-8", "priority": "High",
         "deadline": "2025-06-01T17:00:00Z", "postpone_until": null, "tags": ["eu"]}

    (The full form is one line in the file. Content that has a "content" key of its own goes in the
    full form.) Times are ISO 8601, UTC unless they name an offset; blank lines are skipped.

    A file is checked whole before anything is stored: every line here (a bad one is named by its
    line number), then every chunk of up to 10,000 items by the queue (its schema, unique
    references). Chunks are then stored one by one, each under a key made from the file's contents,
    so running the same command again after a failure or a crash, within 24 hours, adds only what is
    missing and never an item twice.
    """
    if (content is None) == (file is None):
        fail("say what to add: --content JSON or --file items.jsonl (one of them)", EXIT_USAGE)
    target_args = (data_dir, url, token_file, bundle)
    QueueShow(name=name)  # a malformed name is refused before connecting
    if file is not None:
        if reference or priority or deadline or postpone or tags:
            fail(
                "with --file, each line gives its own reference, priority, deadline, postponement and tags", EXIT_USAGE
            )
        _add_file(name, file, dry_run, json_out, target_args)
        return
    assert content is not None
    try:
        item = NewItem(
            content=parse_json_object(content, what="--content", max_bytes=MAX_ITEM_CONTENT_BYTES),
            reference=reference,
            priority=priority or Priority.NORMAL,
            deadline=parse_moment(deadline, what="--deadline") if deadline else None,
            postpone_until=parse_moment(postpone, what="--postpone") if postpone else None,
            tags=list(tags or ()),
        )
    except ValidationError as exc:
        raise refused_options(exc, _ITEM_OPTIONS) from None
    request = ItemAdd(queue=name, items=[item], dry_run=dry_run)
    target = resolve(*target_args)
    # The one item's fields are the options that set them.
    with reworded(r"\bitems(?:\.0|\[0\])\.([a-z_]+)", lambda match: _ITEM_OPTIONS.get(match.group(1), match.group(0))):
        added = call(target, lambda c: c.request(request))
    if json_out:
        print_json(added)
    elif dry_run:
        print(f"the item would be added to queue {added.queue} (nothing stored: --dry-run)")
    else:
        print(f"added item {added.ids[0]} to queue {added.queue}")


def _add_file(queue: str, file: Path, dry_run: bool, json_out: bool, target_args: tuple[Any, ...]) -> None:
    source = "standard input" if str(file) == "-" else str(file)
    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror or exc}")
    lines = parse_item_lines(data, source=source)  # every line checked before connecting
    live = sys.stderr.isatty() and len(lines) >= PROGRESS_MIN_ITEMS
    target = resolve(*target_args)
    added, earlier = run(lambda: _FileAdd(queue, source, data, lines, live).send(target, dry_run))
    if json_out:
        print_json(added)
        return
    count = len(lines)
    if dry_run:
        print(f"{_plural(count)} of {source} would be added to queue {queue} (nothing stored: --dry-run)")
        return
    if earlier == count:
        print(f"nothing new: an earlier run of the same file added its {_plural(count)} to queue {queue}")
        return
    before = f" ({earlier} of them by an earlier run of the same file)" if earlier else ""
    print(f"added {_plural(count)} from {source} to queue {queue}{before}")


class _FileAdd:
    """The items of one file on their way into a queue: checked by chunks, then stored by chunks."""

    def __init__(self, queue: str, source: str, data: bytes, lines: list[tuple[int, NewItem]], live: bool) -> None:
        self.queue = queue
        self.source = source
        self.lines = lines
        self.digest = file_digest(queue, data)
        self.chunks = chunk_items([item for _, item in lines])
        self.live = live
        # Each chunk's line numbers, to name them in what the service says about its items.
        self.numbers: list[list[int]] = []
        position = 0
        for chunk in self.chunks:
            self.numbers.append([number for number, _ in lines[position : position + len(chunk)]])
            position += len(chunk)

    async def send(self, target: Target, dry_run: bool) -> tuple[ItemsAdded, int]:
        """Check every chunk, then (unless `dry_run`) store them; the ids added, and how many of them an
        earlier run of the same file had added."""
        async with _client(target) as client:
            await self._refuse_repeats(client)
            with _Bar(self.live) as bar:
                checked, earlier = await self._check(client, bar)
                if dry_run:
                    return ItemsAdded(queue=self.queue, ids=checked, dry_run=True), 0
                ids = await self._store(client, bar, earlier)
        return ItemsAdded(queue=self.queue, ids=ids), sum(len(found) for found in earlier.values())

    async def _refuse_repeats(self, client: Client) -> None:
        # Two lines with one reference pass each chunk's check apart, yet the second chunk would be
        # refused after the first was stored: in a unique-reference queue, refuse them here.
        repeated = repeated_reference(self.lines)
        if repeated is None:
            return
        settings = (await client.request(QueueShow(name=self.queue))).queue.settings
        if settings.unique_references:
            reference, first, second = repeated
            raise Conflict(
                f"{self.source} lines {first} and {second} have the same reference {reference!r}, and queue "
                f"{self.queue} needs unique references; nothing was stored"
            )

    async def _check(self, client: Client, bar: _Bar) -> tuple[list[str], dict[int, list[str]]]:
        """Every chunk checked (dry run): the ids the dry runs gave, and the chunks an earlier run of
        this file stored, with their ids."""
        bar.phase("checking", len(self.lines))
        checked: list[str] = []
        earlier: dict[int, list[str]] = {}
        for number, chunk in enumerate(self.chunks):
            request = ItemAdd(queue=self.queue, items=chunk, dry_run=True)
            try:
                checked += (await client.request(request, timeout=ADD_TIMEOUT_S)).ids
            except Conflict as refused:
                # A chunk that clashes with stored references may be one an earlier run stored, cut short
                # after it. Sending it for real under its key tells: the earlier reply comes back, or the
                # same refusal, and then nothing is stored either way.
                try:
                    replayed = await client.request(
                        ItemAdd(queue=self.queue, items=chunk), idempotency_key=self._key(number), timeout=ADD_TIMEOUT_S
                    )
                except Conflict:
                    raise self._refusal(refused, number, stored=0) from None
                earlier[number] = replayed.ids
            except HerderError as refused:
                raise self._refusal(refused, number, stored=0) from None
            bar.advance(len(chunk))
        return checked, earlier

    async def _store(self, client: Client, bar: _Bar, earlier: dict[int, list[str]]) -> list[str]:
        bar.phase("adding", len(self.lines))
        ids: list[str] = []
        stored = 0
        for number, chunk in enumerate(self.chunks):
            if number in earlier:
                ids += earlier[number]
            else:
                request = ItemAdd(queue=self.queue, items=chunk)
                try:
                    reply = await client.request(request, idempotency_key=self._key(number), timeout=ADD_TIMEOUT_S)
                except HerderError as refused:
                    raise self._refusal(refused, number, stored=stored) from None
                ids += reply.ids
                stored += len(chunk)
            bar.advance(len(chunk))
        return ids

    def _key(self, number: int) -> str:
        return chunk_key(self.digest, number)

    def _refusal(self, error: HerderError, number: int, *, stored: int) -> HerderError:
        """The service's refusal of chunk `number`, naming the file's lines, and what was stored before it."""
        numbers = self.numbers[number]
        said = name_lines(error.message, numbers)
        line = self._line_of_reference(error, number)
        if said != error.message:  # the message names its lines already
            where = self.source
        elif line is not None:
            where = f"{self.source} line {line}"
        elif len(self.chunks) == 1:
            where = self.source
        else:  # the message names no line: say which lines the refused chunk holds
            where = f"{self.source} lines {numbers[0]} to {numbers[-1]}"
        message = f"{where}: {said}"
        if stored:
            message += (
                f"; but {_plural(stored)} of the chunks before it had been stored: run the same command again "
                "to add the rest (within 24 hours no chunk is added twice)"
            )
        elif "nothing was stored" not in said:
            message += "; nothing was stored"
        return error_for(error.code.value, message, error.details)

    def _line_of_reference(self, error: HerderError, number: int) -> int | None:
        """The line of chunk `number` holding the reference a refusal names (in its details), if any."""
        named = error.details.get("references") or [error.details.get("reference")]
        wanted = {reference for reference in named if isinstance(reference, str)}
        for line, item in zip(self.numbers[number], self.chunks[number], strict=True):
            if item.reference in wanted:
                return line
        return None


class _Bar:
    """A progress bar on stderr, for large files on a terminal; nothing otherwise."""

    def __init__(self, live: bool) -> None:
        self._progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            if live
            else None
        )
        self._task: TaskID | None = None

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def phase(self, description: str, total: int) -> None:
        """Start a phase of `total` items (the previous one is done)."""
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, count: int) -> None:
        """`count` more items of this phase are done."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, count)


def _bulk(
    kind: type[ItemRetry] | type[ItemDelete],
    verb: tuple[str, str, str],
    queue: str,
    ids: list[str] | None,
    chosen: ItemFilter,
    every: bool,
    dry_run: bool,
    yes: bool,
    target_args: tuple[Any, ...],
    json_out: bool,
) -> None:
    """Retry or delete items named by id, or every item a filter matches (after a question on a terminal)."""
    do, doing, done = verb
    QueueShow(name=queue)  # a malformed name is refused before connecting
    named = [check_item_id(item_id, "--id") for item_id in dict.fromkeys(ids or ())]
    filtered = chosen != ItemFilter()
    if named and (filtered or every):
        fail("name the items with --id, or choose them with filters or --all; not both", EXIT_USAGE)
    if not named and not filtered and not every:
        fail(
            f"say which items to {do}: --id ID, filters (--state, --reference, --tag, --robot, --since, --until), "
            "or --all",
            EXIT_USAGE,
        )
    ask = not named and not dry_run and not yes
    if ask and not sys.stdin.isatty():
        fail(
            f"{doing} items by filter changes every item it matches at once; add --yes to go ahead without "
            "a question (or --dry-run to count them first)",
            EXIT_USAGE,
        )
    target = resolve(*target_args)
    if ask:
        counted: ItemsChanged = call(target, lambda c: c.request(kind(queue=queue, filter=chosen, dry_run=True)))
        if counted.count == 0:
            if json_out:
                print_json(counted)
            else:
                print(f"no items of queue {queue} to {do}; nothing changed", file=sys.stderr)
            return
        if not typer.confirm(f"{do.capitalize()} {_counted(counted)} of queue {queue}?", default=False, err=True):
            print("nothing changed", file=sys.stderr)
            raise typer.Exit(EXIT_ERROR)
    request = kind(queue=queue, ids=named, filter=None if named else chosen, dry_run=dry_run)
    changed = run(lambda: _change(target, request))
    if json_out:
        print_json(changed)
    elif changed.dry_run:
        print(f"would {do} {_counted(changed)} of queue {changed.queue} (nothing changed: --dry-run)")
    else:
        print(f"{done} {_plural(changed.count)} of queue {changed.queue}")


def _counted(changed: ItemsChanged) -> str:
    # A dry run by filter counts one pass: at most BULK_PASS_ITEMS.
    return f"{changed.count} or more items" if changed.count >= BULK_PASS_ITEMS else _plural(changed.count)


async def _change(target: Target, request: ItemRetry | ItemDelete) -> ItemsChanged:
    """Send a bulk change; by filter, again while a pass changes as many items as one pass can."""
    async with _client(target) as client:
        changed = await client.request(request, timeout=BULK_TIMEOUT_S)
        total = changed.count
        # What a pass changed no longer matches (it is Retried or Deleted now): the next pass goes on.
        while request.filter is not None and not request.dry_run and changed.count >= BULK_PASS_ITEMS:
            changed = await client.request(request, timeout=BULK_TIMEOUT_S)
            total += changed.count
    return changed.model_copy(update={"count": total})


@queue_app.command("retry")
def retry(
    name: NameArgument,
    ids: IdOption = None,
    states: StateOption = None,
    reference: ReferenceOption = None,
    tags: TagFilterOption = None,
    robot: RobotFilterOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    every: Annotated[bool, typer.Option("--all", help="Every Failed and Abandoned item of the queue.")] = False,
    dry_run: DryRunOption = False,
    yes: YesOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Retry Failed and Abandoned items by hand (retry limits do not apply): each becomes Retried, with a
    New copy. Name them (--id) or choose them by filter; a filter asks first, on a terminal."""
    chosen = item_filter(states=states, reference=reference, tags=tags, robot=robot, since=since, until=until)
    _bulk(
        ItemRetry,
        ("retry", "retrying", "retried"),
        name,
        ids,
        chosen,
        every,
        dry_run,
        yes,
        (data_dir, url, token_file, bundle),
        json_out,
    )


@queue_app.command("delete-items")
def delete_items(
    name: NameArgument,
    ids: IdOption = None,
    states: StateOption = None,
    reference: ReferenceOption = None,
    tags: TagFilterOption = None,
    robot: RobotFilterOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    every: Annotated[bool, typer.Option("--all", help="Every New item of the queue.")] = False,
    dry_run: DryRunOption = False,
    yes: YesOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Delete New items (they become Deleted; other states are left alone). Name them (--id) or choose
    them by filter; a filter asks first, on a terminal."""
    chosen = item_filter(states=states, reference=reference, tags=tags, robot=robot, since=since, until=until)
    _bulk(
        ItemDelete,
        ("delete", "deleting", "deleted"),
        name,
        ids,
        chosen,
        every,
        dry_run,
        yes,
        (data_dir, url, token_file, bundle),
        json_out,
    )


@queue_app.command("item")
def item(
    item_id: Annotated[
        str, typer.Argument(help="The item's id, as 'herder queue items' shows it.", show_default=False)
    ],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one item, every field, and its retry chain (first attempt first)."""
    request = ItemShow(id=check_item_id(item_id))
    shown: ItemDetails = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(request))
    if json_out:
        print_json(shown)
        return
    _print_fields(item_fields(shown.item))
    if len(shown.chain) > 1:
        print()
        print_table(CHAIN_COLUMNS, [chain_row(link, shown.item.id) for link in shown.chain], title="retry chain")
