"""The robot's spool: what the agent could not deliver while cut off from herder, kept on disk until it can.

While NATS is unreachable (the orchestrator restarts, the network drops) the agent keeps running its
job and appends what it would have sent: job reports (`append_report`) and job log lines
(`append_log`), each an opaque payload with the key its receiver dedupes by (`<job>.<attempt>.<seq>`).
When it is back it drains them in the order they went in and acknowledges what was confirmed:

    spool = Spool(work_dir / "spool")        # a restarted agent finds what its last run spooled
    spool.append_log(f"{job}.{attempt}.{seq}", codec.dump(record))
    ...
    while batch := spool.pending(256):       # oldest first, reports and log lines in one order
        delivered = []
        for entry in batch:
            if not await deliver(entry):     # a report taken or refused as stale; a log line stored
                break
            delivered.append(entry)
        spool.ack(delivered)                 # never given out again, also after a restart
        if len(delivered) < len(batch):
            await backoff()

`pending()` gives both kinds in the one order they were appended; `pending(kind=Kind.REPORT)` gives
one kind, so that a drain of log lines need not wait behind a report the jobs service cannot take yet
(or the other way round). Acks are per kind: what is acked must be the oldest pending of its kind.

Exactly once is the spool's at-least-once and the receiver's dedupe: an entry is given out by every
`pending` until it is acked, an acked entry never again, and an entry not acked is given out again by
the next run of the agent. The window between "the receiver has it" and `ack` is the only place a
crash duplicates, and the keys are there for it (JetStream drops a repeated `Nats-Msg-Id` only within
its duplicate window, so past that, a line given out again is stored twice unless its reader dedupes
by job, attempt and seq).

The folder (0700, files 0600):

    report-<first id>.seg   reports, appended in order; a new file ("segment") every few MiB
    log-<first id>.seg      log lines, the same
    state                   what has been acked: the newest id of each kind, in two checksummed slots
    dropped.json            log lines the bound dropped, per group; only while there are some

Every entry gets an id from one counter, so the two kinds merge into the order they were appended;
each kind has segments of its own so that the bound can drop old log lines by deleting whole files
without rewriting the reports between them. A segment starts with `SEGMENT_MAGIC`; a record is
`length u32, crc32 u32` and a body of `id u64, key length u16, key, payload`. A crash can leave only
the last record of a segment torn; opening finds it by its length or checksum and cuts it off, and
every record before it is kept.

Acked data is reclaimed by deleting whole segments: once every entry of a segment is acked, the file
goes. The state file is updated in place, not replaced by a rename: a rename over a file costs about
250 µs on ext4 (it forces the new file's data out), a `pwrite` of 40 bytes a few µs, and the state is
written on every ack. It has two slots written in turn, each with a generation and a crc32; opening
trusts the newest valid one, so a torn update falls back to the one before (entries given out again,
which the receivers dedupe), never forward.

Durability: every append is written to the OS before it returns (no user-space buffer), so a crash of
the agent loses nothing. A report is also fsynced (and the folder, when its segment is new): reports
are few, and losing one loses a job's outcome. Log lines are not fsynced one by one: a script's burst
of lines would wait 0.25-10 ms each for the disk; their segment is fsynced when it is full, on
`sync()` (call it on a timer while cut off to bound the loss) and on `close()`, so a power cut loses
at most the unsynced lines of the newest segment. Acks are not fsynced either (but on `close()`): a
power cut can only take an ack back, so entries are given out again, never lost.

The bound (`max_bytes`, all segments together) gives way only for log lines: an append that would
pass it first deletes the oldest log segment (so a drop takes up to 1/`SEGMENTS_PER_BOUND` of the
bound at a time), counting its undelivered lines per group (`take_dropped`), and a log line that would
not fit even with every older line gone, because reports fill the spool, is dropped and counted
itself. Reports are kept even beyond the bound: they are small, few, and must not be lost, so a spool
full of reports can pass `max_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import itertools
import json
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType

DEFAULT_SPOOL_BYTES = 64 * 1024 * 1024
SEGMENT_BYTES = 4 * 1024 * 1024
MIN_SEGMENT_BYTES = 4 * 1024
# A small bound gets small segments, so that dropping the oldest segment drops a small share of it.
SEGMENTS_PER_BOUND = 16
# A segment whose every entry is acked is deleted at once unless it is the one being appended to and
# smaller than this: an agent that appends and acks every line would otherwise create and delete a
# file per line (about 40 µs). `close()` deletes it whatever its size.
RECLAIM_ACTIVE_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
DEFAULT_BATCH = 256
MAX_KEY_BYTES = 0xFFFF
# Each state slot in a sector of its own, so that a torn write spoils at most the slot being written.
STATE_SLOT_BYTES = 512
FOLDER_MODE = 0o700
FILE_MODE = 0o600

SEGMENT_MAGIC = b"hdspool1"
STATE_MAGIC = b"hdstate1"
STATE_FILE = "state"
DROPPED_FILE = "dropped.json"

_FRAME = struct.Struct("<II")  # body length, crc32 of the body
_ENTRY = struct.Struct("<QH")  # id, key length; the key and the payload follow
_STATE = struct.Struct("<8sQQQ")  # magic, generation, newest acked report id, newest acked log id
_CRC = struct.Struct("<I")
_SEGMENT_NAME = re.compile(r"(report|log)-(\d{20})\.seg")
MAGIC_BYTES = len(SEGMENT_MAGIC)


class SpoolError(Exception):
    """The spool cannot be used; the message says why and what to do."""


class SpoolClosed(SpoolError):
    """The spool was closed; open a new `Spool` on the folder to use it again."""


class SpoolLocked(SpoolError):
    """Another process has this spool open: one agent per robot work folder."""


class Kind(StrEnum):
    """What an entry is: a report for the jobs service or a log line for JetStream."""

    REPORT = "report"
    LOG = "log"


@dataclass(frozen=True, slots=True)
class Position:
    """Where an entry is stored; `ack` checks by it that the entries acked are the oldest pending, in order."""

    segment: int  # the first id of its segment, which names the file
    offset: int
    end: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One spooled report or log line, as `pending` gives it out."""

    id: int
    kind: Kind
    key: str
    payload: bytes
    position: Position = field(repr=False)


@dataclass(frozen=True, slots=True)
class DroppedLines:
    """Log lines of one group (a job attempt) that the bound dropped before they were delivered."""

    count: int
    first_key: str
    last_key: str


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """How full the spool is and what it lost."""

    disk_bytes: int  # segments on disk, acked data not yet reclaimed included
    segments: int
    dropped_lines: int  # not yet taken by `take_dropped`
    damaged_bytes: int  # torn or corrupt records cut off since the spool was opened
    state_reset: bool  # the state file was unreadable: entries acked before may be given out again


@dataclass(slots=True, eq=False)
class _Segment:
    kind: Kind
    first_id: int
    path: Path
    fd: int
    size: int  # bytes in the file
    end: int  # where its readable records end: `size`, unless damage was found before it
    # Its newest id; for a segment found on opening and not read, the next segment's first id - 1.
    last_id: int
    sealed: bool = False  # appends go to a new segment


@dataclass(slots=True, eq=False)
class _Lane:
    """The segments of one kind, and how far they are acked."""

    kind: Kind
    floor: int = 0  # every entry of this kind with an id up to this one is acked or dropped
    cursor: int = MAGIC_BYTES  # the offset of the oldest pending record in segments[0]
    segments: list[_Segment] = field(default_factory=list)

    def has_pending(self) -> bool:
        start = self.cursor
        for segment in self.segments:
            if segment.end > start:
                return True
            start = MAGIC_BYTES
        return False


@dataclass(slots=True, eq=False)
class _Waiter:
    kind: Kind | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class Spool:
    """A bounded on-disk spool of reports and log lines, given out in append order until acked.

    Every method is synchronous and holds an internal lock, so one writer and one reader (or more)
    may share a spool on one event loop, or from threads through `asyncio.to_thread`. A log append,
    `pending` and `ack` take microseconds and may run on the event loop; `append_report` waits for
    an fsync (milliseconds on a slow disk), so a busy agent sends it to a thread. Only one process
    may open a folder at a time (`SpoolLocked`). Opening reads the newest segment of each kind to find
    a torn record (up to `segment_bytes` each), so an agent opens it in a thread too.

    `max_bytes` bounds all segments together (see the module docstring for what gives way);
    `segment_bytes` is how large a segment grows before the next one starts, by default a sixteenth
    of the bound, between 4 KiB and `SEGMENT_BYTES`.
    """

    def __init__(self, folder: Path, *, max_bytes: int = DEFAULT_SPOOL_BYTES, segment_bytes: int | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.folder = folder
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(
            SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, max_bytes // SEGMENTS_PER_BOUND)
        )
        self._reclaim_bytes = min(RECLAIM_ACTIVE_BYTES, self.segment_bytes // 4)
        self._lock = threading.Lock()
        self._lanes = {kind: _Lane(kind) for kind in Kind}
        self._waiters: list[_Waiter] = []
        self._dropped: dict[str, DroppedLines] = {}
        self._disk_bytes = 0
        self._damaged_bytes = 0
        self._state_reset = False
        self._generation = 0
        self._next_id = 1
        self._closed = False
        folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        os.chmod(folder, FOLDER_MODE)  # mkdir's mode passes through the umask, and the folder may be old
        self._state_fd = os.open(folder / STATE_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(self._state_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._state_fd)
            raise SpoolLocked(
                f"another process has the spool at {folder} open; stop the other agent of this robot first"
            ) from None
        try:
            self._recover()
        except BaseException:
            self._close_files()
            raise

    # --- appending ---

    def append_report(self, key: str, payload: bytes) -> None:
        """Spool a report; it is on disk (fsynced) when this returns, and the bound never drops it."""
        self._append(Kind.REPORT, key, payload)

    def append_log(self, key: str, payload: bytes) -> None:
        """Spool a log line; it is with the OS when this returns (not fsynced: see `sync`)."""
        self._append(Kind.LOG, key, payload)

    def _append(self, kind: Kind, key: str, payload: bytes) -> None:
        key_bytes = key.encode()
        if len(key_bytes) > MAX_KEY_BYTES:
            raise ValueError(f"a spool key is at most {MAX_KEY_BYTES} bytes, not {len(key_bytes)}")
        with self._lock:
            self._check_open()
            entry_id = self._next_id
            body = b"".join((_ENTRY.pack(entry_id, len(key_bytes)), key_bytes, payload))
            record = _FRAME.pack(len(body), zlib.crc32(body)) + body
            lane = self._lanes[kind]
            if not self._make_room(lane, len(record)):
                self._note_dropped(key)
                self._save_dropped()
                return
            self._next_id += 1
            segment = self._writable(lane, len(record), entry_id)
            self._write(segment, record)
            segment.last_id = entry_id
            if kind is Kind.REPORT:
                os.fsync(segment.fd)
            if self._waiters:
                self._wake(kind)

    def _make_room(self, lane: _Lane, record_bytes: int) -> bool:
        """Drop the oldest log segments until the record fits the bound; False if a log line still does not."""
        if self._disk_bytes + self._growth(lane, record_bytes) <= self.max_bytes:
            return True
        if lane.kind is Kind.LOG:
            reports = sum(segment.size for segment in self._lanes[Kind.REPORT].segments)
            if reports + MAGIC_BYTES + record_bytes > self.max_bytes:
                return False  # it would not fit with every older line gone: drop this one, not them
        logs = self._lanes[Kind.LOG]
        while self._disk_bytes + self._growth(lane, record_bytes) > self.max_bytes and logs.segments:
            self._drop_oldest_logs()
        return True

    def _growth(self, lane: _Lane, record_bytes: int) -> int:
        return record_bytes + (MAGIC_BYTES if self._needs_segment(lane, record_bytes) else 0)

    def _needs_segment(self, lane: _Lane, record_bytes: int) -> bool:
        if not lane.segments:
            return True
        last = lane.segments[-1]
        return last.sealed or (last.size + record_bytes > self.segment_bytes and last.size > MAGIC_BYTES)

    def _writable(self, lane: _Lane, record_bytes: int, first_id: int) -> _Segment:
        if not self._needs_segment(lane, record_bytes):
            return lane.segments[-1]
        if lane.segments:
            self._seal(lane.segments[-1])
        path = self.folder / f"{lane.kind.value}-{first_id:020d}.seg"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
        try:
            _write_all(fd, SEGMENT_MAGIC)
            if lane.kind is Kind.REPORT:
                self._sync_folder()  # else a power cut could keep the fsynced report but lose its file's name
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        segment = _Segment(lane.kind, first_id, path, fd, MAGIC_BYTES, MAGIC_BYTES, first_id - 1)
        if not lane.segments:
            lane.cursor = MAGIC_BYTES
        lane.segments.append(segment)
        self._disk_bytes += MAGIC_BYTES
        self._advance(lane)  # the segment before may be acked through
        return segment

    def _seal(self, segment: _Segment) -> None:
        if not segment.sealed and segment.kind is Kind.LOG:
            os.fsync(segment.fd)  # log lines are fsynced a segment at a time
        segment.sealed = True

    def _write(self, segment: _Segment, record: bytes) -> None:
        try:
            _write_all(segment.fd, record)
        except OSError:
            # A partial record would hide every record after it from the next run; take it back.
            with contextlib.suppress(OSError):
                os.ftruncate(segment.fd, segment.size)
            raise
        segment.size += len(record)
        segment.end = segment.size
        self._disk_bytes += len(record)

    # --- giving out and acking ---

    def pending(self, limit: int = DEFAULT_BATCH, *, kind: Kind | None = None) -> list[Entry]:
        """The oldest `limit` entries not yet acked, oldest first (of one kind, or of both in one order).

        Nothing is removed: the same entries come out again until `ack` is called for them.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        with self._lock:
            self._check_open()
            if kind is not None:
                return self._read(self._lanes[kind], limit)
            reports = self._read(self._lanes[Kind.REPORT], limit) if self._lanes[Kind.REPORT].segments else []
            logs = self._read(self._lanes[Kind.LOG], limit) if self._lanes[Kind.LOG].segments else []
            if not reports or not logs:
                return reports or logs
            return list(itertools.islice(heapq.merge(reports, logs, key=_entry_id), limit))

    def _read(self, lane: _Lane, limit: int) -> list[Entry]:
        entries: list[Entry] = []
        start = lane.cursor
        for segment in list(lane.segments):
            for offset, end, body in self._records(segment, start):
                entry_id, key_bytes = _ENTRY.unpack_from(body)
                key_end = _ENTRY.size + key_bytes
                key = body[_ENTRY.size : key_end].decode()
                entries.append(Entry(entry_id, lane.kind, key, body[key_end:], Position(segment.first_id, offset, end)))
                if len(entries) >= limit:
                    return entries
            start = MAGIC_BYTES
        if lane.segments and lane.cursor >= lane.segments[0].end:
            self._advance(lane)  # damage found while reading ended the oldest segment early
        return entries

    def ack(self, entries: Iterable[Entry]) -> None:
        """Mark entries delivered: they are never given out again, also after a restart.

        Of each kind, the entries must be the oldest pending ones, in order, as `pending` gave them
        (a prefix of a batch is fine, a gap is not: `ValueError`). Entries already acked, or dropped
        by the bound meanwhile, are ignored.
        """
        by_kind: dict[Kind, list[Entry]] = {}
        for entry in entries:
            by_kind.setdefault(entry.kind, []).append(entry)
        with self._lock:
            self._check_open()
            moves: list[tuple[_Lane, int, int, int]] = []
            for kind, acked in by_kind.items():
                lane = self._lanes[kind]
                fresh = sorted((entry for entry in acked if entry.id > lane.floor), key=_entry_id)
                if fresh:
                    index, cursor = self._follow(lane, fresh)
                    moves.append((lane, index, cursor, fresh[-1].id))
            if not moves:
                return
            for lane, _, _, last_id in moves:
                lane.floor = last_id
            # Recorded before any segment goes: a segment deleted with its acks unrecorded would leave
            # the acked start of the next one to be given out again.
            self._save_state()
            for lane, index, cursor, _ in moves:
                for _ in range(index):
                    self._remove(lane, 0)
                lane.cursor = cursor
                self._advance(lane)

    def _follow(self, lane: _Lane, fresh: list[Entry]) -> tuple[int, int]:
        """Where the lane's cursor ends after `fresh`, which must follow on from it: (segment index, offset)."""
        index, cursor = 0, lane.cursor
        for entry in fresh:
            while index + 1 < len(lane.segments) and cursor >= lane.segments[index].end:
                index, cursor = index + 1, MAGIC_BYTES
            if (
                index >= len(lane.segments)
                or entry.position.segment != lane.segments[index].first_id
                or entry.position.offset != cursor
            ):
                raise ValueError(
                    f"ack takes the oldest pending {lane.kind.value} entries in order, as pending gave them: "
                    f"entry {entry.id} ({entry.key!r}) is not the next one"
                )
            cursor = entry.position.end
        return index, cursor

    def _advance(self, lane: _Lane, *, reclaim: bool = False) -> None:
        """Delete the segments the cursor has passed; the last one too if it is acked through and large."""
        while lane.segments:
            first = lane.segments[0]
            if lane.cursor < first.end:
                return
            if len(lane.segments) == 1 and not (reclaim or first.sealed or first.size >= self._reclaim_bytes):
                return
            self._remove(lane, 0)
            lane.cursor = MAGIC_BYTES

    def _remove(self, lane: _Lane, index: int) -> None:
        segment = lane.segments.pop(index)
        os.close(segment.fd)
        segment.path.unlink(missing_ok=True)
        self._disk_bytes -= segment.size

    # --- waiting ---

    async def wait(self, kind: Kind | None = None) -> None:
        """Return once an entry (of `kind`, or of either) is pending: at once if one is already.

        `SpoolClosed` if the spool is closed meanwhile.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_open()
            if self._has_pending(kind):
                return
            waiter = _Waiter(kind, loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self, kind: Kind | None, error: BaseException | None = None) -> None:
        woken = [waiter for waiter in self._waiters if kind is None or waiter.kind in (None, kind)]
        for waiter in woken:
            self._waiters.remove(waiter)
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is waiting any more
                waiter.loop.call_soon_threadsafe(_settle, waiter.future, error)

    def _has_pending(self, kind: Kind | None) -> bool:
        lanes = self._lanes.values() if kind is None else (self._lanes[kind],)
        return any(lane.has_pending() for lane in lanes)

    # --- dropped log lines ---

    def take_dropped(self) -> dict[str, DroppedLines]:
        """The log lines the bound dropped since the last call, per group, and forget them.

        A group is a key without its last dot-separated part: lines keyed `<job>.<attempt>.<seq>`
        are counted per `<job>.<attempt>` (a key without a dot is a group of its own). The counts
        survive a restart until taken.
        """
        with self._lock:
            self._check_open()
            dropped, self._dropped = self._dropped, {}
            if dropped:
                self._save_dropped()
            return dropped

    def _drop_oldest_logs(self) -> None:
        lane = self._lanes[Kind.LOG]
        segment = lane.segments[0]
        for _, _, body in self._records(segment, lane.cursor):
            _, key_bytes = _ENTRY.unpack_from(body)
            self._note_dropped(body[_ENTRY.size : _ENTRY.size + key_bytes].decode())
        lane.floor = max(lane.floor, segment.last_id)
        self._save_dropped()
        self._save_state()
        self._remove(lane, 0)
        lane.cursor = MAGIC_BYTES

    def _note_dropped(self, key: str) -> None:
        group = key.rpartition(".")[0] or key
        known = self._dropped.get(group)
        if known is None:
            self._dropped[group] = DroppedLines(1, key, key)
        else:
            self._dropped[group] = DroppedLines(known.count + 1, known.first_key, key)

    def _save_dropped(self) -> None:
        path = self.folder / DROPPED_FILE
        if not self._dropped:
            path.unlink(missing_ok=True)
            return
        groups = {group: [lines.count, lines.first_key, lines.last_key] for group, lines in self._dropped.items()}
        data = json.dumps({"version": 1, "groups": groups}).encode()
        scratch = path.with_suffix(".tmp")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(scratch, path)  # rare (a segment's worth of lines at a time), so a rename's cost is fine

    def _load_dropped(self) -> None:
        path = self.folder / DROPPED_FILE
        with contextlib.suppress(FileNotFoundError):
            try:
                groups = json.loads(path.read_bytes())["groups"]
                self._dropped = {
                    str(group): DroppedLines(int(count), str(first), str(last))
                    for group, (count, first, last) in groups.items()
                }
            except (ValueError, KeyError, TypeError, AttributeError):
                self._dropped = {}  # the counts are advice for a log line; a damaged file is not worth a failure

    # --- state ---

    def _save_state(self) -> None:
        self._generation += 1
        head = _STATE.pack(STATE_MAGIC, self._generation, self._lanes[Kind.REPORT].floor, self._lanes[Kind.LOG].floor)
        os.pwrite(self._state_fd, head + _CRC.pack(zlib.crc32(head)), (self._generation % 2) * STATE_SLOT_BYTES)

    def _load_state(self) -> None:
        data = os.pread(self._state_fd, 2 * STATE_SLOT_BYTES, 0)
        best: tuple[int, int, int] | None = None
        for slot in (0, 1):
            raw = data[slot * STATE_SLOT_BYTES : slot * STATE_SLOT_BYTES + _STATE.size + _CRC.size]
            if len(raw) < _STATE.size + _CRC.size:
                continue
            magic, generation, reports, logs = _STATE.unpack_from(raw)
            if magic != STATE_MAGIC or _CRC.unpack_from(raw, _STATE.size)[0] != zlib.crc32(raw[: _STATE.size]):
                continue
            if best is None or generation > best[0]:
                best = (generation, reports, logs)
        if best is None:
            # A new spool, or a state file spoiled beyond both slots: then everything is given out again.
            self._state_reset = bool(data.strip(b"\0"))
            return
        self._generation, self._lanes[Kind.REPORT].floor, self._lanes[Kind.LOG].floor = best

    # --- opening ---

    def _recover(self) -> None:
        self._load_state()
        self._load_dropped()
        (self.folder / DROPPED_FILE).with_suffix(".tmp").unlink(missing_ok=True)
        found: dict[Kind, list[tuple[int, Path]]] = {kind: [] for kind in Kind}
        for path in self.folder.iterdir():
            match = _SEGMENT_NAME.fullmatch(path.name)
            if match is not None:
                found[Kind(match[1])].append((int(match[2]), path))
        newest = max(lane.floor for lane in self._lanes.values())
        for kind, paths in found.items():
            newest = max(newest, self._recover_lane(self._lanes[kind], sorted(paths)))
        self._next_id = newest + 1

    def _recover_lane(self, lane: _Lane, paths: list[tuple[int, Path]]) -> int:
        """Open a kind's segments, cut off a torn last record and find the oldest pending; the newest id seen."""
        for first_id, path in paths:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            magic = os.pread(fd, MAGIC_BYTES, 0)
            if len(magic) < MAGIC_BYTES:  # created, and the crash came before anything was in it
                os.close(fd)
                path.unlink()
                continue
            size = os.fstat(fd).st_size
            lane.segments.append(_Segment(lane.kind, first_id, path, fd, size, size, first_id - 1))
            self._disk_bytes += size
            if magic != SEGMENT_MAGIC:
                raise SpoolError(
                    f"{path} is not a spool segment this herder can read; "
                    f"move {self.folder} away to start with an empty spool"
                )
        if not lane.segments:
            return 0
        for segment, following in itertools.pairwise(lane.segments):
            segment.last_id = following.first_id - 1
            segment.sealed = True
        last = lane.segments[-1]
        for _, _, body in self._records(last, MAGIC_BYTES):
            last.last_id = _ENTRY.unpack_from(body)[0]
        if last.end < last.size:
            os.ftruncate(last.fd, last.end)  # the torn tail of a crash; appends go on after the last whole record
            self._disk_bytes -= last.size - last.end
            last.size = last.end
            last.sealed = False
        newest = last.last_id
        while lane.segments and lane.segments[0].last_id <= lane.floor:
            self._remove(lane, 0)
        if lane.segments:
            first = lane.segments[0]
            cursor: int | None = None
            for offset, _, body in self._records(first, MAGIC_BYTES):
                if _ENTRY.unpack_from(body)[0] > lane.floor:
                    cursor = offset
                    break
            lane.cursor = first.end if cursor is None else cursor  # read after: damage may have moved the end
        self._advance(lane, reclaim=True)
        return newest

    def _records(self, segment: _Segment, start: int) -> Iterator[tuple[int, int, bytes]]:
        """The whole records of a segment from `start`: (offset, end, body); stops at the first damaged one."""
        offset, base, data = start, start, b""
        while offset < segment.end:
            at = offset - base
            if at + _FRAME.size > len(data):
                data, base, at = os.pread(segment.fd, min(READ_BYTES, segment.end - offset), offset), offset, 0
                if len(data) < _FRAME.size:
                    break
            length, crc = _FRAME.unpack_from(data, at)
            end = offset + _FRAME.size + length
            if end > segment.end or length < _ENTRY.size:
                break
            if end - base > len(data):
                data, base, at = (
                    os.pread(segment.fd, min(max(READ_BYTES, end - offset), segment.end - offset), offset),
                    offset,
                    0,
                )
                if end - base > len(data):
                    break
            body = data[at + _FRAME.size : end - base]
            if zlib.crc32(body) != crc:
                break
            yield offset, end, body
            offset = end
        if offset < segment.end:
            # What follows a damaged record cannot be framed: the segment ends here for readers.
            self._damaged_bytes += segment.end - offset
            segment.end = offset
            segment.sealed = True

    # --- the rest ---

    @property
    def empty(self) -> bool:
        """Nothing is pending."""
        with self._lock:
            return not self._has_pending(None)

    def stats(self) -> SpoolStats:
        """How full the spool is and what it lost."""
        with self._lock:
            return SpoolStats(
                disk_bytes=self._disk_bytes,
                segments=sum(len(lane.segments) for lane in self._lanes.values()),
                dropped_lines=sum(lines.count for lines in self._dropped.values()),
                damaged_bytes=self._damaged_bytes,
                state_reset=self._state_reset,
            )

    def sync(self) -> None:
        """fsync the log lines and acks so far (reports are fsynced as they are appended)."""
        with self._lock:
            self._check_open()
            for segment in self._lanes[Kind.LOG].segments:
                if not segment.sealed:
                    os.fsync(segment.fd)
            os.fsync(self._state_fd)

    def close(self) -> None:
        """fsync and close the files, deleting segments acked through; waiters get `SpoolClosed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                for lane in self._lanes.values():
                    self._advance(lane, reclaim=True)
                    for segment in lane.segments:
                        if not segment.sealed:
                            os.fsync(segment.fd)
                os.fsync(self._state_fd)
            finally:
                self._close_files()
                self._wake(None, SpoolClosed(f"the spool at {self.folder} was closed"))

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _close_files(self) -> None:
        for lane in self._lanes.values():
            for segment in lane.segments:
                with contextlib.suppress(OSError):
                    os.close(segment.fd)
            lane.segments = []
        with contextlib.suppress(OSError):
            os.close(self._state_fd)  # and with it the lock

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosed(f"the spool at {self.folder} is closed; open a new Spool on the folder to use it")

    def _sync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _entry_id(entry: Entry) -> int:
    return entry.id


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
