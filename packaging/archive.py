"""Package archives: a process folder packed into a reproducible tar.gz, its sha256, and safe unpacking.

The same folder always packs to the same bytes (sorted entries, no timestamps or owners), so a
republished folder has the same hash. Unpacking refuses anything that would land outside the
target folder, links included.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

from herder.protocol.errors import BadRequest

# What is never packed: caches, version control, virtualenvs, herder's own run folders.
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", ".mypy_cache", ".pytest_cache"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")
MAX_PACKAGE_BYTES = 256 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
# How the object store writes an object's digest: "SHA-256=" and the base64url of the sha256.
DIGEST_PREFIX = "SHA-256="


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


def unpack(data: bytes, target: Path) -> None:
    """Unpack an archive into `target` (created), refusing members that would land outside it."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadRequest(f"the package archive cannot be unpacked: {exc}") from None
