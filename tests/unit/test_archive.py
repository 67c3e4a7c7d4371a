"""Unpacking a package archive: the robot's limits on what it unpacks, and what it refuses to write at all."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, cast

import pytest

from herder.packaging.archive import (
    MAX_HEADER_BYTES,
    ArchiveTooLarge,
    describe_bytes,
    pack,
    unpack,
)
from herder.protocol.errors import BadRequest

MiB = 1024**2
TiB = 1024**4


class Zeros:
    """`size` zero bytes for tarfile to read, never held in memory at once."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, size: int) -> bytes:
        count = min(size, self.left)
        self.left -= count
        return bytes(count)


def file(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def targz(*members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An archive of `members`: a file given alone is filled with zeros, one given with None is only its header."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=fmt) as tar,
    ):
        for member in members:
            if isinstance(member, tuple):
                info, content = member
                tar.addfile(info, None if content is None else io.BytesIO(content))
            elif member.isreg():
                tar.addfile(member, cast(IO[bytes], Zeros(member.size)))
            else:
                tar.addfile(member)
    return buffer.getvalue()


def gzipped(chunks: Iterable[bytes]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped:
        for chunk in chunks:
            zipped.write(chunk)
    return buffer.getvalue()


def zero_chunks(size: int) -> Iterator[bytes]:
    while size > 0:
        yield bytes(min(size, MiB))
        size -= MiB


def written(target: Path) -> dict[str, int]:
    """Every path under `target` and its size (0 for folders and links)."""
    found = {}
    for path in sorted(target.rglob("*")):
        status = path.lstat()
        found[path.relative_to(target).as_posix()] = status.st_size if stat.S_ISREG(status.st_mode) else 0
    return found


def refused(data: bytes, target: Path, **limits: int) -> BadRequest:
    """The one-line error `unpack` refuses `data` with."""
    with pytest.raises(BadRequest) as caught:
        unpack(data, target, **limits)
    assert "\n" not in caught.value.message, caught.value.message
    return caught.value


def too_large(data: bytes, target: Path, **limits: int) -> ArchiveTooLarge:
    """The error for `data` past the limits."""
    error = refused(data, target, **limits)
    assert isinstance(error, ArchiveTooLarge), error
    return error


def test_a_packed_folder_unpacks_to_the_same_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "lib").mkdir(parents=True)
    (source / "main.py").write_text("print('hello')\n")
    (source / "lib" / "data.bin").write_bytes(b"\x00\x01" * 1000)
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    (source / "alias.py").symlink_to("main.py")
    unpack(pack(source), tmp_path / "target")
    target = tmp_path / "target"
    assert written(target) == {"alias.py": 0, "lib": 0, "lib/data.bin": 2000, "main.py": 15, "run.sh": 10}
    assert os.readlink(target / "alias.py") == "main.py"
    assert (target / "lib" / "data.bin").read_bytes() == b"\x00\x01" * 1000
    assert os.access(target / "run.sh", os.X_OK)


def test_more_members_than_max_files_are_refused_and_the_one_past_the_limit_is_not_written(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for index in range(50):
        (source / f"f{index:02}.txt").write_text("x")
    error = too_large(pack(source), tmp_path / "target", max_files=49)
    assert error.message == (
        "the package unpacks to more than 49 files and folders (the robot's limit); 'f49.txt' is number 50"
    )
    assert (error.unit, error.limit, error.found) == ("files", 49, 50)
    assert sorted(written(tmp_path / "target")) == [f"f{index:02}.txt" for index in range(49)]


def test_folders_count_against_max_files(tmp_path: Path) -> None:
    data = targz(folder("a"), folder("a/b"), file("a/b/c.txt", 1))
    too_large(data, tmp_path / "target", max_files=2)
    assert written(tmp_path / "target") == {"a": 0, "a/b": 0}


def test_a_gzip_bomb_is_refused_before_its_member_is_written(tmp_path: Path) -> None:
    data = targz((file("readme.txt", 5), b"hello"), file("bomb.bin", 64 * MiB))
    assert len(data) < 128 * 1024  # what makes it a bomb: 64 MiB of zeros in less than 128 KiB
    error = too_large(data, tmp_path / "target", max_bytes=8 * MiB)
    assert error.message == (
        "the package unpacks to more than 8 MiB (the robot's limit); it reaches 64 MiB at 'bomb.bin'"
    )
    assert (error.unit, error.limit, error.found) == ("bytes", 8 * MiB, 64 * MiB + 5)
    assert written(tmp_path / "target") == {"readme.txt": 5}


def test_the_file_that_would_cross_max_bytes_is_not_written_at_all(tmp_path: Path) -> None:
    data = targz(file("one.bin", 3 * MiB), file("two.bin", 3 * MiB), file("three.bin", 3 * MiB))
    error = too_large(data, tmp_path / "target", max_bytes=8 * MiB)
    assert error.message.endswith("it reaches 9 MiB at 'three.bin'")
    assert written(tmp_path / "target") == {"one.bin": 3 * MiB, "two.bin": 3 * MiB}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_header_declaring_2_tib_is_refused_before_anything_is_read_or_written(tmp_path: Path, fmt: int) -> None:
    # Only the header: the 2 TiB the header promises are not there, and must not be looked for.
    data = targz((file("huge.bin", 2 * TiB), None), fmt=fmt)
    assert len(data) < 1024
    error = too_large(data, tmp_path / "target")
    assert error.message == (
        "the package unpacks to more than 1 GiB (the robot's limit); it reaches 2 TiB at 'huge.bin'"
    )
    assert written(tmp_path / "target") == {}


def test_a_negative_size_cannot_make_room_for_a_larger_file(tmp_path: Path) -> None:
    data = targz((file("negative.bin", -2 * TiB), None), (file("huge.bin", 2 * TiB), None), fmt=tarfile.GNU_FORMAT)
    error = refused(data, tmp_path / "target")
    assert error.message.endswith("'negative.bin' declares a size of -2199023255552 bytes")
    assert written(tmp_path / "target") == {}


def test_an_extended_header_declaring_64_mib_is_refused_without_reading_it(tmp_path: Path) -> None:
    # tarfile reads a pax header whole, at the size it declares, before unpack sees any member.
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 64 * MiB
    data = gzipped([header.tobuf(format=tarfile.USTAR_FORMAT), *zero_chunks(64 * MiB + 1024)])
    tracemalloc.start()
    try:
        error = refused(data, tmp_path / "target")
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.message == (
        f"the package archive cannot be unpacked: a member's tar headers take more than "
        f"{describe_bytes(MAX_HEADER_BYTES)}"
    )
    assert peak_bytes < 4 * MiB
    assert written(tmp_path / "target") == {}


def test_a_chain_of_extended_headers_is_refused_not_a_crash(tmp_path: Path) -> None:
    # Each pax header makes tarfile recurse into the next one.
    extended = tarfile.TarInfo("x")
    extended.pax_headers = {"comment": "x" * 400}
    one = extended.tobuf(format=tarfile.PAX_FORMAT)[:-512]  # the pax header alone, without its member
    data = gzipped([one * 2000, file("f.txt", 0).tobuf(format=tarfile.USTAR_FORMAT), bytes(1024)])
    error = refused(data, tmp_path / "target")
    assert "tar headers take more than" in error.message


def test_an_archive_exactly_at_the_limits_is_accepted(tmp_path: Path) -> None:
    data = targz(folder("data"), file("data/a.bin", 3 * MiB), file("data/b.bin", 1 * MiB), link("c.bin", "data/a.bin"))
    # Four members; the link counts the 3 MiB it leads to (a robot that cannot make links copies them).
    unpack(data, tmp_path / "exact", max_bytes=7 * MiB, max_files=4)
    assert written(tmp_path / "exact") == {"c.bin": 0, "data": 0, "data/a.bin": 3 * MiB, "data/b.bin": 1 * MiB}

    error = too_large(data, tmp_path / "a-byte-less", max_bytes=7 * MiB - 1, max_files=4)
    assert error.message == (
        "the package unpacks to more than 7 MiB (the robot's limit); it reaches 7,340,032 bytes at 'c.bin'"
    )
    assert "c.bin" not in written(tmp_path / "a-byte-less")  # links are made after every check
    too_large(data, tmp_path / "a-file-less", max_bytes=7 * MiB, max_files=3)


def test_a_link_counts_what_it_leads_to_even_a_later_file(tmp_path: Path) -> None:
    data = targz(link("alias-1", "big.bin"), link("alias-2", "alias-1"), file("big.bin", 3 * MiB))
    error = too_large(data, tmp_path / "target", max_bytes=8 * MiB)
    assert error.message.endswith("it reaches 9 MiB at 'alias-2'")
    assert written(tmp_path / "target") == {"big.bin": 3 * MiB}


def test_links_inside_the_package_are_made(tmp_path: Path) -> None:
    data = targz(
        folder("lib"),
        (file("lib/real.py", 2), b"ok"),
        link("lib/up.py", "../top.py"),
        (file("top.py", 3), b"top"),
        link("hard.py", "lib/real.py", tarfile.LNKTYPE),
        link("loop-a", "loop-b"),
        link("loop-b", "loop-a"),
    )
    unpack(data, tmp_path / "target")
    target = tmp_path / "target"
    assert (target / "lib" / "up.py").read_text() == "top"
    assert (target / "hard.py").read_text() == "ok"
    assert (target / "hard.py").stat().st_ino == (target / "lib" / "real.py").stat().st_ino


def test_the_package_folder_itself_may_be_a_member(tmp_path: Path) -> None:
    # What 'tar -C folder .' makes: "./" first, then "./main.py".
    data = targz(folder("."), (file("./main.py", 2), b"ok"))
    unpack(data, tmp_path / "target")
    assert written(tmp_path / "target") == {"main.py": 2}


def fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (file("../evil.txt", 4), "'../evil.txt' is outside the package folder"),
        (file("lib/../../evil.txt", 4), "'lib/../../evil.txt' is outside the package folder"),
        (file("/tmp/evil.txt", 4), "'/tmp/evil.txt' is outside the package folder"),
        (file("..\\evil.txt", 4), "'..\\\\evil.txt' is outside the package folder"),
        (file("C:/evil.txt", 4), "'C:/evil.txt' is outside the package folder"),
        (link("out", "../../evil.txt"), "'out' links to '../../evil.txt', outside the package folder"),
        (link("lib/out", "../.."), "'lib/out' links to '../..', outside the package folder"),
        (link("passwd", "/etc/passwd"), "'passwd' links to '/etc/passwd', outside the package folder"),
        (
            link("shadow", "/etc/shadow", tarfile.LNKTYPE),
            "'shadow' is a hard link to '/etc/shadow', which is not a file before it",
        ),
        (fifo("pipe"), "'pipe' is not a file, folder or link"),
    ],
)
def test_members_that_would_land_outside_are_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    data = targz((file("ok.txt", 2), b"ok"), member)
    error = refused(data, tmp_path / "deep" / "target")
    assert error.message == f"the package archive cannot be unpacked: {reason}"
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["deep", "ok.txt", "target"]


def test_nothing_is_written_through_a_link(tmp_path: Path) -> None:
    # The link leads inside, but a second link through it would not: neither is ever followed.
    data = targz(link("here", "."), link("here/up", ".."), (file("Here/evil.txt", 4), b"evil"))
    error = refused(data, tmp_path / "target")
    assert error.message == "the package archive cannot be unpacked: 'here/up' is inside the link 'here'"
    assert written(tmp_path / "target") == {}
    error = refused(targz(link("here", "."), (file("Here/evil.txt", 4), b"evil")), tmp_path / "target")
    assert error.message == "the package archive cannot be unpacked: 'Here/evil.txt' is inside the link 'here'"


def test_a_link_cannot_lead_out_through_a_later_link(tmp_path: Path) -> None:
    # Each looks inside on its own, and extractall(filter="data") accepted both in this order; on disk
    # "z" leads to a/b/.. then up twice more: two folders above the package.
    data = targz(folder("a"), folder("a/b"), link("z", "a/b/l1/../../.."), link("a/b/l1", ".."))
    error = refused(data, tmp_path / "deep" / "target")
    assert error.message == (
        "the package archive cannot be unpacked: 'z' links to 'a/b/l1/../../..', through the link 'a/b/l1'"
    )
    assert not (tmp_path / "deep" / "target" / "z").is_symlink()


@pytest.mark.parametrize(
    "data",
    [b"", b"not a gzip stream", gzip.compress(b"not a tar archive" * 100, mtime=0), targz(file("a.bin", 4096))[:-40]],
    ids=["empty", "not gzip", "gzip of no tar", "cut short"],
)
def test_a_corrupt_archive_is_a_bad_request(tmp_path: Path, data: bytes) -> None:
    error = refused(data, tmp_path / "target")
    assert error.message.startswith("the package archive cannot be unpacked: ")


@pytest.mark.parametrize(
    ("size_bytes", "text"),
    [
        (700, "700 bytes"),
        (1024, "1 KiB"),
        (8 * MiB, "8 MiB"),
        (3 * MiB // 2, "1.5 MiB"),
        (1024**3, "1 GiB"),
        (1024**3 + 1, "1 GiB"),
        (2 * TiB, "2 TiB"),
    ],
)
def test_describe_bytes(size_bytes: int, text: str) -> None:
    assert describe_bytes(size_bytes) == text
