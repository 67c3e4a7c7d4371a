"""The packages service: processes (automation scripts) and their immutable, hashed versions.

An archive is uploaded to the tenant's object store (`HERDER_PACKAGES_<tenant>`) first, named by
its sha256; publishing then records the version, after checking that the stored
archive has the size and the sha256 the request names. The database is the system of record
of which versions exist; the object store only holds bytes.
"""

from __future__ import annotations

import nats.errors
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from herder.protocol import subjects
from herder.protocol.auth import Permission
from herder.protocol.errors import Unavailable
from herder.protocol.messages import Event, Model, new_id, utcnow
from herder.protocol.packages import (
    PackagePublish,
    PackageRef,
    PackageResolve,
    ProcessList,
    ProcessListRequest,
    VersionInfo,
    VersionList,
    VersionListRequest,
    VersionPublishedEvent,
    already_published,
)
from herder.services.common import database
from herder.services.common.bus import ensure_tenant
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.packages.core import (
    VersionRecord,
    check_archive,
    missing_archive,
    newest_first,
    no_process,
    pick,
    summarise,
)
from herder.services.packages.repository import VersionRepository


class PackagesService(Service):
    """Processes and their versions."""

    name = "packages"

    async def setup(self) -> None:
        self.repo = VersionRepository()
        self._stores: dict[str, ObjectStore] = {}

    async def _store(self, tenant: str) -> ObjectStore:
        """The tenant's object store of package archives."""
        store = self._stores.get(tenant)
        if store is None:
            try:
                store = await self.runtime.js.object_store(subjects.packages_bucket(tenant))
            except BucketNotFoundError:
                await ensure_tenant(self.runtime.js, tenant, self.runtime.jetstream)
                store = await self.runtime.js.object_store(subjects.packages_bucket(tenant))
            self._stores[tenant] = store
        return store

    @endpoint(permission=Permission.PACKAGES_PUBLISH, idempotent=True)
    async def publish(self, request: PackagePublish, ctx: RequestContext) -> VersionInfo:
        """Record a version whose archive is already in the object store; versions never change."""
        async with database.read(self.engine) as connection:
            existing = await self.repo.get(connection, ctx.tenant, request.process, request.version)
        if existing is not None:
            raise already_published(request.process, request.version)
        stored_size, stored_digest = await self._stored(ctx.tenant, request.sha256)
        check_archive(
            tenant=ctx.tenant,
            sha256=request.sha256,
            size=request.size,
            stored_size=stored_size,
            stored_digest=stored_digest,
        )
        record = VersionRecord(
            id=new_id(),
            tenant=ctx.tenant,
            process=request.process,
            version=request.version,
            sha256=request.sha256,
            size=request.size,
            entry=request.entry,
            description=request.description,
            published_at=utcnow(),
            published_by=ctx.actor,
        )
        # A publish racing this one for the same version fails here, on the unique constraint.
        async with self.runtime.events.transaction() as tx:
            await ctx.claim(tx.connection, record.id)
            await self.repo.insert(tx.connection, record)
            tx.emit(
                Event.of(
                    VersionPublishedEvent(
                        process=record.process, version=record.version, sha256=record.sha256, size=record.size
                    ),
                    tenant=ctx.tenant,
                    actor=ctx.actor,
                )
            )
        ctx.log.info(
            "package.published",
            process=record.process,
            version=record.version,
            sha256=record.sha256,
            size=record.size,
            entry=record.entry.describe(),
        )
        return record.info()

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        """The version a repeated publish recorded (its first reply was never stored)."""
        async with database.read(self.engine) as connection:
            for record in await self.repo.for_tenant(connection, ctx.tenant):
                if record.id == object_id:
                    return record.info()
        return None

    @endpoint(permission=Permission.PACKAGES_READ)
    async def list_processes(self, request: ProcessListRequest, ctx: RequestContext) -> ProcessList:
        """The tenant's processes, by name, each with its newest version."""
        async with database.read(self.engine) as connection:
            records = await self.repo.for_tenant(connection, ctx.tenant)
        return ProcessList(processes=summarise(records))

    @endpoint(permission=Permission.PACKAGES_READ)
    async def versions(self, request: VersionListRequest, ctx: RequestContext) -> VersionList:
        """The versions of one process, newest first."""
        async with database.read(self.engine) as connection:
            records = await self.repo.for_process(connection, ctx.tenant, request.process)
        if not records:
            raise no_process(request.process)
        return VersionList(process=request.process, versions=[record.info() for record in newest_first(records)])

    @endpoint(permission=Permission.PACKAGES_READ)
    async def resolve(self, request: PackageResolve, ctx: RequestContext) -> PackageRef:
        """The package of a process at a version, or at its newest version."""
        async with database.read(self.engine) as connection:
            records = await self.repo.for_process(connection, ctx.tenant, request.process)
        return pick(records, request.process, request.version).ref()

    async def _stored(self, tenant: str, sha256: str) -> tuple[int | None, str | None]:
        """The size and digest of an archive in the object store, or `BadRequest` when it is not there."""
        try:
            info = await (await self._store(tenant)).get_info(sha256)
        except ObjectNotFoundError:
            raise missing_archive(tenant, sha256) from None
        except nats.errors.TimeoutError:
            raise Unavailable(
                f"the {subjects.packages_bucket(tenant)} object store did not answer; JetStream may be down"
            ) from None
        return info.size, info.digest
