"""Allocation, whole: who may take a job, in what order, and the sentence a Pending job shows."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from herder.protocol.jobs import Priority
from herder.protocol.registry import RobotPresence, RobotStatus, RobotType
from herder.services.jobs.allocation import (
    Queued,
    Target,
    ahead,
    idle_candidates,
    members,
    ordinal,
    pending_reason,
    positions,
    takes_jobs,
)

AV, BU, UN, DI = RobotStatus.AVAILABLE, RobotStatus.BUSY, RobotStatus.UNRESPONSIVE, RobotStatus.DISCONNECTED
ATT, UNATT = RobotType.ATTENDED, RobotType.UNATTENDED
ONLINE = {AV, BU}

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def bot(name: str, *groups: str, status: RobotStatus = AV, kind: RobotType = UNATT) -> RobotPresence:
    """A robot of tenant acme, in `groups`."""
    return RobotPresence(name=name, tenant="acme", type=kind, host="h1", groups=list(groups), status=status)


def job(id: str, target: Target, *, priority: Priority = Priority.NORMAL, minute: int = 0) -> Queued:
    """A Pending job created `minute` minutes after T0."""
    return Queued(id=id, target=target, rank=priority.rank, created_at=T0 + timedelta(minutes=minute))


def names(robots: Sequence[RobotPresence]) -> list[str]:
    return [robot.name for robot in robots]


ROBOT_R1 = Target(robot="r1")
GROUP_G = Target(group="g")


# --- Target ---


@pytest.mark.parametrize(
    ("target", "robot", "admitted"),
    [
        (ROBOT_R1, bot("r1"), True),
        (ROBOT_R1, bot("r1", "g"), True),
        (ROBOT_R1, bot("r2"), False),
        (ROBOT_R1, bot("r2", "r1"), False),  # a group named like the robot is not the robot
        (GROUP_G, bot("r1", "g"), True),
        (GROUP_G, bot("r1", "other", "g"), True),
        (GROUP_G, bot("r1", "other"), False),
        (GROUP_G, bot("r1"), False),
        (GROUP_G, bot("g"), False),  # a robot named like the group is not in it
        (Target(), bot("r1", "g"), False),
        # A target naming a robot is about that robot alone, whatever group it also names.
        (Target(robot="r1", group="g"), bot("r1"), True),
        (Target(robot="r1", group="g"), bot("r2", "g"), False),
    ],
)
def test_admits(target: Target, robot: RobotPresence, admitted: bool) -> None:
    assert target.admits(robot) is admitted


@pytest.mark.parametrize(("status", "kind"), list(itertools.product(RobotStatus, RobotType)))
def test_admits_ignores_status_and_type(status: RobotStatus, kind: RobotType) -> None:
    robot = bot("r1", "g", status=status, kind=kind)
    assert ROBOT_R1.admits(robot)
    assert GROUP_G.admits(robot)


@pytest.mark.parametrize(
    ("target", "described"),
    [
        (Target(robot="r1"), "robot r1"),
        (Target(group="finance"), "group finance"),
        (Target(robot="r1", group="finance"), "robot r1"),
    ],
)
def test_describe(target: Target, described: str) -> None:
    assert target.describe() == described


def test_targets_are_values() -> None:
    assert Target(group="g") == GROUP_G
    assert hash(Target(group="g")) == hash(GROUP_G)
    assert Target(robot="g") != GROUP_G
    assert {Target(robot="r1"): 1}[ROBOT_R1] == 1


# --- Queued.order ---


def test_order_is_rank_then_age_then_id() -> None:
    queued = job("j1", GROUP_G, priority=Priority.LOW, minute=3)
    assert queued.order == (2, T0 + timedelta(minutes=3), "j1")


def test_priority_before_age_before_id() -> None:
    queue = [
        job("normal-old", GROUP_G, priority=Priority.NORMAL, minute=0),
        job("low-oldest", GROUP_G, priority=Priority.LOW, minute=-10),
        job("high-new", GROUP_G, priority=Priority.HIGH, minute=5),
        job("normal-new-b", GROUP_G, priority=Priority.NORMAL, minute=1),
        job("normal-new-a", GROUP_G, priority=Priority.NORMAL, minute=1),
        job("high-newest", GROUP_G, priority=Priority.HIGH, minute=9),
    ]
    ordered = [queued.id for queued in sorted(queue, key=lambda queued: queued.order)]
    assert ordered == ["high-new", "high-newest", "normal-old", "normal-new-a", "normal-new-b", "low-oldest"]


# --- takes_jobs, members ---


@pytest.mark.parametrize(("status", "kind"), list(itertools.product(RobotStatus, RobotType)))
def test_takes_jobs_only_unattended_and_online(status: RobotStatus, kind: RobotType) -> None:
    expected = kind is UNATT and status in ONLINE
    assert takes_jobs(bot("r1", status=status, kind=kind)) is expected


def test_members_keeps_the_order_given_and_every_status_and_type() -> None:
    fleet = [
        bot("c", "g", status=DI),
        bot("x", "other"),
        bot("a", "g", kind=ATT),
        bot("b", "other", "g", status=UN),
        bot("r1"),
    ]
    assert names(members(GROUP_G, fleet)) == ["c", "a", "b"]
    assert names(members(ROBOT_R1, fleet)) == ["r1"]
    assert members(Target(robot="gone"), fleet) == []
    assert members(Target(group="empty"), fleet) == []
    assert members(GROUP_G, []) == []


# --- idle_candidates ---


def test_idle_candidates_only_unattended_online_and_free() -> None:
    fleet = [
        bot(f"{kind.value}-{status.value}", "g", status=status, kind=kind)
        for kind in RobotType
        for status in RobotStatus
    ]
    fleet += [bot("busy", "g"), bot("elsewhere", "other")]
    found = idle_candidates(GROUP_G, fleet, busy={"busy": "job-1"}, last_given={})
    assert names(found) == ["unattended-Available", "unattended-Busy"]


def test_least_recently_given_first_then_by_name() -> None:
    fleet = [bot(name, "g") for name in ("a", "b", "c", "d", "e", "f")]
    last_given = {"a": 30.0, "b": 10.0, "c": 20.0, "e": 10.0}
    # d and f never had a job: they come first, by name; b and e tie at 10.0: by name.
    expected = ["d", "f", "b", "e", "c", "a"]
    assert names(idle_candidates(GROUP_G, fleet, {}, last_given)) == expected
    assert names(idle_candidates(GROUP_G, list(reversed(fleet)), {}, last_given)) == expected


def test_with_no_history_candidates_are_by_name() -> None:
    fleet = [bot(name, "g") for name in ("r3", "r1", "r2")]
    assert names(idle_candidates(GROUP_G, fleet, {}, {})) == ["r1", "r2", "r3"]


def test_fairness_rotates_through_a_group() -> None:
    """Giving each job to the first candidate, and stamping it, goes round the group."""
    fleet = [bot(name, "g") for name in ("r1", "r2", "r3")]
    last_given: dict[str, float] = {}
    taken = []
    for clock in range(1, 7):
        first = idle_candidates(GROUP_G, fleet, {}, last_given)[0]
        taken.append(first.name)
        last_given[first.name] = float(clock)
    assert taken == ["r1", "r2", "r3", "r1", "r2", "r3"]


def test_idle_candidates_for_a_robot() -> None:
    fleet = [bot("r1", "g"), bot("r2", "g")]
    assert names(idle_candidates(ROBOT_R1, fleet, {}, {"r2": 0.0, "r1": 99.0})) == ["r1"]
    assert idle_candidates(ROBOT_R1, fleet, {"r1": "job-1"}, {}) == []
    assert idle_candidates(ROBOT_R1, [bot("r1", status=UN)], {}, {}) == []
    assert idle_candidates(ROBOT_R1, [bot("r1", kind=ATT)], {}, {}) == []
    assert idle_candidates(Target(robot="gone"), fleet, {}, {}) == []


# --- positions and ahead ---


def reference(queue: Sequence[Queued], robots: Sequence[RobotPresence]) -> dict[str, int]:
    """The meaning of `positions`, spelled out: earlier jobs whose targets share a robot with this one's."""
    ordered = sorted(queue, key=lambda queued: queued.order)
    found = {}
    for index, queued in enumerate(ordered):
        mine = set(names(members(queued.target, robots)))
        found[queued.id] = sum(1 for other in ordered[:index] if mine & set(names(members(other.target, robots))))
    return found


FLEET = [
    bot("r1", "g1"),
    bot("r2", "g1", "g2"),
    bot("r3", "g2", "g3"),
    bot("r4", "g3"),
    bot("r5", "solo"),
]
G1, G2, G3, SOLO = Target(group="g1"), Target(group="g2"), Target(group="g3"), Target(group="solo")


def test_positions_of_an_empty_queue() -> None:
    assert positions([], FLEET) == {}


def test_one_job_has_nothing_ahead() -> None:
    assert positions([job("j1", G1)], FLEET) == {"j1": 0}


def test_jobs_for_one_robot_queue_by_age_whatever_the_order_given() -> None:
    queue = [
        job("c", Target(robot="r1"), minute=2),
        job("a", Target(robot="r1")),
        job("b", Target(robot="r1"), minute=1),
    ]
    assert positions(queue, FLEET) == {"a": 0, "b": 1, "c": 2}


def test_priority_counts_before_age() -> None:
    queue = [
        job("old-low", G1, priority=Priority.LOW, minute=0),
        job("old-normal", G1, priority=Priority.NORMAL, minute=1),
        job("new-high", G1, priority=Priority.HIGH, minute=2),
    ]
    assert positions(queue, FLEET) == {"new-high": 0, "old-normal": 1, "old-low": 2}


def test_same_rank_and_age_order_by_id() -> None:
    queue = [job("b", G1), job("a", G1)]
    assert positions(queue, FLEET) == {"a": 0, "b": 1}


def test_robot_and_group_targets_compete_only_through_shared_robots() -> None:
    queue = [
        job("for-r1", Target(robot="r1"), minute=0),  # g1 = {r1, r2}
        job("for-g1", G1, minute=1),
        job("for-r2", Target(robot="r2"), minute=2),
        job("for-r1-again", Target(robot="r1"), minute=3),
    ]
    assert positions(queue, FLEET) == {
        "for-r1": 0,
        "for-g1": 1,  # may take r1, which for-r1 wants
        "for-r2": 1,  # for-g1 may take r2; for-r1 may not
        "for-r1-again": 2,  # for-r1 and for-g1; not for-r2
    }


def test_overlapping_groups_chain_but_do_not_carry_over() -> None:
    # g1 = {r1, r2}, g2 = {r2, r3}, g3 = {r3, r4}: g1 and g3 share nothing.
    queue = [job("g1-job", G1, minute=0), job("g3-job", G3, minute=1), job("g2-job", G2, minute=2)]
    assert positions(queue, FLEET) == {"g1-job": 0, "g3-job": 0, "g2-job": 2}


def test_a_group_sharing_no_robot_waits_behind_nothing() -> None:
    queue = [job(f"g1-{n}", G1, minute=n) for n in range(5)] + [job("solo-job", SOLO, minute=9)]
    found = positions(queue, FLEET)
    assert found["solo-job"] == 0
    assert [found[f"g1-{n}"] for n in range(5)] == [0, 1, 2, 3, 4]


def test_jobs_whose_target_has_no_robots_wait_behind_nothing_and_hold_back_nothing() -> None:
    queue = [
        job("gone-1", Target(robot="gone"), minute=0),
        job("empty-1", Target(group="empty"), minute=1),
        job("g1-job", G1, minute=2),
        job("gone-2", Target(robot="gone"), minute=3),
    ]
    assert positions(queue, FLEET) == {"gone-1": 0, "empty-1": 0, "g1-job": 0, "gone-2": 0}


def test_positions_with_no_robots_at_all() -> None:
    queue = [job("a", G1), job("b", G1, minute=1)]
    assert positions(queue, []) == {"a": 0, "b": 0}


def test_positions_count_offline_members_too() -> None:
    """A robot that is offline now may come back: jobs that could use it still compete for it."""
    fleet = [bot("r1", "g1", "g2", status=DI), bot("r2", "g1"), bot("r3", "g2")]
    queue = [job("g2-job", G2, minute=0), job("g1-job", G1, minute=1)]
    assert positions(queue, fleet) == {"g2-job": 0, "g1-job": 1}


def test_positions_agree_with_their_meaning_on_a_mixed_queue() -> None:
    targets = [G1, G2, G3, SOLO, Target(robot="r1"), Target(robot="r3"), Target(robot="gone"), Target(group="none")]
    queue = [
        job(f"j{n:02}", target, priority=list(Priority)[n % 3], minute=(n * 7) % 11)
        for n, target in enumerate(targets * 3)
    ]
    assert positions(queue, FLEET) == reference(queue, FLEET)


@pytest.mark.parametrize(
    ("target", "earlier", "expected"),
    [
        (G1, {}, 0),
        (G1, {G1: 3}, 3),
        (G1, {Target(robot="r1"): 2, Target(robot="r2"): 1, Target(robot="r3"): 7}, 3),
        (G1, {G2: 2, G3: 5}, 2),  # g2 shares r2; g3 shares nothing
        (G2, {G1: 2, G3: 5, SOLO: 4}, 7),
        (Target(robot="r4"), {G3: 1, G2: 10, Target(robot="r4"): 2}, 3),
        (SOLO, {G1: 1, G2: 1, G3: 1}, 0),
        (Target(robot="gone"), {Target(robot="gone"): 4, G1: 1}, 0),
        (G1, {Target(robot="gone"): 4, Target(group="empty"): 2}, 0),
    ],
)
def test_ahead(target: Target, earlier: dict[Target, int], expected: int) -> None:
    assert ahead(target, earlier, FLEET) == expected


def test_ahead_is_what_positions_counts() -> None:
    queue = [job("a", G1), job("b", Target(robot="r3"), minute=1), job("c", G3, minute=2), job("d", G2, minute=3)]
    earlier = {G1: 1, Target(robot="r3"): 1, G3: 1}
    assert positions(queue, FLEET)["d"] == ahead(G2, earlier, FLEET) == 3


def test_sharing_only_an_attended_robot_is_no_competition() -> None:
    fleet = [bot("desk", "a", "b", kind=ATT), bot("ra", "a"), bot("rb", "b", status=BU)]
    queue = [job("b-job", Target(group="b"), minute=0), job("a-job", Target(group="a"), minute=1)]
    found = positions(queue, fleet)
    assert found == {"b-job": 0, "a-job": 0}
    # Which is what the operator then reads for a-job, whose robot ra is free:
    assert pending_reason(Target(group="a"), fleet, {"rb": "job-b"}, found["a-job"]) == "starting on group a"


# --- pending_reason ---

JOB_ID = "0123456789abcdef0123"  # the sentence shows its first 12 characters: 0123456789ab


@pytest.mark.parametrize(
    ("target", "robots", "expected"),
    [
        (Target(robot="r9"), [bot("r1", "r9")], "robot r9 no longer exists"),
        (Target(robot="r9"), [], "robot r9 no longer exists"),
        (Target(group="g"), [bot("r1", "other")], "group g has no robots"),
        (Target(group="g"), [], "group g has no robots"),
    ],
)
def test_reason_when_the_target_names_no_robot(target: Target, robots: list[RobotPresence], expected: str) -> None:
    assert pending_reason(target, robots, {}) == expected


@pytest.mark.parametrize("status", list(RobotStatus))
def test_reason_when_a_group_has_only_attended_robots(status: RobotStatus) -> None:
    robots = [bot("d1", "desk", kind=ATT, status=status), bot("d2", "desk", kind=ATT)]
    expected = "group desk has no unattended robot; only unattended robots take jobs"
    assert pending_reason(Target(group="desk"), robots, {}, ahead=4) == expected


def test_reason_when_the_robot_is_attended() -> None:
    reason = pending_reason(Target(robot="d1"), [bot("d1", kind=ATT)], {})
    assert reason == "robot d1 is attended; only unattended robots take jobs"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (UN, "robot r1 is offline (Unresponsive: it has missed its heartbeats); the job starts when it is back"),
        (DI, "robot r1 is offline (Disconnected: it is not connected); the job starts when it is back"),
    ],
)
def test_reason_when_the_robot_is_offline(status: RobotStatus, expected: str) -> None:
    robots = [bot("r1", "g", status=status), bot("r2", "g")]
    assert pending_reason(ROBOT_R1, robots, {}) == expected
    # Offline says more than busy or a place in the queue.
    assert pending_reason(ROBOT_R1, robots, {"r1": JOB_ID}, ahead=3) == expected


@pytest.mark.parametrize(
    ("statuses", "counts"),
    [
        ([UN], "1 Unresponsive"),
        ([DI], "1 Disconnected"),
        ([DI, DI], "2 Disconnected"),
        ([UN, DI, UN, DI, DI], "3 Disconnected, 2 Unresponsive"),
    ],
)
def test_reason_when_no_robot_of_a_group_is_online(statuses: list[RobotStatus], counts: str) -> None:
    robots = [bot(f"r{n}", "g", status=status) for n, status in enumerate(statuses)]
    robots += [bot("desk", "g", kind=ATT, status=DI), bot("elsewhere", "other")]  # neither is counted
    expected = f"no unattended robot of group g is online ({counts}); the job starts when one is back"
    assert pending_reason(GROUP_G, robots, {}, ahead=2) == expected


@pytest.mark.parametrize(
    ("job_id", "shown"), [(JOB_ID, "0123456789ab"), ("0123456789ab", "0123456789ab"), ("short", "short")]
)
def test_reason_when_the_robot_is_busy(job_id: str, shown: str) -> None:
    robots = [bot("r1", "g"), bot("r2", "g")]
    assert (
        pending_reason(ROBOT_R1, robots, {"r1": job_id, "r2": "other"}, ahead=5) == f"robot r1 is busy with job {shown}"
    )


def busy_group(online: int, offline: int) -> tuple[list[RobotPresence], dict[str, str]]:
    robots = [bot(f"r{n}", "g") for n in range(1, online + 1)]
    robots += [bot(f"off{n}", "g", status=(UN, DI)[n % 2]) for n in range(1, offline + 1)]
    robots += [bot("desk", "g", kind=ATT, status=DI)]  # attended: neither busy nor "more offline"
    return robots, {f"r{n}": f"job{n}-{JOB_ID}" for n in range(1, online + 1)}


@pytest.mark.parametrize(
    ("online", "offline", "expected"),
    [
        (1, 0, "every online unattended robot of group g is busy (r1 with job job1-0123456)"),
        (2, 0, "every online unattended robot of group g is busy (r1 with job job1-0123456, r2 with job job2-0123456)"),
        (
            3,
            0,
            "every online unattended robot of group g is busy "
            "(r1 with job job1-0123456, r2 with job job2-0123456, r3 with job job3-0123456)",
        ),
        (
            4,
            0,
            "every online unattended robot of group g is busy "
            "(r1 with job job1-0123456, r2 with job job2-0123456, r3 with job job3-0123456 and 1 more)",
        ),
        (
            6,
            0,
            "every online unattended robot of group g is busy "
            "(r1 with job job1-0123456, r2 with job job2-0123456, r3 with job job3-0123456 and 3 more)",
        ),
        (1, 1, "every online unattended robot of group g is busy (r1 with job job1-0123456); 1 more offline"),
        (
            5,
            3,
            "every online unattended robot of group g is busy "
            "(r1 with job job1-0123456, r2 with job job2-0123456, r3 with job job3-0123456 and 2 more); "
            "3 more offline",
        ),
    ],
)
def test_reason_when_every_online_robot_of_a_group_is_busy(online: int, offline: int, expected: str) -> None:
    robots, busy = busy_group(online, offline)
    assert pending_reason(GROUP_G, robots, busy, ahead=7) == expected


def test_busy_robots_are_listed_in_the_order_given() -> None:
    robots = [bot("zed", "g"), bot("amy", "g")]
    reason = pending_reason(GROUP_G, robots, {"amy": "a", "zed": "z"})
    assert reason == "every online unattended robot of group g is busy (zed with job z, amy with job a)"


@pytest.mark.parametrize(
    ("target", "robots", "busy", "count", "expected"),
    [
        (ROBOT_R1, [bot("r1")], {}, 1, "2nd in line for robot r1, behind 1 older or higher-priority job"),
        (ROBOT_R1, [bot("r1")], {}, 2, "3rd in line for robot r1, behind 2 older or higher-priority jobs"),
        (GROUP_G, [bot("r1", "g")], {}, 1, "2nd in line for group g, behind 1 older or higher-priority job"),
        (
            GROUP_G,
            [bot("r1", "g"), bot("r2", "g"), bot("r3", "g", status=DI)],
            {"r1": JOB_ID},
            12,
            "13th in line for group g, behind 12 older or higher-priority jobs",
        ),
    ],
)
def test_reason_when_waiting_behind_other_jobs(
    target: Target, robots: list[RobotPresence], busy: dict[str, str], count: int, expected: str
) -> None:
    assert pending_reason(target, robots, busy, count) == expected


def test_jobs_ahead_wait_only_when_they_take_every_free_robot() -> None:
    two_free = [bot("r1", "g"), bot("r2", "g")]
    assert pending_reason(GROUP_G, two_free, {}, 1) == "starting on group g"
    assert pending_reason(GROUP_G, two_free, {}, 2) == "3rd in line for group g, behind 2 older or higher-priority jobs"


@pytest.mark.parametrize(
    ("target", "robots", "busy", "expected"),
    [
        (ROBOT_R1, [bot("r1")], {}, "starting on robot r1"),
        (ROBOT_R1, [bot("r1", status=BU)], {"r2": JOB_ID}, "starting on robot r1"),
        (GROUP_G, [bot("r1", "g")], {}, "starting on group g"),
        # One robot free is enough, whatever the others are doing.
        (
            GROUP_G,
            [bot("r1", "g"), bot("r2", "g", status=UN), bot("r3", "g", kind=ATT), bot("r4", "g")],
            {"r1": JOB_ID},
            "starting on group g",
        ),
    ],
)
def test_reason_when_the_job_is_starting(
    target: Target, robots: list[RobotPresence], busy: dict[str, str], expected: str
) -> None:
    assert pending_reason(target, robots, busy) == expected
    assert pending_reason(target, robots, busy, ahead=0) == expected


@pytest.mark.parametrize(
    ("robots", "busy", "untrue"),
    [
        ([bot("desk", "g", kind=ATT), bot("r1", "g", status=DI)], {}, "no robot of group g is online"),
        ([bot("desk", "g", kind=ATT), bot("r1", "g")], {"r1": JOB_ID}, "every online robot of group g is busy"),
    ],
    ids=["offline", "busy"],
)
def test_group_sentences_do_not_overlook_online_attended_robots(
    robots: list[RobotPresence], busy: dict[str, str], untrue: str
) -> None:
    reason = pending_reason(GROUP_G, robots, busy)
    assert untrue not in reason
    assert "unattended" in reason


@pytest.mark.parametrize(
    ("n", "said"),
    [
        (1, "1st"),
        (2, "2nd"),
        (3, "3rd"),
        (4, "4th"),
        (11, "11th"),
        (12, "12th"),
        (13, "13th"),
        (21, "21st"),
        (102, "102nd"),
        (111, "111th"),
    ],
)
def test_places_in_line_read_as_people_say_them(n: int, said: str) -> None:
    assert ordinal(n) == said
