"""Jobs started by jobs: real scripts call `sdk.start_job` through their robot agents (`herder robot run` as
child processes), against real herder services on a real, fenced nats-server, on SQLite and PostgreSQL.
The new job records the job that started it, `JobListRequest(parent_job=…)` finds the jobs a job
started, and `herder job show` prints the chain.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from herder.protocol.jobs import JobInfo, JobListRequest, JobStart, JobState
from herder.services.common.credentials import ServiceCredential
from tests.fleet import Fleet, python_process, running_fleet

# Starts a child on the robot its input names, then tries what it may not do, and says what it saw.
PARENT = """
import os, uuid
from herder.robot import sdk

def refusal(call):
    try:
        call()
    except sdk.CallError as exc:
        return [exc.code, str(exc)]
    return None

def main(data):
    robot = data["robot"]
    child = sdk.start_job("child", robot=robot, input={"from": os.environ["HERDER_JOB_ID"], "n": 7})
    # One start sent twice under one key, as a start is sent again after the channel broke: one job.
    body = {"process": "child", "robot": robot, "input": {"again": True}, "request_id": uuid.uuid4().hex}
    link = sdk._link()
    again = [link.call("job_start", body)["id"] for _ in range(2)]
    refused = {
        "unknown": refusal(lambda: sdk.start_job("no-such-process", robot=robot)),
        "version": refusal(lambda: sdk.start_job("child", version="9.9", robot=robot)),
        "input": refusal(lambda: sdk.start_job("child", robot=robot, input={"n": 2 ** 60})),
        "parent": refusal(lambda: link.call("job_start", {"process": "child", "robot": robot, "job_id": "0" * 32})),
        "follow": refusal(lambda: link.call("job_state", {"id": "0" * 32})),
    }
    waited = sdk.start_job("child", robot=robot, input={"waited": True}, wait=True)
    return {
        "child": child.id,
        "state": child.state,
        "process": child.process,
        "again": again,
        "refused": refused,
        "waited": [waited.id, waited.state, waited.output],
    }
"""

CHILD = """
def main(data):
    return {"got": data}
"""

# Starts itself again, one level less deep, on the group its input names, until it reaches 0.
RELAY = """
from herder.robot import sdk

def main(data):
    depth = data["depth"]
    if depth == 0:
        return {"next": None}
    started = sdk.start_job("relay", group=data["group"], input={"depth": depth - 1, "group": data["group"]})
    return {"next": started.id, "state": started.state}
"""


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    """The whole of herder on SQLite and on PostgreSQL."""
    async with running_fleet(nats_url, db_url, tmp_path, credential) as fleet:
        yield fleet


async def children_of(fleet: Fleet, job_id: str) -> list[JobInfo]:
    """The jobs `job_id` started, newest first."""
    return (await fleet.client.request(JobListRequest(parent_job=job_id))).jobs


async def test_a_script_starts_a_child_on_another_robot_and_its_refusals_reach_the_script(fleet: Fleet) -> None:
    await fleet.run_robot("r1")
    await fleet.run_robot("r2")
    await fleet.publish(python_process(fleet.root, "parent", PARENT))
    await fleet.publish(python_process(fleet.root, "child", CHILD))

    parent = await fleet.client.request(JobStart(process="parent", robot="r1", input={"robot": "r2"}))
    done = await fleet.wait_job(parent.id, JobState.SUCCESSFUL, timeout=60)
    output = done.output
    assert output is not None and output["process"] == "child"
    assert output["state"] in ("Pending", "Running")

    # The child ran on the other robot with the input the script gave, and records its parent.
    child = await fleet.wait_job(output["child"], JobState.SUCCESSFUL, timeout=60)
    assert (child.parent_job, child.robot, child.trigger) == (parent.id, "r2", None)
    assert child.output == {"got": {"from": parent.id, "n": 7}}
    assert done.parent_job is None

    # Sent twice under one key, the start made one job.
    first, second = output["again"]
    assert first == second != child.id
    again = await fleet.wait_job(first, JobState.SUCCESSFUL, timeout=60)
    assert again.parent_job == parent.id and again.input == {"again": True}
    # Started with wait=True: the script got the child's end and output.
    waited_id, waited_state, waited_output = output["waited"]
    assert (waited_state, waited_output) == ("Successful", {"got": {"waited": True}})
    assert {job.id for job in await children_of(fleet, parent.id)} == {child.id, again.id, waited_id}
    assert await children_of(fleet, child.id) == []
    shown = (await herder(fleet, fleet.root, "job", "show", parent.id)).splitlines()
    assert shown[-4:] == [
        "children       3, oldest first",
        f"  {child.id} child Successful",
        f"  {again.id} child Successful",
        f"  {waited_id} child Successful",
    ]
    assert not any(line.startswith("parent ") for line in shown)  # started by a person: no parent

    # What herder refused reached the script as CallError, with herder's code and message; the parent
    # went on and succeeded, and nothing refused was started.
    refused = output["refused"]
    assert refused["unknown"][0] == "not_found" and "no-such-process" in refused["unknown"][1]
    assert refused["version"][0] == "not_found" and "9.9" in refused["version"][1]
    assert refused["input"][0] == "bad_request" and "input.n" in refused["input"][1]
    assert refused["parent"][0] == "bad_request" and "leave out job_id" in refused["parent"][1]
    assert refused["follow"][0] == "not_found" and "follows only the jobs it starts" in refused["follow"][1]
    everything = (await fleet.client.request(JobListRequest())).jobs
    assert sorted(job.id for job in everything) == sorted([parent.id, child.id, again.id, waited_id])


async def test_a_chain_of_jobs_on_one_robot_each_starting_the_next(fleet: Fleet, tmp_path: Path) -> None:
    """A group of one robot: each child waits for its parent to end and free the robot, then runs there."""
    await fleet.run_robot("r1", groups=["relays"])
    await fleet.publish(python_process(fleet.root, "relay", RELAY))

    first = await fleet.client.request(JobStart(process="relay", group="relays", input={"depth": 2, "group": "relays"}))
    chain = [await fleet.wait_job(first.id, JobState.SUCCESSFUL, timeout=60)]
    while (chain[-1].output or {}).get("next"):
        assert chain[-1].output is not None and chain[-1].output["state"] == "Pending"  # its robot ran the parent
        chain.append(await fleet.wait_job(chain[-1].output["next"], JobState.SUCCESSFUL, timeout=60))
    assert [job.input["depth"] for job in chain] == [2, 1, 0]
    assert [job.parent_job for job in chain] == [None, chain[0].id, chain[1].id]
    assert {job.robot for job in chain} == {"r1"}
    assert [[child.id for child in await children_of(fleet, job.id)] for job in chain] == [
        [chain[1].id],
        [chain[2].id],
        [],
    ]

    # `herder job show` prints the chain: the parent and the children, as text and as JSON.
    middle = chain[1]
    shown = await herder(fleet, tmp_path, "job", "show", middle.id[:8])
    lines = shown.splitlines()
    assert f"id             {middle.id}" in lines
    assert f"parent         {chain[0].id} relay Successful" in lines
    assert lines[-2:] == ["children       1", f"  {chain[2].id} relay Successful"]
    assert not any(line.startswith("trigger") for line in lines)
    as_json = json.loads(await herder(fleet, tmp_path, "job", "show", middle.id, "--json"))
    assert (as_json["id"], as_json["parent_job"], as_json["state"]) == (middle.id, chain[0].id, "Successful")
    brief = {"process": "relay", "version": "1.0.0", "state": "Successful", "robot": "r1"}
    assert as_json["parent"] == {"id": chain[0].id, **brief}
    assert as_json["children"] == [{"id": chain[2].id, **brief}]
    top = json.loads(await herder(fleet, tmp_path, "job", "show", chain[0].id, "--json"))
    assert (top["parent"], [child["id"] for child in top["children"]]) == (None, [chain[1].id])
    last = (await herder(fleet, tmp_path, "job", "show", chain[2].id)).splitlines()
    assert "children       -" in last and f"parent         {chain[1].id} relay Successful" in last


async def herder(fleet: Fleet, root: Path, *args: str) -> str:
    """Run the `herder` CLI against the fleet as its admin; its stdout (it must exit 0)."""
    token_file = root / "admin.token"
    token_file.write_text(fleet.admin_token)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HERDER_")}
    command = [sys.executable, "-m", "herder.cli.app", *args, "--url", fleet.nats_url, "--token-file", str(token_file)]
    done = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout
