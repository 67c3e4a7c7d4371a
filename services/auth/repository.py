"""The auth service's tables, and every query it makes of them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Index, MetaData, Select, String, Table, insert, select, text, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.auth import Role
from herder.protocol.errors import Conflict
from herder.protocol.messages import utcnow
from herder.services.auth.core import TokenRecord
from herder.services.common.database import UtcDateTime

metadata = MetaData()

tokens = Table(
    "auth_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("name", String(63), nullable=False),
    Column("role", String(32), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    Column("revoked_at", UtcDateTime()),
    Column("revoked_by", String(128)),
    Index(
        "ux_auth_tokens_live_name",
        "tenant",
        "name",
        unique=True,
        sqlite_where=text("revoked_at IS NULL"),
        postgresql_where=text("revoked_at IS NULL"),
    ),
)


def _record(row: RowMapping) -> TokenRecord:
    return TokenRecord(**{**row, "role": Role(row["role"])})


async def _first(connection: AsyncConnection, query: Select[Any]) -> TokenRecord | None:
    row = (await connection.execute(query)).mappings().first()
    return _record(row) if row else None


async def _all(connection: AsyncConnection, query: Select[Any]) -> list[TokenRecord]:
    return [_record(row) for row in (await connection.execute(query)).mappings()]


class TokenRepository:
    """Reads and writes `auth_tokens` on a connection the caller holds (so it can share a transaction)."""

    async def insert(self, connection: AsyncConnection, record: TokenRecord) -> None:
        """Store a new token; `Conflict` when the tenant already has a live token of that name.

        The conflict leaves the transaction unusable on PostgreSQL: let it roll back."""
        try:
            await connection.execute(
                insert(tokens).values(
                    id=record.id,
                    tenant=record.tenant,
                    name=record.name,
                    role=record.role.value,
                    token_hash=record.token_hash,
                    created_at=record.created_at,
                    created_by=record.created_by,
                )
            )
        except IntegrityError:
            raise Conflict(
                f"tenant {record.tenant!r} already has a token named {record.name!r}; "
                "revoke it first or choose another name"
            ) from None

    async def by_id(self, connection: AsyncConnection, token_id: str) -> TokenRecord | None:
        """The token with this id, live or revoked."""
        return await _first(connection, select(tokens).where(tokens.c.id == token_id))

    async def live_by_name(self, connection: AsyncConnection, tenant: str, name: str) -> TokenRecord | None:
        """The tenant's live token of this name."""
        query = select(tokens).where(tokens.c.tenant == tenant, tokens.c.name == name, tokens.c.revoked_at.is_(None))
        return await _first(connection, query)

    async def live_by_hash(self, connection: AsyncConnection, token_hash: str) -> TokenRecord | None:
        """The live token with this hash."""
        query = select(tokens).where(tokens.c.token_hash == token_hash, tokens.c.revoked_at.is_(None))
        return await _first(connection, query)

    async def for_tenant(
        self, connection: AsyncConnection, tenant: str, *, include_revoked: bool = False
    ) -> list[TokenRecord]:
        """The tenant's tokens, by name then creation."""
        query = select(tokens).where(tokens.c.tenant == tenant)
        if not include_revoked:
            query = query.where(tokens.c.revoked_at.is_(None))
        return await _all(connection, query.order_by(tokens.c.name, tokens.c.created_at))

    async def all_live(self, connection: AsyncConnection) -> list[TokenRecord]:
        """Every live token of every tenant."""
        return await _all(connection, select(tokens).where(tokens.c.revoked_at.is_(None)))

    async def count_live_admins(self, connection: AsyncConnection, tenant: str, *, lock: bool = False) -> int:
        """How many live admin tokens the tenant has; `lock` holds their rows until the transaction ends,
        so two revocations cannot both see another admin left."""
        query = select(tokens.c.id).where(
            tokens.c.tenant == tenant, tokens.c.role == Role.ADMIN.value, tokens.c.revoked_at.is_(None)
        )
        if lock:
            query = query.with_for_update()
        return len((await connection.execute(query)).all())

    async def revoke(self, connection: AsyncConnection, token_id: str, *, by: str | None) -> TokenRecord | None:
        """Mark a live token revoked; None when it was not live."""
        result = await connection.execute(
            update(tokens)
            .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
            .values(revoked_at=utcnow(), revoked_by=by)
        )
        if result.rowcount != 1:
            return None
        return await self.by_id(connection, token_id)
