"""A process folder's manifest, `herder.toml`: what the process is called, its version, and what runs.

    name = "hello"
    version = "1.0.0"
    description = "Greets whoever the input names"   # optional

    [entry]
    python = "hello:main"                  # a callable, module:function
    # or: command = ["bash", "run.sh"]     (a list of words; one string is split like a shell would)
    # or: robot = "hello.robot"            (a Robot Framework suite file or folder in the package)

Parsing is pure; `load_manifest` also reads the file and checks that what the entry point names
is in the folder. Every problem is one `BadRequest` line naming the field, so the CLI can print
it as it is. This module stays free of SQLAlchemy: the CLI imports it.
"""

from __future__ import annotations

import difflib
import re
import shlex
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from herder.protocol.errors import BadRequest
from herder.protocol.packages import MANIFEST, PROCESS_NAME_PATTERN, VERSION_PATTERN, EntryKind, EntryPoint

MAX_DESCRIPTION_CHARS = 1000  # as PackagePublish takes it
MAX_TARGET_CHARS = 1024  # as EntryPoint takes it
MAX_ARGS = 256
MANIFEST_KEYS = ("name", "version", "description", "entry")
ENTRY_KEYS = tuple(kind.value for kind in EntryKind)
HELP_POINTER = "see 'herder package publish --help'"


_NAME = re.compile(PROCESS_NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_NAME_CHARS = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VERSION_CHARS = re.compile(r"[A-Za-z0-9.+_-]{1,64}")


def check_name(value: object, *, what: str = "'name'") -> str:
    """`value` if it is a valid process name, else `BadRequest` saying, under `what`, what a name is."""
    if not isinstance(value, str):
        raise BadRequest(f'{what} must be a string in quotes, like name = "hello" (got {value!r})')
    if _NAME.fullmatch(value) is None:
        if _NAME_CHARS.fullmatch(value):
            raise BadRequest(f"{what} must start with a letter or digit (got {value!r})")
        raise BadRequest(f"{what} must be 1-64 letters, digits, '-' or '_' (got {value!r})")
    return value


def check_version(value: object, *, what: str = "'version'") -> str:
    """`value` if it is a valid version, else `BadRequest` saying, under `what`, what a version is."""
    if not isinstance(value, str):
        # A bare 1.0 in TOML is a number, and 1.0.0 is not even valid TOML: show the quotes.
        raise BadRequest(f'{what} must be a string in quotes, like version = "1.0.0" (got {value!r})')
    if _VERSION.fullmatch(value) is None:
        if _VERSION_CHARS.fullmatch(value):
            raise BadRequest(f"{what} must start with a letter or digit (got {value!r})")
        raise BadRequest(f"{what} must be 1-64 letters, digits, '.', '+', '-' or '_' (got {value!r})")
    return value


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed `herder.toml`."""

    name: str
    version: str
    entry: EntryPoint
    description: str = ""

    def with_version(self, version: str, *, what: str = "--version") -> Manifest:
        """This manifest at another version (checked like the manifest's own, errors named `what`)."""
        return replace(self, version=check_version(version, what=what))


def _did_you_mean(key: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def parse_manifest(text: str, *, source: str = MANIFEST) -> Manifest:
    """Read the text of a manifest; `source` (the file as the user knows it) starts every error."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends "(at line N, column M)": keep it, it is where to look.
        raise BadRequest(f"{source}: not valid TOML: {exc}") from None
    for key in data:
        if key not in MANIFEST_KEYS:
            raise BadRequest(
                f"{source}: unknown key {key!r}{_did_you_mean(key, MANIFEST_KEYS)}; "
                "a manifest holds name, version, description and [entry]"
            )
    for key in ("name", "version"):
        if key not in data:
            raise BadRequest(f"{source}: {key!r} is missing")
    name = check_name(data["name"], what=f"{source}: 'name'")
    version = check_version(data["version"], what=f"{source}: 'version'")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise BadRequest(f"{source}: 'description' must be a string in quotes (got {description!r})")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise BadRequest(f"{source}: 'description' is longer than {MAX_DESCRIPTION_CHARS} characters")
    return Manifest(
        name=name, version=version, entry=parse_entry(data.get("entry"), source=source), description=description.strip()
    )


def parse_entry(entry: object, *, source: str = MANIFEST) -> EntryPoint:
    """The `[entry]` table of a manifest as an `EntryPoint`."""
    example = 'python = "module:function", command = ["word", ...] or robot = "suite.robot"'
    if entry is None:
        raise BadRequest(f"{source}: [entry] is missing; add an [entry] table with {example}")
    if not isinstance(entry, dict):
        raise BadRequest(f"{source}: 'entry' must be a table, [entry], with {example}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise BadRequest(
                f"{source}: [entry] has an unknown key {key!r}{_did_you_mean(key, ENTRY_KEYS)}; "
                "it takes exactly one of python, command or robot"
            )
    given = [key for key in ENTRY_KEYS if key in entry]
    if len(given) != 1:
        got = f" (got {_and(given)})" if given else ""
        raise BadRequest(f"{source}: [entry] needs exactly one of python, command or robot{got}")
    kind = EntryKind(given[0])
    value = entry[kind.value]
    if kind is EntryKind.PYTHON:
        return EntryPoint(kind=kind, target=_python_target(value, source))
    if kind is EntryKind.COMMAND:
        words = _command_words(value, source)
        return EntryPoint(kind=kind, target=words[0], args=words[1:])
    return EntryPoint(kind=kind, target=_robot_target(value, source))


def _python_target(value: object, source: str) -> str:
    if isinstance(value, str):
        module, sep, function = value.partition(":")
        if (
            sep
            and len(value) <= MAX_TARGET_CHARS
            and function.isidentifier()
            and all(part.isidentifier() for part in module.split("."))
        ):
            return value
    raise BadRequest(f'{source}: [entry] python must read module:function, like "hello:main" (got {value!r})')


def _command_words(value: object, source: str) -> list[str]:
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise BadRequest(f"{source}: [entry] command cannot be split into words: {exc}") from None
    elif isinstance(value, list) and all(isinstance(word, str) for word in value):
        words = list(value)
    else:
        raise BadRequest(
            f'{source}: [entry] command must be a list of words, like ["bash", "run.sh"], or one string (got {value!r})'
        )
    if not words or not words[0]:
        raise BadRequest(f"{source}: [entry] command is empty; name the program to run first")
    if len(words) > MAX_ARGS + 1:
        raise BadRequest(f"{source}: [entry] command has more than {MAX_ARGS} arguments")
    if any(len(word) > MAX_TARGET_CHARS for word in words):
        raise BadRequest(f"{source}: [entry] command has a word longer than {MAX_TARGET_CHARS} characters")
    return words


def _robot_target(value: object, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(
            f'{source}: [entry] robot must name a suite file or folder in the package, like "tasks.robot" '
            f"(got {value!r})"
        )
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or len(value) > MAX_TARGET_CHARS or re.match(r"^[A-Za-z]:", value):
        raise BadRequest(f"{source}: [entry] robot must be a path inside the package folder (got {value!r})")
    return value


def load_manifest(folder: Path) -> Manifest:
    """Read and check `<folder>/herder.toml`, and that the file or suite its entry names is in `folder`."""
    if not folder.exists():
        raise BadRequest(f"{folder} does not exist")
    if not folder.is_dir():
        raise BadRequest(f"{folder} is not a folder; give the process folder, the one holding {MANIFEST}")
    path = folder / MANIFEST
    if not path.is_file():
        raise BadRequest(f"{folder} has no {MANIFEST}; a process folder needs one ({HELP_POINTER})")
    source = str(path)
    try:
        # utf-8-sig: editors on Windows, where many robots live, like to start files with a BOM.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest(f"{source}: not UTF-8 text") from None
    except OSError as exc:
        raise BadRequest(f"cannot read {source}: {exc.strerror or exc}") from None
    manifest = parse_manifest(text, source=source)
    check_entry_files(manifest.entry, folder, source=source)
    return manifest


def check_entry_files(entry: EntryPoint, folder: Path, *, source: str = MANIFEST) -> None:
    """Check that the module, suite or script the entry point names is in `folder`, where that can be
    known: a python module may be a file or a package; a command's program is checked only when it
    is written as a path relative to the package (`./run.sh`, `bin/run`)."""
    root = folder.resolve()
    if entry.kind is EntryKind.PYTHON:
        module = entry.target.partition(":")[0]
        parts = module.split(".")
        candidates = [PurePosixPath(*parts[:-1], f"{parts[-1]}.py"), PurePosixPath(*parts, "__init__.py")]
        if not any((root / candidate).is_file() for candidate in candidates):
            raise BadRequest(
                f"{source}: [entry] python names module {module!r}, but {folder} has no "
                f"{candidates[0]} or {candidates[1]}"
            )
    elif entry.kind is EntryKind.ROBOT:
        suite = root / entry.target.replace("\\", "/")
        if not suite.exists() or not suite.resolve().is_relative_to(root):
            raise BadRequest(f"{source}: [entry] robot names {entry.target!r}, which is not in {folder}")
    elif "/" in entry.target and not entry.target.startswith("/"):
        program = root / entry.target
        if not program.is_file() or not program.resolve().is_relative_to(root):
            raise BadRequest(f"{source}: [entry] command runs {entry.target!r}, which is not in {folder}")


__all__ = [
    "MANIFEST",
    "Manifest",
    "check_entry_files",
    "check_name",
    "check_version",
    "load_manifest",
    "parse_entry",
    "parse_manifest",
]
