"""The jobs service's view of the robots: a live mirror of the registry's HERDER_ROBOTS bucket.

The registry owns robots; it projects each one's identity and presence into the bucket, and every
jobs-service instance mirrors the bucket through a watch, so deciding where a job may run is a
lookup in memory. Changes reach the `on_change` callback one at a time, in the order they arrived,
after the initial contents have loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import nats.js.errors
import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from herder.protocol import codec, subjects
from herder.protocol.errors import BadRequest
from herder.protocol.registry import RobotPresence

# Called with (tenant, robot name, before, after); None stands for "not there".
OnChange = Callable[[str, str, RobotPresence | None, RobotPresence | None], Awaitable[None]]

log = structlog.get_logger("herder.jobs.directory")


class RobotDirectory:
    """Robots by tenant and name, as the registry last said."""

    def __init__(self, kv: KeyValue, on_change: OnChange | None = None) -> None:
        self._kv = kv
        self._on_change = on_change
        self._robots: dict[str, dict[str, RobotPresence]] = {}
        self._ready = asyncio.Event()
        self._changes: asyncio.Queue[tuple[str, str, RobotPresence | None, RobotPresence | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 10.0) -> None:
        """Start mirroring; return once the bucket's current contents are loaded."""
        watcher = await self._kv.watchall()
        self._tasks = [
            asyncio.create_task(self._follow(watcher), name="jobs.directory.watch"),
            asyncio.create_task(self._deliver(), name="jobs.directory.changes"),
        ]
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """Stop mirroring."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def get(self, tenant: str, name: str) -> RobotPresence | None:
        """A robot as mirrored."""
        return self._robots.get(tenant, {}).get(name)

    def robots(self, tenant: str) -> list[RobotPresence]:
        """The tenant's robots, by name."""
        return sorted(self._robots.get(tenant, {}).values(), key=lambda robot: robot.name)

    def tenants(self) -> list[str]:
        """The tenants that have robots."""
        return sorted(tenant for tenant, robots in self._robots.items() if robots)

    async def fetch(self, tenant: str, name: str) -> RobotPresence | None:
        """A robot as the bucket holds it now: for one registered a moment ago, which the mirror may
        not show yet. The watch stays the mirror's one writer."""
        try:
            entry = await self._kv.get(subjects.robot_key(tenant, name))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return codec.load(RobotPresence, entry.value)
        except BadRequest:
            return None

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # the end of the initial contents
                    self._ready.set()
                    continue
                tenant, _, name = entry.key.partition(".")
                before = self.get(tenant, name)
                after: RobotPresence | None = None
                if entry.operation not in (KV_DEL, KV_PURGE) and entry.value:
                    try:
                        after = codec.load(RobotPresence, entry.value)
                    except BadRequest:
                        log.warning("directory.unreadable_entry", key=entry.key)
                        continue
                    if before is not None and after.seq < before.seq:
                        continue  # an older write that overtook a newer one
                    self._robots.setdefault(tenant, {})[name] = after
                else:
                    self._robots.get(tenant, {}).pop(name, None)
                if self._ready.is_set() and before != after:
                    self._changes.put_nowait((tenant, name, before, after))
                self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _deliver(self) -> None:
        while True:
            tenant, name, before, after = await self._changes.get()
            if self._on_change is None:
                continue
            try:
                await self._on_change(tenant, name, before, after)
            except Exception:
                log.exception("directory.change_failed", tenant=tenant, robot=name)
