"""The storage service's one seam to the object store: a tenant's `HERDER_STORAGE_<tenant>`.

Objects are written as nats.py's object store writes them (chunks on `$O.<store>.C.<nuid>`, then the
metadata on `$O.<store>.M.<name>`, rolled up), so `nats object ls|get` shows them; but herder keeps the
stream sequence of every chunk it writes, and reads a chunk back by its sequence, in one lookup. (The
object store's own reader streams an object from its start: a piece from the middle of a large file
would cost reading everything before it.)
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import Header, ObjectInfo, ObjectMetaOptions

from herder.protocol import subjects
from herder.protocol.errors import Internal, Unavailable
from herder.services.common.bus import JetStreamSettings, ensure_object_store

# Rolls the metadata subject up to its newest message, as the object store does.
_ROLLUP: dict[str, Any] = {Header.ROLLUP.value: "sub"}
PUBLISH_TIMEOUT_S = 10.0


class ChunkMissing(Exception):
    """A chunk is not where the database says (the object was replaced or removed meanwhile)."""


class Objects:
    """One tenant's storage object store, as the storage service writes and reads it."""

    def __init__(self, js: JetStreamContext, tenant: str) -> None:
        self._js = js
        self.store = subjects.storage_bucket(tenant)
        self.stream = subjects.object_store_stream(self.store)

    @classmethod
    async def open(cls, js: JetStreamContext, tenant: str, settings: JetStreamSettings) -> Objects:
        """The tenant's store, created first if it does not exist."""
        await ensure_object_store(js, subjects.storage_bucket(tenant), settings)
        return cls(js, tenant)

    async def put_chunk(self, nuid: str, data: bytes) -> int:
        """Store one chunk of object `nuid`; its stream sequence."""
        try:
            ack = await self._js.publish(subjects.object_chunks(self.store, nuid), data, timeout=PUBLISH_TIMEOUT_S)
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            raise self._unavailable() from None
        return int(ack.seq)

    async def put_meta(
        self, name: str, nuid: str, *, size: int, chunks: int, sha256: str, chunk_bytes: int, description: str
    ) -> None:
        """Publish what makes the chunks of `nuid` the object `name` (replacing what it named before)."""
        info = ObjectInfo(
            name=name,
            bucket=self.store,
            nuid=nuid,
            size=size,
            chunks=chunks,
            mtime=datetime.now(UTC).isoformat(),
            digest="SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(sha256)).decode(),
            description=description,
            options=ObjectMetaOptions(max_chunk_size=chunk_bytes),
        )
        try:
            await self._js.publish(
                subjects.object_meta(self.store, name),
                json.dumps(info.as_dict()).encode(),
                headers=_ROLLUP,
                timeout=PUBLISH_TIMEOUT_S,
            )
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            raise self._unavailable() from None

    async def read_chunk(self, nuid: str, seq: int) -> bytes:
        """The chunk of `nuid` at stream sequence `seq`; `ChunkMissing` when another message (or none) is there."""
        expected = subjects.object_chunks(self.store, nuid)
        try:
            # Any replica answers a direct get; one that has not caught up yet may not have it.
            found = await self._js.get_msg(self.stream, seq=seq, direct=True)
        except nats.js.errors.NotFoundError:
            found = None
        except nats.errors.TimeoutError:
            raise self._unavailable() from None
        if found is None or found.subject != expected:
            try:
                found = await self._js.get_msg(self.stream, seq=seq)
            except nats.js.errors.NotFoundError:
                raise ChunkMissing(seq) from None
            except nats.errors.TimeoutError:
                raise self._unavailable() from None
        if found.subject != expected:
            raise ChunkMissing(seq)
        return found.data or b""

    async def purge(self, nuid: str) -> None:
        """Remove every chunk of `nuid`."""
        await self._purge(subjects.object_chunks(self.store, nuid))

    async def purge_meta(self, name: str, *, nuid: str) -> None:
        """Remove the metadata of object `name` if it still names `nuid` (a newer object of that name stays)."""
        subject = subjects.object_meta(self.store, name)
        try:
            last = await self._js.get_last_msg(self.stream, subject)
        except nats.js.errors.NotFoundError:
            return
        try:
            named = json.loads(last.data or b"{}").get("nuid")
        except ValueError:
            named = None
        if named == nuid:
            await self._purge(subject)

    async def _purge(self, subject: str) -> None:
        try:
            await self._js.purge_stream(self.stream, subject=subject)
        except nats.errors.TimeoutError:
            raise self._unavailable() from None
        except nats.js.errors.NotFoundError as exc:
            raise Internal(f"the object store {self.store} is gone ({exc})") from None

    def _unavailable(self) -> Unavailable:
        return Unavailable(f"the {self.store} object store did not answer in time; JetStream may be down or busy")
