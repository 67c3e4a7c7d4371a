"""Events: the outbox, publishing after commit, the relay, and deduplication."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from herder.protocol import codec, subjects
from herder.protocol.messages import Event, EventData
from herder.services.common import database
from herder.services.common.bus import JetStreamSettings, ensure_event_stream
from herder.services.common.events import EventPublisher, outbox


class RobotRenamed(EventData):
    event_type: ClassVar[str] = "registry.robot_renamed"

    robot: str


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = database.create_engine(db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    context = nc.jetstream()
    await ensure_event_stream(context, "acme", JetStreamSettings())
    return context


async def stream_events(js: JetStreamContext) -> list[Event]:
    info = await js.stream_info(subjects.events_stream("acme"))
    if info.state.messages == 0:
        return []
    return [
        codec.load(Event, (await js.get_msg(subjects.events_stream("acme"), seq)).data or b"")
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


async def outbox_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(outbox))).scalar_one())


def renamed(name: str) -> Event:
    return Event.of(RobotRenamed(robot=name), tenant="acme", actor="tester")


async def test_events_are_published_after_commit_and_leave_the_outbox(
    js: JetStreamContext, engine: AsyncEngine
) -> None:
    publisher = EventPublisher(js, engine)
    async with publisher.transaction() as tx:
        await tx.connection.execute(text("SELECT 1"))
        tx.emit(renamed("r1"))
        tx.emit(renamed("r2"))
    published = await stream_events(js)
    assert [e.data["robot"] for e in published] == ["r1", "r2"]
    assert published[0].subject == "hd.acme.evt.registry.robot_renamed"
    assert await outbox_rows(engine) == 0


async def test_a_rolled_back_change_publishes_nothing(js: JetStreamContext, engine: AsyncEngine) -> None:
    publisher = EventPublisher(js, engine)

    async def failing_change() -> None:
        async with publisher.transaction() as tx:
            tx.emit(renamed("never"))
            raise RuntimeError("the change fails")

    with pytest.raises(RuntimeError):
        await failing_change()
    assert await stream_events(js) == []
    assert await outbox_rows(engine) == 0


async def test_an_event_that_cannot_be_published_waits_in_the_outbox_for_the_relay(
    js: JetStreamContext, engine: AsyncEngine
) -> None:
    await js.delete_stream(subjects.events_stream("acme"))  # JetStream refuses the publish now
    publisher = EventPublisher(js, engine)
    async with publisher.transaction() as tx:
        tx.emit(renamed("delayed"))
    assert await outbox_rows(engine) == 1

    await ensure_event_stream(js, "acme", JetStreamSettings())
    assert await publisher.relay_once(grace_s=0) == 1
    assert [e.data["robot"] for e in await stream_events(js)] == ["delayed"]
    assert await outbox_rows(engine) == 0


async def test_the_same_event_published_twice_is_stored_once(js: JetStreamContext) -> None:
    publisher = EventPublisher(js, None)
    event = renamed("once")
    await publisher.publish(event)
    await publisher.publish(event)
    assert [e.id for e in await stream_events(js)] == [event.id]


async def test_the_relay_leaves_young_rows_to_their_writer(js: JetStreamContext, engine: AsyncEngine) -> None:
    await js.delete_stream(subjects.events_stream("acme"))
    publisher = EventPublisher(js, engine)
    async with publisher.transaction() as tx:
        tx.emit(renamed("young"))
    await ensure_event_stream(js, "acme", JetStreamSettings())
    assert await publisher.relay_once(grace_s=60) == 0
    assert await outbox_rows(engine) == 1
