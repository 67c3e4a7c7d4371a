"""Files in and out of storage buckets, for people, programs and robots' agents: the chunking, the
checks and the retries around the storage service's verbs.

`upload` sends a local file in chunks and has the service check its size and sha256 before it is
stored; `download` writes a file to a temporary file beside the target, checks its sha256, and only
then renames it into place, so an interrupted download never leaves half a file where the whole one
should be. Both call `progress(done, total)` in bytes as they go.

The CLI (`herder storage put|get`) and the robot agent (a script's `sdk.storage(...).put|get`) use
these.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

from herder.client.backoff import backoff
from herder.client.requests import Client
from herder.protocol.errors import BadRequest, Conflict, HerderError, Unavailable
from herder.protocol.messages import Model, Request
from herder.protocol.storage import (
    MAX_CHUNK_BYTES,
    Download,
    FileInfo,
    UploadBegin,
    UploadCancel,
    UploadChunk,
    UploadEnd,
)

Progress = Callable[[int, int], None]
R = TypeVar("R", bound=Model)

# A chunk that got no answer is sent again this many times (a chunk already received is recognised).
CHUNK_RETRIES = 3
RETRY_BASE_S = 0.5
RETRY_MAX_S = 4.0
# Ending an upload copies the file into place: allow it time by its size, at this rate at worst.
END_RATE_BYTES_PER_S = 10 * 1024 * 1024
END_BASE_TIMEOUT_S = 30.0
# Reading the local file, a chunk at a time, for the sha256.
READ_BYTES = 1024 * 1024


async def upload(
    client: Client,
    bucket: str,
    path: str,
    local_file: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    content_type: str | None = None,
) -> FileInfo:
    """Upload `local_file` to `path` in `bucket` (replacing the file there); the file as stored.

    The service refuses, before any byte is sent, a file over the bucket's limits; and stores nothing
    unless what it received has the file's size and sha256. A file that changes while it is being
    sent is refused too.
    """
    source = Path(local_file)
    size, sha256 = await asyncio.to_thread(_size_and_sha256, source)
    kind = content_type or mimetypes.guess_type(source.name)[0]
    begun = await client.request(UploadBegin(bucket=bucket, path=path, size=size, sha256=sha256, content_type=kind))
    try:
        chunk_bytes = min(begun.chunk_bytes, MAX_CHUNK_BYTES)
        sent = hashlib.sha256()
        offset = 0
        handle = await asyncio.to_thread(_open_for_reading, source)
        try:
            while offset < size:
                data = await asyncio.to_thread(handle.read, min(chunk_bytes, size - offset))
                if not data:
                    break
                sent.update(data)
                await _send_chunk(client, begun.upload_id, offset, data)
                offset += len(data)
                if progress is not None:
                    progress(offset, size)
        finally:
            handle.close()
        if offset != size or sent.hexdigest() != sha256:
            raise BadRequest(f"{source} changed while it was being uploaded; nothing was stored, upload it again")
        timeout = max(client.timeout, END_BASE_TIMEOUT_S + size / END_RATE_BYTES_PER_S)
        stored = await _end(client, begun.upload_id, timeout)
    except BaseException:
        with contextlib.suppress(HerderError, asyncio.CancelledError):
            await client.request(UploadCancel(upload_id=begun.upload_id))
        raise
    if stored.sha256 != sha256 or stored.size != size:
        raise BadRequest(f"{bucket}/{path} was stored with another sha256 than {source}'s; upload it again")
    return stored


async def download(
    client: Client,
    bucket: str,
    path: str,
    local_file: str | os.PathLike[str],
    progress: Progress | None = None,
) -> FileInfo:
    """Download `path` of `bucket` to `local_file` (into it, named as in the bucket, when it is a folder),
    replacing what is there only once the whole file has arrived with the right sha256; the file's info."""
    target, temporary, handle = await asyncio.to_thread(_temporary_beside, Path(local_file), path)
    try:
        try:
            info = await _receive(client, bucket, path, handle, progress)
            await asyncio.to_thread(_flush, handle)
        finally:
            handle.close()
        await asyncio.to_thread(os.replace, temporary, target)
    except BaseException:
        await asyncio.to_thread(_remove_quietly, temporary)
        raise
    return info


async def _receive(client: Client, bucket: str, path: str, handle: BinaryIO, progress: Progress | None) -> FileInfo:
    digest = hashlib.sha256()
    offset = 0
    pinned: str | None = None
    while True:
        request = Download(bucket=bucket, path=path, offset=offset, length=MAX_CHUNK_BYTES, sha256=pinned)
        piece = await _retried(client, request)
        info = piece.file
        pinned = info.sha256
        if piece.data:
            digest.update(piece.data)
            await asyncio.to_thread(handle.write, piece.data)
            offset += len(piece.data)
        if progress is not None:
            progress(offset, info.size)
        if offset >= info.size:
            break
        if not piece.data:
            raise Conflict(f"{bucket}/{path} ended at {offset:,} bytes, before the {info.size:,} it said it has")
    if digest.hexdigest() != info.sha256:
        raise Conflict(
            f"{bucket}/{path} arrived with the sha256 {digest.hexdigest()}, not {info.sha256}; nothing was "
            "written, download it again"
        )
    return info


async def _send_chunk(client: Client, upload_id: str, offset: int, data: bytes) -> None:
    """Send one chunk; again when nothing answered. A chunk the service had received already (its
    answer was lost) is recognised by where the upload has got to."""
    attempt = 0
    while True:
        try:
            await client.request(UploadChunk(upload_id=upload_id, offset=offset, data=data))
            return
        except Conflict as exc:
            if exc.details.get("expected_offset") == offset + len(data):
                return  # the first send got there
            raise
        except Unavailable:
            attempt += 1
            if attempt > CHUNK_RETRIES:
                raise
            await asyncio.sleep(backoff(attempt, base_s=RETRY_BASE_S, max_s=RETRY_MAX_S))


async def _end(client: Client, upload_id: str, timeout: float) -> FileInfo:
    """End an upload; asking again while the service is still at it, or when its answer was lost."""
    attempt = 0
    while True:
        try:
            return await client.request(UploadEnd(upload_id=upload_id), timeout=timeout)
        except Conflict as exc:
            if not exc.details.get("in_progress"):
                raise
        except Unavailable:
            pass
        attempt += 1
        if attempt > CHUNK_RETRIES:
            raise Unavailable(f"upload {upload_id} was not ended after {attempt} tries; the storage service is busy")
        await asyncio.sleep(backoff(attempt, base_s=RETRY_BASE_S, max_s=RETRY_MAX_S))


async def _retried(client: Client, request: Request[R]) -> R:
    """A read, sent again when nothing answered (reading twice does no harm)."""
    attempt = 0
    while True:
        try:
            return await client.request(request)
        except Unavailable:
            attempt += 1
            if attempt > CHUNK_RETRIES:
                raise
            await asyncio.sleep(backoff(attempt, base_s=RETRY_BASE_S, max_s=RETRY_MAX_S))


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as handle:
            while block := handle.read(READ_BYTES):
                digest.update(block)
                size += len(block)
    except IsADirectoryError:
        raise BadRequest(f"{path} is a folder; upload its files one by one") from None
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    return size, digest.hexdigest()


def _open_for_reading(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror or exc}") from None


def _temporary_beside(target: Path, path: str) -> tuple[Path, Path, BinaryIO]:
    """Where the download goes (into `target` when it is a folder), and a new temporary file beside it."""
    if target.is_dir():
        target = target / PurePosixPath(path).name
    folder = target.parent
    if not folder.is_dir():
        raise BadRequest(f"cannot write {target}: the folder {folder} does not exist")
    try:
        descriptor, name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise BadRequest(f"cannot write in {folder}: {exc.strerror or exc}") from None
    return target, Path(name), os.fdopen(descriptor, "wb")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _flush(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


__all__ = ["Progress", "download", "upload"]
