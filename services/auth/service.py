"""The auth service: creates, lists and revokes API tokens, tells callers who they are, and keeps the fence.

The database is the system of record. Each live token is projected into the
HERDER_TOKENS bucket as `hash -> principal`, which every service process mirrors
to check tokens; the projection is reconciled with the database at start-up and
every RECONCILE_INTERVAL_S, so a failed write to the bucket heals itself.

The fence: the service answers nats-server's auth callout (`callout`), admitting each robot and
client with its own permissions; when a token leaves the bucket (revoked here, or a robot
removed by the registry) it closes that token's connections on the bus, and every
CONNECTION_SWEEP_S it closes any connection whose token is no longer live.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from herder.client.connection import connect
from herder.protocol import codec, subjects
from herder.protocol.auth import (
    Permission,
    Principal,
    PrincipalKind,
    Role,
    TokenCreate,
    TokenCreated,
    TokenCreatedEvent,
    TokenList,
    TokenListRequest,
    TokenRevoke,
    TokenRevoked,
    TokenRevokedEvent,
    WhoAmI,
)
from herder.protocol.errors import Conflict, NotFound, Unauthenticated
from herder.protocol.messages import Event, Model, new_id, utcnow
from herder.services.auth.callout import Callout
from herder.services.auth.connections import Connection, Connections
from herder.services.auth.core import (
    BOOTSTRAP_TOKEN_NAME,
    SYSTEM_ACTOR,
    BootstrapAction,
    TokenRecord,
    check_revoke,
    connection_name,
    plan_bootstrap,
)
from herder.services.auth.repository import TokenRepository
from herder.services.common import database
from herder.services.common.credentials import ACCOUNT
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.common.tokens import new_secret, token_hash

RECONCILE_INTERVAL_S = 60.0
CONNECTION_SWEEP_S = 30.0
# A token's connections are looked for again this long after it went: a client may have
# reconnected through another auth instance whose mirror had not yet seen the token go.
RECHECK_AFTER_S = 1.0


class AuthService(Service):
    """API tokens and identities."""

    name = "auth"

    async def setup(self) -> None:
        self.repo = TokenRepository()
        self.kv: KeyValue = self.runtime.tokens.bucket
        await self.reconcile()
        runtime = self.runtime
        if runtime.credential is None or runtime.address is None:
            raise RuntimeError("the auth service keeps the fence: it needs the bus address and the service credential")
        self._system: NATS = await connect(
            runtime.address.url,
            name="herder-auth-system",
            credentials=runtime.credential.system,
            ca_pem=runtime.address.ca_pem,
        )
        self.connections = Connections(self._system, ACCOUNT)
        self.callout = Callout(runtime.nc, runtime.tokens, runtime.credential, self.log)
        await self.callout.start()
        self._rechecks: set[asyncio.Task[None]] = set()
        runtime.tokens.on_removed(self._token_removed)
        self.tasks.periodic("auth.reconcile", self.reconcile, RECONCILE_INTERVAL_S)
        self.tasks.periodic("auth.connections", self.sweep_connections, CONNECTION_SWEEP_S)

    async def teardown(self) -> None:
        await self.callout.stop()
        await self.tasks.stop()
        for task in self._rechecks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._system.close()

    @endpoint(permission=Permission.TOKENS_MANAGE, idempotent=True)
    async def token_create(self, request: TokenCreate, ctx: RequestContext) -> TokenCreated:
        """Create a token; its secret is in this reply and nowhere else."""
        secret, record = await self._create(ctx.tenant, request.name, request.role, actor=ctx.actor, ctx=ctx)
        ctx.log.info("token.created", token=record.name, role=record.role.value)
        return TokenCreated(token=record.info(), secret=secret)

    @endpoint(permission=Permission.TOKENS_MANAGE)
    async def token_list(self, request: TokenListRequest, ctx: RequestContext) -> TokenList:
        """The tenant's tokens, without their secrets."""
        async with database.read(self.engine) as connection:
            records = await self.repo.for_tenant(connection, ctx.tenant, include_revoked=request.include_revoked)
        return TokenList(tokens=[record.info() for record in records])

    @endpoint(permission=Permission.TOKENS_MANAGE)
    async def token_revoke(self, request: TokenRevoke, ctx: RequestContext) -> TokenRevoked:
        """Revoke a token by name; every service refuses it from then on."""
        revoked = await self._revoke(ctx.tenant, request.name, actor=ctx.actor)
        ctx.log.info("token.revoked", token=revoked.name, role=revoked.role.value)
        return TokenRevoked(token=revoked.info())

    @endpoint()
    async def whoami(self, request: WhoAmI, ctx: RequestContext) -> Principal:
        """The caller's principal."""
        if ctx.principal is None:
            raise Unauthenticated()
        return ctx.principal

    async def bootstrap_admin(self, held_secret: str | None, *, may_rotate: bool) -> str | None:
        """Make sure the stack holds a live admin token of the default tenant; return the one to keep.

        Returns `held_secret` when it still works, a new secret when one was made, and None when
        admin tokens exist but the stack holds none of them and may not rotate its own.
        """
        tenant = subjects.DEFAULT_TENANT
        async with database.read(self.engine) as connection:
            held = await self.repo.live_by_hash(connection, token_hash(held_secret)) if held_secret else None
            live_admins = await self.repo.count_live_admins(connection, tenant)
            bootstrap = await self.repo.live_by_name(connection, tenant, BOOTSTRAP_TOKEN_NAME)
        action = plan_bootstrap(
            held_token_is_admin=held is not None and held.role is Role.ADMIN and held.tenant == tenant,
            live_admins=live_admins,
            may_rotate=may_rotate,
        )
        if action is BootstrapAction.KEEP:
            return held_secret
        if action is BootstrapAction.NONE:
            self.log.warning("auth.admin_token_not_held", live_admins=live_admins)
            return None
        name = BOOTSTRAP_TOKEN_NAME
        if bootstrap is not None and bootstrap.role is Role.ADMIN:
            # Rotating: the bootstrap token's secret is lost, so retire it before making its successor.
            await self._revoke(tenant, name, actor=SYSTEM_ACTOR, guard_last_admin=False)
        elif bootstrap is not None:
            name = f"{BOOTSTRAP_TOKEN_NAME}-{new_id()[:6]}"  # someone gave the name to a lesser token
        secret, _record = await self._create(tenant, name, Role.ADMIN, actor=SYSTEM_ACTOR)
        self.log.info("auth.admin_token_created", action=action.value, token=name)
        return secret

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        """A repeated `token_create` whose first reply was never stored: the secret was shown to nobody
        and cannot be shown now (herder keeps only its hash)."""
        raise Conflict(
            "the token was made by an earlier attempt of this request, whose reply (with the secret) was lost; "
            "revoke it ('herder token revoke NAME') and create it again"
        )

    async def _create(
        self, tenant: str, name: str, role: Role, *, actor: str | None, ctx: RequestContext | None = None
    ) -> tuple[str, TokenRecord]:
        secret = new_secret()
        record = TokenRecord(
            id=new_id(),
            tenant=tenant,
            name=name,
            role=role,
            token_hash=token_hash(secret),
            created_at=utcnow(),
            created_by=actor,
        )
        async with self.runtime.events.transaction() as tx:
            if ctx is not None:
                await ctx.claim(tx.connection, record.id)
            await self.repo.insert(tx.connection, record)
            tx.emit(Event.of(TokenCreatedEvent(token_id=record.id, name=name, role=role), tenant=tenant, actor=actor))
        try:
            await self._project(record)
        except Exception:
            # The token exists and its secret is in this reply; the reconcile projects it shortly.
            self.log.exception("token.projection_delayed", token=record.name)
        return secret, record

    async def _revoke(self, tenant: str, name: str, *, actor: str | None, guard_last_admin: bool = True) -> TokenRecord:
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.live_by_name(tx.connection, tenant, name)
            if record is None:
                raise NotFound(f"tenant {tenant!r} has no live token named {name!r}")
            if guard_last_admin:
                check_revoke(record, await self.repo.count_live_admins(tx.connection, tenant, lock=True))
            revoked = await self.repo.revoke(tx.connection, record.id, by=actor)
            if revoked is None:
                raise NotFound(f"token {name!r} was revoked meanwhile")
            tx.emit(
                Event.of(
                    TokenRevokedEvent(token_id=record.id, name=name, role=record.role),
                    tenant=tenant,
                    actor=actor,
                )
            )
        await self.kv.delete(record.token_hash)
        return revoked

    async def _project(self, record: TokenRecord) -> None:
        """Write a live token to the bucket, then undo that if it was revoked meanwhile.

        A revocation commits before it deletes from the bucket, so checking the row after the
        write closes the race in which this write would land after that delete.
        """
        await self.kv.put(record.token_hash, codec.dump(record.principal()))
        async with database.read(self.engine) as connection:
            current = await self.repo.by_id(connection, record.id)
        if current is None or not current.live:
            await self.kv.delete(record.token_hash)

    async def reconcile(self) -> None:
        """Make the bucket hold exactly the live tokens of the database."""
        # The mirror is read before the database: a token created in between is then only
        # missing from the mirror (and written), never wrongly taken for a revoked one.
        # The bucket also holds robot tokens, which the registry projects: leave those be.
        projected = {
            key: principal
            for key, principal in self.runtime.tokens.snapshot().items()
            if principal.kind is PrincipalKind.TOKEN
        }
        async with database.read(self.engine) as connection:
            live = {record.token_hash: record for record in await self.repo.all_live(connection)}
        written = removed = 0
        for key, record in live.items():
            if projected.get(key) != record.principal():
                await self._project(record)
                written += 1
        for key in projected.keys() - live.keys():
            await self.kv.delete(key)
            removed += 1
        if written or removed:
            self.log.info("auth.tokens_reconciled", written=written, removed=removed, live=len(live))

    # --- the fence: connections of tokens that are gone ---

    async def _token_removed(self, key: str, principal: Principal) -> None:
        """A token left the bucket (revoked, or its robot removed): close its connections, and look
        again a moment later for one that slipped back in meanwhile (in the background: changes of
        the token mirror wait for this one)."""
        name = connection_name(principal, key)
        await self._disconnect(name, principal)
        recheck = asyncio.create_task(self._disconnect(name, principal, after_s=RECHECK_AFTER_S))
        self._rechecks.add(recheck)
        recheck.add_done_callback(self._rechecks.discard)

    async def _disconnect(self, name: str, principal: Principal, *, after_s: float = 0.0) -> None:
        if after_s:
            await asyncio.sleep(after_s)
        try:
            closed = await self.connections.close_where(lambda _connection: True, user=name)
        except Exception as exc:  # the sweep closes it later
            self.log.warning("fence.disconnect_failed", principal=principal.name, error=repr(exc))
            return
        if closed:
            self.log.info("fence.disconnected", principal=principal.name, kind=principal.kind.value, connections=closed)

    async def sweep_connections(self) -> int:
        """Close every connection admitted with a token that is no longer live; how many."""
        live = self.runtime.tokens.snapshot()
        suspects = [c for c in await self.connections.find() if c.token_hash is not None and c.token_hash not in live]
        # The mirror may not show a token made a moment ago: the bucket has the last word.
        doomed: list[Connection] = []
        for connection in suspects:
            assert connection.token_hash is not None
            if await self.runtime.tokens.fetch_hash(connection.token_hash) is None:
                doomed.append(connection)
        closed = await self.connections.close(doomed) if doomed else 0
        if closed:
            self.log.info("fence.swept", connections=closed)
        return closed
