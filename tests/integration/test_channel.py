"""Queues from scripts, through their robot's channel: real robot agents running real scripts that add,
take and finish items with the SDK, against real herder services (the queues service among them) on a
real, fenced nats-server. And the verifier station: an unattended robot that sends doubtful invoices to
a person, and an attended robot on which the person decides them by hand.
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from herder.client.requests import Client
from herder.protocol.jobs import JobKill, JobListRequest, JobStart, JobState, Outcome
from herder.protocol.messages import new_id
from herder.protocol.packages import PackageResolve
from herder.protocol.queues import (
    ItemAdd,
    ItemInfo,
    ItemListRequest,
    ItemState,
    NewItem,
    QueueCreate,
    QueueSettings,
)
from herder.protocol.registry import RobotShow, RobotStatus, RobotType
from herder.robot import sdk
from herder.robot.agent import NotAttended, RobotAgent
from herder.robot.channel import Channel
from herder.robot.runner import LogLine
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import HostConfig, ServiceHost
from herder.services.common.natsserver import EmbeddedNats
from herder.services.queues.service import QueuesService
from tests.fleet import ALL_SERVICES, HEARTBEAT_S, Fleet, python_process, running_fleet
from tests.support import connect_as, eventually, migrated

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Adds items (one of them refused for its content), takes and finishes them, and says what it saw.
WORKER = """
import os, stat
from herder.robot import sdk

def refusal(call):
    try:
        call()
    except sdk.QueueError as exc:
        return [exc.code, str(exc)]
    return None

def main(data):
    work = sdk.queue("work")
    added = work.add_many([{"content": {"n": n}, "reference": f"R{n}"} for n in (1, 2, 3)])
    added.append(work.add({"n": 4}, reference="R4", priority="High"))
    problems = {
        "range": refusal(lambda: work.add({"n": {"deep": 2 ** 60}})),
        "schema": refusal(lambda: sdk.queue("checked").add({"amount": "twelve"})),
        "missing": refusal(lambda: sdk.queue("nowhere").next()),
    }
    done = []
    first = work.next()
    first.progress("looking at it")
    first.complete({"doubled": first.content["n"] * 2})
    done.append(first.reference)
    problems["twice"] = refusal(first.complete)
    for item in work.next_batch(10):
        if item.content["n"] == 2:
            item.fail("n is even", kind="business")
        else:
            item.complete({"doubled": item.content["n"] * 2})
        done.append(item.reference)
    channel = os.environ[sdk.ENV_CHANNEL]
    return {
        "added": added,
        "done": done,
        "problems": problems,
        "empty": work.next() is None,
        "channel": channel,
        "modes": [oct(stat.S_IMODE(os.stat(path).st_mode)) for path in (os.path.dirname(channel), channel)],
        "secrets": sorted(name for name in os.environ if "TOKEN" in name or name.startswith("NATS_")),
    }
"""

# Holds the channel's path in its output, then waits to be killed.
LINGER = """
import os, time
from herder.robot import sdk

def main(data):
    sdk.set_output({"channel": os.environ[sdk.ENV_CHANNEL]})
    sdk.log.info("lingering")
    while True:
        time.sleep(0.05)
"""

# How long a queue call takes to fail when there is nothing to answer it.
UNANSWERED = """
import time
from herder.robot import sdk

def main(data):
    started = time.monotonic()
    try:
        sdk.queue("work").next()
    except sdk.QueueError as exc:
        return {"code": exc.code, "message": str(exc), "took_s": time.monotonic() - started}
    return {"code": None}
"""


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database (what the channel does does not depend on the database)."""
    return migrated(f"sqlite:///{tmp_path / 'herder.db'}")


@pytest.fixture
async def fleet(nats_url: str, sqlite_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    """The whole of herder, the queues service included."""
    async with running_fleet(nats_url, sqlite_url, tmp_path, credential) as started:
        yield started


async def items_of(client: Client, queue: str) -> dict[str, ItemInfo]:
    """A queue's items, by reference."""
    page = await client.request(ItemListRequest(queue=queue, limit=1000))
    return {item.reference or item.id: item for item in page.items}


async def test_a_script_adds_takes_and_finishes_items_through_its_robot(fleet: Fleet) -> None:
    await fleet.client.request(QueueCreate(name="work"))
    schema = {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}
    await fleet.client.request(QueueCreate(name="checked", settings=QueueSettings(content_schema=schema)))
    await fleet.run_robot("r1")
    await fleet.publish(python_process(fleet.root, "worker", WORKER))

    job = await fleet.client.request(JobStart(process="worker", robot="r1"))
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL, timeout=60)
    output = done.output
    assert output is not None

    # The High item first, then the others first in, first out.
    assert output["done"] == ["R4", "R1", "R2", "R3"]
    assert output["empty"] is True
    problems = output["problems"]
    code, message = problems["range"]
    assert code == "bad_request"
    assert "items.0.content.n.deep" in message and "outside the integers" in message
    assert problems["schema"][0] == "bad_request" and "amount" in problems["schema"][1]
    assert problems["missing"][0] == "not_found"
    assert problems["twice"][0] == "conflict" and "completed already" in problems["twice"][1]

    # The script's channel was private, is gone with its run, and no secret reached the script.
    assert output["modes"] == ["0o700", "0o600"]
    assert not Path(output["channel"]).parent.exists()
    assert output["secrets"] == []

    items = await items_of(fleet.client, "work")
    assert sorted(items) == ["R1", "R2", "R3", "R4"]
    assert [items[f"R{n}"].id for n in (1, 2, 3, 4)] == output["added"]
    for reference in ("R1", "R3", "R4"):
        assert items[reference].state is ItemState.SUCCESSFUL
        assert items[reference].output == {"doubled": int(reference[1]) * 2}
    assert (items["R2"].state, items["R2"].exception, items["R2"].reason) == (
        ItemState.FAILED,
        "business",
        "n is even",
    )
    assert items["R4"].progress == "looking at it"
    # The robot held them, for the job its agent named.
    assert {(item.robot, item.job_id) for item in items.values()} == {("r1", job.id)}


async def test_the_verifier_station_end_to_end(fleet: Fleet, tmp_path: Path) -> None:
    for name in ("invoices", "invoices-verify"):
        await fleet.client.request(QueueCreate(name=name))
    invoices = [
        {"number": "INV-1", "supplier": "ACME", "amount": 120.0},  # good
        {"number": "INV-2", "supplier": "ACME", "amount": 50_000},  # doubtful: large
        {"number": "INV-3", "supplier": "Unknown Ltd", "amount": 80},  # doubtful: supplier
        {"supplier": "ACME", "amount": 10},  # unreadable: no number
    ]
    items = [NewItem(content=content, reference=content.get("number", "NONE")) for content in invoices]
    await fleet.client.request(ItemAdd(queue="invoices", items=items))
    await fleet.publish(EXAMPLES / "verifier" / "invoices")
    await fleet.publish(EXAMPLES / "verifier" / "verify")

    # The unattended robot checks every invoice and sends the doubtful ones to the verification queue.
    await fleet.run_robot("checker")
    job = await fleet.client.request(JobStart(process="invoices", robot="checker"))
    checked = await fleet.wait_job(job.id, JobState.SUCCESSFUL, timeout=60)
    assert checked.output == {"good": 1, "doubtful": 2, "unreadable": 1}
    after_check = await items_of(fleet.client, "invoices")
    assert after_check["INV-1"].output == {"verdict": "good"}
    assert after_check["INV-2"].state is ItemState.SUCCESSFUL
    assert after_check["INV-2"].output is not None and after_check["INV-2"].output["verdict"] == "sent to verification"
    assert (after_check["NONE"].state, after_check["NONE"].exception) == (ItemState.FAILED, "business")
    waiting = await items_of(fleet.client, "invoices-verify")
    assert {reference: item.state for reference, item in waiting.items()} == {
        "INV-2": ItemState.NEW,
        "INV-3": ItemState.NEW,
    }
    assert waiting["INV-2"].content["invoice"] == invoices[1]
    assert waiting["INV-2"].content["checked_item"] == after_check["INV-2"].id

    # The person at the attended robot approves one and rejects the other, by hand.
    token = await fleet.add_robot("desk", robot_type=RobotType.ATTENDED, host="laptop")
    ref = await fleet.client.request(PackageResolve(process="verify"))
    lines: list[LogLine] = []
    async with attended_agent(fleet, "desk", token, tmp_path) as agent:
        assert (await fleet.client.request(RobotShow(name="desk"))).status is RobotStatus.AVAILABLE
        result = await agent.run_attended(
            ref,
            {"decide": {"INV-2": "reject", "*": "approve"}},
            job_id=new_id(),
            on_log=lines.append,
            terminal=False,
        )
    assert result.outcome is Outcome.SUCCESSFUL, (result, [line.message for line in lines])
    assert result.output == {"approved": 1, "rejected": 1, "skipped": 0}
    assert any(line.message == "verify.decided" for line in lines)
    decided = await items_of(fleet.client, "invoices-verify")
    assert (decided["INV-2"].state, decided["INV-2"].exception) == (ItemState.FAILED, "business")
    assert decided["INV-3"].state is ItemState.SUCCESSFUL
    assert decided["INV-3"].output is not None and decided["INV-3"].output["decision"] == "approved"
    assert {item.robot for item in decided.values()} == {"desk"}
    # It said goodbye: the attended robot is Disconnected, not left to look lost.
    assert (await fleet.client.request(RobotShow(name="desk"))).status is RobotStatus.DISCONNECTED


# Takes an item and leaves it unfinished: it crashes, or waits to be interrupted and gives it back.
HOLDER = """
import time
from datetime import timedelta
from herder.robot import sdk

def main(data):
    item = sdk.queue("work").next()
    sdk.log.info("holding", reference=item.reference)
    if data.get("crash"):
        raise RuntimeError("the form would not open")
    try:
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        item.postpone(timedelta(seconds=1), reason="interrupted")
        raise
"""


async def test_a_run_by_hand_does_not_leave_its_items_held(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.client.request(QueueCreate(name="work"))
    await fleet.client.request(ItemAdd(queue="work", items=[NewItem(reference="A"), NewItem(reference="B")]))
    version = await fleet.publish(python_process(fleet.root, "holder", HOLDER))
    ref = await fleet.client.request(PackageResolve(process=version.process))
    token = await fleet.add_robot("desk", robot_type=RobotType.ATTENDED, host="laptop")
    lines: list[LogLine] = []
    async with attended_agent(fleet, "desk", token, tmp_path) as agent:
        # A script that fails leaves its item to the agent, which fails it as herder fails a job's.
        crashed = await agent.run_attended(ref, {"crash": True}, job_id=new_id(), on_log=lines.append, terminal=False)
        assert crashed.outcome is Outcome.FAULTED
        assert crashed.error is not None and "the form would not open" in crashed.error
        # Interrupted (Ctrl-C at the terminal), the script gives its item back itself.
        interrupt = asyncio.Event()

        async def holding() -> bool:
            return sum(line.message == "holding" for line in lines) == 2

        running = asyncio.ensure_future(
            agent.run_attended(ref, {}, job_id=new_id(), on_log=lines.append, interrupt=interrupt, terminal=False)
        )
        await eventually(holding, timeout=30)
        interrupt.set()
        stopped = await asyncio.wait_for(running, 30)
    assert (stopped.outcome, stopped.reason) == (Outcome.STOPPED, "interrupted (SIGINT)")
    items = await items_of(fleet.client, "work")
    assert (items["A"].state, items["A"].exception) == (ItemState.FAILED, "application")
    assert "the run by hand on robot desk ended Faulted without a result" in items["A"].reason
    assert (items["B"].state, items["B"].reason) == (ItemState.NEW, "interrupted")
    assert any("failed 1 of the 1 items the run held" in line.message for line in lines)


# Tries to start a job from a run by hand, and says how it was refused.
STARTER = """
from herder.robot import sdk

def main(data):
    try:
        sdk.start_job("starter", robot="u1")
    except sdk.CallError as exc:
        return {"code": exc.code, "message": str(exc)}
    return {"code": None}
"""


async def test_a_run_by_hand_starts_no_job(fleet: Fleet, tmp_path: Path) -> None:
    """herder has no job for a run by hand, so none can be the parent of another: the agent says so."""
    await fleet.add_robot("u1")
    version = await fleet.publish(python_process(fleet.root, "starter", STARTER))
    ref = await fleet.client.request(PackageResolve(process=version.process))
    token = await fleet.add_robot("desk", robot_type=RobotType.ATTENDED, host="laptop")
    async with attended_agent(fleet, "desk", token, tmp_path) as agent:
        result = await agent.run_attended(ref, {}, job_id=new_id(), on_log=lambda _: None, terminal=False)
    assert result.outcome is Outcome.SUCCESSFUL, result
    assert result.output is not None and result.output["code"] == "conflict"
    assert "a run by hand ('herder robot run --run') is no herder job" in result.output["message"]
    assert (await fleet.client.request(JobListRequest())).jobs == []


async def test_an_unattended_robot_runs_nothing_by_hand(fleet: Fleet, tmp_path: Path) -> None:
    token = await fleet.add_robot("u1")
    ref_process = await fleet.publish(python_process(fleet.root, "worker", WORKER))
    ref = await fleet.client.request(PackageResolve(process=ref_process.process))
    async with attended_agent(fleet, "u1", token, tmp_path) as agent:
        with pytest.raises(NotAttended, match="robot u1 is unattended: herder starts its jobs"):
            await agent.run_attended(ref, {}, job_id=new_id(), on_log=lambda _: None, terminal=False)


@asynccontextmanager
async def attended_agent(fleet: Fleet, name: str, token: str, root: Path) -> AsyncIterator[RobotAgent]:
    """An agent of a robot, run in this process with the robot's own token (as `herder robot run NAME
    --run PROCESS` runs one), started and stopped around the block."""
    nc = await connect_as(fleet.nats_url, token, name=f"robot-{name}")
    try:
        agent = RobotAgent(
            nc, robot=name, token=token, work_dir=root / "attended" / name, heartbeat_interval_s=HEARTBEAT_S
        )
        await agent.start()
        try:
            yield agent
        finally:
            await agent.stop()
    finally:
        await nc.close()


# --- without the queues service: the channel answers all the same, and soon ---


@pytest.fixture
async def plain_fleet(
    nats_url: str, sqlite_url: str, tmp_path: Path, credential: ServiceCredential
) -> AsyncIterator[Fleet]:
    """herder without a queues service."""
    services = tuple(service for service in ALL_SERVICES if service is not QueuesService)
    async with running_fleet(nats_url, sqlite_url, tmp_path, credential, services) as started:
        yield started


async def test_the_channel_closes_with_a_killed_run(plain_fleet: Fleet) -> None:
    await plain_fleet.run_robot("r1")
    await plain_fleet.publish(python_process(plain_fleet.root, "linger", LINGER))
    job = await plain_fleet.client.request(JobStart(process="linger", robot="r1", kill_grace_s=0.5))

    async def lingering() -> bool:
        return any(record.message == "lingering" for record in await plain_fleet.logs(job.id))

    await eventually(lingering, timeout=30)
    await plain_fleet.client.request(JobKill(id=job.id))
    stopped = await plain_fleet.wait_job(job.id, JobState.STOPPED, timeout=30)
    assert stopped.output is not None
    assert not Path(stopped.output["channel"]).parent.exists()


async def test_a_queue_call_nothing_answers_is_unavailable_at_once(plain_fleet: Fleet) -> None:
    await plain_fleet.run_robot("r1", options=["--queue-wait", "0"])
    await plain_fleet.publish(python_process(plain_fleet.root, "unanswered", UNANSWERED))
    job = await plain_fleet.client.request(JobStart(process="unanswered", robot="r1"))
    done = await plain_fleet.wait_job(job.id, JobState.SUCCESSFUL, timeout=60)
    assert done.output is not None
    assert done.output["code"] == "unavailable"
    assert "no queues service is running" in done.output["message"]
    assert done.output["took_s"] < 5.0


async def test_a_queue_call_waits_for_a_queues_service_that_comes_up(
    plain_fleet: Fleet, nats_url: str, sqlite_url: str, tmp_path: Path, credential: ServiceCredential
) -> None:
    """herder restarting (its services not up yet) does not fail a script's call: the call waits."""
    await plain_fleet.run_robot("r1")  # the default --queue-wait
    await plain_fleet.publish(python_process(plain_fleet.root, "unanswered", UNANSWERED))
    job = await plain_fleet.client.request(JobStart(process="unanswered", robot="r1"))
    await plain_fleet.wait_job(job.id, JobState.RUNNING)
    await asyncio.sleep(2.0)
    # The services process shares the SQLite file: one process, as herder up runs them.
    late = ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=sqlite_url,
            services=(QueuesService,),
            credential=credential,
            data_dir=tmp_path / "late",
            migrate=False,
        )
    )
    await late.start()
    try:
        done = await plain_fleet.wait_job(job.id, JobState.SUCCESSFUL, timeout=60)
    finally:
        await late.stop()
    assert done.output is not None
    # It reached the queues service once there was one: the queue it asked for does not exist.
    assert done.output["code"] == "not_found" and "no queue 'work'" in done.output["message"]
    assert done.output["took_s"] >= 2.0


async def test_a_robot_cut_off_from_nats_answers_its_script_at_once(
    nats_server: EmbeddedNats, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = await Channel.open(Client(nc, token=None, timeout=5.0), new_id(), ride_out_s=0.0)
    monkeypatch.setenv(sdk.ENV_CHANNEL, str(channel.path))
    try:
        nats_server.stop()
        await eventually(lambda: not nc.is_connected, timeout=10)
        started = time.monotonic()
        with pytest.raises(sdk.QueueError) as refused:
            await asyncio.to_thread(sdk.queue("work").next)
        assert time.monotonic() - started < 2.0
        assert refused.value.code == "unavailable"
        assert "cut off from herder" in str(refused.value)
    finally:
        await channel.close()


# --- a run by hand is the person's: on their terminal ---

# An agent's run by hand of a script that asks a question, on whatever terminal this process has.
ASKING_AGENT = """
import asyncio, os, sys
from pathlib import Path
from herder.protocol.packages import EntryKind, EntryPoint
from herder.robot.runner import JobProcess, RunSpec

async def main():
    entry = EntryPoint(kind=EntryKind.PYTHON, target="ask:main")
    spec = RunSpec("0" * 32, 1, entry, Path(sys.argv[1]), Path(sys.argv[2]), terminal=True)
    job = await JobProcess.start(spec, lambda line: os.write(1, f"log: {line.message}\\n".encode()))
    result = await job.wait()
    print("ended", result.outcome.value, flush=True)

asyncio.run(main())
"""

ASK = """
from herder.robot import sdk

def main():
    name = input("Your name? ")  # Python writes this prompt to stderr, and no line ends it
    sdk.log.info("answered", name=name)
    print(f"Thanks, {name}.")
"""


def test_a_run_by_hand_asks_on_the_persons_terminal(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (package / "ask.py").write_text(ASK)
    pid, terminal = pty.fork()
    if pid == 0:  # the agent, on the pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-c", ASKING_AGENT, str(package), str(tmp_path / "work")])
    try:
        seen = read_until(terminal, b"Your name? ")  # shown before anyone answers
        os.write(terminal, b"Ada\n")
        seen += read_until(terminal, b"ended successful")
    finally:
        reap(pid)
        os.close(terminal)
    text = seen.decode().replace("\r\n", "\n")
    assert "Thanks, Ada." in text
    assert "log: answered" in text  # SDK records still come to the agent


def reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for a child to end; SIGKILL it (and its job, which dies with it) when it does not."""
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.05)


def read_until(fd: int, wanted: bytes, timeout: float = 30.0) -> bytes:
    """What a terminal shows until `wanted` (blocking: this test drives a terminal, not the event loop)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{wanted!r} not shown within {timeout} s; the terminal showed {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            seen += os.read(fd, 4096)
    return seen
