"""Which version of a process is newest: one ordering, used wherever "latest" is meant.

A version is read as a run of parts: it is split on `.`, `-`, `+` and `_`, and each piece again
where digits meet letters (`rc10` is `rc`, `10`; `0a1` is `0`, `a`, `1`). Parts compare left to
right, and at each place:

- two numbers compare as numbers (`1.10.0` > `1.9.0`; `01` equals `1`);
- two texts compare alphabetically, ignoring case (`alpha` < `beta` < `rc`);
- a number outranks the end of the version, and the end outranks a text. So a release is newer than
  its pre-releases (`2.0.0` > `2.0.0-rc1` > `2.0.0-beta2`), and `1.0.0.1` > `1.0.0`. Text after the
  numbers always reads as a pre-release: `1.0.0+build5` and `1.0.0-post1` sort below `1.0.0`.

Versions that compare equal by these rules (`1.0` and `1-0`, `1.01` and `1.1`) are told apart by
their text, so the order is total and the same everywhere. Pure, and free of SQLAlchemy: the CLI
imports it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

# A part is (rank, number, text); ranks order text < end < number at any one place.
_TEXT, _END, _NUMBER = 0, 1, 2
_PARTS = re.compile(r"[0-9]+|[^0-9.+_-]+")

Part = tuple[int, int, str]
VersionKey = tuple[tuple[Part, ...], str]


@functools.lru_cache(maxsize=4096)
def version_key(version: str) -> VersionKey:
    """A sort key: a version with a greater key is newer."""
    parts: list[Part] = [
        (_NUMBER, int(piece), "") if piece.isdigit() else (_TEXT, 0, piece.casefold())
        for piece in _PARTS.findall(version)
    ]
    parts.append((_END, 0, ""))
    return tuple(parts), version


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` is older than, the same as, or newer than `b`."""
    key_a, key_b = version_key(a), version_key(b)
    return (key_a > key_b) - (key_a < key_b)


def newest(versions: Iterable[str]) -> str:
    """The newest of `versions`; `ValueError` if there are none."""
    chosen = max(versions, key=version_key, default=None)
    if chosen is None:
        raise ValueError("no versions to choose from")
    return chosen


def newest_first(versions: Iterable[str]) -> list[str]:
    """`versions`, newest first."""
    return sorted(versions, key=version_key, reverse=True)


__all__ = ["VersionKey", "compare", "newest", "newest_first", "version_key"]
