"""The jobs service's view of the robots: a live mirror of the registry's HERDER_ROBOTS bucket.

The registry owns robots; it projects each one's identity and presence into the bucket, and every
jobs-service instance mirrors the bucket through a watch, so deciding where a job may run is a
lookup in memory. Changes reach the `on_change` callback one at a time, in the order they arrived,
after the initial contents have loaded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from nats.js.kv import KeyValue

from herder.client.tasks import Supervisor
from herder.protocol import codec, subjects
from herder.protocol.errors import BadRequest
from herder.protocol.registry import RobotPresence
from herder.services.common.mirror import START_TIMEOUT_S, KvMirror

# Called with (tenant, robot name, before, after); None stands for "not there".
OnChange = Callable[[str, str, RobotPresence | None, RobotPresence | None], Awaitable[None]]

log = structlog.get_logger("herder.jobs.directory")


def _presence(data: bytes) -> RobotPresence:
    return codec.load(RobotPresence, data)


def _newer(held: RobotPresence, arriving: RobotPresence) -> bool:
    # `seq` grows with every change the registry makes: a lower one is an older write that overtook a newer.
    return arriving.seq >= held.seq


def _tenant_of(key: str) -> str:
    return key.partition(".")[0]


class RobotDirectory:
    """Robots by tenant and name, as the registry last said.

    The watch runs as task `jobs.directory.watch` (and the callback as `jobs.directory.changes`)
    under `supervisor`, or a supervisor of its own when none is given."""

    def __init__(
        self, kv: KeyValue, on_change: OnChange | None = None, *, supervisor: Supervisor | None = None
    ) -> None:
        self._on_change = on_change
        self._mirror = KvMirror(
            kv,
            _presence,
            name="jobs.directory",
            on_change=self._changed if on_change is not None else None,
            accept=_newer,
            supervisor=supervisor,
            log=log,
        )

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start mirroring; return once the bucket's current contents are loaded."""
        await self._mirror.start(timeout)

    async def stop(self) -> None:
        """Stop mirroring."""
        await self._mirror.stop()

    def get(self, tenant: str, name: str) -> RobotPresence | None:
        """A robot as mirrored."""
        try:
            key = subjects.robot_key(tenant, name)
        except BadRequest:  # a name no robot can have
            return None
        return self._mirror.get(key)

    def robots(self, tenant: str) -> list[RobotPresence]:
        """The tenant's robots, by name."""
        mine = (robot for key, robot in self._mirror.snapshot().items() if _tenant_of(key) == tenant)
        return sorted(mine, key=lambda robot: robot.name)

    def tenants(self) -> list[str]:
        """The tenants that have robots."""
        return sorted({_tenant_of(key) for key in self._mirror.snapshot()})

    async def fetch(self, tenant: str, name: str) -> RobotPresence | None:
        """A robot as the bucket holds it now: for one registered a moment ago, which the mirror may
        not show yet. The watch stays the mirror's one writer."""
        return await self._mirror.fetch(subjects.robot_key(tenant, name))

    async def _changed(self, key: str, before: RobotPresence | None, after: RobotPresence | None) -> None:
        tenant, _, name = key.partition(".")
        if self._on_change is not None:
            await self._on_change(tenant, name, before, after)
