"""Fixtures every tier shares: an isolated, fenced nats-server per test and databases on SQLite and PostgreSQL.

The server is always fenced (its own service credential, the auth callout): a test's `nc` connects
as a service, with every right; clients and robots connect with their tokens, through the callout,
once an auth service runs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from herder.client.connection import connect
from herder.client.requests import Client
from herder.services.auth.service import AuthService
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import HostConfig, ServiceHost
from herder.services.common.natsserver import EmbeddedNats
from herder.services.common.runtime import Service
from tests.support import Postgres, connect_as, connect_postgres, migrated


@pytest.fixture
def credential() -> ServiceCredential:
    """The service credential of this test's stack."""
    return ServiceCredential.generate()


@pytest.fixture
def nats_server(tmp_path: Path, credential: ServiceCredential) -> Iterator[EmbeddedNats]:
    """A fenced nats-server of its own for one test: free port, temporary JetStream store."""
    server = EmbeddedNats(tmp_path / "nats", credential=credential, port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    """The URL of this test's nats-server."""
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str, credential: ServiceCredential) -> AsyncIterator[NATS]:
    """A connection to this test's nats-server as a service (every right): how a test looks at the bus."""
    client = await connect(nats_url, name="test", credentials=credential.service)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The PostgreSQL server the tests use (HERDER_TEST_POSTGRES)."""
    server = connect_postgres()
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_template(postgres: Postgres) -> Iterator[str]:
    """A database migrated once per run; each test gets a copy."""
    name = f"herder_tpl_{uuid.uuid4().hex[:8]}"
    postgres.create(name)
    try:
        migrated(postgres.url_of(name))
        yield name
    finally:
        postgres.drop(name)


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def blank_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'blank.db'}"
        return
    with request.getfixturevalue("postgres").database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield migrated(f"sqlite:///{tmp_path / 'herder.db'}")
        return
    template = request.getfixturevalue("postgres_template")
    with request.getfixturevalue("postgres").database(template=template) as url:
        yield url


@dataclass
class Stack:
    """A running auth service with its admin token, and a client holding that token."""

    host: ServiceHost
    admin_token: str
    nc: NATS
    client: Client

    @property
    def auth(self) -> AuthService:
        """The auth service instance."""
        service = self.host.services["auth"]
        assert isinstance(service, AuthService)
        return service

    def client_with(self, token: str | None, tenant: str = "default") -> Client:
        """Another client on the same connection, with another token."""
        return Client(self.nc, token=token, tenant=tenant)


@asynccontextmanager
async def running_stack(
    nats_url: str,
    db_url: str,
    data_dir: Path,
    credential: ServiceCredential,
    services: tuple[type[Service], ...] = (AuthService,),
) -> AsyncIterator[Stack]:
    """`services` (auth among them) on a migrated database, bootstrapped with an admin token, and a
    client connection of that admin (through the fence); all stopped afterwards."""
    host = ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=db_url,
            services=services,
            credential=credential,
            data_dir=data_dir,
            migrate=False,
        )
    )
    await host.start()
    try:
        auth = host.services["auth"]
        assert isinstance(auth, AuthService)
        admin = await auth.bootstrap_admin(None, may_rotate=False)
        assert admin is not None
        client_nc = await connect_as(nats_url, admin, name="test-client")
        try:
            yield Stack(host=host, admin_token=admin, nc=client_nc, client=Client(client_nc, token=admin))
        finally:
            await client_nc.close()
    finally:
        await host.stop()


@pytest.fixture
async def stack(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Stack]:
    """herder's auth service on this test's NATS and database, bootstrapped with an admin token."""
    async with running_stack(nats_url, db_url, tmp_path, credential) as started:
        yield started
