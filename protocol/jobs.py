"""Messages of the `jobs` service, the commands it sends robots, and the reports and logs robots send back.

A job runs one package version of a process on one unattended robot. Its states:

    Pending ──► Running ──► Successful | Faulted | Stopped
       │           │
       │           ├──► Stopping (soft stop asked) ──► Successful | Faulted | Stopped
       │           └──► Terminating (hard stop asked) ──► Stopped
       └──► Stopped (cancelled before it started)

Commands go to `hd.<tenant>.cmd.<host>.<robot>` as requests; the robot acknowledges each. Every
start carries an attempt number, every report from the robot carries it back, and a report of a
stale attempt is refused: a job re-queued after its robot was lost cannot be finished by the
robot that lost it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from herder.protocol.messages import (
    IDEMPOTENCY_KEY_PATTERN,
    IDEMPOTENCY_KEY_RULE,
    Creating,
    ErrorBody,
    EventData,
    Model,
    Request,
    matching,
)
from herder.protocol.packages import PackageRef, ProcessName, Version
from herder.protocol.registry import Name, RemovedCommand
from herder.protocol.values import MAX_VALUE_BYTES, NUL_FREE, SafeText, json_safe

SERVICE = "jobs"

JobId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
# What people type: a job id or an unambiguous prefix of one (at least 4 hex digits).
JobIdOrPrefix = Annotated[
    str,
    StringConstraints(to_lower=True),
    matching(r"[0-9a-f]{4,32}", "must be a job id, or its first 4 or more characters (hex digits 0-9, a-f)"),
]

DEFAULT_KILL_GRACE_S = 10.0
# A re-queued job waits this long for a robot that lost contact to come back before it runs again
# elsewhere: well beyond an orchestrator restart or a network blip, so that the work never runs twice.
DEFAULT_LOST_AFTER_S = 600.0
MIN_LOST_AFTER_S = 0.5
MAX_LOST_AFTER_S = 7 * 24 * 3600.0
# A job's input and output, as UTF-8 JSON (see protocol/values.py); the robot SDK keeps its own copy
# of the output limit (MAX_OUTPUT_BYTES there), being standard library only.
MAX_INPUT_BYTES = MAX_VALUE_BYTES
MAX_OUTPUT_BYTES = 256 * 1024
MAX_REPORT_REASON_CHARS = 2000
MAX_REPORT_ERROR_CHARS = 8000

JobInput = Annotated[dict[str, Any], json_safe(max_bytes=MAX_INPUT_BYTES)]
JobOutput = Annotated[dict[str, Any], json_safe(max_bytes=MAX_OUTPUT_BYTES)]


class JobState(StrEnum):
    """The states of a job, exactly."""

    PENDING = "Pending"
    RUNNING = "Running"
    STOPPING = "Stopping"
    TERMINATING = "Terminating"
    SUCCESSFUL = "Successful"
    FAULTED = "Faulted"
    STOPPED = "Stopped"

    @property
    def final(self) -> bool:
        """Whether the job has ended."""
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """Whether the job holds its robot."""
        return self in ACTIVE_STATES


FINAL_STATES = frozenset({JobState.SUCCESSFUL, JobState.FAULTED, JobState.STOPPED})
ACTIVE_STATES = frozenset({JobState.RUNNING, JobState.STOPPING, JobState.TERMINATING})


class Priority(StrEnum):
    """Which Pending job a robot takes first: High before Normal before Low, then the oldest."""

    HIGH = "High"
    NORMAL = "Normal"
    LOW = "Low"

    @property
    def rank(self) -> int:
        """0 for High, 1 for Normal, 2 for Low: the order robots take them in."""
        return _RANKS[self]


_RANKS = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}


class OnRobotLost(StrEnum):
    """What becomes of a running job whose robot stops answering.

    `fault` ends it Faulted "robot lost" at once; should the robot report on it later (it was cut
    off, not dead), that report is the outcome. `requeue` runs it again with a new attempt, but only
    once herder knows the first attempt is not running: the robot came back and said so, or it has
    been gone longer than the job's `lost_after_s`."""

    FAULT = "fault"
    REQUEUE = "requeue"


class WhenBusy(StrEnum):
    """What a start does when no robot it may run on is free: `queue` the job (it waits as Pending for
    the first free robot), or `skip` it (refused with `conflict`: a trigger records the skip)."""

    QUEUE = "queue"
    SKIP = "skip"


class Strategy(StrEnum):
    """Which robot of a group a job aimed at the group goes to when none is free: the `first-free`
    one (the job waits for whichever frees first), or the busy robot with the `fewest-pending` jobs
    waiting for it by name (the job is aimed at that robot from then on)."""

    FIRST_FREE = "first-free"
    FEWEST_PENDING = "fewest-pending"


# Trigger names, as the scheduler service keeps them (the same rule as robot and group names).
TriggerName = Name


class JobInfo(Model):
    """A job as shown to people and programs."""

    id: str
    tenant: str
    process: str
    version: str
    state: JobState
    reason: str = ""  # why a Pending job waits; how an ended job ended
    priority: Priority
    target_robot: str | None = None
    target_group: str | None = None
    robot: str | None = None
    host: str | None = None
    attempt: int = 0
    input: dict[str, Any] = Field(default_factory=dict)
    output: dict[str, Any] | None = None
    error: str | None = None
    timeout_s: float | None = None
    stop_after_s: float | None = None
    kill_grace_s: float = DEFAULT_KILL_GRACE_S
    on_robot_lost: OnRobotLost = OnRobotLost.FAULT
    lost_after_s: float = DEFAULT_LOST_AFTER_S
    lost_at: datetime | None = None  # when herder lost contact with the robot running it
    trigger: str | None = None  # the trigger that created it
    parent_job: str | None = None  # the job whose script started it (`sdk.start_job`)
    created_at: datetime
    created_by: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


MAX_RUN_S = 7 * 24 * 3600.0


class JobSpec(Model):
    """What a new job runs, where, and how long it may take: shared by every way a job starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    process: ProcessName
    version: Version | None = None  # None: the newest version
    robot: Name | None = None
    group: Name | None = None
    input: JobInput = Field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    # Hard stop (by the robot) once the job has been Running this long: "abort after".
    timeout_s: float | None = Field(None, gt=0, le=MAX_RUN_S)
    # Soft stop (the script sees `should_stop()`) once the job has been Running this long: "stop after".
    stop_after_s: float | None = Field(None, gt=0, le=MAX_RUN_S)
    kill_grace_s: float = Field(DEFAULT_KILL_GRACE_S, ge=0, le=3600)
    on_robot_lost: OnRobotLost = OnRobotLost.FAULT
    lost_after_s: float = Field(DEFAULT_LOST_AFTER_S, ge=MIN_LOST_AFTER_S, le=MAX_LOST_AFTER_S)
    when_busy: WhenBusy = WhenBusy.QUEUE
    strategy: Strategy = Strategy.FIRST_FREE

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.robot is None) == (self.group is None):
            raise ValueError("name exactly one target: a robot or a group")
        if self.strategy is Strategy.FEWEST_PENDING and self.group is None:
            raise ValueError("strategy fewest-pending chooses among a group's robots: aim the job at a group")
        return self


class JobStart(Creating, JobSpec, Request[JobInfo]):
    """Start a process on a robot, or on any available robot of a group.

    `trigger` and `max_concurrent` are the scheduler's: a start from a trigger names it, and is
    refused with `conflict` while the trigger has `max_concurrent` jobs Pending or running."""

    service = SERVICE
    verb = "start"

    trigger: TriggerName | None = None
    max_concurrent: int | None = Field(None, ge=1, le=10_000)

    @model_validator(mode="after")
    def _limit_of_a_trigger(self) -> JobStart:
        if self.max_concurrent is not None and self.trigger is None:
            raise ValueError("max_concurrent counts the jobs of a trigger: name the trigger")
        return self


MAX_STARTS_PER_BATCH = 200


class JobStartResult(Model):
    """How one start of a batch went: the job (made now, or by an earlier start with its key), or the
    error a lone `start` would have answered."""

    job: JobInfo | None = None
    error: ErrorBody | None = None


class JobStartResults(Model):
    """The reply to `start_batch`: one result per start, in the order they were sent."""

    results: list[JobStartResult]


class JobStartBatch(Request[JobStartResults]):
    """Start many jobs in one transaction (a trigger's fires due at one moment): each start is the
    `start` it holds, idempotent under its own `request_id` (which each must carry) exactly as a lone
    `start` under that key would be; one refused start does not refuse the others. The new jobs are
    given to free robots just after."""

    service = SERVICE
    verb = "start_batch"

    starts: list[JobStart] = Field(min_length=1, max_length=MAX_STARTS_PER_BATCH)

    @model_validator(mode="after")
    def _keyed(self) -> JobStartBatch:
        keys = [start.request_id for start in self.starts]
        if any(key is None for key in keys):
            raise ValueError("every start of a batch needs its request_id (its idempotency key)")
        if len(set(keys)) != len(keys):
            raise ValueError("the starts of a batch need request_ids of their own; two share one")
        return self


class RobotJobStart(Creating, JobSpec, Request[JobInfo]):
    """A running script starts another job (`sdk.start_job`), through its robot's agent (robot token):
    `job_id` is the robot's own job, which the new one records as its parent."""

    service = SERVICE
    verb = "robot_start"

    job_id: JobId


class JobList(Model):
    """The reply to `list`, newest first."""

    jobs: list[JobInfo]


class JobListRequest(Request[JobList]):
    """List jobs, newest first: all, or those in some states, of a process, of a robot (that ran there
    or are aimed at it), or aimed at a group."""

    service = SERVICE
    verb = "list"

    states: list[JobState] = Field(default_factory=list)
    process: ProcessName | None = None
    robot: Name | None = None
    group: Name | None = None
    trigger: TriggerName | None = None
    parent_job: JobId | None = None  # the jobs this one started
    limit: int = Field(100, ge=1, le=1000)


class JobShow(Request[JobInfo]):
    """One job, by id or unambiguous id prefix."""

    service = SERVICE
    verb = "show"

    id: JobIdOrPrefix


class RobotJob(Request[JobInfo]):
    """A robot's own job, or one that a job of the robot started, by id: `not_found` otherwise. A
    robot's agent asks it to follow a job its script started (`sdk.start_job(wait=True)`); services
    ask it on a robot's behalf (the secrets service, before it hands a credential to a job)."""

    service = SERVICE
    verb = "robot_job"

    id: JobId


class JobStop(Request[JobInfo]):
    """Soft stop: the script sees `should_stop()` and ends itself. A Pending job is cancelled."""

    service = SERVICE
    verb = "stop"

    id: JobIdOrPrefix


class JobKill(Request[JobInfo]):
    """Hard stop: the script is terminated, then killed after the job's grace period. A Pending job is cancelled."""

    service = SERVICE
    verb = "kill"

    id: JobIdOrPrefix


class Outcome(StrEnum):
    """What a robot reports about the run of a job."""

    TERMINATING = "terminating"  # the robot hard-stops the job on its own (its timeout passed)
    SUCCESSFUL = "successful"
    FAULTED = "faulted"
    STOPPED = "stopped"


class JobReport(Request[JobInfo]):
    """A robot reports on a job it runs (robot token). Refused with `conflict` for a stale attempt."""

    service = SERVICE
    verb = "report"

    job_id: JobId
    attempt: int = Field(ge=1)
    outcome: Outcome
    reason: SafeText = Field("", max_length=MAX_REPORT_REASON_CHARS)
    # The length first: pydantic words a length error well only when it is checked before NUL.
    error: Annotated[str, Field(max_length=MAX_REPORT_ERROR_CHARS), NUL_FREE] | None = None
    output: JobOutput | None = None
    exit_code: int | None = None


class JobResumed(Model):
    """The reply to `resume`: whether the robot should go on with the run it has."""

    keep_running: bool
    state: JobState | None = None  # the job's state here, when the robot named one
    reason: str = ""


class JobResume(Request[JobResumed]):
    """A robot back after it was cut off (or frozen) says what it runs now, if anything (robot token).

    herder answers whether to go on: a job it ended while the robot was away is killed there, and a
    re-queued job that waited for the robot to come back either goes on (the robot still runs it) or
    runs again elsewhere at once (it does not)."""

    service = SERVICE
    verb = "resume"

    session: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    job_id: JobId | None = None
    attempt: int | None = Field(None, ge=1)


# --- commands to robots, on hd.<tenant>.cmd.<host>.<robot> ---


class StartCommand(Model):
    """Run a job: fetch the package, check its hash, run its entry point with the input."""

    kind: Literal["start"] = "start"
    job_id: str
    attempt: int
    session: str  # the agent session the job was given to; any other agent of the robot ignores it
    package: PackageRef
    input: JobInput = Field(default_factory=dict)
    timeout_s: float | None = None
    kill_grace_s: float = DEFAULT_KILL_GRACE_S


class StopCommand(Model):
    """Soft-stop a job: raise the flag that `should_stop()` reads."""

    kind: Literal["stop"] = "stop"
    job_id: str
    attempt: int
    session: str


class KillCommand(Model):
    """Hard-stop a job: SIGTERM to its process group, SIGKILL after `grace_s`. An `orphan` is a run
    herder ended without the robot (it was thought lost): killed, and not reported."""

    kind: Literal["kill"] = "kill"
    job_id: str
    attempt: int
    session: str
    grace_s: float = DEFAULT_KILL_GRACE_S
    orphan: bool = False


class Command(Model):
    """The envelope of every command to a robot."""

    command: StartCommand | StopCommand | KillCommand | RemovedCommand = Field(discriminator="kind")


class CommandAck(Model):
    """A robot's acknowledgement of a command. A start refused because the robot is busy names the
    job it is busy with, so that herder can stop that one if it no longer counts (its robot was
    thought lost, and the job ended without it)."""

    job_id: str
    attempt: int
    session: str
    accepted: bool = True
    detail: str = ""
    busy_job: str | None = None
    busy_attempt: int | None = None


# --- log lines, on hd.<tenant>.tel.<robot>.log.<job> in the HERDER_LOGS stream ---


class LogStream(StrEnum):
    """Where a log line came from."""

    STDOUT = "stdout"
    STDERR = "stderr"
    SDK = "sdk"  # `herder.robot.sdk.log`, with structured fields
    AGENT = "agent"  # the robot agent about the job: fetched, started, stopped
    END = "end"  # the last line of a job's log, written by the jobs service when the job ends


class LogLevel(StrEnum):
    """The level of a log line."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogRecord(Model):
    """One line of a job's log."""

    job_id: str
    attempt: int
    seq: int
    time: datetime
    stream: LogStream
    level: LogLevel = LogLevel.INFO
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)


# --- events ---


class JobCreatedEvent(EventData):
    """A job was created."""

    event_type: ClassVar[str] = "jobs.job_created"

    job_id: str
    process: str
    version: str
    priority: Priority
    target_robot: str | None = None
    target_group: str | None = None
    trigger: str | None = None
    parent_job: str | None = None
    # The caller's request id (its idempotency key), so that an integrator who published a durable
    # request (`hd.<tenant>.req.jobs`) can tell which job it made.
    request_id: str | None = None


class JobOutcomeCorrectedEvent(EventData):
    """A robot's late report replaced the outcome herder had recorded without it ("robot lost")."""

    event_type: ClassVar[str] = "jobs.job_outcome_corrected"

    job_id: str
    process: str
    state: JobState
    previous: JobState
    robot: str | None = None
    attempt: int = 0
    reason: str = ""


class JobStateChangedEvent(EventData):
    """A job changed state."""

    event_type: ClassVar[str] = "jobs.job_state_changed"

    job_id: str
    process: str
    state: JobState
    previous: JobState
    robot: str | None = None
    attempt: int = 0
    reason: str = ""


# --- durable job requests, published by integrators on hd.<tenant>.req.jobs ---


class JobRequestState(StrEnum):
    """The verdict on a durable job request: final either way, the request is not tried again."""

    ACCEPTED = "accepted"  # a job was created (or had been, under the same request id)
    REFUSED = "refused"  # no job: the code and reason say why


class JobRequestInfo(Model):
    """A durable job request as the jobs service recorded its verdict: never its token."""

    # None when the request came without an id (or with one unfit to be an idempotency key).
    request_id: str | None = None
    state: JobRequestState
    code: str | None = None  # the error code of a refusal, as in error replies
    reason: str = ""
    principal: str | None = None  # who sent it, when its token was known
    process: str | None = None
    job_id: str | None = None
    tries: int = 1  # how often the request was delivered before its verdict
    published_at: datetime | None = None  # when the stream stored it
    decided_at: datetime


class JobRequestList(Model):
    """The reply to `requests`, newest first."""

    requests: list[JobRequestInfo]


class JobRequestListRequest(Request[JobRequestList]):
    """The verdicts on durable job requests, newest first: all, the accepted or the refused ones, or
    those of one request id."""

    service = SERVICE
    verb = "requests"

    state: JobRequestState | None = None
    request_id: Annotated[str, matching(IDEMPOTENCY_KEY_PATTERN, IDEMPOTENCY_KEY_RULE)] | None = None
    limit: int = Field(100, ge=1, le=1000)


class JobRequestRefusedEvent(EventData):
    """A durable job request was refused: no job, and it is not tried again. Never carries the token."""

    event_type: ClassVar[str] = "jobs.request_refused"

    request_id: str | None = None
    code: str
    reason: str
    process: str | None = None
    tries: int = 1


__all__ = [
    "ACTIVE_STATES",
    "DEFAULT_KILL_GRACE_S",
    "FINAL_STATES",
    "MAX_INPUT_BYTES",
    "MAX_OUTPUT_BYTES",
    "MAX_REPORT_ERROR_CHARS",
    "MAX_REPORT_REASON_CHARS",
    "SERVICE",
    "Command",
    "CommandAck",
    "JobCreatedEvent",
    "JobId",
    "JobIdOrPrefix",
    "JobInfo",
    "JobInput",
    "JobKill",
    "JobList",
    "JobListRequest",
    "JobOutcomeCorrectedEvent",
    "JobOutput",
    "JobReport",
    "JobRequestInfo",
    "JobRequestList",
    "JobRequestListRequest",
    "JobRequestRefusedEvent",
    "JobRequestState",
    "JobResume",
    "JobResumed",
    "JobShow",
    "JobSpec",
    "JobStart",
    "JobStartBatch",
    "JobStartResult",
    "JobStartResults",
    "JobState",
    "JobStateChangedEvent",
    "JobStop",
    "KillCommand",
    "LogLevel",
    "LogRecord",
    "LogStream",
    "OnRobotLost",
    "Outcome",
    "Priority",
    "RobotJobStart",
    "StartCommand",
    "StopCommand",
    "Strategy",
    "TriggerName",
    "WhenBusy",
]
