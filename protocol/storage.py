"""Messages of the `storage` service: named storage buckets of files that robots and people share.

A bucket holds files by path (`reports/2026/june.xlsx`): an input spreadsheet a person drops for a
process, a report a robot leaves for the next one. Buckets and files are rows in the service's
database; the bytes live in the tenant's object store (`HERDER_STORAGE_<tenant>`), reached only
through the service, in chunks of at most MAX_CHUNK_BYTES:

    upload_begin (bucket, path, size, sha256) ─► upload id, the limits checked
    upload_chunk (upload id, offset, data) …   ─► each chunk staged as its own object
    upload_end (upload id)                     ─► the file, once its size and sha256 are right

    download (bucket, path, offset, length)    ─► bytes, with the file's size and sha256

A bucket limits each file (`max_file_bytes`, 100 MiB by default) and its whole content
(`max_bucket_bytes`, 1 GiB). Robots use only the buckets that allow them (by name or by group;
both lists empty: every robot of the tenant), as queues do.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from herder.protocol.messages import Creating, EventData, Model, Request, matching
from herder.protocol.queues import QUEUE_NAME_PATTERN
from herder.protocol.registry import Name
from herder.protocol.values import SafeText

SERVICE = "storage"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# One chunk of an upload or a download: well inside a NATS message with its headers.
MAX_CHUNK_BYTES = 512 * KIB
DEFAULT_MAX_FILE_BYTES = 100 * MIB
DEFAULT_MAX_BUCKET_BYTES = 1 * GIB
# The largest limits a bucket may be given.
MAX_FILE_BYTES_CEILING = 16 * GIB
MAX_BUCKET_BYTES_CEILING = 1024**5
MAX_PATH_CHARS = 1024
# A path is also at most this long in UTF-8, as S3's object keys are: it is indexed as it is.
MAX_PATH_BYTES = 1024
MAX_DESCRIPTION_CHARS = 1000
MAX_CONTENT_TYPE_CHARS = 255
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 1000
# An upload that receives no chunk for this long is abandoned: its staged chunks are removed.
UPLOAD_STALE_S = 3600.0

BucketName = Annotated[
    str,
    matching(
        QUEUE_NAME_PATTERN,
        "must be 1 to 63 letters, digits, '-' or '_', starting with a letter or digit (no dots, slashes or spaces)",
    ),
]
Sha256 = Annotated[str, matching(r"[0-9a-f]{64}", "must be a sha256 as 64 lower-case hex digits")]
UploadId = Annotated[str, matching(r"[0-9a-f]{32}", "must be an upload id (32 hex digits) from upload_begin")]
ContentType = Annotated[
    str,
    Field(min_length=1, max_length=MAX_CONTENT_TYPE_CHARS),
    matching(r"[!-~]+(/[!-~]+)?( *;[ -~]*)?", "must be a media type like 'text/csv' (printable ASCII)"),
]


def path_problem(path: str) -> str | None:
    """Why `path` is not a file's path in a bucket, or None when it is one. Pure.

    A path is relative and `/`-separated (`reports/2026/june.xlsx`): no leading `/`, no empty, `.`
    or `..` part, no trailing `/`, no `\\`; printable; at most MAX_PATH_CHARS characters and
    MAX_PATH_BYTES bytes in UTF-8.
    """
    if not path:
        return "is empty; give a path like 'reports/june.xlsx'"
    return _length_problem(path) or _shape_problem(path)


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot begin the paths of a bucket, or None when it can (empty: every path;
    `reports/`, `reports/2026-`). Pure."""
    if not prefix:
        return None
    if prefix == "/":
        return "is '/'; an empty prefix lists the whole bucket"
    # A prefix is a path cut anywhere: what it holds must be able to go on into one.
    return _length_problem(prefix) or _shape_problem(prefix + "x")


def _length_problem(text: str) -> str | None:
    if len(text) > MAX_PATH_CHARS:
        return f"is {len(text):,} characters long, more than {MAX_PATH_CHARS:,}"
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if len(encoded) > MAX_PATH_BYTES:
        return f"is {len(encoded):,} bytes long in UTF-8, more than {MAX_PATH_BYTES:,}"
    return None


def _shape_problem(path: str) -> str | None:
    if not path.isprintable():
        return "holds a control or other unprintable character"
    if "\\" in path:
        return "holds a '\\'; folders are separated by '/'"
    if path.startswith("/"):
        return "starts with '/'; a path in a bucket is relative, like 'reports/june.xlsx'"
    if path.endswith("/"):
        return "ends with '/'; name the file, like 'reports/june.xlsx'"
    for part in path.split("/"):
        if part == "":
            return "has an empty part ('//')"
        if part in (".", ".."):
            return f"has a {part!r} part; a path in a bucket names a file, like 'reports/june.xlsx'"
    return None


def _clean_path(path: str) -> str:
    problem = path_problem(path)
    if problem is not None:
        raise ValueError(f"the path {path[:60]!r} {problem}")
    return path


def _clean_prefix(prefix: str) -> str:
    problem = prefix_problem(prefix)
    if problem is not None:
        raise ValueError(f"the prefix {prefix[:60]!r} {problem}")
    return prefix


FilePath = Annotated[str, AfterValidator(_clean_path)]
PathPrefix = Annotated[str, AfterValidator(_clean_prefix)]
MaxFileBytes = Annotated[int, Field(ge=1, le=MAX_FILE_BYTES_CEILING)]
MaxBucketBytes = Annotated[int, Field(ge=1, le=MAX_BUCKET_BYTES_CEILING)]


def describe_size(size: int) -> str:
    """A byte count as people read it, exactly too: `150.0 MiB (157,286,400 bytes)`."""
    if size < KIB:
        return f"{size:,} bytes"
    value = float(size)
    shown = "PiB"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            shown = unit
            break
    else:
        value /= 1024
    return f"{value:.1f} {shown} ({size:,} bytes)"


# --- buckets ---


class BucketInfo(Model):
    """A bucket as shown: its limits, who may use it, and what it holds."""

    name: str
    description: str = ""
    max_file_bytes: int
    max_bucket_bytes: int
    # Robots that may use it: members of these groups, or these robots; both empty: every robot.
    robot_groups: list[str] = Field(default_factory=list)
    robots: list[str] = Field(default_factory=list)
    used_bytes: int = 0
    file_count: int = 0
    created_at: datetime
    created_by: str | None = None


class BucketCreate(Creating, Request[BucketInfo]):
    """Create a bucket; a name taken is `conflict`."""

    service = SERVICE
    verb = "bucket_create"

    name: BucketName
    description: SafeText = Field("", max_length=MAX_DESCRIPTION_CHARS)
    max_file_bytes: MaxFileBytes = DEFAULT_MAX_FILE_BYTES
    max_bucket_bytes: MaxBucketBytes = DEFAULT_MAX_BUCKET_BYTES
    robot_groups: list[Name] = Field(default_factory=list, max_length=64)
    robots: list[Name] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _file_fits_bucket(self) -> BucketCreate:
        problem = limits_problem(self.max_file_bytes, self.max_bucket_bytes)
        if problem is not None:
            raise ValueError(problem)
        return self


def limits_problem(max_file_bytes: int, max_bucket_bytes: int) -> str | None:
    """Why a bucket cannot have these limits (a file larger than the bucket), or None. Pure."""
    if max_file_bytes > max_bucket_bytes:
        return (
            f"max_file_bytes ({describe_size(max_file_bytes)}) is larger than max_bucket_bytes "
            f"({describe_size(max_bucket_bytes)}): no file that large would fit"
        )
    return None


class BucketUpdate(Request[BucketInfo]):
    """Change what is given of a bucket's settings; the rest stay. Lower limits apply to uploads from
    then on (what the bucket holds stays)."""

    service = SERVICE
    verb = "bucket_update"

    name: BucketName
    description: SafeText | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    max_file_bytes: MaxFileBytes | None = None
    max_bucket_bytes: MaxBucketBytes | None = None
    robot_groups: list[Name] | None = Field(None, max_length=64)
    robots: list[Name] | None = Field(None, max_length=256)


class BucketList(Model):
    """The reply to `bucket_list`, by name."""

    buckets: list[BucketInfo]


class BucketListRequest(Request[BucketList]):
    service = SERVICE
    verb = "bucket_list"


class BucketDelete(Request[BucketInfo]):
    """Delete a bucket; one that holds files only with `force` (its files go with it)."""

    service = SERVICE
    verb = "bucket_delete"

    name: BucketName
    force: bool = False


# --- files ---


class FileInfo(Model):
    """A file of a bucket: its size and sha256 (to check a download against), and who wrote it last."""

    bucket: str
    path: str
    size: int
    sha256: str
    content_type: str | None = None
    updated_at: datetime
    updated_by: str | None = None


class FileList(Model):
    """A page of a bucket's files, by path; `next_cursor` asks for the next page (None: no more)."""

    bucket: str
    files: list[FileInfo]
    next_cursor: str | None = None


class FileListRequest(Request[FileList]):
    """The files of a bucket whose paths start with `prefix` (all of them when empty), by path, a page
    at a time: give the `next_cursor` of a page as the `cursor` of the next request."""

    service = SERVICE
    verb = "file_list"

    bucket: BucketName
    prefix: PathPrefix = ""
    limit: int = Field(DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT)
    cursor: FilePath | None = None


class FileDelete(Request[FileInfo]):
    """Delete a file; the reply is the file as it was."""

    service = SERVICE
    verb = "file_delete"

    bucket: BucketName
    path: FilePath


class UploadInfo(Model):
    """An upload in progress: send its chunks in order, from `received`, each at most `chunk_bytes`."""

    upload_id: str
    bucket: str
    path: str
    size: int
    sha256: str
    received: int = 0
    chunk_bytes: int = MAX_CHUNK_BYTES


class UploadBegin(Creating, Request[UploadInfo]):
    """Begin an upload of a file of `size` bytes whose sha256 is `sha256`, to `path` in `bucket` (a
    file there is replaced when the upload ends). Refused at once when it would break a limit."""

    service = SERVICE
    verb = "upload_begin"

    bucket: BucketName
    path: FilePath
    size: int = Field(ge=0, le=MAX_FILE_BYTES_CEILING)
    sha256: Sha256
    content_type: ContentType | None = None


class UploadChunk(Request[UploadInfo]):
    """The next chunk of an upload: `offset` must be what the upload has received (else `conflict`,
    whose `details.expected_offset` says where to go on from)."""

    # `data` travels as msgpack bin, or as base64 in JSON.
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    service = SERVICE
    verb = "upload_chunk"

    upload_id: UploadId
    offset: int = Field(ge=0)
    data: bytes = Field(min_length=1, max_length=MAX_CHUNK_BYTES)


class UploadEnd(Request[FileInfo]):
    """End an upload: the file is stored once what was received has the size and sha256 announced
    (else `bad_request`, and nothing is stored). A repeat answers the same file."""

    service = SERVICE
    verb = "upload_end"

    upload_id: UploadId


class UploadCancel(Request[UploadInfo]):
    """Give up an upload: its staged chunks are removed, and what it reserved of the bucket freed."""

    service = SERVICE
    verb = "upload_cancel"

    upload_id: UploadId


class DownloadChunk(Model):
    """A piece of a file, from `offset`; the file's size and sha256 say when it is all there and whole."""

    # `data` travels as msgpack bin, or as base64 in JSON.
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    file: FileInfo
    offset: int
    data: bytes


class Download(Request[DownloadChunk]):
    """Read up to `length` bytes of a file from `offset`. With `sha256` (the file's, as the first
    piece said), a file replaced since is `conflict` rather than a mix of two versions."""

    service = SERVICE
    verb = "download"

    bucket: BucketName
    path: FilePath
    offset: int = Field(0, ge=0)
    length: int = Field(MAX_CHUNK_BYTES, ge=1, le=MAX_CHUNK_BYTES)
    sha256: Sha256 | None = None


# --- events: who did what ---


class BucketCreatedEvent(EventData):
    event_type: ClassVar[str] = "storage.bucket_created"

    bucket: str


class BucketUpdatedEvent(EventData):
    event_type: ClassVar[str] = "storage.bucket_updated"

    bucket: str


class BucketDeletedEvent(EventData):
    event_type: ClassVar[str] = "storage.bucket_deleted"

    bucket: str
    file_count: int
    used_bytes: int


class FileWrittenEvent(EventData):
    event_type: ClassVar[str] = "storage.file_written"

    bucket: str
    path: str
    size: int
    sha256: str
    # Whether a file at that path was replaced.
    replaced: bool = False


class FileDeletedEvent(EventData):
    event_type: ClassVar[str] = "storage.file_deleted"

    bucket: str
    path: str
    size: int
    sha256: str
