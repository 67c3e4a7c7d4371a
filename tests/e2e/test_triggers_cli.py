"""`herder trigger` as an operator runs it, against a `herder up` stack (which runs the scheduler): cron
and queue triggers added, listed, shown, fired by hand, disabled, enabled and removed, with `--json` for
programs and one-line errors for people.

The triggers aim at a registered robot whose agent does not run: their jobs are made and wait as
Pending, which is all these tests look at. One stack serves the module; every test names triggers of
its own.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import HERDER, Up, assert_one_line_error, running_up
from tests.support import wait_until

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Variables of the user's shell that would point the CLI elsewhere or lend it a token.
_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_ROBOT_TOKEN", "HERDER_DB", "HERDER_BUNDLE")
# A CLI call costs a few tenths of a second: polling faster than this only loads the machine.
POLL_S = 0.3
ROBOT = "trobot"


class Stack:
    """A `herder up` running as a subprocess, and the CLI pointed at it."""

    def __init__(self, up: Up) -> None:
        self.up = up

    def herder(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
        env["HERDER_DATA_DIR"] = str(self.up.data_dir)
        return subprocess.run(
            [HERDER, *args], capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL
        )

    def ok(self, *args: str) -> str:
        result = self.herder(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def shown(self, name: str) -> dict[str, Any]:
        """`trigger show NAME --json`: the trigger and its last fires."""
        details: dict[str, Any] = self.json("trigger", "show", name)
        return details


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("triggers-e2e")
    with running_up(root) as up:
        started = Stack(up)
        started.ok("package", "publish", str(EXAMPLES / "hello"))
        started.ok("robot", "add", ROBOT, "--type", "unattended", "--host", "h-t", "--save-token", str(root / "t"))
        yield started


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_a_cron_trigger_fires_is_shown_and_is_disabled_enabled_and_removed(stack: Stack) -> None:
    added = stack.ok(
        "trigger", "add", "every-2s", "--process", "hello", "--robot", ROBOT, "--cron", "*/2 * * * * *",
        "--input", '{"name": "Ada"}', "--stop-after", "1h30m", "--abort-after", "2h",
    )  # fmt: skip
    assert "added trigger every-2s" in added and "next fire" in added

    listed = stack.ok("trigger", "list")
    row = next(line for line in listed.splitlines() if line.startswith("every-2s"))
    assert "enabled" in row and "hello" in row and "*/2 * * * * *" in row
    [trigger] = [t for t in stack.json("trigger", "list") if t["name"] == "every-2s"]
    assert len(trigger["next_fires"]) == 1
    assert trigger["job"]["input"] == {"name": "Ada"}
    assert trigger["job"]["stop_after_s"] == 5400 and trigger["job"]["timeout_s"] == 7200

    # Five next fire times, two seconds apart; and after a few seconds, fires that made jobs.
    nexts = [_moment(moment) for moment in stack.shown("every-2s")["trigger"]["next_fires"]]
    assert len(nexts) == 5
    assert all(later - earlier == timedelta(seconds=2) for earlier, later in pairwise(nexts))

    def two_jobs() -> list[dict[str, Any]]:
        made = [fire for fire in stack.shown("every-2s")["fires"] if fire["job_id"]]
        return made if len(made) >= 2 else []

    fired = wait_until(two_jobs, timeout=30, interval=POLL_S)
    assert all(fire["cause"] == "schedule" and fire["scheduled_at"] for fire in fired)
    job = stack.json("job", "show", fired[0]["job_id"])
    assert job["trigger"] == "every-2s" and job["input"] == {"name": "Ada"} and job["state"] == "Pending"
    text = stack.ok("trigger", "show", "every-2s")
    assert "next fires" in text and text.count(" UTC") >= 6  # created, and five next fires
    assert fired[0]["job_id"][:12] in text

    # By hand: a job now, whatever the schedule.
    by_hand = stack.ok("trigger", "fire-now", "every-2s")
    assert by_hand.startswith("trigger every-2s fired: job ")
    job_id = by_hand.split()[-1]
    assert any(f["cause"] == "by hand" and f["job_id"] == job_id for f in stack.shown("every-2s")["fires"])

    disabled = stack.json("trigger", "disable", "every-2s")
    assert disabled["enabled"] is False and disabled["next_fires"] == []
    assert "none while it is disabled" in stack.ok("trigger", "show", "every-2s")
    enabled = stack.json("trigger", "enable", "every-2s")
    assert enabled["enabled"] is True and len(enabled["next_fires"]) == 1

    assert "removed trigger every-2s" in stack.ok("trigger", "remove", "every-2s")
    assert_one_line_error(stack.herder("trigger", "show", "every-2s"), "no trigger 'every-2s'", "[not_found]")


def test_a_working_day_trigger_reads_its_times_in_its_time_zone(stack: Stack) -> None:
    # Moscow keeps UTC+3 all year: 09:00 there is 06:00 UTC; a time without an offset is Moscow's too.
    trigger = stack.json(
        "trigger", "add", "payroll", "--process", "hello", "--robot", ROBOT, "--working-day", "3", "--at", "09:00",
        "--tz", "Europe/Moscow", "--valid-from", "2030-01-01", "--max-runs-per-month", "1", "--disabled",
    )  # fmt: skip
    assert trigger["enabled"] is False
    assert _moment(trigger["schedule"]["valid_from"]) == _moment("2029-12-31T21:00:00+00:00")
    stack.ok("trigger", "enable", "payroll")
    nexts = [_moment(moment) for moment in stack.shown("payroll")["trigger"]["next_fires"]]
    assert len(nexts) == 5 and nexts[0] == _moment("2030-01-03T06:00:00+00:00")  # Tue 1, Wed 2, Thu 3 January
    assert all((moment.hour, moment.minute, moment.weekday() < 5) == (6, 0, True) for moment in nexts)


def test_a_bad_cron_time_zone_or_process_is_refused_in_one_line(stack: Stack) -> None:
    common = ("--process", "hello", "--robot", ROBOT)
    bad_cron = stack.herder("trigger", "add", "bad", *common, "--cron", "0 25 * * *")
    assert_one_line_error(bad_cron, "--cron", "'0 25 * * *'", "[bad_request]")
    bad_tz = stack.herder("trigger", "add", "bad", *common, "--cron", "0 2 * * *", "--tz", "Mars/Olympus")
    assert_one_line_error(bad_tz, "--tz", "Mars/Olympus", "[bad_request]")
    unknown = stack.herder("trigger", "add", "bad", "--process", "nope", "--robot", ROBOT, "--cron", "0 2 * * *")
    assert_one_line_error(unknown, "nope", "[not_found]")
    as_json = stack.herder("trigger", "add", "bad", *common, "--cron", "nonsense", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stderr)["error"]["code"] == "bad_request"
    assert "bad" not in [t["name"] for t in stack.json("trigger", "list")]


def test_a_queue_trigger_starts_a_job_when_its_queue_fills(stack: Stack) -> None:
    stack.ok("queue", "create", "tq")
    added = stack.ok(
        "trigger", "add-queue", "tq-jobs", "--queue", "tq", "--process", "hello", "--robot", ROBOT,
        "--min-items", "2", "--max-jobs", "1",
    )  # fmt: skip
    assert "added trigger tq-jobs" in added
    stack.ok("queue", "add", "tq", "--content", '{"n": 1}')
    stack.ok("queue", "add", "tq", "--content", '{"n": 2}')
    [fire] = wait_until(lambda: stack.shown("tq-jobs")["fires"], timeout=30, interval=POLL_S)
    assert fire["cause"] == "queue" and fire["job_id"]
    row = next(line for line in stack.ok("trigger", "list").splitlines() if line.startswith("tq-jobs"))
    assert "queue tq" in row and f"job {fire['job_id'][:12]}" in row
    # --max-jobs 1: the job it made is still Pending, so a fire by hand makes none, and says why.
    assert_one_line_error(stack.herder("trigger", "fire-now", "tq-jobs"), "made no job")
    unknown = stack.herder("trigger", "add-queue", "tq-none", "--queue", "none-such", "--process", "hello",
                           "--robot", ROBOT)  # fmt: skip
    assert_one_line_error(unknown, "none-such", "[not_found]")
