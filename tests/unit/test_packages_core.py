"""The packages service's pure decisions: archive checks, latest versions, lookups, summaries."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from herder.packaging.archive import object_digest
from herder.protocol.errors import BadRequest, NotFound
from herder.protocol.packages import EntryKind, EntryPoint
from herder.services.packages.core import (
    VersionRecord,
    check_archive,
    newest_first,
    pick,
    summarise,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ENTRY = EntryPoint(kind=EntryKind.ROBOT, target="tasks.robot")


def record(process: str, version: str, minutes: int = 0, description: str = "") -> VersionRecord:
    return VersionRecord(
        id=f"{process}-{version}",
        tenant="default",
        process=process,
        version=version,
        sha256="a" * 64,
        size=10,
        entry=ENTRY,
        published_at=T0 + timedelta(minutes=minutes),
        description=description,
    )


def test_the_digest_is_the_one_the_object_store_writes() -> None:
    data = b"archive bytes"
    sha256 = hashlib.sha256(data).hexdigest()
    # nats-py (like the Go client) writes "SHA-256=" and the base64url of the raw digest.
    assert object_digest(sha256) == "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    check_archive(tenant="default", sha256=sha256, size=13, stored_size=13, stored_digest=object_digest(sha256))
    # The prefix is matched whatever its case, as nats-py reads it.
    lower = "sha-256=" + object_digest(sha256).removeprefix("SHA-256=")
    check_archive(tenant="default", sha256=sha256, size=13, stored_size=13, stored_digest=lower)


@pytest.mark.parametrize(
    ("stored_size", "stored_digest", "message"),
    [
        (12, None, "holds 12 bytes, not the 13 the request says"),
        (13, object_digest("b" * 64), f"has sha256 {'b' * 64}, not the sha256 the request names"),
        (13, "SHA-256=not base64!", "has digest 'SHA-256=not base64!'"),
        (13, "MD5=abc", "has digest 'MD5=abc'"),
        (13, None, "has digest None"),
    ],
)
def test_an_archive_that_does_not_match_is_refused(stored_size: int, stored_digest: str | None, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_archive(tenant="t", sha256="a" * 64, size=13, stored_size=stored_size, stored_digest=stored_digest)


def test_pick_finds_a_version_or_the_newest_or_says_what_there_is() -> None:
    records = [record("hello", v) for v in ("1.9.0", "1.10.0", "1.10.0-rc1")]
    assert pick(records, "hello", None).version == "1.10.0"
    assert pick(records, "hello", "1.9.0").version == "1.9.0"
    with pytest.raises(NotFound, match=r"^no process named 'hello'$"):
        pick([], "hello", None)
    with pytest.raises(NotFound) as caught:
        pick(records, "hello", "2.0")
    assert caught.value.message == "process 'hello' has no version '2.0'; it has 1.9.0, 1.10.0-rc1, 1.10.0"
    many = [record("hello", f"1.{minor}") for minor in range(12)]
    with pytest.raises(NotFound) as crowded:
        pick(many, "hello", "2.0")
    assert crowded.value.message == (
        "process 'hello' has no version '2.0'; it has 12 versions, the newest 1.11 "
        "('herder package versions hello' lists them)"
    )


def test_summaries_name_the_newest_version_and_the_last_change() -> None:
    records = [
        record("b", "2.0.0-rc1", minutes=5, description="candidate"),
        record("b", "1.0", minutes=1, description="stable"),
        record("a", "0.1", minutes=3, description="alpha"),
        record("b", "1.1", minutes=2, description="newest"),
    ]
    summary = summarise(records)
    assert [(p.name, p.latest, p.versions, p.description, p.updated_at) for p in summary] == [
        ("a", "0.1", 1, "alpha", T0 + timedelta(minutes=3)),
        ("b", "2.0.0-rc1", 3, "candidate", T0 + timedelta(minutes=5)),
    ]
    assert [r.version for r in newest_first(records)] == ["2.0.0-rc1", "1.1", "1.0", "0.1"]
    assert summarise([]) == []


def test_a_record_reads_as_a_version_and_as_a_package_ref() -> None:
    one = record("hello", "1.0")
    assert one.info().entry == ENTRY and one.info().published_at == T0
    ref = one.ref()
    assert (ref.object, ref.sha256, ref.size, ref.entry) == ("a" * 64, "a" * 64, 10, ENTRY)
