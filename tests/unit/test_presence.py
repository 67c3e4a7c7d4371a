"""Robot presence, whole: every status against every event an agent or the sweep can bring."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from herder.protocol.registry import MISSED_HEARTBEATS, RobotStatus
from herder.services.registry.presence import (
    Change,
    Seen,
    accepts,
    deadline,
    grace,
    on_connect,
    on_goodbye,
    on_heartbeat,
    on_sweep,
    working_status,
)

AV, BU, UN, DI = RobotStatus.AVAILABLE, RobotStatus.BUSY, RobotStatus.UNRESPONSIVE, RobotStatus.DISCONNECTED

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
INTERVAL_S = 5.0


def seen(
    status: RobotStatus,
    session: str | None = "s1",
    *,
    last_heartbeat: datetime | None = T0,
    interval_s: float = INTERVAL_S,
    current_job: str | None = None,
) -> Seen:
    """What the registry holds about robot r1."""
    if current_job is None and status is BU:
        current_job = "job-old"
    return Seen(status, session, last_heartbeat, interval_s, current_job)


def test_three_missed_heartbeats_make_a_robot_unresponsive() -> None:
    assert MISSED_HEARTBEATS == 3  # the reasons below spell the number out


# --- deadline, working_status ---


@pytest.mark.parametrize(
    ("interval_s", "after"),
    [
        (0.1, timedelta(milliseconds=300)),
        (2.5, timedelta(seconds=7.5)),
        (5.0, timedelta(seconds=15)),
        (300.0, timedelta(minutes=15)),
    ],
)
def test_deadline_is_missed_heartbeats_times_interval(interval_s: float, after: timedelta) -> None:
    assert deadline(T0, interval_s) == T0 + after
    assert deadline(T0, interval_s) == T0 + MISSED_HEARTBEATS * timedelta(seconds=interval_s)


def test_deadline_keeps_the_time_zone() -> None:
    paris = timezone(timedelta(hours=2))
    local = T0.astimezone(paris)
    assert deadline(local, INTERVAL_S).tzinfo is paris
    assert deadline(local, INTERVAL_S) == deadline(T0, INTERVAL_S)


@pytest.mark.parametrize(("current_job", "status"), [(None, AV), ("", AV), ("job-1", BU)])
def test_working_status(current_job: str | None, status: RobotStatus) -> None:
    assert working_status(current_job) is status


# --- on_connect ---

# How the connecting session stands to the one the registry holds.
SAME, NEW, FIRST = "same session", "new session", "no session before"
PRIOR = {SAME: "s1", NEW: "s0", FIRST: None}
TOOK_OVER, CONNECTED = "a new agent session took over", "connected"

# (status seen, session, connecting with a job?) -> (new status, reason), or None for no change.
CONNECT: dict[tuple[RobotStatus, str, bool], tuple[RobotStatus, str] | None] = {
    (AV, SAME, False): None,
    (AV, SAME, True): (BU, CONNECTED),
    (AV, NEW, False): (AV, TOOK_OVER),
    (AV, NEW, True): (BU, TOOK_OVER),
    (AV, FIRST, False): (AV, CONNECTED),
    (AV, FIRST, True): (BU, CONNECTED),
    (BU, SAME, False): (AV, CONNECTED),
    (BU, SAME, True): None,
    (BU, NEW, False): (AV, TOOK_OVER),
    (BU, NEW, True): (BU, TOOK_OVER),
    (BU, FIRST, False): (AV, CONNECTED),
    (BU, FIRST, True): (BU, CONNECTED),
    # An agent that had gone quiet, or said goodbye, is simply back: nothing was taken over.
    (UN, SAME, False): (AV, CONNECTED),
    (UN, SAME, True): (BU, CONNECTED),
    (UN, NEW, False): (AV, CONNECTED),
    (UN, NEW, True): (BU, CONNECTED),
    (UN, FIRST, False): (AV, CONNECTED),
    (UN, FIRST, True): (BU, CONNECTED),
    (DI, SAME, False): (AV, CONNECTED),
    (DI, SAME, True): (BU, CONNECTED),
    (DI, NEW, False): (AV, CONNECTED),
    (DI, NEW, True): (BU, CONNECTED),
    (DI, FIRST, False): (AV, CONNECTED),
    (DI, FIRST, True): (BU, CONNECTED),
}


def test_the_connect_table_is_whole() -> None:
    assert set(CONNECT) == set(itertools.product(RobotStatus, PRIOR, (False, True)))


@pytest.mark.parametrize(("status", "session", "with_job"), list(CONNECT))
def test_connect_from_every_status(status: RobotStatus, session: str, with_job: bool) -> None:
    before = seen(status, PRIOR[session])
    change = on_connect(before, "s1", "job-1" if with_job else None)
    expected = CONNECT[status, session, with_job]
    assert change == (None if expected is None else Change(*expected))


def test_a_reconnect_of_a_busy_robot_on_another_job_is_no_change() -> None:
    """The status is what presence tracks; which job a robot runs is the jobs service's business."""
    assert on_connect(seen(BU, current_job="job-1"), "s1", "job-2") is None


# --- on_heartbeat ---

# (status seen, heartbeat names a job?) -> (new status, reason), or None for no change.
HEARTBEAT: dict[tuple[RobotStatus, bool], tuple[RobotStatus, str] | None] = {
    (AV, False): None,
    (AV, True): (BU, "running job job-1"),
    (BU, False): (AV, "idle"),
    (BU, True): None,
    (UN, False): (AV, "heartbeats resumed"),
    (UN, True): (BU, "heartbeats resumed"),
    # Only a late heartbeat of the session that said goodbye gets here (`accepts` keeps that session).
    (DI, False): (AV, CONNECTED),
    (DI, True): (BU, CONNECTED),
}


def test_the_heartbeat_table_is_whole() -> None:
    assert set(HEARTBEAT) == set(itertools.product(RobotStatus, (False, True)))


@pytest.mark.parametrize(("status", "with_job"), list(HEARTBEAT))
def test_heartbeat_in_every_status(status: RobotStatus, with_job: bool) -> None:
    change = on_heartbeat(seen(status), "s1", "job-1" if with_job else None)
    expected = HEARTBEAT[status, with_job]
    assert change == (None if expected is None else Change(*expected))


def test_a_busy_robot_moving_to_another_job_is_no_change() -> None:
    assert on_heartbeat(seen(BU, current_job="job-1"), "s1", "job-2") is None


@pytest.mark.parametrize("job_id", ["j", "0123456789abcdef0123456789abcdef"])
def test_the_busy_reason_names_the_whole_job_id(job_id: str) -> None:
    assert on_heartbeat(seen(AV), "s1", job_id) == Change(BU, f"running job {job_id}")


# --- accepts ---

# (session held, session of the heartbeat) -> counts?
ACCEPTS = {
    ("s1", "s1"): True,
    ("s1", "s0"): False,  # a replaced agent
    (None, "s1"): False,  # never connected
}


@pytest.mark.parametrize(("status", "held", "arriving"), [(s, h, a) for s in RobotStatus for h, a in ACCEPTS])
def test_accepts_only_the_current_session_in_every_status(status: RobotStatus, held: str | None, arriving: str) -> None:
    assert accepts(seen(status, held), arriving) is ACCEPTS[held, arriving]


# --- on_goodbye ---

SHUT_DOWN = Change(DI, "the agent shut down")


@pytest.mark.parametrize(("status", "held", "leaving"), [(s, h, a) for s in RobotStatus for h, a in ACCEPTS])
def test_goodbye_in_every_status(status: RobotStatus, held: str | None, leaving: str) -> None:
    change = on_goodbye(seen(status, held), leaving)
    if ACCEPTS[held, leaving] and status is not DI:
        assert change == SHUT_DOWN
    else:
        assert change is None


def test_a_replaced_agent_saying_goodbye_leaves_its_successor_alone() -> None:
    """The old agent of a robot shuts down after a new one took over: the robot stays online."""
    after_takeover = seen(AV, "s2")
    assert on_goodbye(after_takeover, "s1") is None
    assert on_goodbye(after_takeover, "s2") == SHUT_DOWN


# --- on_sweep ---

TICK = timedelta(microseconds=1)
DUE = T0 + timedelta(seconds=MISSED_HEARTBEATS * INTERVAL_S)

# When the sweep runs, against the deadline of the last heartbeat.
WHEN = {
    "just after the heartbeat": T0,
    "one interval later": T0 + timedelta(seconds=INTERVAL_S),
    "just before the deadline": DUE - TICK,
    "at the deadline": DUE,
    "after the deadline": DUE + TICK,
    "an hour later": T0 + timedelta(hours=1),
}
PAST = {"at the deadline", "after the deadline", "an hour later"}
MISSED = Change(UN, "missed 3 heartbeats (every 5 s)")


@pytest.mark.parametrize(("status", "when"), list(itertools.product(RobotStatus, WHEN)))
def test_sweep_in_every_status_at_every_time(status: RobotStatus, when: str) -> None:
    change = on_sweep(seen(status), WHEN[when])
    if status.online and when in PAST:
        assert change == MISSED
    else:
        assert change is None


@pytest.mark.parametrize("status", list(RobotStatus))
def test_sweep_leaves_a_robot_that_never_heartbeated(status: RobotStatus) -> None:
    assert on_sweep(seen(status, last_heartbeat=None), T0 + timedelta(days=1)) is None


@pytest.mark.parametrize(
    ("interval_s", "shown"), [(0.1, "0.1"), (0.5, "0.5"), (2.5, "2.5"), (5.0, "5"), (10.0, "10"), (300.0, "300")]
)
def test_sweep_uses_the_robots_own_interval(interval_s: float, shown: str) -> None:
    robot = seen(AV, interval_s=interval_s)
    due = T0 + timedelta(seconds=MISSED_HEARTBEATS * interval_s)
    assert on_sweep(robot, due - TICK) is None
    assert on_sweep(robot, due) == Change(UN, f"missed 3 heartbeats (every {shown} s)")


def test_sweep_compares_instants_not_wall_clocks() -> None:
    tokyo = timezone(timedelta(hours=9))
    assert on_sweep(seen(BU), (DUE - TICK).astimezone(tokyo)) is None
    assert on_sweep(seen(BU), DUE.astimezone(tokyo)) == MISSED


def test_sweep_agrees_with_deadline() -> None:
    robot = seen(AV, interval_s=7.0)
    due = deadline(T0, 7.0)
    assert on_sweep(robot, due - TICK) is None
    assert on_sweep(robot, due) is not None


# --- a robot's life, event by event ---


def test_a_robots_life() -> None:
    """Each change applied to what the registry holds, as the service does."""
    state = Seen(DI, None, None, INTERVAL_S, None)
    events: list[Change | None] = []

    def apply(change: Change | None, *, session: str | None, beat: datetime | None, job: str | None) -> None:
        nonlocal state
        events.append(change)
        status = change.status if change else state.status
        state = Seen(status, session, beat, INTERVAL_S, job)

    apply(on_connect(state, "s1", None), session="s1", beat=T0, job=None)
    apply(on_heartbeat(state, "s1", "job-1"), session="s1", beat=T0 + timedelta(seconds=5), job="job-1")
    assert not accepts(state, "s0")
    apply(on_sweep(state, T0 + timedelta(seconds=20)), session="s1", beat=state.last_heartbeat, job="job-1")
    apply(on_heartbeat(state, "s1", None), session="s1", beat=T0 + timedelta(seconds=25), job=None)
    apply(on_connect(state, "s2", None), session="s2", beat=T0 + timedelta(seconds=26), job=None)
    assert on_goodbye(state, "s1") is None
    apply(on_goodbye(state, "s2"), session="s2", beat=state.last_heartbeat, job=None)

    assert events == [
        Change(AV, "connected"),
        Change(BU, "running job job-1"),
        Change(UN, "missed 3 heartbeats (every 5 s)"),
        Change(AV, "heartbeats resumed"),
        Change(AV, "a new agent session took over"),
        Change(DI, "the agent shut down"),
    ]
    assert on_sweep(state, T0 + timedelta(days=1)) is None


# --- grace: a registry that starts, or comes back to NATS ---


@pytest.mark.parametrize("status", [AV, BU])
def test_a_registry_back_gives_every_online_robot_a_full_grace(status: RobotStatus) -> None:
    """Heartbeats that nobody heard prove nothing: a robot last heard of long ago is not Unresponsive
    until three of its intervals after the registry is back."""
    robot = seen(status)
    back = T0 + timedelta(minutes=5)  # an outage of five minutes: far past the heartbeat deadline
    until = grace(robot, back)
    assert until == back + timedelta(seconds=MISSED_HEARTBEATS * INTERVAL_S)
    held = replace(robot, grace_until=until)
    assert on_sweep(held, until - timedelta(microseconds=1)) is None
    assert on_sweep(held, until) == Change(UN, f"missed 3 heartbeats (every {INTERVAL_S:g} s)")


@pytest.mark.parametrize("status", [UN, DI])
def test_an_offline_robot_gets_no_grace(status: RobotStatus) -> None:
    assert grace(seen(status), T0) is None


def test_a_grace_never_shortens_what_a_heartbeat_gave() -> None:
    robot = replace(seen(AV, last_heartbeat=T0), grace_until=T0 - timedelta(hours=1))
    assert on_sweep(robot, deadline(T0, INTERVAL_S) - timedelta(microseconds=1)) is None
