"""The packages service's decisions, free of I/O: versions as records, archive checks, latest, lookups."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from herder.packaging import versions
from herder.packaging.archive import DIGEST_PREFIX
from herder.protocol.errors import BadRequest, NotFound
from herder.protocol.packages import EntryPoint, PackageRef, ProcessInfo, VersionInfo
from herder.protocol.subjects import packages_bucket

# A not-found message lists a process's versions when it has no more than this many.
LISTED_VERSIONS = 10


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One row of `packages_versions`: a published, immutable version of a process."""

    id: str
    tenant: str
    process: str
    version: str
    sha256: str
    size: int
    entry: EntryPoint
    published_at: datetime
    description: str = ""
    published_by: str | None = None

    def info(self) -> VersionInfo:
        """The version as listed."""
        return VersionInfo(
            process=self.process,
            version=self.version,
            sha256=self.sha256,
            size=self.size,
            entry=self.entry,
            description=self.description,
            published_at=self.published_at,
            published_by=self.published_by,
        )

    def ref(self) -> PackageRef:
        """What a robot needs to fetch, check and run it."""
        return PackageRef(
            process=self.process,
            version=self.version,
            sha256=self.sha256,
            size=self.size,
            object=self.sha256,
            entry=self.entry,
        )


def no_process(process: str) -> NotFound:
    """The error for a process with no versions."""
    return NotFound(f"no process named {process!r}")


def _digest_hex(digest: str | None) -> str | None:
    """The sha256, as hex, of an object store digest; None when it is not one."""
    if not digest or digest[: len(DIGEST_PREFIX)].upper() != DIGEST_PREFIX.upper():
        return None
    try:
        raw = base64.urlsafe_b64decode(digest[len(DIGEST_PREFIX) :])
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def check_archive(*, tenant: str, sha256: str, size: int, stored_size: int | None, stored_digest: str | None) -> None:
    """Refuse to publish unless the stored archive has the size and the sha256 the request names."""
    bucket = packages_bucket(tenant)
    if stored_size != size:
        raise BadRequest(f"the archive {sha256} in {bucket} holds {stored_size} bytes, not the {size} the request says")
    stored_sha = _digest_hex(stored_digest)
    if stored_sha != sha256:
        found = f"sha256 {stored_sha}" if stored_sha else f"digest {stored_digest!r}"
        raise BadRequest(
            f"the archive {sha256} in {bucket} has {found}, not the sha256 the request names; upload it again"
        )


def missing_archive(tenant: str, sha256: str) -> BadRequest:
    """The error for publishing a version whose archive was never uploaded."""
    return BadRequest(
        f"no archive {sha256} in the {packages_bucket(tenant)} object store; "
        "upload the archive before publishing its version"
    )


def newest_first(records: Iterable[VersionRecord]) -> list[VersionRecord]:
    """Versions of one process, newest first."""
    return sorted(records, key=lambda record: versions.version_key(record.version), reverse=True)


def pick(records: Sequence[VersionRecord], process: str, version: str | None) -> VersionRecord:
    """The record of `version` (the newest when None) among a process's records, or `NotFound`."""
    if not records:
        raise no_process(process)
    if version is None:
        return newest_first(records)[0]
    for record in records:
        if record.version == version:
            return record
    raise NotFound(f"process {process!r} has no version {version!r}; {_what_it_has(process, records)}")


def _what_it_has(process: str, records: Sequence[VersionRecord]) -> str:
    ordered = [record.version for record in reversed(newest_first(records))]
    if len(ordered) <= LISTED_VERSIONS:
        return f"it has {', '.join(ordered)}"
    return f"it has {len(ordered)} versions, the newest {ordered[-1]} ('herder package versions {process}' lists them)"


def summarise(records: Iterable[VersionRecord]) -> list[ProcessInfo]:
    """One line per process, by name: its newest version, how many it has, when it last changed."""
    by_process: dict[str, list[VersionRecord]] = {}
    for record in records:
        by_process.setdefault(record.process, []).append(record)
    summary = []
    for process in sorted(by_process):
        group = by_process[process]
        latest = newest_first(group)[0]
        summary.append(
            ProcessInfo(
                name=process,
                latest=latest.version,
                versions=len(group),
                description=latest.description,
                updated_at=max(record.published_at for record in group),
            )
        )
    return summary
