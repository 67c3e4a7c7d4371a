"""Jobs end to end: real robot agents (`herder robot run` as child processes), real scripts, a real
nats-server, on SQLite and PostgreSQL.

The tests about how one script runs (entry points, stops, kills) use SQLite only; the ones about
allocation, robots coming and going and replicas run on both databases.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from herder.client import discovery
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.codec import BEARER, Header
from herder.protocol.errors import BadRequest, Conflict, Forbidden, NotFound
from herder.protocol.jobs import (
    JobInfo,
    JobKill,
    JobListRequest,
    JobOutcomeCorrectedEvent,
    JobReport,
    JobStart,
    JobState,
    JobStop,
    LogStream,
    OnRobotLost,
    Outcome,
    Priority,
    StartCommand,
)
from herder.protocol.messages import Event, utcnow
from herder.protocol.packages import PackageResolve
from herder.protocol.registry import RobotStatus, RobotType
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import HostConfig, ServiceHost
from herder.services.jobs.service import JobsService
from tests.fleet import HEARTBEAT_S, Fleet, command_process, python_process, running_fleet
from tests.support import eventually, migrated

HELLO = """
from herder.robot import sdk

def main(data):
    sdk.log.info("greeting", name=data.get("name", "world"))
    print("hello from stdout")
    return {"greeting": f"Hello, {data.get('name', 'world')}!"}
"""

FAILING = """
def main():
    print("about to fail")
    raise ValueError("no invoice number on page 2")
"""

# Loops until asked to stop, honouring the stop when `honour` is true; appends its job id to a file.
LOOP = """
import os, time
from herder.robot import sdk

def main(data):
    with open(data["marker"], "a") as marker:
        marker.write(os.environ["HERDER_JOB_ID"] + "\\n")
    ignored = False
    for step in range(int(data.get("steps", 600))):
        if data.get("honour", True) and sdk.should_stop():
            sdk.log.info("stopping", step=step)
            return {"stopped_at": step}
        if not data.get("honour", True) and os.path.exists(os.environ["HERDER_JOB_STOP_FILE"]) and not ignored:
            ignored = True
            sdk.log.info("ignoring the soft stop", step=step)
        time.sleep(0.05)
    return {"steps": step + 1}
"""

STUBBORN = """
import signal, time

def main():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
    while True:
        time.sleep(0.05)
"""

# Appends its job id to a shared file: the proof of how often each job ran.
RECORD = """
import os

def main(data):
    with open(data["marker"], "a") as marker:
        marker.write(os.environ["HERDER_JOB_ID"] + "\\n")
"""

RF_SUITE = """
*** Tasks ***
Say Hello
    Log To Console    hello from Robot Framework
"""


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    """The whole of herder on SQLite and on PostgreSQL."""
    async with running_fleet(nats_url, db_url, tmp_path, credential) as fleet:
        yield fleet


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database."""
    return migrated(f"sqlite:///{tmp_path / 'herder.db'}")


@pytest.fixture
async def lite(nats_url: str, sqlite_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    """The whole of herder on SQLite, for what does not depend on the database."""
    async with running_fleet(nats_url, sqlite_url, tmp_path, credential) as fleet:
        yield fleet


async def _held(fleet: Fleet, job_id: str) -> JobInfo | None:
    """The job, once it waits for its lost robot to come back."""
    job = await fleet.job(job_id)
    return job if job.lost_at is not None else None


def ran(marker: Path) -> list[str]:
    """The job ids a marker file recorded, in order."""
    return marker.read_text().split() if marker.exists() else []


# --- entry points ---


async def test_a_python_entry_point_runs_to_successful_with_its_output_and_logs(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "hello", HELLO))
    job = await lite.client.request(JobStart(process="hello", robot="r1", input={"name": "Ada"}))
    assert job.attempt == 1 and job.state is JobState.RUNNING

    done = await lite.wait_job(job.id, JobState.SUCCESSFUL)
    assert done.output == {"greeting": "Hello, Ada!"}
    assert done.started_at is not None and done.ended_at is not None and done.robot == "r1"

    records = await eventually(lambda: _complete(lite, job.id))
    by_stream = {(r.stream, r.message) for r in records}
    assert (LogStream.STDOUT, "hello from stdout") in by_stream
    sdk = next(r for r in records if r.stream is LogStream.SDK)
    assert (sdk.message, sdk.fields, sdk.level.value) == ("greeting", {"name": "Ada"}, "info")
    assert records[-1].stream is LogStream.END and "Successful" in records[-1].message
    robot_lines = [r.seq for r in records if r.stream is not LogStream.END]
    assert robot_lines == sorted(robot_lines)


async def _complete(fleet: Fleet, job_id: str) -> list:  # type: ignore[type-arg]
    records = await fleet.logs(job_id)
    return records if records and records[-1].stream is LogStream.END else []


async def test_command_and_robot_framework_entry_points(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(
        command_process(lite.root, "shell", ["./run.sh", "fine"], {"run.sh": '#!/bin/sh\necho "arg $1"\n'})
    )
    await lite.publish(
        command_process(lite.root, "broken", ["./run.sh"], {"run.sh": "#!/bin/sh\necho oops >&2\nexit 3\n"})
    )
    suite = lite.root / "processes" / "rf"
    suite.mkdir(parents=True)
    (suite / "herder.toml").write_text('name = "rf"\nversion = "1.0.0"\n\n[entry]\nrobot = "hello.robot"\n')
    (suite / "hello.robot").write_text(RF_SUITE)
    await lite.publish(suite)

    shell = await lite.client.request(JobStart(process="shell", robot="r1"))
    await lite.wait_job(shell.id, JobState.SUCCESSFUL)
    assert any(r.message == "arg fine" for r in await lite.logs(shell.id))

    broken = await lite.client.request(JobStart(process="broken", robot="r1"))
    faulted = await lite.wait_job(broken.id, JobState.FAULTED)
    assert faulted.error is not None and "3" in faulted.error

    rf = await lite.client.request(JobStart(process="rf", robot="r1"))
    await lite.wait_job(rf.id, JobState.SUCCESSFUL, timeout=60)
    assert any("hello from Robot Framework" in r.message for r in await lite.logs(rf.id))


async def test_a_failing_script_is_faulted_with_its_error(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "failing", FAILING))
    job = await lite.client.request(JobStart(process="failing", robot="r1"))
    faulted = await lite.wait_job(job.id, JobState.FAULTED)
    assert faulted.error is not None and "ValueError: no invoice number on page 2" in faulted.error
    assert "no invoice number" in faulted.reason


# --- stopping ---


async def test_a_soft_stop_the_script_honours_ends_stopped(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "loop", LOOP))
    marker = lite.root / "marker"
    job = await lite.client.request(JobStart(process="loop", robot="r1", input={"marker": str(marker)}))
    await eventually(lambda: ran(marker), timeout=20)
    stopping = await lite.client.request(JobStop(id=job.id[:8]))
    assert stopping.state is JobState.STOPPING and "soft stop asked by admin" in stopping.reason
    stopped = await lite.wait_job(job.id, JobState.STOPPED)
    assert stopped.output is not None and "stopped_at" in stopped.output
    with pytest.raises(Conflict, match="already ended"):
        await lite.client.request(JobStop(id=job.id))


async def test_a_job_past_its_stop_after_is_soft_stopped_by_herder(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "loop", LOOP))
    marker = lite.root / "marker"
    # The script ignores the soft stop, so the job stays Stopping, saying who asked and why.
    job = await lite.client.request(
        JobStart(
            process="loop", robot="r1", input={"marker": str(marker), "honour": False}, stop_after_s=1.5, kill_grace_s=2
        )
    )
    assert job.stop_after_s == 1.5
    stopping = await lite.wait_job(job.id, JobState.STOPPING, timeout=30)
    assert "soft stop: it ran for its stop-after of 1.5 s" in stopping.reason
    assert stopping.started_at is not None and (utcnow() - stopping.started_at).total_seconds() >= 1.5
    assert await eventually(lambda: _logged(lite, job.id, "ignoring the soft stop"), timeout=20)
    await lite.client.request(JobKill(id=job.id))
    await lite.wait_job(job.id, JobState.STOPPED)


async def test_a_soft_stop_the_script_ignores_then_a_kill(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "loop", LOOP))
    marker = lite.root / "marker"
    job = await lite.client.request(
        JobStart(process="loop", robot="r1", input={"marker": str(marker), "honour": False}, kill_grace_s=2)
    )
    await eventually(lambda: ran(marker), timeout=20)
    await lite.client.request(JobStop(id=job.id))
    assert await eventually(lambda: _logged(lite, job.id, "ignoring the soft stop"), timeout=20)
    assert (await lite.job(job.id)).state is JobState.STOPPING  # the script saw it, and runs on
    terminating = await lite.client.request(JobKill(id=job.id))
    assert terminating.state is JobState.TERMINATING
    stopped = await lite.wait_job(job.id, JobState.STOPPED)
    assert stopped.output is None or "steps" not in stopped.output


async def test_a_script_that_ignores_sigterm_is_killed_after_the_grace_period(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "stubborn", STUBBORN))
    grace_s = 1.5
    job = await lite.client.request(JobStart(process="stubborn", robot="r1", kill_grace_s=grace_s))
    await eventually(lambda: _logged(lite, job.id, "ignoring SIGTERM"), timeout=20)
    asked = time.monotonic()
    await lite.client.request(JobKill(id=job.id))
    stopped = await lite.wait_job(job.id, JobState.STOPPED)
    assert time.monotonic() - asked >= grace_s
    assert "SIGKILL" in stopped.reason or "grace" in stopped.reason


async def _logged(fleet: Fleet, job_id: str, text: str) -> bool:
    return any(text in record.message for record in await fleet.logs(job_id))


async def test_a_timeout_is_a_hard_stop_that_says_so(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "loop", LOOP))
    job = await lite.client.request(
        JobStart(process="loop", robot="r1", input={"marker": str(lite.root / "m")}, timeout_s=1.0, kill_grace_s=1)
    )
    stopped = await lite.wait_job(job.id, JobState.STOPPED)
    assert "timed out after 1 s" in stopped.reason


async def test_a_pending_job_is_cancelled_by_stop_or_kill(lite: Fleet) -> None:
    await lite.add_robot("offline")
    await lite.publish(python_process(lite.root, "hello", HELLO))
    first = await lite.client.request(JobStart(process="hello", robot="offline"))
    second = await lite.client.request(JobStart(process="hello", robot="offline"))
    assert (await lite.client.request(JobStop(id=first.id))).state is JobState.STOPPED
    killed = await lite.client.request(JobKill(id=second.id))
    assert killed.state is JobState.STOPPED and "cancelled by admin before it started" in killed.reason


# --- robots coming and going ---


async def test_a_job_for_an_offline_robot_waits_and_starts_when_it_connects(fleet: Fleet) -> None:
    token = await fleet.add_robot("r1")
    await fleet.publish(python_process(fleet.root, "hello", HELLO))
    job = await fleet.client.request(JobStart(process="hello", robot="r1"))
    assert job.state is JobState.PENDING
    assert "robot r1 is offline" in job.reason and "starts when it is back" in job.reason
    listed = (await fleet.client.request(JobListRequest(states=[JobState.PENDING]))).jobs
    assert [j.reason for j in listed] == [job.reason]

    fleet.start_robot("r1", token)
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL)
    assert done.robot == "r1" and done.attempt == 1


async def test_robot_killed_mid_job_faults_it_within_three_heartbeats(fleet: Fleet) -> None:
    robot = await fleet.run_robot("r1")
    await fleet.publish(python_process(fleet.root, "loop", LOOP))
    marker = fleet.root / "marker"
    job = await fleet.client.request(JobStart(process="loop", robot="r1", input={"marker": str(marker)}))
    await eventually(lambda: ran(marker), timeout=20)
    robot.kill9()
    killed_at = time.monotonic()
    faulted = await fleet.wait_job(job.id, JobState.FAULTED, timeout=10)
    elapsed = time.monotonic() - killed_at
    assert faulted.reason.startswith("robot lost") and "Unresponsive" in faulted.reason
    assert faulted.error is not None and "robot lost" in faulted.error
    # Three heartbeat intervals, with a little room for the sweep and the event to travel.
    assert elapsed <= 3 * HEARTBEAT_S + 1.0, elapsed


async def test_a_job_that_asks_to_be_requeued_runs_again_with_a_new_attempt(fleet: Fleet) -> None:
    """Its robot is lost: the job first waits for the robot to come back (it may only be cut off), and
    runs again elsewhere once the wait is over."""
    first = await fleet.run_robot("r1", groups=["pool"])
    await fleet.publish(python_process(fleet.root, "loop", LOOP))
    marker = fleet.root / "marker"
    job = await fleet.client.request(
        JobStart(
            process="loop",
            group="pool",
            input={"marker": str(marker), "steps": 20},
            on_robot_lost=OnRobotLost.REQUEUE,
            lost_after_s=3.0,
        )
    )
    await eventually(lambda: ran(marker), timeout=20)
    first.kill9()
    held = await eventually(lambda: _held(fleet, job.id), timeout=10)
    assert held.state is JobState.RUNNING and held.robot == "r1"
    assert "robot r1 lost contact at" in held.reason and "unless it comes back" in held.reason
    requeued = await fleet.wait_job(job.id, JobState.PENDING, timeout=10)
    assert "did not come back within 3 s" in requeued.reason

    await fleet.run_robot("r2", groups=["pool"])
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL)
    assert (done.robot, done.attempt) == ("r2", 2)
    assert ran(marker) == [job.id, job.id]


async def test_a_robot_back_with_a_lost_job_still_running_is_cleaned_up_before_its_next_job(fleet: Fleet) -> None:
    """A robot frozen longer than three heartbeats loses its job; when it comes back still running
    that job's script, the script is hard-stopped and the robot takes its next job."""
    robot = await fleet.run_robot("r1")
    await fleet.publish(python_process(fleet.root, "loop", LOOP))
    await fleet.publish(python_process(fleet.root, "record", RECORD))
    lost = await fleet.client.request(JobStart(process="loop", robot="r1", input={"marker": str(fleet.root / "m1")}))
    await eventually(lambda: ran(fleet.root / "m1"), timeout=20)
    os.kill(robot.process.pid, signal.SIGSTOP)  # the agent freezes; its script runs on
    try:
        faulted = await fleet.wait_job(lost.id, JobState.FAULTED, timeout=10)
        assert faulted.reason.startswith("robot lost")
        following = await fleet.client.request(
            JobStart(process="record", robot="r1", input={"marker": str(fleet.root / "m2")})
        )
        assert following.state is JobState.PENDING
    finally:
        os.kill(robot.process.pid, signal.SIGCONT)
    done = await fleet.wait_job(following.id, JobState.SUCCESSFUL, timeout=40)
    assert done.robot == "r1" and ran(fleet.root / "m2") == [following.id]
    # The lost job's script did not run on: the robot killed it once it knew the job had ended.
    assert await eventually(lambda: _logged(fleet, lost.id, "herder had ended it meanwhile"), timeout=10)
    assert (await fleet.job(lost.id)).state is JobState.FAULTED  # its late report was refused


async def test_an_unstorable_output_faults_its_job_and_the_robot_reports_on(lite: Fleet) -> None:
    """A script returns a value no database can hold: the job is Faulted saying why, and the agent's
    report loop lives on to report the next job."""
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "huge", "def main(data):\n    return {'total': 10**30}\n"))
    await lite.publish(python_process(lite.root, "record", RECORD))
    job = await lite.client.request(JobStart(process="huge", robot="r1"))
    faulted = await lite.wait_job(job.id, JobState.FAULTED)
    assert faulted.reason.startswith("output is not storable: output.total: ") and faulted.output is None
    following = await lite.client.request(
        JobStart(process="record", robot="r1", input={"marker": str(lite.root / "m")})
    )
    assert (await lite.wait_job(following.id, JobState.SUCCESSFUL)).robot == "r1"


async def test_a_package_past_the_robots_limit_faults_its_job_and_leaves_nothing(lite: Fleet) -> None:
    robot_work = lite.root / "robots" / "r1"
    await lite.run_robot("r1", options=["--max-package-size", "64KiB"])
    folder = python_process(lite.root, "bulky", "def main(data):\n    return {}\n")
    (folder / "data.bin").write_bytes(os.urandom(256 * 1024))  # random: the archive stays as large
    await lite.publish(folder)
    job = await lite.client.request(JobStart(process="bulky", robot="r1"))
    faulted = await lite.wait_job(job.id, JobState.FAULTED)
    assert "unpacks to more than 64 KiB (the robot's limit)" in faulted.reason, faulted.reason
    assert not [path for path in robot_work.rglob("data.bin")]  # nothing of it was left on the robot
    await lite.publish(python_process(lite.root, "record", RECORD))
    following = await lite.client.request(
        JobStart(process="record", robot="r1", input={"marker": str(lite.root / "m")})
    )
    assert (await lite.wait_job(following.id, JobState.SUCCESSFUL)).robot == "r1"


async def test_a_frozen_robot_kills_its_orphan_at_once_with_nothing_else_queued(fleet: Fleet) -> None:
    """Frozen past three heartbeats with no next job: once it thaws, the robot learns its job was
    ended and hard-stops the script there and then, rather than letting it run to its end."""
    robot = await fleet.run_robot("r1")
    await fleet.publish(python_process(fleet.root, "loop", LOOP))
    # 600 steps of 50 ms: half a minute of work the script would go on doing.
    job = await fleet.client.request(JobStart(process="loop", robot="r1", input={"marker": str(fleet.root / "m")}))
    await eventually(lambda: ran(fleet.root / "m"), timeout=20)
    os.kill(robot.process.pid, signal.SIGSTOP)
    try:
        faulted = await fleet.wait_job(job.id, JobState.FAULTED, timeout=10)
        assert faulted.reason.startswith("robot lost")
    finally:
        os.kill(robot.process.pid, signal.SIGCONT)
    assert await eventually(lambda: _logged(fleet, job.id, "herder had ended it meanwhile"), timeout=15)
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE, timeout=15)
    # The script is gone: no process of the robot's work folder runs it any more.
    assert await eventually(lambda: not _scripts_of(robot.process.pid), timeout=10)
    after = await fleet.job(job.id)
    assert after.state is JobState.FAULTED and after.output is None  # the orphan reported nothing


def _scripts_of(pid: int) -> list[int]:
    """Child processes of `pid` still alive (the scripts an agent runs)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


async def test_a_late_report_of_the_same_attempt_corrects_robot_lost(fleet: Fleet) -> None:
    """herder recorded "robot lost" without the robot; the robot's own report of that attempt is the
    truth and replaces it, once, with an event saying so. The agent itself is killed, so the report is
    sent as it would have sent it from its spool."""
    token = await fleet.add_robot("r1")
    robot = fleet.start_robot("r1", token)
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE)
    await fleet.publish(python_process(fleet.root, "loop", LOOP))
    job = await fleet.client.request(JobStart(process="loop", robot="r1", input={"marker": str(fleet.root / "m")}))
    await eventually(lambda: ran(fleet.root / "m"), timeout=20)
    robot.kill9()
    lost = await fleet.wait_job(job.id, JobState.FAULTED, timeout=10)
    assert lost.reason.startswith("robot lost")

    corrections: asyncio.Queue[Event] = asyncio.Queue()

    async def keep(msg: Msg) -> None:
        await corrections.put(codec.load(Event, msg.data))

    subject = subjects.event_type_subject("default", JobOutcomeCorrectedEvent.event_type)
    # As a client reads events: from the tenant's stream (it may not listen on the events' subjects).
    await fleet.nc.jetstream().subscribe(
        subject, stream=subjects.events_stream("default"), cb=keep, ordered_consumer=True
    )
    as_r1 = Client(fleet.nc, token=token)
    report = JobReport(job_id=job.id, attempt=1, outcome=Outcome.SUCCESSFUL, output={"steps": 600}, exit_code=0)
    await as_r1.request(report)
    with pytest.raises(Conflict):
        await as_r1.request(report)

    corrected = await fleet.job(job.id)
    assert corrected.state is JobState.SUCCESSFUL and corrected.output == {"steps": 600}
    assert corrected.error is None
    assert "reported late: herder had lost contact with robot r1 at" in corrected.reason
    event = await asyncio.wait_for(corrections.get(), timeout=5)
    assert event.data["job_id"] == job.id
    assert (event.data["previous"], event.data["state"]) == ("Faulted", "Successful")
    # Corrected once: the same report again (above), or another outcome, is refused.
    with pytest.raises(Conflict):
        await as_r1.request(report.model_copy(update={"outcome": Outcome.FAULTED}))
    assert (await fleet.job(job.id)).state is JobState.SUCCESSFUL


async def test_two_robots_of_a_group_share_twenty_jobs_and_none_runs_twice(fleet: Fleet) -> None:
    await _share_twenty_jobs(fleet)


async def test_two_jobs_service_replicas_never_run_a_job_twice(
    fleet: Fleet, nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential
) -> None:
    replica = ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=db_url,
            services=(JobsService,),
            credential=credential,
            data_dir=tmp_path,
            migrate=False,
        )
    )
    await replica.start()
    try:
        await _share_twenty_jobs(fleet)
        # Both replicas took start requests (NATS shares them out), so both allocated jobs.
        stats = [reply for reply in await discovery.gather(fleet.nc) if reply["name"] == "jobs"]
        assert len(stats) == 2
        for reply in stats:
            assert any(e["name"] == "start" and e["num_requests"] > 0 for e in reply["endpoints"]), stats
    finally:
        await replica.stop()


async def _share_twenty_jobs(fleet: Fleet) -> None:
    await fleet.run_robot("r1", groups=["pool"])
    await fleet.run_robot("r2", groups=["pool"])
    await fleet.publish(python_process(fleet.root, "record", RECORD))
    marker = fleet.root / "marker"
    jobs = await asyncio.gather(
        *(
            fleet.client.request(JobStart(process="record", group="pool", input={"marker": str(marker)}))
            for _ in range(20)
        )
    )
    done = [await fleet.wait_job(job.id, JobState.SUCCESSFUL, timeout=60) for job in jobs]
    assert sorted(ran(marker)) == sorted(job.id for job in jobs)  # each ran exactly once
    assert all(job.attempt == 1 for job in done)
    assert {job.robot for job in done} == {"r1", "r2"}


async def test_a_report_of_a_stale_attempt_or_another_robot_is_refused(fleet: Fleet) -> None:
    token = await fleet.add_robot("r1")
    other = await fleet.add_robot("r2")
    fleet.start_robot("r1", token)
    await fleet.wait_robot("r1", RobotStatus.AVAILABLE)
    await fleet.publish(python_process(fleet.root, "loop", LOOP))
    job = await fleet.client.request(JobStart(process="loop", robot="r1", input={"marker": str(fleet.root / "m")}))
    assert job.attempt == 1
    as_r1, as_r2 = Client(fleet.nc, token=token), Client(fleet.nc, token=other)
    for client, attempt in ((as_r1, 2), (as_r1, 7), (as_r2, 1)):
        with pytest.raises(Conflict, match="stale report"):
            await client.request(JobReport(job_id=job.id, attempt=attempt, outcome=Outcome.SUCCESSFUL))
    with pytest.raises(Forbidden):
        await fleet.client.request(JobReport(job_id=job.id, attempt=1, outcome=Outcome.SUCCESSFUL))
    assert (await fleet.job(job.id)).state is JobState.RUNNING
    await fleet.client.request(JobKill(id=job.id))
    await fleet.wait_job(job.id, JobState.STOPPED)


async def test_a_robot_takes_the_highest_priority_then_oldest_job_first(fleet: Fleet) -> None:
    token = await fleet.add_robot("r1")
    await fleet.publish(python_process(fleet.root, "record", RECORD))
    marker = fleet.root / "marker"
    order = [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.NORMAL, Priority.HIGH]
    jobs = [
        await fleet.client.request(JobStart(process="record", robot="r1", priority=p, input={"marker": str(marker)}))
        for p in order
    ]
    listed = {j.id: j.reason for j in (await fleet.client.request(JobListRequest())).jobs}
    assert all("robot r1 is offline" in listed[job.id] for job in jobs)
    fleet.start_robot("r1", token)
    for job in jobs:
        await fleet.wait_job(job.id, JobState.SUCCESSFUL)
    expected = [jobs[2].id, jobs[4].id, jobs[1].id, jobs[3].id, jobs[0].id]
    assert ran(marker) == expected


async def test_a_pending_job_says_which_job_keeps_its_robot_busy(lite: Fleet) -> None:
    await lite.run_robot("r1")
    await lite.publish(python_process(lite.root, "loop", LOOP))
    busy = await lite.client.request(JobStart(process="loop", robot="r1", input={"marker": str(lite.root / "m")}))
    waiting = await lite.client.request(JobStart(process="loop", robot="r1", input={"marker": str(lite.root / "m")}))
    assert waiting.state is JobState.PENDING
    assert waiting.reason == f"robot r1 is busy with job {busy.id[:12]}"
    await lite.client.request(JobKill(id=busy.id))
    await lite.wait_job(waiting.id, JobState.RUNNING)
    await lite.client.request(JobKill(id=waiting.id))
    await lite.wait_job(waiting.id, JobState.STOPPED)


# --- bad input ---


async def test_unknown_names_attended_robots_and_bad_input_are_refused(lite: Fleet) -> None:
    await lite.add_robot("r1", groups=["pool"])
    await lite.add_robot("desk", robot_type=RobotType.ATTENDED, groups=["people"])
    await lite.publish(python_process(lite.root, "hello", HELLO))
    with pytest.raises(NotFound, match="no process named 'nope'"):
        await lite.client.request(JobStart(process="nope", robot="r1"))
    with pytest.raises(NotFound, match=r"has no version '9\.9'"):
        await lite.client.request(JobStart(process="hello", version="9.9", robot="r1"))
    with pytest.raises(NotFound, match="no robot named 'ghost'"):
        await lite.client.request(JobStart(process="hello", robot="ghost"))
    with pytest.raises(NotFound, match="no robot is in group 'nobody'"):
        await lite.client.request(JobStart(process="hello", group="nobody"))
    with pytest.raises(Conflict, match="robot desk is attended"):
        await lite.client.request(JobStart(process="hello", robot="desk"))
    with pytest.raises(Conflict, match="only attended robots"):
        await lite.client.request(JobStart(process="hello", group="people"))
    with pytest.raises(NotFound, match="no job 0000"):
        await lite.client.request(JobStop(id="0000"))

    for body in (
        {"process": "hello", "robot": "r1", "input": [1, 2]},
        {"process": "hello", "robot": "r1", "group": "pool"},
        {"process": "hello"},
        {"process": "hello", "robot": "r1", "priority": "Urgent"},
    ):
        reply = await lite.nc.request(
            subjects.service(lite.tenant, "jobs", "start"),
            json.dumps(body).encode(),
            headers={Header.AUTHORIZATION: BEARER + lite.admin_token, Header.CONTENT_TYPE: codec.JSON},
        )
        with pytest.raises(BadRequest):
            codec.raise_error_reply(reply.data, reply.headers or {})
    reply = await lite.nc.request(
        subjects.service(lite.tenant, "jobs", "start"),
        b"{not json",
        headers={Header.AUTHORIZATION: BEARER + lite.admin_token, Header.CONTENT_TYPE: codec.JSON},
    )
    with pytest.raises(BadRequest):
        codec.raise_error_reply(reply.data, reply.headers or {})
    assert (await lite.client.request(JobListRequest())).jobs == []


async def test_a_corrupted_package_is_never_run(lite: Fleet) -> None:
    await lite.run_robot("r1")
    marker = lite.root / "marker"
    version = await lite.publish(python_process(lite.root, "record", RECORD))
    # Someone who can write JetStream directly (a service) swaps the stored archive for other bytes.
    assert lite.host.nc is not None
    store = await lite.host.nc.jetstream().object_store(subjects.packages_bucket("default"))
    await store.put(version.sha256, b"not the package that was published")
    job = await lite.client.request(JobStart(process="record", robot="r1", input={"marker": str(marker)}))
    faulted = await lite.wait_job(job.id, JobState.FAULTED)
    assert "package hash mismatch" in faulted.reason
    assert not marker.exists()


# --- idempotency ---


async def test_a_start_sent_five_times_under_one_key_makes_one_job_also_across_a_restart(fleet: Fleet) -> None:
    """An integrator that retries a start (it timed out during a crash, say) never makes a second job."""
    request = JobStart(process="record", robot="r1", input={"marker": "unused"})
    key = "0123456789abcdef0123456789abcdef"
    await fleet.add_robot("r1")  # not running: the job waits for it
    await fleet.publish(python_process(fleet.root, "record", RECORD))
    replies = [await fleet.client.request(request, idempotency_key=key) for _ in range(5)]
    assert len({reply.id for reply in replies}) == 1
    assert all(reply == replies[0] for reply in replies)
    assert len((await fleet.client.request(JobListRequest())).jobs) == 1
    # The key in the body, as a JSON caller sends it, is the same key.
    as_json = Client(fleet.nc, token=fleet.admin_token, content_type="application/json")
    assert (await as_json.request(request.model_copy(update={"request_id": key}))).id == replies[0].id

    # The services restart on the same database: the key still holds.
    await fleet.host.stop()
    restarted = ServiceHost(fleet.host.config)
    await restarted.start()
    try:
        again = await fleet.client.request(request, idempotency_key=key)
        assert again == replies[0]
        assert len((await fleet.client.request(JobListRequest())).jobs) == 1
        # Another request under the same key is refused, and creates nothing.
        with pytest.raises(Conflict, match="was used for a different request"):
            await fleet.client.request(request.model_copy(update={"priority": Priority.HIGH}), idempotency_key=key)
        assert len((await fleet.client.request(JobListRequest())).jobs) == 1
    finally:
        await restarted.stop()


async def test_a_start_sent_again_after_its_run_ended_is_not_run_twice(fleet: Fleet) -> None:
    """herder sends a start again when it has no acknowledgement on record, which an outage can
    swallow; a robot that has already run that attempt acknowledges it and runs nothing."""
    await fleet.run_robot("r1")
    await fleet.publish(python_process(fleet.root, "record", RECORD))
    marker = fleet.root / "marker"
    job = await fleet.client.request(JobStart(process="record", robot="r1", input={"marker": str(marker)}))
    done = await fleet.wait_job(job.id, JobState.SUCCESSFUL)
    jobs = fleet.host.services["jobs"]
    assert isinstance(jobs, JobsService)
    presence = jobs.directory.get(fleet.tenant, "r1")
    assert presence is not None and presence.session is not None
    again = StartCommand(
        job_id=done.id,
        attempt=done.attempt,
        session=presence.session,
        package=await fleet.client.request(PackageResolve(process="record", version=done.version)),
        input={"marker": str(marker)},
    )
    # Sent as the jobs service sends a start again.
    ack = await jobs.commands.deliver(fleet.tenant, presence.host, "r1", again)
    assert ack is not None
    assert ack.accepted and "already ran" in ack.detail
    await asyncio.sleep(1.0)  # a second run would have written its marker by now
    assert marker.read_text().splitlines() == [done.id]
