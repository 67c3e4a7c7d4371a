"""Package archives: a process folder packed into a reproducible tar.gz, its sha256, and safe unpacking.

The same folder always packs to the same bytes (sorted entries, no timestamps or owners), so a
republished folder has the same hash. Unpacking refuses anything that would land outside the
target folder, links included, and stops before a package grows past the robot's limits: a few
hundred KiB of gzip can hold gigabytes of zeros.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path, PureWindowsPath
from typing import Literal

from herder.protocol.errors import BadRequest

# What is never packed: caches, version control, virtualenvs, herder's own run folders.
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", ".mypy_cache", ".pytest_cache"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")
MAX_PACKAGE_BYTES = 256 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
# How the object store writes an object's digest: "SHA-256=" and the base64url of the sha256.
DIGEST_PREFIX = "SHA-256="
# What a robot unpacks at most unless told otherwise: four times the largest archive, plenty for a
# script and its data.
MAX_UNPACKED_BYTES = 1024**3
# Members of any kind, folders and links too. A script with vendored dependencies has a few
# thousand (numpy and pandas together about 3,000), and every file takes an inode and at least a
# 4 KiB block however small it is, so 100,000 files already hold some 400 MiB of disk.
MAX_UNPACKED_FILES = 100_000
# What one member's tar headers, and the padding before them, may take. tarfile reads a pax or GNU
# long-name header whole at the size the header itself declares, and before Python 3.11.10 parses a
# pax header in time that grows with the square of its size; a 4 KiB path needs a fourth of this.
MAX_HEADER_BYTES = 16 * 1024


def sha256_hex(data: bytes) -> str:
    """The sha256 of `data`, as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def object_digest(sha256: str) -> str:
    """The digest the object store records for content whose sha256 is `sha256` (hex)."""
    return DIGEST_PREFIX + base64.urlsafe_b64encode(bytes.fromhex(sha256)).decode()


def _members(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        here = Path(root)
        found.extend(here / d for d in dirs)
        found.extend(here / f for f in sorted(files) if not f.endswith(SKIPPED_SUFFIXES))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def pack(folder: Path) -> bytes:
    """The folder's files as a reproducible tar.gz; `BadRequest` if it is too large or holds a link
    that leads out of it."""
    folder = folder.resolve()
    buffer = io.BytesIO()
    # mtime=0 in the gzip header too: the same files give the same bytes.
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=6) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in _members(folder):
            name = path.relative_to(folder).as_posix()
            info = tar.gettarinfo(str(path), arcname=name)
            if info.issym() or info.islnk():
                target = (path.parent / os.readlink(path)).resolve()
                if not target.is_relative_to(folder):
                    raise BadRequest(f"{name} is a link to {target}, outside the package folder")
            elif not (info.isfile() or info.isdir()):
                continue  # sockets, fifos, devices: not part of a script
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
            if info.isfile():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
            if buffer.tell() > MAX_PACKAGE_BYTES:
                raise BadRequest(f"the package folder packs to more than {MAX_PACKAGE_BYTES // 2**20} MiB")
    return buffer.getvalue()


class ArchiveTooLarge(BadRequest):
    """The package unpacks to more than the robot's limit; nothing past the limit was written."""

    def __init__(self, *, unit: Literal["bytes", "files"], limit: int, found: int, member: str) -> None:
        self.unit = unit
        self.limit = limit
        self.found = found
        self.member = member
        super().__init__(
            f"the package {self.overrun}",
            details={"unit": unit, "limit": limit, "found": found, "member": member},
        )

    @property
    def overrun(self) -> str:
        """What went past the limit: "unpacks to more than 1 GiB (the robot's limit); it reaches 2 TiB at 'big.bin'"."""
        if self.unit == "files":
            return (
                f"unpacks to more than {self.limit:,} files and folders (the robot's limit); "
                f"{self.member!r} is number {self.found:,}"
            )
        limit, found = describe_bytes(self.limit), describe_bytes(self.found)
        if found == limit:  # "more than 1 GiB; it reaches 1 GiB" would say nothing
            found = f"{self.found:,} bytes"
        return f"unpacks to more than {limit} (the robot's limit); it reaches {found} at {self.member!r}"


def describe_bytes(size_bytes: int) -> str:
    """A byte count in binary units, exact where it can be: 1 GiB, 8 MiB, 1.5 GiB, 700 bytes."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size_bytes >= factor:
            if size_bytes % factor == 0:
                return f"{size_bytes // factor} {unit}"
            return f"{size_bytes / factor:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size_bytes} bytes"


def unpack(
    data: bytes, target: Path, *, max_bytes: int = MAX_UNPACKED_BYTES, max_files: int = MAX_UNPACKED_FILES
) -> None:
    """Unpack an archive into `target` (created), refusing members that would land outside it.

    `ArchiveTooLarge` before its files would hold more than `max_bytes`, or its members (files,
    folders and links) would number more than `max_files`; `BadRequest` for an unsafe or corrupt
    archive. After an error `target` may keep what was unpacked before it: unpack into a folder of
    your own and remove it.
    """
    target.mkdir(parents=True, exist_ok=True)
    stream = _MeteredStream(data)
    try:
        # Data is copied in reads of MAX_HEADER_BYTES at most, so only a header can read past a limit.
        with stream, tarfile.TarFile(fileobj=stream, mode="r", copybufsize=MAX_HEADER_BYTES) as tar:
            _extract(tar, stream, target, max_bytes=max_bytes, max_files=max_files)
    # Beyond TarError, tarfile lets these out for some corrupt headers and deflate streams.
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError, RecursionError) as exc:
        raise BadRequest(f"the package archive cannot be unpacked: {exc}") from None


def _extract(tar: tarfile.TarFile, stream: _MeteredStream, target: Path, *, max_bytes: int, max_files: int) -> None:
    # Member by member, each checked on its declared size before anything of it is written. Links
    # are made last: nothing is ever written through one, so every file lands inside `target`
    # whatever a link leads to, and a symbolic link may lead to a later file. Where tarfile cannot
    # make a link (Windows without the symlink privilege, FAT) it copies the target instead, so a
    # link counts the bytes of what it leads to.
    files = 0
    total_bytes = 0
    sizes: dict[str, int] = {}  # every file and hard link, by name
    links: list[tuple[tarfile.TarInfo, str]] = []
    link_names: dict[str, str] = {}  # by casefolded name: a Windows or macOS robot finds "Link/x" inside "link"
    while True:
        stream.allow(MAX_HEADER_BYTES)
        member = tar.next()
        if member is None:
            break
        files += 1
        if files > max_files:
            raise ArchiveTooLarge(unit="files", limit=max_files, found=files, member=member.name)
        name = _checked_name(member, link_names)
        size_bytes = 0
        if member.islnk():
            parts = _parts(member.linkname)  # a hard link names a member of the archive
            leads_to = "/".join(parts) if parts is not None else None
            if leads_to is None or leads_to not in sizes:
                raise _unsafe(f"{name!r} is a hard link to {member.linkname!r}, which is not a file before it")
            size_bytes = sizes[name] = sizes[leads_to]
        elif member.isreg() and member.sparse is None:  # pack makes no sparse files, and their maps can lie
            if member.size < 0:
                raise _unsafe(f"{name!r} declares a size of {member.size} bytes")
            size_bytes = sizes[name] = member.size
        elif not (member.isdir() or member.issym()):
            raise _unsafe(f"{name!r} is not a file, folder or link")
        total_bytes += size_bytes
        if total_bytes > max_bytes:
            raise ArchiveTooLarge(unit="bytes", limit=max_bytes, found=total_bytes, member=name)
        if member.issym() or member.islnk():
            links.append((member, name))
            link_names[name.casefold()] = name
        elif name:  # else the package folder itself, "./"
            stream.allow(member.size if member.isreg() else 0)
            tar.extract(member, target, filter="data")
    symlinks = {name: _leads_to(name, member.linkname, link_names) for member, name in links if member.issym()}
    for name, size_bytes in _link_bytes(symlinks, sizes).items():
        total_bytes += size_bytes
        if total_bytes > max_bytes:
            raise ArchiveTooLarge(unit="bytes", limit=max_bytes, found=total_bytes, member=name)
    stream.allow(0)  # a link that tarfile copies re-reads a file already read, no further
    for member, _ in links:
        tar.extract(member, target, filter="data")


def _checked_name(member: tarfile.TarInfo, link_names: dict[str, str]) -> str:
    """The member's name, normalised; `BadRequest` if it is absolute, goes up or goes through a link."""
    parts = _parts(member.name)
    if parts is None or (not parts and not member.isdir()):
        raise _unsafe(f"{member.name!r} is outside the package folder")
    for depth in range(1, len(parts)):
        link = link_names.get("/".join(parts[:depth]).casefold())
        if link is not None:
            raise _unsafe(f"{member.name!r} is inside the link {link!r}")
    return "/".join(parts)


def _parts(name: str) -> tuple[str, ...] | None:
    """The parts of a relative name without "." parts; None if it is absolute or has a ".." part."""
    # Windows rules read both separators, drives and shares, so a name is judged as every robot would.
    path = PureWindowsPath(name)
    if path.drive or path.root or ".." in path.parts:
        return None
    return path.parts


def _leads_to(name: str, linkname: str, link_names: dict[str, str]) -> str:
    """Where the symbolic link `name` to `linkname` leads, as a name in the package; `BadRequest` if
    that is outside it, or if the way goes through a link (then where it leads would depend on the
    order the links are made in)."""
    link = PureWindowsPath(linkname)
    if link.drive or link.root:
        raise _unsafe(f"{name!r} links to {linkname!r}, outside the package folder")
    resolved = name.split("/")[:-1]
    for index, part in enumerate(link.parts):
        through = link_names.get("/".join(resolved).casefold()) if index else None
        if through is not None:
            raise _unsafe(f"{name!r} links to {linkname!r}, through the link {through!r}")
        if part != "..":
            resolved.append(part)
        elif resolved:
            resolved.pop()
        else:
            raise _unsafe(f"{name!r} links to {linkname!r}, outside the package folder")
    return "/".join(resolved)


def _link_bytes(symlinks: dict[str, str], sizes: dict[str, int]) -> dict[str, int]:
    """What each symbolic link holds where it is copied: the size of the file its chain of links ends at."""
    found: dict[str, int] = {}
    for start in symlinks:
        chain: dict[str, None] = {}  # ordered, and quick to look up
        name = start
        while name in symlinks and name not in found and name not in chain:
            chain[name] = None
            name = symlinks[name]
        size_bytes = 0 if name in chain else found.get(name, sizes.get(name, 0))  # a loop holds nothing
        found.update(dict.fromkeys(chain, size_bytes))
    return {name: found[name] for name in symlinks}


def _unsafe(reason: str) -> BadRequest:
    return BadRequest(f"the package archive cannot be unpacked: {reason}")


class _MeteredStream:
    """An archive's tar stream, gunzipped as it is read, that refuses to be read or moved past `limit`.

    tarfile alone decides how much it reads for a header (a pax header, a GNU long name, a sparse
    map), before `unpack` sees the member; this keeps a forged header from making it read gigabytes.
    """

    def __init__(self, data: bytes) -> None:
        self._gzip = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
        self.limit = MAX_HEADER_BYTES

    def allow(self, size_bytes: int) -> None:
        """Let the next reads go `size_bytes` past where the stream is now, and no further."""
        self.limit = self._gzip.tell() + size_bytes

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes; `BadRequest` if they would go past the limit."""
        if size < 0 or self._gzip.tell() + size > self.limit:
            raise _unsafe(f"a member's tar headers take more than {describe_bytes(MAX_HEADER_BYTES)}")
        return self._gzip.read(size)

    def seek(self, position: int, /) -> int:
        """Move to `position`; `BadRequest` if it is past the limit."""
        if position > self.limit:
            raise _unsafe(f"a member's tar headers take more than {describe_bytes(MAX_HEADER_BYTES)}")
        return self._gzip.seek(position)

    def tell(self) -> int:
        """Where the stream is, in bytes of tar."""
        return self._gzip.tell()

    def write(self, data: bytes, /) -> int:
        """Never: the stream is only read."""
        raise io.UnsupportedOperation("write")

    def close(self) -> None:
        """Close the gzip stream."""
        self._gzip.close()

    def __enter__(self) -> _MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
