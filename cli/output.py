"""How the CLI shows things: tables for people, JSON for programs, one line for an error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.cells import cell_len
from rich.console import Console, Group, OverflowMethod, RenderableType
from rich.table import Table
from rich.text import Text

from herder.client.errors import SetupError
from herder.protocol import codec
from herder.protocol.errors import ErrorCode, HerderError

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
# Piped output is for programs and files: no wrapping at a terminal's width.
_UNBOUNDED_WIDTH = 100_000

WideOption = Annotated[
    bool, typer.Option("--wide", help="Show every column in full, wrapping long cells, however narrow the terminal.")
]

_HINTS = {
    ErrorCode.UNAUTHENTICATED: " (give a valid token with --token-file or HERDER_TOKEN)",
}


class Failed(Exception):
    """A command stops with a message of its own (see `fail`); `report_errors` says it.

    Not a `typer.Exit`: typer, run with `standalone_mode=False`, would swallow that into an exit code.
    """

    def __init__(self, message: str, exit_code: int, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.code = code


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Stop the command with `message` and exit code `code`; `report_errors` says it on stderr.

    Its error code (under --json) is `usage` for exit code 2 (EXIT_USAGE), else `setup`.
    """
    raise Failed(message, code, "usage" if code == EXIT_USAGE else "setup")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}


def parse_size(text: str, *, what: str) -> int:
    """`500MiB`, `2GiB`, `1.5GB`, `1048576`: a size in bytes, or one line saying how to write it."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        fail(f"{what} {text!r} is not a size; write it like 500MiB or 2GiB", EXIT_USAGE)
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        fail(f"{what} must be at least 1 byte", EXIT_USAGE)
    return size


def check_new_file(path: Path, what: str) -> None:
    """Stop, before anything is asked of the stack, when `path` cannot become a new file holding `what`
    (it exists, or its folder is missing or not writable): a secret made must have somewhere to go."""
    if path.exists():
        fail(f"{path} exists already; choose a new file for {what}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        fail(f"cannot write {what} to {path}: its folder is missing or not writable")


def refuse_tokens_in_arguments(args: Sequence[str]) -> None:
    """Stop before anything runs when a token is given as an option: shell history and `ps` would keep it."""
    for arg in args:
        if arg == "--":
            return
        if arg == "--token" or arg.startswith("--token="):
            variable = "HERDER_ROBOT_TOKEN" if args[:2] == ["robot", "run"] else "HERDER_TOKEN"
            fail(
                "tokens are not taken on the command line, where shell history and 'ps' would keep them; "
                f"put the token in a file and pass --token-file FILE, or set {variable}",
                EXIT_USAGE,
            )
        if any(arg == option or arg.startswith(option + "=") for option in _SECRET_OPTIONS):
            fail(
                "secrets are not taken on the command line, where shell history and 'ps' would keep them; "
                "'herder credential set' asks for the secret at a hidden prompt, or reads it from stdin",
                EXIT_USAGE,
            )


_SECRET_OPTIONS = ("--password", "--secret")


def asks_for_json(args: Sequence[str]) -> bool:
    """Whether a command line asks for JSON (`--json` before any `--`); its errors are then JSON too."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command's coroutine; failures reach `report_errors` around the whole command."""
    return asyncio.run(main())


@contextmanager
def report_errors(*, json_errors: bool = False) -> Iterator[None]:
    """Turn every failure of a command into one line on stderr and a non-zero exit; never a traceback.

    The line is `herder: <message>`, or with `json_errors` (the command was given --json)
    `{"error": {"code": "<code>", "message": "<message>"}}`. The codes:

    - herder's error codes (`bad_request`, `unauthenticated`, `forbidden`, `not_found`, `conflict`,
      `licence_exhausted`, `unavailable`, `internal`), as a service replied them; a request the
      command-line arguments made invalid is `bad_request` too. Exit code 1.
    - `setup`: herder cannot do it as things are here (no stack is found or reachable, a token or
      bundle file is missing or unreadable, a file to write exists already). Exit code 1.
    - `usage`: the command line is wrong (a missing argument, an unknown option, a value out of
      range, a token given as an option). Exit code 2.
    - `internal`: a bug in the CLI itself (an unexpected exception). Exit code 70.

    An interrupted command (Ctrl-C, exit 130), one whose reader went away (`| head`, exit 1) and
    one that chose its exit code (`typer.Exit`) print nothing more.
    """

    def say(message: str, code: str, *, tagged: bool = False) -> None:
        if json_errors:
            _say_json(message, code)
        else:
            _say(f"{message} [{code}]" if tagged else message)

    try:
        yield
    except Failed as exc:
        say(exc.message, exc.code)
        raise SystemExit(exc.exit_code) from None
    except HerderError as exc:
        hint = "" if "--token-file" in exc.message else _HINTS.get(exc.code, "")  # the message may say it already
        say(f"{exc.message}{hint}", exc.code.value, tagged=True)
        raise SystemExit(EXIT_ERROR) from None
    except SetupError as exc:
        say(exc.message, "setup")
        raise SystemExit(EXIT_ERROR) from None
    except ValidationError as exc:  # a request built from command-line arguments
        problems = codec.invalid(exc.title, exc).details["errors"]
        message = "; ".join(f"{problem['field']}: {problem['problem']}" for problem in problems[:3])
        say(message, ErrorCode.BAD_REQUEST.value, tagged=True)
        raise SystemExit(EXIT_ERROR) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except BrokenPipeError:
        # Whoever read the output has gone (`| head`): stop quietly, and let nothing flush to the pipe.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        if _is_usage_error(exc):  # a missing argument, an unknown option, a value out of range
            context = getattr(exc, "ctx", None)
            command = getattr(context, "command_path", None) or "herder"
            say(f"{exc.format_message()} (see '{command} --help')", "usage")  # type: ignore[attr-defined]
            raise SystemExit(getattr(exc, "exit_code", EXIT_USAGE)) from None
        if os.environ.get("HERDER_DEBUG"):
            traceback.print_exc()
        say(
            f"unexpected error: {type(exc).__name__}: {exc} (set HERDER_DEBUG=1 to see the traceback, "
            "and please report it)",
            "internal",
        )
        raise SystemExit(EXIT_INTERNAL) from None


def _is_usage_error(exc: Exception) -> bool:
    # typer's usage errors (click's, in older typer releases) carry a message and an exit code.
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _say(message: str) -> None:
    print(f"herder: {_one_line(message)}", file=sys.stderr)


def _say_json(message: str, code: str) -> None:
    print(json.dumps({"error": {"code": code, "message": _one_line(message)}}), file=sys.stderr)


def _one_line(message: str) -> str:
    return " ".join(message.splitlines()).strip()


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_json(value: Any) -> None:
    """Print `value` (models included) as JSON on stdout."""
    if isinstance(value, list):
        value = [_plain(item) for item in value]
    print(json.dumps(_plain(value), indent=2, default=str))


# Columns of a table stand two cells apart (no box, no padding at the edges).
_GAP = 2


@dataclass(frozen=True)
class Column:
    """A table's column, and how it gives way when a terminal is too narrow for the whole table.

    A column is kept whole (an identifier, a state, a time) unless `cut`: free text, cut with an
    ellipsis to the room the other columns leave, and no narrower than `min_width` while a column
    can still be dropped. A column with a `drop` rank is left out on a narrow terminal, the lowest
    rank first, rather than squeezing what is kept whole; one without is always shown.
    """

    header: str
    cut: bool = False
    min_width: int = 16
    drop: int | None = None


def fit_widths(columns: Sequence[Column], natural: Sequence[int], width: int) -> dict[int, int]:
    """The columns (by index, in order) a table `width` cells wide shows, each with its width.

    `natural` is each column's widest cell, header included. Columns kept whole get their natural
    width. When that leaves too little room for the cut ones at their `min_width`, droppable columns
    go, lowest `drop` first, and when none is left to drop, cut columns go, rightmost first. The room
    left is shared among the cut columns, none wider than its natural width. Only when the columns
    kept whole do not fit on their own is the table wider than `width` (rich then folds them).
    """
    shown = list(range(len(columns)))
    droppable = sorted((i for i, c in enumerate(columns) if c.drop is not None), key=lambda i: (columns[i].drop, -i))
    floors = [min(natural[i], column.min_width) for i, column in enumerate(columns)]
    while (widths := _fit(columns, natural, floors, width, shown)) is None:
        cuts = [i for i in shown if columns[i].cut]
        if droppable:
            shown.remove(droppable.pop(0))
        elif cuts:  # free text at its narrowest does not fit: leave it out rather than show "…"
            shown.remove(cuts[-1])
        else:
            return {i: natural[i] for i in shown}
    return widths


def _fit(
    columns: Sequence[Column], natural: Sequence[int], floors: Sequence[int], width: int, shown: list[int]
) -> dict[int, int] | None:
    # The widths of the `shown` columns in `width`, or None when the cut ones cannot have their floors.
    cuts = [i for i in shown if columns[i].cut]
    room = width - sum(natural[i] for i in shown if not columns[i].cut) - _GAP * (len(shown) - 1)
    if room < sum(floors[i] for i in cuts):
        return None
    widths = {i: natural[i] for i in shown}
    widths.update(zip(cuts, _share(room, [floors[i] for i in cuts], [natural[i] for i in cuts]), strict=True))
    return widths


def _share(room: int, floors: Sequence[int], wants: Sequence[int]) -> list[int]:
    # Each gets its floor, then the rest goes evenly, the least hungry first (what one does not
    # need goes to the others), none beyond what it wants.
    widths = list(floors)
    extra = room - sum(floors)
    order = sorted(range(len(wants)), key=lambda k: wants[k] - floors[k])
    for n, k in enumerate(order):
        give = min(wants[k] - floors[k], extra // (len(order) - n))
        widths[k] += give
        extra -= give
    return widths


def make_table(
    columns: Sequence[str | Column],
    rows: Sequence[Sequence[Any]],
    *,
    width: int | None,
    wide: bool = False,
    title: str | None = None,
) -> RenderableType:
    """Lay rows out for a terminal `width` cells wide, or for no width at all (`width` None).

    On a terminal the table fits its width (see `Column` and `fit_widths`): what identifies is kept
    whole, free text is cut with an ellipsis, low-value columns are dropped. With `wide` nothing is
    cut or dropped: free text wraps onto more lines instead, and when even that cannot fit every
    column, each row is shown as a block of `HEADER value` lines. With no width (a pipe or a file)
    every column is shown whole, one line per row, for programs that parse it. A plain string
    column is a `Column` kept whole and never dropped.
    """
    specs = [column if isinstance(column, Column) else Column(column) for column in columns]
    cells = [[_cell(value) for value in row] for row in rows]
    table = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    if width is None:
        for spec in specs:
            table.add_column(spec.header, no_wrap=True)
        for row in cells:
            table.add_row(*row)
        return table
    natural = [max([cell_len(spec.header), *(row[i].cell_len for row in cells)]) for i, spec in enumerate(specs)]
    if wide:
        # Wrapped free text is no narrower than its longest word, so that no word is broken.
        longest = [
            max([0, *(cell_len(word) for row in cells for word in row[i].plain.split())]) for i in range(len(specs))
        ]
        floors = [min(natural[i], max(spec.min_width, longest[i])) for i, spec in enumerate(specs)]
        every = _fit(specs, natural, floors, width, list(range(len(specs))))
        if every is None:
            return _blocks(specs, cells, title)
        widths = every
    else:
        widths = fit_widths(specs, natural, width)
    for i, column_width in widths.items():
        spec = specs[i]
        wrap = wide and spec.cut
        overflow: OverflowMethod = "fold" if wrap or not spec.cut else "ellipsis"
        table.add_column(spec.header, width=column_width, no_wrap=not wrap, overflow=overflow)
    for row in cells:
        table.add_row(*(row[i] for i in widths))
    return table


def _blocks(specs: Sequence[Column], cells: Sequence[Sequence[Text]], title: str | None) -> RenderableType:
    # One block per row, a line per column, blank lines between: every value whole at any width.
    blocks: list[RenderableType] = [Text(title)] if title else []
    for n, row in enumerate(cells):
        block = Table.grid(padding=(0, _GAP, 0, 0))
        block.add_column(style="bold", no_wrap=True)
        block.add_column(overflow="fold")
        for spec, cell in zip(specs, row, strict=True):
            block.add_row(spec.header, cell)
        blocks += [Text(""), block] if n else [block]
    return Group(*blocks)


def print_table(
    columns: Sequence[str | Column], rows: Sequence[Sequence[Any]], *, title: str | None = None, wide: bool = False
) -> None:
    """Print rows on stdout: fitted to a terminal (see `make_table`), whole and one line per row when piped."""
    if sys.stdout.isatty():
        console = Console()
        console.print(make_table(columns, rows, width=console.width, wide=wide, title=title))
    else:
        console = Console(soft_wrap=True, width=_UNBOUNDED_WIDTH)
        console.print(make_table(columns, rows, width=None, title=title))


def _cell(value: Any) -> Text:
    # Plain text (a "[tag]" in a description is not rich markup), one line per row.
    return Text("-" if value is None else " ".join(str(value).splitlines()))


def when(moment: datetime | None) -> str | None:
    """A timestamp as people read it: UTC, to the second."""
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else None


def ago(moment: datetime | None) -> str:
    """How long ago `moment` was, roughly: '4s ago', '3m ago', '2h ago', '5d ago'."""
    if moment is None:
        return "never"
    seconds = max((datetime.now(UTC) - moment).total_seconds(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"
