"""The queue item state machine, the processing order and the filters: whole tables."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from herder.protocol.errors import BadRequest, Conflict
from herder.protocol.jobs import Priority
from herder.protocol.queues import ExceptionKind, ItemState, QueueChoice
from herder.services.queues import states
from herder.services.queues.states import Candidate, SlaStatus, Why

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

S = ItemState


@pytest.mark.parametrize(
    ("before", "after", "allowed"),
    [
        (S.NEW, S.IN_PROGRESS, True),
        (S.NEW, S.DELETED, True),
        (S.NEW, S.ABANDONED, True),
        (S.NEW, S.SUCCESSFUL, False),
        (S.NEW, S.FAILED, False),
        (S.NEW, S.RETRIED, False),
        (S.IN_PROGRESS, S.SUCCESSFUL, True),
        (S.IN_PROGRESS, S.FAILED, True),
        (S.IN_PROGRESS, S.RETRIED, True),
        (S.IN_PROGRESS, S.NEW, True),
        (S.IN_PROGRESS, S.ABANDONED, True),
        (S.IN_PROGRESS, S.DELETED, False),
        (S.SUCCESSFUL, S.RETRIED, False),
        (S.SUCCESSFUL, S.NEW, False),
        (S.FAILED, S.RETRIED, True),
        (S.FAILED, S.NEW, False),
        (S.ABANDONED, S.RETRIED, True),
        (S.RETRIED, S.NEW, False),
        (S.RETRIED, S.RETRIED, False),
        (S.DELETED, S.NEW, False),
    ],
)
def test_transitions(before: ItemState, after: ItemState, allowed: bool) -> None:
    assert states.can_move(before, after) is allowed


def test_only_new_and_in_progress_are_open() -> None:
    assert {state for state in ItemState if not state.final} == {S.NEW, S.IN_PROGRESS}


@pytest.mark.parametrize(
    ("state", "kind", "attempt", "max_retries", "ends", "retry"),
    [
        (S.SUCCESSFUL, None, 1, 0, S.SUCCESSFUL, False),
        (S.SUCCESSFUL, None, 3, 5, S.SUCCESSFUL, False),
        (S.FAILED, ExceptionKind.BUSINESS, 1, 5, S.FAILED, False),  # business: never retried
        (S.FAILED, ExceptionKind.APPLICATION, 1, 0, S.FAILED, False),  # no retries set
        (S.FAILED, ExceptionKind.APPLICATION, 1, 1, S.RETRIED, True),
        (S.FAILED, ExceptionKind.APPLICATION, 2, 1, S.FAILED, False),  # the one retry is used
        (S.FAILED, ExceptionKind.APPLICATION, 3, 3, S.RETRIED, True),
        (S.FAILED, ExceptionKind.APPLICATION, 4, 3, S.FAILED, False),
    ],
)
def test_results(
    state: ItemState, kind: ExceptionKind | None, attempt: int, max_retries: int, ends: ItemState, retry: bool
) -> None:
    ending = states.after_result(state, kind, "why", attempt=attempt, max_retries=max_retries)
    assert (ending.state, ending.retry) == (ends, retry)
    assert ending.exception is kind
    assert ending.reason == "why"


@pytest.mark.parametrize(
    ("why", "attempt", "max_retries", "retry_abandoned", "ends", "kind"),
    [
        (Why.ROBOT_LOST, 1, 0, False, S.ABANDONED, None),
        (Why.ROBOT_LOST, 1, 2, False, S.ABANDONED, None),  # abandoned items are not retried unless asked
        (Why.ROBOT_LOST, 1, 2, True, S.RETRIED, ExceptionKind.APPLICATION),
        (Why.ROBOT_LOST, 3, 2, True, S.ABANDONED, None),  # retries used up
        (Why.LEASE_EXPIRED, 1, 0, True, S.ABANDONED, None),
        (Why.LEASE_EXPIRED, 1, 1, True, S.RETRIED, ExceptionKind.APPLICATION),
        (Why.JOB_ENDED, 1, 0, False, S.FAILED, ExceptionKind.APPLICATION),
        (Why.JOB_ENDED, 1, 1, False, S.RETRIED, ExceptionKind.APPLICATION),  # an application failure retries
        (Why.JOB_ENDED, 2, 1, True, S.FAILED, ExceptionKind.APPLICATION),
    ],
)
def test_losses(
    why: Why, attempt: int, max_retries: int, retry_abandoned: bool, ends: ItemState, kind: ExceptionKind | None
) -> None:
    ending = states.after_loss(
        why, robot="r1", attempt=attempt, max_retries=max_retries, retry_abandoned=retry_abandoned, at=NOW
    )
    assert ending.state is ends and ending.exception is kind
    assert ending.retry is (ends is S.RETRIED)
    assert "r1" in ending.reason and "2026-03-02T09:00:00" in ending.reason


def test_the_holder_check_names_what_is_wrong() -> None:
    good = {"state": S.IN_PROGRESS, "robot": "r1", "lease": 3, "caller": "r1", "presented": 3, "item_id": "i"}
    states.check_holder(**good)  # type: ignore[arg-type]
    for change, words in (
        ({"state": S.NEW}, "not InProgress"),
        ({"state": S.SUCCESSFUL}, "Successful"),
        ({"caller": "r2"}, "held by another robot"),
        ({"presented": 2}, "lease 2 is stale"),
    ):
        with pytest.raises(Conflict, match=words):
            states.check_holder(**{**good, **change})  # type: ignore[arg-type]


def _item(
    n: int, priority: Priority = Priority.NORMAL, deadline_h: float | None = None, postpone_h: float | None = None
) -> Candidate:
    return Candidate(
        id=str(n),
        priority=priority,
        deadline=NOW + timedelta(hours=deadline_h) if deadline_h is not None else None,
        postpone_until=NOW + timedelta(hours=postpone_h) if postpone_h is not None else None,
        seq=n,
    )


def test_processing_order_deadlines_first_then_priority_then_first_in() -> None:
    items = [
        _item(1, Priority.LOW),
        _item(2),
        _item(3, Priority.HIGH),
        _item(4, deadline_h=48),
        _item(5, Priority.LOW, deadline_h=24),
        _item(6, deadline_h=72),
        _item(7, Priority.HIGH, deadline_h=96),
        _item(8, Priority.HIGH, postpone_h=1),  # postponed: skipped until due
        _item(9, Priority.HIGH, postpone_h=-1),  # was postponed, now due
        _item(10),
    ]
    order = [int(item.id) for item in states.next_items(items, NOW, count=20)]
    assert order == [7, 4, 6, 5, 3, 9, 2, 10, 1]
    assert [int(item.id) for item in states.next_items(items, NOW + timedelta(hours=2), count=2)] == [7, 4]
    assert 8 in [int(item.id) for item in states.next_items(items, NOW + timedelta(hours=2), count=20)]


def test_strict_order_is_as_given_and_weighted_order_follows_the_weights() -> None:
    choices = [QueueChoice(name="urgent", weight=3), QueueChoice(name="routine", weight=1)]
    assert states.queue_order(choices, "strict") == ["urgent", "routine"]
    rng = random.Random(7)
    firsts = Counter(states.queue_order(choices, "weighted", rng)[0] for _ in range(4000))
    assert 0.70 < firsts["urgent"] / 4000 < 0.80  # 3 / (3 + 1)
    assert sorted(states.queue_order(choices, "weighted", rng)) == ["routine", "urgent"]
    assert states.queue_order([QueueChoice(name="a"), QueueChoice(name="a")], "weighted") == ["a"]


@pytest.mark.parametrize(
    ("text", "required", "excluded"),
    [
        (None, (), ()),
        ("a", ("a",), ()),
        ("+a;-b;c", ("a", "c"), ("b",)),
        ("-x", (), ("x",)),
    ],
)
def test_tag_filters(text: str | None, required: tuple[str, ...], excluded: tuple[str, ...]) -> None:
    rule = states.parse_tags(text)
    assert (rule.required, rule.excluded) == (required, excluded)


def test_tag_rules_match_and_contradictions_are_refused() -> None:
    rule = states.parse_tags("+eu;-manual")
    assert rule.matches(["eu", "vip"])
    assert not rule.matches(["eu", "manual"])
    assert not rule.matches([])
    with pytest.raises(BadRequest, match="both requires and excludes 'a'"):
        states.parse_tags("a;-a")
    assert states.stored_tags(["b", "a", "b"]) == ";a;b;"
    assert states.stored_tags([]) == ""


@pytest.mark.parametrize(
    ("pattern", "reference", "matches", "like"),
    [
        ("INV-1", "INV-1", True, "INV-1"),
        ("INV-1", "INV-10", False, "INV-1"),
        ("INV-*", "INV-10", True, "INV-%"),
        ("*-2026", "INV-2026", True, "%-2026"),
        ("A*B*C", "AxxBxxC", True, "A%B%C"),
        ("A*B*C", "AxxCxxB", False, "A%B%C"),
        ("AB*BC", "ABC", False, "AB%BC"),
        ("100%_*", "100%_x", True, "100\\%\\_%"),
        ("100%_*", "100abx", False, "100\\%\\_%"),
        ("*", "anything", True, "%"),
    ],
)
def test_reference_patterns(pattern: str, reference: str, matches: bool, like: str) -> None:
    assert states.reference_matches(pattern, reference) is matches
    assert states.reference_like(pattern) == like
    assert states.reference_matches(pattern, None) is False


@pytest.mark.parametrize(
    ("age_min", "sla", "risk", "status"),
    [
        (10, None, None, SlaStatus.NONE),
        (10, 60, None, SlaStatus.OK),
        (60, 60, None, SlaStatus.PAST),
        (50, 60, 15, SlaStatus.AT_RISK),
        (44, 60, 15, SlaStatus.OK),
        (45, 60, 15, SlaStatus.AT_RISK),
        (61, 60, 15, SlaStatus.PAST),
    ],
)
def test_sla(age_min: int, sla: int | None, risk: int | None, status: SlaStatus) -> None:
    created = NOW - timedelta(minutes=age_min)
    assert states.sla_status(created, NOW, sla, risk) is status
    cutoffs = states.sla_cutoffs(NOW, sla, risk)
    if sla is None:
        assert cutoffs is None
        return
    assert cutoffs is not None
    past, at_risk = cutoffs
    # The query's cutoffs say the same as the rule.
    assert (created <= past) is (status is SlaStatus.PAST)
    assert (past < created <= at_risk) is (status is SlaStatus.AT_RISK)


def test_percentile_by_nearest_rank() -> None:
    assert states.percentile([], 0.95) is None
    assert states.percentile([3.0], 0.95) == 3.0
    assert states.percentile([float(n) for n in range(1, 101)], 0.95) == 95.0
    assert states.percentile([5.0, 1.0, 3.0], 0.5) == 3.0
