"""`herder storage`: buckets of files robots and people share, and the files in them.

    herder storage bucket-create finance --max-file 50MiB --group finance
    herder storage put finance/in/invoices.xlsx ./invoices.xlsx
    herder storage list finance/in/
    herder storage get finance/out/report.pdf
    herder storage rm finance/in/invoices.xlsx

A file is named `BUCKET/PATH`, its path relative and `/`-separated. Files go in and out in chunks
through the storage service, checked against their sha256 on both ends; a download lands in a
temporary file beside the target and is renamed into place once whole.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from herder.cli.context import BundleOption, DataDirOption, JsonOption, TokenFileOption, UrlOption, call, resolve
from herder.cli.output import EXIT_USAGE, Column, WideOption, fail, parse_size, print_json, print_table, when
from herder.cli.packages import human_size, short_sha
from herder.client import storage
from herder.client.requests import Client
from herder.protocol.storage import (
    DEFAULT_MAX_BUCKET_BYTES,
    DEFAULT_MAX_FILE_BYTES,
    BucketCreate,
    BucketDelete,
    BucketInfo,
    BucketListRequest,
    BucketUpdate,
    FileDelete,
    FileInfo,
    FileList,
    FileListRequest,
)

storage_app = typer.Typer(
    help="Storage buckets: files robots and people share (an input spreadsheet, a report for the next process).",
    no_args_is_help=True,
)

# Transfers of at least this many bytes show a progress bar on a terminal.
PROGRESS_MIN_BYTES = 1024 * 1024

BUCKET_COLUMNS = (
    Column("NAME"),
    Column("FILES"),
    Column("USED"),
    Column("MAX FILE", drop=2),
    Column("MAX BUCKET", drop=3),
    Column("ROBOTS", cut=True, min_width=12),
    Column("DESCRIPTION", cut=True, min_width=12, drop=1),
)
FILE_COLUMNS = (
    Column("PATH", cut=True, min_width=20),
    Column("SIZE"),
    Column("UPDATED (UTC)", drop=2),
    Column("BY", drop=1),
    Column("SHA256", drop=0),
)

NameArgument = Annotated[str, typer.Argument(help="The bucket's name.")]
MaxFileOption = Annotated[
    str | None, typer.Option("--max-file", help="The largest file the bucket takes, like 100MiB (default 100MiB).")
]
MaxBucketOption = Annotated[
    str | None, typer.Option("--max-bucket", help="What the bucket may hold in all, like 1GiB (default 1GiB).")
]
RobotOption = Annotated[
    list[str] | None,
    typer.Option("--robot", help="Only this robot may use the bucket; repeat for several (with --group: either)."),
]
GroupOption = Annotated[
    list[str] | None,
    typer.Option("--group", help="Only robots of this group may use the bucket; repeat for several."),
]
DescriptionOption = Annotated[str | None, typer.Option("--description", help="What the bucket is for.")]


def split_name(text: str, *, what: str) -> tuple[str, str]:
    """`BUCKET/PATH` as (bucket, path); the path may be empty (`BUCKET` or `BUCKET/`)."""
    bucket, _, path = text.partition("/")
    if not bucket:
        fail(f"{what} {text!r} names no bucket; write it BUCKET/PATH, like finance/in/invoices.xlsx", EXIT_USAGE)
    return bucket, path


def _file_name(text: str) -> tuple[str, str]:
    bucket, path = split_name(text, what="BUCKET/PATH")
    if not path:
        fail(f"BUCKET/PATH {text!r} names no file; write it BUCKET/PATH, like {bucket}/in/invoices.xlsx", EXIT_USAGE)
    return bucket, path


def _sizes(max_file: str | None, max_bucket: str | None) -> tuple[int | None, int | None]:
    return (
        parse_size(max_file, what="--max-file") if max_file is not None else None,
        parse_size(max_bucket, what="--max-bucket") if max_bucket is not None else None,
    )


def _who(bucket: BucketInfo) -> str:
    parts = [f"group {', '.join(bucket.robot_groups)}"] if bucket.robot_groups else []
    if bucket.robots:
        parts.append(", ".join(bucket.robots))
    return "; ".join(parts) or "any robot"


@storage_app.command("bucket-create")
def bucket_create(
    name: NameArgument,
    max_file: MaxFileOption = None,
    max_bucket: MaxBucketOption = None,
    robots: RobotOption = None,
    groups: GroupOption = None,
    description: DescriptionOption = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a bucket; without --robot or --group, every robot of the tenant may use it."""
    max_file_bytes, max_bucket_bytes = _sizes(max_file, max_bucket)
    max_bucket_bytes = max_bucket_bytes or DEFAULT_MAX_BUCKET_BYTES
    # A small bucket given alone takes files as large as itself.
    max_file_bytes = max_file_bytes or min(DEFAULT_MAX_FILE_BYTES, max_bucket_bytes)
    request = BucketCreate(
        name=name,
        description=description or "",
        max_file_bytes=max_file_bytes,
        max_bucket_bytes=max_bucket_bytes,
        robots=list(robots or []),
        robot_groups=list(groups or []),
    )
    created = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(request))
    if json_out:
        print_json(created)
        return
    print(
        f"created bucket {created.name} (files up to {human_size(created.max_file_bytes)}, "
        f"{human_size(created.max_bucket_bytes)} in all; {_who(created)})"
    )


@storage_app.command("bucket-update")
def bucket_update(
    name: NameArgument,
    max_file: MaxFileOption = None,
    max_bucket: MaxBucketOption = None,
    robots: RobotOption = None,
    groups: GroupOption = None,
    any_robot: Annotated[
        bool, typer.Option("--any-robot", help="Let every robot of the tenant use the bucket (clears its lists).")
    ] = False,
    description: DescriptionOption = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change a bucket's limits, who may use it, or its description; what is not given stays."""
    if any_robot and (robots or groups):
        fail("give --any-robot, or --robot and --group, not both", EXIT_USAGE)
    max_file_bytes, max_bucket_bytes = _sizes(max_file, max_bucket)
    request = BucketUpdate(
        name=name,
        description=description,
        max_file_bytes=max_file_bytes,
        max_bucket_bytes=max_bucket_bytes,
        robots=[] if any_robot else (list(robots) if robots else None),
        robot_groups=[] if any_robot else (list(groups) if groups else None),
    )
    updated = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(request))
    if json_out:
        print_json(updated)
        return
    print(
        f"bucket {updated.name}: files up to {human_size(updated.max_file_bytes)}, "
        f"{human_size(updated.max_bucket_bytes)} in all; {_who(updated)}"
    )


@storage_app.command("buckets")
def buckets(
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """The buckets, by name, with what each holds and who may use it."""
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(BucketListRequest()))
    if json_out:
        print_json(listed.buckets)
        return
    if not listed.buckets:
        print("no buckets yet; create one with 'herder storage bucket-create NAME'", file=sys.stderr)
        return
    rows = [
        [
            bucket.name,
            bucket.file_count,
            human_size(bucket.used_bytes),
            human_size(bucket.max_file_bytes),
            human_size(bucket.max_bucket_bytes),
            _who(bucket),
            bucket.description,
        ]
        for bucket in listed.buckets
    ]
    print_table(BUCKET_COLUMNS, rows, wide=wide)


@storage_app.command("bucket-delete")
def bucket_delete(
    name: NameArgument,
    force: Annotated[bool, typer.Option("--force", help="Delete the bucket's files with it.")] = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Delete a bucket; one that holds files only with --force, and its files with it."""
    deleted = call(
        resolve(data_dir, url, token_file, bundle), lambda c: c.request(BucketDelete(name=name, force=force))
    )
    if json_out:
        print_json(deleted)
        return
    files = f" and its {deleted.file_count} files ({human_size(deleted.used_bytes)})" if deleted.file_count else ""
    print(f"deleted bucket {deleted.name}{files}")


@storage_app.command("put")
def put(
    destination: Annotated[
        str,
        typer.Argument(
            metavar="BUCKET/PATH",
            help="Where the file goes, like finance/in/invoices.xlsx; a path ending in '/' (or none) takes the "
            "local file's name.",
        ),
    ],
    local_file: Annotated[Path, typer.Argument(help="The local file to upload.", show_default=False)],
    content_type: Annotated[
        str | None, typer.Option("--content-type", help="Its media type (default: guessed from its name).")
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Upload a local file to a bucket, replacing the file there; nothing is stored unless it arrives whole."""
    bucket, path = split_name(destination, what="BUCKET/PATH")
    if not path or path.endswith("/"):
        path += local_file.name
    if not local_file.is_file():
        fail(f"{local_file} is not a file; give the local file to upload")
    size = local_file.stat().st_size
    target = resolve(data_dir, url, token_file, bundle)
    with _Bar(f"{bucket}/{path}") as bar:
        stored = call(
            target, lambda c: storage.upload(c, bucket, path, local_file, bar.update, content_type=content_type)
        )
    if json_out:
        print_json(stored)
        return
    print(f"uploaded {local_file} to {bucket}/{stored.path} ({human_size(size)}, sha256 {short_sha(stored.sha256)})")


@storage_app.command("get")
def get(
    source: Annotated[str, typer.Argument(metavar="BUCKET/PATH", help="The file, like finance/out/report.pdf.")],
    local_file: Annotated[
        Path | None,
        typer.Argument(help="Where to write it (a file, or a folder to put it in); default: its name, here."),
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Download a file; the local file is replaced only once the whole file has arrived with its sha256."""
    bucket, path = _file_name(source)
    destination = local_file if local_file is not None else Path(Path(path).name)
    if destination.is_dir():
        destination = destination / Path(path).name
    target = resolve(data_dir, url, token_file, bundle)
    with _Bar(f"{bucket}/{path}") as bar:
        info = call(target, lambda c: storage.download(c, bucket, path, destination, bar.update))
    if json_out:
        print_json(info)
        return
    print(f"downloaded {bucket}/{info.path} to {destination} ({human_size(info.size)})")


@storage_app.command("list")
def list_files(
    where: Annotated[
        str, typer.Argument(metavar="BUCKET[/PREFIX]", help="A bucket, or the start of paths in it: finance/in/.")
    ],
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """The files of a bucket whose paths start with PREFIX (all of them without), by path."""
    bucket, prefix = split_name(where, what="BUCKET[/PREFIX]")
    files = call(resolve(data_dir, url, token_file, bundle), lambda c: _every_file(c, bucket, prefix)).files
    if json_out:
        print_json(files)
        return
    if not files:
        shown = f"{bucket}/{prefix}" if prefix else bucket
        print(f"no files in {shown}; upload one with 'herder storage put {bucket}/PATH FILE'", file=sys.stderr)
        return
    rows = [[f.path, human_size(f.size), when(f.updated_at), f.updated_by, short_sha(f.sha256)] for f in files]
    print_table(FILE_COLUMNS, rows, wide=wide)


async def _every_file(client: Client, bucket: str, prefix: str) -> FileList:
    """Every page of a listing, as one."""
    found: list[FileInfo] = []
    cursor: str | None = None
    while True:
        page = await client.request(FileListRequest(bucket=bucket, prefix=prefix, cursor=cursor))
        found += page.files
        cursor = page.next_cursor
        if cursor is None:
            return FileList(bucket=page.bucket, files=found)


@storage_app.command("rm")
def remove(
    name: Annotated[str, typer.Argument(metavar="BUCKET/PATH", help="The file to delete.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Delete a file from a bucket."""
    bucket, path = _file_name(name)
    deleted = call(
        resolve(data_dir, url, token_file, bundle), lambda c: c.request(FileDelete(bucket=bucket, path=path))
    )
    if json_out:
        print_json(deleted)
        return
    print(f"deleted {bucket}/{deleted.path} ({human_size(deleted.size)})")


class _Bar:
    """A transfer's progress on stderr, for large files on a terminal; nothing otherwise."""

    def __init__(self, description: str) -> None:
        self._description = description
        self._live = sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> _Bar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, done: int, total: int) -> None:
        """`done` bytes of `total` have gone (the bar starts once the total is known to be large)."""
        if self._progress is None:
            if not self._live or total < PROGRESS_MIN_BYTES:
                return
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=total)
        assert self._task is not None
        self._progress.update(self._task, completed=done, total=total)
