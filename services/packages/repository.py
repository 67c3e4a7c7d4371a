"""The packages service's table, and every query it makes of it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, MetaData, Select, String, Table, Text, UniqueConstraint, insert, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.packages import EntryKind, EntryPoint, already_published
from herder.services.common.database import UtcDateTime
from herder.services.packages.core import VersionRecord

metadata = MetaData()

package_versions = Table(
    "packages_versions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("process", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger(), nullable=False),
    Column("entry_kind", String(16), nullable=False),
    Column("entry_target", String(1024), nullable=False),
    Column("entry_args", JSON(), nullable=False),
    Column("description", Text(), nullable=False),
    Column("published_at", UtcDateTime(), nullable=False),
    Column("published_by", String(128)),
    # Versions are immutable: one row per version of a tenant's process, for good.
    UniqueConstraint("tenant", "process", "version", name="uq_packages_versions_version"),
)


def _record(row: RowMapping) -> VersionRecord:
    return VersionRecord(
        id=row["id"],
        tenant=row["tenant"],
        process=row["process"],
        version=row["version"],
        sha256=row["sha256"],
        size=row["size"],
        entry=EntryPoint(kind=EntryKind(row["entry_kind"]), target=row["entry_target"], args=row["entry_args"]),
        description=row["description"],
        published_at=row["published_at"],
        published_by=row["published_by"],
    )


async def _all(connection: AsyncConnection, query: Select[Any]) -> list[VersionRecord]:
    return [_record(row) for row in (await connection.execute(query)).mappings()]


class VersionRepository:
    """Reads and writes `packages_versions` on a connection the caller holds (so it can share a transaction)."""

    async def insert(self, connection: AsyncConnection, record: VersionRecord) -> None:
        """Store a new version; `Conflict` when the process already has it.

        The conflict leaves the transaction unusable on PostgreSQL: let it roll back."""
        try:
            await connection.execute(
                insert(package_versions).values(
                    id=record.id,
                    tenant=record.tenant,
                    process=record.process,
                    version=record.version,
                    sha256=record.sha256,
                    size=record.size,
                    entry_kind=record.entry.kind.value,
                    entry_target=record.entry.target,
                    entry_args=list(record.entry.args),
                    description=record.description,
                    published_at=record.published_at,
                    published_by=record.published_by,
                )
            )
        except IntegrityError:
            raise already_published(record.process, record.version) from None

    async def get(self, connection: AsyncConnection, tenant: str, process: str, version: str) -> VersionRecord | None:
        """One version of a tenant's process."""
        query = select(package_versions).where(
            package_versions.c.tenant == tenant,
            package_versions.c.process == process,
            package_versions.c.version == version,
        )
        found = await _all(connection, query)
        return found[0] if found else None

    async def for_process(self, connection: AsyncConnection, tenant: str, process: str) -> list[VersionRecord]:
        """Every version of a tenant's process, in no particular order (`core.newest_first` orders them)."""
        query = select(package_versions).where(
            package_versions.c.tenant == tenant, package_versions.c.process == process
        )
        return await _all(connection, query)

    async def for_tenant(self, connection: AsyncConnection, tenant: str) -> list[VersionRecord]:
        """Every version of every process of the tenant."""
        return await _all(connection, select(package_versions).where(package_versions.c.tenant == tenant))
