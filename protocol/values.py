"""What herder accepts as a free-form value (a job's input and output; later queue items and assets).

A JSON-safe value is an object (a dict with str keys), an array (a list), a string, an integer, a
finite float, a boolean or null, such that every language's JSON and msgpack, SQLite and
PostgreSQL hold it unchanged:

- integers within ±(2^53 - 1), the integers a JavaScript number (and so most JSON parsers) keeps exactly;
- floats finite: no NaN or infinity, which JSON cannot write;
- strings and keys without NUL ("\\x00"), which PostgreSQL text cannot hold, and valid Unicode
  (no lone surrogates, which UTF-8 cannot encode);
- containers nested at most MAX_DEPTH levels (the outermost object or array is level 1);
- at most a size the caller gives, measured as its UTF-8 JSON text with json's default separators,
  as `json.dumps(value, ensure_ascii=False)` writes it (what the robot SDK measures too).

Checking never recurses, so a value nested 100,000 deep is refused like any other. A refusal names
the path of the offending value inside it: `input.invoices[3].amount: … is outside …`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from json.encoder import encode_basestring
from typing import Annotated, Any, NoReturn

from pydantic import AfterValidator

from herder.protocol.errors import BadRequest

MAX_DEPTH = 32
MAX_SAFE_INTEGER = 2**53 - 1
MAX_VALUE_BYTES = 256 * 1024

# Keys shown as `.key` in a path; any other key is shown quoted, `['two words']`.
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Long keys, strings and paths are cut when shown: a message stays one short line.
_SHOWN_CHARS = 40
_PATH_HEAD_CHARS = 60
_PATH_TAIL_CHARS = 100
# Integers with more bits than this are described by their length, not written out.
_SHOWN_INT_BITS = 200
# json's default separators: ", " between items, ": " after a key.
_SEPARATOR_BYTES = 2
_BRACKETS_BYTES = 2

PathPart = str | int


class ValueRefused(ValueError):
    """A value is not JSON-safe: `path` says where inside it ("" for the value itself), `problem` what is wrong.

    Raised by the pydantic validators, so that `codec.invalid` can name the field and the path together."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


def check_value(value: object, *, what: str = "value", max_bytes: int = MAX_VALUE_BYTES) -> None:
    """Raise `BadRequest` naming the path under `what` when `value` is not JSON-safe or is over `max_bytes`."""
    found = _first_problem(value, max_bytes)
    if found is not None:
        path, problem = found
        _refuse(join_path(what, _path_text(path)), problem)


def check_object(value: object, *, what: str = "value", max_bytes: int = MAX_VALUE_BYTES) -> dict[str, Any]:
    """`value` when it is a JSON-safe object (a dict) within `max_bytes`; `BadRequest` otherwise."""
    if not isinstance(value, dict):
        _refuse(what, f'not a JSON object but {_kind(value)}; give an object, like {{"name": "Ada"}}')
    check_value(value, what=what, max_bytes=max_bytes)
    return value


def parse_json_object(text: str | bytes, *, what: str = "--input", max_bytes: int = MAX_VALUE_BYTES) -> dict[str, Any]:
    """The JSON-safe object `text` holds; `BadRequest` (one line, naming `what`) when it holds anything else."""
    try:
        value = json.loads(text)
    except RecursionError:
        _refuse(what, f"nested deeper than {MAX_DEPTH} levels")
    except json.JSONDecodeError as exc:
        _refuse(what, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    except UnicodeDecodeError:
        _refuse(what, "not valid JSON (not UTF-8 text)")
    except ValueError:
        # What json.loads refuses beyond its syntax: integers of more digits than Python converts.
        _refuse(what, f"holds an integer of thousands of digits, far outside ±{MAX_SAFE_INTEGER}")
    return check_object(value, what=what, max_bytes=max_bytes)


def join_path(field: str, path: str) -> str:
    """`field` followed by a path inside it: `input` and `a[3]` make `input.a[3]`; `[0]` makes `input[0]`."""
    if not field or not path:
        return field or path
    return f"{field}{path}" if path.startswith("[") else f"{field}.{path}"


def json_safe(*, max_bytes: int = MAX_VALUE_BYTES) -> AfterValidator:
    """A pydantic validator refusing values that are not JSON-safe or are over `max_bytes`, naming the path."""

    def check(value: Any) -> Any:
        found = _first_problem(value, max_bytes)
        if found is not None:
            path, problem = found
            raise ValueRefused(_path_text(path), problem)
        return value

    checker: Callable[[Any], Any] = check
    return AfterValidator(checker)


def refuse_nul(text: str) -> str:
    """`text` when a database can store it (no NUL, no lone surrogate); `ValueError` saying where otherwise."""
    problem = _text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def without_nul(text: str) -> str:
    """`text` with every NUL shown as "␀" (U+2400), for text herder must store whatever it holds.

    One character for one: text within a length limit stays within it."""
    return text.replace("\x00", "\u2400")


# A JSON-safe object of at most MAX_VALUE_BYTES; for another limit, `Annotated[dict[str, Any], json_safe(...)]`.
JsonObject = Annotated[dict[str, Any], json_safe()]
# Put before a length constraint, `Annotated[str, Field(max_length=…), NUL_FREE]`, in optional fields:
# pydantic words a length error well only when the length is checked first.
NUL_FREE = AfterValidator(refuse_nul)
# Plain text that reaches a database.
SafeText = Annotated[str, NUL_FREE]


def _first_problem(value: object, max_bytes: int) -> tuple[tuple[PathPart, ...], str] | None:
    """The path to the first thing found that is not JSON-safe and what is wrong with it, or None.

    Walks with an explicit stack (never recursion), adding up the JSON size on the way, and stops at
    the first problem: a value far over the limit is refused before most of it is looked at."""
    too_large = f"larger than {_bytes(max_bytes)} as JSON; pass big data by reference (a file share or a URL)"
    size = 0
    # (value, its path, the level it has if it is a container)
    stack: list[tuple[object, tuple[PathPart, ...], int]] = [(value, (), 1)]
    while stack:
        item, path, level = stack.pop()
        if isinstance(item, dict | list):
            if level > MAX_DEPTH:
                return path, f"nested deeper than {MAX_DEPTH} levels"
            size += _BRACKETS_BYTES + _SEPARATOR_BYTES * max(len(item) - 1, 0)
            # Every item takes a byte at least: a container that cannot fit is refused before it is walked.
            if size + len(item) > max_bytes:
                return (), too_large
            if isinstance(item, list):
                stack.extend((child, (*path, index), level + 1) for index, child in reversed(list(enumerate(item))))
            else:
                children: list[tuple[object, tuple[PathPart, ...], int]] = []
                for key, child in item.items():
                    if not isinstance(key, str):
                        return path, f"has the key {_shown(key)} ({_kind(key)}); object keys must be strings"
                    problem = _text_problem(key)
                    if problem is not None:
                        return (*path, key), f"the key {problem}"
                    size += _string_bytes(key) + _SEPARATOR_BYTES
                    children.append((child, (*path, key), level + 1))
                stack.extend(reversed(children))
        elif item is None or isinstance(item, bool):
            size += len("null" if item is None else "true" if item else "false")
        elif isinstance(item, int):
            if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                return path, f"{_shown(item)} is outside the integers JSON-safe values may hold (±{MAX_SAFE_INTEGER})"
            size += len(int.__repr__(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path, f"{item!r} is not a finite number; JSON-safe values hold finite numbers only"
            size += len(float.__repr__(item))
        elif isinstance(item, str):
            problem = _text_problem(item)
            if problem is not None:
                return path, f"the string {problem}"
            size += _string_bytes(item)
        else:
            return path, (
                f"{_kind(item)} is not a JSON-safe value; use an object, array, string, number, boolean or null"
            )
        if size > max_bytes:
            return (), too_large
    return None


def _text_problem(text: str) -> str | None:
    """What keeps a database from storing `text`, in words, or None."""
    index = text.find("\x00")
    if index >= 0:
        return f'holds a NUL character ("\\x00") at index {index}, which herder cannot store; remove it'
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"holds a lone surrogate (U+{ord(text[exc.start]):04X}) at index {exc.start}, which is not Unicode"
    return None


def _string_bytes(text: str) -> int:
    """The size of `text` as a JSON string in UTF-8, quotes and escapes included."""
    encoded = encode_basestring(text)
    return len(encoded) if encoded.isascii() else len(encoded.encode("utf-8"))


def _path_text(path: tuple[PathPart, ...]) -> str:
    """A path as people read it, `invoices[3].amount`, cut in the middle when long."""
    words: list[str] = []
    for part in path:
        if isinstance(part, int):
            words.append(f"[{part}]")
        elif _PLAIN_KEY.fullmatch(part):
            words.append(f".{part}" if words else part)
        else:
            words.append(f"[{_shown(part)}]")
    text = "".join(words)
    if len(text) > _PATH_HEAD_CHARS + _PATH_TAIL_CHARS:
        text = f"{text[:_PATH_HEAD_CHARS]}…{text[-_PATH_TAIL_CHARS:]}"
    return text


def _shown(value: object) -> str:
    """A short, one-line picture of a value for a message: never the whole of a huge one."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _SHOWN_INT_BITS:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"an integer of about {digits} digits"
    if isinstance(value, str):
        # Cut the text, not its repr, so the quotes and escapes stay whole.
        return f"{value[:_SHOWN_CHARS]!r}…" if len(value) > _SHOWN_CHARS else repr(value)
    shown = repr(value)
    return shown if len(shown) <= _SHOWN_CHARS else f"{shown[:_SHOWN_CHARS]}…"


def _kind(value: object) -> str:
    """What a value is, in JSON's words where it has them."""
    return _JSON_KINDS.get(type(value), f"a Python {type(value).__name__}")


_JSON_KINDS: dict[type, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _bytes(count: int) -> str:
    """A byte count as people read it: `256 KiB`, or `1000 bytes`."""
    return f"{count // 1024} KiB" if count >= 1024 and count % 1024 == 0 else f"{count} bytes"


def _refuse(path: str, problem: str) -> NoReturn:
    """Raise the `BadRequest` for `problem` at `path`."""
    raise BadRequest(f"{path}: {problem}" if path else problem, details={"path": path})


__all__ = [
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "MAX_VALUE_BYTES",
    "NUL_FREE",
    "JsonObject",
    "SafeText",
    "ValueRefused",
    "check_object",
    "check_value",
    "join_path",
    "json_safe",
    "parse_json_object",
    "refuse_nul",
    "without_nul",
]
