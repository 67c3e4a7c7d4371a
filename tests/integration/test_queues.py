"""The queues service on a real nats-server and database (SQLite and PostgreSQL), through the fence.

Robots here call the item verbs with their own tokens on connections of their own, as their agents
do for a script's SDK; where a robot must be lost for real, its agent runs as a child process and
is killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from herder.client.requests import Client
from herder.protocol.errors import BadRequest, Conflict, Forbidden, NotFound
from herder.protocol.jobs import JobKill, JobStart, JobState, Priority
from herder.protocol.messages import utcnow
from herder.protocol.queues import (
    ExceptionKind,
    ItemAdd,
    ItemDelete,
    ItemFilter,
    ItemInfo,
    ItemListRequest,
    ItemNext,
    ItemPostpone,
    ItemProgress,
    ItemResult,
    ItemResultRequest,
    ItemRetry,
    ItemShow,
    ItemState,
    NewItem,
    QueueChoice,
    QueueCreate,
    QueueListRequest,
    QueueSettings,
    QueueShow,
    QueueUpdate,
)
from herder.protocol.registry import RobotStatus
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import ServiceHost
from herder.services.queues.service import HOLDER_CHECK_INTERVAL_S
from tests.fleet import Fleet, python_process, running_fleet
from tests.support import connect_as, eventually


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential) as started:
        yield started


class RobotLink:
    """A robot's own connection (its token, through the fence), as its agent has."""

    def __init__(self, name: str, client: Client) -> None:
        self.name = name
        self.client = client

    async def next(self, *queues: str, count: int = 1, **options: Any) -> list[ItemInfo]:
        request = ItemNext(queues=[QueueChoice(name=name) for name in queues], count=count, **options)
        return (await self.client.request(request)).items

    async def complete(self, item: ItemInfo, output: dict[str, object] | None = None) -> ItemInfo:
        result = ItemResult(id=item.id, lease=item.lease, state=ItemState.SUCCESSFUL, output=output)
        return (await self.client.request(ItemResultRequest(results=[result]))).items[0]

    async def fail(
        self, item: ItemInfo, kind: ExceptionKind, reason: str = "it broke"
    ) -> tuple[ItemInfo, list[ItemInfo]]:
        result = ItemResult(id=item.id, lease=item.lease, state=ItemState.FAILED, exception=kind, reason=reason)
        reply = await self.client.request(ItemResultRequest(results=[result]))
        return reply.items[0], reply.retries


@pytest.fixture
async def robots(fleet: Fleet) -> AsyncIterator[dict[str, RobotLink]]:
    """Three robots with running agents (online, so their items stay theirs), each with a connection
    of its own for the test to call the item verbs on, as the agent does for a script."""
    links: dict[str, RobotLink] = {}
    connections = []
    wanted: tuple[tuple[str, list[str]], ...] = (("r1", ["pool"]), ("r2", ["pool"]), ("outsider", []))
    tokens = {name: await fleet.add_robot(name, groups=groups) for name, groups in wanted}
    agents = {name: fleet.start_robot(name, token) for name, token in tokens.items()}
    await asyncio.gather(*(fleet.wait_robot(name, RobotStatus.AVAILABLE, agent=agents[name]) for name in tokens))
    for name, token in tokens.items():
        nc = await connect_as(fleet.nats_url, token, name=f"robot-{name}")
        connections.append(nc)
        links[name] = RobotLink(name, Client(nc, token=token, timeout=10.0))
    try:
        yield links
    finally:
        for nc in connections:
            await nc.close()


async def make_queue(fleet: Fleet, name: str, **settings: Any) -> None:
    await fleet.client.request(QueueCreate(name=name, settings=QueueSettings(**settings)))


async def add(fleet: Fleet, queue: str, *items: NewItem) -> list[str]:
    return (await fleet.client.request(ItemAdd(queue=queue, items=list(items)))).ids


async def test_items_go_in_processing_order_and_end_successful(fleet: Fleet, robots: dict[str, RobotLink]) -> None:
    await make_queue(fleet, "invoices")
    now = utcnow()
    ids = await add(
        fleet,
        "invoices",
        NewItem(content={"n": 1}, priority=Priority.LOW),
        NewItem(content={"n": 2}),
        NewItem(content={"n": 3}, priority=Priority.HIGH),
        NewItem(content={"n": 4}, deadline=now + timedelta(days=2)),
        NewItem(content={"n": 5}, deadline=now + timedelta(days=1), priority=Priority.LOW),
        NewItem(content={"n": 6}, deadline=now + timedelta(days=3)),
        NewItem(content={"n": 7}, postpone_until=now + timedelta(hours=1), priority=Priority.HIGH),
    )
    assert len(ids) == 7
    r1 = robots["r1"]
    taken = [item.content["n"] for item in await r1.next("invoices", count=10)]
    # Deadlines first (Normal before Low, then earliest), then the rest by priority; 7 is postponed.
    assert taken == [4, 6, 5, 3, 2, 1]
    first = (await fleet.client.request(ItemShow(id=ids[3]))).item
    assert first.state is ItemState.IN_PROGRESS and first.robot == "r1" and first.lease == 1
    done = await r1.complete(first, {"booked": True})
    assert done.state is ItemState.SUCCESSFUL and done.output == {"booked": True}
    details = await fleet.client.request(QueueShow(name="invoices"))
    assert details.stats.counts["Successful"] == 1
    assert details.stats.counts["InProgress"] == 5
    assert details.stats.counts["New"] == 1
    assert details.stats.processed == 1 and details.stats.average_processing_s is not None
    assert [queue.name for queue in (await fleet.client.request(QueueListRequest())).queues] == ["invoices"]


async def test_a_unique_reference_queue_refuses_a_whole_batch_with_a_duplicate(
    fleet: Fleet, robots: dict[str, RobotLink]
) -> None:
    await make_queue(fleet, "claims", unique_references=True)
    await add(fleet, "claims", NewItem(reference="C-1"), NewItem(reference="C-2"))
    with pytest.raises(Conflict, match="'C-2'"):
        await add(fleet, "claims", NewItem(reference="C-3"), NewItem(reference="C-2"))
    with pytest.raises(Conflict, match="given twice"):
        await add(fleet, "claims", NewItem(reference="C-4"), NewItem(reference="C-4"))
    with pytest.raises(BadRequest, match=r"items\[0\].reference"):
        await add(fleet, "claims", NewItem(content={"x": 1}))
    page = await fleet.client.request(ItemListRequest(queue="claims"))
    assert sorted(item.reference or "" for item in page.items) == ["C-1", "C-2"]
    # A deleted item's reference may be used again.
    await fleet.client.request(ItemDelete(queue="claims", ids=[page.items[0].id]))
    assert len(await add(fleet, "claims", NewItem(reference=page.items[0].reference))) == 1


async def test_content_that_fails_the_queue_schema_is_refused_with_its_path(fleet: Fleet) -> None:
    schema = {
        "type": "object",
        "required": ["invoice"],
        "properties": {"invoice": {"type": "object", "properties": {"amount": {"type": "number"}}}},
    }
    await make_queue(fleet, "booked", content_schema=schema)
    await add(fleet, "booked", NewItem(content={"invoice": {"amount": 12.5}}))
    with pytest.raises(BadRequest, match=r"items\[1\]\.content\.invoice\.amount: .*rule type"):
        await add(fleet, "booked", NewItem(content={"invoice": {}}), NewItem(content={"invoice": {"amount": "12"}}))
    with pytest.raises(BadRequest, match="not a valid JSON Schema"):
        await make_queue(fleet, "broken", content_schema={"type": "nonsense"})
    with pytest.raises(BadRequest, match=r"content.*JSON-safe|integers"):
        await add(fleet, "booked", NewItem.model_construct(content={"invoice": {"amount": 2**60}}))
    page = await fleet.client.request(ItemListRequest(queue="booked"))
    assert len(page.items) == 1


async def test_an_unknown_queue_is_not_found_and_a_foreign_robot_is_forbidden(
    fleet: Fleet, robots: dict[str, RobotLink]
) -> None:
    with pytest.raises(NotFound, match="no queue 'nope'"):
        await robots["r1"].next("nope")
    await make_queue(fleet, "pooled", robot_groups=["pool"])
    await add(fleet, "pooled", NewItem(content={"a": 1}))
    with pytest.raises(Forbidden, match="outsider may not use queue 'pooled'"):
        await robots["outsider"].next("pooled")
    assert len(await robots["r2"].next("pooled")) == 1


async def test_business_failures_are_final_and_application_failures_retry_in_a_chain(
    fleet: Fleet, robots: dict[str, RobotLink]
) -> None:
    await make_queue(fleet, "apps", max_retries=1)
    await add(
        fleet, "apps", NewItem(content={"k": "business"}, reference="B"), NewItem(content={"k": "app"}, reference="A")
    )
    r1 = robots["r1"]
    business, app = await r1.next("apps", count=2)
    failed, retries = await r1.fail(business, ExceptionKind.BUSINESS, "the invoice is a duplicate")
    assert failed.state is ItemState.FAILED and failed.exception is ExceptionKind.BUSINESS and retries == []
    retried, copies = await r1.fail(app, ExceptionKind.APPLICATION, "the ERP timed out")
    assert retried.state is ItemState.RETRIED and len(copies) == 1
    copy = copies[0]
    assert copy.state is ItemState.NEW and copy.attempt == 2 and copy.retry_of == app.id and copy.reference == "A"
    (again,) = await r1.next("apps")
    assert again.id == copy.id
    final, more = await r1.fail(again, ExceptionKind.APPLICATION, "the ERP timed out again")
    assert final.state is ItemState.FAILED and more == []  # one retry only
    details = await fleet.client.request(ItemShow(id=copy.id))
    assert [(link.attempt, link.state) for link in details.chain] == [(1, ItemState.RETRIED), (2, ItemState.FAILED)]
    assert details.chain[0].retried_by == copy.id


async def test_a_stale_lease_or_another_holder_is_refused(fleet: Fleet, robots: dict[str, RobotLink]) -> None:
    await make_queue(fleet, "leased", lease_s=1.0, retry_abandoned=True, max_retries=3)
    await add(fleet, "leased", NewItem(content={"x": 1}))
    r1, r2 = robots["r1"], robots["r2"]
    (held,) = await r1.next("leased")
    with pytest.raises(Conflict, match="held by another robot"):
        await r2.complete(held)
    # No progress for a second: the lease lapses, the item is abandoned and retried.

    async def retried() -> list[ItemInfo]:
        return await r2.next("leased")

    (copy,) = await eventually(retried, timeout=10.0)
    assert copy.attempt == 2 and copy.retry_of == held.id
    with pytest.raises(Conflict, match="not InProgress"):
        await r1.complete(held)
    first = (await fleet.client.request(ItemShow(id=held.id))).item
    assert first.state is ItemState.RETRIED and "lease" in first.reason
    # Progress renews the lease: the item stays held past the lease time.
    progressed = await r2.client.request(ItemProgress(id=copy.id, lease=copy.lease, progress="page 1 of 3"))
    assert progressed.progress == "page 1 of 3"
    with pytest.raises(Conflict, match="stale"):
        await r2.client.request(ItemProgress(id=copy.id, lease=copy.lease + 1, progress="page 2 of 3"))
    assert (await r2.complete(copy)).state is ItemState.SUCCESSFUL


async def test_requests_served_together_are_answered_each_on_its_own(
    fleet: Fleet, robots: dict[str, RobotLink]
) -> None:
    """Robots' takes and results arriving at once share a transaction; a refused one fails alone,
    and what the others did stands."""
    await make_queue(fleet, "together", max_retries=1)
    await add(fleet, "together", *(NewItem(content={"n": n}) for n in range(40)))
    r1, r2 = robots["r1"], robots["r2"]
    mine = await r1.next("together", count=10)
    theirs = await r2.next("together", count=10)
    good = [r1.complete(item) for item in mine[:5]]
    retried = [r1.fail(item, ExceptionKind.APPLICATION) for item in mine[5:7]]
    stolen = [r1.complete(item) for item in theirs[:5]]  # r2's items: refused
    stale = [
        r2.client.request(
            ItemResultRequest(results=[ItemResult(id=item.id, lease=item.lease + 1, state=ItemState.SUCCESSFUL)])
        )
        for item in theirs[5:]
    ]
    takes = [r2.next("together", count=2) for _ in range(5)]
    outcomes = await asyncio.gather(*good, *retried, *stolen, *stale, *takes, return_exceptions=True)
    done, failed, refused_stolen, refused_stale, taken = (
        outcomes[:5],
        outcomes[5:7],
        outcomes[7:12],
        outcomes[12:17],
        outcomes[17:],
    )
    assert all(isinstance(item, ItemInfo) and item.state is ItemState.SUCCESSFUL for item in done)
    for outcome in failed:
        assert isinstance(outcome, tuple)
        ended, copies = cast(tuple[ItemInfo, list[ItemInfo]], outcome)
        assert ended.state is ItemState.RETRIED and len(copies) == 1 and copies[0].attempt == 2
    assert all(isinstance(exc, Conflict) and "held by another robot" in exc.message for exc in refused_stolen)
    assert all(isinstance(exc, Conflict) and "stale" in exc.message for exc in refused_stale)
    handed = [item.id for batch in taken if isinstance(batch, list) for item in batch]
    assert len(handed) == 10 and len(set(handed)) == 10  # no item twice
    assert not {item.id for item in mine + theirs} & set(handed)
    counts = (await fleet.client.request(QueueShow(name="together"))).stats.counts
    # 40 added + 2 retry copies: 5 Successful, 2 Retried, 3 still r1's, 10 r2's (refused, untouched),
    # 10 taken by r2 just now, 12 New.
    assert counts["Successful"] == 5 and counts["Retried"] == 2
    assert counts["InProgress"] == 3 + 10 + 10 and counts["New"] == 12


async def test_a_postponed_item_waits_until_it_is_due(fleet: Fleet, robots: dict[str, RobotLink]) -> None:
    await make_queue(fleet, "later")
    await add(fleet, "later", NewItem(content={"x": 1}))
    r1 = robots["r1"]
    (item,) = await r1.next("later")
    until = utcnow() + timedelta(seconds=1.5)
    back = await r1.client.request(ItemPostpone(id=item.id, lease=item.lease, until=until, reason="the ERP is closed"))
    assert back.state is ItemState.NEW and back.reason == "the ERP is closed"
    assert await r1.next("later") == []
    (again,) = await eventually(lambda: r1.next("later"), timeout=10.0)
    assert again.id == item.id and again.lease == item.lease + 1


async def test_next_across_queues_in_strict_order_and_by_tags(fleet: Fleet, robots: dict[str, RobotLink]) -> None:
    await make_queue(fleet, "urgent")
    await make_queue(fleet, "routine")
    await add(
        fleet,
        "routine",
        NewItem(content={"q": "routine", "n": 1}, tags=["manual"]),
        NewItem(content={"q": "routine", "n": 2}),
    )
    await add(fleet, "urgent", NewItem(content={"q": "urgent"}, tags=["eu"]))
    r1 = robots["r1"]
    items = await r1.next("urgent", "routine", count=2)
    assert [item.content["q"] for item in items] == ["urgent", "routine"]
    assert items[1].content["n"] == 1
    rest = await r1.next("routine", tags="-manual")
    assert [item.content["n"] for item in rest] == [2]
    assert await r1.next("urgent", "routine") == []


async def test_bulk_retry_and_delete_by_filter(fleet: Fleet, robots: dict[str, RobotLink]) -> None:
    await make_queue(fleet, "batch")
    ids = await add(
        fleet, "batch", *(NewItem(content={"n": n}, reference=f"INV-{n}", tags=["march"]) for n in range(6))
    )
    r1 = robots["r1"]
    for item in await r1.next("batch", count=3):
        await r1.fail(item, ExceptionKind.BUSINESS)
    dry = await fleet.client.request(ItemRetry(queue="batch", filter=ItemFilter(reference="INV-*"), dry_run=True))
    assert dry.count == 3 and dry.dry_run
    retried = await fleet.client.request(ItemRetry(queue="batch", filter=ItemFilter(tags="+march")))
    assert retried.count == 3
    deleted = await fleet.client.request(ItemDelete(queue="batch", filter=ItemFilter(reference="INV-*")))
    assert deleted.count == 6  # three never taken and three retried copies, all New
    with pytest.raises(Conflict, match="not New"):
        await fleet.client.request(ItemDelete(queue="batch", ids=[ids[0]]))
    counts = (await fleet.client.request(QueueShow(name="batch"))).stats.counts
    assert counts["Deleted"] == 6 and counts["Retried"] == 3 and counts["New"] == 0


async def test_an_add_repeated_under_one_key_adds_once(fleet: Fleet) -> None:
    await make_queue(fleet, "keyed")
    request = ItemAdd(queue="keyed", items=[NewItem(content={"n": n}) for n in range(3)])
    replies = [await fleet.client.request(request, idempotency_key="add-once-1") for _ in range(3)]
    assert replies[0].ids == replies[1].ids == replies[2].ids
    page = await fleet.client.request(ItemListRequest(queue="keyed"))
    assert len(page.items) == 3


async def test_settings_change_and_pages_follow_the_cursor(fleet: Fleet) -> None:
    await make_queue(fleet, "paged")
    await add(fleet, "paged", *(NewItem(content={"n": n}) for n in range(25)))
    seen: list[int] = []
    cursor = None
    while True:
        page = await fleet.client.request(ItemListRequest(queue="paged", limit=10, cursor=cursor))
        seen += [item.content["n"] for item in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(range(25))
    updated = await fleet.client.request(QueueUpdate(name="paged", settings=QueueSettings(max_retries=2)))
    assert updated.settings.max_retries == 2
    with pytest.raises(BadRequest, match="cannot be made unique"):
        await fleet.client.request(QueueUpdate(name="paged", settings=QueueSettings(unique_references=True)))


async def test_a_killed_robots_items_are_abandoned_and_retried_within_seconds(fleet: Fleet, tmp_path: Path) -> None:
    await make_queue(fleet, "held", retry_abandoned=True, max_retries=1)
    await make_queue(fleet, "kept")
    await add(fleet, "held", NewItem(content={"n": 1}), NewItem(content={"n": 2}))
    await add(fleet, "kept", NewItem(content={"n": 3}))
    token = await fleet.add_robot("doomed")
    agent = fleet.start_robot("doomed", token)
    await fleet.wait_robot("doomed", RobotStatus.AVAILABLE, agent=agent)
    nc = await connect_as(fleet.nats_url, token, name="doomed-sdk")
    try:
        doomed = RobotLink("doomed", Client(nc, token=token, timeout=10.0))
        held = await doomed.next("held", count=2)
        (kept,) = await doomed.next("kept")
    finally:
        await nc.close()
    agent.kill9()
    started = asyncio.get_running_loop().time()

    async def abandoned() -> bool:
        page = await fleet.client.request(ItemListRequest(queue="held"))
        return sum(item.state is ItemState.RETRIED for item in page.items) == 2

    await eventually(abandoned, timeout=15.0)
    assert asyncio.get_running_loop().time() - started < 10.0
    page = await fleet.client.request(ItemListRequest(queue="held"))
    copies = [item for item in page.items if item.state is ItemState.NEW]
    assert sorted(item.retry_of or "" for item in copies) == sorted(item.id for item in held)
    # A queue that does not retry abandoned items leaves them Abandoned.
    lost = (await fleet.client.request(ItemShow(id=kept.id))).item
    assert lost.state is ItemState.ABANDONED and "doomed was lost" in lost.reason


TAKES_AND_WAITS = """
import time

def main():
    time.sleep(60)
"""


async def test_an_item_held_for_a_job_that_is_killed_fails_at_once(fleet: Fleet, tmp_path: Path) -> None:
    await make_queue(fleet, "work", max_retries=1)
    await add(fleet, "work", NewItem(content={"n": 1}))
    await fleet.publish(python_process(tmp_path, "waiter", TAKES_AND_WAITS))
    token = await fleet.add_robot("worker")
    agent = fleet.start_robot("worker", token)
    await fleet.wait_robot("worker", RobotStatus.AVAILABLE, agent=agent)
    job = await fleet.client.request(JobStart(process="waiter", robot="worker"))
    await fleet.wait_job(job.id, JobState.RUNNING)
    nc = await connect_as(fleet.nats_url, token, name="worker-sdk")
    try:
        (item,) = await RobotLink("worker", Client(nc, token=token)).next("work", job_id=job.id)
    finally:
        await nc.close()
    assert item.job_id == job.id
    await fleet.client.request(JobKill(id=job.id))
    await fleet.wait_job(job.id, JobState.STOPPED)

    async def failed() -> ItemInfo | None:
        shown = (await fleet.client.request(ItemShow(id=item.id))).item
        return shown if shown.state is not ItemState.IN_PROGRESS else None

    ended = await eventually(failed, timeout=10.0)
    assert ended.state is ItemState.RETRIED and ended.exception is ExceptionKind.APPLICATION
    assert "ended" in ended.reason and "without a result" in ended.reason


async def test_an_outage_of_the_services_leaves_live_robots_their_items(
    fleet: Fleet, robots: dict[str, RobotLink]
) -> None:
    """The services are away for longer than three heartbeats while r1 works on: when they are back,
    r1's items are still its own, under the same lease, and it finishes them."""
    await make_queue(fleet, "steady", retry_abandoned=True, max_retries=3)
    await add(fleet, "steady", NewItem(content={"n": 1}), NewItem(content={"n": 2}))
    r1 = robots["r1"]
    held = await r1.next("steady", count=2)
    await fleet.host.stop()
    await asyncio.sleep(3.0)  # six heartbeat intervals with nobody listening
    restarted = ServiceHost(fleet.host.config)
    await restarted.start()
    try:
        await asyncio.sleep(HOLDER_CHECK_INTERVAL_S + 1.0)  # past the grace and a check of holders
        for item in held:
            shown = (await fleet.client.request(ItemShow(id=item.id))).item
            assert shown.state is ItemState.IN_PROGRESS and shown.lease == item.lease and shown.robot == "r1"
        for item in held:
            assert (await r1.complete(item)).state is ItemState.SUCCESSFUL
    finally:
        await restarted.stop()
