"""The robot's package cache against a real nats-server's object store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from herder.packaging.archive import pack, sha256_hex
from herder.protocol import subjects
from herder.protocol.jobs import Outcome
from herder.protocol.packages import EntryKind, EntryPoint, PackageRef
from herder.robot.cache import PackageCache, PackageHashMismatch, PackageMissing, PackageTooLarge
from herder.robot.runner import JobProcess, RunSpec
from herder.services.common.bus import JetStreamSettings, ensure_object_store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class CountingJetStream:
    """nats-py's JetStream context, counting how often an object store is opened (once per download)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.opened = 0

    async def object_store(self, bucket: str) -> ObjectStore:
        self.opened += 1
        return await self._js.object_store(bucket)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)


@pytest.fixture
async def store(nc: NATS) -> ObjectStore:
    """The HERDER_PACKAGES bucket of this test's nats-server."""
    return await ensure_object_store(nc.jetstream(), subjects.packages_bucket("default"), JetStreamSettings())


async def publish(store: ObjectStore, folder: Path) -> tuple[PackageRef, bytes]:
    """Pack `folder` into the object store as the packages service would; its ref and bytes."""
    data = pack(folder)
    sha = sha256_hex(data)
    ref = PackageRef(
        process="hello",
        version="1.0.0",
        sha256=sha,
        size=len(data),
        object=sha,
        entry=EntryPoint(kind=EntryKind.PYTHON, target="hello:main"),
    )
    await store.put(ref.object, data)
    return ref, data


def _leftovers(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir()) if root.exists() else []


async def test_a_package_is_downloaded_checked_unpacked_and_runs(nc: NATS, store: ObjectStore, tmp_path: Path) -> None:
    ref, _ = await publish(store, EXAMPLES / "hello")
    cache = PackageCache(tmp_path / "cache", nc.jetstream(), "default")
    folder = await cache.fetch(ref)
    assert folder == tmp_path / "cache" / ref.sha256
    assert (folder / "hello.py").read_text() == (EXAMPLES / "hello" / "hello.py").read_text()
    assert _leftovers(tmp_path / "cache") == [ref.sha256]

    spec = RunSpec(
        job_id="0" * 32,
        attempt=1,
        entry=ref.entry,
        package_dir=folder,
        work_dir=tmp_path / "work",
        input={"name": "Bo"},
    )
    job = await JobProcess.start(spec, lambda line: None)
    result = await asyncio.wait_for(job.wait(), 20)
    assert (result.outcome, result.output) == (Outcome.SUCCESSFUL, {"greeting": "Hello, Bo!"})


async def test_a_cached_package_is_not_downloaded_again(nc: NATS, store: ObjectStore, tmp_path: Path) -> None:
    ref, _ = await publish(store, EXAMPLES / "hello")
    js = CountingJetStream(nc.jetstream())
    cache = PackageCache(tmp_path / "cache", js, "default")  # type: ignore[arg-type]
    first = await cache.fetch(ref)
    await store.delete(ref.object)  # a second download would now fail
    assert await cache.fetch(ref) == first
    assert await PackageCache(tmp_path / "cache", nc.jetstream(), "default").fetch(ref) == first  # after a restart too
    assert js.opened == 1


async def test_concurrent_fetches_of_one_package_download_it_once(nc: NATS, store: ObjectStore, tmp_path: Path) -> None:
    ref, _ = await publish(store, EXAMPLES / "long-task")
    js = CountingJetStream(nc.jetstream())
    cache = PackageCache(tmp_path / "cache", js, "default")  # type: ignore[arg-type]
    folders = await asyncio.gather(*(cache.fetch(ref) for _ in range(5)))
    assert set(folders) == {tmp_path / "cache" / ref.sha256}
    assert js.opened == 1


async def test_other_bytes_under_the_name_are_a_hash_mismatch_and_nothing_is_unpacked(
    nc: NATS, store: ObjectStore, tmp_path: Path
) -> None:
    ref, data = await publish(store, EXAMPLES / "hello")
    await store.put(ref.object, bytes(reversed(data)))  # same size, other bytes
    cache = PackageCache(tmp_path / "cache", nc.jetstream(), "default")
    with pytest.raises(PackageHashMismatch, match="package hash mismatch"):
        await cache.fetch(ref)
    assert _leftovers(tmp_path / "cache") == []

    await store.put(ref.object, data + b"tail")  # another size: refused before downloading
    with pytest.raises(PackageHashMismatch, match="package hash mismatch"):
        await cache.fetch(ref)
    assert _leftovers(tmp_path / "cache") == []


async def test_a_missing_package_is_a_clear_error(nc: NATS, store: ObjectStore, tmp_path: Path) -> None:
    ref, _ = await publish(store, EXAMPLES / "hello")
    await store.delete(ref.object)
    with pytest.raises(
        PackageMissing,
        match=r"package hello 1\.0\.0 is not in the object store HERDER_PACKAGES_default \(object [0-9a-f]{64}\)",
    ):
        await PackageCache(tmp_path / "cache", nc.jetstream(), "default").fetch(ref)
    assert _leftovers(tmp_path / "cache") == []


async def test_a_missing_bucket_is_a_clear_error(nc: NATS, tmp_path: Path) -> None:
    ref = PackageRef(
        process="hello",
        version="1.0.0",
        sha256="0" * 64,
        size=10,
        object="0" * 64,
        entry=EntryPoint(kind=EntryKind.PYTHON, target="hello:main"),
    )
    with pytest.raises(PackageMissing, match="there is no bucket HERDER_PACKAGES"):
        await PackageCache(tmp_path / "cache", nc.jetstream(), "default").fetch(ref)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            {"max_unpacked_bytes": 1024**2},
            r"^package hello 1\.0\.0 unpacks to more than 1 MiB \(the robot's limit\); "
            r"it reaches 2 MiB at 'zeros\.bin'; raise the limit with 'herder robot run --max-package-size SIZE'$",
        ),
        (
            {"max_unpacked_files": 2},
            r"^package hello 1\.0\.0 unpacks to more than 2 files and folders \(the robot's limit\); "
            r"'zeros\.bin' is number 3; pack fewer files into the process folder$",
        ),
    ],
)
async def test_a_package_past_the_limits_is_refused_and_nothing_of_it_is_left(
    nc: NATS, store: ObjectStore, tmp_path: Path, limits: dict[str, int], message: str
) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "hello.py").write_text("def main(): pass\n")
    (folder / "readme.txt").write_text("zeros\n")
    (folder / "zeros.bin").write_bytes(bytes(2 * 1024**2))  # packs to a few KiB
    ref, data = await publish(store, folder)
    assert len(data) < 64 * 1024
    root = tmp_path / "cache"
    with pytest.raises(PackageTooLarge, match=message):
        await PackageCache(root, nc.jetstream(), "default", **limits).fetch(ref)
    assert _leftovers(root) == []  # neither the scratch folder nor a partial package folder

    fetched = await PackageCache(root, nc.jetstream(), "default").fetch(ref)  # within the default limits
    assert (fetched / "zeros.bin").stat().st_size == 2 * 1024**2
