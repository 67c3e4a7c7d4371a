"""`herder package publish|list|versions`: processes and their versions.

It checks manifests and packs archives with `herder.packaging`, and uploads them to the tenant's
object store before asking the packages service to record the version.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import nats.errors
import typer
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError

from herder.cli.context import (
    BundleOption,
    DataDirOption,
    JsonOption,
    Target,
    TokenFileOption,
    UrlOption,
    call,
    connected,
    resolve,
)
from herder.cli.output import Column, WideOption, print_json, print_table, run, when
from herder.client.connection import refused
from herder.client.requests import Client
from herder.packaging.archive import object_digest, pack, sha256_hex
from herder.packaging.manifest import Manifest, check_name, load_manifest
from herder.protocol.auth import Permission, WhoAmI
from herder.protocol.errors import Forbidden, NotFound, Unavailable
from herder.protocol.packages import (
    PackagePublish,
    ProcessListRequest,
    VersionInfo,
    VersionListRequest,
    already_published,
)
from herder.protocol.subjects import packages_bucket

# Uploads larger than this show their progress on stderr.
PROGRESS_MIN_BYTES = 1024 * 1024
SHORT_SHA_CHARS = 12
# `package list` on a narrow terminal: UPDATED goes first, then VERSIONS; DESCRIPTION is cut to the room
# left; NAME and LATEST are always whole.
PROCESS_COLUMNS = (
    Column("NAME"),
    Column("LATEST"),
    Column("VERSIONS", drop=2),
    Column("UPDATED (UTC)", drop=1),
    Column("DESCRIPTION", cut=True, min_width=20),
)

package_app = typer.Typer(help="Processes (automation scripts) and their versions.", no_args_is_help=True)


def human_size(size: int) -> str:
    """A byte count as people read it: 512 B, 12.3 KiB, 4.0 MiB."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def short_sha(sha256: str) -> str:
    """The first digits of a sha256, enough to tell archives apart in a table."""
    return sha256[:SHORT_SHA_CHARS] + "…"


class _Progress(io.BytesIO):
    """The archive as the object store reads it, drawing how much has gone on stderr.

    nats-py reads it chunk by chunk from a worker thread; printing from there is fine."""

    def __init__(self, data: bytes, label: str, stream: TextIO) -> None:
        super().__init__(data)
        self._total = len(data)
        self._label = label
        self._stream = stream
        self._live = stream.isatty()
        self._sent = 0
        self._shown = -1
        if not self._live:  # a log file gets one line, not a line per chunk
            print(f"uploading {label} ({human_size(self._total)})", file=stream, flush=True)

    def readinto(self, buffer: Any) -> int:
        read = super().readinto(buffer)
        self._sent += read
        percent = self._sent * 100 // max(self._total, 1)
        if self._live and percent != self._shown:
            self._shown = percent
            end = "\n" if self._sent >= self._total else ""
            print(
                f"\ruploading {self._label}: {human_size(self._sent)} of {human_size(self._total)} ({percent}%)",
                end=end,
                file=self._stream,
                flush=True,
            )
        return read


async def _refuse_forbidden(client: Client) -> None:
    """Refuse a caller whose role may not publish before uploading anything: the bus would refuse the
    upload itself (only roles that publish packages may write archives), and the service the version."""
    principal = await client.request(WhoAmI())
    if not principal.can(Permission.PACKAGES_PUBLISH):
        raise Forbidden(f"role '{principal.role}' lacks the permission '{Permission.PACKAGES_PUBLISH}'")


async def _refuse_published(client: Client, manifest: Manifest) -> None:
    """Refuse a version that exists before uploading anything (the service refuses it too)."""
    try:
        listed = await client.request(VersionListRequest(process=manifest.name))
    except NotFound:
        return  # a new process
    if any(info.version == manifest.version for info in listed.versions):
        raise already_published(manifest.name, manifest.version)


async def upload(nc: NATS, tenant: str, archive: bytes, sha256: str, *, label: str) -> bool:
    """Put an archive in the tenant's packages object store, named by its sha256; False when it was
    there already."""
    bucket = packages_bucket(tenant)
    try:
        store = await nc.jetstream().object_store(bucket)
    except BucketNotFoundError:
        raise Unavailable("the packages service has not run on this stack yet; start it with 'herder up'") from None
    try:
        stored = await store.get_info(sha256)
        # Content-addressed: the same name with the same digest is the same archive.
        if stored.size == len(archive) and stored.digest == object_digest(sha256):
            return False
    except ObjectNotFoundError:
        pass
    data = _Progress(archive, label, sys.stderr) if len(archive) > PROGRESS_MIN_BYTES else io.BytesIO(archive)
    try:
        await store.put(sha256, data)
    except nats.errors.TimeoutError:
        if refused(nc, f"$O.{bucket}.", prefix=True):
            raise Forbidden(f"the bus refused the upload to {bucket}: this token may not publish packages") from None
        raise Unavailable(
            f"uploading {label} to the {bucket} object store timed out; JetStream may be overloaded"
        ) from None
    return True


async def publish_archive(nc: NATS, client: Client, manifest: Manifest, archive: bytes) -> VersionInfo:
    """Publish a packed process folder as `manifest` says: refuse an existing version before
    uploading, upload the archive under its sha256, then record the version."""
    await _refuse_forbidden(client)
    await _refuse_published(client, manifest)
    sha256 = sha256_hex(archive)
    label = f"{manifest.name} {manifest.version}"
    await upload(nc, client.tenant, archive, sha256, label=label)
    return await client.request(
        PackagePublish(
            process=manifest.name,
            version=manifest.version,
            sha256=sha256,
            size=len(archive),
            entry=manifest.entry,
            description=manifest.description,
        )
    )


async def publish_folder(nc: NATS, client: Client, folder: Path, *, version: str | None = None) -> VersionInfo:
    """Check, pack and publish a process folder (as `version`, when given, instead of the manifest's)."""
    manifest = load_manifest(folder)
    if version is not None:
        manifest = manifest.with_version(version)
    return await publish_archive(nc, client, manifest, pack(folder))


async def _publish(target: Target, manifest: Manifest, archive: bytes) -> VersionInfo:
    async with connected(target, "herder-cli") as nc:
        return await publish_archive(nc, Client(nc, token=target.token, tenant=target.tenant), manifest, archive)


@package_app.command("publish")
def publish(
    folder: Annotated[Path, typer.Argument(help="The process folder, holding herder.toml.", show_default=False)],
    version: Annotated[
        str | None, typer.Option("--version", help="Publish as this version instead of the manifest's.")
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Publish a process folder as a new version (versions never change once published).

    The folder needs a manifest, herder.toml:

    \b
        name = "hello"
        version = "1.0.0"
        description = "Greets whoever the input names"   # optional
        \\[entry]
        python = "hello:main"          # a callable, module:function
        # or: command = ["bash", "run.sh", "--fast"]
        # or: robot = "hello.robot"    (a suite file or folder)
    """
    manifest = load_manifest(folder)
    if version is not None:
        manifest = manifest.with_version(version)
    target = resolve(data_dir, url, token_file, bundle)
    archive = pack(folder)  # packed before connecting: a folder that cannot be packed fails at once
    published = run(lambda: _publish(target, manifest, archive))
    if json_out:
        print_json(published)
        return
    print(
        f"published {published.process} {published.version} "
        f"({human_size(published.size)}, sha256 {short_sha(published.sha256)})"
    )


@package_app.command("list")
def list_processes(
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the processes, each with its newest version."""
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(ProcessListRequest()))
    if json_out:
        print_json(listed.processes)
        return
    if not listed.processes:
        print("no processes yet; publish one with 'herder package publish DIR'", file=sys.stderr)
        return
    rows = [(p.name, p.latest, p.versions, when(p.updated_at), p.description) for p in listed.processes]
    print_table(PROCESS_COLUMNS, rows, wide=wide)


@package_app.command("versions")
def list_versions(
    name: Annotated[str, typer.Argument(help="The process.", show_default=False)],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the versions of a process, newest first."""
    check_name(name, what="the process name")
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(VersionListRequest(process=name)))
    if json_out:
        print_json(listed.versions)
        return
    rows = [
        (
            v.version,
            when(v.published_at),
            v.published_by,
            human_size(v.size),
            short_sha(v.sha256),
            v.entry.describe(),
        )
        for v in listed.versions
    ]
    print_table(["VERSION", "PUBLISHED (UTC)", "BY", "SIZE", "SHA256", "ENTRY"], rows)
