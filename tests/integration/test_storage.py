"""The storage service against a real NATS and real databases: files round-trip byte for byte through
the object store in chunks, limits and sha256 are checked before anything is stored, robots use only
the buckets that allow them, and a robot's job reads and writes files through its SDK."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from herder.client import storage
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import Role, TokenCreate
from herder.protocol.errors import BadRequest, Conflict, Forbidden, NotFound
from herder.protocol.jobs import JobStart, JobState
from herder.protocol.messages import Event, utcnow
from herder.protocol.registry import RobotStatus
from herder.protocol.storage import (
    MAX_CHUNK_BYTES,
    MIB,
    BucketCreate,
    BucketDelete,
    BucketListRequest,
    BucketUpdate,
    Download,
    FileDelete,
    FileListRequest,
    UploadBegin,
    UploadCancel,
    UploadChunk,
    UploadEnd,
)
from herder.services.common.credentials import ServiceCredential
from herder.services.storage.repository import uploads
from herder.services.storage.service import StorageService
from tests.fleet import Fleet, python_process, running_fleet
from tests.support import connect_as, eventually


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential) as started:
        yield started


async def robot_client(fleet: Fleet, name: str, *, groups: list[str]) -> Client:
    token = await fleet.add_robot(name, groups=groups)
    nc = await connect_as(fleet.nats_url, token, name=f"robot-{name}")
    return Client(nc, token=token, timeout=10.0)


def random_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; their sha256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def service(fleet: Fleet) -> StorageService:
    found = fleet.host.services["storage"]
    assert isinstance(found, StorageService)
    return found


async def raw_request(fleet: Fleet, verb: str, body: Mapping[str, object]) -> dict[str, Any]:
    """Send a JSON request as another program would; the error it gets back."""
    reply = await fleet.nc.request(
        subjects.service(fleet.tenant, "storage", verb),
        json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {fleet.admin_token}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert reply.headers and "Nats-Service-Error-Code" in reply.headers, reply.data
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def stored_objects(fleet: Fleet) -> dict[str, int]:
    """The object store's subjects holding messages, with how many each, once what requests left to
    remove is removed (read as the service: a client may not look in there)."""
    await service(fleet).removed()
    info = await service(fleet).runtime.js.stream_info(
        subjects.object_store_stream(subjects.storage_bucket(fleet.tenant)), subjects_filter=">"
    )
    return dict(info.state.subjects or {})


async def test_a_large_file_round_trips_byte_for_byte(fleet: Fleet, tmp_path: Path) -> None:
    admin = fleet.client
    await admin.request(BucketCreate(name="invoices"))
    source = tmp_path / "big.bin"
    sha256 = random_file(source, 50 * MIB + 12345)
    seen: list[tuple[int, int]] = []
    stored = await storage.upload(
        admin, "invoices", "in/2026/big.bin", source, progress=lambda done, total: seen.append((done, total))
    )
    assert stored.sha256 == sha256 and stored.size == 50 * MIB + 12345
    assert seen[-1] == (stored.size, stored.size)
    target = tmp_path / "out" / "copy.bin"
    target.parent.mkdir()
    fetched = await storage.download(admin, "invoices", "in/2026/big.bin", target)
    assert fetched.sha256 == sha256
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha256
    assert [p.name for p in target.parent.iterdir()] == ["copy.bin"]  # no temporary file left behind
    # A piece from the middle, across two chunks, is read directly.
    piece = await admin.request(
        Download(bucket="invoices", path="in/2026/big.bin", offset=MAX_CHUNK_BYTES * 30 + 7, length=MAX_CHUNK_BYTES)
    )
    assert piece.data == source.read_bytes()[MAX_CHUNK_BYTES * 30 + 7 : MAX_CHUNK_BYTES * 31 + 7]
    bucket = (await admin.request(BucketListRequest())).buckets[0]
    assert (bucket.used_bytes, bucket.file_count) == (stored.size, 1)
    # The staged chunks are gone: one object holds the file (its chunks and its metadata).
    held = await stored_objects(fleet)
    assert len(held) == 2, held
    # An empty file is a file too.
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert (await storage.upload(admin, "invoices", "empty.txt", empty)).size == 0
    assert (await storage.download(admin, "invoices", "empty.txt", tmp_path / "out")).size == 0
    assert (tmp_path / "out" / "empty.txt").read_bytes() == b""


async def test_limits_are_checked_before_anything_is_stored(fleet: Fleet, tmp_path: Path) -> None:
    admin = fleet.client
    await admin.request(BucketCreate(name="small", max_file_bytes=2 * MIB, max_bucket_bytes=3 * MIB))
    big = tmp_path / "big.bin"
    random_file(big, 2 * MIB + 1)
    with pytest.raises(BadRequest, match=r"more than bucket 'small' takes per file \(max_file_bytes 2.0 MiB") as over:
        await storage.upload(admin, "small", "big.bin", big)
    assert over.value.details["limit"] == "max_file_bytes"
    fits = tmp_path / "fits.bin"
    random_file(fits, 2 * MIB)
    await storage.upload(admin, "small", "one.bin", fits)
    with pytest.raises(BadRequest, match=r"bucket 'small' would hold 4.0 MiB .*max_bucket_bytes of 3.0 MiB") as full:
        await storage.upload(admin, "small", "two.bin", fits)
    assert full.value.details["limit"] == "max_bucket_bytes"
    # Replacing a file counts only the difference.
    await storage.upload(admin, "small", "one.bin", fits)
    listed = await admin.request(FileListRequest(bucket="small"))
    assert [f.path for f in listed.files] == ["one.bin"]
    bucket = (await admin.request(BucketListRequest())).buckets[0]
    assert (bucket.used_bytes, bucket.file_count) == (2 * MIB, 1)
    # An upload in progress holds its room: a second one that would not fit beside it is refused at once.
    sha = hashlib.sha256(b"x" * MIB).hexdigest()
    begun = await admin.request(UploadBegin(bucket="small", path="three.bin", size=MIB, sha256=sha))
    with pytest.raises(BadRequest, match=r"uploads in progress will add 1\.0 MiB"):
        await admin.request(UploadBegin(bucket="small", path="four.bin", size=MIB, sha256=sha))
    await admin.request(UploadCancel(upload_id=begun.upload_id))
    await admin.request(UploadBegin(bucket="small", path="four.bin", size=MIB, sha256=sha))
    with pytest.raises(BadRequest, match="larger than max_bucket_bytes"):
        await admin.request(BucketUpdate(name="small", max_file_bytes=4 * MIB))


async def test_a_wrong_sha256_or_offset_stores_nothing(fleet: Fleet) -> None:
    admin = fleet.client
    await admin.request(BucketCreate(name="b"))
    data = os.urandom(MAX_CHUNK_BYTES + 100)
    wrong = hashlib.sha256(b"something else").hexdigest()
    begun = await admin.request(UploadBegin(bucket="b", path="f.bin", size=len(data), sha256=wrong))
    first = data[:MAX_CHUNK_BYTES]
    await admin.request(UploadChunk(upload_id=begun.upload_id, offset=0, data=first))
    with pytest.raises(Conflict, match="has received 524,288 bytes") as wrong_offset:
        await admin.request(UploadChunk(upload_id=begun.upload_id, offset=0, data=first))
    assert wrong_offset.value.details["expected_offset"] == MAX_CHUNK_BYTES
    with pytest.raises(Conflict, match="starts at byte 500,000"):
        await admin.request(UploadChunk(upload_id=begun.upload_id, offset=500_000, data=data[500_000:]))
    with pytest.raises(BadRequest, match="runs past the end"):
        await admin.request(UploadChunk(upload_id=begun.upload_id, offset=MAX_CHUNK_BYTES, data=data[:200]))
    with pytest.raises(BadRequest, match="received 524,288 of its 524,388 bytes"):
        await admin.request(UploadEnd(upload_id=begun.upload_id))
    await admin.request(UploadChunk(upload_id=begun.upload_id, offset=MAX_CHUNK_BYTES, data=data[MAX_CHUNK_BYTES:]))
    with pytest.raises(BadRequest, match=f"has the sha256 {hashlib.sha256(data).hexdigest()}, not {wrong}"):
        await admin.request(UploadEnd(upload_id=begun.upload_id))
    assert (await admin.request(FileListRequest(bucket="b"))).files == []
    with pytest.raises(NotFound, match="no upload"):
        await admin.request(UploadEnd(upload_id=begun.upload_id))
    assert await stored_objects(fleet) == {}  # the staged chunks went with it


async def test_list_by_prefix_in_pages_and_delete(fleet: Fleet, tmp_path: Path) -> None:
    admin = fleet.client
    await admin.request(BucketCreate(name="reports"))
    small = tmp_path / "small.csv"
    small.write_text("a,b\n1,2\n")
    for path in ("2026/06/a.csv", "2026/06/b.csv", "2026/07/c.csv", "2026-summary.csv", "Other/d.csv"):
        await storage.upload(admin, "reports", path, small)
    listed = await admin.request(FileListRequest(bucket="reports", prefix="2026/"))
    assert [f.path for f in listed.files] == ["2026/06/a.csv", "2026/06/b.csv", "2026/07/c.csv"]
    assert listed.files[0].content_type == "text/csv" and listed.files[0].updated_by == "admin"
    assert [f.path for f in (await admin.request(FileListRequest(bucket="reports", prefix="other/"))).files] == []
    first = await admin.request(FileListRequest(bucket="reports", limit=2))
    assert len(first.files) == 2 and first.next_cursor == first.files[-1].path
    rest = await admin.request(FileListRequest(bucket="reports", limit=10, cursor=first.next_cursor))
    assert len(rest.files) == 3 and rest.next_cursor is None
    deleted = await admin.request(FileDelete(bucket="reports", path="2026/06/a.csv"))
    assert deleted.size == small.stat().st_size
    with pytest.raises(NotFound, match=r"no file '2026/06/a\.csv' in bucket 'reports'"):
        await admin.request(FileDelete(bucket="reports", path="2026/06/a.csv"))
    with pytest.raises(NotFound, match="no file"):
        await storage.download(admin, "reports", "2026/06/a.csv", tmp_path)
    with pytest.raises(NotFound, match="no bucket 'nope'"):
        await admin.request(FileListRequest(bucket="nope"))
    # Requests from any program are checked by the service, not by herder's client alone.
    for verb, body in (
        ("file_list", {"bucket": "reports", "prefix": "../etc/"}),
        ("download", {"bucket": "reports", "path": "/etc/passwd"}),
        ("file_delete", {"bucket": "reports", "path": "a/./b"}),
        ("upload_begin", {"bucket": "reports", "path": "a\\b", "size": 1, "sha256": "0" * 64}),
    ):
        error = await raw_request(fleet, verb, body)
        assert error["code"] == "bad_request", error
        assert "path" in error["message"] or "prefix" in error["message"]
    with pytest.raises(Conflict, match="holds 4 files"):
        await admin.request(BucketDelete(name="reports"))
    gone = await admin.request(BucketDelete(name="reports", force=True))
    assert gone.file_count == 4
    assert await stored_objects(fleet) == {}


async def test_robots_use_only_the_buckets_that_allow_them(fleet: Fleet, tmp_path: Path) -> None:
    admin = fleet.client
    await admin.request(BucketCreate(name="finance", robot_groups=["finance"]))
    await admin.request(BucketCreate(name="hr", robots=["r9"]))
    source = tmp_path / "report.xlsx"
    sha256 = random_file(source, 1000)
    r1 = await robot_client(fleet, "r1", groups=["finance"])
    r2 = await robot_client(fleet, "r2", groups=["ops"])
    try:
        stored = await storage.upload(r1, "finance", "out/report.xlsx", source)
        assert stored.updated_by == "r1" and stored.sha256 == sha256
        with pytest.raises(Forbidden, match="robot r1 may not use bucket 'hr': it is for robot r9"):
            await storage.upload(r1, "hr", "report.xlsx", source)
        with pytest.raises(Forbidden, match="robot r2 may not use bucket 'finance': it is for robots of group finance"):
            await r2.request(FileListRequest(bucket="finance"))
        with pytest.raises(Forbidden):
            await storage.download(r2, "finance", "out/report.xlsx", tmp_path)
        assert [f.path for f in (await r1.request(FileListRequest(bucket="finance"))).files] == ["out/report.xlsx"]
        # Buckets are managed by people: the fence does not even let a robot ask.
        with pytest.raises(Forbidden, match="refused"):
            await r1.request(BucketListRequest(), timeout=1.0)
        # Another principal cannot go on with someone else's upload.
        sha = hashlib.sha256(b"abc").hexdigest()
        begun = await r1.request(UploadBegin(bucket="finance", path="x.txt", size=3, sha256=sha))
        with pytest.raises(NotFound, match="no upload"):
            await admin.request(UploadChunk(upload_id=begun.upload_id, offset=0, data=b"abc"))
        await r1.request(UploadChunk(upload_id=begun.upload_id, offset=0, data=b"abc"))
        assert (await r1.request(UploadEnd(upload_id=begun.upload_id))).size == 3
        # A repeated end answers the same file.
        assert (await r1.request(UploadEnd(upload_id=begun.upload_id))).sha256 == sha
        await r1.request(FileDelete(bucket="finance", path="x.txt"))
    finally:
        for client in (r1, r2):
            await client.nc.close()
    integrator = (await admin.request(TokenCreate(name="bi", role=Role.INTEGRATOR))).secret
    as_integrator = Client(fleet.nc, token=integrator, timeout=10.0)
    assert [f.path for f in (await as_integrator.request(FileListRequest(bucket="finance"))).files] == [
        "out/report.xlsx"
    ]
    with pytest.raises(Forbidden, match=r"lacks the permission 'storage\.write'"):
        await storage.upload(as_integrator, "finance", "mine.xlsx", source)
    with pytest.raises(Forbidden, match=r"lacks the permission 'storage\.manage'"):
        await as_integrator.request(BucketCreate(name="mine"))


async def test_every_write_is_an_event(fleet: Fleet, tmp_path: Path) -> None:
    admin = fleet.client
    source = tmp_path / "f.txt"
    source.write_text("hello")
    await admin.request(BucketCreate(name="events"))
    await admin.request(BucketUpdate(name="events", description="for the test"))
    await storage.upload(admin, "events", "f.txt", source)
    await storage.upload(admin, "events", "f.txt", source)
    await admin.request(FileDelete(bucket="events", path="f.txt"))
    await admin.request(BucketDelete(name="events"))
    js = fleet.nc.jetstream()
    wanted = [
        "storage.bucket_created",
        "storage.bucket_updated",
        "storage.file_written",
        "storage.file_written",
        "storage.file_deleted",
        "storage.bucket_deleted",
    ]

    async def events() -> list[Event] | None:
        info = await js.stream_info(subjects.events_stream(fleet.tenant))
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(subjects.events_stream(fleet.tenant), seq=seq)
            event = codec.load(Event, message.data or b"")
            if event.type.startswith("storage."):
                found.append(event)
        return found if len(found) == len(wanted) else None

    found = await eventually(events, timeout=10.0)
    assert [event.type for event in found] == wanted
    assert all(event.actor == "admin" for event in found)
    written = found[3].data
    assert written["path"] == "f.txt" and written["size"] == 5 and written["replaced"] is True
    assert found[2].data["replaced"] is False


async def test_a_stale_upload_is_swept(fleet: Fleet) -> None:
    admin = fleet.client
    await admin.request(BucketCreate(name="b"))
    sha256 = hashlib.sha256(b"0123456789").hexdigest()
    begun = await admin.request(UploadBegin(bucket="b", path="f", size=10, sha256=sha256))
    await admin.request(UploadChunk(upload_id=begun.upload_id, offset=0, data=b"01234"))
    assert len(await stored_objects(fleet)) == 2  # one staged chunk: its chunk and its metadata
    engine = service(fleet).engine
    async with engine.begin() as connection:
        await connection.execute(update(uploads).values(touched_at=utcnow() - timedelta(hours=2)))
    await service(fleet).sweep()
    with pytest.raises(NotFound, match="abandoned after 1 h"):
        await admin.request(UploadChunk(upload_id=begun.upload_id, offset=5, data=b"56789"))
    assert await stored_objects(fleet) == {}


USES_STORAGE = """
import hashlib
import os
from herder.robot import sdk

def main():
    bucket = sdk.storage("shared")
    here = os.path.join(os.environ["HERDER_JOB_DIR"], "input.xlsx")
    got = bucket.get("in/input.xlsx", here)
    with open(here, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    report = os.path.join(os.environ["HERDER_JOB_DIR"], "report.txt")
    with open(report, "w") as handle:
        handle.write("done: " + digest)
    put = bucket.put("out/report.txt", report)
    listed = [f["path"] for f in bucket.list("out/")]
    try:
        sdk.storage("secret").list()
    except sdk.CallError as exc:
        refused = exc.code
    return {"digest": digest, "got": got["sha256"], "put": put["path"], "listed": listed, "refused": refused}
"""


async def test_a_job_reads_and_writes_files_through_its_sdk(fleet: Fleet, tmp_path: Path) -> None:
    admin = fleet.client
    await admin.request(BucketCreate(name="shared", robot_groups=["finance"]))
    await admin.request(BucketCreate(name="secret", robots=["someone-else"]))
    source = tmp_path / "input.xlsx"
    sha256 = random_file(source, 3 * MIB)
    await storage.upload(admin, "shared", "in/input.xlsx", source)
    await fleet.publish(python_process(tmp_path, "uses-storage", USES_STORAGE))
    agent = fleet.start_robot("r1", await fleet.add_robot("r1", groups=["finance"]))
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, agent=agent)
    job = await fleet.client.request(JobStart(process="uses-storage", robot="r1"))
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL, JobState.FAULTED, timeout=60.0)
    assert done.state is JobState.SUCCESSFUL, (done.reason, done.error)
    assert done.output == {
        "digest": sha256,
        "got": sha256,
        "put": "out/report.txt",
        "listed": ["out/report.txt"],
        "refused": "forbidden",
    }
    back = tmp_path / "report.txt"
    info = await storage.download(admin, "shared", "out/report.txt", back)
    assert back.read_text() == f"done: {sha256}" and info.updated_by == "r1"
