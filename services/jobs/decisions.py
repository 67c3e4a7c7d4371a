"""What becomes of a job's record when something happens to it: the jobs service's decisions, free of I/O.

The service loads a job, asks one of these functions, writes what it answers and publishes the
events; `states` says which moves exist, these say which one to make and why. The rules that keep
outcomes true across outages live here:

- A robot that misses its heartbeats may only be cut off, not dead. A job of such a robot that
  asks to be re-queued is not run again at once: it keeps its robot and waits, saying until when
  (`lost_after_s`), for the robot to come back; it runs again elsewhere only once herder knows the
  first attempt is not running (the robot came back without it, or it has been gone that long). A
  job that asks to fault ends Faulted "robot lost" at once.
- Losing a robot for certain (it said goodbye, was removed, or its agent restarted, which ends its
  jobs' processes) needs no wait: the attempt is not running.
- A late report of the *same* attempt is the truth: a job herder ended "robot lost" takes the
  outcome its robot reports, and says so. A report of an older attempt is refused.
- A robot back from an outage (or a freeze) says what it runs; a job that ended here meanwhile is
  killed there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from herder.protocol.errors import Conflict
from herder.protocol.jobs import JobReport, JobState, OnRobotLost, Outcome, WhenBusy
from herder.services.jobs import states
from herder.services.jobs.allocation import Target
from herder.services.jobs.records import JobRecord, requeued

LOST = "robot lost"


@dataclass(frozen=True, slots=True)
class Decision:
    """A job's record as it is to become; `corrected` when a late report replaces an outcome herder
    had recorded without the robot."""

    after: JobRecord
    corrected: bool = False


def _at(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


# --- reports ---


def report(job: JobRecord, robot: str, request: JobReport, now: datetime) -> Decision | None:
    """What a robot's report makes of its job; None when it changes nothing, `Conflict` when refused
    (another robot's job, an older attempt, a job that ended otherwise)."""
    if job.robot != robot or request.attempt != job.attempt:
        raise Conflict(
            f"stale report: job {job.id[:12]} is at attempt {job.attempt} on robot {job.robot or 'none'}; "
            f"this report is of attempt {request.attempt} from robot {robot}"
        )
    if job.state.final:
        return _correction(job, request, now)
    state = states.report(job.state, request.outcome)
    if state is job.state:
        # The robot says it hard-stops the job itself (its timeout); a held job is held no more.
        return Decision(replace(job, lost_at=None)) if job.lost_at is not None else None
    after = replace(
        job,
        state=state,
        reason=report_reason(job, state, request),
        start_acked_at=job.start_acked_at or now,
        lost_at=None,
    )
    if state.final:
        after = replace(
            after,
            ended_at=now,
            error=request.error if state is JobState.FAULTED else None,
            output=request.output,
            exit_code=request.exit_code,
        )
    return Decision(after)


def _correction(job: JobRecord, request: JobReport, now: datetime) -> Decision | None:
    """A report of a job already ended: the truth if herder ended it without the robot, else refused."""
    if job.lost_at is None:
        raise Conflict(f"the robot reported on a job that is {job.state.value}")
    if request.outcome is Outcome.TERMINATING:
        return None  # an interim report: the final one follows
    # A job ended while being hard-stopped is Stopped whatever the script did; otherwise the robot knows.
    state = JobState.STOPPED if job.state is JobState.STOPPED else _OUTCOME_STATES[request.outcome]
    reason = report_reason(replace(job, state=JobState.RUNNING), state, request)
    after = replace(
        job,
        state=state,
        reason=f"{reason} (reported late: herder had lost contact with robot {job.robot} at {_at(job.lost_at)})",
        error=request.error if state is JobState.FAULTED else None,
        output=request.output,
        exit_code=request.exit_code,
        ended_at=job.ended_at or now,
        lost_at=None,
    )
    return Decision(after, corrected=True)


_OUTCOME_STATES = {
    Outcome.SUCCESSFUL: JobState.SUCCESSFUL,
    Outcome.FAULTED: JobState.FAULTED,
    Outcome.STOPPED: JobState.STOPPED,
}


def report_reason(job: JobRecord, state: JobState, request: JobReport) -> str:
    """How a robot's report explains the job's new state, in one line."""
    if state is JobState.FAULTED and request.error and request.error.strip():
        # The error says more than "exited with code 1": its last line names the exception.
        reason = request.error.strip().splitlines()[-1][:200]
    elif state is JobState.SUCCESSFUL:
        reason = "completed"
    elif request.reason:
        reason = request.reason
    elif state is JobState.FAULTED:
        reason = "the script failed"
    elif state is JobState.TERMINATING:
        reason = "the robot is hard-stopping it"
    else:
        reason = "stopped"
    if job.state is JobState.TERMINATING and request.outcome is not Outcome.STOPPED:
        reason = f"hard-stopped; the script had ended {request.outcome.value} meanwhile"
    return reason


# --- losing a robot ---


def lose(job: JobRecord, why: str, now: datetime, *, certain: bool) -> JobRecord | None:
    """What becomes of an active job whose robot is gone: `why` it is gone, in words ("is Unresponsive");
    `certain` when the attempt is known not to run any more. None when nothing changes (a job already
    waiting for its robot to come back)."""
    if job.state is JobState.RUNNING and job.on_robot_lost is OnRobotLost.REQUEUE:
        if certain:
            return requeued(job, reason=f"re-queued after {LOST}: robot {job.robot} {why}")
        if job.lost_at is not None:
            return None
        back_by = now + timedelta(seconds=job.lost_after_s)
        return replace(
            job,
            lost_at=now,
            reason=(f"robot {job.robot} lost contact at {_at(now)}; re-queued at {_at(back_by)} unless it comes back"),
        )
    state = states.lose(job.state, job.on_robot_lost)
    lost_at = job.lost_at or now
    error = f"{LOST}: robot {job.robot} {why}" if state is JobState.FAULTED else None
    # `lost_at` stays on an ended job: the robot's own report of this attempt may still correct it.
    return replace(
        job, state=state, reason=f"{LOST}: robot {job.robot} {why}", error=error, ended_at=now, lost_at=lost_at
    )


def overdue(job: JobRecord, now: datetime) -> JobRecord | None:
    """A job waiting for its robot to come back whose wait is over: re-queued; else None."""
    if job.state is not JobState.RUNNING or job.lost_at is None:
        return None
    if now < job.lost_at + timedelta(seconds=job.lost_after_s):
        return None
    return requeued(
        job,
        reason=(
            f"re-queued: robot {job.robot} lost contact at {_at(job.lost_at)} and did not come back "
            f"within {_span(job.lost_after_s)}"
        ),
    )


# --- a robot back ---


@dataclass(frozen=True, slots=True)
class Resumption:
    """What herder answers a robot back from an outage about the run it has."""

    keep_running: bool
    reason: str
    after: JobRecord | None = None  # the job's record as it is to become, if it changes


def resume(job: JobRecord | None, robot: str, attempt: int | None) -> Resumption:
    """A robot back from an outage says it runs `job` at `attempt`: whether it should go on."""
    if job is None or attempt is None:
        return Resumption(keep_running=False, reason="herder has no such job")
    if job.robot != robot or job.attempt != attempt:
        return Resumption(keep_running=False, reason=f"the job runs as attempt {job.attempt} now, elsewhere")
    if job.state.final:
        return Resumption(keep_running=False, reason=f"herder ended it meanwhile ({job.state.value}: {job.reason})")
    if job.lost_at is not None:
        back = replace(job, lost_at=None, reason=f"robot {robot} is back; it kept running the job")
        return Resumption(keep_running=True, reason=back.reason, after=back)
    return Resumption(keep_running=True, reason="running")


def not_running(job: JobRecord, robot: str) -> JobRecord | None:
    """A robot back from an outage runs nothing (or another job): a job of it still waiting for it
    to come back runs again elsewhere now; None for one that does not wait."""
    if job.state is not JobState.RUNNING or job.lost_at is None:
        return None
    return requeued(job, reason=f"re-queued: robot {robot} came back without it")


def refused_start(
    *,
    trigger: str | None,
    max_concurrent: int | None,
    open_jobs: int,
    target: Target,
    robot_free: bool,
    when_busy: WhenBusy,
) -> Conflict | None:
    """Why a start must make no job: its trigger has `max_concurrent` jobs open already, or no robot
    it may run on is free and it says to skip then. None: it makes its job."""
    if trigger is not None and max_concurrent is not None and open_jobs >= max_concurrent:
        return Conflict(f"trigger {trigger} has {open_jobs} jobs Pending or running, its limit of concurrent jobs")
    if not robot_free and when_busy is WhenBusy.SKIP:
        who = f"every robot of group {target.group} is" if target.group is not None else f"robot {target.robot} is"
        return Conflict(f"{who} busy or offline, and this start skips then")
    return None
