"""The secrets service: assets (global variables) and credentials, for people and for robots.

Credentials are encrypted at rest (`envelope`: a data key per value, wrapped by the master key)
and sealed in transit (`herder.client.sealing`): a secret comes in sealed to this service's
transport key (derived from the master key, so every replica holds the same one), goes to a robot
sealed to the robot's registered key, and to an operator sealed to a key made for that request.
It is in clear only in this process's memory, for as long as it takes to seal it again.

Who may see what, in one place (`_may_reveal`): a robot reads a credential only for a job it is
running (and, when the credential names processes, only for those); an operator sees a secret only
with `secrets.reveal`. Every read and write of a credential is an event, never with its value.
"""

from __future__ import annotations

import os
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from herder.client import sealing
from herder.protocol import subjects
from herder.protocol.auth import Permission, PrincipalKind
from herder.protocol.errors import BadRequest, Conflict, DecryptionFailed, Forbidden, NotFound
from herder.protocol.jobs import JobState, RobotJob
from herder.protocol.messages import Event, Model, new_id, utcnow
from herder.protocol.secrets import (
    EXPIRY_WARNING_DAYS,
    AssetChangedEvent,
    AssetDelete,
    AssetGet,
    AssetInfo,
    AssetList,
    AssetListRequest,
    AssetResolved,
    AssetSet,
    AssetType,
    AssetValue,
    AssetWrite,
    CredentialChangedEvent,
    CredentialDelete,
    CredentialFetch,
    CredentialInfo,
    CredentialList,
    CredentialListRequest,
    CredentialReadEvent,
    CredentialReveal,
    CredentialSet,
    CredentialValue,
    CredentialWrite,
    RewrapReport,
    RobotKey,
    RobotKeyReset,
    RobotKeySet,
    Scope,
    ScopeKind,
    SealedCredential,
    SecretsRewrap,
    TransportKey,
    TransportKeyRequest,
    credential_fetch_context,
    credential_reveal_context,
    credential_set_context,
    credential_write_context,
    parse_asset_value,
)
from herder.services.common import database
from herder.services.common.bus import ensure_bucket
from herder.services.common.events import Transaction
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.jobs.directory import RobotDirectory
from herder.services.secrets import envelope
from herder.services.secrets.repository import (
    AssetRecord,
    CredentialRecord,
    SecretsRepository,
    SecretValueRecord,
)

# A robot's job, once checked as running, is trusted for this long before it is checked again.
JOB_CHECK_S = 5.0
# How often a replica looks whether the master key file changed (a rotation on this machine).
KEY_FILE_CHECK_S = 2.0
_LIVE_JOB_STATES = frozenset({JobState.RUNNING, JobState.STOPPING, JobState.TERMINATING})
_TRANSPORT_PURPOSE = "secrets transport key"


def at_rest_context(tenant: str, name: str, scope: Scope) -> bytes:
    """What a stored secret is bound to: a ciphertext moved to another row does not decrypt."""
    return sealing.context("credential-at-rest", tenant, name, scope.kind.value, scope.name or "")


class SecretsService(Service):
    """Assets and credentials."""

    name = "secrets"

    async def setup(self) -> None:
        self.repo = SecretsRepository()
        self.ring = envelope.load_ring(self.runtime.data_dir, create=True)
        self._transport_keys = self._derive_transport_keys()
        # The key file, when the keys come from one: read again when it changes (a rotation).
        self._key_file = None if os.environ.get(envelope.MASTER_KEY_ENV) else self._key_path()
        self._key_file_seen = self._key_file_stamp()
        robots_kv = await ensure_bucket(self.runtime.js, subjects.ROBOTS_BUCKET, self.runtime.jetstream)
        self.directory = RobotDirectory(robots_kv, supervisor=self.tasks)
        await self.directory.start()
        # (tenant, robot, job id) -> (process, when the check expires)
        self._live_jobs: dict[tuple[str, str, str], tuple[str, float]] = {}
        if self._key_file is not None:
            self.tasks.periodic("secrets.key_file", self._reload_if_changed, KEY_FILE_CHECK_S)

    async def teardown(self) -> None:
        await self.tasks.cancel("secrets.key_file")
        await self.directory.stop()

    def _derive_transport_keys(self) -> dict[str, X25519PrivateKey]:
        """The transport key of the current master key first, then those of older versions (a CLI may
        have sealed to one a moment before a rotation)."""
        versions = [self.ring.current, *(v for v in reversed(self.ring.versions) if v != self.ring.current)]
        keys = [X25519PrivateKey.from_private_bytes(self.ring.derive(_TRANSPORT_PURPOSE, v)) for v in versions]
        return {sealing.public_text(key.public_key()): key for key in keys}

    def _key_path(self) -> Path | None:
        return self.runtime.data_dir / envelope.KEY_FILE if self.runtime.data_dir is not None else None

    def _key_file_stamp(self) -> tuple[int, int] | None:
        if self._key_file is None:
            return None
        try:
            stat = self._key_file.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _reload_keys(self) -> None:
        """Read the master keys again; the ring in use stays when they cannot be read."""
        stamp = self._key_file_stamp()
        ring = envelope.load_ring(self.runtime.data_dir, create=False)
        changed = (ring.current, ring.versions) != (self.ring.current, self.ring.versions)
        self.ring, self._key_file_seen = ring, stamp
        self._transport_keys = self._derive_transport_keys()
        if changed:
            self.log.info("secrets.master_keys_loaded", current=ring.current, versions=ring.versions)

    async def _reload_if_changed(self) -> None:
        if self._key_file_stamp() != self._key_file_seen:
            self._reload_keys()

    # --- assets ---

    @endpoint(permission=Permission.ASSETS_MANAGE, idempotent=True)
    async def asset_set(self, request: AssetSet, ctx: RequestContext) -> AssetInfo:
        """Set an asset's value at a scope; the first set creates it with its type."""
        now = utcnow()
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.asset(tx.connection, ctx.tenant, request.name)
            if record is None:
                if request.type is None:
                    raise BadRequest(f"asset {request.name!r} does not exist yet: give its type to create it")
                record = AssetRecord(
                    id=new_id(),
                    tenant=ctx.tenant,
                    name=request.name,
                    type=request.type,
                    description=request.description or "",
                    robots_may_write=bool(request.robots_may_write),
                    created_at=now,
                    created_by=ctx.actor,
                )
                await ctx.claim(tx.connection, record.id)
                await self.repo.create_asset(tx.connection, record)
            else:
                await ctx.claim(tx.connection, record.id)
                if request.type is not None and request.type is not record.type:
                    raise Conflict(
                        f"asset {request.name!r} is of type {record.type.value}, not {request.type.value}; "
                        "delete it first to change its type"
                    )
                if request.description is not None or request.robots_may_write is not None:
                    if request.description is not None:
                        record.description = request.description
                    if request.robots_may_write is not None:
                        record.robots_may_write = request.robots_may_write
                    await self.repo.update_asset(tx.connection, record)
            value = _typed(record.type, request.value)
            await self.repo.put_asset_value(tx.connection, record.id, request.scope, value, now, ctx.actor)
            _emit(tx, ctx, AssetChangedEvent(name=record.name, scope=request.scope, change="set"))
        return await self._asset_info(ctx.tenant, request.name)

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        async with database.read(self.engine) as connection:
            if verb == "asset_set":
                found = [r for r in await self.repo.assets(connection, ctx.tenant) if r.id == object_id]
                return _asset_info(found[0]) if found else None
            if verb == "credential_set":
                found_c = [r for r in await self.repo.credentials(connection, ctx.tenant) if r.id == object_id]
                return _credential_info(found_c[0]) if found_c else None
        return None

    @endpoint(authenticated=True)
    async def asset_get(self, request: AssetGet, ctx: RequestContext) -> AssetResolved:
        """The value a robot reads: its own, then its groups', then the global one."""
        robot = self._reader(ctx, request.robot, Permission.ASSETS_READ)
        async with database.read(self.engine) as connection:
            record = await self.repo.asset(connection, ctx.tenant, request.name)
        if record is None:
            raise NotFound(f"no asset {request.name!r}")
        chosen = _resolve({value.scope: value for value in record.values}, self._chain(ctx.tenant, robot))
        if chosen is None:
            where = f"for robot {robot}" if robot else "globally"
            raise NotFound(f"asset {request.name!r} has no value {where}")
        return AssetResolved(name=record.name, type=record.type, value=chosen.value, scope=chosen.scope)

    @endpoint(permission=Permission.ASSETS_READ)
    async def asset_list(self, request: AssetListRequest, ctx: RequestContext) -> AssetList:
        async with database.read(self.engine) as connection:
            records = await self.repo.assets(connection, ctx.tenant)
        return AssetList(assets=[_asset_info(record) for record in records])

    @endpoint(permission=Permission.ASSETS_MANAGE)
    async def asset_delete(self, request: AssetDelete, ctx: RequestContext) -> AssetInfo:
        """Delete one value (`scope`), or the whole asset."""
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.asset(tx.connection, ctx.tenant, request.name)
            if record is None:
                raise NotFound(f"no asset {request.name!r}")
            if request.scope is None:
                await self.repo.delete_asset(tx.connection, record.id)
                record.values = []
            else:
                if not await self.repo.delete_asset_value(tx.connection, record.id, request.scope):
                    raise NotFound(f"asset {request.name!r} has no {request.scope.describe()} value")
                record.values = [value for value in record.values if value.scope != request.scope]
            _emit(tx, ctx, AssetChangedEvent(name=record.name, scope=request.scope, change="deleted"))
        return _asset_info(record)

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def asset_write(self, request: AssetWrite, ctx: RequestContext) -> AssetResolved:
        """A robot writes an asset that robots may write: the global value, or its own."""
        robot = ctx.robot_name()
        scope = Scope.of(robot=robot) if request.own else Scope()
        now = utcnow()
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.asset(tx.connection, ctx.tenant, request.name)
            if record is None:
                raise NotFound(f"no asset {request.name!r}")
            if not record.robots_may_write:
                raise Forbidden(f"asset {request.name!r} is read-only for robots")
            value = _typed(record.type, request.value)
            await self.repo.put_asset_value(tx.connection, record.id, scope, value, now, ctx.actor)
            _emit(tx, ctx, AssetChangedEvent(name=record.name, scope=scope, change="written"))
        return AssetResolved(name=record.name, type=record.type, value=value, scope=scope)

    async def _asset_info(self, tenant: str, name: str) -> AssetInfo:
        async with database.read(self.engine) as connection:
            record = await self.repo.asset(connection, tenant, name)
        if record is None:
            raise NotFound(f"no asset {name!r}")
        return _asset_info(record)

    # --- credentials: people ---

    @endpoint(authenticated=True)
    async def secrets_key(self, request: TransportKeyRequest, ctx: RequestContext) -> TransportKey:
        """The key to seal a secret to on its way here."""
        return TransportKey(public_key=next(iter(self._transport_keys)))

    @endpoint(permission=Permission.CREDENTIALS_MANAGE, idempotent=True)
    async def credential_set(self, request: CredentialSet, ctx: RequestContext) -> CredentialInfo:
        """Set a credential's username and secret at a scope (the first set creates it)."""
        secret = self._unseal(
            request.sealed_secret, request.sealed_to, credential_set_context(ctx.tenant, request.name, request.scope)
        )
        now = utcnow()
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.credential(tx.connection, ctx.tenant, request.name)
            if record is None:
                record = CredentialRecord(
                    id=new_id(),
                    tenant=ctx.tenant,
                    name=request.name,
                    description=request.description or "",
                    robots_may_write=bool(request.robots_may_write),
                    processes=list(request.processes or []),
                    created_at=now,
                    created_by=ctx.actor,
                )
                await ctx.claim(tx.connection, record.id)
                await self.repo.create_credential(tx.connection, record)
            else:
                await ctx.claim(tx.connection, record.id)
                if request.description is not None:
                    record.description = request.description
                if request.robots_may_write is not None:
                    record.robots_may_write = request.robots_may_write
                if request.processes is not None:
                    record.processes = list(request.processes)
                await self.repo.update_credential(tx.connection, record)
            await self._store_secret(tx, record, request.scope, request.username, secret, request.expires_on, ctx)
            _emit(
                tx,
                ctx,
                CredentialChangedEvent(name=record.name, scope=request.scope, change="set", origin=self._origin(ctx)),
            )
        return await self._credential_info(ctx.tenant, request.name)

    @endpoint(permission=Permission.CREDENTIALS_READ)
    async def credential_list(self, request: CredentialListRequest, ctx: RequestContext) -> CredentialList:
        """Names, usernames, scopes and expiry; never a secret."""
        async with database.read(self.engine) as connection:
            records = await self.repo.credentials(connection, ctx.tenant)
        return CredentialList(credentials=[_credential_info(record) for record in records])

    @endpoint(permission=Permission.CREDENTIALS_MANAGE)
    async def credential_delete(self, request: CredentialDelete, ctx: RequestContext) -> CredentialInfo:
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.credential(tx.connection, ctx.tenant, request.name)
            if record is None:
                raise NotFound(f"no credential {request.name!r}")
            if request.scope is None:
                await self.repo.delete_credential(tx.connection, record.id)
                record.values = []
            else:
                if not await self.repo.delete_credential_value(tx.connection, record.id, request.scope):
                    raise NotFound(f"credential {request.name!r} has no {request.scope.describe()} value")
                record.values = [value for value in record.values if value.scope != request.scope]
            _emit(
                tx,
                ctx,
                CredentialChangedEvent(
                    name=record.name, scope=request.scope, change="deleted", origin=self._origin(ctx)
                ),
            )
        return _credential_info(record)

    @endpoint(permission=Permission.SECRETS_REVEAL)
    async def credential_reveal(self, request: CredentialReveal, ctx: RequestContext) -> SealedCredential:
        """A secret for an operator who may see it, sealed to the key the request brings."""
        reply_key = _public_key(request.reply_key)
        record, value = await self._resolved_credential(ctx.tenant, request.name, request.robot)
        secret = self._open_stored(record, value)
        box = sealing.seal(
            reply_key, secret, sealing.context(*credential_reveal_context(ctx.tenant, record.name, request.reply_key))
        )
        await self._read_event(ctx, record, value, revealed=True, robot=request.robot, job_id=None)
        return _sealed(record, value, box)

    # --- credentials: robots ---

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def credential_fetch(self, request: CredentialFetch, ctx: RequestContext) -> SealedCredential:
        """A credential for the job the calling robot runs, sealed to the robot's registered key."""
        robot = ctx.robot_name()
        process = await self._live_job(ctx, robot, request.job_id)
        async with database.read(self.engine) as connection:
            registered = await self.repo.robot_key(connection, ctx.tenant, robot)
        if registered is None:
            raise Conflict(f"robot {robot} has registered no sealing key; its agent does so when it starts")
        record, value = await self._resolved_credential(ctx.tenant, request.name, robot)
        if record.processes and process not in record.processes:
            raise Forbidden(
                f"credential {record.name!r} is for the processes {', '.join(record.processes)}, not {process!r}"
            )
        secret = self._open_stored(record, value)
        context = sealing.context(*credential_fetch_context(ctx.tenant, robot, request.job_id, record.name))
        box = sealing.seal(sealing.public_from_text(registered[0]), secret, context)
        await self._read_event(ctx, record, value, revealed=False, robot=robot, job_id=request.job_id)
        return _sealed(record, value, box)

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def credential_write(self, request: CredentialWrite, ctx: RequestContext) -> CredentialInfo:
        """A robot writes a credential robots may write, during a job: the global value or its own."""
        robot = ctx.robot_name()
        await self._live_job(ctx, robot, request.job_id)
        secret = self._unseal(
            request.sealed_secret,
            request.sealed_to,
            credential_write_context(ctx.tenant, robot, request.job_id, request.name),
        )
        scope = Scope.of(robot=robot) if request.own else Scope()
        async with self.runtime.events.transaction() as tx:
            record = await self.repo.credential(tx.connection, ctx.tenant, request.name)
            if record is None:
                raise NotFound(f"no credential {request.name!r}")
            if not record.robots_may_write:
                raise Forbidden(f"credential {request.name!r} is read-only for robots")
            current = next((value for value in record.values if value.scope == scope), None)
            expires = current.expires_on if current is not None else None
            await self._store_secret(tx, record, scope, request.username, secret, expires, ctx)
            _emit(
                tx,
                ctx,
                CredentialChangedEvent(name=record.name, scope=scope, change="written", origin=self._origin(ctx)),
            )
        return await self._credential_info(ctx.tenant, request.name)

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def robot_key_set(self, request: RobotKeySet, ctx: RequestContext) -> RobotKey:
        """Register the calling robot's sealing key; the first one stays until an operator resets it."""
        robot = ctx.robot_name()
        _public_key(request.public_key)
        async with self.runtime.events.transaction() as tx:
            registered = await self.repo.robot_key(tx.connection, ctx.tenant, robot)
            if registered is None:
                now = utcnow()
                await self.repo.set_robot_key(tx.connection, ctx.tenant, robot, request.public_key, now)
                registered = (request.public_key, now)
            elif registered[0] != request.public_key:
                raise Forbidden(
                    f"robot {robot} registered another sealing key before; if the robot was reinstalled, an "
                    f"operator resets it with 'herder robot reset-key {robot}'"
                )
        return RobotKey(robot=robot, public_key=registered[0], registered_at=registered[1])

    @endpoint(permission=Permission.ROBOTS_MANAGE)
    async def robot_key_reset(self, request: RobotKeyReset, ctx: RequestContext) -> RobotKey:
        async with self.runtime.events.transaction() as tx:
            registered = await self.repo.robot_key(tx.connection, ctx.tenant, request.robot)
            if registered is None or not await self.repo.delete_robot_key(tx.connection, ctx.tenant, request.robot):
                raise NotFound(f"robot {request.robot} has no sealing key")
        ctx.log.info("secrets.robot_key_reset", robot=request.robot)
        return RobotKey(robot=request.robot, public_key=registered[0], registered_at=registered[1])

    @endpoint(permission=Permission.SECRETS_ROTATE)
    async def secrets_rewrap(self, request: SecretsRewrap, ctx: RequestContext) -> RewrapReport:
        """Load the master keys again and rewrap every stored data key under the current one. Each value
        is rewritten only if it is still the one read, so a secret set meanwhile is left as it is
        (already under the current key); readers are never without a key that opens what they read."""
        if self._key_file is not None:
            self._reload_keys()
        async with database.read(self.engine) as connection:
            stored = await self.repo.all_values(connection)
        rewrapped, failed = 0, []
        for credential_id, tenant, name, value in stored:
            if value.sealed.key_version == self.ring.current:
                continue
            try:
                new = self.ring.rewrap(value.sealed, at_rest_context(tenant, name, value.scope))
            except envelope.DecryptionFailed as exc:
                failed.append(f"{tenant}/{name} ({value.scope.describe()}): {exc}")
                continue
            async with self.runtime.events.transaction() as tx:
                if await self.repo.rewrap(tx.connection, credential_id, value.scope, value.sealed, new):
                    rewrapped += 1
        async with database.read(self.engine) as connection:
            in_use: dict[str, int] = {}
            for _, _, _, value in await self.repo.all_values(connection):
                key = str(value.sealed.key_version)
                in_use[key] = in_use.get(key, 0) + 1
        ctx.log.info("secrets.rewrapped", current=self.ring.current, rewrapped=rewrapped, failed=len(failed))
        return RewrapReport(
            current_version=self.ring.current,
            versions_loaded=self.ring.versions,
            rewrapped=rewrapped,
            in_use=in_use,
            failed=failed,
        )

    # --- the checks, in one place ---

    def _reader(self, ctx: RequestContext, named: str | None, permission: str) -> str | None:
        """The robot whose view a read takes: the caller itself when it is a robot, else the robot
        named (with `permission`)."""
        principal = ctx.principal
        if principal is not None and principal.kind is PrincipalKind.ROBOT:
            if named is not None and named != principal.name:
                raise Forbidden(f"robot {principal.name} reads its own values, not robot {named}'s")
            return principal.name
        if principal is None or not principal.can(permission):
            raise Forbidden(f"this needs the permission {permission}")
        return named

    async def _live_job(self, ctx: RequestContext, robot: str, job_id: str) -> str:
        """The process of `job_id` if the calling robot is running it now; `forbidden` otherwise."""
        key = (ctx.tenant, robot, job_id)
        known = self._live_jobs.get(key)
        now = time.monotonic()
        if known is not None and known[1] > now:
            return known[0]
        try:
            job = await ctx.on_behalf(self.runtime.client).request(RobotJob(id=job_id))
        except NotFound:
            raise Forbidden(f"robot {robot} runs no job {job_id}; credentials are read during a job") from None
        if job.state not in _LIVE_JOB_STATES:
            self._live_jobs.pop(key, None)
            raise Forbidden(f"job {job_id} is {job.state.value}; credentials are read while a job runs")
        if len(self._live_jobs) > 10_000:
            self._live_jobs = {k: v for k, v in self._live_jobs.items() if v[1] > now}
        self._live_jobs[key] = (job.process, now + JOB_CHECK_S)
        return job.process

    def _chain(self, tenant: str, robot: str | None) -> list[Scope]:
        """The scopes a robot's read looks at, most specific first."""
        if robot is None:
            return [Scope()]
        presence = self.directory.get(tenant, robot)
        groups = presence.groups if presence is not None else []
        return [Scope.of(robot=robot), *(Scope.of(group=group) for group in groups), Scope()]

    async def _resolved_credential(
        self, tenant: str, name: str, robot: str | None
    ) -> tuple[CredentialRecord, SecretValueRecord]:
        async with database.read(self.engine) as connection:
            record = await self.repo.credential(connection, tenant, name)
        if record is None:
            raise NotFound(f"no credential {name!r}")
        value = _resolve({value.scope: value for value in record.values}, self._chain(tenant, robot))
        if value is None:
            where = f"for robot {robot}" if robot else "globally"
            raise NotFound(f"credential {name!r} has no value {where}")
        return record, value

    def _unseal(self, box_text: str, sealed_to: str, context: tuple[str, ...]) -> bytes:
        key = self._transport_keys.get(sealed_to)
        if key is None:
            raise Conflict(
                "the secret was sealed to a transport key this service no longer holds; ask 'secrets_key' again"
            )
        try:
            secret = sealing.open_sealed(key, sealing.Sealed.from_text(box_text), sealing.context(*context))
        except sealing.SealError as exc:
            raise BadRequest(f"the sealed secret does not open: {exc}") from None
        if not secret:
            raise BadRequest("the secret is empty")
        return secret

    def _open_stored(self, record: CredentialRecord, value: SecretValueRecord) -> bytes:
        context = at_rest_context(record.tenant, record.name, value.scope)
        try:
            if value.sealed.key_version not in self.ring.versions and self._key_file is not None:
                self._reload_keys()  # written under a version another replica rotated to a moment ago
            return self.ring.open(value.sealed, context)
        except envelope.DecryptionFailed as exc:
            self.log.error(
                "secrets.decryption_failed", credential=record.name, scope=value.scope.describe(), reason=str(exc)
            )
            raise DecryptionFailed(
                f"credential {record.name!r} ({value.scope.describe()}) does not decrypt: {exc}; "
                "set it again, or start the service with the master key it was written under",
                details={"credential": record.name, "scope": value.scope.describe()},
            ) from None

    async def _store_secret(
        self,
        tx: Transaction,
        record: CredentialRecord,
        scope: Scope,
        username: str,
        secret: bytes,
        expires_on: date | None,
        ctx: RequestContext,
    ) -> None:
        sealed = self.ring.seal(secret, at_rest_context(record.tenant, record.name, scope))
        value = SecretValueRecord(scope, username, expires_on, sealed, utcnow(), ctx.actor)
        await self.repo.put_credential_value(tx.connection, record.id, value)

    async def _read_event(
        self,
        ctx: RequestContext,
        record: CredentialRecord,
        value: SecretValueRecord,
        *,
        revealed: bool,
        robot: str | None,
        job_id: str | None,
    ) -> None:
        event = CredentialReadEvent(
            name=record.name,
            scope=value.scope,
            reader=ctx.actor or "unknown",
            robot=robot,
            job_id=job_id,
            revealed=revealed,
            origin=self._origin(ctx),
        )
        await self.runtime.events.publish(Event.of(event, tenant=ctx.tenant, actor=ctx.actor))

    def _origin(self, ctx: RequestContext) -> str | None:
        """Where a request came from: a robot's registered host, else what the caller said."""
        principal = ctx.principal
        if principal is not None and principal.kind is PrincipalKind.ROBOT:
            presence = self.directory.get(ctx.tenant, principal.name)
            if presence is not None:
                return presence.host
        return ctx.origin

    async def _credential_info(self, tenant: str, name: str) -> CredentialInfo:
        async with database.read(self.engine) as connection:
            record = await self.repo.credential(connection, tenant, name)
        if record is None:
            raise NotFound(f"no credential {name!r}")
        return _credential_info(record)


def _typed(kind: AssetType, value: Any) -> Any:
    try:
        return parse_asset_value(kind, value)
    except ValueError as exc:
        raise BadRequest(f"value: {exc}") from None


def _public_key(text: str) -> Any:
    try:
        return sealing.public_from_text(text)
    except (sealing.SealError, ValueError) as exc:
        raise BadRequest(f"not a usable X25519 public key: {exc}") from None


def _resolve(by_scope: dict[Scope, Any], chain: list[Scope]) -> Any:
    for scope in chain:
        if scope in by_scope:
            return by_scope[scope]
    return None


def _emit(tx: Transaction, ctx: RequestContext, data: Any) -> None:
    tx.emit(Event.of(data, tenant=ctx.tenant, actor=ctx.actor))


def _asset_info(record: AssetRecord) -> AssetInfo:
    return AssetInfo(
        name=record.name,
        type=record.type,
        description=record.description,
        robots_may_write=record.robots_may_write,
        values=[
            AssetValue(scope=value.scope, value=value.value, updated_at=value.updated_at, updated_by=value.updated_by)
            for value in record.values
        ],
        created_at=record.created_at,
    )


def _credential_info(record: CredentialRecord) -> CredentialInfo:
    today = utcnow().date()
    soon = today + timedelta(days=EXPIRY_WARNING_DAYS)
    return CredentialInfo(
        name=record.name,
        description=record.description,
        robots_may_write=record.robots_may_write,
        processes=record.processes,
        values=[
            CredentialValue(
                scope=value.scope,
                username=value.username,
                expires_on=value.expires_on,
                expired=value.expires_on is not None and value.expires_on < today,
                expires_soon=value.expires_on is not None and today <= value.expires_on <= soon,
                updated_at=value.updated_at,
                updated_by=value.updated_by,
            )
            for value in record.values
        ],
        created_at=record.created_at,
    )


def _sealed(record: CredentialRecord, value: SecretValueRecord, box: sealing.Sealed) -> SealedCredential:
    return SealedCredential(
        name=record.name,
        username=value.username,
        sealed_secret=box.text(),
        scope=value.scope,
        expires_on=value.expires_on,
    )


__all__ = ["ScopeKind", "SecretsService"]
