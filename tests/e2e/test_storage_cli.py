"""`herder storage` as an operator runs it, against a `herder up` stack: buckets, and files put, listed,
fetched and removed, with `--json` for programs and one-line errors for people."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import HERDER, Up, assert_one_line_error, running_up

pytestmark = pytest.mark.e2e

_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_ROBOT_TOKEN", "HERDER_DB", "HERDER_BUNDLE")


class Stack:
    def __init__(self, up: Up) -> None:
        self.up = up

    def herder(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
        env["HERDER_DATA_DIR"] = str(self.up.data_dir)
        return subprocess.run(
            [HERDER, *args], capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL, cwd=cwd
        )

    def ok(self, *args: str, cwd: Path | None = None) -> str:
        result = self.herder(*args, cwd=cwd)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_up(tmp_path_factory.mktemp("storage-e2e")) as up:
        yield Stack(up)


def test_put_list_get_and_rm_round_trip(stack: Stack, tmp_path: Path) -> None:
    created = stack.ok("storage", "bucket-create", "finance", "--max-file", "8MiB", "--group", "finance")
    assert "created bucket finance" in created and "group finance" in created
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "invoices.xlsx"
    source.write_bytes(data)
    put = stack.ok("storage", "put", "finance/in/2026/invoices.xlsx", str(source))
    assert "uploaded" in put and "finance/in/2026/invoices.xlsx" in put
    # A path ending in '/' takes the local file's name.
    notes = tmp_path / "notes.txt"
    notes.write_text("remember\n")
    stack.ok("storage", "put", "finance/in/", str(notes))
    stack.ok("storage", "put", "finance/out/report.txt", str(notes))

    listed = stack.ok("storage", "list", "finance/in/")
    assert "in/2026/invoices.xlsx" in listed and "in/notes.txt" in listed and "out/report.txt" not in listed
    files = stack.json("storage", "list", "finance")
    assert [f["path"] for f in files] == ["in/2026/invoices.xlsx", "in/notes.txt", "out/report.txt"]
    assert files[0]["size"] == len(data) and files[0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert files[0]["updated_by"] == "admin"

    here = tmp_path / "here"
    here.mkdir()
    got = stack.ok("storage", "get", "finance/in/2026/invoices.xlsx", cwd=here)
    assert "downloaded" in got
    assert (here / "invoices.xlsx").read_bytes() == data
    into = tmp_path / "copy.xlsx"
    info = stack.json("storage", "get", "finance/in/2026/invoices.xlsx", str(into))
    assert into.read_bytes() == data and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []

    buckets = stack.json("storage", "buckets")
    assert [(b["name"], b["file_count"], b["robot_groups"]) for b in buckets] == [("finance", 3, ["finance"])]

    removed = stack.json("storage", "rm", "finance/in/notes.txt")
    assert removed["path"] == "in/notes.txt"
    assert [f["path"] for f in stack.json("storage", "list", "finance/in/")] == ["in/2026/invoices.xlsx"]

    assert_one_line_error(stack.herder("storage", "bucket-delete", "finance"), "holds 2 files", "--force")
    assert "and its 2 files" in stack.ok("storage", "bucket-delete", "finance", "--force")


def test_errors_are_one_line(stack: Stack, tmp_path: Path) -> None:
    stack.ok("storage", "bucket-create", "tiny", "--max-bucket", "1KiB")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2048))
    assert_one_line_error(stack.herder("storage", "put", "tiny/big.bin", str(big)), "max_file_bytes", "[bad_request]")
    assert_one_line_error(stack.herder("storage", "get", "tiny/nothing.txt"), "no file 'nothing.txt'", "[not_found]")
    assert_one_line_error(stack.herder("storage", "list", "nope"), "no bucket 'nope'", "[not_found]")
    assert_one_line_error(stack.herder("storage", "rm", "tiny/../etc/passwd"), "'..' part", "[bad_request]")
    assert_one_line_error(stack.herder("storage", "put", "tiny/x", str(tmp_path / "missing")), "is not a file")
    assert_one_line_error(stack.herder("storage", "get", "tiny"), "names no file")
    assert_one_line_error(stack.herder("storage", "bucket-create", "tiny"), "exists already", "[conflict]")
    assert_one_line_error(stack.herder("storage", "bucket-create", "x", "--max-file", "lots"), "not a size")
    assert_one_line_error(stack.herder("storage", "bucket-create", "bad.name"), "name")
    # Programs asked for JSON get their errors as JSON.
    failed = stack.herder("storage", "list", "nope", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stderr)["error"]["code"] == "not_found"
