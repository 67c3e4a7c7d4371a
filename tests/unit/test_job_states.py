"""The job state machine, whole: every pair of states, and every request and report from every state."""

from __future__ import annotations

import itertools

import pytest

from herder.protocol.errors import Conflict
from herder.protocol.jobs import JobState, OnRobotLost, Outcome
from herder.services.jobs import states

P, R, SG, T = JobState.PENDING, JobState.RUNNING, JobState.STOPPING, JobState.TERMINATING
OK, F, ST = JobState.SUCCESSFUL, JobState.FAULTED, JobState.STOPPED

# The table as the issue states it, plus Running → Pending for a job re-queued after its robot was lost.
LEGAL = {
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


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, repeat=2)))
def test_every_pair_of_states(current: JobState, target: JobState) -> None:
    if (current, target) in LEGAL:
        assert states.allowed(current, target)
        assert states.check(current, target) is target
    else:
        assert not states.allowed(current, target)
        with pytest.raises(Conflict, match=f"a {current.value} job cannot become {target.value}"):
            states.check(current, target)


def test_final_states_lead_nowhere() -> None:
    for final in (OK, F, ST):
        assert final.final and not final.active
        assert not any(states.allowed(final, target) for target in JobState)


STOP = {P: ST, R: SG}
KILL = {P: ST, R: T, SG: T}


@pytest.mark.parametrize("current", list(JobState))
def test_soft_stop_from_every_state(current: JobState) -> None:
    if current in STOP:
        assert states.stop(current) is STOP[current]
    else:
        with pytest.raises(Conflict, match="already"):
            states.stop(current)


@pytest.mark.parametrize("current", list(JobState))
def test_hard_stop_from_every_state(current: JobState) -> None:
    if current in KILL:
        assert states.kill(current) is KILL[current]
    else:
        with pytest.raises(Conflict, match="already"):
            states.kill(current)


REPORTS = {
    (R, Outcome.SUCCESSFUL): OK,
    (R, Outcome.FAULTED): F,
    (R, Outcome.STOPPED): ST,
    (R, Outcome.TERMINATING): T,
    (SG, Outcome.SUCCESSFUL): OK,
    (SG, Outcome.FAULTED): F,
    (SG, Outcome.STOPPED): ST,
    (SG, Outcome.TERMINATING): T,
    # Once a hard stop is under way, the job ends Stopped whatever the script managed meanwhile.
    (T, Outcome.SUCCESSFUL): ST,
    (T, Outcome.FAULTED): ST,
    (T, Outcome.STOPPED): ST,
    (T, Outcome.TERMINATING): T,
}


@pytest.mark.parametrize(("current", "outcome"), list(itertools.product(JobState, Outcome)))
def test_robot_reports_from_every_state(current: JobState, outcome: Outcome) -> None:
    if (current, outcome) in REPORTS:
        assert states.report(current, outcome) is REPORTS[current, outcome]
    else:
        with pytest.raises(Conflict, match=f"reported on a job that is {current.value}"):
            states.report(current, outcome)


LOST = {
    (R, OnRobotLost.FAULT): F,
    (R, OnRobotLost.REQUEUE): P,
    (SG, OnRobotLost.FAULT): F,
    (SG, OnRobotLost.REQUEUE): F,
    (T, OnRobotLost.FAULT): ST,
    (T, OnRobotLost.REQUEUE): ST,
}


@pytest.mark.parametrize(("current", "policy"), list(itertools.product(JobState, OnRobotLost)))
def test_losing_the_robot_from_every_state(current: JobState, policy: OnRobotLost) -> None:
    if (current, policy) in LOST:
        assert states.lose(current, policy) is LOST[current, policy]
    else:
        with pytest.raises(Conflict, match="holds no robot"):
            states.lose(current, policy)


def test_every_decision_lands_on_a_legal_transition() -> None:
    decided = (
        {(s, t) for s, t in STOP.items()}
        | {(s, t) for s, t in KILL.items()}
        | {(s, t) for (s, _), t in REPORTS.items() if s is not t}
        | {(s, t) for (s, _), t in LOST.items()}
    )
    assert decided <= LEGAL
    assert decided == LEGAL - {(P, R)}  # the one transition no request makes: allocation does


def test_priorities_rank_high_first() -> None:
    from herder.protocol.jobs import Priority

    assert sorted(Priority, key=lambda p: p.rank) == [Priority.HIGH, Priority.NORMAL, Priority.LOW]
