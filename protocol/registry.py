"""Messages of the `registry` service: robots, the hosts they run on, and whether they are there."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints

from herder.protocol.messages import Creating, EventData, Model, Request, matching
from herder.protocol.values import NUL_FREE, SafeText

SERVICE = "registry"

# Robot, host and group names stand as one token of a subject, a key of a bucket and a file name.
Name = Annotated[
    str,
    matching(
        r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}",
        "must be 1 to 63 letters, digits, '-' or '_', starting with a letter or digit (no dots or spaces)",
    ),
]

DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
MIN_HEARTBEAT_INTERVAL_S = 0.1
MAX_HEARTBEAT_INTERVAL_S = 300.0
# A robot that misses this many heartbeats in a row is Unresponsive.
MISSED_HEARTBEATS = 3


class RobotType(StrEnum):
    """Attended robots work beside a person, who starts them; unattended ones take jobs from herder."""

    ATTENDED = "attended"
    UNATTENDED = "unattended"


class RobotStatus(StrEnum):
    """What the registry makes of a robot's heartbeats."""

    AVAILABLE = "Available"  # heartbeating, no job
    BUSY = "Busy"  # heartbeating, running a job
    UNRESPONSIVE = "Unresponsive"  # missed MISSED_HEARTBEATS heartbeats in a row
    DISCONNECTED = "Disconnected"  # said goodbye on a clean shutdown, or never connected

    @property
    def online(self) -> bool:
        """Whether a robot in this status can be reached."""
        return self in (RobotStatus.AVAILABLE, RobotStatus.BUSY)


class RobotInfo(Model):
    """A robot as the registry knows it (never its token)."""

    name: str
    tenant: str
    type: RobotType
    host: str
    groups: list[str] = Field(default_factory=list)
    status: RobotStatus
    status_since: datetime
    last_heartbeat: datetime | None = None
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    current_job: str | None = None
    agent_version: str | None = None
    created_at: datetime
    created_by: str | None = None


class RobotPresence(Model):
    """A robot as projected into the HERDER_ROBOTS bucket for other services: who it is, where, and
    whether it is there (online robots show as Available: which job a robot runs is the jobs
    service's business). `seq` grows with every change, so a reader can drop a stale copy."""

    name: str
    tenant: str
    type: RobotType
    host: str
    groups: list[str] = Field(default_factory=list)
    status: RobotStatus
    session: str | None = None
    seq: int = 0


class RobotAdded(Model):
    """The reply to `robot_add`: the only time the robot's token is shown."""

    robot: RobotInfo
    token: str


class RobotAdd(Creating, Request[RobotAdded]):
    """Register a robot on a host, in groups (pools) of robots."""

    service = SERVICE
    verb = "robot_add"

    name: Name
    type: RobotType
    host: Name
    groups: list[Name] = Field(default_factory=list, max_length=32)


class RobotList(Model):
    """The reply to `robot_list`."""

    robots: list[RobotInfo]


class RobotListRequest(Request[RobotList]):
    """List the tenant's robots, optionally those of one group or host."""

    service = SERVICE
    verb = "robot_list"

    group: Name | None = None
    host: Name | None = None


class RobotShow(Request[RobotInfo]):
    """One robot by name."""

    service = SERVICE
    verb = "robot_show"

    name: Name


class RobotRemoved(Model):
    """The reply to `robot_remove`."""

    robot: RobotInfo


class RobotRemove(Request[RobotRemoved]):
    """Remove a robot; its token stops working at once. Refused while it runs a job."""

    service = SERVICE
    verb = "robot_remove"

    name: Name


class RobotConnected(Model):
    """What the registry tells a robot agent that connects: who it is and where its commands arrive."""

    robot: RobotInfo
    command_subject: str


class RobotConnect(Request[RobotConnected]):
    """A robot agent starts a session (robot token): its heartbeats follow on its telemetry subject."""

    service = SERVICE
    verb = "robot_connect"

    robot: Name  # the robot the agent was told to run: its token must be this robot's
    session: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    heartbeat_interval_s: float = Field(
        DEFAULT_HEARTBEAT_INTERVAL_S, ge=MIN_HEARTBEAT_INTERVAL_S, le=MAX_HEARTBEAT_INTERVAL_S
    )
    agent_version: SafeText = Field("", max_length=64)
    current_job: Annotated[str, Field(max_length=64), NUL_FREE] | None = None


class RobotGoodbye(Request[RobotInfo]):
    """A robot agent ends its session on a clean shutdown (robot token): it is Disconnected."""

    service = SERVICE
    verb = "robot_goodbye"

    session: str = Field(max_length=64)


class Heartbeat(Model):
    """Published by a robot agent on `hd.<tenant>.tel.<robot>.heartbeat` every interval, and at once
    when it starts or ends a job. The fence lets only that robot publish there, so a heartbeat
    needs no token: its subject says whose it is."""

    session: str
    interval_s: float = Field(ge=MIN_HEARTBEAT_INTERVAL_S, le=MAX_HEARTBEAT_INTERVAL_S)
    current_job: SafeText | None = None  # stored by the registry
    sent_at: datetime


class RemovedCommand(Model):
    """Sent to a robot's command subject when the robot is removed, before its token stops working:
    the agent stops, saying why, rather than retrying a token that will never work again."""

    kind: Literal["removed"] = "removed"
    robot: str
    removed_by: str | None = None


class _RobotEvent(EventData):
    """What every robot event names: the robot, its type and host."""

    robot: str
    type: RobotType
    host: str


class RobotAddedEvent(_RobotEvent):
    """A robot was registered."""

    event_type: ClassVar[str] = "registry.robot_added"

    groups: list[str] = Field(default_factory=list)


class RobotRemovedEvent(_RobotEvent):
    """A robot was removed."""

    event_type: ClassVar[str] = "registry.robot_removed"


class RobotStatusChangedEvent(_RobotEvent):
    """A robot's status changed."""

    event_type: ClassVar[str] = "registry.robot_status_changed"

    status: RobotStatus
    previous: RobotStatus
    current_job: str | None = None
    reason: str = ""


__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "MISSED_HEARTBEATS",
    "SERVICE",
    "Heartbeat",
    "Name",
    "RemovedCommand",
    "RobotAdd",
    "RobotAdded",
    "RobotAddedEvent",
    "RobotConnect",
    "RobotConnected",
    "RobotGoodbye",
    "RobotInfo",
    "RobotList",
    "RobotListRequest",
    "RobotPresence",
    "RobotRemove",
    "RobotRemoved",
    "RobotRemovedEvent",
    "RobotShow",
    "RobotStatus",
    "RobotStatusChangedEvent",
    "RobotType",
]
