"""Messages of the `queues` service: work queues, their items, and what robots do with them.

A queue holds items of work (an invoice, an application, a ticket) that robots take one at a time.
An item's states:

    New ──► InProgress ──► Successful
     │  ▲        │    └──► Failed (business: final; application: with retries left ──► Retried)
     │  │        ├──► New (postponed: invisible until the time it names)
     │  └────────┤
     │           └──► Abandoned (its holder was lost or let its lease lapse; retried per policy ──► Retried)
     ├──► Deleted (operators delete New items only)
     └──► Abandoned (New for longer than the queue allows, when it sets a limit)

A Retried item is final: its retry is a new New item with attempt + 1 and `retry_of` naming it.

Taking an item (`item_next`) makes the calling robot its holder under a lease: a number that grows
with every claim of the item (a fencing token). A result, a postponement or a progress report must
name the current lease; a stale one is refused with `conflict`, so a robot that lost an item can
never finish it after another robot took it. Progress renews the lease's expiry.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, ConfigDict, Field, StringConstraints, model_validator

from herder.protocol.jobs import JobId, Priority
from herder.protocol.messages import Creating, EventData, Model, Request, matching
from herder.protocol.registry import Name
from herder.protocol.values import SafeText, json_safe

SERVICE = "queues"

QUEUE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}"
QueueName = Annotated[
    str,
    matching(
        QUEUE_NAME_PATTERN,
        "must be 1 to 63 letters, digits, '-' or '_', starting with a letter or digit (no dots or spaces)",
    ),
]
ItemId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Tag = Annotated[
    str, matching(r"[A-Za-z0-9_.-]{1,64}", "must be 1 to 64 letters, digits, '.', '-' or '_' (no ';', '+' or spaces)")
]
Reference = Annotated[
    str, Field(min_length=1, max_length=256), matching(r"[^\x00-\x1f\x7f]+", "must be printable text")
]
# A reference pattern: `*` stands for any run of characters; everything else is itself.
ReferencePattern = Annotated[
    str, Field(min_length=1, max_length=256), matching(r"[^\x00-\x1f\x7f]+", "must be printable text")
]
# `+a;-b`: items tagged a and not tagged b.
TagFilter = Annotated[
    str,
    Field(max_length=1024),
    matching(
        r"[+-]?[A-Za-z0-9_.-]{1,64}(;[+-]?[A-Za-z0-9_.-]{1,64})*",
        "must be tags separated by ';', each required ('+tag' or 'tag') or excluded ('-tag'), like '+urgent;-manual'",
    ),
]

MAX_ITEM_CONTENT_BYTES = 64 * 1024
MAX_ITEM_OUTPUT_BYTES = 64 * 1024
MAX_SCHEMA_BYTES = 64 * 1024
MAX_ITEMS_PER_ADD = 10_000
MAX_ITEMS_PER_NEXT = 1_000
MAX_RESULTS_PER_REQUEST = 1_000
MAX_TAGS = 16
MAX_RETRIES = 100
DEFAULT_LEASE_S = 30 * 60.0
MIN_LEASE_S = 1.0
MAX_LEASE_S = 7 * 24 * 3600.0
MAX_PROGRESS_CHARS = 2000
MAX_REASON_CHARS = 2000
MAX_DESCRIPTION_CHARS = 1000
# How long a script's queue call waits, on its robot, for herder to come back (a restart takes seconds).
DEFAULT_QUEUE_WAIT_S = 30.0

ItemContent = Annotated[dict[str, Any], json_safe(max_bytes=MAX_ITEM_CONTENT_BYTES)]
ItemOutput = Annotated[dict[str, Any], json_safe(max_bytes=MAX_ITEM_OUTPUT_BYTES)]
QueueSchema = Annotated[dict[str, Any], json_safe(max_bytes=MAX_SCHEMA_BYTES)]


class ItemState(StrEnum):
    """The states of a queue item, exactly."""

    NEW = "New"
    IN_PROGRESS = "InProgress"
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    ABANDONED = "Abandoned"
    RETRIED = "Retried"
    DELETED = "Deleted"

    @property
    def final(self) -> bool:
        """Whether nothing more happens to the item."""
        return self not in (ItemState.NEW, ItemState.IN_PROGRESS)


class ExceptionKind(StrEnum):
    """Why an item failed: a `business` rule (the data is wrong: final, never retried) or an
    `application` fault (a system misbehaved: retried while the queue's retries last)."""

    BUSINESS = "business"
    APPLICATION = "application"


class QueueSettings(Model):
    """What a queue is set to do; every field has the default a new queue gets."""

    description: SafeText = Field("", max_length=MAX_DESCRIPTION_CHARS)
    # Retries of an item that failed with an application exception (0: none).
    max_retries: int = Field(0, ge=0, le=MAX_RETRIES)
    # Whether an abandoned item is retried (while retries last) or stays Abandoned.
    retry_abandoned: bool = False
    # How long an item may stay InProgress without its holder renewing the lease (progress).
    lease_s: float = Field(DEFAULT_LEASE_S, ge=MIN_LEASE_S, le=MAX_LEASE_S)
    # How long an item may stay New before it counts as abandoned (None: forever).
    abandon_new_after_s: float | None = Field(None, gt=0, le=365 * 24 * 3600.0)
    # Minutes an item may take from New to its end before it is past its SLA, and the minutes
    # before that point from which it counts as at risk.
    sla_minutes: int | None = Field(None, ge=1, le=525_600)
    risk_minutes: int | None = Field(None, ge=1, le=525_600)
    # A JSON Schema (draft 2020-12) the content of every added item must satisfy.
    content_schema: QueueSchema | None = None
    unique_references: bool = False
    # Robots that may take, add and finish items: members of these groups, or these robots; both
    # empty: every robot of the tenant.
    robot_groups: list[Name] = Field(default_factory=list, max_length=64)
    robots: list[Name] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _risk_within_sla(self) -> QueueSettings:
        if self.risk_minutes is not None and self.sla_minutes is None:
            raise ValueError("risk_minutes needs sla_minutes: it counts back from the SLA")
        if self.risk_minutes is not None and self.sla_minutes is not None and self.risk_minutes >= self.sla_minutes:
            raise ValueError("risk_minutes must be smaller than sla_minutes")
        return self


class QueueInfo(Model):
    """A queue as shown: its name, settings and when it was made."""

    name: str
    tenant: str
    settings: QueueSettings
    created_at: datetime
    created_by: str | None = None


class QueueStats(Model):
    """A queue's figures: items per state, processing times of the items that ended Successful or
    Failed (from taken to ended), and the open items past their SLA or at risk of it."""

    counts: dict[str, int] = Field(default_factory=dict)
    processed: int = 0
    average_processing_s: float | None = None
    p95_processing_s: float | None = None
    past_sla: int = 0
    at_risk: int = 0


class QueueDetails(Model):
    """The reply to `queue_show`."""

    queue: QueueInfo
    stats: QueueStats


class QueueCreate(Creating, Request[QueueInfo]):
    """Create a queue."""

    service = SERVICE
    verb = "queue_create"

    name: QueueName
    settings: QueueSettings = Field(default_factory=QueueSettings)


class QueueUpdate(Request[QueueInfo]):
    """Change a queue's settings (all of them: send what `queue_show` gave, changed). A new schema
    or uniqueness rule applies to items added from then on."""

    service = SERVICE
    verb = "queue_update"

    name: QueueName
    settings: QueueSettings


class QueueList(Model):
    """The reply to `queue_list`, by name."""

    queues: list[QueueInfo]


class QueueListRequest(Request[QueueList]):
    """List the tenant's queues."""

    service = SERVICE
    verb = "queue_list"


class QueueShow(Request[QueueDetails]):
    """One queue with its statistics."""

    service = SERVICE
    verb = "queue_show"

    name: QueueName


class ItemInfo(Model):
    """A queue item as shown to people, programs and the robot that holds it."""

    id: str
    queue: str
    state: ItemState
    content: dict[str, Any] = Field(default_factory=dict)
    reference: str | None = None
    priority: Priority = Priority.NORMAL
    deadline: AwareDatetime | None = None
    postpone_until: AwareDatetime | None = None
    tags: list[str] = Field(default_factory=list)
    progress: str = ""
    output: dict[str, Any] | None = None
    exception: ExceptionKind | None = None
    reason: str = ""
    robot: str | None = None  # the holder, or the robot that last held it
    job_id: str | None = None
    lease: int = 0  # the current lease: a result must name it
    lease_expires_at: datetime | None = None
    attempt: int = 1
    retry_of: str | None = None
    retried_by: str | None = None
    created_at: datetime
    created_by: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    updated_at: datetime | None = None


class NewItem(Model):
    """One item to add."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    content: ItemContent = Field(default_factory=dict)
    reference: Reference | None = None
    priority: Priority = Priority.NORMAL
    deadline: AwareDatetime | None = None
    postpone_until: AwareDatetime | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


class ItemsAdded(Model):
    """The reply to `item_add`: the new items' ids, in the order they were sent."""

    queue: str
    ids: list[str]
    count: int = 0  # how many items were added (a dry run: would be added)
    dry_run: bool = False


class ItemAdd(Creating, Request[ItemsAdded]):
    """Add one item or up to 10,000 at once, all or none: a content the queue's schema refuses, or a
    reference already in a unique-reference queue, refuses the whole request. `dry_run` checks
    everything and stores nothing."""

    service = SERVICE
    verb = "item_add"

    queue: QueueName
    items: list[NewItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_ADD)
    dry_run: bool = False


class QueueChoice(Model):
    """One queue to take items from, and its weight when the robot asks across queues by weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: QueueName
    weight: int = Field(1, ge=1, le=1000)


class ItemsTaken(Model):
    """The reply to `item_next`: the items now held by the caller (none when there was nothing to take)."""

    items: list[ItemInfo]


class ItemNext(Request[ItemsTaken]):
    """Take the next item, or up to `count`, for the calling robot (robot token).

    Across several queues: `order` `strict` tries them in the order given, `weighted` picks the
    first queue to try at random by weight, then the rest in the same way. Items come in the
    queue's processing order: those with a deadline first (by priority, then earliest deadline),
    then the rest (by priority, then first in, first out); postponed items wait until due."""

    service = SERVICE
    verb = "item_next"

    queues: list[QueueChoice] = Field(min_length=1, max_length=32)
    order: Literal["strict", "weighted"] = "strict"
    count: int = Field(1, ge=1, le=MAX_ITEMS_PER_NEXT)
    tags: TagFilter | None = None
    reference: ReferencePattern | None = None
    priority: Priority | None = None
    job_id: JobId | None = None  # the job the robot takes the items for; set by its agent


class ItemResult(Model):
    """How one held item ended: `Successful` with an output, or `Failed` with an exception kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: ItemId
    lease: int = Field(ge=1)
    state: Literal[ItemState.SUCCESSFUL, ItemState.FAILED]
    output: ItemOutput | None = None
    exception: ExceptionKind | None = None
    reason: SafeText = Field("", max_length=MAX_REASON_CHARS)

    @model_validator(mode="after")
    def _failure_has_a_kind(self) -> ItemResult:
        if self.state is ItemState.FAILED and self.exception is None:
            raise ValueError("a Failed result names its exception: business or application")
        if self.state is ItemState.SUCCESSFUL and self.exception is not None:
            raise ValueError("a Successful result has no exception")
        return self


class ItemsSet(Model):
    """The reply to `item_result`: the items as they are now (a retried item's copy is in `retries`)."""

    items: list[ItemInfo]
    retries: list[ItemInfo] = Field(default_factory=list)


class ItemResultRequest(Request[ItemsSet]):
    """Set the result of items the caller holds (robot token), all or none: an item it does not hold,
    or a stale lease, refuses the request with `conflict`."""

    service = SERVICE
    verb = "item_result"

    results: list[ItemResult] = Field(min_length=1, max_length=MAX_RESULTS_PER_REQUEST)


class ItemPostpone(Request[ItemInfo]):
    """Give a held item back as New, invisible until `until` (robot token)."""

    service = SERVICE
    verb = "item_postpone"

    id: ItemId
    lease: int = Field(ge=1)
    until: AwareDatetime
    reason: SafeText = Field("", max_length=MAX_REASON_CHARS)


class ItemProgress(Request[ItemInfo]):
    """Say how far a held item has got; renews its lease (robot token)."""

    service = SERVICE
    verb = "item_progress"

    id: ItemId
    lease: int = Field(ge=1)
    progress: SafeText = Field(max_length=MAX_PROGRESS_CHARS)


class ItemFilter(Model):
    """Which items of a queue: every field narrows the choice; none given means all of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    states: list[ItemState] = Field(default_factory=list)
    reference: ReferencePattern | None = None
    tags: TagFilter | None = None
    robot: Name | None = None  # the holder, or the robot that last held it
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None


class ItemPage(Model):
    """The reply to `item_list`: items oldest first, and the cursor of the next page (None: last)."""

    items: list[ItemInfo]
    next_cursor: str | None = None


class ItemListRequest(Request[ItemPage]):
    """List a queue's items, oldest first, a page at a time."""

    service = SERVICE
    verb = "item_list"

    queue: QueueName
    filter: ItemFilter = Field(default_factory=ItemFilter)
    limit: int = Field(100, ge=1, le=1000)
    cursor: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")] | None = None


class ItemDetails(Model):
    """The reply to `item_show`: the item and its retry chain, first attempt first."""

    item: ItemInfo
    chain: list[ItemInfo]


class ItemShow(Request[ItemDetails]):
    """One item with its retry chain."""

    service = SERVICE
    verb = "item_show"

    id: ItemId


class ItemsChanged(Model):
    """The reply to a bulk change: how many items it changed."""

    queue: str
    count: int
    dry_run: bool = False


class ItemDelete(Request[ItemsChanged]):
    """Delete New items: those named, or every New item the filter matches."""

    service = SERVICE
    verb = "item_delete"

    queue: QueueName
    ids: list[ItemId] = Field(default_factory=list, max_length=MAX_ITEMS_PER_ADD)
    filter: ItemFilter | None = None
    dry_run: bool = False

    @model_validator(mode="after")
    def _ids_or_filter(self) -> ItemDelete:
        if bool(self.ids) == (self.filter is not None):
            raise ValueError("name the items (ids) or give a filter, not both")
        return self


class ItemRetry(Request[ItemsChanged]):
    """Retry ended items (Failed, Abandoned) by hand: each becomes Retried, with a New copy. Items
    named, or every Failed or Abandoned item the filter matches; retry limits do not apply."""

    service = SERVICE
    verb = "item_retry"

    queue: QueueName
    ids: list[ItemId] = Field(default_factory=list, max_length=MAX_ITEMS_PER_ADD)
    filter: ItemFilter | None = None
    dry_run: bool = False

    @model_validator(mode="after")
    def _ids_or_filter(self) -> ItemRetry:
        if bool(self.ids) == (self.filter is not None):
            raise ValueError("name the items (ids) or give a filter, not both")
        return self


# --- events ---


class QueueCreatedEvent(EventData):
    """A queue was created."""

    event_type: ClassVar[str] = "queues.queue_created"

    queue: str


class QueueUpdatedEvent(EventData):
    """A queue's settings changed."""

    event_type: ClassVar[str] = "queues.queue_updated"

    queue: str


# Events of many items name at most this many of them; `count` says how many there were.
MAX_EVENT_ITEM_IDS = 100


class ItemsAddedEvent(EventData):
    """Items were added to a queue (one event per request)."""

    event_type: ClassVar[str] = "queues.item_added"

    queue: str
    count: int
    item_ids: list[str]


class ItemStateChangedEvent(EventData):
    """Items of a queue changed state (one event per request, or per sweep and queue)."""

    event_type: ClassVar[str] = "queues.item_state_changed"

    queue: str
    state: ItemState
    count: int
    item_ids: list[str]
    robot: str | None = None
    reason: str = ""


__all__ = [
    "DEFAULT_LEASE_S",
    "DEFAULT_QUEUE_WAIT_S",
    "MAX_EVENT_ITEM_IDS",
    "MAX_ITEMS_PER_ADD",
    "MAX_ITEMS_PER_NEXT",
    "MAX_ITEM_CONTENT_BYTES",
    "MAX_RESULTS_PER_REQUEST",
    "SERVICE",
    "ExceptionKind",
    "ItemAdd",
    "ItemContent",
    "ItemDelete",
    "ItemDetails",
    "ItemFilter",
    "ItemId",
    "ItemInfo",
    "ItemListRequest",
    "ItemNext",
    "ItemPage",
    "ItemPostpone",
    "ItemProgress",
    "ItemResult",
    "ItemResultRequest",
    "ItemRetry",
    "ItemShow",
    "ItemState",
    "ItemStateChangedEvent",
    "ItemsAdded",
    "ItemsAddedEvent",
    "ItemsChanged",
    "ItemsSet",
    "ItemsTaken",
    "NewItem",
    "QueueChoice",
    "QueueCreate",
    "QueueCreatedEvent",
    "QueueDetails",
    "QueueInfo",
    "QueueList",
    "QueueListRequest",
    "QueueName",
    "QueueSettings",
    "QueueShow",
    "QueueStats",
    "QueueUpdate",
    "QueueUpdatedEvent",
    "Tag",
    "TagFilter",
]
