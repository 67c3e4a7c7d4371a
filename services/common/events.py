"""State-change events: staged in an outbox with the change, published to JetStream after commit.

A handler writes its rows and its events in one transaction. Once that commits,
the events go to the HERDER_EVENTS stream with `Nats-Msg-Id` set to the event id,
so a publish that is retried (by this process, or by another replica's relay)
is stored once. An event whose publish fails stays in the outbox, and the relay
publishes it later: a committed change is never without its event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog
from nats.js import JetStreamContext
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from herder.protocol import codec
from herder.protocol.codec import Header
from herder.protocol.messages import Event, utcnow
from herder.services.common import database
from herder.services.common.database import UtcDateTime

RELAY_INTERVAL_S = 5.0
# An outbox row younger than this is probably being published by the handler that wrote it.
RELAY_GRACE_S = 2.0
RELAY_BATCH = 200
PUBLISH_TIMEOUT_S = 5.0

metadata = MetaData()

outbox = Table(
    "outbox",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("subject", String(255), nullable=False),
    Column("type", String(128), nullable=False),
    Column("payload", LargeBinary(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False, index=True),
)

_INSERT = insert(outbox)

log = structlog.get_logger("herder.events")


class Transaction:
    """A database transaction that can also emit events; they are published after it commits."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        """Publish `event` once this transaction commits."""
        self.events.append(event)


class EventPublisher:
    """Publishes events to JetStream, through the outbox when they follow a database change."""

    def __init__(self, js: JetStreamContext, engine: AsyncEngine | None) -> None:
        self._js = js
        self._engine = engine
        # Deferred events, published in commit order by one worker.
        self._queue: asyncio.Queue[list[tuple[Event, bytes]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def publish(self, event: Event) -> None:
        """Publish one event now, deduplicated by its id."""
        await self._send(event.id, event.subject, codec.dump(event), event.type)

    def _headers(self, event_id: str, event_type: str) -> dict[str, str]:
        return {Header.MSG_ID: event_id, Header.TYPE: event_type, Header.CONTENT_TYPE: codec.MSGPACK}

    async def _send(self, event_id: str, subject: str, payload: bytes, event_type: str) -> None:
        await self._js.publish(subject, payload, headers=self._headers(event_id, event_type), timeout=PUBLISH_TIMEOUT_S)

    @asynccontextmanager
    async def transaction(self, *, defer: bool = False) -> AsyncIterator[Transaction]:
        """A transaction whose emitted events are stored with it and published after commit.

        With `defer`, the events are handed to a background worker that publishes them in commit
        order, so the caller can act on the change (send a command, reply) without waiting for
        JetStream; they are just as safe in the outbox until published.
        """
        if self._engine is None:
            raise RuntimeError("this service has no database; it cannot open a transaction")
        async with self._engine.begin() as connection:
            tx = Transaction(connection)
            yield tx
            staged = [(event, codec.dump(event)) for event in tx.events]
            if staged:
                await connection.execute(
                    _INSERT,
                    [
                        {"id": e.id, "subject": e.subject, "type": e.type, "payload": payload, "created_at": e.time}
                        for e, payload in staged
                    ],
                )
        if not staged:
            return
        if defer:
            self._queue.put_nowait(staged)
            if self._worker is None or self._worker.done():
                self._worker = asyncio.create_task(self._publish_deferred(), name="herder.events.deferred")
            return
        for event, payload in staged:
            await self._publish_staged(event.id, event.subject, payload, event.type)

    async def _publish_staged(self, event_id: str, subject: str, payload: bytes, event_type: str) -> bool:
        assert self._engine is not None
        try:
            await self._send(event_id, subject, payload, event_type)
        except Exception as exc:
            log.warning("event.publish_deferred", event_id=event_id, subject=subject, error=repr(exc))
            return False
        async with self._engine.begin() as connection:
            await connection.execute(delete(outbox).where(outbox.c.id == event_id))
        return True

    async def _publish_deferred(self) -> None:
        """Publish queued events in order, a batch at a time, then clear them from the outbox together."""
        assert self._engine is not None
        while True:
            staged = await self._queue.get()
            try:
                while not self._queue.empty() and len(staged) < RELAY_BATCH:
                    batch = self._queue.get_nowait()
                    self._queue.task_done()
                    staged.extend(batch)
                acks = [
                    await self._js.publish_async(
                        event.subject,
                        payload,
                        headers=self._headers(event.id, event.type),
                        wait_stall=PUBLISH_TIMEOUT_S,
                    )
                    for event, payload in staged
                ]
                published: list[str] = []
                for (event, _payload), ack in zip(staged, acks, strict=True):
                    try:
                        await asyncio.wait_for(ack, PUBLISH_TIMEOUT_S)
                    except Exception as exc:
                        # The relay publishes it later, from the outbox.
                        log.warning("event.publish_deferred", event_id=event.id, subject=event.subject, error=repr(exc))
                        break
                    published.append(event.id)
                if published:
                    async with self._engine.begin() as connection:
                        await connection.execute(delete(outbox).where(outbox.c.id.in_(published)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event.publish_failed", count=len(staged), error=repr(exc))
            finally:
                self._queue.task_done()

    async def flush(self, timeout: float = PUBLISH_TIMEOUT_S) -> None:
        """Wait until every deferred event has been published (or left to the relay)."""
        if self._worker is not None and not self._worker.done():
            await asyncio.wait_for(self._queue.join(), timeout)

    async def close(self, timeout: float = PUBLISH_TIMEOUT_S) -> None:
        """Publish what is queued, then stop the worker."""
        try:
            await self.flush(timeout)
        except TimeoutError:
            log.warning("event.flush_timeout", queued=self._queue.qsize())
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def relay_once(self, grace_s: float = RELAY_GRACE_S) -> int:
        """Publish outbox rows older than `grace_s`; return how many went out."""
        if self._engine is None:
            return 0
        cutoff = utcnow() - timedelta(seconds=grace_s)
        async with database.read(self._engine) as connection:
            rows = (
                await connection.execute(
                    select(outbox.c.id, outbox.c.subject, outbox.c.payload, outbox.c.type)
                    .where(outbox.c.created_at <= cutoff)
                    .order_by(outbox.c.created_at)
                    .limit(RELAY_BATCH)
                )
            ).all()
        sent = 0
        for row in rows:
            if not await self._publish_staged(row.id, row.subject, row.payload, row.type):
                break
            sent += 1
        if sent:
            log.info("event.relayed", count=sent)
        return sent
