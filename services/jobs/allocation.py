"""Which robot may run which job, in what order, and why a Pending job has not started. Pure: no I/O.

A robot runs one job at a time. Its next job is the highest-priority, then oldest, Pending job it
may run: one aimed at it by name, or at a group it belongs to. Only unattended robots that are
online (Available or Busy) take jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from herder.protocol.registry import RobotPresence, RobotStatus, RobotType


@dataclass(frozen=True, slots=True)
class Target:
    """Where a job may run: one robot by name, or any robot of a group."""

    robot: str | None = None
    group: str | None = None

    def admits(self, robot: RobotPresence) -> bool:
        """Whether `robot` may run a job with this target."""
        if self.robot is not None:
            return robot.name == self.robot
        return self.group is not None and self.group in robot.groups

    def describe(self) -> str:
        """'robot r1' or 'group finance'."""
        return f"robot {self.robot}" if self.robot is not None else f"group {self.group}"


@dataclass(frozen=True, slots=True)
class Queued:
    """A Pending job as the allocator sees it."""

    id: str
    target: Target
    rank: int
    created_at: datetime

    @property
    def order(self) -> tuple[int, datetime, str]:
        """The order robots take Pending jobs in: priority, then age."""
        return (self.rank, self.created_at, self.id)


def takes_jobs(robot: RobotPresence) -> bool:
    """Whether herder may hand `robot` a job now (ignoring whether it is busy)."""
    return robot.type is RobotType.UNATTENDED and robot.status.online


def members(target: Target, robots: Iterable[RobotPresence]) -> list[RobotPresence]:
    """The robots a target names."""
    return [robot for robot in robots if target.admits(robot)]


def idle_candidates(
    target: Target, robots: Iterable[RobotPresence], busy: Mapping[str, str], last_given: Mapping[str, float]
) -> list[RobotPresence]:
    """The robots that could start a job with this target right now, the one given a job least
    recently first, so that the robots of a group share the work."""
    idle = [robot for robot in members(target, robots) if takes_jobs(robot) and robot.name not in busy]
    return sorted(idle, key=lambda robot: (last_given.get(robot.name, 0.0), robot.name))


def positions(queue: Sequence[Queued], robots: Sequence[RobotPresence]) -> dict[str, int]:
    """For every job of a queue, how many jobs before it could take one of the robots it could run on."""
    names = _robots_of_targets({job.target for job in queue}, robots)
    counts: dict[Target, int] = {}
    found = {}
    for job in sorted(queue, key=lambda queued: queued.order):
        found[job.id] = ahead(job.target, counts, robots, names)
        counts[job.target] = counts.get(job.target, 0) + 1
    return found


def ahead(
    target: Target,
    earlier: Mapping[Target, int],
    robots: Sequence[RobotPresence],
    names: Mapping[Target, frozenset[str]] | None = None,
) -> int:
    """How many of the `earlier` jobs (counted by target) compete for a robot `target` could use."""
    names = names or _robots_of_targets({target, *earlier}, robots)
    mine = names[target]
    return sum(count for other, count in earlier.items() if names[other] & mine)


def _robots_of_targets(targets: Iterable[Target], robots: Sequence[RobotPresence]) -> dict[Target, frozenset[str]]:
    # Jobs compete only for robots that take jobs: attended ones never do.
    unattended = [robot for robot in robots if robot.type is RobotType.UNATTENDED]
    return {target: frozenset(robot.name for robot in members(target, unattended)) for target in targets}


def pending_reason(
    target: Target,
    robots: Sequence[RobotPresence],
    busy: Mapping[str, str],
    ahead: int = 0,
) -> str:
    """Why a Pending job with this target has not started, in words an operator can act on."""
    named = members(target, robots)
    if not named:
        if target.robot is not None:
            return f"robot {target.robot} no longer exists"
        return f"group {target.group} has no robots"
    unattended = [robot for robot in named if robot.type is RobotType.UNATTENDED]
    if not unattended:
        if target.robot is not None:
            return f"robot {target.robot} is attended; only unattended robots take jobs"
        return f"group {target.group} has no unattended robot; only unattended robots take jobs"
    online = [robot for robot in unattended if robot.status.online]
    if not online:
        if target.robot is not None:
            status = unattended[0].status
            how = "has missed its heartbeats" if status is RobotStatus.UNRESPONSIVE else "is not connected"
            return f"robot {target.robot} is offline ({status.value}: it {how}); the job starts when it is back"
        counts = _count_statuses(unattended)
        return f"no unattended robot of group {target.group} is online ({counts}); the job starts when one is back"
    idle = [robot for robot in online if robot.name not in busy]
    if not idle:
        if target.robot is not None:
            return f"robot {target.robot} is busy with job {busy[target.robot][:12]}"
        offline = len(unattended) - len(online)
        also = f"; {offline} more offline" if offline else ""
        jobs = ", ".join(f"{robot.name} with job {busy[robot.name][:12]}" for robot in online[:3])
        more = f" and {len(online) - 3} more" if len(online) > 3 else ""
        return f"every online unattended robot of group {target.group} is busy ({jobs}{more}){also}"
    # As many jobs ahead as free robots take them all; one fewer leaves a robot for this one.
    if ahead >= len(idle):
        jobs = "job" if ahead == 1 else "jobs"
        return f"{ordinal(ahead + 1)} in line for {target.describe()}, behind {ahead} older or higher-priority {jobs}"
    return f"starting on {target.describe()}"


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th … 11th, 12th, 13th … 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _count_statuses(robots: Sequence[RobotPresence]) -> str:
    counts: dict[str, int] = {}
    for robot in robots:
        counts[robot.status.value] = counts.get(robot.status.value, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
