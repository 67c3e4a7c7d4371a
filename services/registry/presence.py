"""Whether a robot is there, from its heartbeats: the registry's decisions, free of I/O.

A robot is Available or Busy while it heartbeats (Busy when its heartbeat names a job),
Unresponsive once it has missed MISSED_HEARTBEATS heartbeats in a row, and Disconnected when it
said goodbye on a clean shutdown (or has never connected).

Heartbeats that did not arrive while no registry listened prove nothing: a registry that starts,
or comes back to NATS, gives every online robot a full grace (`grace`) before it may be declared
Unresponsive, so that an orchestrator outage is never taken for the robots' death.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from herder.protocol.registry import MISSED_HEARTBEATS, RobotStatus


@dataclass(frozen=True, slots=True)
class Seen:
    """What the registry holds about a robot's presence."""

    status: RobotStatus
    session: str | None
    last_heartbeat: datetime | None
    interval_s: float
    current_job: str | None
    # Not Unresponsive before this, whatever the last heartbeat says (a grace after the registry was away).
    grace_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A new status for a robot, and why."""

    status: RobotStatus
    reason: str


def deadline(last_heartbeat: datetime, interval_s: float) -> datetime:
    """When a robot heartbeating every `interval_s` has missed MISSED_HEARTBEATS heartbeats."""
    return last_heartbeat + timedelta(seconds=MISSED_HEARTBEATS * interval_s)


def working_status(current_job: str | None) -> RobotStatus:
    """The status of a robot that heartbeats: Busy with a job, else Available."""
    return RobotStatus.BUSY if current_job else RobotStatus.AVAILABLE


def on_connect(seen: Seen, session: str, current_job: str | None) -> Change | None:
    """A robot agent starts a session; it takes over from any earlier one."""
    status = working_status(current_job)
    if status is seen.status and session == seen.session:
        return None
    if seen.session and session != seen.session and seen.status.online:
        return Change(status, "a new agent session took over")
    return Change(status, "connected")


def on_heartbeat(seen: Seen, session: str, current_job: str | None) -> Change | None:
    """A heartbeat of the current session arrived. Heartbeats of another session change nothing:
    that agent has been replaced (see `accepts`)."""
    status = working_status(current_job)
    if status is seen.status:
        return None
    if seen.status is RobotStatus.UNRESPONSIVE:
        return Change(status, "heartbeats resumed")
    if seen.status is RobotStatus.DISCONNECTED:
        return Change(status, "connected")
    return Change(status, f"running job {current_job}" if current_job else "idle")


def accepts(seen: Seen, session: str) -> bool:
    """Whether a heartbeat of `session` counts: only the session that connected last."""
    return seen.session is not None and session == seen.session


def on_goodbye(seen: Seen, session: str) -> Change | None:
    """The agent of `session` shut down cleanly; a goodbye of a replaced session changes nothing."""
    if not accepts(seen, session) or seen.status is RobotStatus.DISCONNECTED:
        return None
    return Change(RobotStatus.DISCONNECTED, "the agent shut down")


def on_sweep(seen: Seen, now: datetime) -> Change | None:
    """Whether an online robot has now missed too many heartbeats."""
    if not seen.status.online or seen.last_heartbeat is None:
        return None
    if now < deadline(seen.last_heartbeat, seen.interval_s):
        return None
    if seen.grace_until is not None and now < seen.grace_until:
        return None
    return Change(
        RobotStatus.UNRESPONSIVE,
        f"missed {MISSED_HEARTBEATS} heartbeats (every {seen.interval_s:g} s)",
    )


def grace(seen: Seen, now: datetime) -> datetime | None:
    """Until when an online robot may not be declared Unresponsive, given a registry that starts (or comes
    back to NATS) at `now`: MISSED_HEARTBEATS of its intervals from then; None for a robot that is offline."""
    if not seen.status.online:
        return None
    return deadline(now, seen.interval_s)
