"""The storage service: named buckets of files that robots and people share.

Buckets and files are rows in the database, the system of record; the bytes are objects in the
tenant's object store (`HERDER_STORAGE_<tenant>`), and go through this service in chunks, never
straight to the store. Any replica may serve any request:

- an upload's chunks may reach different replicas, so each is staged as an object of its own
  (`.parts/<upload id>/<start>`) and recorded, with its offset checked, in the database; the replica
  that serves `upload_end` copies them in order into the file's object (`<bucket id>/<path>`), checks
  the size and sha256, records the file, then removes the staged chunks;
- objects that a replaced or deleted file, a cancelled or abandoned upload, or a deleted bucket leave
  behind are noted in the same transaction (`storage_orphans`) and removed once the request has
  answered (`storage.removals`), or by the sweep (`storage.sweep`) when that failed; the sweep also
  abandons uploads idle for an hour.

Who may do what, in one place (`_bucket_for`): people and programs by their role's permissions
(`storage.read`, `storage.write`, `storage.manage`), robots by the bucket's `robots` and
`robot_groups`, as queues do.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from herder.protocol import subjects
from herder.protocol.auth import Permission, PrincipalKind
from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, NotFound
from herder.protocol.messages import Event, Model, new_id, utcnow
from herder.protocol.storage import (
    MAX_CHUNK_BYTES,
    UPLOAD_STALE_S,
    BucketCreate,
    BucketCreatedEvent,
    BucketDelete,
    BucketDeletedEvent,
    BucketInfo,
    BucketList,
    BucketListRequest,
    BucketUpdate,
    BucketUpdatedEvent,
    Download,
    DownloadChunk,
    FileDelete,
    FileDeletedEvent,
    FileInfo,
    FileList,
    FileListRequest,
    FileWrittenEvent,
    UploadBegin,
    UploadCancel,
    UploadChunk,
    UploadEnd,
    UploadInfo,
    describe_size,
    limits_problem,
)
from herder.services.common import database
from herder.services.common.bus import ensure_bucket
from herder.services.common.events import Transaction
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.jobs.directory import RobotDirectory
from herder.services.storage.core import (
    Rechunker,
    SeqRuns,
    Usage,
    chunk_problem,
    object_name,
    page_within,
    part_object_name,
    runs_of,
    seq_of,
    spans,
    upload_refusal,
)
from herder.services.storage.objects import ChunkMissing, Objects
from herder.services.storage.repository import (
    BucketRecord,
    FileRecord,
    OrphanRecord,
    PartRecord,
    StorageRepository,
    UploadRecord,
    UploadState,
)

SWEEP_INTERVAL_S = 60.0
# Objects noted for removal are left this long to the request that noted them, before the sweep does it.
ORPHAN_GRACE_S = 60.0
SWEEP_BATCH = 500
SWEEP_MAX_BATCHES = 20
# A request has this many of the objects it leaves removed as soon as it has answered; the sweep
# removes the rest (of a bucket deleted with its files).
INLINE_REMOVALS = 200
# The chunks of a file's object.
FILE_CHUNK_BYTES = MAX_CHUNK_BYTES
# A page of `file_list` stays within this much of a reply, whatever the paths' lengths.
LIST_REPLY_BUDGET_BYTES = 768 * 1024
_FILE_INFO_OVERHEAD_BYTES = 256


@dataclass(frozen=True)
class _Assembled:
    nuid: str
    seqs: SeqRuns
    sha256: str
    size: int
    chunks: int


class StorageService(Service):
    """Storage buckets: files robots and people share, kept in the JetStream object store."""

    name = "storage"

    async def setup(self) -> None:
        self.repo = StorageRepository()
        self._objects: dict[str, Objects] = {}
        robots_kv = await ensure_bucket(self.runtime.js, subjects.ROBOTS_BUCKET, self.runtime.jetstream)
        self.directory = RobotDirectory(robots_kv, supervisor=self.tasks)
        await self.directory.start()
        # What requests leave to remove from the object store, removed after they have answered.
        self._removals: asyncio.Queue[list[OrphanRecord]] = asyncio.Queue()
        self.tasks.watch("storage.removals", self._removing)
        self.tasks.periodic("storage.sweep", self.sweep, SWEEP_INTERVAL_S)

    async def teardown(self) -> None:
        await self.tasks.cancel("storage.sweep")
        await self.tasks.cancel("storage.removals")
        await self.directory.stop()

    async def _store(self, tenant: str) -> Objects:
        """The tenant's object store of files (made on first use)."""
        objects = self._objects.get(tenant)
        if objects is None:
            objects = self._objects[tenant] = await Objects.open(self.runtime.js, tenant, self.runtime.jetstream)
        return objects

    # --- buckets ---

    @endpoint(permission=Permission.STORAGE_MANAGE, idempotent=True)
    async def bucket_create(self, request: BucketCreate, ctx: RequestContext) -> BucketInfo:
        """Create a bucket; a name taken is `conflict`."""
        record = BucketRecord(
            id=new_id(),
            tenant=ctx.tenant,
            name=request.name,
            description=request.description,
            max_file_bytes=request.max_file_bytes,
            max_bucket_bytes=request.max_bucket_bytes,
            robot_groups=list(request.robot_groups),
            robots=list(request.robots),
            used_bytes=0,
            file_count=0,
            created_at=utcnow(),
            created_by=ctx.actor,
        )
        taken = Conflict(
            f"bucket {request.name!r} exists already; change it with bucket_update ('herder storage bucket-update')"
        )
        try:
            async with self.runtime.events.transaction() as tx:
                await ctx.claim(tx.connection, record.id)
                if await self.repo.bucket(tx.connection, ctx.tenant, request.name) is not None:
                    raise taken
                await self.repo.create_bucket(tx.connection, record)
                _emit(tx, ctx, BucketCreatedEvent(bucket=record.name))
        except IntegrityError:
            raise taken from None
        ctx.log.info("storage.bucket_created", bucket=record.name)
        try:
            await self._store(ctx.tenant)  # made now, so that the first upload does not wait for it
        except Exception as exc:  # the first upload makes it then
            ctx.log.warning("storage.store_not_made", error=repr(exc))
        return record.info()

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        async with database.read(self.engine) as connection:
            if verb == "bucket_create":
                bucket = await self.repo.bucket_by_id(connection, object_id)
                return bucket.info() if bucket is not None else None
            if verb == "upload_begin":
                upload = await self.repo.upload(connection, object_id)
                bucket = await self.repo.bucket_by_id(connection, upload.bucket_id) if upload is not None else None
                if upload is None or bucket is None:
                    return None
                return upload.info(bucket.name, MAX_CHUNK_BYTES)
        return None

    @endpoint(permission=Permission.STORAGE_MANAGE)
    async def bucket_update(self, request: BucketUpdate, ctx: RequestContext) -> BucketInfo:
        """Change what is given of a bucket's settings."""
        async with self.runtime.events.transaction() as tx:
            named = await self._existing(tx.connection, ctx.tenant, request.name)
            record = await self.repo.bucket_by_id(tx.connection, named.id, lock=True) or named
            if request.description is not None:
                record.description = request.description
            if request.max_file_bytes is not None:
                record.max_file_bytes = request.max_file_bytes
            if request.max_bucket_bytes is not None:
                record.max_bucket_bytes = request.max_bucket_bytes
            if request.robot_groups is not None:
                record.robot_groups = list(request.robot_groups)
            if request.robots is not None:
                record.robots = list(request.robots)
            problem = limits_problem(record.max_file_bytes, record.max_bucket_bytes)
            if problem is not None:
                raise BadRequest(problem)
            await self.repo.update_bucket(tx.connection, record)
            _emit(tx, ctx, BucketUpdatedEvent(bucket=record.name))
        return record.info()

    @endpoint(permission=Permission.STORAGE_READ)
    async def bucket_list(self, request: BucketListRequest, ctx: RequestContext) -> BucketList:
        async with database.read(self.engine) as connection:
            records = await self.repo.list_buckets(connection, ctx.tenant)
        return BucketList(buckets=[record.info() for record in records])

    @endpoint(permission=Permission.STORAGE_MANAGE)
    async def bucket_delete(self, request: BucketDelete, ctx: RequestContext) -> BucketInfo:
        """Delete a bucket; one that holds files only with `force`, and its files with it."""
        async with self.runtime.events.transaction() as tx:
            named = await self._existing(tx.connection, ctx.tenant, request.name)
            # Locked, and read again: a file written meanwhile goes with the bucket, not astray.
            record = await self.repo.bucket_by_id(tx.connection, named.id, lock=True) or named
            if record.file_count and not request.force:
                raise Conflict(
                    f"bucket {record.name!r} holds {record.file_count:,} files ({describe_size(record.used_bytes)}); "
                    "delete them first, or delete the bucket with force (--force) and its files with it",
                    details={"file_count": record.file_count, "used_bytes": record.used_bytes},
                )
            removal = await self.repo.delete_bucket(tx.connection, ctx.tenant, record)
            _emit(
                tx,
                ctx,
                BucketDeletedEvent(bucket=record.name, file_count=record.file_count, used_bytes=record.used_bytes),
            )
        ctx.log.info("storage.bucket_deleted", bucket=record.name, files=record.file_count)
        self._remove_soon(removal.orphans[:INLINE_REMOVALS])
        return record.info()

    async def _existing(self, connection: Any, tenant: str, name: str) -> BucketRecord:
        record = await self.repo.bucket(connection, tenant, name)
        if record is None:
            raise _no_bucket(name)
        return record

    # --- files ---

    @endpoint(authenticated=True)
    async def file_list(self, request: FileListRequest, ctx: RequestContext) -> FileList:
        """A page of a bucket's files whose paths start with the prefix, by path."""
        bucket = await self._bucket_for(ctx, request.bucket, Permission.STORAGE_READ)
        async with database.read(self.engine) as connection:
            records = await self.repo.list_files(
                connection, bucket.id, prefix=request.prefix, after=request.cursor, limit=request.limit + 1
            )
        more = len(records) > request.limit
        records = records[: request.limit]
        fit = page_within((len(r.path.encode()) + _FILE_INFO_OVERHEAD_BYTES for r in records), LIST_REPLY_BUDGET_BYTES)
        more = more or fit < len(records)
        records = records[:fit]
        return FileList(
            bucket=bucket.name,
            files=[record.info(bucket.name) for record in records],
            next_cursor=records[-1].path if more and records else None,
        )

    @endpoint(authenticated=True)
    async def file_delete(self, request: FileDelete, ctx: RequestContext) -> FileInfo:
        """Delete a file; the reply is the file as it was."""
        bucket = await self._bucket_for(ctx, request.bucket, Permission.STORAGE_WRITE)
        async with self.runtime.events.transaction() as tx:
            await self.repo.bucket_by_id(tx.connection, bucket.id, lock=True)
            record = await self.repo.file(tx.connection, bucket.id, request.path)
            if record is None or not await self.repo.delete_file(tx.connection, record):
                raise _no_file(bucket.name, request.path)
            await self.repo.account(tx.connection, bucket.id, bytes_delta=-record.size, files_delta=-1, limit=None)
            orphan = OrphanRecord(record.nuid, ctx.tenant, object_name(bucket.id, record.path))
            await self.repo.add_orphans(tx.connection, [orphan])
            _emit(
                tx,
                ctx,
                FileDeletedEvent(bucket=bucket.name, path=record.path, size=record.size, sha256=record.sha256),
            )
        ctx.log.info("storage.file_deleted", bucket=bucket.name, path=record.path, size=record.size)
        self._remove_soon([orphan])
        return record.info(bucket.name)

    @endpoint(authenticated=True)
    async def download(self, request: Download, ctx: RequestContext) -> DownloadChunk:
        """Up to `length` bytes of a file from `offset`, with its size and sha256."""
        bucket = await self._bucket_for(ctx, request.bucket, Permission.STORAGE_READ)
        async with database.read(self.engine) as connection:
            record = await self.repo.file(connection, bucket.id, request.path)
        if record is None:
            raise _no_file(bucket.name, request.path)
        if request.sha256 is not None and request.sha256 != record.sha256:
            raise _replaced(bucket.name, record.path, record.sha256)
        if request.offset > record.size:
            raise BadRequest(
                f"offset {request.offset:,} is past the end of {bucket.name}/{record.path} ({record.size:,} bytes)"
            )
        objects = await self._store(ctx.tenant)
        pieces = []
        try:
            for span in spans(
                offset=request.offset, length=request.length, size=record.size, chunk_bytes=record.chunk_bytes
            ):
                chunk = await objects.read_chunk(record.nuid, seq_of(record.chunk_seqs, span.index))
                pieces.append(chunk[span.start : span.end])
        except (ChunkMissing, IndexError):
            raise _replaced(bucket.name, record.path, None) from None
        return DownloadChunk(file=record.info(bucket.name), offset=request.offset, data=b"".join(pieces))

    # --- uploads ---

    @endpoint(authenticated=True, idempotent=True)
    async def upload_begin(self, request: UploadBegin, ctx: RequestContext) -> UploadInfo:
        """Begin an upload, once the bucket's limits allow the file."""
        bucket = await self._bucket_for(ctx, request.bucket, Permission.STORAGE_WRITE)
        now = utcnow()
        record = UploadRecord(
            id=new_id(),
            tenant=ctx.tenant,
            bucket_id=bucket.id,
            path=request.path,
            size=request.size,
            sha256=request.sha256,
            content_type=request.content_type,
            state=UploadState.OPEN,
            received=0,
            created_at=now,
            created_by=ctx.actor,
            touched_at=now,
        )
        async with self.runtime.events.transaction() as tx:
            await ctx.claim(tx.connection, record.id)
            # Locked: uploads begun together to one bucket each count the others' reservations.
            current = await self.repo.bucket_by_id(tx.connection, bucket.id, lock=True)
            if current is None:
                raise _no_bucket(bucket.name)
            existing = await self.repo.file(tx.connection, bucket.id, request.path)
            usage = _usage(current, existing, reserved=await self.repo.reserved(tx.connection, bucket.id))
            _refuse(request.size, usage)
            await self.repo.create_upload(tx.connection, record)
        await self._store(ctx.tenant)
        return record.info(bucket.name, MAX_CHUNK_BYTES)

    @endpoint(authenticated=True)
    async def upload_chunk(self, request: UploadChunk, ctx: RequestContext) -> UploadInfo:
        """Stage the next chunk of an upload as an object of its own."""
        upload, bucket = await self._upload_for(ctx, request.upload_id)
        _still_open(upload)
        _check_chunk(upload, request.offset, len(request.data))
        objects = await self._store(ctx.tenant)
        nuid = new_id()
        seq = await objects.put_chunk(nuid, request.data)
        part = PartRecord(upload.id, request.offset, len(request.data), nuid, seq)
        try:
            async with self.runtime.events.transaction() as tx:
                advanced = await self.repo.advance(tx.connection, part, utcnow())
        except BaseException:
            await self._purge_quietly(objects, nuid)
            raise
        if not advanced:
            # Another copy of this chunk (a retry) got there first, or the upload moved on.
            await self._purge_quietly(objects, nuid)
            upload, bucket = await self._upload_for(ctx, request.upload_id)
            _still_open(upload)
            _check_chunk(upload, request.offset, len(request.data))
            raise Conflict(f"upload {upload.id} moved on meanwhile; send the chunk that starts at {upload.received:,}")
        try:
            await objects.put_meta(
                part_object_name(upload.id, part.start),
                nuid,
                size=part.length,
                chunks=1,
                sha256=hashlib.sha256(request.data).hexdigest(),
                chunk_bytes=part.length,
                description=f"bytes {part.start}-{part.start + part.length - 1} of an upload to {bucket.name}",
            )
        except HerderError as exc:  # the chunk is recorded and readable by its sequence: its name is for people
            ctx.log.warning("storage.part_meta_failed", upload_id=upload.id, error=exc.message)
        upload.received = part.start + part.length
        return upload.info(bucket.name, MAX_CHUNK_BYTES)

    @endpoint(authenticated=True)
    async def upload_end(self, request: UploadEnd, ctx: RequestContext) -> FileInfo:
        """Store the uploaded file, once what was received has the announced size and sha256."""
        upload, bucket = await self._upload_for(ctx, request.upload_id)
        if upload.state != UploadState.OPEN:
            return await self._ended(upload, bucket)
        if upload.received != upload.size:
            raise BadRequest(
                f"upload {upload.id} has received {upload.received:,} of its {upload.size:,} bytes; "
                f"send the rest from byte {upload.received:,}, then end it",
                details={"expected_offset": upload.received},
            )
        # The bucket may have been closed to this robot since the upload began.
        bucket = await self._bucket_for(ctx, bucket.name, Permission.STORAGE_WRITE)
        async with self.runtime.events.transaction() as tx:
            claimed = await self.repo.move_upload(
                tx.connection, upload.id, from_state=UploadState.OPEN, to_state=UploadState.FINISHING, now=utcnow()
            )
            staged = await self.repo.staged_parts(tx.connection, upload.id) if claimed else []
        if not claimed:
            upload, bucket = await self._upload_for(ctx, request.upload_id)
            return await self._ended(upload, bucket)
        objects = await self._store(ctx.tenant)
        try:
            assembled = await self._assemble(objects, staged)
        except ChunkMissing:
            await self._drop(upload)
            raise Conflict(
                f"a staged chunk of upload {upload.id} is missing from the object store; upload the file again"
            ) from None
        except BaseException:
            async with self.runtime.events.transaction() as tx:  # let the caller end it again
                await self.repo.move_upload(
                    tx.connection, upload.id, from_state=UploadState.FINISHING, to_state=UploadState.OPEN, now=utcnow()
                )
            raise
        if assembled.size != upload.size or assembled.sha256 != upload.sha256:
            await self._purge_quietly(objects, assembled.nuid)
            await self._drop(upload)
            raise BadRequest(
                f"what upload {upload.id} received has the sha256 {assembled.sha256}, not {upload.sha256} as "
                "upload_begin said: the file changed or was damaged on the way; nothing was stored, upload it again",
                details={"expected_sha256": upload.sha256, "received_sha256": assembled.sha256},
            )
        try:
            record, replaced = await self._record(ctx, upload, bucket, assembled)
        except BaseException:
            await self._purge_quietly(objects, assembled.nuid)
            await self._drop(upload)
            raise
        try:
            await objects.put_meta(
                object_name(bucket.id, record.path),
                record.nuid,
                size=record.size,
                chunks=assembled.chunks,
                sha256=record.sha256,
                chunk_bytes=FILE_CHUNK_BYTES,
                description=f"{bucket.name}/{record.path}",
            )
        except HerderError as exc:  # downloads read the chunks by their sequences: the file is there
            ctx.log.warning("storage.file_meta_failed", bucket=bucket.name, path=record.path, error=exc.message)
        self._remove_soon(replaced)
        ctx.log.info("storage.file_written", bucket=bucket.name, path=record.path, size=record.size)
        return record.info(bucket.name)

    @endpoint(authenticated=True)
    async def upload_cancel(self, request: UploadCancel, ctx: RequestContext) -> UploadInfo:
        """Give up an upload: its staged chunks are removed, what it reserved of the bucket freed."""
        upload, bucket = await self._upload_for(ctx, request.upload_id)
        async with self.runtime.events.transaction() as tx:
            taken = await self.repo.move_upload(
                tx.connection, upload.id, from_state=UploadState.OPEN, to_state=UploadState.FINISHING, now=utcnow()
            )
            removed = await self.repo.drop_upload(tx.connection, ctx.tenant, upload.id) if taken else []
        if not taken:
            raise Conflict(f"upload {upload.id} is being ended or has ended; it cannot be cancelled")
        self._remove_soon(removed)
        return upload.info(bucket.name, MAX_CHUNK_BYTES)

    async def _assemble(self, objects: Objects, staged: list[PartRecord]) -> _Assembled:
        """Copy the staged chunks, in order, into a new object in chunks of FILE_CHUNK_BYTES."""
        nuid = new_id()
        digest = hashlib.sha256()
        rechunker = Rechunker(FILE_CHUNK_BYTES)
        seqs: list[int] = []
        size = 0
        try:
            for part in staged:
                data = await objects.read_chunk(part.nuid, part.seq)
                if len(data) != part.length:
                    raise ChunkMissing(part.seq)
                digest.update(data)
                size += len(data)
                for chunk in rechunker.feed(data):
                    seqs.append(await objects.put_chunk(nuid, chunk))
            for chunk in rechunker.flush():
                seqs.append(await objects.put_chunk(nuid, chunk))
        except BaseException:
            await self._purge_quietly(objects, nuid)
            raise
        return _Assembled(nuid=nuid, seqs=runs_of(seqs), sha256=digest.hexdigest(), size=size, chunks=len(seqs))

    async def _record(
        self, ctx: RequestContext, upload: UploadRecord, bucket: BucketRecord, assembled: _Assembled
    ) -> tuple[FileRecord, list[OrphanRecord]]:
        """Record the assembled file (within the bucket's limits, checked again against the truth), and
        what it leaves to remove: the file it replaces, the staged chunks."""
        now = utcnow()
        async with self.runtime.events.transaction() as tx:
            current = await self.repo.bucket_by_id(tx.connection, bucket.id, lock=True)
            if current is None:
                raise _no_bucket(bucket.name)
            still = await self.repo.upload(tx.connection, upload.id)
            if still is None or still.state != UploadState.FINISHING:
                raise NotFound(f"upload {upload.id} was abandoned while it was being ended; upload again")
            existing = await self.repo.file(tx.connection, bucket.id, upload.path)
            usage = _usage(current, existing, reserved=0)
            _refuse(upload.size, usage)
            accounted = await self.repo.account(
                tx.connection,
                bucket.id,
                bytes_delta=upload.size - usage.replaced_bytes,
                files_delta=0 if existing is not None else 1,
                limit=current.max_bucket_bytes,
            )
            if not accounted:  # the bucket's row is locked above: only a bug gets here
                raise Conflict(f"bucket {bucket.name!r} changed while the upload was being ended; upload again")
            record = FileRecord(
                bucket_id=bucket.id,
                path=upload.path,
                size=upload.size,
                sha256=upload.sha256,
                content_type=upload.content_type,
                nuid=assembled.nuid,
                chunk_bytes=FILE_CHUNK_BYTES,
                chunk_seqs=assembled.seqs,
                updated_at=now,
                updated_by=ctx.actor,
            )
            await self.repo.put_file(tx.connection, record, replacing=existing is not None)
            # The old object's metadata is replaced by the new one's: only its chunks go.
            removed = [OrphanRecord(existing.nuid, ctx.tenant)] if existing is not None else []
            await self.repo.add_orphans(tx.connection, removed)
            removed += await self.repo.drop_parts(tx.connection, ctx.tenant, upload.id)
            await self.repo.move_upload(
                tx.connection, upload.id, from_state=UploadState.FINISHING, to_state=UploadState.DONE, now=now
            )
            _emit(
                tx,
                ctx,
                FileWrittenEvent(
                    bucket=current.name,
                    path=record.path,
                    size=record.size,
                    sha256=record.sha256,
                    replaced=existing is not None,
                ),
            )
        return record, removed

    async def _ended(self, upload: UploadRecord, bucket: BucketRecord) -> FileInfo:
        """The answer to ending an upload that is not open: the file it stored, or why not yet."""
        if upload.state == UploadState.FINISHING:
            raise Conflict(f"upload {upload.id} is being ended; ask again in a moment", details={"in_progress": True})
        async with database.read(self.engine) as connection:
            record = await self.repo.file(connection, bucket.id, upload.path)
        if record is None or record.sha256 != upload.sha256:
            raise Conflict(
                f"upload {upload.id} ended, and {bucket.name}/{upload.path} has been replaced or deleted since"
            )
        return record.info(bucket.name)

    async def _drop(self, upload: UploadRecord) -> None:
        """Forget an upload that cannot be ended, and remove what it staged."""
        async with self.runtime.events.transaction() as tx:
            removed = await self.repo.drop_upload(tx.connection, upload.tenant, upload.id)
        self._remove_soon(removed)

    # --- who may do what ---

    async def _bucket_for(self, ctx: RequestContext, name: str, permission: str) -> BucketRecord:
        """The bucket `name`, if the caller may use it so: a robot when the bucket allows it, anyone else
        with `permission`."""
        principal = ctx.principal
        robot = principal is not None and principal.kind is PrincipalKind.ROBOT
        if not robot and (principal is None or not principal.can(permission)):
            role = principal.role.value if principal is not None else "none"
            raise Forbidden(f"role '{role}' lacks the permission '{permission}'")
        async with database.read(self.engine) as connection:
            bucket = await self.repo.bucket(connection, ctx.tenant, name)
        if bucket is None:
            raise _no_bucket(name)
        if robot:
            assert principal is not None
            if not principal.can(Permission.ROBOT_AGENT):
                raise Forbidden("this robot token may not use storage buckets")
            await self._check_robot(bucket, ctx.tenant, principal.name)
        return bucket

    async def _check_robot(self, bucket: BucketRecord, tenant: str, robot: str) -> None:
        """Refuse (`forbidden`) a robot the bucket does not let in."""
        if not bucket.robots and not bucket.robot_groups:
            return
        if robot in bucket.robots:
            return
        presence = self.directory.get(tenant, robot) or await self.directory.fetch(tenant, robot)
        if presence is not None and set(presence.groups) & set(bucket.robot_groups):
            return
        raise Forbidden(f"robot {robot} may not use bucket {bucket.name!r}: it is for {_allowed(bucket)}")

    async def _upload_for(self, ctx: RequestContext, upload_id: str) -> tuple[UploadRecord, BucketRecord]:
        """An upload of the caller's, and its bucket; `not_found` for any other."""
        principal = ctx.principal
        robot = principal is not None and principal.kind is PrincipalKind.ROBOT
        if not robot and (principal is None or not principal.can(Permission.STORAGE_WRITE)):
            role = principal.role.value if principal is not None else "none"
            raise Forbidden(f"role '{role}' lacks the permission '{Permission.STORAGE_WRITE.value}'")
        async with database.read(self.engine) as connection:
            upload = await self.repo.upload(connection, upload_id)
            bucket = await self.repo.bucket_by_id(connection, upload.bucket_id) if upload is not None else None
        if upload is None or bucket is None or upload.tenant != ctx.tenant or upload.created_by != ctx.actor:
            raise NotFound(
                f"no upload {upload_id} of yours: it was cancelled, or abandoned after "
                f"{UPLOAD_STALE_S / 3600:g} h without a chunk, or its bucket was deleted; begin it again"
            )
        return upload, bucket

    # --- removing what is left behind ---

    def _remove_soon(self, orphans: list[OrphanRecord]) -> None:
        """Remove these objects once the request has answered (they are noted in the database: what
        a crash leaves, the sweep removes)."""
        if orphans:
            self._removals.put_nowait(orphans)

    async def _removing(self) -> None:
        while True:
            orphans = await self._removals.get()
            try:
                await self._remove(orphans)
            finally:
                self._removals.task_done()

    async def removed(self) -> None:
        """Wait until what requests left to remove has been removed (or left to the sweep)."""
        await self._removals.join()

    async def _remove(self, orphans: list[OrphanRecord]) -> None:
        """Remove objects left behind, and forget those removed; what fails is left to the sweep."""
        done: list[str] = []
        for orphan in orphans:
            try:
                objects = await self._store(orphan.tenant)
                await objects.purge(orphan.nuid)
                if orphan.object_name is not None:
                    await objects.purge_meta(orphan.object_name, nuid=orphan.nuid)
            except Exception as exc:
                self.log.warning("storage.remove_failed", nuid=orphan.nuid, error=repr(exc))
                break  # the store is not answering: the sweep tries again later
            done.append(orphan.nuid)
        if done:
            async with self.runtime.events.transaction() as tx:
                await self.repo.forget_orphans(tx.connection, done)

    async def _purge_quietly(self, objects: Objects, nuid: str) -> None:
        try:
            await objects.purge(nuid)
        except Exception as exc:
            self.log.warning("storage.purge_failed", nuid=nuid, error=repr(exc))

    async def sweep(self) -> None:
        """Abandon uploads idle for UPLOAD_STALE_S (forget those that ended), and remove from the object
        store what requests could not."""
        now = utcnow()
        idle_since = now - timedelta(seconds=UPLOAD_STALE_S)
        async with database.read(self.engine) as connection:
            stale = await self.repo.stale_uploads(connection, idle_since, SWEEP_BATCH)
        for upload in stale:
            async with self.runtime.events.transaction() as tx:
                current = await self.repo.upload(tx.connection, upload.id)
                if current is None or current.touched_at >= idle_since:
                    continue
                removed = await self.repo.drop_upload(tx.connection, upload.tenant, upload.id)
            await self._remove(removed)
            if upload.state != UploadState.DONE:
                self.log.info(
                    "storage.upload_abandoned",
                    tenant=upload.tenant,
                    upload_id=upload.id,
                    path=upload.path,
                    received=upload.received,
                    size=upload.size,
                )
        for _ in range(SWEEP_MAX_BATCHES):
            async with database.read(self.engine) as connection:
                due = await self.repo.due_orphans(connection, now - timedelta(seconds=ORPHAN_GRACE_S), SWEEP_BATCH)
            if not due:
                return
            await self._remove(due)
            if len(due) < SWEEP_BATCH:
                return


def _usage(bucket: BucketRecord, existing: FileRecord | None, *, reserved: int) -> Usage:
    return Usage(
        bucket=bucket.name,
        max_file_bytes=bucket.max_file_bytes,
        max_bucket_bytes=bucket.max_bucket_bytes,
        used_bytes=bucket.used_bytes,
        replaced_bytes=existing.size if existing is not None else 0,
        reserved_bytes=reserved,
    )


def _refuse(size: int, usage: Usage) -> None:
    refusal = upload_refusal(size, usage)
    if refusal is not None:
        raise BadRequest(
            refusal.message,
            details={
                "limit": refusal.limit,
                "size": size,
                "max_file_bytes": usage.max_file_bytes,
                "max_bucket_bytes": usage.max_bucket_bytes,
                "used_bytes": usage.used_bytes,
                "reserved_bytes": usage.reserved_bytes,
            },
        )


def _still_open(upload: UploadRecord) -> None:
    if upload.state != UploadState.OPEN:
        raise Conflict(f"upload {upload.id} is being ended or has ended; it takes no more chunks")


def _check_chunk(upload: UploadRecord, offset: int, length: int) -> None:
    problem = chunk_problem(size=upload.size, received=upload.received, offset=offset, length=length)
    if problem is None:
        return
    code, message = problem
    if code == "conflict":
        raise Conflict(message, details={"expected_offset": upload.received})
    raise BadRequest(message, details={"expected_offset": upload.received})


def _no_bucket(name: str) -> NotFound:
    return NotFound(f"no bucket {name!r}; 'herder storage buckets' lists them")


def _no_file(bucket: str, path: str) -> NotFound:
    return NotFound(f"no file {path!r} in bucket {bucket!r}")


def _replaced(bucket: str, path: str, sha256: str | None) -> Conflict:
    return Conflict(
        f"{bucket}/{path} was replaced or deleted while it was being read; read it again from the start",
        details={"sha256": sha256} if sha256 else {},
    )


def _allowed(bucket: BucketRecord) -> str:
    parts = []
    if bucket.robot_groups:
        parts.append("robots of group " + ", ".join(bucket.robot_groups))
    if bucket.robots:
        parts.append("robot " + ", ".join(bucket.robots))
    return " and ".join(parts)


def _emit(tx: Transaction, ctx: RequestContext, data: Any) -> None:
    tx.emit(Event.of(data, tenant=ctx.tenant, actor=ctx.actor))


__all__ = ["StorageService"]
