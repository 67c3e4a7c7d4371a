"""`herder queue` as an operator runs it: a `herder up` stack as a subprocess, driven through the CLI.

A robot's part (taking items and failing them) is played with a registered robot's own token through
`herder.client`, while its agent runs (`herder robot run`), so the stack sees it alive. One stack
serves the module; every test makes queues of its own, so the tests do not depend on each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from herder.cli.context import connected, resolve
from herder.client.requests import Client
from herder.protocol.queues import ExceptionKind, ItemNext, ItemResult, ItemResultRequest, ItemState, QueueChoice
from tests.e2e.harness import HERDER, Up, assert_one_line_error, herder, running_up
from tests.support import wait_until

pytestmark = pytest.mark.e2e

# Variables of the user's shell that would point the CLI elsewhere or lend it a token.
_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_ROBOT_TOKEN", "HERDER_DB", "HERDER_BUNDLE")
BIG_FILE_LINES = 2500
BAD_LINE = 1234


@dataclass
class Stack:
    """A `herder up` running as a subprocess, and the CLI pointed at it."""

    up: Up

    @property
    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
        return {**env, "HERDER_DATA_DIR": str(self.up.data_dir)}

    def herder(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one CLI command against this stack, with nothing on standard input (as in a pipe)."""
        return subprocess.run(
            [HERDER, *args], capture_output=True, text=True, timeout=timeout, env=self.env, stdin=subprocess.DEVNULL
        )

    def json(self, *args: str) -> Any:
        """What `herder ARGS --json` printed, parsed."""
        return parsed(self.herder(*args, "--json"))

    def counts(self, queue: str) -> dict[str, int]:
        """The queue's items per state, as `queue show` counts them."""
        counts: dict[str, int] = self.json("queue", "show", queue)["stats"]["counts"]
        return {state: count for state, count in counts.items() if count}

    def ids(self, queue: str, *filters: str) -> list[str]:
        """The ids of every item of the queue the filters match, oldest first."""
        return [item["id"] for item in self.json("queue", "items", queue, *filters, "--all")]


def parsed(result: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a successful `--json` command printed on stdout."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_up(tmp_path_factory.mktemp("queues-e2e")) as up:
        yield Stack(up)


@dataclass
class Robot:
    """A registered robot whose agent runs, and whose token the test uses to take and finish items."""

    name: str
    token_file: Path
    data_dir: Path

    def take_and_fail(self, queue: str, count: int, kind: ExceptionKind = ExceptionKind.APPLICATION) -> list[str]:
        """Take up to `count` items of `queue` as this robot and fail them all; their ids."""

        async def main() -> list[str]:
            target = resolve(self.data_dir, None, self.token_file)
            async with connected(target, f"{self.name}-test") as nc:
                client = Client(nc, token=target.token, tenant=target.tenant)
                taken = await client.request(ItemNext(queues=[QueueChoice(name=queue)], count=count))
                results = [
                    ItemResult(
                        id=item.id, lease=item.lease, state=ItemState.FAILED, exception=kind, reason="portal down"
                    )
                    for item in taken.items
                ]
                done = await client.request(ItemResultRequest(results=results))
                return [item.id for item in done.items]

        return asyncio.run(main())


@pytest.fixture(scope="module")
def robot(stack: Stack) -> Iterator[Robot]:
    folder = stack.up.data_dir.parent / "robot"
    folder.mkdir()
    token_file = folder / "qbot.token"
    added = stack.herder(
        "robot", "add", "qbot", "--type", "unattended", "--host", "h-qbot", "--save-token", str(token_file)
    )
    assert added.returncode == 0, added.stderr
    log = folder / "agent.log"
    options = ("--work-dir", str(folder / "work"), "--log-format", "json")
    with open(log, "wb") as output:
        agent = subprocess.Popen(
            [HERDER, "robot", "run", "qbot", "--token-file", str(token_file), "--heartbeat", "0.5", *options],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=stack.env,
        )
    try:
        wait_until(lambda: stack.json("robot", "show", "qbot")["status"] == "Available", timeout=30, interval=0.3)
        yield Robot(name="qbot", token_file=token_file, data_dir=stack.up.data_dir)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def big_file(path: Path, *, tag_every: int = 2) -> Path:
    """BIG_FILE_LINES items in both forms: even lines are bare content, odd ones the full form with a
    reference, a priority and tags."""
    lines = []
    for n in range(BIG_FILE_LINES):
        if n % tag_every:
            item = {"content": {"n": n}, "reference": f"R-{n:05d}", "priority": "Low", "tags": ["odd"]}
            lines.append(json.dumps(item))
        else:
            lines.append(json.dumps({"n": n, "customer": f"C{n % 7}"}))
    return write_lines(path, lines)


# --- queues ---


def test_a_queue_is_created_shown_listed_and_updated(stack: Stack) -> None:
    created = stack.json(
        "queue", "create", "invoices-a", "--description", "EU invoices", "--max-retries", "2", "--lease", "10m",
        "--sla", "60", "--risk", "15", "--abandon-new-after", "2d",
    )  # fmt: skip
    assert created["name"] == "invoices-a"
    settings = created["settings"]
    assert settings["lease_s"] == 600 and settings["max_retries"] == 2 and settings["abandon_new_after_s"] == 172800
    assert settings["sla_minutes"] == 60 and settings["risk_minutes"] == 15 and not settings["unique_references"]

    assert_one_line_error(stack.herder("queue", "create", "invoices-a"), "invoices-a", "[conflict]")

    shown = stack.json("queue", "show", "invoices-a")
    assert shown["queue"]["settings"] == settings
    assert sum(shown["stats"]["counts"].values()) == 0
    text = stack.herder("queue", "show", "invoices-a").stdout
    assert "EU invoices" in text and "10m" in text and "60 min, at risk 15 min before" in text
    assert "New 0, InProgress 0" in text

    listed = {queue["name"]: queue for queue in stack.json("queue", "list")}
    assert listed["invoices-a"]["settings"] == settings and listed["invoices-a"]["stats"] is not None
    table = stack.herder("queue", "list")
    assert table.returncode == 0 and "invoices-a" in table.stdout and "NAME" in table.stdout

    updated = stack.herder("queue", "update", "invoices-a", "--sla", "none", "--risk", "none", "--max-retries", "5")
    assert updated.returncode == 0, updated.stderr
    assert "max retries 2 → 5" in updated.stdout
    settings = stack.json("queue", "show", "invoices-a")["queue"]["settings"]
    assert settings["sla_minutes"] is None and settings["max_retries"] == 5
    assert settings["lease_s"] == 600 and settings["description"] == "EU invoices"  # left as they were

    assert_one_line_error(stack.herder("queue", "update", "nowhere", "--max-retries", "1"), "[not_found]")
    assert_one_line_error(stack.herder("queue", "show", "nowhere"), "[not_found]")
    assert_one_line_error(stack.herder("queue", "update", "invoices-a", "--risk", "10"), "--risk needs --sla")


# --- adding and listing items ---


def test_items_are_added_alone_and_from_a_file_and_listed_with_filters(stack: Stack, tmp_path: Path) -> None:
    assert stack.herder("queue", "create", "bulk").returncode == 0
    added = stack.json(
        "queue", "add", "bulk", "--content", '{"invoice": "INV-1"}', "--reference", "INV-1", "--priority", "High",
        "--tag", "eu", "--deadline", "+2h",
    )  # fmt: skip
    (first,) = added["ids"]
    item = stack.json("queue", "item", first)["item"]
    assert item["content"] == {"invoice": "INV-1"} and item["reference"] == "INV-1" and item["state"] == "New"
    assert item["priority"] == "High" and item["tags"] == ["eu"] and item["deadline"] is not None
    shown = stack.herder("queue", "item", first)
    assert shown.returncode == 0 and '{"invoice": "INV-1"}' in shown.stdout and "INV-1" in shown.stdout

    items = big_file(tmp_path / "items.jsonl")
    from_file = stack.json("queue", "add", "bulk", "--file", str(items))
    assert len(from_file["ids"]) == len(set(from_file["ids"])) == BIG_FILE_LINES
    assert stack.counts("bulk") == {"New": BIG_FILE_LINES + 1}

    # Again, as after a crash: within 24 hours the same file adds nothing twice.
    again = stack.herder("queue", "add", "bulk", "--file", str(items))
    assert again.returncode == 0, again.stderr
    assert stack.counts("bulk") == {"New": BIG_FILE_LINES + 1}

    some = stack.herder("queue", "items", "bulk", "--limit", "10", "--json")
    assert len(parsed(some)) == 10 and "--all" in some.stderr
    every = stack.ids("bulk")
    assert len(every) == len(set(every)) == BIG_FILE_LINES + 1 and every[0] == first  # oldest first
    assert set(from_file["ids"]) <= set(every)

    assert len(stack.ids("bulk", "--reference", "R-000*")) == 50  # the odd lines below 100
    assert len(stack.ids("bulk", "--tag", "+odd")) == BIG_FILE_LINES // 2
    assert len(stack.ids("bulk", "--tag", "-odd")) == BIG_FILE_LINES // 2 + 1
    assert stack.ids("bulk", "--tag", "eu") == [first]
    assert len(stack.ids("bulk", "--state", "New")) == BIG_FILE_LINES + 1
    assert stack.ids("bulk", "--state", "Failed") == []
    assert stack.ids("bulk", "--since", "+1h") == [] and stack.ids("bulk", "--until", "-1d") == []
    assert len(stack.ids("bulk", "--since", "-1h")) == BIG_FILE_LINES + 1

    table = stack.herder("queue", "items", "bulk", "--tag", "eu")
    assert table.returncode == 0 and "ID" in table.stdout and first in table.stdout and "INV-1" in table.stdout
    full = stack.json("queue", "item", from_file["ids"][1])["item"]  # line 2: the full form
    assert full["reference"] == "R-00001" and full["priority"] == "Low" and full["tags"] == ["odd"]
    assert full["content"] == {"n": 1}


def test_a_file_with_a_bad_line_stores_nothing_and_names_the_line(stack: Stack, tmp_path: Path) -> None:
    assert stack.herder("queue", "create", "careful").returncode == 0
    good = [json.dumps({"n": n}) for n in range(BIG_FILE_LINES)]
    for bad, problem in (
        ('{"n": 1233', "not valid JSON"),
        ('{"content": {"n": 1233}, "tags": ["two words"]}', "tags"),
        ("[1233]", "not a JSON object"),
    ):
        lines = [*good[: BAD_LINE - 1], bad, *good[BAD_LINE:]]
        path = write_lines(tmp_path / "bad.jsonl", lines)
        line = assert_one_line_error(stack.herder("queue", "add", "careful", "--file", str(path)), problem)
        assert f"line {BAD_LINE}:" in line
        error = json.loads(stack.herder("queue", "add", "careful", "--file", str(path), "--json").stderr)["error"]
        assert error["code"] == "bad_request" and f"line {BAD_LINE}" in error["message"]
    assert stack.ids("careful") == []

    assert_one_line_error(stack.herder("queue", "add", "careful", "--content", "[1]"), "--content")
    assert_one_line_error(stack.herder("queue", "add", "nowhere", "--content", "{}"), "[not_found]")
    assert stack.ids("careful") == []


def test_a_file_the_schema_refuses_in_its_last_chunk_stores_nothing(stack: Stack, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "required": ["amount"], "properties": {"amount": {"type": "number"}}})
    )
    assert stack.herder("queue", "create", "schemed", "--schema", str(schema)).returncode == 0
    # Lines of 400 bytes: the file goes in several chunks, and only the last one holds the refused line.
    lines = [json.dumps({"amount": n, "note": "x" * 380}) for n in range(BIG_FILE_LINES)]
    lines[2399] = json.dumps({"amount": "lots", "note": "x" * 380})
    path = write_lines(tmp_path / "schemed.jsonl", lines)
    assert_one_line_error(stack.herder("queue", "add", "schemed", "--file", str(path)), "line 2400", "[bad_request]")
    assert stack.counts("schemed") == {}
    refused = stack.herder("queue", "add", "schemed", "--content", '{"amount": "lots"}')
    assert_one_line_error(refused, "--content.amount", "[bad_request]")

    lines[2399] = json.dumps({"amount": 2399, "note": "x" * 380})
    assert len(stack.json("queue", "add", "schemed", "--file", str(write_lines(path, lines)))["ids"]) == 2500
    assert stack.counts("schemed") == {"New": BIG_FILE_LINES}


def test_references_stay_unique_in_a_unique_queue(stack: Stack, tmp_path: Path) -> None:
    assert stack.herder("queue", "create", "unique", "--unique-references").returncode == 0
    assert stack.herder("queue", "add", "unique", "--content", "{}", "--reference", "INV-9").returncode == 0

    twice = stack.herder("queue", "add", "unique", "--content", "{}", "--reference", "INV-9")
    assert_one_line_error(twice, "INV-9", "[conflict]")
    assert stack.counts("unique") == {"New": 1}

    # A file whose line 2000 repeats a stored reference: the whole file is refused, in any chunk.
    lines = [json.dumps({"content": {"n": n}, "reference": f"U-{n}"}) for n in range(BIG_FILE_LINES)]
    lines[1999] = json.dumps({"content": {"n": 1999}, "reference": "INV-9"})
    path = write_lines(tmp_path / "dup.jsonl", lines)
    assert_one_line_error(stack.herder("queue", "add", "unique", "--file", str(path)), "INV-9", "[conflict]")
    assert stack.counts("unique") == {"New": 1}

    # Two lines of the file sharing a reference: refused before anything is sent.
    lines = [json.dumps({"content": {"n": n}, "reference": f"V-{n}"}) for n in range(BIG_FILE_LINES)]
    lines[2399] = json.dumps({"content": {}, "reference": "V-4"})
    duplicated = write_lines(tmp_path / "self.jsonl", lines)
    assert_one_line_error(stack.herder("queue", "add", "unique", "--file", str(duplicated)), "lines 5 and 2400", "V-4")
    assert stack.counts("unique") == {"New": 1}

    # A file stored already (as after a crash): run again, each chunk clashes with its own references,
    # and its first reply comes back instead; nothing is added twice, and the command succeeds.
    lines = [json.dumps({"content": {"n": n, "note": "x" * 380}, "reference": f"W-{n}"}) for n in range(2500)]
    path = write_lines(tmp_path / "again.jsonl", lines)
    first = stack.json("queue", "add", "unique", "--file", str(path))["ids"]
    again = stack.herder("queue", "add", "unique", "--file", str(path))
    assert again.returncode == 0 and "nothing new" in again.stdout, again.stderr
    assert stack.json("queue", "add", "unique", "--file", str(path))["ids"] == first
    assert stack.counts("unique") == {"New": BIG_FILE_LINES + 1}

    # A queue that does not ask for unique references takes the same file.
    assert stack.herder("queue", "create", "loose").returncode == 0
    assert len(stack.json("queue", "add", "loose", "--file", str(duplicated))["ids"]) == BIG_FILE_LINES


# --- putting a batch right ---


def test_failed_items_are_retried_and_new_ones_deleted(stack: Stack, robot: Robot, tmp_path: Path) -> None:
    assert stack.herder("queue", "create", "work").returncode == 0
    lines = [json.dumps({"content": {"n": n}, "tags": ["batch1" if n < 10 else "batch2"]}) for n in range(20)]
    added = stack.json("queue", "add", "work", "--file", str(write_lines(tmp_path / "work.jsonl", lines)))["ids"]
    failed = robot.take_and_fail("work", 6)
    assert len(failed) == 6 and set(failed) <= set(added)
    assert stack.counts("work") == {"New": 14, "Failed": 6}

    # Piped, a change by filter needs --yes; nothing changes without it.
    assert_one_line_error(stack.herder("queue", "retry", "work", "--state", "Failed"), "--yes")
    counted = stack.json("queue", "retry", "work", "--state", "Failed", "--dry-run")
    assert counted == {"queue": "work", "count": 6, "dry_run": True}
    assert stack.counts("work") == {"New": 14, "Failed": 6}

    one = stack.herder("queue", "retry", "work", "--id", failed[0])
    assert one.returncode == 0 and "retried 1 item of queue work" in one.stdout, one.stderr
    details = stack.json("queue", "item", failed[0])
    assert details["item"]["state"] == "Retried" and details["item"]["retried_by"]
    assert [link["attempt"] for link in details["chain"]] == [1, 2]
    copy = stack.json("queue", "item", details["item"]["retried_by"])["item"]
    assert copy["state"] == "New" and copy["attempt"] == 2 and copy["retry_of"] == failed[0]
    assert copy["content"] == details["item"]["content"]
    shown = stack.herder("queue", "item", failed[0])
    assert "retry chain" in shown.stdout and "portal down" in shown.stdout

    rest = stack.json("queue", "retry", "work", "--state", "Failed", "--yes")
    assert rest["count"] == 5 and not rest["dry_run"]
    assert stack.counts("work") == {"New": 20, "Retried": 6}

    batch1 = stack.ids("work", "--state", "New", "--tag", "+batch1")
    assert batch1  # the retries of the failed ones (all of batch1) and the rest of batch1
    assert_one_line_error(stack.herder("queue", "delete-items", "work", "--tag", "+batch1"), "--yes")
    deleted = stack.json("queue", "delete-items", "work", "--tag", "+batch1", "--yes")
    assert deleted["count"] == len(batch1)
    assert stack.ids("work", "--state", "New", "--tag", "+batch1") == []
    assert sorted(stack.ids("work", "--state", "Deleted")) == sorted(batch1)

    survivor = stack.ids("work", "--state", "New")[0]
    by_id = stack.herder("queue", "delete-items", "work", "--id", survivor)
    assert by_id.returncode == 0 and "deleted 1 item of queue work" in by_id.stdout
    assert stack.json("queue", "item", survivor)["item"]["state"] == "Deleted"

    assert_one_line_error(stack.herder("queue", "delete-items", "work"), "say which items")
    assert_one_line_error(stack.herder("queue", "item", "0" * 32), "[not_found]")


@pytest.mark.parametrize(
    "command",
    [[], ["create"], ["update"], ["list"], ["show"], ["items"], ["add"], ["retry"], ["delete-items"], ["item"]],
)
def test_every_queue_command_explains_itself(command: list[str]) -> None:
    result = herder("queue", *command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout
