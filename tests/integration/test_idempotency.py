"""Idempotent creating verbs over a real nats-server, on SQLite and PostgreSQL: a probe service whose
`make` verb inserts a row of its own table, sent again and again under one key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from sqlalchemy import Column, MetaData, String, Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from herder.protocol import codec, subjects
from herder.protocol.codec import Header
from herder.protocol.errors import BadRequest, Conflict
from herder.protocol.messages import Creating, Model, Request, new_id, utcnow
from herder.services.common import database, idempotency
from herder.services.common.idempotency import IdempotencyStore, Scope, idempotency_keys, key_hash
from herder.services.common.runtime import RequestContext, Service, ServiceRunner, endpoint
from tests.conftest import Stack
from tests.support import eventually

probe_metadata = MetaData()
things = Table(
    "probe_things",
    probe_metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
)


class Thing(Model):
    id: str
    name: str
    # Shown once, like a token: a rebuilt reply cannot have it.
    secret: str | None
    instance: str


class MakeThing(Creating, Request[Thing]):
    service = "probe"
    verb = "make"

    name: str


class ProbeService(Service):
    """A service with one idempotent creating verb."""

    name = "probe"

    async def setup(self) -> None:
        self.committed = 0
        self.replays = 0
        self.rebuild = True
        # Before the transaction: holds concurrent duplicates until all have passed the lookup.
        self.barrier: asyncio.Barrier | None = None
        # After the commit: keeps the first request running with its object created.
        self.gate: asyncio.Event | None = None

    @endpoint(idempotent=True)
    async def make(self, request: MakeThing, ctx: RequestContext) -> Thing:
        if self.barrier is not None:
            await self.barrier.wait()
        thing_id = new_id()
        async with self.runtime.events.transaction() as tx:
            await ctx.claim(tx.connection, thing_id)
            await tx.connection.execute(insert(things).values(id=thing_id, name=request.name))
        self.committed += 1
        if self.gate is not None:
            await self.gate.wait()
        return Thing(id=thing_id, name=request.name, secret="hd_" + new_id(), instance=self.instance_id)

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        self.replays += 1
        if not self.rebuild:
            return None
        async with database.read(self.engine) as connection:
            row = (await connection.execute(select(things).where(things.c.id == object_id))).one()
        return Thing(id=row.id, name=row.name, secret=None, instance=self.instance_id)


@pytest.fixture
async def engine(stack: Stack) -> AsyncEngine:
    assert stack.host.engine is not None
    async with stack.host.engine.begin() as connection:
        await connection.run_sync(probe_metadata.create_all)
    return stack.host.engine


async def start_probe(stack: Stack) -> ServiceRunner:
    assert stack.host.runtime is not None
    runner = ServiceRunner(ProbeService(stack.host.runtime))
    await runner.start()
    return runner


class Probe:
    """The running probe service, which a test may restart."""

    def __init__(self, stack: Stack, runner: ServiceRunner) -> None:
        self.stack = stack
        self.runner = runner

    @property
    def service(self) -> ProbeService:
        service = self.runner.service
        assert isinstance(service, ProbeService)
        return service

    async def restart(self) -> None:
        await self.runner.stop(timeout=1)
        self.runner = await start_probe(self.stack)


@pytest.fixture
async def probe(stack: Stack, engine: AsyncEngine) -> AsyncIterator[Probe]:
    running = Probe(stack, await start_probe(stack))
    try:
        yield running
    finally:
        await running.runner.stop(timeout=1)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the runtime's look-ups of claimed keys: a repeat that waits looks up again and again.

    The wait is stretched, so that a slow machine cannot turn a repeat that should wait into one
    that asks for a rebuilt reply."""
    monkeypatch.setattr(idempotency, "REPLY_WAIT_S", 30.0)
    calls: list[int] = []
    original = IdempotencyStore.lookup

    async def counted(self: IdempotencyStore, claim: idempotency.Claim) -> idempotency.Record | None:
        calls.append(1)
        return await original(self, claim)

    monkeypatch.setattr(IdempotencyStore, "lookup", counted)
    return calls


SUBJECT = subjects.service("default", "probe", "make")


async def raw(stack: Stack, body: bytes, *, key: str | None = None, json_body: bool = False) -> Any:
    """A request as another language's NATS client sends it: the raw reply message."""
    headers = {Header.AUTHORIZATION: f"Bearer {stack.admin_token}"}
    if key is not None:
        headers[Header.MSG_ID] = key
    if json_body:
        headers[Header.CONTENT_TYPE] = codec.JSON
    return await stack.nc.request(SUBJECT, body, headers=headers, timeout=5)


async def count_things(engine: AsyncEngine) -> int:
    async with database.read(engine) as connection:
        return int((await connection.execute(select(func.count()).select_from(things))).scalar_one())


async def claims(engine: AsyncEngine) -> list[Any]:
    async with database.read(engine) as connection:
        return list((await connection.execute(select(idempotency_keys))).all())


async def test_a_repeat_gets_the_first_reply_and_creates_nothing_also_after_a_restart(
    stack: Stack, probe: Probe, engine: AsyncEngine
) -> None:
    key = new_id()
    replies = [await stack.client.request(MakeThing(name="a"), idempotency_key=key) for _ in range(5)]
    assert replies[0].secret is not None
    assert all(reply == replies[0] for reply in replies), (replies, probe.service.committed, probe.service.replays)
    assert await count_things(engine) == 1
    assert probe.service.committed == 1 and probe.service.replays == 0

    first_instance = probe.service.instance_id
    await probe.restart()
    assert probe.service.instance_id != first_instance
    again = await stack.client.request(MakeThing(name="a"), idempotency_key=key)
    assert again == replies[0]  # the stored reply, down to the instance that made it
    assert await count_things(engine) == 1
    assert probe.service.committed == 0


async def test_a_json_caller_puts_the_key_in_the_body_and_the_header_wins(
    stack: Stack, probe: Probe, engine: AsyncEngine
) -> None:
    body_key = new_id()
    body = json.dumps({"name": "j", "request_id": body_key}).encode()
    replies = [await raw(stack, body, json_body=True) for _ in range(5)]
    assert all(not codec.is_error_reply(reply.headers) for reply in replies)
    assert {reply.data for reply in replies} == {replies[0].data}
    first = json.loads(replies[0].data)
    assert first["name"] == "j" and first["secret"].startswith("hd_")
    assert await count_things(engine) == 1

    # With both, the header is the key: this is a new request, whatever the body says.
    header_key = new_id()
    by_header = json.loads((await raw(stack, body, key=header_key, json_body=True)).data)
    assert by_header["id"] != first["id"]
    assert await count_things(engine) == 2
    other_body = json.dumps({"name": "j", "request_id": new_id()}).encode()
    assert json.loads((await raw(stack, other_body, key=header_key, json_body=True)).data) == by_header
    assert await count_things(engine) == 2


async def test_the_same_key_for_another_request_is_a_conflict(stack: Stack, probe: Probe, engine: AsyncEngine) -> None:
    key = new_id()
    await stack.client.request(MakeThing(name="a"), idempotency_key=key)
    with pytest.raises(Conflict, match="was used for a different request") as caught:
        await stack.client.request(MakeThing(name="b"), idempotency_key=key)
    assert key not in caught.value.message  # the key unlocks a reply: it is never echoed whole
    assert await count_things(engine) == 1


async def test_concurrent_duplicates_create_one_object(stack: Stack, probe: Probe, engine: AsyncEngine) -> None:
    # Every duplicate passes the look-up before any claims: they race on the claim itself.
    probe.service.barrier = asyncio.Barrier(5)
    key = new_id()
    replies = await asyncio.wait_for(
        asyncio.gather(*(stack.client.request(MakeThing(name="c"), idempotency_key=key) for _ in range(5))),
        timeout=30,
    )
    assert await count_things(engine) == 1
    assert probe.service.committed == 1
    assert len({reply.id for reply in replies}) == 1
    originals = [reply for reply in replies if reply.secret is not None]
    assert originals and all(reply == originals[0] for reply in originals)


async def test_without_a_key_each_request_creates(stack: Stack, probe: Probe, engine: AsyncEngine) -> None:
    made = [msgpack.unpackb((await raw(stack, codec.dump(MakeThing(name="n")))).data)["id"] for _ in range(3)]
    # herder's client sends a fresh key with each call it makes.
    made += [(await stack.client.request(MakeThing(name="n"))).id for _ in range(2)]
    assert len(set(made)) == 5
    assert await count_things(engine) == 5
    assert len(await claims(engine)) == 2


async def test_an_expired_claim_is_replaced(stack: Stack, probe: Probe, engine: AsyncEngine) -> None:
    key = new_id()
    first = await stack.client.request(MakeThing(name="e"), idempotency_key=key)
    async with engine.begin() as connection:
        await connection.execute(update(idempotency_keys).values(expires_at=utcnow() - timedelta(seconds=1)))
    second = await stack.client.request(MakeThing(name="e"), idempotency_key=key)
    assert second.id != first.id
    assert await count_things(engine) == 2
    [row] = await claims(engine)
    assert row.object_id == second.id
    assert await stack.client.request(MakeThing(name="e"), idempotency_key=key) == second


async def test_the_stored_reply_cannot_be_read_without_the_key(stack: Stack, probe: Probe, engine: AsyncEngine) -> None:
    key = new_id()
    reply = await stack.client.request(MakeThing(name="secretive"), idempotency_key=key)
    assert reply.secret is not None
    [row] = await claims(engine)
    assert row.reply is not None
    assert reply.secret.encode() not in row.reply and b"secretive" not in row.reply
    assert all(key not in str(value) for value in row)  # only the key's hash is kept
    scope = Scope("default", "probe", "make")
    assert row.key_hash == key_hash(scope, key)
    opened = idempotency.unseal(scope, key, row.reply)
    assert opened is not None and codec.load(Thing, opened) == reply
    assert idempotency.unseal(scope, new_id(), row.reply) is None


async def test_a_repeat_waits_for_the_first_request_still_running(
    stack: Stack, probe: Probe, engine: AsyncEngine, lookups: list[int]
) -> None:
    probe.service.gate = asyncio.Event()
    key = new_id()
    first = asyncio.create_task(stack.client.request(MakeThing(name="w"), idempotency_key=key))
    await eventually(lambda: probe.service.committed == 1)
    repeat = asyncio.create_task(stack.client.request(MakeThing(name="w"), idempotency_key=key))
    # The first request's look-up, the repeat's, and at least one more while it waits.
    await eventually(lambda: len(lookups) >= 3)
    assert not repeat.done()
    probe.service.gate.set()
    original = await first
    assert await repeat == original
    assert probe.service.replays == 0 and await count_things(engine) == 1


async def test_a_reply_that_was_never_stored_is_rebuilt_by_the_service(
    stack: Stack, probe: Probe, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> bytes:
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(idempotency, "seal", fail)
        key = new_id()
        first = await stack.client.request(MakeThing(name="lost"), idempotency_key=key)  # not an error: best effort
    [row] = await claims(engine)
    assert row.reply is None and row.object_id == first.id
    await age_claims(engine)
    rebuilt = await stack.client.request(MakeThing(name="lost"), idempotency_key=key)
    assert (rebuilt.id, rebuilt.name, rebuilt.secret) == (first.id, "lost", None)
    assert probe.service.replays == 1 and await count_things(engine) == 1


async def test_without_a_way_to_rebuild_the_reply_a_repeat_is_told_to_retry(
    stack: Stack, probe: Probe, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe.service.rebuild = False
    monkeypatch.setattr(IdempotencyStore, "save_reply", _store_nothing)
    key = new_id()
    await stack.client.request(MakeThing(name="lost"), idempotency_key=key)
    await age_claims(engine)
    reply = await raw(stack, codec.dump(MakeThing(name="lost")), key=key)
    with pytest.raises(Conflict, match="being processed") as caught:
        codec.raise_error_reply(reply.data, reply.headers)
    assert caught.value.details["in_progress"] is True
    assert await count_things(engine) == 1


async def _store_nothing(self: IdempotencyStore, claim: idempotency.Claim, reply: bytes) -> bool:
    return False


async def age_claims(engine: AsyncEngine) -> None:
    """Date every claim an hour back, as if its request had crashed after its commit long ago."""
    async with engine.begin() as connection:
        await connection.execute(update(idempotency_keys).values(created_at=utcnow() - timedelta(hours=1)))


async def test_a_creating_request_that_timed_out_is_retried_safely_by_the_client(
    stack: Stack, probe: Probe, engine: AsyncEngine, lookups: list[int]
) -> None:
    # The first attempt creates, then outlives the client's timeout; the retry carries the same key.
    probe.service.gate = asyncio.Event()
    started = asyncio.create_task(stack.client.request(MakeThing(name="slow"), timeout=1.0))
    await eventually(lambda: probe.service.committed == 1)
    await eventually(lambda: len(lookups) >= 3, timeout=10)  # the retry came, and waits for the reply
    probe.service.gate.set()
    reply = await started
    assert reply.name == "slow"
    assert await count_things(engine) == 1 and probe.service.committed == 1


async def test_a_malformed_key_is_a_bad_request(stack: Stack, probe: Probe, engine: AsyncEngine) -> None:
    reply = await raw(stack, codec.dump(MakeThing(name="x")), key="not a key")
    with pytest.raises(BadRequest, match="1 to 64 letters"):
        codec.raise_error_reply(reply.data, reply.headers)
    assert await count_things(engine) == 0


async def test_purging_removes_only_expired_claims(stack: Stack, probe: Probe, engine: AsyncEngine) -> None:
    kept, expired = new_id(), new_id()
    for key in (kept, expired):
        await stack.client.request(MakeThing(name="p"), idempotency_key=key)
    scope = Scope("default", "probe", "make")
    async with engine.begin() as connection:
        await connection.execute(
            update(idempotency_keys)
            .where(idempotency_keys.c.key_hash == key_hash(scope, expired))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert await IdempotencyStore(engine).purge() == 1
    assert [row.key_hash for row in await claims(engine)] == [key_hash(scope, kept)]
    assert await IdempotencyStore(engine).purge() == 0


class Plain(Request[Thing]):
    service = "probe"
    verb = "plain"


def test_an_idempotent_endpoint_must_take_a_creating_request() -> None:
    async def plain(self: Service, request: Plain, ctx: RequestContext) -> Thing:
        raise NotImplementedError

    with pytest.raises(TypeError, match="must inherit Creating"):
        endpoint(idempotent=True)(plain)
    assert endpoint()(plain) is plain
