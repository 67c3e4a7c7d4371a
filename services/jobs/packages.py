"""What the jobs service knows of package versions: resolutions kept so that starting a job seldom
needs to ask the packages service.

A version never changes once published, so its resolution is kept for good. A process's newest
version changes whenever a version is published: it is kept until the `packages.version_published`
event says so, and never longer than NEWEST_TTL_S in case an event was missed.
"""

from __future__ import annotations

import contextlib
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.errors import BadRequest
from herder.protocol.messages import Event
from herder.protocol.packages import PackageRef, PackageResolve, VersionPublishedEvent

NEWEST_TTL_S = 60.0


class PackageVersions:
    """Resolves (process, version or newest) to a package, remembering what it may."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._versions: dict[tuple[str, str, str], PackageRef] = {}
        self._newest: dict[tuple[str, str], tuple[PackageRef, float]] = {}
        # Bumped by every publish of a process: a resolution that started before one is not kept.
        self._generation: dict[tuple[str, str], int] = {}
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Follow publications."""
        self._subscription = await self._nc.subscribe(
            subjects.events_filter(VersionPublishedEvent.event_type), cb=self._on_published
        )

    async def stop(self) -> None:
        """Stop following publications."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _on_published(self, msg: Msg) -> None:
        try:
            event = codec.load(Event, msg.data, codec.content_type_of(msg.headers))
            published = VersionPublishedEvent.model_validate(event.data)
        except (BadRequest, ValueError):
            return
        key = (event.tenant, published.process)
        self._newest.pop(key, None)
        self._generation[key] = self._generation.get(key, 0) + 1

    async def resolve(self, client: Client, process: str, version: str | None) -> PackageRef:
        """The package of `process` at `version` (its newest when None), asking `client`'s tenant's
        packages service, as `client`'s caller, when it is not known here."""
        tenant = client.tenant
        if version is not None:
            known = self._versions.get((tenant, process, version))
            if known is not None:
                return known
        else:
            newest = self._newest.get((tenant, process))
            if newest is not None and time.monotonic() - newest[1] < NEWEST_TTL_S:
                return newest[0]
        generation = self._generation.get((tenant, process), 0)
        package = await client.request(PackageResolve(process=process, version=version))
        self._versions[(tenant, package.process, package.version)] = package
        if version is None and self._generation.get((tenant, process), 0) == generation:
            self._newest[(tenant, process)] = (package, time.monotonic())
        return package
