"""A job's state machine: which transitions exist, and what each request or report does to a job.

Pure: no I/O. Every illegal transition is refused with `Conflict`, naming the job's state.

    Pending     → Running       a robot took the job
    Pending     → Stopped       cancelled (stop or kill) before it started
    Running     → Successful | Faulted | Stopped    the robot reported the end
    Running     → Stopping      a soft stop was asked
    Running     → Terminating   a hard stop was asked, or the job's timeout passed
    Running     → Pending       re-queued: its robot was lost and the job asks to run again, or
                                the robot could not start it (still busy with another)
    Stopping    → Successful | Faulted | Stopped    the robot reported the end
    Stopping    → Terminating   a hard stop was asked after the soft one
    Terminating → Stopped       the robot reported the end (whatever the script did meanwhile)
"""

from __future__ import annotations

from herder.protocol.errors import Conflict
from herder.protocol.jobs import JobState, OnRobotLost, Outcome

P, R, SG, T = JobState.PENDING, JobState.RUNNING, JobState.STOPPING, JobState.TERMINATING
OK, F, ST = JobState.SUCCESSFUL, JobState.FAULTED, JobState.STOPPED

TRANSITIONS: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (P, R),
        (P, ST),
        (R, OK),
        (R, F),
        (R, ST),
        (R, SG),
        (R, T),
        (R, P),
        (SG, OK),
        (SG, F),
        (SG, ST),
        (SG, T),
        (T, ST),
    }
)

_OUTCOMES = {Outcome.SUCCESSFUL: OK, Outcome.FAULTED: F, Outcome.STOPPED: ST}


def allowed(current: JobState, target: JobState) -> bool:
    """Whether a job may go from `current` to `target`."""
    return (current, target) in TRANSITIONS


def check(current: JobState, target: JobState) -> JobState:
    """`target`, if a job in `current` may move there; otherwise `Conflict`."""
    if not allowed(current, target):
        raise Conflict(f"a {current.value} job cannot become {target.value}")
    return target


def _ended(current: JobState) -> Conflict:
    return Conflict(f"the job has already ended ({current.value})")


def stop(current: JobState) -> JobState:
    """A soft stop: a Pending job is cancelled, a Running one is asked to stop itself."""
    if current is P:
        return check(current, ST)
    if current is R:
        return check(current, SG)
    if current.final:
        raise _ended(current)
    raise Conflict(f"the job is already {current.value}")


def kill(current: JobState) -> JobState:
    """A hard stop: a Pending job is cancelled, a Running or Stopping one is terminated."""
    if current is P:
        return check(current, ST)
    if current in (R, SG):
        return check(current, T)
    if current.final:
        raise _ended(current)
    raise Conflict(f"the job is already {current.value}")


def report(current: JobState, outcome: Outcome) -> JobState:
    """What a robot's report makes of a job.

    A job being terminated ends Stopped whatever the script did meanwhile: the hard stop was asked,
    and its result is not to be trusted. A report that the robot itself began a hard stop (its
    timeout passed) moves a Running or Stopping job to Terminating, and changes nothing more.
    """
    if current.final or current is P:
        raise Conflict(f"the robot reported on a job that is {current.value}")
    if outcome is Outcome.TERMINATING:
        return current if current is T else check(current, T)
    if current is T:
        return check(current, ST)
    return check(current, _OUTCOMES[outcome])


def lose(current: JobState, policy: OnRobotLost) -> JobState:
    """What becomes of an active job whose robot was lost (stopped answering, restarted, or removed).

    A Running job is Faulted, or re-queued when it asks for that; a job being soft-stopped is Faulted
    (it did not get to stop itself); a job being hard-stopped ends Stopped, as asked.
    """
    if current is R:
        return check(current, P if policy is OnRobotLost.REQUEUE else F)
    if current is SG:
        return check(current, F)
    if current is T:
        return check(current, ST)
    raise Conflict(f"a {current.value} job holds no robot to lose")
