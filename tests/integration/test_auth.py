"""The auth service on a real bus, on SQLite and PostgreSQL: tokens made, listed, revoked, and kept secret."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import (
    Principal,
    PrincipalKind,
    Role,
    TokenCreate,
    TokenListRequest,
    TokenRevoke,
    WhoAmI,
)
from herder.protocol.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthenticated
from herder.protocol.messages import Event
from herder.services.auth.repository import tokens
from herder.services.auth.service import AuthService
from herder.services.common.credentials import ServiceCredential
from herder.services.common.events import outbox
from herder.services.common.host import HostConfig, ServiceHost
from herder.services.common.tokens import token_hash
from tests.conftest import Stack
from tests.support import connect_as, eventually


async def stored_events(stack: Stack) -> list[Event]:
    """Every event in the HERDER_EVENTS stream, oldest first."""
    assert stack.host.runtime is not None
    js = stack.host.runtime.js
    info = await js.stream_info(subjects.events_stream("default"))
    found = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(subjects.events_stream("default"), sequence)
        found.append(codec.load(Event, message.data or b""))
    return found


async def test_create_use_list_and_revoke_a_token(stack: Stack) -> None:
    created = await stack.client.request(TokenCreate(name="ci", role=Role.INTEGRATOR))
    assert created.token.name == "ci" and created.token.created_by == "admin"

    ci = stack.client_with(created.secret)
    principal = await ci.request(WhoAmI())
    assert (principal.kind, principal.name, principal.role) == (PrincipalKind.TOKEN, "ci", Role.INTEGRATOR)
    with pytest.raises(Forbidden):
        await ci.request(TokenListRequest())

    names = [t.name for t in (await stack.client.request(TokenListRequest())).tokens]
    assert names == ["admin", "ci"]

    revoked = await stack.client.request(TokenRevoke(name="ci"))
    assert revoked.token.revoked_by == "admin" and revoked.token.revoked_at is not None
    with pytest.raises(Unauthenticated):
        await ci.request(WhoAmI())
    assert [t.name for t in (await stack.client.request(TokenListRequest())).tokens] == ["admin"]
    listed = (await stack.client.request(TokenListRequest(include_revoked=True))).tokens
    assert [(t.name, t.revoked_at is not None) for t in listed] == [("admin", False), ("ci", True)]


async def test_a_revoked_name_can_be_used_again_but_a_live_one_cannot(stack: Stack) -> None:
    await stack.client.request(TokenCreate(name="ops"))
    with pytest.raises(Conflict, match="already has a token named 'ops'"):
        await stack.client.request(TokenCreate(name="ops"))
    await stack.client.request(TokenRevoke(name="ops"))
    again = await stack.client.request(TokenCreate(name="ops"))
    assert (await stack.client_with(again.secret).request(WhoAmI())).name == "ops"


async def test_bad_requests_and_missing_tokens(stack: Stack) -> None:
    with pytest.raises(NotFound, match="no live token named 'ghost'"):
        await stack.client.request(TokenRevoke(name="ghost"))
    # Without a token the request is refused before its (empty, invalid) body is even read.
    reply = await stack.nc.request(subjects.service("default", "auth", "token_create"), b"")
    with pytest.raises(Unauthenticated):
        codec.raise_error_reply(reply.data, reply.headers or {})
    reply = await stack.nc.request(
        subjects.service("default", "auth", "token_create"),
        codec.dump(TokenCreate.model_construct(name="Not Valid", role=Role.ADMIN)),
        headers={codec.Header.AUTHORIZATION: f"Bearer {stack.admin_token}"},
    )
    with pytest.raises(BadRequest, match="name"):
        codec.raise_error_reply(reply.data, reply.headers or {})


async def test_the_last_admin_token_stays(stack: Stack) -> None:
    with pytest.raises(Conflict, match="last admin token"):
        await stack.client.request(TokenRevoke(name="admin"))
    second = await stack.client.request(TokenCreate(name="admin-2", role=Role.ADMIN))
    await stack.client_with(second.secret).request(TokenRevoke(name="admin"))
    with pytest.raises(Unauthenticated):
        await stack.client.request(WhoAmI())


async def test_secrets_are_stored_nowhere_in_plain_text(stack: Stack) -> None:
    created = await stack.client.request(TokenCreate(name="secretive"))
    await stack.client.request(TokenRevoke(name="secretive"))
    engine = stack.host.engine
    assert engine is not None
    async with engine.connect() as connection:
        rows = (await connection.execute(select(tokens))).all()
        pending = (await connection.execute(select(outbox))).all()
    dumped = repr(rows) + repr(pending)
    for secret in (created.secret, stack.admin_token):
        assert secret not in dumped
        assert token_hash(secret) in dumped or secret == created.secret
    events = await stored_events(stack)
    assert [e.type for e in events] == ["auth.token_created", "auth.token_created", "auth.token_revoked"]
    assert all(created.secret not in e.model_dump_json() for e in events)
    assert events[1].actor == "admin" and events[1].data["name"] == "secretive"
    assert stack.host.runtime is not None
    keys = await stack.host.runtime.tokens.bucket.keys()
    assert created.secret not in repr(keys)


async def test_a_new_token_works_at_once_on_another_process(
    stack: Stack, nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential
) -> None:
    """A second service process (its own mirror of the tokens) accepts a token the moment it exists,
    and refuses it once revoked."""
    other = ServiceHost(
        HostConfig(
            nats_url=nats_url, db_url=db_url, services=(), credential=credential, data_dir=tmp_path, migrate=False
        )
    )
    await other.start()
    try:
        assert other.runtime is not None
        created = await stack.client.request(TokenCreate(name="fresh"))
        resolved = await other.runtime.tokens.resolve(created.secret)
        assert resolved is not None and resolved.name == "fresh"
        await stack.client.request(TokenRevoke(name="fresh"))
        tokens = other.runtime.tokens
        await eventually(lambda: tokens.snapshot().get(token_hash(created.secret)) is None)
        assert await other.runtime.tokens.resolve(created.secret) is None
    finally:
        await other.stop()


async def test_reconcile_heals_the_bucket(stack: Stack) -> None:
    created = await stack.client.request(TokenCreate(name="healed"))
    kv = stack.auth.kv
    await kv.delete(token_hash(created.secret))
    forged = Principal(kind=PrincipalKind.TOKEN, name="forged", role=Role.ADMIN, permissions=frozenset({"*"}))
    await kv.put(token_hash("hd_forged"), codec.dump(forged))
    assert stack.host.runtime is not None
    tokens_mirror = stack.host.runtime.tokens
    await eventually(lambda: token_hash("hd_forged") in tokens_mirror.snapshot())

    await stack.auth.reconcile()

    await eventually(lambda: token_hash("hd_forged") not in tokens_mirror.snapshot())
    await eventually(lambda: token_hash(created.secret) in tokens_mirror.snapshot())
    assert (await stack.client_with(created.secret).request(WhoAmI())).name == "healed"
    with pytest.raises(Unauthenticated):
        await stack.client_with("hd_forged").request(WhoAmI())


async def test_bootstrap_keeps_creates_rotates_or_leaves_alone(stack: Stack, nats_url: str) -> None:
    auth = stack.auth
    assert await auth.bootstrap_admin(stack.admin_token, may_rotate=True) == stack.admin_token
    assert await auth.bootstrap_admin(None, may_rotate=False) is None

    rotated = await auth.bootstrap_admin(None, may_rotate=True)
    assert rotated is not None and rotated != stack.admin_token
    # The old token is refused by the services, and its connection is put off the bus.
    with pytest.raises(Unauthenticated):
        await stack.client.request(WhoAmI())
    await eventually(lambda: not stack.nc.is_connected)
    nc = await connect_as(nats_url, rotated)
    try:
        assert (await Client(nc, token=rotated).request(WhoAmI())).name == "admin"
        operator = await Client(nc, token=rotated).request(TokenCreate(name="operator"))
        assert (await auth.bootstrap_admin(operator.secret, may_rotate=False)) is None
    finally:
        await nc.close()


async def test_auth_replicas_share_one_truth(
    stack: Stack, nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential
) -> None:
    """Two auth processes on one database: a token made through either works through both."""
    second = ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=db_url,
            services=(AuthService,),
            credential=credential,
            data_dir=tmp_path,
            migrate=False,
        )
    )
    await second.start()
    try:
        nc = await connect_as(nats_url, stack.admin_token, name="replica-client")
        try:
            client = Client(nc, token=stack.admin_token)
            made = [await client.request(TokenCreate(name=f"r-{i}")) for i in range(12)]
            for token in made:
                assert (await Client(nc, token=token.secret).request(WhoAmI())).name == token.token.name
            names = {t.name for t in (await stack.client.request(TokenListRequest())).tokens}
            assert names == {"admin", *(f"r-{i}" for i in range(12))}
        finally:
            await nc.close()
    finally:
        await second.stop()


async def test_concurrent_revocations_leave_an_admin(stack: Stack) -> None:
    """Two admins revoke each other at once: one wins, the other is refused, one admin stays."""
    second = await stack.client.request(TokenCreate(name="admin-2", role=Role.ADMIN))
    results = await asyncio.gather(
        stack.client.request(TokenRevoke(name="admin-2")),
        stack.client_with(second.secret).request(TokenRevoke(name="admin")),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 1, results
    # Refused by the guard, or (when the other revocation was quicker) for holding a revoked token.
    assert isinstance(refused[0], Conflict | Unauthenticated)
    engine = stack.host.engine
    assert engine is not None
    async with engine.connect() as connection:
        assert await stack.auth.repo.count_live_admins(connection, "default") == 1
