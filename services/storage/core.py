"""The storage service's decisions, without I/O: what a bucket may still take, where a piece of a
file is among its chunks, and what objects are called.

A file's bytes are one object of the tenant's object store, `<bucket id>/<path>`, in chunks of
`chunk_bytes` (the last one shorter). The stream sequence of each chunk is kept as runs, `[(first,
count), …]`: one run when nothing else was written to the store meanwhile, a few otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from herder.protocol.storage import describe_size

# (first stream sequence, number of chunks in a row)
SeqRuns = list[tuple[int, int]]

PARTS_FOLDER = ".parts"


def object_name(bucket_id: str, path: str) -> str:
    """The object holding a file: `<bucket id>/<path>` (a bucket made again under the same name has a
    new id, so nothing of the old one is ever read as the new one's)."""
    return f"{bucket_id}/{path}"


def part_object_name(upload_id: str, start: int) -> str:
    """The object staging the chunk of an upload that starts at `start`: `.parts/<upload id>/<start>`."""
    return f"{PARTS_FOLDER}/{upload_id}/{start}"


@dataclass(frozen=True)
class Usage:
    """What a bucket holds and may hold, when a file of some size is to be written to it."""

    bucket: str
    max_file_bytes: int
    max_bucket_bytes: int
    # What the bucket's files weigh now.
    used_bytes: int
    # The file at that path now, which the new one replaces (0: none).
    replaced_bytes: int = 0
    # What other uploads in progress to the bucket will add.
    reserved_bytes: int = 0


@dataclass(frozen=True)
class Refusal:
    """Why a file may not be written: the limit it breaks (`max_file_bytes` or `max_bucket_bytes`), in words."""

    limit: str
    message: str


def upload_refusal(size: int, usage: Usage) -> Refusal | None:
    """Why a file of `size` bytes may not be written to the bucket, naming the limit and the sizes; None
    when it may."""
    if size > usage.max_file_bytes:
        return Refusal(
            "max_file_bytes",
            f"the file is {describe_size(size)}, more than bucket {usage.bucket!r} takes per file "
            f"(max_file_bytes {describe_size(usage.max_file_bytes)})",
        )
    after = usage.used_bytes - usage.replaced_bytes + usage.reserved_bytes + size
    if after > usage.max_bucket_bytes:
        parts = [f"it holds {describe_size(usage.used_bytes)}"]
        if usage.reserved_bytes:
            parts.append(f"uploads in progress will add {describe_size(usage.reserved_bytes)}")
        parts.append(f"this file is {describe_size(size)}")
        if usage.replaced_bytes:
            parts.append(f"replacing one of {describe_size(usage.replaced_bytes)}")
        return Refusal(
            "max_bucket_bytes",
            f"bucket {usage.bucket!r} would hold {describe_size(after)}, more than its max_bucket_bytes of "
            f"{describe_size(usage.max_bucket_bytes)} ({', '.join(parts)}); delete files, or raise the limit "
            "with 'herder storage bucket-update'",
        )
    return None


def chunk_problem(*, size: int, received: int, offset: int, length: int) -> tuple[str, str] | None:
    """Why a chunk cannot go into an upload of `size` bytes that has received `received`:
    ("conflict", why) when it starts elsewhere, ("bad_request", why) when it runs past the end."""
    if offset != received:
        return (
            "conflict",
            f"the chunk starts at byte {offset:,}, but the upload has received {received:,} bytes: "
            f"send the chunk that starts at {received:,}",
        )
    if offset + length > size:
        return (
            "bad_request",
            f"the chunk of {length:,} bytes at byte {offset:,} runs past the end of the upload "
            f"({size:,} bytes, as upload_begin said)",
        )
    return None


def runs_of(seqs: Iterable[int]) -> SeqRuns:
    """Sequences in increasing order as runs of consecutive ones."""
    runs: SeqRuns = []
    for seq in seqs:
        if runs and runs[-1][0] + runs[-1][1] == seq:
            first, count = runs[-1]
            runs[-1] = (first, count + 1)
        else:
            runs.append((seq, 1))
    return runs


def seq_of(runs: SeqRuns, index: int) -> int:
    """The stream sequence of chunk `index` (from 0); `IndexError` past the last."""
    if index < 0:
        raise IndexError(index)
    for first, count in runs:
        if index < count:
            return first + index
        index -= count
    raise IndexError("no such chunk")


@dataclass(frozen=True)
class Span:
    """The part of chunk `index` a read takes: bytes `start` to `end` of that chunk."""

    index: int
    start: int
    end: int


def spans(*, offset: int, length: int, size: int, chunk_bytes: int) -> list[Span]:
    """The pieces of chunks that bytes `offset` to `offset + length` of a file of `size` are made of
    (cut at the end of the file); none at or past its end."""
    end = min(offset + length, size)
    found: list[Span] = []
    position = offset
    while position < end:
        index, within = divmod(position, chunk_bytes)
        take = min(chunk_bytes - within, end - position)
        found.append(Span(index, within, within + take))
        position += take
    return found


def page_within(sizes: Iterable[int], budget: int) -> int:
    """How many of the first entries, of these encoded sizes, fit in `budget` bytes (at least one)."""
    used = 0
    count = 0
    for size in sizes:
        used += size
        if count and used > budget:
            break
        count += 1
    return count


class Rechunker:
    """Bytes fed in pieces of any size, given back in chunks of exactly `chunk_bytes` (the last one,
    from `flush`, shorter)."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._held = bytearray()

    def feed(self, piece: bytes) -> list[bytes]:
        """The whole chunks `piece` completes."""
        self._held += piece
        whole = len(self._held) // self.chunk_bytes * self.chunk_bytes
        if not whole:
            return []
        ready = [bytes(self._held[start : start + self.chunk_bytes]) for start in range(0, whole, self.chunk_bytes)]
        del self._held[:whole]
        return ready

    def flush(self) -> list[bytes]:
        """What is left: the last, shorter chunk, if any."""
        left = [bytes(self._held)] if self._held else []
        self._held.clear()
        return left
