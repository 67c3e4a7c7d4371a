"""The storage service's pure parts: what a path in a bucket may be, the limits' arithmetic, where a
piece of a file is among its chunks, and chunks on the wire."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from herder.protocol import codec
from herder.protocol.messages import utcnow
from herder.protocol.storage import (
    GIB,
    MAX_CHUNK_BYTES,
    MIB,
    BucketCreate,
    DownloadChunk,
    FileInfo,
    FileListRequest,
    UploadChunk,
    describe_size,
    limits_problem,
    path_problem,
    prefix_problem,
)
from herder.services.storage.core import (
    Rechunker,
    Span,
    Usage,
    chunk_problem,
    object_name,
    page_within,
    part_object_name,
    runs_of,
    seq_of,
    spans,
    upload_refusal,
)

# --- paths ---


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "report.xlsx",
        "in/2026/06/invoices.xlsx",
        "with spaces/and (brackets) & 100%.pdf",
        ".hidden",
        "..data",
        "a/.b/c..d",
        "Überweisungen/März.csv",
        "报告/六月.xlsx",
        "x" * 1024,
    ],
)
def test_clean_relative_paths_are_taken(path: str) -> None:
    assert path_problem(path) is None


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("", "is empty"),
        ("/etc/passwd", "starts with '/'"),
        ("reports/", "ends with '/'"),
        ("a//b", "empty part"),
        ("../secret", "'..' part"),
        ("a/../../b", "'..' part"),
        ("a/./b", "'.' part"),
        (".", "'.' part"),
        ("a\\b", "'\\'"),
        ("line\nbreak", "unprintable"),
        ("nul\x00", "unprintable"),
        ("tab\there", "unprintable"),
        ("x" * 1025, "1,025 characters"),
        ("é" * 513, "1,026 bytes long in UTF-8"),
        ("\udcff", "not valid Unicode"),
    ],
)
def test_paths_that_are_not_clean_say_why(path: str, fragment: str) -> None:
    problem = path_problem(path)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("prefix", ["", "reports/", "reports/2026-", "reports/.", "a", ".."])
def test_a_prefix_is_a_path_cut_anywhere(prefix: str) -> None:
    assert prefix_problem(prefix) is None


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [("/", "empty prefix"), ("/reports", "starts with '/'"), ("a//", "empty part"), ("../", "'..' part")],
)
def test_a_prefix_that_no_path_can_start_with_is_refused(prefix: str, fragment: str) -> None:
    problem = prefix_problem(prefix)
    assert problem is not None and fragment in problem


def test_the_models_refuse_bad_paths_naming_them() -> None:
    with pytest.raises(ValidationError, match=r"the prefix '\.\./x' has a '\.\.' part"):
        FileListRequest(bucket="b", prefix="../x")
    with pytest.raises(ValidationError, match="bucket"):
        FileListRequest(bucket="no/slash")


@given(st.text(max_size=40))
def test_a_path_taken_is_safe_to_join_under_a_folder(path: str) -> None:
    if path_problem(path) is None:
        parts = path.split("/")
        assert all(part not in ("", ".", "..") for part in parts)
        assert not path.startswith("/") and "\\" not in path and path.isprintable()


# --- limits ---


def usage(**changes: int) -> Usage:
    values = {"max_file_bytes": 100 * MIB, "max_bucket_bytes": GIB, "used_bytes": 0} | changes
    return Usage(bucket="finance", **values)


def test_a_file_over_the_file_limit_is_refused_naming_the_limit_and_the_sizes() -> None:
    refusal = upload_refusal(150 * MIB, usage())
    assert refusal is not None and refusal.limit == "max_file_bytes"
    assert refusal.message == (
        "the file is 150.0 MiB (157,286,400 bytes), more than bucket 'finance' takes per file "
        "(max_file_bytes 100.0 MiB (104,857,600 bytes))"
    )
    assert upload_refusal(100 * MIB, usage()) is None


def test_the_bucket_limit_counts_what_it_holds_what_is_on_its_way_and_what_is_replaced() -> None:
    assert upload_refusal(100 * MIB, usage(used_bytes=GIB - 100 * MIB)) is None
    full = upload_refusal(100 * MIB, usage(used_bytes=GIB - 100 * MIB + 1))
    assert full is not None and full.limit == "max_bucket_bytes"
    assert "more than its max_bucket_bytes of 1.0 GiB" in full.message and "it holds" in full.message
    # Replacing a file of 60 MiB with one of 100 MiB adds 40 MiB.
    assert upload_refusal(100 * MIB, usage(used_bytes=GIB - 40 * MIB, replaced_bytes=60 * MIB)) is None
    assert upload_refusal(100 * MIB, usage(used_bytes=GIB - 39 * MIB, replaced_bytes=60 * MIB)) is not None
    reserved = upload_refusal(10 * MIB, usage(used_bytes=GIB - 20 * MIB, reserved_bytes=15 * MIB))
    assert reserved is not None and "uploads in progress will add 15.0 MiB" in reserved.message
    assert upload_refusal(0, usage(used_bytes=GIB)) is None


def test_a_bucket_whose_file_limit_exceeds_it_is_refused() -> None:
    assert limits_problem(GIB, GIB) is None
    problem = limits_problem(2 * GIB, GIB)
    assert problem is not None and "no file that large would fit" in problem
    with pytest.raises(ValidationError, match="larger than max_bucket_bytes"):
        BucketCreate(name="b", max_file_bytes=2 * GIB, max_bucket_bytes=GIB)


def test_chunks_must_come_in_order_and_within_the_upload() -> None:
    assert chunk_problem(size=10, received=4, offset=4, length=6) is None
    code, message = chunk_problem(size=10, received=4, offset=0, length=4) or ("", "")
    assert code == "conflict" and "send the chunk that starts at 4" in message
    code, message = chunk_problem(size=10, received=4, offset=4, length=7) or ("", "")
    assert code == "bad_request" and "runs past the end" in message


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 bytes"), (1023, "1,023 bytes"), (1024, "1.0 KiB (1,024 bytes)"), (GIB, "1.0 GiB (1,073,741,824 bytes)")],
)
def test_sizes_are_shown_both_ways(size: int, shown: str) -> None:
    assert describe_size(size) == shown


# --- chunks ---


def test_sequences_are_kept_as_runs_and_found_by_index() -> None:
    runs = runs_of([5, 6, 7, 10, 11, 20])
    assert runs == [(5, 3), (10, 2), (20, 1)]
    assert [seq_of(runs, i) for i in range(6)] == [5, 6, 7, 10, 11, 20]
    with pytest.raises(IndexError):
        seq_of(runs, 6)
    assert runs_of([]) == []


@given(st.lists(st.integers(min_value=1, max_value=10**12), unique=True))
def test_runs_give_back_every_sequence(seqs: list[int]) -> None:
    ordered = sorted(seqs)
    runs = runs_of(ordered)
    assert [seq_of(runs, i) for i in range(len(ordered))] == ordered
    assert len(runs) <= len(ordered)


def test_a_read_is_cut_into_the_chunks_it_spans() -> None:
    assert spans(offset=0, length=10, size=25, chunk_bytes=10) == [Span(0, 0, 10)]
    assert spans(offset=7, length=10, size=25, chunk_bytes=10) == [Span(0, 7, 10), Span(1, 0, 7)]
    assert spans(offset=20, length=10, size=25, chunk_bytes=10) == [Span(2, 0, 5)]
    assert spans(offset=25, length=10, size=25, chunk_bytes=10) == []


@given(
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=1, max_value=3000),
    st.integers(min_value=1, max_value=700),
)
def test_spans_cover_exactly_the_bytes_asked_for(size: int, offset: int, length: int, chunk_bytes: int) -> None:
    data = bytes(i % 251 for i in range(size))
    chunks = [data[i : i + chunk_bytes] for i in range(0, size, chunk_bytes)]
    found = spans(offset=offset, length=length, size=size, chunk_bytes=chunk_bytes)
    assert b"".join(chunks[s.index][s.start : s.end] for s in found) == data[offset : offset + length]


@given(st.lists(st.binary(max_size=50), max_size=20), st.integers(min_value=1, max_value=64))
def test_pieces_of_any_size_become_chunks_of_one_size(pieces: list[bytes], chunk_bytes: int) -> None:
    rechunker = Rechunker(chunk_bytes)
    chunks = [chunk for piece in pieces for chunk in rechunker.feed(piece)] + rechunker.flush()
    assert b"".join(chunks) == b"".join(pieces)
    assert all(len(chunk) == chunk_bytes for chunk in chunks[:-1])
    assert all(0 < len(chunk) <= chunk_bytes for chunk in chunks)


def test_a_page_stays_within_its_budget_but_never_empty() -> None:
    assert page_within([100, 100, 100], 250) == 2
    assert page_within([300, 100], 250) == 1
    assert page_within([], 250) == 0
    assert page_within([10] * 5, 1000) == 5


def test_objects_are_named_by_bucket_id_and_path() -> None:
    assert object_name("ab" * 16, "in/a.xlsx") == "abababababababababababababababab/in/a.xlsx"
    assert part_object_name("cd" * 16, 524288) == ".parts/cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd/524288"


# --- on the wire ---


def test_a_chunk_travels_as_raw_bytes_in_msgpack_and_base64_in_json() -> None:
    data = os.urandom(MAX_CHUNK_BYTES)
    chunk = UploadChunk(upload_id="0" * 32, offset=0, data=data)
    packed = codec.dump(chunk)
    assert len(packed) < MAX_CHUNK_BYTES + 100  # no base64 on the default wire
    assert codec.load(UploadChunk, packed).data == data
    as_json = codec.dump(chunk, codec.JSON)
    assert codec.load(UploadChunk, as_json, codec.JSON).data == data
    codec.check_size(as_json)
    info = FileInfo(bucket="b", path="p", size=3, sha256="0" * 64, updated_at=utcnow())
    piece = DownloadChunk(file=info, offset=0, data=b"\x00\xff\x10")
    assert codec.load(DownloadChunk, codec.dump(piece)) == piece
    assert codec.load(DownloadChunk, codec.dump(piece, codec.JSON), codec.JSON) == piece


def test_a_chunk_larger_than_the_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="at most 524288"):
        UploadChunk(upload_id="0" * 32, offset=0, data=b"x" * (MAX_CHUNK_BYTES + 1))
