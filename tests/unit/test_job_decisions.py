"""The jobs service's decisions about a job's record, as tables: reports, losing a robot, waiting for it, its return."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from herder.protocol.errors import Conflict
from herder.protocol.jobs import JobReport, JobState, OnRobotLost, Outcome, Priority, WhenBusy
from herder.protocol.packages import EntryKind, EntryPoint, PackageRef
from herder.services.jobs import decisions
from herder.services.jobs.allocation import Target
from herder.services.jobs.records import JobRecord

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(minutes=3)
P, R, SG, T = JobState.PENDING, JobState.RUNNING, JobState.STOPPING, JobState.TERMINATING
OK, F, ST = JobState.SUCCESSFUL, JobState.FAULTED, JobState.STOPPED
JOB_ID = "0123456789abcdef" * 2
PACKAGE = PackageRef(
    process="p",
    version="1",
    sha256="a" * 64,
    size=1,
    object="a" * 64,
    entry=EntryPoint(kind=EntryKind.COMMAND, target="true"),
)


def job(
    state: JobState = R,
    *,
    policy: OnRobotLost = OnRobotLost.FAULT,
    lost_at: datetime | None = None,
    attempt: int = 1,
    robot: str | None = "r1",
    lost_after_s: float = 600.0,
) -> JobRecord:
    return JobRecord(
        id=JOB_ID,
        tenant="default",
        process="p",
        version="1",
        package=PACKAGE,
        priority=Priority.NORMAL,
        state=state,
        reason="",
        attempt=attempt,
        input={},
        created_at=T0,
        target_group="pool",
        robot=robot,
        host="box1" if robot else None,
        session="s1" if robot else None,
        on_robot_lost=policy,
        lost_after_s=lost_after_s,
        lost_at=lost_at,
        started_at=T0,
        ended_at=T0 + timedelta(minutes=1) if state.final else None,
    )


def report(
    outcome: Outcome, *, attempt: int = 1, error: str | None = None, output: dict[str, int] | None = None
) -> JobReport:
    return JobReport(job_id=JOB_ID, attempt=attempt, outcome=outcome, error=error, output=output)


# --- reports ---


@pytest.mark.parametrize(("state", "outcome", "expected"), [
    (R, Outcome.SUCCESSFUL, OK),
    (R, Outcome.FAULTED, F),
    (R, Outcome.STOPPED, ST),
    (R, Outcome.TERMINATING, T),
    (SG, Outcome.SUCCESSFUL, OK),
    (SG, Outcome.STOPPED, ST),
    (T, Outcome.SUCCESSFUL, ST),  # a hard stop was asked: its result is not trusted
    (T, Outcome.STOPPED, ST),
])  # fmt: skip
def test_a_report_of_the_current_attempt_moves_the_job(state: JobState, outcome: Outcome, expected: JobState) -> None:
    decision = decisions.report(job(state), "r1", report(outcome, output={"n": 1}), LATER)
    assert decision is not None and decision.after.state is expected and not decision.corrected
    if expected.final:
        assert decision.after.ended_at == LATER
        assert decision.after.output == {"n": 1}


def test_a_report_of_another_robot_or_an_older_attempt_is_refused() -> None:
    with pytest.raises(Conflict, match="stale report"):
        decisions.report(job(R, attempt=2), "r1", report(Outcome.SUCCESSFUL, attempt=1), LATER)
    with pytest.raises(Conflict, match="stale report"):
        decisions.report(job(R), "r2", report(Outcome.SUCCESSFUL), LATER)


@pytest.mark.parametrize("state", [OK, F, ST])
def test_a_report_of_a_job_that_ended_by_itself_is_refused(state: JobState) -> None:
    with pytest.raises(Conflict, match=f"a job that is {state.value}"):
        decisions.report(job(state), "r1", report(Outcome.SUCCESSFUL), LATER)


@pytest.mark.parametrize(("ended", "outcome", "expected"), [
    (F, Outcome.SUCCESSFUL, OK),
    (F, Outcome.FAULTED, F),
    (F, Outcome.STOPPED, ST),
    (ST, Outcome.SUCCESSFUL, ST),  # it was being hard-stopped when its robot was lost: Stopped, as asked
])  # fmt: skip
def test_a_late_report_of_the_same_attempt_corrects_robot_lost(
    ended: JobState, outcome: Outcome, expected: JobState
) -> None:
    lost = decisions.lose(job(T if ended is ST else R), "is Unresponsive", T0, certain=False)
    assert lost is not None and lost.state is ended and lost.lost_at == T0
    decision = decisions.report(lost, "r1", report(outcome, error="ValueError: x", output={"n": 2}), LATER)
    assert decision is not None and decision.corrected
    assert decision.after.state is expected
    assert "reported late: herder had lost contact with robot r1 at 2026-12-01 09:00:00 UTC" in decision.after.reason
    assert decision.after.output == {"n": 2}
    assert decision.after.lost_at is None  # corrected once: a second late report is refused
    with pytest.raises(Conflict):
        decisions.report(decision.after, "r1", report(outcome), LATER)


def test_a_late_report_of_an_older_attempt_corrects_nothing() -> None:
    lost = decisions.lose(job(R, attempt=2), "is Unresponsive", T0, certain=False)
    assert lost is not None
    with pytest.raises(Conflict, match="stale report"):
        decisions.report(lost, "r1", report(Outcome.SUCCESSFUL, attempt=1), LATER)


def test_a_late_terminating_report_waits_for_the_final_one() -> None:
    lost = decisions.lose(job(R), "is Unresponsive", T0, certain=False)
    assert lost is not None
    assert decisions.report(lost, "r1", report(Outcome.TERMINATING), LATER) is None


def test_a_report_ends_a_wait_for_the_robot() -> None:
    held = job(R, policy=OnRobotLost.REQUEUE, lost_at=T0)
    decision = decisions.report(held, "r1", report(Outcome.SUCCESSFUL), LATER)
    assert decision is not None and decision.after.state is OK and decision.after.lost_at is None


# --- losing a robot ---


@pytest.mark.parametrize(("state", "policy", "certain", "expected", "held"), [
    (R, OnRobotLost.FAULT, False, F, False),
    (R, OnRobotLost.FAULT, True, F, False),
    (R, OnRobotLost.REQUEUE, False, R, True),  # it may only be cut off: wait for it
    (R, OnRobotLost.REQUEUE, True, P, False),  # its attempt is known not to run
    (SG, OnRobotLost.REQUEUE, False, F, False),  # it was being stopped: not run again
    (SG, OnRobotLost.FAULT, False, F, False),
    (T, OnRobotLost.REQUEUE, False, ST, False),
    (T, OnRobotLost.FAULT, True, ST, False),
])  # fmt: skip
def test_losing_a_robot(state: JobState, policy: OnRobotLost, certain: bool, expected: JobState, held: bool) -> None:
    after = decisions.lose(job(state, policy=policy), "is Unresponsive", T0, certain=certain)
    assert after is not None and after.state is expected
    assert (after.state is R and after.lost_at is not None) is held
    if expected is P:
        assert after.robot is None and after.attempt == 1  # the next start counts on from it
        assert after.reason.startswith("re-queued after robot lost")
    if expected.final:
        assert after.reason == "robot lost: robot r1 is Unresponsive" and after.lost_at == T0


def test_a_held_job_says_until_when_it_waits_and_is_not_held_twice() -> None:
    held = decisions.lose(job(R, policy=OnRobotLost.REQUEUE, lost_after_s=600), "is Unresponsive", T0, certain=False)
    assert held is not None
    assert held.reason == (
        "robot r1 lost contact at 2026-12-01 09:00:00 UTC; re-queued at 2026-12-01 09:10:00 UTC unless it comes back"
    )
    assert decisions.lose(held, "is Unresponsive", LATER, certain=False) is None


@pytest.mark.parametrize(("elapsed_s", "requeued"), [(0, False), (599.9, False), (600, True), (9000, True)])
def test_a_held_job_runs_again_once_its_wait_is_over(elapsed_s: float, requeued: bool) -> None:
    held = job(R, policy=OnRobotLost.REQUEUE, lost_at=T0, lost_after_s=600)
    after = decisions.overdue(held, T0 + timedelta(seconds=elapsed_s))
    assert (after is not None) is requeued
    if after is not None:
        assert after.state is P and after.lost_at is None
        assert after.reason.endswith("did not come back within 10 min")


@pytest.mark.parametrize("state", [P, OK, F, ST, SG, T])
def test_only_a_held_running_job_is_ever_overdue(state: JobState) -> None:
    assert decisions.overdue(job(state, lost_at=T0), T0 + timedelta(days=1)) is None
    assert decisions.overdue(job(R), T0 + timedelta(days=1)) is None


# --- a robot back ---


def test_a_robot_back_goes_on_with_a_held_job() -> None:
    held = job(R, policy=OnRobotLost.REQUEUE, lost_at=T0)
    answer = decisions.resume(held, "r1", 1)
    assert answer.keep_running and answer.after is not None
    assert answer.after.lost_at is None and answer.after.state is R
    assert "is back; it kept running the job" in answer.after.reason


def test_a_robot_back_goes_on_with_a_job_herder_never_gave_up() -> None:
    answer = decisions.resume(job(R), "r1", 1)
    assert answer.keep_running and answer.after is None


@pytest.mark.parametrize("state", [OK, F, ST])
def test_a_robot_back_kills_a_job_that_ended_meanwhile(state: JobState) -> None:
    answer = decisions.resume(replace(job(state), reason="robot lost: robot r1 is Unresponsive"), "r1", 1)
    assert not answer.keep_running and answer.after is None
    assert "herder ended it meanwhile" in answer.reason


def test_a_robot_back_with_an_older_attempt_or_no_job_stops() -> None:
    assert not decisions.resume(job(R, attempt=2, robot="r2"), "r1", 1).keep_running
    assert not decisions.resume(None, "r1", 1).keep_running
    assert not decisions.resume(job(R), "r1", None).keep_running


def test_a_robot_back_without_its_held_job_lets_it_run_elsewhere_at_once() -> None:
    held = job(R, policy=OnRobotLost.REQUEUE, lost_at=T0)
    after = decisions.not_running(held, "r1")
    assert after is not None and after.state is P and after.reason == "re-queued: robot r1 came back without it"
    assert decisions.not_running(job(R), "r1") is None  # not waiting for the robot: nothing to do


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({}, None),
        ({"trigger": "t", "max_concurrent": 2, "open_jobs": 1}, None),
        ({"trigger": "t", "max_concurrent": 2, "open_jobs": 2}, "trigger t has 2 jobs Pending or running"),
        ({"trigger": "t", "open_jobs": 50}, None),  # no limit of concurrent jobs
        ({"robot_free": False}, None),  # it waits for a robot
        ({"robot_free": False, "when_busy": WhenBusy.SKIP}, "every robot of group pool is busy or offline"),
        ({"robot_free": False, "when_busy": WhenBusy.SKIP, "target": Target(robot="r1")}, "robot r1 is busy"),
    ],
)
def test_a_start_is_refused_for_its_triggers_limit_or_when_it_skips_a_busy_fleet(
    fields: dict[str, Any], refused: str | None
) -> None:
    arguments: dict[str, Any] = {
        "trigger": None,
        "max_concurrent": None,
        "open_jobs": 0,
        "target": Target(group="pool"),
        "robot_free": True,
        "when_busy": WhenBusy.QUEUE,
        **fields,
    }
    refusal = decisions.refused_start(**arguments)
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refused in refusal.message
