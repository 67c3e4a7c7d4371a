"""Messages of the `scheduler` service: triggers, which start jobs on a schedule or when a queue fills.

A **cron trigger** fires on a cron expression (five fields, or six with seconds first) or on the Nth
working day of each month, in an IANA time zone, narrowed by a validity window, a daily time
window, a non-working-day calendar (a calendar asset) and limits on its runs. A **queue trigger**
starts jobs while a queue holds New items. Each fire makes exactly one job, whichever scheduler
replica makes it, or is recorded as skipped with the reason (too many of its jobs still open,
every robot busy, its limit of runs reached).

A **mail trigger** watches an IMAP mailbox folder and starts a job for each new mail that matches its
filters (or one job for all the new mails of a poll), with the mail's metadata as the job's input and
its attachments stored in a storage bucket; then it marks the mail read or moves it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self

from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints, model_validator

from herder.protocol.jobs import JobSpec
from herder.protocol.messages import Creating, EventData, Model, Request, matching
from herder.protocol.queues import QueueName
from herder.protocol.registry import Name
from herder.protocol.secrets import SecretName
from herder.protocol.storage import BucketName

SERVICE = "scheduler"

TriggerName = Name
CronText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
TimeZone = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
TimeOfDay = Annotated[str, matching(r"\d{1,2}:\d{2}", "must be a time of day, HH:MM (like 06:30)")]
DailyWindow = Annotated[
    str, matching(r"\d{2}:\d{2}-\d{2}:\d{2}", "must be a daily window, HH:MM-HH:MM (like 22:00-06:00)")
]
MAX_CONCURRENT = 10_000
# How many of its last fires a trigger shows.
SHOWN_FIRES = 20
NEXT_FIRES_SHOWN = 5
# A mail trigger looks in its mailbox at most this often, and at least this often.
MIN_MAIL_POLL_S = 5.0
MAX_MAIL_POLL_S = 24 * 3600.0
DEFAULT_MAIL_POLL_S = 30.0
MAX_MAIL_FILTER_CHARS = 200
# The JetStream KV bucket in which scheduler replicas take turns watching a mailbox (one at a time).
MAIL_LEASES_BUCKET = "HERDER_SCHEDULER_MAIL"


class TriggerKind(StrEnum):
    """What makes a trigger fire."""

    CRON = "cron"
    QUEUE = "queue"
    MAIL = "mail"


class Misfire(StrEnum):
    """What to do with fires missed while no scheduler ran: `skip` them, or `fire-once` for all of them."""

    SKIP = "skip"
    FIRE_ONCE = "fire-once"


class OffDays(StrEnum):
    """What a fire on a calendar's non-working day does: it is skipped, or moved to the next working day."""

    SKIP = "skip"
    MOVE = "move"


class Schedule(Model):
    """When a cron trigger fires: a cron expression, or the Nth working day of each month at a time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: CronText | None = None
    working_day: int | None = Field(None, ge=1, le=23)
    at: TimeOfDay | None = None
    tz: TimeZone = "UTC"
    # The name of a calendar asset: its dates are non-working days (and so are weekends for the
    # Nth working day and for `move`).
    calendar: Name | None = None
    on_off_day: OffDays = OffDays.SKIP
    window: DailyWindow | None = None  # no job is created outside it; may cross midnight
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    max_runs: int | None = Field(None, ge=1)
    max_runs_per_month: int | None = Field(None, ge=1)
    misfire: Misfire = Misfire.SKIP

    @model_validator(mode="after")
    def _one_rule(self) -> Self:
        if (self.cron is None) == (self.working_day is None):
            raise ValueError("give a cron expression or a working day (the Nth of the month), not both")
        if self.working_day is not None and self.at is None:
            raise ValueError("a working-day schedule needs the time of day it fires at (at, HH:MM)")
        if self.cron is not None and self.at is not None:
            raise ValueError("'at' belongs to a working-day schedule; a cron expression has its own time")
        if self.valid_from and self.valid_until and self.valid_from >= self.valid_until:
            raise ValueError("valid_from must come before valid_until")
        return self


class QueueRule(Model):
    """When a queue trigger starts jobs: while `queue` holds at least `min_items` New items, one job
    per `min_items` of them, keeping at most `max_jobs` of the trigger's jobs Pending or running."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue: QueueName
    min_items: int = Field(1, ge=1, le=1_000_000)
    max_jobs: int = Field(1, ge=1, le=MAX_CONCURRENT)


HostName = Annotated[
    str,
    matching(
        r"[A-Za-z0-9](?:[A-Za-z0-9._:-]{0,251}[A-Za-z0-9])?",
        "must be a host name or IP address, like 'imap.example.com' (letters, digits, '.', '-', ':')",
    ),
]
# An IMAP folder: any printable text (folders are separated by the server's own delimiter, often '/' or '.').
MailFolder = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255),
    matching(r"[^\x00-\x1f\x7f]+", "must be a folder name without control characters, like 'INBOX' or 'Invoices/Done'"),
]
MailFilterText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_MAIL_FILTER_CHARS),
    matching(r"[^\x00-\x1f\x7f]+", "must be text on one line, without control characters"),
]


class MailTls(StrEnum):
    """How a mail trigger's connection to its IMAP server is secured: TLS from the first byte (IMAPS,
    port 993), STARTTLS on a plain connection (port 143), or not at all (a trusted network only)."""

    TLS = "tls"
    STARTTLS = "starttls"
    NONE = "none"


class MailAfter(StrEnum):
    """What a mail trigger does with a mail once its job exists: mark it read, or move it to a folder."""

    READ = "read"
    MOVE = "move"


class MailFilters(Model):
    """Which mails a mail trigger takes: those whose subject, sender (the From header, name and address)
    and body text contain these texts, ignoring case. A filter not given takes every mail."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject_contains: MailFilterText | None = None
    sender_contains: MailFilterText | None = None
    body_contains: MailFilterText | None = None


class MailRule(Model):
    """When a mail trigger starts jobs: every `poll_s` it looks in `folder` of the IMAP mailbox at
    `host`, logging in with credential `credential` (its username and secret); each new mail that
    matches `filters` (unread ones only, by default) starts a job, or with `batch` the poll's mails
    start one job together. Attachments go to storage bucket `bucket` when one is named (else the job
    gets their names and sizes only). Once the job exists, the mail is marked read or moved to `move_to`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: HostName
    port: int = Field(993, ge=1, le=65535)  # 993 with tls; 143 when tls is starttls or none and no port is given
    tls: MailTls = MailTls.TLS
    folder: MailFolder = "INBOX"
    credential: SecretName
    filters: MailFilters = Field(default_factory=MailFilters)
    unread_only: bool = True
    batch: bool = False
    after: MailAfter = MailAfter.READ
    move_to: MailFolder | None = None
    bucket: BucketName | None = None
    poll_s: float = Field(DEFAULT_MAIL_POLL_S, ge=MIN_MAIL_POLL_S, le=MAX_MAIL_POLL_S)

    @model_validator(mode="before")
    @classmethod
    def _port_by_tls(cls, data: Any) -> Any:
        # IMAP's plain port is 143, IMAPS's 993: a rule naming no port gets the one its tls implies.
        if isinstance(data, dict) and data.get("port") is None and data.get("tls") in ("starttls", "none"):
            return {**data, "port": 143}
        return data

    @model_validator(mode="after")
    def _after(self) -> Self:
        if self.after is MailAfter.MOVE and self.move_to is None:
            raise ValueError("after 'move' needs where the mails go: give move_to")
        if self.after is not MailAfter.MOVE and self.move_to is not None:
            raise ValueError("move_to belongs to after 'move'; with after 'read' mails stay where they are")
        if self.move_to is not None and self.move_to == self.folder:
            raise ValueError(f"move_to is the folder the trigger watches ({self.folder!r}); name another folder")
        if not self.unread_only and self.after is MailAfter.READ:
            raise ValueError(
                "with unread_only false a mail marked read stays in the folder and would start a job at every "
                "poll: move the mails (after 'move', move_to) or take unread mails only"
            )
        return self


class TriggerJob(JobSpec):
    """The job a trigger starts at each fire; `max_concurrent` skips a fire while that many of the
    trigger's jobs are still Pending or running (a queue trigger's `max_jobs` stands for it)."""

    max_concurrent: int | None = Field(None, ge=1, le=MAX_CONCURRENT)


class FireInfo(Model):
    """One fire of a trigger: when it was due and made, and the job it created or why it skipped."""

    trigger: str
    scheduled_at: datetime | None = None  # None for a fire by hand or by a queue
    fired_at: datetime | None = None
    job_id: str | None = None
    skipped: str | None = None  # why no job was created
    cause: str = "schedule"  # schedule | by hand | queue


class TriggerInfo(Model):
    """A trigger as shown: what it starts, when, and how it has gone."""

    id: str
    name: str
    tenant: str
    kind: TriggerKind
    enabled: bool
    job: TriggerJob
    schedule: Schedule | None = None
    queue: QueueRule | None = None
    mail: MailRule | None = None
    runs: int = 0  # jobs created, in all
    next_fires: list[datetime] = Field(default_factory=list)
    last_fire: FireInfo | None = None
    created_at: datetime
    created_by: str | None = None
    updated_at: datetime | None = None


class TriggerDetails(Model):
    """The reply to `trigger_show`: the trigger, its next fire times and its last fires, newest first."""

    trigger: TriggerInfo
    fires: list[FireInfo] = Field(default_factory=list)


class TriggerAdd(Creating, Request[TriggerInfo]):
    """Add a trigger: a cron one (`schedule`), a queue one (`queue`) or a mail one (`mail`)."""

    service = SERVICE
    verb = "trigger_add"

    name: TriggerName
    job: TriggerJob
    schedule: Schedule | None = None
    queue: QueueRule | None = None
    # Left out when absent, so that a scheduler of before mail triggers still takes the request.
    mail: MailRule | None = Field(None, exclude_if=lambda rule: rule is None)
    enabled: bool = True

    @model_validator(mode="after")
    def _one_kind(self) -> TriggerAdd:
        if [self.schedule, self.queue, self.mail].count(None) != 2:
            raise ValueError(
                "give one of a schedule (a cron trigger), a queue (a queue trigger) or mail (a mail trigger)"
            )
        return self


class TriggerList(Model):
    """The reply to `trigger_list`, by name."""

    triggers: list[TriggerInfo]


class TriggerListRequest(Request[TriggerList]):
    """The tenant's triggers, each with its next fire and last fire."""

    service = SERVICE
    verb = "trigger_list"


class TriggerShow(Request[TriggerDetails]):
    """One trigger with its next five fire times and its last fires."""

    service = SERVICE
    verb = "trigger_show"

    name: TriggerName


class TriggerEnable(Request[TriggerInfo]):
    """Let a trigger fire again (fires due while it was disabled are not made up)."""

    service = SERVICE
    verb = "trigger_enable"

    name: TriggerName


class TriggerDisable(Request[TriggerInfo]):
    """Stop a trigger from firing until it is enabled; its jobs already made go on."""

    service = SERVICE
    verb = "trigger_disable"

    name: TriggerName


class TriggerRemove(Request[TriggerInfo]):
    """Remove a trigger and its fire history; its jobs already made go on."""

    service = SERVICE
    verb = "trigger_remove"

    name: TriggerName


class TriggerFireNow(Creating, Request[FireInfo]):
    """Fire a trigger now, by hand, whatever its schedule says (its job limits still apply)."""

    service = SERVICE
    verb = "trigger_fire_now"

    name: TriggerName


# --- events ---


class TriggerChangedEvent(EventData):
    """A trigger was added, enabled, disabled or removed: every scheduler replica reloads it."""

    event_type: ClassVar[str] = "scheduler.trigger_changed"

    trigger_id: str
    name: str
    change: str  # added | enabled | disabled | removed


class TriggerFiredEvent(EventData):
    """A trigger fired: the job it created, or why it skipped."""

    event_type: ClassVar[str] = "scheduler.trigger_fired"

    trigger_id: str
    name: str
    scheduled_at: datetime | None = None
    job_id: str | None = None
    skipped: str | None = None
    cause: str = "schedule"


__all__ = [
    "DEFAULT_MAIL_POLL_S",
    "MAIL_LEASES_BUCKET",
    "MAX_MAIL_POLL_S",
    "MIN_MAIL_POLL_S",
    "NEXT_FIRES_SHOWN",
    "SERVICE",
    "SHOWN_FIRES",
    "FireInfo",
    "MailAfter",
    "MailFilters",
    "MailRule",
    "MailTls",
    "Misfire",
    "OffDays",
    "QueueRule",
    "Schedule",
    "TriggerAdd",
    "TriggerChangedEvent",
    "TriggerDetails",
    "TriggerDisable",
    "TriggerEnable",
    "TriggerFireNow",
    "TriggerFiredEvent",
    "TriggerInfo",
    "TriggerJob",
    "TriggerKind",
    "TriggerList",
    "TriggerListRequest",
    "TriggerName",
    "TriggerRemove",
    "TriggerShow",
]
