"""The secrets service's tables: assets and credentials, their values per scope, and robots' keys.

A credential's secret is stored only as the envelope's ciphertext and wrapped data key (see
`envelope`); nothing here ever holds it in clear.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.secrets import AssetType, Scope, ScopeKind
from herder.services.common.database import UtcDateTime
from herder.services.secrets.envelope import Sealed

metadata = MetaData()

assets = Table(
    "secrets_assets",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("name", String(63), nullable=False),
    Column("type", String(16), nullable=False),
    Column("description", Text(), nullable=False),
    Column("robots_may_write", Boolean(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    UniqueConstraint("tenant", "name", name="ux_secrets_assets_name"),
)

asset_values = Table(
    "secrets_asset_values",
    metadata,
    Column("asset_id", String(32), primary_key=True),
    Column("scope_kind", String(8), primary_key=True),
    Column("scope_name", String(63), primary_key=True),  # '' for the global value
    Column("value", Text(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(128)),
)

credentials = Table(
    "secrets_credentials",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("name", String(63), nullable=False),
    Column("description", Text(), nullable=False),
    Column("robots_may_write", Boolean(), nullable=False),
    Column("processes", Text(), nullable=False),  # a JSON list of process names; [] for all
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    UniqueConstraint("tenant", "name", name="ux_secrets_credentials_name"),
)

credential_values = Table(
    "secrets_credential_values",
    metadata,
    Column("credential_id", String(32), primary_key=True),
    Column("scope_kind", String(8), primary_key=True),
    Column("scope_name", String(63), primary_key=True),
    Column("username", String(256), nullable=False),
    Column("expires_on", Date()),
    Column("key_version", Integer(), nullable=False),
    Column("wrapped_key", LargeBinary(), nullable=False),
    Column("ciphertext", LargeBinary(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(128)),
)

robot_keys = Table(
    "secrets_robot_keys",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("robot", String(63), primary_key=True),
    Column("public_key", String(64), nullable=False),
    Column("registered_at", UtcDateTime(), nullable=False),
)


def _scope(row: Any) -> Scope:
    kind = ScopeKind(row.scope_kind)
    return Scope(kind=kind, name=row.scope_name or None)


def _secret_value(row: Any) -> SecretValueRecord:
    return SecretValueRecord(
        scope=_scope(row),
        username=row.username,
        expires_on=row.expires_on,
        sealed=Sealed(row.key_version, bytes(row.wrapped_key), bytes(row.ciphertext)),
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


@dataclass
class ValueRecord:
    scope: Scope
    value: Any
    updated_at: datetime
    updated_by: str | None


@dataclass
class AssetRecord:
    id: str
    tenant: str
    name: str
    type: AssetType
    description: str
    robots_may_write: bool
    created_at: datetime
    created_by: str | None
    values: list[ValueRecord] = field(default_factory=list)


@dataclass
class SecretValueRecord:
    scope: Scope
    username: str
    expires_on: date | None
    sealed: Sealed
    updated_at: datetime
    updated_by: str | None


@dataclass
class CredentialRecord:
    id: str
    tenant: str
    name: str
    description: str
    robots_may_write: bool
    processes: list[str]
    created_at: datetime
    created_by: str | None
    values: list[SecretValueRecord] = field(default_factory=list)


class SecretsRepository:
    """Reads and writes of the secrets service's tables, on a connection the caller's transaction owns."""

    # --- assets ---

    async def assets(self, connection: AsyncConnection, tenant: str, name: str | None = None) -> list[AssetRecord]:
        query = select(assets).where(assets.c.tenant == tenant).order_by(assets.c.name)
        if name is not None:
            query = query.where(assets.c.name == name)
        found = {
            row.id: AssetRecord(
                id=row.id,
                tenant=row.tenant,
                name=row.name,
                type=AssetType(row.type),
                description=row.description,
                robots_may_write=row.robots_may_write,
                created_at=row.created_at,
                created_by=row.created_by,
            )
            for row in await connection.execute(query)
        }
        if found:
            rows = await connection.execute(
                select(asset_values)
                .where(asset_values.c.asset_id.in_(list(found)))
                .order_by(asset_values.c.scope_kind, asset_values.c.scope_name)
            )
            for row in rows:
                found[row.asset_id].values.append(
                    ValueRecord(_scope(row), json.loads(row.value), row.updated_at, row.updated_by)
                )
        return list(found.values())

    async def asset(self, connection: AsyncConnection, tenant: str, name: str) -> AssetRecord | None:
        found = await self.assets(connection, tenant, name)
        return found[0] if found else None

    async def create_asset(self, connection: AsyncConnection, record: AssetRecord) -> None:
        await connection.execute(
            insert(assets).values(
                id=record.id,
                tenant=record.tenant,
                name=record.name,
                type=record.type.value,
                description=record.description,
                robots_may_write=record.robots_may_write,
                created_at=record.created_at,
                created_by=record.created_by,
            )
        )

    async def update_asset(self, connection: AsyncConnection, record: AssetRecord) -> None:
        await connection.execute(
            update(assets)
            .where(assets.c.id == record.id)
            .values(description=record.description, robots_may_write=record.robots_may_write)
        )

    async def put_asset_value(
        self, connection: AsyncConnection, asset_id: str, scope: Scope, value: Any, now: datetime, actor: str | None
    ) -> None:
        key = (asset_values.c.asset_id == asset_id) & _at(asset_values, scope)
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        changed = await connection.execute(
            update(asset_values).where(key).values(value=text, updated_at=now, updated_by=actor)
        )
        if changed.rowcount == 0:
            await connection.execute(
                insert(asset_values).values(
                    asset_id=asset_id,
                    scope_kind=scope.kind.value,
                    scope_name=scope.name or "",
                    value=text,
                    updated_at=now,
                    updated_by=actor,
                )
            )

    async def delete_asset_value(self, connection: AsyncConnection, asset_id: str, scope: Scope) -> bool:
        result = await connection.execute(
            delete(asset_values).where(asset_values.c.asset_id == asset_id, _at(asset_values, scope))
        )
        return bool(result.rowcount)

    async def delete_asset(self, connection: AsyncConnection, asset_id: str) -> None:
        await connection.execute(delete(asset_values).where(asset_values.c.asset_id == asset_id))
        await connection.execute(delete(assets).where(assets.c.id == asset_id))

    # --- credentials ---

    async def credentials(
        self, connection: AsyncConnection, tenant: str, name: str | None = None
    ) -> list[CredentialRecord]:
        query = select(credentials).where(credentials.c.tenant == tenant).order_by(credentials.c.name)
        if name is not None:
            query = query.where(credentials.c.name == name)
        found = {
            row.id: CredentialRecord(
                id=row.id,
                tenant=row.tenant,
                name=row.name,
                description=row.description,
                robots_may_write=row.robots_may_write,
                processes=json.loads(row.processes),
                created_at=row.created_at,
                created_by=row.created_by,
            )
            for row in await connection.execute(query)
        }
        if found:
            rows = await connection.execute(
                select(credential_values)
                .where(credential_values.c.credential_id.in_(list(found)))
                .order_by(credential_values.c.scope_kind, credential_values.c.scope_name)
            )
            for row in rows:
                found[row.credential_id].values.append(_secret_value(row))
        return list(found.values())

    async def credential(self, connection: AsyncConnection, tenant: str, name: str) -> CredentialRecord | None:
        found = await self.credentials(connection, tenant, name)
        return found[0] if found else None

    async def create_credential(self, connection: AsyncConnection, record: CredentialRecord) -> None:
        await connection.execute(
            insert(credentials).values(
                id=record.id,
                tenant=record.tenant,
                name=record.name,
                description=record.description,
                robots_may_write=record.robots_may_write,
                processes=json.dumps(record.processes),
                created_at=record.created_at,
                created_by=record.created_by,
            )
        )

    async def update_credential(self, connection: AsyncConnection, record: CredentialRecord) -> None:
        await connection.execute(
            update(credentials)
            .where(credentials.c.id == record.id)
            .values(
                description=record.description,
                robots_may_write=record.robots_may_write,
                processes=json.dumps(record.processes),
            )
        )

    async def put_credential_value(
        self, connection: AsyncConnection, credential_id: str, value: SecretValueRecord
    ) -> None:
        key = (credential_values.c.credential_id == credential_id) & _at(credential_values, value.scope)
        values = {
            "username": value.username,
            "expires_on": value.expires_on,
            "key_version": value.sealed.key_version,
            "wrapped_key": value.sealed.wrapped_key,
            "ciphertext": value.sealed.ciphertext,
            "updated_at": value.updated_at,
            "updated_by": value.updated_by,
        }
        changed = await connection.execute(update(credential_values).where(key).values(**values))
        if changed.rowcount == 0:
            await connection.execute(
                insert(credential_values).values(
                    credential_id=credential_id,
                    scope_kind=value.scope.kind.value,
                    scope_name=value.scope.name or "",
                    **values,
                )
            )

    async def rewrap(
        self, connection: AsyncConnection, credential_id: str, scope: Scope, old: Sealed, new: Sealed
    ) -> bool:
        """Replace a value's wrapped key, only if it is still the one read (`old`)."""
        result = await connection.execute(
            update(credential_values)
            .where(
                credential_values.c.credential_id == credential_id,
                _at(credential_values, scope),
                credential_values.c.key_version == old.key_version,
                credential_values.c.wrapped_key == old.wrapped_key,
            )
            .values(key_version=new.key_version, wrapped_key=new.wrapped_key)
        )
        return bool(result.rowcount)

    async def delete_credential_value(self, connection: AsyncConnection, credential_id: str, scope: Scope) -> bool:
        result = await connection.execute(
            delete(credential_values).where(
                credential_values.c.credential_id == credential_id, _at(credential_values, scope)
            )
        )
        return bool(result.rowcount)

    async def delete_credential(self, connection: AsyncConnection, credential_id: str) -> None:
        await connection.execute(delete(credential_values).where(credential_values.c.credential_id == credential_id))
        await connection.execute(delete(credentials).where(credentials.c.id == credential_id))

    async def all_values(self, connection: AsyncConnection) -> list[tuple[str, str, str, SecretValueRecord]]:
        """(credential id, tenant, name, value) of every stored secret, for a key rotation."""
        rows = await connection.execute(
            select(credentials.c.id, credentials.c.tenant, credentials.c.name, credential_values)
            .join(credential_values, credential_values.c.credential_id == credentials.c.id)
            .order_by(credentials.c.tenant, credentials.c.name)
        )
        return [
            (
                row.id,
                row.tenant,
                row.name,
                _secret_value(row),
            )
            for row in rows
        ]

    # --- robots' keys ---

    async def robot_key(self, connection: AsyncConnection, tenant: str, robot: str) -> tuple[str, datetime] | None:
        row = (
            await connection.execute(
                select(robot_keys.c.public_key, robot_keys.c.registered_at).where(
                    robot_keys.c.tenant == tenant, robot_keys.c.robot == robot
                )
            )
        ).first()
        return (row.public_key, row.registered_at) if row is not None else None

    async def set_robot_key(
        self, connection: AsyncConnection, tenant: str, robot: str, key: str, now: datetime
    ) -> None:
        await connection.execute(
            insert(robot_keys).values(tenant=tenant, robot=robot, public_key=key, registered_at=now)
        )

    async def delete_robot_key(self, connection: AsyncConnection, tenant: str, robot: str) -> bool:
        result = await connection.execute(
            delete(robot_keys).where(robot_keys.c.tenant == tenant, robot_keys.c.robot == robot)
        )
        return bool(result.rowcount)


def _at(table: Table, scope: Scope) -> Any:
    return (table.c.scope_kind == scope.kind.value) & (table.c.scope_name == (scope.name or ""))
