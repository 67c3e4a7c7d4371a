"""The storage service's tables: buckets, their files, uploads in progress with their staged chunks,
and the objects left to remove from the object store.

The bytes are not here: each file row names the object that holds them (its `nuid`) and the stream
sequence of each of its chunks (`chunk_seqs`, as runs), so a download reads any piece with one
lookup. A bucket row keeps what its files weigh (`used_bytes`, `file_count`), changed in the
transaction that writes or deletes a file, so its limit is checked against the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.messages import utcnow
from herder.protocol.storage import MAX_PATH_CHARS, BucketInfo, FileInfo, UploadInfo
from herder.services.common.database import UtcDateTime
from herder.services.storage.core import SeqRuns, object_name, part_object_name

metadata = MetaData()
# Rows named in one statement at most.
_BATCH = 500

buckets = Table(
    "storage_buckets",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("name", String(63), nullable=False),
    Column("description", Text(), nullable=False),
    Column("max_file_bytes", BigInteger(), nullable=False),
    Column("max_bucket_bytes", BigInteger(), nullable=False),
    Column("robot_groups", JSON(), nullable=False),
    Column("robots", JSON(), nullable=False),
    Column("used_bytes", BigInteger(), nullable=False),
    Column("file_count", Integer(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    UniqueConstraint("tenant", "name", name="ux_storage_buckets_name"),
)

files = Table(
    "storage_files",
    metadata,
    Column("bucket_id", String(32), primary_key=True),
    Column("path", String(MAX_PATH_CHARS), primary_key=True),
    Column("size", BigInteger(), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("content_type", String(255)),
    Column("nuid", String(32), nullable=False),
    Column("chunk_bytes", Integer(), nullable=False),
    Column("chunk_seqs", JSON(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(128)),
)

uploads = Table(
    "storage_uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("bucket_id", String(32), nullable=False),
    Column("path", String(MAX_PATH_CHARS), nullable=False),
    Column("size", BigInteger(), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("content_type", String(255)),
    Column("state", String(16), nullable=False),  # open | finishing | done
    Column("received", BigInteger(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    Column("touched_at", UtcDateTime(), nullable=False),
    Index("ix_storage_uploads_bucket", "bucket_id", "state"),
    Index("ix_storage_uploads_touched", "touched_at"),
)

parts = Table(
    "storage_upload_parts",
    metadata,
    Column("upload_id", String(32), primary_key=True),
    Column("start", BigInteger(), primary_key=True),
    Column("length", Integer(), nullable=False),
    Column("nuid", String(32), nullable=False),
    Column("seq", BigInteger(), nullable=False),
)

orphans = Table(
    "storage_orphans",
    metadata,
    Column("nuid", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    # The object whose metadata goes too, if it still names this nuid (a deleted file's).
    Column("object_name", String(MAX_PATH_CHARS + 64)),
    Column("since", UtcDateTime(), nullable=False),
    Index("ix_storage_orphans_since", "since"),
)


class UploadState:
    OPEN = "open"
    FINISHING = "finishing"
    DONE = "done"


@dataclass
class BucketRecord:
    id: str
    tenant: str
    name: str
    description: str
    max_file_bytes: int
    max_bucket_bytes: int
    robot_groups: list[str]
    robots: list[str]
    used_bytes: int
    file_count: int
    created_at: datetime
    created_by: str | None

    def info(self) -> BucketInfo:
        return BucketInfo(
            name=self.name,
            description=self.description,
            max_file_bytes=self.max_file_bytes,
            max_bucket_bytes=self.max_bucket_bytes,
            robot_groups=self.robot_groups,
            robots=self.robots,
            used_bytes=self.used_bytes,
            file_count=self.file_count,
            created_at=self.created_at,
            created_by=self.created_by,
        )


@dataclass
class FileRecord:
    bucket_id: str
    path: str
    size: int
    sha256: str
    content_type: str | None
    nuid: str
    chunk_bytes: int
    chunk_seqs: SeqRuns
    updated_at: datetime
    updated_by: str | None

    def info(self, bucket: str) -> FileInfo:
        return FileInfo(
            bucket=bucket,
            path=self.path,
            size=self.size,
            sha256=self.sha256,
            content_type=self.content_type,
            updated_at=self.updated_at,
            updated_by=self.updated_by,
        )


@dataclass
class UploadRecord:
    id: str
    tenant: str
    bucket_id: str
    path: str
    size: int
    sha256: str
    content_type: str | None
    state: str
    received: int
    created_at: datetime
    created_by: str | None
    touched_at: datetime

    def info(self, bucket: str, chunk_bytes: int) -> UploadInfo:
        return UploadInfo(
            upload_id=self.id,
            bucket=bucket,
            path=self.path,
            size=self.size,
            sha256=self.sha256,
            received=self.received,
            chunk_bytes=chunk_bytes,
        )


@dataclass(frozen=True)
class PartRecord:
    upload_id: str
    start: int
    length: int
    nuid: str
    seq: int


@dataclass(frozen=True)
class OrphanRecord:
    nuid: str
    tenant: str
    object_name: str | None = None


@dataclass
class Removal:
    """What deleting files and uploads leaves to remove from the object store."""

    orphans: list[OrphanRecord] = field(default_factory=list)


def _bucket(row: Any) -> BucketRecord:
    return BucketRecord(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        description=row.description,
        max_file_bytes=row.max_file_bytes,
        max_bucket_bytes=row.max_bucket_bytes,
        robot_groups=list(row.robot_groups),
        robots=list(row.robots),
        used_bytes=row.used_bytes,
        file_count=row.file_count,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def _file(row: Any) -> FileRecord:
    return FileRecord(
        bucket_id=row.bucket_id,
        path=row.path,
        size=row.size,
        sha256=row.sha256,
        content_type=row.content_type,
        nuid=row.nuid,
        chunk_bytes=row.chunk_bytes,
        chunk_seqs=[(int(first), int(count)) for first, count in row.chunk_seqs],
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


def _upload(row: Any) -> UploadRecord:
    return UploadRecord(
        id=row.id,
        tenant=row.tenant,
        bucket_id=row.bucket_id,
        path=row.path,
        size=row.size,
        sha256=row.sha256,
        content_type=row.content_type,
        state=row.state,
        received=row.received,
        created_at=row.created_at,
        created_by=row.created_by,
        touched_at=row.touched_at,
    )


class StorageRepository:
    """Reads and writes of the storage service's tables, on a connection the caller's transaction owns."""

    # --- buckets ---

    async def bucket(self, connection: AsyncConnection, tenant: str, name: str) -> BucketRecord | None:
        row = (
            await connection.execute(select(buckets).where(buckets.c.tenant == tenant, buckets.c.name == name))
        ).first()
        return _bucket(row) if row is not None else None

    async def bucket_by_id(
        self, connection: AsyncConnection, bucket_id: str, *, lock: bool = False
    ) -> BucketRecord | None:
        """A bucket by id; with `lock`, its row is locked until the transaction ends (on PostgreSQL:
        SQLite's transactions take the whole database), so that writes to one bucket take turns."""
        query = select(buckets).where(buckets.c.id == bucket_id)
        if lock:
            query = query.with_for_update()
        row = (await connection.execute(query)).first()
        return _bucket(row) if row is not None else None

    async def list_buckets(self, connection: AsyncConnection, tenant: str) -> list[BucketRecord]:
        rows = await connection.execute(select(buckets).where(buckets.c.tenant == tenant).order_by(buckets.c.name))
        return [_bucket(row) for row in rows]

    async def create_bucket(self, connection: AsyncConnection, record: BucketRecord) -> None:
        await connection.execute(
            insert(buckets).values(
                id=record.id,
                tenant=record.tenant,
                name=record.name,
                description=record.description,
                max_file_bytes=record.max_file_bytes,
                max_bucket_bytes=record.max_bucket_bytes,
                robot_groups=record.robot_groups,
                robots=record.robots,
                used_bytes=0,
                file_count=0,
                created_at=record.created_at,
                created_by=record.created_by,
            )
        )

    async def update_bucket(self, connection: AsyncConnection, record: BucketRecord) -> None:
        await connection.execute(
            update(buckets)
            .where(buckets.c.id == record.id)
            .values(
                description=record.description,
                max_file_bytes=record.max_file_bytes,
                max_bucket_bytes=record.max_bucket_bytes,
                robot_groups=record.robot_groups,
                robots=record.robots,
            )
        )

    async def account(
        self, connection: AsyncConnection, bucket_id: str, *, bytes_delta: int, files_delta: int, limit: int | None
    ) -> bool:
        """Add to what a bucket holds; with `limit`, only if it stays within it. Whether it was added.
        (It locks the bucket's row until the transaction ends: writes to one bucket take turns here.)"""
        query = update(buckets).where(buckets.c.id == bucket_id)
        if limit is not None:
            query = query.where(buckets.c.used_bytes + bytes_delta <= limit)
        result = await connection.execute(
            query.values(used_bytes=buckets.c.used_bytes + bytes_delta, file_count=buckets.c.file_count + files_delta)
        )
        return bool(result.rowcount)

    async def delete_bucket(self, connection: AsyncConnection, tenant: str, bucket: BucketRecord) -> Removal:
        """Delete a bucket with its files and uploads; what is left to remove from the object store."""
        removal = Removal()
        rows = await connection.execute(select(files.c.nuid, files.c.path).where(files.c.bucket_id == bucket.id))
        stored = [OrphanRecord(row.nuid, tenant, object_name(bucket.id, row.path)) for row in rows]
        await self.add_orphans(connection, stored)
        removal.orphans += stored
        pending = await connection.execute(select(uploads.c.id).where(uploads.c.bucket_id == bucket.id))
        for upload_id in [row.id for row in pending]:
            removal.orphans += await self.drop_upload(connection, tenant, upload_id)
        await connection.execute(delete(files).where(files.c.bucket_id == bucket.id))
        await connection.execute(delete(buckets).where(buckets.c.id == bucket.id))
        return removal

    # --- files ---

    async def file(self, connection: AsyncConnection, bucket_id: str, path: str) -> FileRecord | None:
        query = select(files).where(files.c.bucket_id == bucket_id, files.c.path == path)
        row = (await connection.execute(query)).first()
        return _file(row) if row is not None else None

    async def list_files(
        self, connection: AsyncConnection, bucket_id: str, *, prefix: str, after: str | None, limit: int
    ) -> list[FileRecord]:
        """Up to `limit` files whose paths start with `prefix`, by path, from after `after`."""
        query = select(files).where(files.c.bucket_id == bucket_id)
        if prefix:
            # substr, not LIKE: SQLite's LIKE ignores case, and a prefix may hold '%' or '_'.
            query = query.where(func.substr(files.c.path, 1, len(prefix)) == prefix)
        if after is not None:
            query = query.where(files.c.path > after)
        rows = await connection.execute(query.order_by(files.c.path).limit(limit))
        return [_file(row) for row in rows]

    async def put_file(self, connection: AsyncConnection, record: FileRecord, *, replacing: bool) -> None:
        values = {
            "size": record.size,
            "sha256": record.sha256,
            "content_type": record.content_type,
            "nuid": record.nuid,
            "chunk_bytes": record.chunk_bytes,
            "chunk_seqs": [list(run) for run in record.chunk_seqs],
            "updated_at": record.updated_at,
            "updated_by": record.updated_by,
        }
        if replacing:
            await connection.execute(
                update(files).where(files.c.bucket_id == record.bucket_id, files.c.path == record.path).values(**values)
            )
        else:
            await connection.execute(insert(files).values(bucket_id=record.bucket_id, path=record.path, **values))

    async def delete_file(self, connection: AsyncConnection, record: FileRecord) -> bool:
        result = await connection.execute(
            delete(files).where(
                files.c.bucket_id == record.bucket_id, files.c.path == record.path, files.c.nuid == record.nuid
            )
        )
        return bool(result.rowcount)

    # --- uploads ---

    async def upload(self, connection: AsyncConnection, upload_id: str) -> UploadRecord | None:
        row = (await connection.execute(select(uploads).where(uploads.c.id == upload_id))).first()
        return _upload(row) if row is not None else None

    async def reserved(self, connection: AsyncConnection, bucket_id: str, *, besides: str | None = None) -> int:
        """What the uploads in progress to a bucket will add to it (those not yet done)."""
        query = select(func.coalesce(func.sum(uploads.c.size), 0)).where(
            uploads.c.bucket_id == bucket_id, uploads.c.state != UploadState.DONE
        )
        if besides is not None:
            query = query.where(uploads.c.id != besides)
        return int((await connection.execute(query)).scalar_one())

    async def create_upload(self, connection: AsyncConnection, record: UploadRecord) -> None:
        await connection.execute(
            insert(uploads).values(
                id=record.id,
                tenant=record.tenant,
                bucket_id=record.bucket_id,
                path=record.path,
                size=record.size,
                sha256=record.sha256,
                content_type=record.content_type,
                state=record.state,
                received=record.received,
                created_at=record.created_at,
                created_by=record.created_by,
                touched_at=record.touched_at,
            )
        )

    async def advance(self, connection: AsyncConnection, part: PartRecord, now: datetime) -> bool:
        """Record a staged chunk, only if it starts where the open upload has got to. Whether it did."""
        result = await connection.execute(
            update(uploads)
            .where(
                uploads.c.id == part.upload_id,
                uploads.c.state == UploadState.OPEN,
                uploads.c.received == part.start,
            )
            .values(received=part.start + part.length, touched_at=now)
        )
        if not result.rowcount:
            return False
        await connection.execute(
            insert(parts).values(
                upload_id=part.upload_id, start=part.start, length=part.length, nuid=part.nuid, seq=part.seq
            )
        )
        return True

    async def move_upload(
        self, connection: AsyncConnection, upload_id: str, *, from_state: str, to_state: str, now: datetime
    ) -> bool:
        result = await connection.execute(
            update(uploads)
            .where(uploads.c.id == upload_id, uploads.c.state == from_state)
            .values(state=to_state, touched_at=now)
        )
        return bool(result.rowcount)

    async def staged_parts(self, connection: AsyncConnection, upload_id: str) -> list[PartRecord]:
        rows = await connection.execute(select(parts).where(parts.c.upload_id == upload_id).order_by(parts.c.start))
        return [PartRecord(row.upload_id, row.start, row.length, row.nuid, row.seq) for row in rows]

    async def drop_parts(self, connection: AsyncConnection, tenant: str, upload_id: str) -> list[OrphanRecord]:
        """Forget an upload's staged chunks, leaving them to remove from the object store."""
        staged = await self.staged_parts(connection, upload_id)
        removed = [OrphanRecord(part.nuid, tenant, part_object_name(part.upload_id, part.start)) for part in staged]
        await connection.execute(delete(parts).where(parts.c.upload_id == upload_id))
        await self.add_orphans(connection, removed)
        return removed

    async def drop_upload(self, connection: AsyncConnection, tenant: str, upload_id: str) -> list[OrphanRecord]:
        """Forget an upload and its staged chunks (left to remove from the object store)."""
        removed = await self.drop_parts(connection, tenant, upload_id)
        await connection.execute(delete(uploads).where(uploads.c.id == upload_id))
        return removed

    async def stale_uploads(self, connection: AsyncConnection, before: datetime, limit: int) -> list[UploadRecord]:
        rows = await connection.execute(
            select(uploads).where(uploads.c.touched_at < before).order_by(uploads.c.touched_at).limit(limit)
        )
        return [_upload(row) for row in rows]

    # --- what is left to remove from the object store ---

    async def add_orphans(self, connection: AsyncConnection, found: list[OrphanRecord]) -> None:
        """Note objects to remove from the object store (once their removal is done, `forget_orphans`)."""
        now = utcnow()
        # In batches: a bucket deleted with its files may leave more than a statement takes parameters.
        for start in range(0, len(found), _BATCH):
            batch = found[start : start + _BATCH]
            known = {
                row.nuid
                for row in await connection.execute(
                    select(orphans.c.nuid).where(orphans.c.nuid.in_([orphan.nuid for orphan in batch]))
                )
            }
            fresh = {orphan.nuid: orphan for orphan in batch if orphan.nuid not in known}
            if fresh:
                await connection.execute(
                    insert(orphans),
                    [
                        {"nuid": o.nuid, "tenant": o.tenant, "object_name": o.object_name, "since": now}
                        for o in fresh.values()
                    ],
                )

    async def due_orphans(self, connection: AsyncConnection, before: datetime, limit: int) -> list[OrphanRecord]:
        rows = await connection.execute(
            select(orphans).where(orphans.c.since < before).order_by(orphans.c.since).limit(limit)
        )
        return [OrphanRecord(row.nuid, row.tenant, row.object_name) for row in rows]

    async def forget_orphans(self, connection: AsyncConnection, nuids: list[str]) -> None:
        for start in range(0, len(nuids), _BATCH):
            await connection.execute(delete(orphans).where(orphans.c.nuid.in_(nuids[start : start + _BATCH])))
