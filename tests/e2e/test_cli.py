"""The herder CLI as a user runs it: `herder up` in the foreground, other commands beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import HERDER, Up, assert_one_line_error, herder, processes_under
from tests.support import wait_until

pytestmark = pytest.mark.e2e


def test_up_status_tap_tokens_and_a_clean_stop(up: Up) -> None:
    context = up.data_dir / "context.json"
    assert context.stat().st_mode & 0o777 == 0o600
    assert "is up" in up.log.read_text()

    status = herder("status", env=up.env)
    assert status.returncode == 0, status.stderr
    assert "auth" in status.stdout and "database  sqlite  ok" in status.stdout
    report = json.loads(herder("status", "--json", env=up.env).stdout)
    assert [s["name"] for s in report["services"]] == [
        "auth",
        "jobs",
        "packages",
        "queues",
        "registry",
        "scheduler",
        "secrets",
        "storage",
    ]
    assert report["database"]["ok"] is True and report["nats"]["jetstream"]["streams"] >= 2

    tap = subprocess.Popen(
        [HERDER, "tap", "auth.>", "--count", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **up.env},
    )
    try:
        assert tap.stderr is not None
        assert tap.stderr.readline().startswith("tapping hd.default.evt.auth.>")
        created = herder("token", "create", "e2e", "--role", "integrator", env=up.env)
        assert created.returncode == 0, created.stderr
        secret = created.stdout.strip()
        assert secret.startswith("hd_") and secret not in created.stderr
        out, _ = tap.communicate(timeout=15)
    finally:
        tap.kill()
    assert tap.returncode == 0
    (line,) = out.strip().splitlines()
    assert " default hd.default.evt.auth.token_created by admin " in line
    assert "name=e2e role=integrator" in line

    replay = herder("tap", "--since", "1h", "--count", "2", "--json", env=up.env)
    assert [json.loads(x)["data"]["name"] for x in replay.stdout.splitlines()] == ["admin", "e2e"]

    me = json.loads(herder("whoami", "--json", env={**up.env, "HERDER_TOKEN": secret}).stdout)
    assert (me["name"], me["role"]) == ("e2e", "integrator")
    token_file = up.data_dir.parent / "e2e.token"
    token_file.write_text(secret + "\n")
    assert herder("whoami", "--token-file", str(token_file), env=up.env).stdout.startswith(
        "e2e (token, role integrator)"
    )

    listed = herder("token", "list", env=up.env)
    assert "e2e" in listed.stdout and "integrator" in listed.stdout and secret not in listed.stdout
    assert_one_line_error(
        herder("token", "list", env={**up.env, "HERDER_TOKEN": secret}), "lacks the permission", "[forbidden]"
    )
    assert_one_line_error(herder("whoami", env={**up.env, "HERDER_TOKEN": "hd_bogus"}), "[unauthenticated]")
    assert_one_line_error(herder("token", "create", "Bad Name", env=up.env), "[bad_request]")
    assert herder("token", "revoke", "e2e", env=up.env).returncode == 0

    nats_pid = up.nats_pid()
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(20) == 0
    wait_until(lambda: not Path(f"/proc/{nats_pid}").exists(), timeout=10)
    assert processes_under(up.data_dir) == []
    assert "pid" not in json.loads(context.read_text())

    assert_one_line_error(herder("status", env=up.env), "herder is not running", "herder up")


def test_a_second_up_on_the_same_folder_is_refused(up: Up) -> None:
    assert_one_line_error(
        herder("up", "--data-dir", str(up.data_dir), "--port", "0"), "already runs from", str(up.process.pid)
    )


def test_status_with_nothing_running_says_how_to_start(tmp_path: Path) -> None:
    assert_one_line_error(herder("status", "--data-dir", str(tmp_path)), "herder up")
    assert_one_line_error(herder("status", "--url", "nats://127.0.0.1:1"), "herder is not running", "herder up")
    for command in (["token", "list"], ["whoami"], ["tap"]):
        assert_one_line_error(herder(*command, "--url", "nats://127.0.0.1:1"), "herder is not running", "herder up")


@pytest.mark.parametrize("args", [["status", "--token", "hd_leak"], ["token", "list", "--token=hd_leak"]])
def test_a_token_given_as_an_option_is_refused_without_being_echoed(args: list[str]) -> None:
    result = herder(*args)
    assert result.returncode == 2
    assert_one_line_error(result, "--token-file", "HERDER_TOKEN")
    assert "hd_leak" not in result.stderr + result.stdout


def test_a_bad_database_url_fails_in_one_line_and_leaves_no_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "bad-db"
    result = herder("up", "--data-dir", str(data_dir), "--port", "0", "--db", "mysql://root@localhost/x")
    assert_one_line_error(result, "'mysql' databases are not supported")
    assert processes_under(data_dir) == []


def test_service_run_with_unreachable_nats_or_unknown_service(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'h.db'}"
    credential = tmp_path / "credential.json"
    without = ["service", "run", "auth", "--nats", "nats://127.0.0.1:1", "--db", db, "--log-format", "json"]
    assert_one_line_error(herder(*without, "--credential", str(credential)), "no service credential", "fence init")
    assert herder("fence", "init", "--out", str(credential)).returncode == 0
    assert credential.stat().st_mode & 0o777 == 0o600
    assert_one_line_error(herder(*without, "--credential", str(credential)), "cannot reach NATS", logs=True)
    assert_one_line_error(
        herder("service", "run", "nope", "--nats", "nats://127.0.0.1:1", "--db", db), "unknown service nope"
    )


def test_db_upgrade(tmp_path: Path) -> None:
    result = herder("db", "upgrade", "--db", f"sqlite:///{tmp_path / 'h.db'}", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["revisions"]) == [
        "auth_0001",
        "common_0002",
        "jobs_0004",
        "packages_0001",
        "queues_0002",
        "registry_0001",
        "scheduler_0002",
        "secrets_0001",
        "storage_0001",
    ]
    assert_one_line_error(herder("db", "upgrade", "--db", "sqlite:////no/such/dir/h.db"), "does not exist")


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["up"],
        ["status"],
        ["tap"],
        ["token"],
        ["token", "create"],
        ["whoami"],
        ["service", "run"],
        ["db", "upgrade"],
    ],
)
def test_every_command_explains_itself(command: list[str]) -> None:
    result = herder(*command, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


def test_version() -> None:
    assert json.loads(herder("version", "--json").stdout)["herder"] == "0.1.0"
