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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from herder.client.errors import SetupError
from herder.protocol import codec
from herder.protocol.errors import ErrorCode, HerderError

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
# Piped output is for programs and files: no wrapping at a terminal's width.
_UNBOUNDED_WIDTH = 100_000

_HINTS = {
    ErrorCode.UNAUTHENTICATED: " (give a valid token with --token-file or HERDER_TOKEN)",
}


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print `herder: <message>` on stderr and exit with `code`."""
    _say(message)
    raise typer.Exit(code)


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


def refuse_tokens_in_arguments(args: list[str]) -> None:
    """Stop before anything runs when a token is given as an option: shell history and `ps` would keep it."""
    for arg in args:
        if arg == "--":
            return
        if arg == "--token" or arg.startswith("--token="):
            variable = "HERDER_ROBOT_TOKEN" if args[:2] == ["robot", "run"] else "HERDER_TOKEN"
            _say(
                "tokens are not taken on the command line, where shell history and 'ps' would keep them; "
                f"put the token in a file and pass --token-file FILE, or set {variable}"
            )
            raise SystemExit(EXIT_USAGE)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command's coroutine; failures reach `report_errors` around the whole command."""
    return asyncio.run(main())


@contextmanager
def report_errors() -> Iterator[None]:
    """Turn every failure of a command into one line on stderr and a non-zero exit."""
    try:
        yield
    except HerderError as exc:
        hint = "" if "--token-file" in exc.message else _HINTS.get(exc.code, "")  # the message may say it already
        _say(f"{exc.message}{hint} [{exc.code.value}]")
        raise SystemExit(EXIT_ERROR) from None
    except SetupError as exc:
        _say(exc.message)
        raise SystemExit(EXIT_ERROR) from None
    except ValidationError as exc:  # a request built from command-line arguments
        problems = codec.invalid(exc.title, exc).details["errors"]
        _say("; ".join(f"{problem['field']}: {problem['problem']}" for problem in problems[:3]) + " [bad_request]")
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
            _say(f"{exc.format_message()} (see '{command} --help')")  # type: ignore[attr-defined]
            raise SystemExit(getattr(exc, "exit_code", EXIT_USAGE)) from None
        if os.environ.get("HERDER_DEBUG"):
            traceback.print_exc()
        _say(
            f"unexpected error: {type(exc).__name__}: {exc} (set HERDER_DEBUG=1 to see the traceback, "
            "and please report it)"
        )
        raise SystemExit(EXIT_INTERNAL) from None


def _is_usage_error(exc: Exception) -> bool:
    # typer's usage errors (click's, in older typer releases) carry a message and an exit code.
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _say(message: str) -> None:
    print(f"herder: {message}", file=sys.stderr)


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


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> None:
    """Print rows as an aligned table on stdout."""
    table = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for index, column in enumerate(columns):
        # Rows stay one line each: on a terminal the last column is cut to fit, elsewhere nothing is.
        last = index == len(columns) - 1
        table.add_column(column, no_wrap=True, overflow="ellipsis" if last else "fold")
    for row in rows:
        table.add_row(*("-" if cell is None else str(cell) for cell in row))
    console = Console(soft_wrap=True) if sys.stdout.isatty() else Console(soft_wrap=True, width=_UNBOUNDED_WIDTH)
    console.print(table)


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
