"""The packages service on a real bus and object store, on SQLite and PostgreSQL: publish, list, resolve."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from herder.client.requests import Client
from herder.packaging.archive import pack, sha256_hex, unpack
from herder.packaging.manifest import load_manifest
from herder.protocol import codec, subjects
from herder.protocol.auth import Role, TokenCreate
from herder.protocol.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthenticated
from herder.protocol.messages import Event, HealthCheck
from herder.protocol.packages import (
    EntryKind,
    EntryPoint,
    PackagePublish,
    PackageResolve,
    ProcessListRequest,
    VersionListRequest,
)
from herder.services.auth.service import AuthService
from herder.services.common.credentials import ServiceCredential
from herder.services.packages.service import PackagesService
from tests.conftest import Stack, running_stack
from tests.support import eventually

TENANT = subjects.DEFAULT_TENANT


@pytest.fixture
async def stack(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Stack]:
    """The auth and packages services on this test's NATS and database, with an admin token.

    (It shadows the shared `stack` fixture here only, adding the packages service.)"""
    async with running_stack(nats_url, db_url, tmp_path, credential, (AuthService, PackagesService)) as started:
        yield started


def process_folder(root: Path, name: str = "hello", version: str = "1.0.0", greeting: str = "hello") -> Path:
    """A small python process folder."""
    folder = root / f"{name}-{version}-{greeting}"
    folder.mkdir(parents=True)
    (folder / "herder.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\ndescription = "says {greeting}"\n[entry]\npython = "hello:main"\n'
    )
    (folder / "hello.py").write_text(f"def main() -> None:\n    print({greeting!r})\n")
    return folder


async def upload(stack: Stack, data: bytes, *, as_sha256: str | None = None) -> str:
    """Put `data` in the packages object store, under its own sha256 (or under `as_sha256`, which only a
    service may do to an archive that is there already); return that."""
    assert stack.host.nc is not None
    store = await stack.host.nc.jetstream().object_store(subjects.packages_bucket("default"))
    sha256 = as_sha256 or sha256_hex(data)
    await store.put(sha256, data)
    return sha256


async def publish_folder(stack: Stack, folder: Path, client: Client | None = None) -> PackagePublish:
    """Pack, upload and publish a process folder, as the CLI does; return the request sent."""
    manifest = load_manifest(folder)
    archive = pack(folder)
    request = PackagePublish(
        process=manifest.name,
        version=manifest.version,
        sha256=await upload(stack, archive),
        size=len(archive),
        entry=manifest.entry,
        description=manifest.description,
    )
    await (client or stack.client).request(request)
    return request


async def stored_events(stack: Stack) -> list[Event]:
    """Every event in the HERDER_EVENTS stream, oldest first."""
    assert stack.host.runtime is not None
    js = stack.host.runtime.js
    info = await js.stream_info(subjects.events_stream("default"))
    found = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(subjects.events_stream("default"), sequence)
        assert message.data is not None
        found.append(codec.load(Event, message.data))
    return found


async def test_publish_list_versions_and_resolve(stack: Stack, tmp_path: Path) -> None:
    first = await publish_folder(stack, process_folder(tmp_path, version="1.9.0", greeting="first"))
    await publish_folder(stack, process_folder(tmp_path, version="1.10.0", greeting="second"))
    await publish_folder(stack, process_folder(tmp_path, version="1.10.0-rc1", greeting="candidate"))
    await publish_folder(stack, process_folder(tmp_path, name="other", version="0.1", greeting="other"))

    listed = (await stack.client.request(ProcessListRequest())).processes
    assert [(p.name, p.latest, p.versions, p.description) for p in listed] == [
        ("hello", "1.10.0", 3, "says second"),
        ("other", "0.1", 1, "says other"),
    ]

    versions = await stack.client.request(VersionListRequest(process="hello"))
    assert versions.process == "hello"
    assert [v.version for v in versions.versions] == ["1.10.0", "1.10.0-rc1", "1.9.0"]
    oldest = versions.versions[-1]
    assert (oldest.sha256, oldest.size, oldest.published_by) == (first.sha256, first.size, "admin")
    assert oldest.entry == EntryPoint(kind=EntryKind.PYTHON, target="hello:main")
    assert oldest.published_at.tzinfo is not None

    latest = await stack.client.request(PackageResolve(process="hello"))
    assert latest.version == "1.10.0"
    assert latest.object == latest.sha256
    pinned = await stack.client.request(PackageResolve(process="hello", version="1.9.0"))
    assert (pinned.version, pinned.sha256, pinned.size) == ("1.9.0", first.sha256, first.size)

    # What resolve names is what a robot fetches: the archive, intact.
    assert stack.host.nc is not None
    store = await stack.host.nc.jetstream().object_store(subjects.packages_bucket("default"))
    fetched = await store.get(pinned.object)
    assert fetched.data is not None and sha256_hex(fetched.data) == pinned.sha256
    unpack(fetched.data, tmp_path / "unpacked")
    assert "'first'" in (tmp_path / "unpacked" / "hello.py").read_text()


async def test_versions_are_immutable(stack: Stack, tmp_path: Path) -> None:
    published = await publish_folder(stack, process_folder(tmp_path))
    message = "hello 1.0.0 is already published; versions are immutable, publish a new version"
    with pytest.raises(Conflict) as same:
        await stack.client.request(published)
    assert same.value.message == message
    # Other content under the same version: refused all the same, and the version keeps its archive.
    with pytest.raises(Conflict, match="already published"):
        await publish_folder(stack, process_folder(tmp_path, greeting="changed"))
    resolved = await stack.client.request(PackageResolve(process="hello", version="1.0.0"))
    assert resolved.sha256 == published.sha256


async def test_concurrent_publishes_of_one_version_let_one_through(stack: Stack, tmp_path: Path) -> None:
    archive = pack(process_folder(tmp_path))
    sha256 = await upload(stack, archive)
    request = PackagePublish(
        process="hello",
        version="3.0",
        sha256=sha256,
        size=len(archive),
        entry=EntryPoint(kind=EntryKind.PYTHON, target="hello:main"),
    )
    outcomes = await asyncio.gather(*(stack.client.request(request) for _ in range(4)), return_exceptions=True)
    assert sum(not isinstance(outcome, BaseException) for outcome in outcomes) == 1
    assert all(isinstance(outcome, Conflict) for outcome in outcomes if isinstance(outcome, BaseException))
    versions = await stack.client.request(VersionListRequest(process="hello"))
    assert [v.version for v in versions.versions] == ["3.0"]


async def test_unknown_processes_and_versions(stack: Stack, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as caught:
        await stack.client.request(VersionListRequest(process="x"))
    assert caught.value.message == "no process named 'x'"
    with pytest.raises(NotFound, match="no process named 'x'"):
        await stack.client.request(PackageResolve(process="x"))
    assert (await stack.client.request(ProcessListRequest())).processes == []

    await publish_folder(stack, process_folder(tmp_path, version="1.1.0"))
    await publish_folder(stack, process_folder(tmp_path, version="1.0.0"))
    with pytest.raises(NotFound) as missing:
        await stack.client.request(PackageResolve(process="hello", version="9.9"))
    assert missing.value.message == "process 'hello' has no version '9.9'; it has 1.0.0, 1.1.0"


async def test_the_archive_must_be_there_whole(stack: Stack, tmp_path: Path) -> None:
    archive = pack(process_folder(tmp_path))
    sha256 = sha256_hex(archive)
    entry = EntryPoint(kind=EntryKind.COMMAND, target="bash", args=["run.sh"])

    def request(size: int = len(archive), digest: str = sha256) -> PackagePublish:
        return PackagePublish(process="hello", version="1.0.0", sha256=digest, size=size, entry=entry)

    with pytest.raises(BadRequest, match=rf"no archive {sha256} in the HERDER_PACKAGES_{TENANT} object store"):
        await stack.client.request(request())

    # Other bytes of the same length, stored under this archive's name: the digest gives them away.
    forged = bytes(len(archive))
    await upload(stack, forged, as_sha256=sha256)
    with pytest.raises(BadRequest, match=f"has sha256 {sha256_hex(forged)}, not the sha256 the request names"):
        await stack.client.request(request())

    await upload(stack, archive)
    with pytest.raises(BadRequest, match=rf"holds {len(archive)} bytes, not the {len(archive) + 1}"):
        await stack.client.request(request(size=len(archive) + 1))
    with pytest.raises(BadRequest, match="no archive"):
        await stack.client.request(request(digest="f" * 64))
    # Nothing of the refused attempts was recorded; the right one goes through.
    with pytest.raises(NotFound):
        await stack.client.request(VersionListRequest(process="hello"))
    info = await stack.client.request(request())
    assert (info.version, info.sha256) == ("1.0.0", sha256)


async def test_operators_publish_and_integrators_only_read(stack: Stack, tmp_path: Path) -> None:
    operator = await stack.client.request(TokenCreate(name="ops", role=Role.OPERATOR))
    integrator = await stack.client.request(TokenCreate(name="ci", role=Role.INTEGRATOR))
    as_operator = stack.client_with(operator.secret)
    as_integrator = stack.client_with(integrator.secret)

    await publish_folder(stack, process_folder(tmp_path, version="1.0"), client=as_operator)
    with pytest.raises(Forbidden, match=r"lacks the permission 'packages\.publish'"):
        await publish_folder(stack, process_folder(tmp_path, version="2.0"), client=as_integrator)
    with pytest.raises(Unauthenticated):
        await publish_folder(stack, process_folder(tmp_path, version="3.0"), client=stack.client_with(None))

    versions = await as_integrator.request(VersionListRequest(process="hello"))
    assert [(v.version, v.published_by) for v in versions.versions] == [("1.0", "ops")]
    assert (await as_integrator.request(PackageResolve(process="hello"))).version == "1.0"
    assert [p.name for p in (await as_integrator.request(ProcessListRequest())).processes] == ["hello"]


async def test_a_published_version_is_an_event(stack: Stack, tmp_path: Path) -> None:
    published = await publish_folder(stack, process_folder(tmp_path))

    found: list[Event] = []

    async def event_stored() -> bool:
        found[:] = [e for e in await stored_events(stack) if e.type == "packages.version_published"]
        return bool(found)

    await eventually(event_stored, timeout=15)
    (event,) = found
    assert event.tenant == TENANT and event.actor == "admin"
    assert event.subject == "hd.default.evt.packages.version_published"
    assert event.data == {
        "process": "hello",
        "version": "1.0.0",
        "sha256": published.sha256,
        "size": published.size,
    }


async def test_bad_requests_get_answers_and_the_service_keeps_serving(stack: Stack, tmp_path: Path) -> None:
    headers = {codec.Header.AUTHORIZATION: f"Bearer {stack.admin_token}"}
    as_json = {**headers, codec.Header.CONTENT_TYPE: codec.JSON}
    for verb, body, sent_headers in [
        ("publish", b"\xc1garbage", headers),
        ("publish", codec.dump(VersionListRequest.model_construct(process="not a name")), headers),
        ("versions", codec.dump(VersionListRequest.model_construct(process="not a name")), headers),
        ("publish", b'{"process": "hello"}', as_json),
        ("resolve", b'{"process": "hello", "version": "", "extra": 1}', as_json),
        ("publish", b"{not json", as_json),
    ]:
        reply = await stack.nc.request(
            subjects.service(TENANT, "packages", verb), body, headers=sent_headers, timeout=10
        )
        assert reply.headers is not None and codec.is_error_reply(reply.headers), verb
        with pytest.raises(BadRequest):
            codec.raise_error_reply(reply.data, reply.headers)
    # A JSON request gets a JSON reply.
    reply = await stack.nc.request(
        subjects.service(TENANT, "packages", "list"),
        b"{}",
        headers=as_json,
        timeout=10,
    )
    assert codec.load(ProcessListRequest.reply_model, reply.data, codec.JSON) is not None

    await publish_folder(stack, process_folder(tmp_path))
    assert (await stack.client.request(PackageResolve(process="hello"))).version == "1.0.0"
    health = await stack.client.request(HealthCheck(), service="packages")
    assert health.service == "packages" and health.database is not None and health.database.ok
