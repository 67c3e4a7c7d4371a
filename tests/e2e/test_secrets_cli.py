"""`herder asset` and `herder credential` as an operator runs them, against a `herder up` stack.

The secret of a credential goes in on stdin (a hidden prompt on a terminal), never as an argument;
it is found neither in what `list` prints, nor in the data folder's files (database, JetStream
store, logs), and comes back only with `get --reveal`.
"""

from __future__ import annotations

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
SECRET = "Cli-Only-Secret-7f3a9"


class Stack:
    def __init__(self, up: Up) -> None:
        self.up = up

    def herder(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
        env["HERDER_DATA_DIR"] = str(self.up.data_dir)
        return subprocess.run(
            [HERDER, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            input=stdin if stdin is not None else "",
        )

    def json(self, *args: str) -> Any:
        result = self.herder(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_up(tmp_path_factory.mktemp("secrets-e2e")) as up:
        yield Stack(up)


def test_assets_by_scope_and_type(stack: Stack) -> None:
    assert stack.herder("asset", "set", "threshold", "10", "--type", "integer").returncode == 0
    assert stack.herder("asset", "set", "threshold", "25", "--robot", "r9").returncode == 0
    got = stack.json("asset", "get", "threshold", "--robot", "r9")
    assert got["value"] == 25 and got["scope"] == {"kind": "robot", "name": "r9"}
    plain = stack.herder("asset", "get", "threshold")
    assert plain.stdout.strip() == "10" and "global" in plain.stderr
    assert stack.herder("asset", "set", "holidays", "2026-12-25, 2026-12-24", "--type", "calendar").returncode == 0
    listed = {asset["name"]: asset for asset in stack.json("asset", "list")}
    assert listed["holidays"]["values"][0]["value"] == ["2026-12-24", "2026-12-25"]
    assert_one_line_error(stack.herder("asset", "set", "threshold", "ten"), "not an integer")
    assert_one_line_error(stack.herder("asset", "set", "fresh", "x"), "give --type")
    assert_one_line_error(stack.herder("asset", "get", "nothing"), "no asset")
    assert stack.herder("asset", "delete", "threshold", "--robot", "r9").returncode == 0
    assert stack.json("asset", "get", "threshold", "--robot", "r9")["value"] == 10


def test_a_credential_goes_in_on_stdin_and_out_only_when_revealed(stack: Stack) -> None:
    made = stack.herder("credential", "set", "erp", "--username", "robot-user", "--expires", "2020-01-01", stdin=SECRET)
    assert made.returncode == 0, made.stderr
    listed = stack.herder("credential", "list")
    assert "robot-user" in listed.stdout and "EXPIRED" in listed.stdout and SECRET not in listed.stdout
    assert SECRET not in stack.herder("credential", "get", "erp").stdout
    revealed = stack.herder("credential", "get", "erp", "--reveal")
    assert revealed.returncode == 0, revealed.stderr
    assert revealed.stdout.strip() == SECRET
    assert stack.json("credential", "get", "erp", "--reveal")["secret"] == SECRET
    # Nowhere in the data folder: the database, the JetStream store, the logs.
    for path in Path(stack.up.data_dir).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the secret is in {path}"


def test_secrets_are_refused_on_the_command_line(stack: Stack) -> None:
    for option in ("--password", f"--password={SECRET}", "--secret"):
        result = stack.herder("credential", "set", "erp", "--username", "u", option, SECRET)
        assert_one_line_error(result, "not taken on the command line")
        assert result.returncode == 2
    assert_one_line_error(stack.herder("credential", "set", "empty", "--username", "u", stdin=""), "empty")


def test_the_master_key_rotates_and_the_old_one_retires(stack: Stack) -> None:
    made = stack.herder("credential", "set", "rotated", "--username", "u", stdin="Rotated-Secret-1")
    assert made.returncode == 0, made.stderr
    rotated = stack.herder("secrets", "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    assert "version 2 is current" in rotated.stdout and "version 2:" in rotated.stdout
    assert "version 1:" not in rotated.stdout  # every stored secret rewrapped
    assert stack.herder("credential", "get", "rotated", "--reveal").stdout.strip() == "Rotated-Secret-1"
    assert_one_line_error(stack.herder("secrets", "retire-key", "2"), "current one")
    retired = stack.herder("secrets", "retire-key", "1")
    assert retired.returncode == 0, retired.stderr
    assert stack.herder("credential", "get", "rotated", "--reveal").stdout.strip() == "Rotated-Secret-1"
    key_file = json.loads((Path(stack.up.data_dir) / "master.key").read_text())
    assert sorted(key_file["keys"]) == ["2"] and key_file["current"] == 2
