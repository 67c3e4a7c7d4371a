"""`herder package` as a user runs it, against a `herder up` stack in a subprocess."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e.harness import Up, assert_one_line_error, herder

pytestmark = pytest.mark.e2e


def process_folder(root: Path, *, version: str = "1.0.0", manifest: str | None = None) -> Path:
    """A small process folder; `manifest` replaces its herder.toml."""
    folder = root / f"hello-{version}"
    folder.mkdir(parents=True)
    (folder / "herder.toml").write_text(
        manifest
        if manifest is not None
        else f'name = "hello"\nversion = "{version}"\ndescription = "Greets"\n[entry]\npython = "hello:main"\n'
    )
    (folder / "hello.py").write_text("def main() -> None:\n    print('hello')\n")
    return folder


def test_publish_list_versions_and_refusals(up: Up, tmp_path: Path) -> None:
    folder = process_folder(tmp_path)
    published = herder("package", "publish", str(folder), env=up.env)
    assert published.returncode == 0, published.stderr
    line = published.stdout.strip()
    assert re.fullmatch(r"published hello 1\.0\.0 \(\d+(\.\d)? (B|KiB), sha256 [0-9a-f]{12}…\)", line), line
    assert published.stderr == ""

    again = herder("package", "publish", str(folder), "--version", "1.10.0", "--json", env=up.env)
    assert again.returncode == 0, again.stderr
    info = json.loads(again.stdout)
    assert (info["process"], info["version"], info["published_by"]) == ("hello", "1.10.0", "admin")
    assert info["entry"] == {"kind": "python", "target": "hello:main", "args": []}
    assert herder("package", "publish", str(folder), "--version", "1.9.0", env=up.env).returncode == 0

    listed = herder("package", "list", env=up.env)
    assert listed.returncode == 0, listed.stderr
    assert "hello" in listed.stdout and "1.10.0" in listed.stdout and "Greets" in listed.stdout
    processes = json.loads(herder("package", "list", "--json", env=up.env).stdout)
    assert [(p["name"], p["latest"], p["versions"]) for p in processes] == [("hello", "1.10.0", 3)]

    table = herder("package", "versions", "hello", env=up.env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.index("1.10.0") < table.stdout.index("1.9.0") < table.stdout.index("1.0.0")
    assert "python: hello:main" in table.stdout
    versions = json.loads(herder("package", "versions", "hello", "--json", env=up.env).stdout)
    assert [v["version"] for v in versions] == ["1.10.0", "1.9.0", "1.0.0"]
    assert versions[0]["sha256"] == info["sha256"]

    assert_one_line_error(
        herder("package", "publish", str(folder), env=up.env),
        "hello 1.0.0 is already published; versions are immutable, publish a new version",
        "[conflict]",
    )
    assert_one_line_error(herder("package", "versions", "nope", env=up.env), "no process named 'nope'", "[not_found]")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(herder("package", "publish", str(empty), env=up.env), f"{empty} has no herder.toml")
    bad = process_folder(
        tmp_path, version="bad", manifest='name = "hello"\nversion = "1 0"\n[entry]\npython = "hello:main"\n'
    )
    assert_one_line_error(
        herder("package", "publish", str(bad), env=up.env), "herder.toml: 'version' must be", "(got '1 0')"
    )
    assert_one_line_error(
        herder("package", "publish", str(folder), "--version", "no good", env=up.env), "--version must be"
    )
    unknown = process_folder(
        tmp_path, version="typo", manifest='name = "hello"\nversoin = "1"\n[entry]\npython = "hello:main"\n'
    )
    assert_one_line_error(herder("package", "publish", str(unknown), env=up.env), "unknown key 'versoin'")


def test_a_large_package_shows_its_upload_and_an_integrator_may_not_publish(up: Up, tmp_path: Path) -> None:
    folder = process_folder(tmp_path, version="2.0.0")
    (folder / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 // 2))  # random: it does not compress
    published = herder("package", "publish", str(folder), env=up.env, timeout=120)
    assert published.returncode == 0, published.stderr
    assert "uploading hello 2.0.0 (1.5 MiB)" in published.stderr
    assert "MiB, sha256" in published.stdout

    created = herder("token", "create", "ci", "--role", "integrator", env=up.env)
    assert created.returncode == 0, created.stderr
    integrator = {**up.env, "HERDER_TOKEN": created.stdout.strip()}
    assert_one_line_error(
        herder("package", "publish", str(process_folder(tmp_path, version="3.0.0")), env=integrator),
        "lacks the permission 'packages.publish'",
        "[forbidden]",
    )
    # Reading is allowed.
    assert json.loads(herder("package", "versions", "hello", "--json", env=integrator).stdout)[0]["version"] == "2.0.0"


def test_manifest_errors_come_before_looking_for_a_stack(tmp_path: Path) -> None:
    assert_one_line_error(
        herder("package", "publish", str(tmp_path), "--url", "nats://127.0.0.1:1"), "has no herder.toml"
    )
    folder = process_folder(tmp_path)
    assert_one_line_error(
        herder("package", "publish", str(folder), "--url", "nats://127.0.0.1:1"), "herder is not running", "herder up"
    )


@pytest.mark.parametrize("command", [["package"], ["package", "publish"], ["package", "list"], ["package", "versions"]])
def test_every_package_command_explains_itself(command: list[str]) -> None:
    result = herder(*command, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout
