"""Runs a set of services in one process: `herder up` runs them all, `herder service run` some."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine

from herder.client.connection import connect, display_nats_url
from herder.client.errors import SetupError
from herder.client.tasks import Supervisor
from herder.protocol import subjects
from herder.services.common import database, idempotency, migrate
from herder.services.common.bus import JetStreamSettings, ensure_bucket, ensure_tenant
from herder.services.common.credentials import ServiceCredential
from herder.services.common.events import RELAY_INTERVAL_S, EventPublisher
from herder.services.common.runtime import BusAddress, Runtime, Service, ServiceRunner
from herder.services.common.tokens import TokenResolver

SHUTDOWN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HostConfig:
    """What one process of services needs: where NATS and the database are, the stack's service
    credential, and which services."""

    nats_url: str
    db_url: str
    services: tuple[type[Service], ...]
    credential: ServiceCredential
    ca_pem: str | None = None
    data_dir: Path | None = None
    jetstream: JetStreamSettings = field(default_factory=JetStreamSettings)
    migrate: bool = True


class ServiceHost:
    """Connects to NATS and the database, prepares the shared assets, and runs services until stopped."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.log = structlog.get_logger("herder")
        self.nc: NATS | None = None
        self.engine: AsyncEngine | None = None
        self.runtime: Runtime | None = None
        self.services: dict[str, Service] = {}
        self._runners: list[ServiceRunner] = []
        self._tokens: TokenResolver | None = None
        self._supervisor: Supervisor | None = None

    async def start(self) -> None:
        """Bring every service up; on failure, undo what was done and raise `SetupError`."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        self.engine = database.create_engine(config.db_url)
        health = await database.check(self.engine)
        if not health.ok:
            raise SetupError(health.error or "the database does not answer")
        if config.migrate:
            revisions = await migrate.upgrade(self.engine)
            self.log.info("database.ready", url=database.display_url(config.db_url), revisions=revisions)
        else:
            missing = migrate.heads() - await migrate.current(self.engine)
            if missing:
                raise SetupError("the database schema is behind this herder; run 'herder db upgrade' first")
        names = "+".join(service.name for service in config.services) or "none"
        self.nc = await connect(
            config.nats_url,
            name=f"herder-{names}",
            credentials=config.credential.service,
            ca_pem=config.ca_pem,
            on_disconnected=self._disconnected,
            on_reconnected=self._reconnected,
        )
        if not self.nc._server_info.get("auth_required"):
            # A server that lets anyone in lets anyone read tokens, forge events and command robots.
            raise SetupError(
                f"the NATS server at {display_nats_url(config.nats_url)} lets clients in without credentials; "
                "herder runs only behind its fence: configure the server with 'herder fence server-config' "
                "(see docs/security.md)"
            )
        js = self.nc.jetstream()
        # Tenants arrive with a later issue; until then every principal belongs to the default tenant.
        await ensure_tenant(js, subjects.DEFAULT_TENANT, config.jetstream)
        bucket = await ensure_bucket(js, subjects.TOKENS_BUCKET, config.jetstream)
        supervisor = Supervisor(log=self.log)
        self._supervisor = supervisor
        self._tokens = TokenResolver(bucket, supervisor=supervisor, service_key=config.credential.service_token_key)
        await self._tokens.start()
        events = EventPublisher(js, self.engine)
        self.runtime = Runtime(
            nc=self.nc,
            js=js,
            address=BusAddress(url=config.nats_url, ca_pem=config.ca_pem),
            credential=config.credential,
            engine=self.engine,
            tokens=self._tokens,
            events=events,
            data_dir=config.data_dir,
            jetstream=config.jetstream,
            log=self.log,
            supervisor=supervisor,
        )
        for service_class in config.services:
            service = service_class(self.runtime)
            runner = ServiceRunner(service)
            await runner.start()
            self._runners.append(runner)
            self.services[service.name] = service
        supervisor.periodic("herder.outbox.relay", events.relay_once, RELAY_INTERVAL_S)
        # Every host purges; a delete of expired rows is harmless to repeat.
        store = idempotency.IdempotencyStore(self.engine)
        supervisor.periodic("herder.idempotency.purge", store.purge, idempotency.PURGE_INTERVAL_S)

    async def _disconnected(self) -> None:
        self.log.warning("bus.disconnected")

    async def _reconnected(self) -> None:
        self.log.info("bus.reconnected")
        if self.runtime is not None:
            await self.runtime.reconnected()

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop taking requests, drain those in flight, publish what the outbox holds, close everything.

        Safe to call twice, and after a start that failed half-way."""
        if self.nc is None and self.engine is None:
            return
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.stop(timeout)
        self._runners.clear()
        if self._supervisor is not None:
            await self._supervisor.cancel("herder.idempotency.purge")
            await self._supervisor.cancel("herder.outbox.relay")
        if self.runtime is not None:
            await self.runtime.events.close()
            # What is still in the outbox goes now if JetStream takes it at once; else the next start
            # relays it. Bounded: one relay waits on each event in turn, up to 200 of them.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.runtime.events.relay_once(grace_s=0), timeout)
        if self._tokens is not None:
            await self._tokens.stop()
            self._tokens = None
        if self._supervisor is not None:
            await self._supervisor.stop()
            self._supervisor = None
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), timeout)
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.nc = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None
        self.log.info("host.stopped")


def resolve_services(names: Iterable[str]) -> tuple[type[Service], ...]:
    """The service classes for `names`, or `SetupError` naming the unknown ones."""
    from herder.services import catalog

    chosen = list(dict.fromkeys(names))
    unknown = [name for name in chosen if name not in catalog.NAMES]
    if unknown:
        raise SetupError(f"unknown service {', '.join(unknown)}; herder has: {', '.join(sorted(catalog.NAMES))}")
    return tuple(catalog.service_class(name) for name in chosen)
