"""The robot's on-disk spool: order, acks across restarts and crashes, torn records, the bound, reclaiming."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from herder.robot.spool import (
    MAGIC_BYTES,
    STATE_FILE,
    STATE_SLOT_BYTES,
    DroppedLines,
    Entry,
    Kind,
    Spool,
    SpoolClosed,
    SpoolLocked,
)

SMALL_BYTES = 64 * 1024  # a bound of 64 KiB: 4 KiB segments


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Where the spool lives."""
    return tmp_path / "spool"


@pytest.fixture
def spool(folder: Path) -> Iterator[Spool]:
    """A spool with the default bound."""
    with Spool(folder) as spool:
        yield spool


def keys(entries: list[Entry]) -> list[str]:
    """The keys of entries, in their order."""
    return [entry.key for entry in entries]


def segment_files(folder: Path, kind: Kind | None = None) -> list[Path]:
    """The segment files in the folder, of one kind or of both."""
    return sorted(path for path in folder.glob("*.seg") if kind is None or path.name.startswith(f"{kind.value}-"))


def folder_bytes(folder: Path) -> int:
    """What the segments take on disk, as the file system sees it."""
    return sum(path.stat().st_size for path in segment_files(folder))


def crash_after(folder: Path, code: str) -> None:
    """Run `code` with `spool` open on the folder in a child process that then dies without closing it."""
    script = "\n".join(
        (
            "import os",
            "from pathlib import Path",
            "from herder.robot.spool import Spool",
            f"spool = Spool(Path({str(folder)!r}))",
            textwrap.dedent(code),
            "os._exit(0)",  # no close(), no clean-up by the interpreter: what a killed agent leaves
        )
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


# --- order ---


def test_entries_come_out_in_the_order_they_went_in_across_kinds(spool: Spool) -> None:
    spool.append_log("job.1.1", b"fetching")
    spool.append_report("job.1.terminating", b"TERMINATING")
    spool.append_log("job.1.2", b"killed")
    spool.append_report("job.1.end", b"STOPPED")
    spool.append_log("job.1.3", b"ended")

    entries = spool.pending()

    assert [(entry.kind, entry.key, entry.payload) for entry in entries] == [
        (Kind.LOG, "job.1.1", b"fetching"),
        (Kind.REPORT, "job.1.terminating", b"TERMINATING"),
        (Kind.LOG, "job.1.2", b"killed"),
        (Kind.REPORT, "job.1.end", b"STOPPED"),
        (Kind.LOG, "job.1.3", b"ended"),
    ]
    assert [entry.id for entry in entries] == sorted(entry.id for entry in entries)
    assert keys(spool.pending(2)) == ["job.1.1", "job.1.terminating"]
    assert keys(spool.pending(kind=Kind.REPORT)) == ["job.1.terminating", "job.1.end"]
    assert keys(spool.pending(kind=Kind.LOG)) == ["job.1.1", "job.1.2", "job.1.3"]


def test_pending_gives_the_same_entries_until_they_are_acked(spool: Spool) -> None:
    spool.append_log("job.1.1", b"a")
    spool.append_log("job.1.2", b"b")

    assert spool.pending() == spool.pending()
    assert not spool.empty


def test_an_empty_spool_has_nothing_pending(spool: Spool) -> None:
    assert spool.pending() == []
    assert spool.empty
    spool.ack([])


# --- acks ---


def test_acked_entries_are_gone_for_good_also_after_reopening(folder: Path) -> None:
    with Spool(folder) as spool:
        for seq in range(1, 6):
            spool.append_log(f"job.1.{seq}", b"line")
        spool.append_report("job.1.end", b"SUCCESSFUL")
        first = spool.pending(3)
        spool.ack(first)
        spool.ack(first)  # a second ack of the same entries changes nothing
        assert keys(spool.pending()) == ["job.1.4", "job.1.5", "job.1.end"]

    with Spool(folder) as spool:
        assert keys(spool.pending()) == ["job.1.4", "job.1.5", "job.1.end"]
        spool.ack(spool.pending())
        assert spool.empty

    with Spool(folder) as spool:
        assert spool.pending() == []


def test_kinds_are_acked_apart(spool: Spool) -> None:
    spool.append_report("job.1.end", b"FAULTED")
    spool.append_log("job.1.1", b"a")
    spool.append_log("job.1.2", b"b")

    spool.ack(spool.pending(kind=Kind.LOG))  # log lines flow while the jobs service is away

    assert keys(spool.pending()) == ["job.1.end"]


def test_an_ack_must_not_skip_a_pending_entry(spool: Spool) -> None:
    for seq in range(1, 4):
        spool.append_log(f"job.1.{seq}", b"line")
    first, second, third = spool.pending()

    with pytest.raises(ValueError, match="not the next one"):
        spool.ack([first, third])

    assert keys(spool.pending()) == ["job.1.1", "job.1.2", "job.1.3"]
    spool.ack([second, first])  # in any order, as long as there is no gap
    assert keys(spool.pending()) == ["job.1.3"]


def test_entries_not_acked_come_back_after_a_crash_and_acked_ones_do_not(folder: Path) -> None:
    crash_after(
        folder,
        """
        for seq in range(1, 6):
            spool.append_log(f"job.1.{seq}", b"line")
        spool.append_report("job.1.end", b"SUCCESSFUL")
        spool.ack(spool.pending(2))
        """,
    )

    with Spool(folder) as spool:
        assert keys(spool.pending()) == ["job.1.3", "job.1.4", "job.1.5", "job.1.end"]
        assert spool.stats().damaged_bytes == 0


def test_a_torn_state_update_gives_entries_out_again_never_loses_them(folder: Path) -> None:
    with Spool(folder) as spool:
        for seq in range(1, 5):
            spool.append_log(f"job.1.{seq}", b"line")
        spool.ack(spool.pending(1))
        spool.ack(spool.pending(1))  # the newest slot says "through job.1.2", the other "through job.1.1"
    state = folder / STATE_FILE
    data = bytearray(state.read_bytes())
    newest = max(0, STATE_SLOT_BYTES, key=lambda at: int.from_bytes(data[at + 8 : at + 16], "little"))
    data[newest + 20] ^= 0xFF  # a power cut in the middle of writing it
    state.write_bytes(bytes(data))

    with Spool(folder) as spool:
        assert keys(spool.pending()) == ["job.1.2", "job.1.3", "job.1.4"]


# --- crashes ---


def test_a_truncated_last_record_is_dropped_and_the_records_before_it_survive(folder: Path) -> None:
    crash_after(
        folder,
        """
        spool.append_report("job.1.end", b"SUCCESSFUL")
        for seq in range(1, 4):
            spool.append_log(f"job.1.{seq}", b"x" * 100)
        """,
    )
    (segment,) = segment_files(folder, Kind.LOG)
    with segment.open("r+b") as file:
        file.truncate(segment.stat().st_size - 50)  # the crash came in the middle of the last write

    with Spool(folder) as spool:
        assert keys(spool.pending()) == ["job.1.end", "job.1.1", "job.1.2"]
        assert spool.stats().damaged_bytes > 0
        spool.append_log("job.1.4", b"after the restart")

    with Spool(folder) as spool:
        assert keys(spool.pending()) == ["job.1.end", "job.1.1", "job.1.2", "job.1.4"]


def test_a_last_record_with_a_wrong_checksum_is_dropped(folder: Path) -> None:
    with Spool(folder) as spool:
        for seq in range(1, 4):
            spool.append_log(f"job.1.{seq}", b"x" * 100)
    (segment,) = segment_files(folder)
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))

    with Spool(folder) as spool:
        assert keys(spool.pending()) == ["job.1.1", "job.1.2"]


def test_damage_inside_an_older_segment_loses_only_the_rest_of_that_segment(folder: Path) -> None:
    with Spool(folder, max_bytes=SMALL_BYTES) as spool:
        for seq in range(1, 201):
            spool.append_log(f"job.1.{seq}", b"x" * 100)
    first, second, *_ = segment_files(folder)
    data = bytearray(first.read_bytes())
    data[MAGIC_BYTES + 300] ^= 0xFF  # in the third record or so
    first.write_bytes(bytes(data))
    with Spool(folder, max_bytes=SMALL_BYTES) as spool:
        survivors = keys(spool.pending(1000))
        assert spool.stats().damaged_bytes > 0
    assert survivors[:2] == ["job.1.1", "job.1.2"]
    assert "job.1.3" not in survivors
    second_starts = int(second.stem.split("-")[1])  # only log lines here, so ids are seqs
    assert survivors[2:] == [f"job.1.{seq}" for seq in range(second_starts, 201)]


# --- the bound ---


def test_the_bound_drops_the_oldest_log_lines_never_reports_and_counts_them(folder: Path) -> None:
    with Spool(folder, max_bytes=SMALL_BYTES) as spool:
        for seq in range(1, 2001):
            spool.append_log(f"job-a.1.{seq}", b"x" * 100)
            if seq % 100 == 0:
                spool.append_report(f"job-a.1.report-{seq}", b"r" * 100)
        for seq in range(1, 11):
            spool.append_log(f"job-b.1.{seq}", b"y" * 100)

        assert spool.stats().disk_bytes <= SMALL_BYTES
        assert folder_bytes(folder) <= SMALL_BYTES
        reports = keys(spool.pending(1000, kind=Kind.REPORT))
        assert reports == [f"job-a.1.report-{seq}" for seq in range(100, 2001, 100)]
        lines = keys(spool.pending(10_000, kind=Kind.LOG))
        assert lines[-10:] == [f"job-b.1.{seq}" for seq in range(1, 11)]
        kept = [int(key.rsplit(".", 1)[1]) for key in lines[:-10]]
        assert kept == list(range(kept[0], 2001))  # the newest lines, none missing between them
        assert spool.stats().dropped_lines == kept[0] - 1

    with Spool(folder, max_bytes=SMALL_BYTES) as spool:  # the counts survive a restart until taken
        assert spool.take_dropped() == {"job-a.1": DroppedLines(kept[0] - 1, "job-a.1.1", f"job-a.1.{kept[0] - 1}")}
        assert spool.take_dropped() == {}
        assert spool.stats().dropped_lines == 0
    assert not (folder / "dropped.json").exists()


def test_reports_are_kept_beyond_the_bound_and_log_lines_make_way(folder: Path) -> None:
    with Spool(folder, max_bytes=SMALL_BYTES) as spool:
        spool.append_log("job.1.1", b"early")
        for seq in range(1, 1001):
            spool.append_report(f"job-{seq}.1.end", b"r" * 100)
        spool.append_log("job.1.2", b"late")

        assert spool.stats().disk_bytes > SMALL_BYTES
        assert len(spool.pending(10_000, kind=Kind.REPORT)) == 1000
        assert spool.pending(kind=Kind.LOG) == []
        assert spool.take_dropped() == {"job.1": DroppedLines(2, "job.1.1", "job.1.2")}


def test_a_log_line_larger_than_the_bound_is_dropped_alone(folder: Path) -> None:
    with Spool(folder, max_bytes=SMALL_BYTES) as spool:
        spool.append_log("job.1.1", b"small")
        spool.append_log("job.1.2", b"x" * SMALL_BYTES)
        spool.append_log("job.1.3", b"small")

        assert keys(spool.pending()) == ["job.1.1", "job.1.3"]
        assert spool.take_dropped() == {"job.1": DroppedLines(1, "job.1.2", "job.1.2")}


def test_entries_dropped_while_being_delivered_are_ignored_by_ack(folder: Path) -> None:
    with Spool(folder, max_bytes=SMALL_BYTES) as spool:
        for seq in range(1, 401):
            spool.append_log(f"job.1.{seq}", b"x" * 100)
        in_flight = spool.pending(10)
        for seq in range(401, 1001):
            spool.append_log(f"job.1.{seq}", b"x" * 100)  # the bound drops the lines in flight meanwhile

        spool.ack(in_flight)
        spool.ack(spool.pending(10))

        assert spool.pending(1)[0].key != "job.1.1"


# --- reclaiming ---


def test_acked_segments_are_deleted(folder: Path) -> None:
    with Spool(folder, max_bytes=SMALL_BYTES) as spool:
        for seq in range(1, 401):
            spool.append_log(f"job.1.{seq}", b"x" * 100)
        full_files, full_bytes = len(segment_files(folder)), folder_bytes(folder)
        assert full_files > 5

        spool.ack(spool.pending(200))

        assert len(segment_files(folder)) < full_files
        assert folder_bytes(folder) < full_bytes * 0.6
        assert spool.stats().disk_bytes == folder_bytes(folder)
        assert keys(spool.pending(1)) == ["job.1.201"]

        spool.ack(spool.pending(1000))
        assert folder_bytes(folder) <= 16 * 1024  # at most the small segment being appended to
    assert sorted(os.listdir(folder)) == [STATE_FILE]


def test_a_hundred_thousand_log_lines_appended_and_acked_in_batches(spool: Spool, folder: Path) -> None:
    # About 1.5 s for the whole test here (2 cores): some 8 µs an append, 8 µs an entry drained.
    sent = 0
    for batch in range(100):
        for seq in range(1000):
            spool.append_log(f"job.1.{batch * 1000 + seq}", b"line %d" % seq)
        while entries := spool.pending(512):
            assert entries[0].key == f"job.1.{sent}"
            spool.ack(entries)
            sent += len(entries)

    assert sent == 100_000
    assert spool.empty
    spool.close()
    assert sorted(os.listdir(folder)) == [STATE_FILE]


# --- the folder ---


def test_the_folder_and_its_files_are_private(spool: Spool, folder: Path) -> None:
    spool.append_report("job.1.end", b"SUCCESSFUL")
    spool.append_log("job.1.1", b"line")

    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_one_process_at_a_time(spool: Spool, folder: Path) -> None:
    with pytest.raises(SpoolLocked, match="another process"):
        Spool(folder)
    spool.close()
    Spool(folder).close()


def test_a_closed_spool_says_so(spool: Spool) -> None:
    spool.close()
    spool.close()
    with pytest.raises(SpoolClosed, match="open a new Spool"):
        spool.append_log("job.1.1", b"line")


# --- waiting ---


async def test_wait_returns_once_something_is_pending(spool: Spool) -> None:
    waiting = asyncio.ensure_future(spool.wait())
    reports = asyncio.ensure_future(spool.wait(Kind.REPORT))
    await asyncio.sleep(0)
    assert not waiting.done()

    await asyncio.to_thread(spool.append_log, "job.1.1", b"from a thread")
    await asyncio.wait_for(waiting, 5)
    assert not reports.done()

    spool.append_report("job.1.end", b"SUCCESSFUL")
    await asyncio.wait_for(reports, 5)
    await asyncio.wait_for(spool.wait(), 5)  # at once: something is pending


async def test_closing_wakes_the_waiters(spool: Spool) -> None:
    waiting = asyncio.ensure_future(spool.wait())
    await asyncio.sleep(0)

    spool.close()

    with pytest.raises(SpoolClosed):
        await asyncio.wait_for(waiting, 5)
