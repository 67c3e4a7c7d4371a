"""The robot's package cache: each package version downloaded once, checked against its hash, unpacked once.

Packages are content-addressed, so the cache is a folder of folders named by sha256:

    <root>/<sha256>/         an unpacked package, complete: it appears by an atomic rename
    <root>/.fetch-<random>/  a download or unpacking under way (or left by a crash)

A package whose bytes do not hash to what the packages service published is refused with
`PackageHashMismatch` before anything of it is unpacked, let alone run; one that unpacks to more
than the robot's limits is refused with `PackageTooLarge` as it is unpacked, before anything is
written past them, and nothing of it is kept. The unpacked folders are
shared by every job of that version: the runner makes them the jobs' working directory and herder
never writes to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from herder.packaging.archive import MAX_UNPACKED_BYTES, MAX_UNPACKED_FILES, ArchiveTooLarge, unpack
from herder.protocol import subjects
from herder.protocol.errors import BadRequest, ErrorCode, HerderError
from herder.protocol.packages import PackageRef

# A download that makes no progress must not hold a job forever; 256 MiB needs far less.
DOWNLOAD_TIMEOUT_S = 600.0
ARCHIVE_FILE = "package.tar.gz"
UNPACKED_DIR = "package"
SCRATCH_PREFIX = ".fetch-"


class PackageFetchError(HerderError):
    """The package could not be fetched; the message says why in one line."""

    code = ErrorCode.UNAVAILABLE


class PackageMissing(PackageFetchError):
    """The package is not in the object store."""

    code = ErrorCode.NOT_FOUND


class PackageHashMismatch(PackageFetchError):
    """The bytes in the object store are not the package that was published; nothing of them is used."""

    code = ErrorCode.CONFLICT


class PackageTooLarge(PackageFetchError):
    """The package unpacks to more than this robot allows; nothing of it is kept."""

    code = ErrorCode.BAD_REQUEST

    def __init__(self, ref: PackageRef, cause: ArchiveTooLarge) -> None:
        if cause.unit == "bytes":
            fix = "raise the limit with 'herder robot run --max-package-size SIZE'"
        else:
            fix = "pack fewer files into the process folder"
        super().__init__(f"package {_name(ref)} {cause.overrun}; {fix}", details=cause.details)
        self.limit = cause.limit
        self.unit = cause.unit


class PackageCache:
    """Packages fetched from the HERDER_PACKAGES object store and kept unpacked under `root`.

    A package is refused once it would unpack to more than `max_unpacked_bytes` of files or more
    than `max_unpacked_files` files, folders and links.
    """

    def __init__(
        self,
        root: Path,
        js: JetStreamContext,
        tenant: str,
        *,
        max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
        max_unpacked_files: int = MAX_UNPACKED_FILES,
    ) -> None:
        self.root = root
        self.max_unpacked_bytes = max_unpacked_bytes
        self.max_unpacked_files = max_unpacked_files
        self._js = js
        self._bucket = subjects.packages_bucket(tenant)
        # One download per hash at a time: later callers wait for the first.
        self._fetching: dict[str, asyncio.Future[Path]] = {}

    def path_of(self, sha256: str) -> Path:
        """Where the package with this hash is (or will be) unpacked."""
        return self.root / sha256

    async def fetch(self, ref: PackageRef) -> Path:
        """The unpacked folder of `ref`, downloaded and checked first unless it is cached already.

        `PackageHashMismatch` if the stored bytes are not the published package, `PackageMissing`
        if there are none, `PackageTooLarge` if it unpacks past the limits, `PackageFetchError` for
        any other failure.
        """
        folder = self.path_of(ref.sha256)
        if folder.is_dir():
            return folder
        fetching = self._fetching.get(ref.sha256)
        if fetching is None:
            fetching = asyncio.ensure_future(self._fetch(ref))
            self._fetching[ref.sha256] = fetching
            fetching.add_done_callback(lambda done: self._settled(ref.sha256, done))
        # A caller that gives up does not cancel the download others wait for.
        return await asyncio.shield(fetching)

    def _settled(self, sha256: str, done: asyncio.Future[Path]) -> None:
        self._fetching.pop(sha256, None)
        if not done.cancelled():
            done.exception()  # seen by every waiter; marked as retrieved when none is left

    async def _fetch(self, ref: PackageRef) -> Path:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self.root))
        try:
            archive = scratch / ARCHIVE_FILE
            await self._download(ref, archive)
            unpacked = scratch / UNPACKED_DIR
            await asyncio.to_thread(
                _check_and_unpack,
                archive,
                ref,
                unpacked,
                max_bytes=self.max_unpacked_bytes,
                max_files=self.max_unpacked_files,
            )
            folder = self.path_of(ref.sha256)
            try:
                os.rename(unpacked, folder)
            except OSError as exc:
                if not folder.is_dir():  # else another agent sharing the cache got there first
                    raise PackageFetchError(f"cannot keep package {_name(ref)} in {self.root}: {exc}") from None
            return folder
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)

    def _missing(self, ref: PackageRef) -> PackageMissing:
        return PackageMissing(f"package {_name(ref)} is not in the object store {self._bucket} (object {ref.object})")

    async def _download(self, ref: PackageRef, archive: Path) -> None:
        try:
            store = await self._js.object_store(self._bucket)
            info = await store.get_info(ref.object)
        except nats.js.errors.BucketNotFoundError:
            raise PackageMissing(
                f"package {_name(ref)} is not in the object store: there is no bucket {self._bucket}"
            ) from None
        except nats.js.errors.NotFoundError:
            raise self._missing(ref) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise PackageFetchError(f"cannot look up package {_name(ref)}: {_describe(exc)}") from None
        if info.size != ref.size:
            # Checked before downloading: a wrong size cannot be the right bytes.
            raise PackageHashMismatch(
                f"package hash mismatch: {_name(ref)} is {info.size} bytes in the object store, "
                f"{ref.size} were published; nothing was unpacked"
            )
        if not info.nuid:
            raise self._missing(ref)
        try:
            async with asyncio.timeout(DOWNLOAD_TIMEOUT_S):
                await self._read_chunks(info.nuid, archive)
        except nats.js.errors.NotFoundError:
            raise self._missing(ref) from None
        except TimeoutError:
            raise PackageFetchError(
                f"package {_name(ref)} was not downloaded within {DOWNLOAD_TIMEOUT_S:g} s"
            ) from None
        except nats.errors.Error as exc:
            raise PackageFetchError(f"cannot download package {_name(ref)}: {_describe(exc)}") from None

    async def _read_chunks(self, nuid: str, archive: Path) -> None:
        """Write an object's chunks to `archive`, in order. Read through a consumer of the object store's
        stream named as such, so the robot never has to look streams up (the fence lets it read its
        tenant's packages and nothing else); the archive's sha256 is checked once it is all here."""
        subscription = await self._js.subscribe(
            subjects.object_chunks(self._bucket, nuid),
            stream=subjects.object_store_stream(self._bucket),
            ordered_consumer=True,
        )
        try:
            with archive.open("wb") as handle:
                async for msg in subscription.messages:
                    await asyncio.to_thread(handle.write, msg.data)
                    if msg.metadata.num_pending == 0:
                        break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()


def _check_and_unpack(archive: Path, ref: PackageRef, target: Path, *, max_bytes: int, max_files: int) -> None:
    """Unpack `archive` into `target` if it is the published package; `PackageHashMismatch` if not,
    `PackageTooLarge` if it unpacks past the limits."""
    data = archive.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != ref.size or digest != ref.sha256:
        raise PackageHashMismatch(
            f"package hash mismatch: {_name(ref)} downloaded as sha256 {digest}, "
            f"{ref.sha256} was published; nothing was unpacked"
        )
    try:
        unpack(data, target, max_bytes=max_bytes, max_files=max_files)
    except ArchiveTooLarge as exc:
        raise PackageTooLarge(ref, exc) from None
    except BadRequest as exc:
        raise PackageFetchError(f"package {_name(ref)}: {exc.message}") from None


def _name(ref: PackageRef) -> str:
    return f"{ref.process} {ref.version}"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().removeprefix("nats: ")
    return text or type(exc).__name__
