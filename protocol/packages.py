"""Messages of the `packages` service: processes (automation scripts) and their immutable versions.

A process is a folder with a manifest, `herder.toml`, naming the process, its version and its
entry point. Publishing packs the folder into an archive, stores it in the tenant's JetStream object
store (bucket `HERDER_PACKAGES_<tenant>`, named by its sha256), and records the version with that hash.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints

from herder.protocol.errors import Conflict
from herder.protocol.messages import Creating, EventData, Model, Request, matching
from herder.protocol.values import SafeText

SERVICE = "packages"
MANIFEST = "herder.toml"

PROCESS_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
VERSION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}"
ProcessName = Annotated[
    str,
    matching(PROCESS_NAME_PATTERN, "must be 1 to 64 letters, digits, '-' or '_', starting with a letter or digit"),
]
Version = Annotated[
    str,
    matching(VERSION_PATTERN, "must be 1 to 64 letters, digits, '.', '+', '-' or '_', starting with a letter or digit"),
]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class EntryKind(StrEnum):
    """How a package version is run."""

    PYTHON = "python"  # a callable, `module:function`, run by herder's Python
    COMMAND = "command"  # a command line, run as it is, from the package folder
    ROBOT = "robot"  # a Robot Framework suite (file or folder), run with the `robot` runner


class EntryPoint(Model):
    """What to run in an unpacked package: a callable, a command line (its words), or a suite."""

    kind: EntryKind
    target: SafeText = Field(min_length=1, max_length=1024)
    args: list[SafeText] = Field(default_factory=list, max_length=256)

    def describe(self) -> str:
        """The entry point as people read it."""
        words = " ".join([self.target, *self.args]) if self.kind is EntryKind.COMMAND else self.target
        return f"{self.kind.value}: {words}"


class PackageRef(Model):
    """Everything a robot needs to fetch, check and run one package version."""

    process: str
    version: str
    sha256: Sha256
    size: int
    object: str  # the archive's name in the tenant's object store (its sha256)
    entry: EntryPoint


class VersionInfo(Model):
    """One published version of a process."""

    process: str
    version: str
    sha256: str
    size: int
    entry: EntryPoint
    description: str = ""
    published_at: datetime
    published_by: str | None = None


class ProcessInfo(Model):
    """A process and its newest version."""

    name: str
    latest: str
    versions: int
    description: str = ""
    updated_at: datetime


class PackagePublish(Creating, Request[VersionInfo]):
    """Record a version whose archive is already in the tenant's object store, named by its sha256.

    Versions are immutable: publishing one that exists is refused with `conflict`."""

    service = SERVICE
    verb = "publish"

    process: ProcessName
    version: Version
    sha256: Sha256
    size: int = Field(ge=1)
    entry: EntryPoint
    description: SafeText = Field("", max_length=1000)


class ProcessList(Model):
    """The reply to `list`."""

    processes: list[ProcessInfo]


class ProcessListRequest(Request[ProcessList]):
    """List the tenant's processes."""

    service = SERVICE
    verb = "list"


class VersionList(Model):
    """The reply to `versions`, newest first."""

    process: str
    versions: list[VersionInfo]


class VersionListRequest(Request[VersionList]):
    """List the versions of one process."""

    service = SERVICE
    verb = "versions"

    process: ProcessName


class PackageResolve(Request[PackageRef]):
    """The package of a process at a version, or at its newest version when none is given."""

    service = SERVICE
    verb = "resolve"

    process: ProcessName
    version: Version | None = None


def already_published(process: str, version: str) -> Conflict:
    """The error for publishing a version that exists (the CLI checks before uploading; the service again)."""
    return Conflict(f"{process} {version} is already published; versions are immutable, publish a new version")


class VersionPublishedEvent(EventData):
    """A process version was published."""

    event_type: ClassVar[str] = "packages.version_published"

    process: str
    version: str
    sha256: str
    size: int


__all__ = [
    "MANIFEST",
    "SERVICE",
    "EntryKind",
    "EntryPoint",
    "PackagePublish",
    "PackageRef",
    "PackageResolve",
    "ProcessInfo",
    "ProcessList",
    "ProcessListRequest",
    "ProcessName",
    "Sha256",
    "Version",
    "VersionInfo",
    "VersionList",
    "VersionListRequest",
    "VersionPublishedEvent",
    "already_published",
]
