"""State-change events: staged in an outbox with the change, published to JetStream after commit.

A handler writes its rows and its events in one transaction. Once that commits,
the events go to the HERDER_EVENTS stream with `Nats-Msg-Id` set to the event id,
so a publish that is retried (by this process, or by another replica's relay)
is stored once. An event whose publish fails stays in the outbox, and the relay
publishes it later: a committed change is never without its event.
"""

from __future__ import annotations

import asyncio
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

    async def publish(self, event: Event) -> None:
        """Publish one event now, deduplicated by its id."""
        await self._send(event.id, event.subject, codec.dump(event), event.type)

    async def _send(self, event_id: str, subject: str, payload: bytes, event_type: str) -> None:
        headers = {Header.MSG_ID: event_id, Header.TYPE: event_type, Header.CONTENT_TYPE: codec.MSGPACK}
        await self._js.publish(subject, payload, headers=headers, timeout=PUBLISH_TIMEOUT_S)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction whose emitted events are stored with it and published after commit."""
        if self._engine is None:
            raise RuntimeError("this service has no database; it cannot open a transaction")
        async with self._engine.begin() as connection:
            tx = Transaction(connection)
            yield tx
            staged = [(event, codec.dump(event)) for event in tx.events]
            if staged:
                await connection.execute(
                    insert(outbox),
                    [
                        {"id": e.id, "subject": e.subject, "type": e.type, "payload": payload, "created_at": e.time}
                        for e, payload in staged
                    ],
                )
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

    async def relay_once(self, grace_s: float = RELAY_GRACE_S) -> int:
        """Publish outbox rows older than `grace_s`; return how many went out."""
        if self._engine is None:
            return 0
        cutoff = utcnow() - timedelta(seconds=grace_s)
        async with self._engine.connect() as connection:
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

    async def relay_forever(self, interval_s: float = RELAY_INTERVAL_S) -> None:
        """Relay the outbox every `interval_s` until cancelled."""
        while True:
            try:
                await self.relay_once()
            except Exception as exc:
                log.warning("event.relay_failed", error=repr(exc))
            await asyncio.sleep(interval_s)
