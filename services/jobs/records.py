"""A job as the jobs service holds it: one row of `jobs_jobs`, and how it looks when started or re-queued.

Pure, and free of SQLAlchemy: the decisions about a job (`decisions`) are made on these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from herder.protocol.jobs import (
    DEFAULT_KILL_GRACE_S,
    DEFAULT_LOST_AFTER_S,
    JobInfo,
    JobState,
    OnRobotLost,
    Priority,
)
from herder.protocol.packages import PackageRef
from herder.services.jobs.allocation import Queued, Target


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One row of `jobs_jobs`."""

    id: str
    tenant: str
    process: str
    version: str
    package: PackageRef
    priority: Priority
    state: JobState
    reason: str
    attempt: int
    input: dict[str, Any]
    created_at: datetime
    target_robot: str | None = None
    target_group: str | None = None
    robot: str | None = None
    host: str | None = None
    session: str | None = None
    output: dict[str, Any] | None = None
    error: str | None = None
    exit_code: int | None = None
    timeout_s: float | None = None
    kill_grace_s: float = DEFAULT_KILL_GRACE_S
    on_robot_lost: OnRobotLost = OnRobotLost.FAULT
    lost_after_s: float = DEFAULT_LOST_AFTER_S
    lost_at: datetime | None = None  # when herder lost contact with the robot running this attempt
    stop_after_s: float | None = None
    stop_at: datetime | None = None  # when the sweep soft-stops this attempt (`stop_after_s` after its start)
    trigger: str | None = None
    parent_job: str | None = None
    created_by: str | None = None
    started_at: datetime | None = None
    start_acked_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def target(self) -> Target:
        """Where the job may run."""
        return Target(robot=self.target_robot, group=self.target_group)

    @property
    def queued(self) -> Queued:
        """The job as the allocator orders it."""
        return Queued(id=self.id, target=self.target, rank=self.priority.rank, created_at=self.created_at)

    def info(self, reason: str | None = None) -> JobInfo:
        """The job as shown to people; `reason` replaces the stored one (a Pending job's is worked out when asked)."""
        return JobInfo(
            id=self.id,
            tenant=self.tenant,
            process=self.process,
            version=self.version,
            state=self.state,
            reason=self.reason if reason is None else reason,
            priority=self.priority,
            target_robot=self.target_robot,
            target_group=self.target_group,
            robot=self.robot,
            host=self.host,
            attempt=self.attempt,
            input=self.input,
            output=self.output,
            error=self.error,
            timeout_s=self.timeout_s,
            stop_after_s=self.stop_after_s,
            kill_grace_s=self.kill_grace_s,
            on_robot_lost=self.on_robot_lost,
            lost_after_s=self.lost_after_s,
            lost_at=self.lost_at,
            trigger=self.trigger,
            parent_job=self.parent_job,
            created_at=self.created_at,
            created_by=self.created_by,
            started_at=self.started_at,
            ended_at=self.ended_at,
        )


def started(record: JobRecord, *, robot: str, host: str, session: str, at: datetime, reason: str) -> JobRecord:
    """`record` as it is once given to a robot: Running, with the next attempt."""
    return replace(
        record,
        state=JobState.RUNNING,
        robot=robot,
        host=host,
        session=session,
        attempt=record.attempt + 1,
        started_at=at,
        start_acked_at=None,
        ended_at=None,
        lost_at=None,
        stop_at=at + timedelta(seconds=record.stop_after_s) if record.stop_after_s is not None else None,
        reason=reason,
    )


def requeued(record: JobRecord, *, reason: str) -> JobRecord:
    """`record` back in Pending, holding no robot (its attempt stays: the next start counts on from it)."""
    return replace(
        record,
        state=JobState.PENDING,
        robot=None,
        host=None,
        session=None,
        started_at=None,
        start_acked_at=None,
        lost_at=None,
        stop_at=None,
        reason=reason,
    )
