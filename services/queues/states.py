"""What becomes of a queue item, and in which order robots take them. Pure: no I/O, no clock.

The service reads rows, asks these functions, and writes what they decide with conditional updates
on the state and lease the decision was made from, so two replicas never both move an item.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from herder.protocol.errors import BadRequest, Conflict
from herder.protocol.jobs import Priority
from herder.protocol.queues import ExceptionKind, ItemState, QueueChoice

# Every move an item may make, exactly (see protocol/queues.py for the picture).
TRANSITIONS: frozenset[tuple[ItemState, ItemState]] = frozenset(
    {
        (ItemState.NEW, ItemState.IN_PROGRESS),  # taken
        (ItemState.NEW, ItemState.DELETED),  # deleted by an operator
        (ItemState.NEW, ItemState.ABANDONED),  # New for longer than the queue allows
        (ItemState.IN_PROGRESS, ItemState.SUCCESSFUL),
        (ItemState.IN_PROGRESS, ItemState.FAILED),
        (ItemState.IN_PROGRESS, ItemState.RETRIED),  # failed (application) or abandoned, with a retry
        (ItemState.IN_PROGRESS, ItemState.NEW),  # postponed
        (ItemState.IN_PROGRESS, ItemState.ABANDONED),  # holder lost, lease lapsed
        (ItemState.FAILED, ItemState.RETRIED),  # retried by hand
        (ItemState.ABANDONED, ItemState.RETRIED),  # retried by hand
    }
)


def can_move(before: ItemState, after: ItemState) -> bool:
    """Whether an item may go from `before` to `after`."""
    return (before, after) in TRANSITIONS


class Why(StrEnum):
    """Why a held item is taken from its holder."""

    ROBOT_LOST = "robot_lost"
    LEASE_EXPIRED = "lease_expired"
    JOB_ENDED = "job_ended"


@dataclass(frozen=True, slots=True)
class Ending:
    """How an item ends: its final state, and whether a New copy (attempt + 1) follows it."""

    state: ItemState
    exception: ExceptionKind | None
    reason: str
    retry: bool = False


def retries_left(attempt: int, max_retries: int) -> bool:
    """Whether an item on its `attempt` (1 for the first) may be tried again: `max_retries` retries
    follow the first attempt."""
    return attempt <= max_retries


def after_result(
    state: ItemState, exception: ExceptionKind | None, reason: str, *, attempt: int, max_retries: int
) -> Ending:
    """What a robot's result makes of an item: Successful; Failed for a business exception (never
    retried); for an application exception Retried with a copy while retries last, else Failed."""
    if state is ItemState.SUCCESSFUL:
        return Ending(ItemState.SUCCESSFUL, None, reason)
    if exception is ExceptionKind.APPLICATION and retries_left(attempt, max_retries):
        return Ending(ItemState.RETRIED, exception, reason, retry=True)
    return Ending(ItemState.FAILED, exception, reason)


def after_loss(
    why: Why, *, robot: str | None, attempt: int, max_retries: int, retry_abandoned: bool, at: datetime
) -> Ending:
    """What becomes of an item taken from its holder.

    A lost robot or a lapsed lease abandons it (Retried with a copy when the queue retries abandoned
    items and retries last). A job that ended without a result for it fails it with an application
    exception, retried per the queue's retries: the script got the item and then faulted."""
    holder = f"robot {robot}" if robot else "its holder"
    when = at.isoformat(timespec="seconds")
    if why is Why.JOB_ENDED:
        reason = f"the job of {holder} ended at {when} without a result for the item"
        return after_result(
            ItemState.FAILED, ExceptionKind.APPLICATION, reason, attempt=attempt, max_retries=max_retries
        )
    if why is Why.ROBOT_LOST:
        reason = f"abandoned: {holder} was lost at {when}"
    else:
        reason = f"abandoned: the lease of {holder} lapsed at {when} without progress"
    if retry_abandoned and retries_left(attempt, max_retries):
        return Ending(ItemState.RETRIED, ExceptionKind.APPLICATION, reason, retry=True)
    return Ending(ItemState.ABANDONED, None, reason)


def check_holder(*, state: ItemState, robot: str | None, lease: int, caller: str, presented: int, item_id: str) -> None:
    """Refuse (`conflict`) a result, postponement or progress from a caller that does not hold the
    item under the lease it presents."""
    if state is not ItemState.IN_PROGRESS:
        raise Conflict(f"item {item_id} is {state.value}, not InProgress: nobody holds it")
    if robot != caller:
        raise Conflict(f"item {item_id} is held by another robot, not by {caller}")
    if lease != presented:
        raise Conflict(
            f"item {item_id}: lease {presented} is stale (the item was taken again, under lease {lease}); "
            "drop it, another attempt holds it"
        )


# --- processing order ---


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the processing order reads of a New item."""

    id: str
    priority: Priority
    deadline: datetime | None
    postpone_until: datetime | None
    seq: int  # the order items were added in


def visible(item: Candidate, now: datetime) -> bool:
    """Whether a New item may be taken now: not postponed past `now`."""
    return item.postpone_until is None or item.postpone_until <= now


def order_key(item: Candidate) -> tuple[int, int, float, int]:
    """Items with a deadline first (by priority, then earliest deadline), then the rest (by
    priority, then first in, first out). The queues repository sorts by the same columns."""
    if item.deadline is not None:
        return (0, item.priority.rank, item.deadline.timestamp(), item.seq)
    return (1, item.priority.rank, 0.0, item.seq)


def next_items(items: Iterable[Candidate], now: datetime, count: int = 1) -> list[Candidate]:
    """The `count` items a robot takes next: visible ones, in processing order."""
    return sorted((item for item in items if visible(item, now)), key=order_key)[:count]


def queue_order(choices: Sequence[QueueChoice], order: str, rng: random.Random | None = None) -> list[str]:
    """The order to try queues in: as given (`strict`), or drawn by weight without replacement
    (`weighted`: a queue of weight 3 comes first three times as often as one of weight 1)."""
    names = list(dict.fromkeys(choice.name for choice in choices))
    if order == "strict" or len(names) < 2:
        return names
    weights = {choice.name: choice.weight for choice in choices}
    pick = rng or random.Random()
    # Efraimidis-Spirakis: sort by u ** (1 / w), highest first; the same as drawing one at a time.
    keys = {name: pick.random() ** (1.0 / weights[name]) for name in names}
    return sorted(names, key=lambda name: -keys[name])


# --- filters ---


@dataclass(frozen=True, slots=True)
class TagRule:
    """A tag filter: the tags an item must have and those it must not."""

    required: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    def matches(self, tags: Iterable[str]) -> bool:
        """Whether an item with `tags` passes."""
        held = set(tags)
        return all(tag in held for tag in self.required) and not any(tag in held for tag in self.excluded)


def parse_tags(text: str | None) -> TagRule:
    """`+a;-b;c` → required a and c, excluded b. Validated by the protocol's TagFilter already."""
    if not text:
        return TagRule()
    required: list[str] = []
    excluded: list[str] = []
    for part in text.split(";"):
        if part.startswith("-"):
            excluded.append(part[1:])
        else:
            required.append(part.removeprefix("+"))
    if set(required) & set(excluded):
        raise BadRequest(f"tag filter {text!r} both requires and excludes {sorted(set(required) & set(excluded))[0]!r}")
    return TagRule(tuple(required), tuple(excluded))


def stored_tags(tags: Iterable[str]) -> str:
    """Tags as one column, `;a;b;`, so that `LIKE '%;a;%'` finds an item tagged a."""
    unique = sorted(set(tags))
    return f";{';'.join(unique)};" if unique else ""


def like_escape(text: str) -> str:
    """`text` with LIKE's wildcards escaped (the escape character is `\\`)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def reference_like(pattern: str) -> str:
    """A reference pattern (`*` for any run of characters) as a LIKE pattern with `\\` as escape."""
    return "%".join(like_escape(part) for part in pattern.split("*"))


def reference_matches(pattern: str, reference: str | None) -> bool:
    """Whether `reference` matches `pattern`, as `reference_like` would in the database."""
    if reference is None:
        return False
    parts = pattern.split("*")
    if len(parts) == 1:
        return reference == pattern
    if not reference.startswith(parts[0]) or not reference.endswith(parts[-1]):
        return False
    position = len(parts[0])
    end = len(reference) - len(parts[-1])
    for part in parts[1:-1]:
        found = reference.find(part, position, end)
        if found < 0:
            return False
        position = found + len(part)
    return position <= end


# --- SLA and figures ---


class SlaStatus(StrEnum):
    """Where an open item stands against its queue's SLA."""

    NONE = "none"  # the queue sets no SLA
    OK = "ok"
    AT_RISK = "at_risk"
    PAST = "past"


def sla_status(created_at: datetime, now: datetime, sla_minutes: int | None, risk_minutes: int | None) -> SlaStatus:
    """An open item's standing: past its SLA, within `risk_minutes` of it, or fine."""
    if sla_minutes is None:
        return SlaStatus.NONE
    due = created_at + timedelta(minutes=sla_minutes)
    if now >= due:
        return SlaStatus.PAST
    if risk_minutes is not None and now >= due - timedelta(minutes=risk_minutes):
        return SlaStatus.AT_RISK
    return SlaStatus.OK


def sla_cutoffs(now: datetime, sla_minutes: int | None, risk_minutes: int | None) -> tuple[datetime, datetime] | None:
    """Creation times that mark open items past their SLA (created at or before the first) and at
    risk of it (created at or before the second): the same rule as `sla_status`, for a query."""
    if sla_minutes is None:
        return None
    past = now - timedelta(minutes=sla_minutes)
    risk = past + timedelta(minutes=risk_minutes) if risk_minutes is not None else past
    return past, risk


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` percentile of `values` by the nearest-rank rule; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


__all__ = [
    "TRANSITIONS",
    "Candidate",
    "Ending",
    "SlaStatus",
    "TagRule",
    "Why",
    "after_loss",
    "after_result",
    "can_move",
    "check_holder",
    "like_escape",
    "next_items",
    "order_key",
    "parse_tags",
    "percentile",
    "queue_order",
    "reference_like",
    "reference_matches",
    "retries_left",
    "sla_cutoffs",
    "sla_status",
    "stored_tags",
    "visible",
]
