"""The queues service: work queues, their items, and the robots that take them.

Decisions come from the pure module `states` (what becomes of an item, the processing order, the
filters); this module reads requests and rows, asks it, writes rows and publishes events. Every
change of an item is a conditional update on the state and lease it was decided from, and taking
items locks them with `SKIP LOCKED` on PostgreSQL: any number of replicas serve one database, and
every item goes to exactly one holder.

An item leaves its holder without a result in three ways, each within seconds:
- its robot is lost (Unresponsive or Disconnected in the registry's presence, which every replica
  mirrors; the registry's grace after an outage keeps live robots' items where they are);
- its lease lapses (the holder gave no progress for the queue's `lease_s`);
- the job it was taken for ends (the jobs service's `job_state_changed` events, read through a
  durable consumer the replicas share, so an event published while no replica ran is read later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import jsonschema
import nats.errors
from nats.js import api
from nats.js.errors import NotFoundError
from sqlalchemy.exc import IntegrityError

from herder.protocol import codec, subjects
from herder.protocol.auth import Permission, PrincipalKind
from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, NotFound
from herder.protocol.jobs import JobState
from herder.protocol.messages import Event, Model, new_id, utcnow
from herder.protocol.queues import (
    MAX_EVENT_ITEM_IDS,
    ItemAdd,
    ItemDelete,
    ItemDetails,
    ItemInfo,
    ItemListRequest,
    ItemNext,
    ItemPage,
    ItemPostpone,
    ItemProgress,
    ItemResultRequest,
    ItemRetry,
    ItemsAdded,
    ItemsAddedEvent,
    ItemsChanged,
    ItemShow,
    ItemsSet,
    ItemsTaken,
    ItemState,
    ItemStateChangedEvent,
    QueueCreate,
    QueueCreatedEvent,
    QueueDetails,
    QueueInfo,
    QueueList,
    QueueListRequest,
    QueueSettings,
    QueueShow,
    QueueStats,
    QueueUpdate,
    QueueUpdatedEvent,
)
from herder.protocol.registry import RobotPresence
from herder.services.common import database
from herder.services.common.bus import ensure_bucket, ensure_event_stream
from herder.services.common.events import Transaction
from herder.services.common.runtime import RequestContext, Service, endpoint
from herder.services.common.together import Entry, Together
from herder.services.jobs.directory import RobotDirectory
from herder.services.queues import states
from herder.services.queues.repository import (
    ItemRecord,
    QueueRecord,
    QueueRepository,
    json_text,
    new_item_row,
    record_of,
    retry_row,
)
from herder.services.queues.states import Why

SWEEP_INTERVAL_S = 1.0
# The holders of InProgress items are checked against the robots' presence this often (a backstop
# for a loss the service did not see happen: it was not running, or the change came before it was).
HOLDER_CHECK_INTERVAL_S = 5.0
# Queues are read from a cache this young at most on the robots' hot paths (next, result): a change
# of settings made through another replica applies there within this long.
QUEUE_CACHE_S = 2.0
JOB_ENDS_DURABLE = "queues_job_ends"
JOB_ENDS_BATCH = 100
JOB_ENDS_WAIT_S = 1.0
JOB_ENDS_GATHER_S = 0.25
_FINAL_JOB_STATES = frozenset(state.value for state in JobState if state.final)
_MAX_LIST_IDS = 10_000
# At most this many robots' requests share one transaction.
TOGETHER_MAX = 64
# Batches of each kind under way at once, on PostgreSQL.
TOGETHER_WORKERS = 3

# What `item_result` answers: the items after the change, and the retries made.
_Set = tuple[list["ItemRecord"], list["ItemRecord"]]
# A robot's `item_next` or `item_result`, as it waits to be served with others.
_RobotCall = tuple[ItemNext | ItemResultRequest, RequestContext]


class QueuesService(Service):
    """Work queues: items added by people, programs and robots, taken and finished by robots."""

    name = "queues"

    async def setup(self) -> None:
        self.repo = QueueRepository()
        js = self.runtime.js
        robots_kv = await ensure_bucket(js, subjects.ROBOTS_BUCKET, self.runtime.jetstream)
        self.directory = RobotDirectory(robots_kv, on_change=self._robot_changed, supervisor=self.tasks)
        await self.directory.start()
        self._job_end_tenants: set[str] = set()
        self._by_name: dict[tuple[str, str], tuple[float, QueueRecord]] = {}
        self._by_id: dict[str, tuple[float, QueueRecord]] = {}
        self._last_holder_check = 0.0
        async with database.read(self.engine) as connection:
            tenants = {queue.tenant for queue in await self.repo.all_queues(connection)}
        for tenant in sorted(tenants | {subjects.DEFAULT_TENANT}):
            await self._follow_job_ends(tenant)
        self.tasks.periodic("queues.sweep", self.sweep, SWEEP_INTERVAL_S)
        # Robots' takes and results, served in batches: one transaction and one commit for whatever
        # arrived together (see `together`).
        # SQLite has one writer and herder one connection to it; PostgreSQL commits several at once.
        workers = TOGETHER_WORKERS if self.engine.dialect.name == "postgresql" else 1
        self._together: Together[_RobotCall, Any] = Together(
            "queues.robots", self._robots_together, max_batch=TOGETHER_MAX, workers=workers
        )
        self._together.start(self.tasks)

    async def teardown(self) -> None:
        await self._together.stop(self.tasks)
        await self.tasks.cancel("queues.sweep")
        await self.directory.stop()

    # --- queues ---

    @endpoint(permission=Permission.QUEUES_MANAGE, idempotent=True)
    async def queue_create(self, request: QueueCreate, ctx: RequestContext) -> QueueInfo:
        """Create a queue; a name already taken is `conflict`."""
        _validator(request.settings)  # a schema that is not one is refused before anything is written
        record = QueueRecord(
            id=new_id(),
            tenant=ctx.tenant,
            name=request.name,
            settings=request.settings,
            created_at=utcnow(),
            created_by=ctx.actor,
        )
        try:
            async with self.runtime.events.transaction(defer=True) as tx:
                await ctx.claim(tx.connection, record.id)
                if await self.repo.queue(tx.connection, ctx.tenant, request.name) is not None:
                    raise Conflict(f"queue {request.name!r} exists already; change it with queue_update")
                await self.repo.create_queue(tx.connection, record)
                tx.emit(Event.of(QueueCreatedEvent(queue=record.name), tenant=ctx.tenant, actor=ctx.actor))
        except IntegrityError:
            raise Conflict(f"queue {request.name!r} exists already; change it with queue_update") from None
        await self._follow_job_ends(ctx.tenant)
        ctx.log.info("queue.created", queue=record.name)
        return record.info()

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        if verb == "queue_create":
            async with database.read(self.engine) as connection:
                found = await self.repo.queues_by_id(connection, [object_id])
            record = found.get(object_id)
            return record.info() if record is not None and record.tenant == ctx.tenant else None
        return None

    @endpoint(permission=Permission.QUEUES_MANAGE)
    async def queue_update(self, request: QueueUpdate, ctx: RequestContext) -> QueueInfo:
        """Change a queue's settings."""
        _validator(request.settings)
        async with self.runtime.events.transaction(defer=True) as tx:
            queue = await self._queue(tx.connection, ctx.tenant, request.name)
            if request.settings.unique_references and not queue.settings.unique_references:
                raise BadRequest(
                    f"queue {queue.name!r} was made without unique references; items already in it may share "
                    "one, so it cannot be made unique now: make a new queue"
                )
            await self.repo.update_queue(tx.connection, queue, request.settings, utcnow())
            self._forget(ctx.tenant, queue.name)
            tx.emit(Event.of(QueueUpdatedEvent(queue=queue.name), tenant=ctx.tenant, actor=ctx.actor))
        ctx.log.info("queue.updated", queue=queue.name)
        return QueueInfo(
            name=queue.name,
            tenant=queue.tenant,
            settings=request.settings,
            created_at=queue.created_at,
            created_by=queue.created_by,
        )

    @endpoint(permission=Permission.QUEUES_READ)
    async def queue_list(self, request: QueueListRequest, ctx: RequestContext) -> QueueList:
        """The tenant's queues, by name."""
        async with database.read(self.engine) as connection:
            return QueueList(queues=[queue.info() for queue in await self.repo.list_queues(connection, ctx.tenant)])

    @endpoint(permission=Permission.QUEUES_READ)
    async def queue_show(self, request: QueueShow, ctx: RequestContext) -> QueueDetails:
        """A queue with its figures: items per state, processing times, past SLA and at risk."""
        now = utcnow()
        async with database.read(self.engine) as connection:
            queue = await self._queue(connection, ctx.tenant, request.name)
            counts = await self.repo.counts(connection, queue)
            times = await self.repo.processing_times(connection, queue)
            cutoffs = states.sla_cutoffs(now, queue.settings.sla_minutes, queue.settings.risk_minutes)
            past = at_risk = 0
            if cutoffs is not None:
                past = await self.repo.open_created_by(connection, queue, cutoffs[0])
                at_risk = await self.repo.open_created_by(connection, queue, cutoffs[1]) - past
        p95 = states.percentile(times, 0.95)
        stats = QueueStats(
            counts={state.value: counts.get(state.value, 0) for state in ItemState},
            processed=len(times),
            average_processing_s=round(sum(times) / len(times), 3) if times else None,
            p95_processing_s=round(p95, 3) if p95 is not None else None,
            past_sla=past,
            at_risk=at_risk,
        )
        return QueueDetails(queue=queue.info(), stats=stats)

    # --- items: adding ---

    @endpoint(idempotent=True)
    async def item_add(self, request: ItemAdd, ctx: RequestContext) -> ItemsAdded:
        """Add items, all or none (people and programs with `queues.add`, robots with their own token)."""
        self._may_add(ctx)
        now = utcnow()
        ids = [new_id() for _ in request.items]
        try:
            async with self.runtime.events.transaction(defer=True) as tx:
                await ctx.claim(tx.connection, ids[0])
                queue = await self._queue(tx.connection, ctx.tenant, request.queue)
                if ctx.principal is not None and ctx.principal.kind is PrincipalKind.ROBOT:
                    await self._check_robot(queue, ctx.tenant, ctx.principal.name)
                _check_contents(queue, request)
                await self._check_references(tx, queue, request)
                if request.dry_run:
                    return ItemsAdded(queue=queue.name, ids=[], count=len(request.items), dry_run=True)
                first = await self.repo.reserve_seq(tx.connection, queue, len(request.items))
                rows = [
                    new_item_row(item_id=item_id, queue=queue, seq=first + n, item=item, now=now, created_by=ctx.actor)
                    for n, (item_id, item) in enumerate(zip(ids, request.items, strict=True))
                ]
                await self.repo.insert_items(tx.connection, rows)
                tx.emit(
                    Event.of(
                        ItemsAddedEvent(queue=queue.name, count=len(ids), item_ids=ids[:MAX_EVENT_ITEM_IDS]),
                        tenant=ctx.tenant,
                        actor=ctx.actor,
                    )
                )
        except IntegrityError:
            # Two requests added one reference at once: the index kept it once, this one is refused whole.
            raise Conflict(
                f"a reference in this request was added to queue {request.queue!r} meanwhile; nothing was stored"
            ) from None
        ctx.log.info("queue.items_added", queue=request.queue, count=len(ids))
        return ItemsAdded(queue=request.queue, ids=ids, count=len(ids))

    async def _check_references(self, tx: Transaction, queue: QueueRecord, request: ItemAdd) -> None:
        if not queue.settings.unique_references:
            return
        seen: set[str] = set()
        for n, item in enumerate(request.items):
            if item.reference is None:
                raise BadRequest(f"items[{n}].reference: queue {queue.name!r} needs a unique reference on every item")
            if item.reference in seen:
                raise Conflict(
                    f"items[{n}].reference: {item.reference!r} is given twice in this request; queue {queue.name!r} "
                    "holds each reference once, so nothing was stored",
                    details={"reference": item.reference},
                )
            seen.add(item.reference)
        taken = await self.repo.taken_references(tx.connection, queue, sorted(seen))
        if taken:
            shown = sorted(taken)[0]
            more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            raise Conflict(
                f"reference {shown!r}{more} is in queue {queue.name!r} already; nothing was stored",
                details={"references": sorted(taken)[:20]},
            )

    # --- items: robots ---

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def item_next(self, request: ItemNext, ctx: RequestContext) -> ItemsTaken:
        """Give the calling robot its next items (up to `count`), across the queues named."""
        robot = ctx.robot_name()
        states.parse_tags(request.tags)  # a bad rule is refused here, before it waits for a batch
        taken: list[ItemRecord] = await self._together.submit((request, ctx))
        if taken:
            ctx.log.info("queue.items_taken", robot=robot, count=len(taken), job_id=request.job_id)
        return ItemsTaken(items=[item.info() for item in taken])

    async def _take(self, tx: Transaction, request: ItemNext, ctx: RequestContext, now: datetime) -> list[ItemRecord]:
        robot = ctx.robot_name()
        tags = states.parse_tags(request.tags)
        queues = [await self._cached_queue(tx.connection, ctx.tenant, choice.name) for choice in request.queues]
        by_name = {queue.name: queue for queue in queues}
        for queue in queues:
            await self._check_robot(queue, ctx.tenant, robot)
        taken: list[ItemRecord] = []
        for name in states.queue_order(request.queues, request.order):
            wanted = request.count - len(taken)
            if wanted <= 0:
                break
            got = await self.repo.take(
                tx.connection,
                by_name[name],
                count=wanted,
                now=now,
                robot=robot,
                job_id=request.job_id,
                tags=tags,
                reference=request.reference,
                priority=request.priority,
            )
            if got:
                self._emit_changed(tx, ctx.tenant, name, ItemState.IN_PROGRESS, got, robot=robot, actor=robot)
            taken += got
        return taken

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def item_result(self, request: ItemResultRequest, ctx: RequestContext) -> ItemsSet:
        """Set the results of items the calling robot holds, all or none."""
        robot = ctx.robot_name()
        ids = [result.id for result in request.results]
        if len(set(ids)) != len(ids):
            raise BadRequest("results: an item is named twice; give each item's result once")
        after, copies = await self._together.submit((request, ctx))
        ctx.log.info("queue.items_set", robot=robot, count=len(after), retries=len(copies))
        return ItemsSet(items=[item.info() for item in after], retries=[copy.info() for copy in copies])

    async def _robots_together(self, entries: list[Entry[_RobotCall, Any]]) -> None:
        """Serve robots' concurrent takes and results in one transaction: the items results name are
        read (and locked) at once, each result request is checked and applied in turn against what
        the ones before it changed, the items that simply end are written in one statement, then each
        take is served. A request refused is refused alone, before anything was written for it."""
        now = utcnow()
        served: list[tuple[Entry[_RobotCall, Any], Any]] = []
        async with self.runtime.events.transaction(defer=True) as tx:
            setting = [entry for entry in entries if isinstance(entry.value[0], ItemResultRequest)]
            if setting:
                wanted: dict[str, list[str]] = defaultdict(list)
                for entry in setting:
                    request, ctx = entry.value
                    assert isinstance(request, ItemResultRequest)
                    wanted[ctx.tenant] += [result.id for result in request.results]
                found: dict[str, dict[str, ItemRecord]] = {
                    tenant: await self.repo.items_by_id(tx.connection, tenant, ids, lock=True)
                    for tenant, ids in sorted(wanted.items())
                }
                queue_ids = {item.queue_id for items_of in found.values() for item in items_of.values()}
                queues = await self._cached_queues_by_id(tx.connection, queue_ids)
                ending_rows: list[dict[str, Any]] = []
                for entry in setting:
                    request, ctx = entry.value
                    assert isinstance(request, ItemResultRequest)
                    try:
                        answer = await self._set_results(tx, request, ctx, found[ctx.tenant], queues, now, ending_rows)
                    except HerderError as exc:
                        entry.fail(exc)
                        continue
                    served.append((entry, answer))
                await self.repo.finish_many(tx.connection, ending_rows)
            for entry in entries:
                request, ctx = entry.value
                if isinstance(request, ItemNext):
                    try:
                        served.append((entry, await self._take(tx, request, ctx, now)))
                    except HerderError as exc:
                        entry.fail(exc)
        for entry, answer in served:
            entry.answer(answer)

    async def _set_results(
        self,
        tx: Transaction,
        request: ItemResultRequest,
        ctx: RequestContext,
        found: dict[str, ItemRecord],
        queues: dict[str, QueueRecord],
        now: datetime,
        ending_rows: list[dict[str, Any]],
    ) -> _Set:
        """Check one request's results against the items as they stand, then apply them: retries are
        written at once, plain endings are added to `ending_rows` for the caller to write."""
        robot = ctx.robot_name()
        for result in request.results:
            item = found.get(result.id)
            if item is None:
                raise NotFound(f"no item {result.id}")
            states.check_holder(
                state=item.state,
                robot=item.robot,
                lease=item.lease,
                caller=robot,
                presented=result.lease,
                item_id=item.id,
            )
        after: list[ItemRecord] = []
        copies: list[ItemRecord] = []
        for result in request.results:
            item = found[result.id]
            queue = queues[item.queue_id]
            ending = states.after_result(
                result.state,
                result.exception,
                result.reason,
                attempt=item.attempt,
                max_retries=queue.settings.max_retries,
            )
            if result.state is ItemState.SUCCESSFUL and result.output is not None:
                item.output = result.output
            if ending.retry:
                ended, copy = await self._end(tx, item, queue, ending, now, lease=result.lease)
                after.append(ended)
                copies += [copy] if copy is not None else []
                continue
            ending_rows.append(_ending_row(item, ending, now, lease=result.lease))
            _ended(item, ending, now, retried_by=None)
            after.append(item)
        self._emit_grouped(tx, ctx.tenant, after, robot=robot, actor=robot)
        return after, copies

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def item_postpone(self, request: ItemPostpone, ctx: RequestContext) -> ItemInfo:
        """Give a held item back as New, invisible until the time named."""
        robot = ctx.robot_name()
        now = utcnow()
        async with self.runtime.events.transaction(defer=True) as tx:
            item = await self._held_item(tx, ctx.tenant, request.id, robot, request.lease)
            reason = request.reason or f"postponed until {request.until.isoformat(timespec='seconds')}"
            values = {
                "state": ItemState.NEW.value,
                "postpone_until": request.until,
                "robot": item.robot,
                "job_id": None,
                "lease_expires_at": None,
                "reason": reason,
                "updated_at": now,
            }
            if not await self.repo.finish(
                tx.connection, item, from_state=ItemState.IN_PROGRESS, lease=request.lease, values=values
            ):
                raise Conflict(f"item {item.id} changed meanwhile; it is no longer yours")
            item.state, item.postpone_until, item.job_id = ItemState.NEW, request.until, None
            item.lease_expires_at, item.reason, item.updated_at = None, reason, now
            self._emit_changed(tx, ctx.tenant, item.queue, ItemState.NEW, [item], robot=robot, actor=robot)
        return item.info()

    @endpoint(permission=Permission.ROBOT_AGENT)
    async def item_progress(self, request: ItemProgress, ctx: RequestContext) -> ItemInfo:
        """Record how far a held item has got, and renew its lease."""
        robot = ctx.robot_name()
        now = utcnow()
        async with self.runtime.events.transaction() as tx:
            item = await self._held_item(tx, ctx.tenant, request.id, robot, request.lease)
            queue = (await self.repo.queues_by_id(tx.connection, [item.queue_id]))[item.queue_id]
            expires = now + timedelta(seconds=queue.settings.lease_s)
            values = {"progress": request.progress, "lease_expires_at": expires, "updated_at": now}
            if not await self.repo.finish(
                tx.connection, item, from_state=ItemState.IN_PROGRESS, lease=request.lease, values=values
            ):
                raise Conflict(f"item {item.id} changed meanwhile; it is no longer yours")
        item.progress, item.lease_expires_at, item.updated_at = request.progress, expires, now
        return item.info()

    async def _held_item(self, tx: Transaction, tenant: str, item_id: str, robot: str, lease: int) -> ItemRecord:
        item = (await self.repo.items_by_id(tx.connection, tenant, [item_id], lock=True)).get(item_id)
        if item is None:
            raise NotFound(f"no item {item_id}")
        states.check_holder(
            state=item.state, robot=item.robot, lease=item.lease, caller=robot, presented=lease, item_id=item.id
        )
        return item

    # --- items: people ---

    @endpoint(permission=Permission.QUEUES_READ)
    async def item_list(self, request: ItemListRequest, ctx: RequestContext) -> ItemPage:
        """A page of a queue's items, oldest first."""
        tags = states.parse_tags(request.filter.tags)
        after = int(request.cursor) if request.cursor is not None else None
        async with database.read(self.engine) as connection:
            queue = await self._queue(connection, ctx.tenant, request.queue)
            found = await self.repo.page(
                connection, queue, request.filter, tags, after_seq=after, limit=request.limit + 1
            )
        more = len(found) > request.limit
        shown = found[: request.limit]
        return ItemPage(items=[item.info() for item in shown], next_cursor=str(shown[-1].seq) if more else None)

    @endpoint(permission=Permission.QUEUES_READ)
    async def item_show(self, request: ItemShow, ctx: RequestContext) -> ItemDetails:
        """An item and every attempt of its work."""
        async with database.read(self.engine) as connection:
            item = (await self.repo.items_by_id(connection, ctx.tenant, [request.id])).get(request.id)
            if item is None:
                raise NotFound(f"no item {request.id}")
            chain = await self.repo.chain(connection, item)
        return ItemDetails(item=item.info(), chain=[link.info() for link in chain])

    @endpoint(permission=Permission.QUEUES_MANAGE)
    async def item_delete(self, request: ItemDelete, ctx: RequestContext) -> ItemsChanged:
        """Delete New items, by id or by filter."""
        now = utcnow()
        async with self.runtime.events.transaction(defer=True) as tx:
            queue = await self._queue(tx.connection, ctx.tenant, request.queue)
            ids = await self._chosen(tx, queue, request.ids, request.filter, [ItemState.NEW])
            if request.dry_run:
                return ItemsChanged(queue=queue.name, count=len(ids), dry_run=True)
            count = await self.repo.move_many(
                tx.connection,
                ids,
                from_states=[ItemState.NEW],
                values={
                    "state": ItemState.DELETED.value,
                    "unique_ref": None,  # a deleted item's reference may be used again
                    "reason": f"deleted by {ctx.actor}",
                    "ended_at": now,
                    "updated_at": now,
                },
            )
            if count:
                tx.emit(_changed_event(ctx.tenant, queue.name, ItemState.DELETED, ids, actor=ctx.actor, count=count))
        ctx.log.info("queue.items_deleted", queue=queue.name, count=count)
        return ItemsChanged(queue=queue.name, count=count)

    @endpoint(permission=Permission.QUEUES_MANAGE)
    async def item_retry(self, request: ItemRetry, ctx: RequestContext) -> ItemsChanged:
        """Retry Failed and Abandoned items by hand, by id or by filter: each gets a New copy."""
        now = utcnow()
        retryable = [ItemState.FAILED, ItemState.ABANDONED]
        async with self.runtime.events.transaction(defer=True) as tx:
            queue = await self._queue(tx.connection, ctx.tenant, request.queue)
            ids = await self._chosen(tx, queue, request.ids, request.filter, retryable)
            if request.dry_run:
                return ItemsChanged(queue=queue.name, count=len(ids), dry_run=True)
            found = await self.repo.items_by_id(tx.connection, ctx.tenant, ids, lock=True)
            chosen = [found[item_id] for item_id in ids if item_id in found and found[item_id].state in retryable]
            first = await self.repo.reserve_seq(tx.connection, queue, len(chosen)) if chosen else 0
            retried: list[str] = []
            copies: list[dict[str, Any]] = []
            for n, item in enumerate(chosen):
                copy_id = new_id()
                moved = await self.repo.finish(
                    tx.connection,
                    item,
                    from_state=item.state,
                    lease=None,
                    values={"state": ItemState.RETRIED.value, "retried_by": copy_id, "updated_at": now},
                )
                if moved:
                    copies.append(retry_row(item, queue, copy_id=copy_id, seq=first + n, now=now, created_by=ctx.actor))
                    retried.append(item.id)
            await self.repo.insert_items(tx.connection, copies)
            if retried:
                tx.emit(_changed_event(ctx.tenant, queue.name, ItemState.RETRIED, retried, actor=ctx.actor))
        ctx.log.info("queue.items_retried", queue=queue.name, count=len(retried))
        return ItemsChanged(queue=queue.name, count=len(retried))

    async def _chosen(
        self,
        tx: Transaction,
        queue: QueueRecord,
        ids: Sequence[str],
        where: Any,
        allowed: Sequence[ItemState],
    ) -> list[str]:
        """The ids a bulk change applies to: those named (every one in `allowed` states, else the
        request is refused) or those the filter matches in `allowed` states."""
        if ids:
            found = await self.repo.items_by_id(tx.connection, queue.tenant, ids)
            for item_id in ids:
                item = found.get(item_id)
                if item is None or item.queue_id != queue.id:
                    raise NotFound(f"no item {item_id} in queue {queue.name!r}")
                if item.state not in allowed:
                    shown = " or ".join(state.value for state in allowed)
                    raise Conflict(f"item {item_id} is {item.state.value}, not {shown}; nothing was changed")
            return list(dict.fromkeys(ids))
        narrowed = where.model_copy(update={"states": [s for s in (where.states or allowed) if s in allowed]})
        if not narrowed.states:
            return []
        return await self.repo.matching_ids(
            tx.connection, queue, narrowed, states.parse_tags(narrowed.tags), limit=_MAX_LIST_IDS
        )

    # --- losing holders ---

    async def _robot_changed(
        self, tenant: str, name: str, before: RobotPresence | None, after: RobotPresence | None
    ) -> None:
        if after is not None and after.status.online:
            return
        if before is not None and not before.status.online:
            return  # it was gone already: its items went then
        await self.release(tenant, robot=name, why=Why.ROBOT_LOST)

    async def release(
        self, tenant: str | None, *, robot: str | None = None, job_id: str | None = None, why: Why
    ) -> int:
        """Take InProgress items from their holder (a lost robot, a job that ended, a lapsed lease):
        abandoned, failed or retried per the queue's policy. Return how many moved."""
        now = utcnow()
        moved = 0
        while True:
            # Read first: most sweeps and job ends find nothing, and need no write transaction. What
            # is found is moved by conditional updates, so a change meanwhile is never overwritten.
            async with database.read(self.engine) as connection:
                held = await self.repo.held(
                    connection,
                    tenant=tenant,
                    robot=robot,
                    job_id=job_id,
                    lease_expired_by=now if why is Why.LEASE_EXPIRED else None,
                    limit=500,
                )
            if not held:
                break
            async with self.runtime.events.transaction(defer=True) as tx:
                queues = await self.repo.queues_by_id(tx.connection, {item.queue_id for item in held})
                after: list[ItemRecord] = []
                for item in held:
                    queue = queues[item.queue_id]
                    ending = states.after_loss(
                        why,
                        robot=item.robot,
                        attempt=item.attempt,
                        max_retries=queue.settings.max_retries,
                        retry_abandoned=queue.settings.retry_abandoned,
                        at=now,
                    )
                    ended, _copy = await self._end(tx, item, queue, ending, now, lease=item.lease)
                    if ended.state is not ItemState.IN_PROGRESS:
                        after.append(ended)
                for item_tenant in {item.tenant for item in after}:
                    self._emit_grouped(tx, item_tenant, [i for i in after if i.tenant == item_tenant], robot=robot)
            moved += len(after)
            if len(held) < 500 or not after:
                break
        if moved:
            self.log.info("queue.items_released", why=why.value, robot=robot, job_id=job_id, count=moved)
        return moved

    async def _end(
        self, tx: Transaction, item: ItemRecord, queue: QueueRecord, ending: states.Ending, now: datetime, *, lease: int
    ) -> tuple[ItemRecord, ItemRecord | None]:
        """Write how a held item ended (and its retry's copy); return it as it is now, with the copy.
        An item that changed meanwhile is returned unchanged."""
        copy_id = new_id() if ending.retry else None
        values: dict[str, Any] = {
            "state": ending.state.value,
            "exception": ending.exception.value if ending.exception is not None else None,
            "reason": ending.reason,
            "output": json_text(item.output) if ending.state is ItemState.SUCCESSFUL else None,
            "lease_expires_at": None,
            "ended_at": now,
            "updated_at": now,
            "retried_by": copy_id,
        }
        if not await self.repo.finish(
            tx.connection, item, from_state=ItemState.IN_PROGRESS, lease=lease, values=values
        ):
            return item, None
        _ended(item, ending, now, retried_by=copy_id)
        if copy_id is None:
            return item, None
        seq = await self.repo.reserve_seq(tx.connection, queue, 1)
        row = retry_row(item, queue, copy_id=copy_id, seq=seq, now=now, created_by=item.created_by)
        await self.repo.insert_items(tx.connection, [row])
        return item, record_of(row, queue.name)

    # --- background ---

    async def sweep(self) -> None:
        """Lapsed leases, New items past their queue's limit, and holders no longer online."""
        await self.release(None, why=Why.LEASE_EXPIRED)
        await self._abandon_stale_new()
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_holder_check >= HOLDER_CHECK_INTERVAL_S:
            self._last_holder_check = loop.time()
            await self._check_holders()

    async def _abandon_stale_new(self) -> None:
        now = utcnow()
        async with database.read(self.engine) as connection:
            limited = [queue for queue in await self.repo.all_queues(connection) if queue.settings.abandon_new_after_s]
        for queue in limited:
            assert queue.settings.abandon_new_after_s is not None
            cutoff = now - timedelta(seconds=queue.settings.abandon_new_after_s)
            async with self.runtime.events.transaction(defer=True) as tx:
                ids = await self.repo.stale_new(tx.connection, queue, cutoff)
                if not ids:
                    continue
                waited = _span(queue.settings.abandon_new_after_s)
                count = await self.repo.move_many(
                    tx.connection,
                    ids,
                    from_states=[ItemState.NEW],
                    values={
                        "state": ItemState.ABANDONED.value,
                        "reason": f"abandoned: New for longer than the queue's {waited}",
                        "ended_at": now,
                        "updated_at": now,
                    },
                )
                if count:
                    tx.emit(_changed_event(queue.tenant, queue.name, ItemState.ABANDONED, ids, actor=None, count=count))

    async def _check_holders(self) -> None:
        """Release the items of holders the presence mirror shows as not online (or not there)."""
        async with database.read(self.engine) as connection:
            holders = await self.repo.holders(connection)
        for tenant, robot in holders:
            presence = self.directory.get(tenant, robot)
            if presence is None or not presence.status.online:
                await self.release(tenant, robot=robot, why=Why.ROBOT_LOST)

    async def _follow_job_ends(self, tenant: str) -> None:
        """Read the tenant's `job_state_changed` events through the durable consumer the replicas
        share, and fail the items held for each job that ended."""
        if tenant in self._job_end_tenants:
            return
        self._job_end_tenants.add(tenant)
        await ensure_event_stream(self.runtime.js, tenant, self.runtime.jetstream)
        self.tasks.watch(f"queues.job_ends.{tenant}", lambda: self._job_ends(tenant))

    async def _job_ends(self, tenant: str) -> None:
        js = self.runtime.js
        stream = subjects.events_stream(tenant)
        config = api.ConsumerConfig(
            durable_name=JOB_ENDS_DURABLE,
            filter_subject=subjects.event_type_subject(tenant, "jobs.job_state_changed"),
            deliver_policy=api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=1000,
        )
        with contextlib.suppress(Exception):
            await js.add_consumer(stream, config)
        subscription = await js.pull_subscribe_bind(JOB_ENDS_DURABLE, stream=stream)
        loop = asyncio.get_running_loop()
        try:
            while True:
                # Job ends are gathered for a moment and checked against held items in one query:
                # most jobs hold none, and a busy fleet ends many jobs a second.
                pending: list[Any] = []
                deadline = None
                while deadline is None or (loop.time() < deadline and len(pending) < JOB_ENDS_BATCH):
                    wait = JOB_ENDS_WAIT_S if deadline is None else max(deadline - loop.time(), 0.01)
                    with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                        pending += await subscription.fetch(JOB_ENDS_BATCH - len(pending), timeout=wait)
                    if pending and deadline is None:
                        deadline = loop.time() + JOB_ENDS_GATHER_S
                ended: list[str] = []
                for message in pending:
                    try:
                        event = codec.load(Event, message.data)
                    except BadRequest:
                        continue
                    if event.data.get("state") in _FINAL_JOB_STATES and isinstance(event.data.get("job_id"), str):
                        ended.append(event.data["job_id"])
                if ended:
                    async with database.read(self.engine) as connection:
                        holding = await self.repo.jobs_holding(connection, ended)
                    for job_id in holding:
                        await self.release(tenant, job_id=job_id, why=Why.JOB_ENDED)
                await pending[-1].ack()  # the consumer acknowledges all up to the last one
        except NotFoundError:
            raise
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    # --- helpers ---

    async def _queue(self, connection: Any, tenant: str, name: str) -> QueueRecord:
        queue = await self.repo.queue(connection, tenant, name)
        if queue is None:
            raise NotFound(f"no queue {name!r}; see 'herder queue list'")
        return queue

    async def _cached_queue(self, connection: Any, tenant: str, name: str) -> QueueRecord:
        """`_queue`, from a cache at most QUEUE_CACHE_S old (changes on this replica apply at once)."""
        now = asyncio.get_running_loop().time()
        cached = self._by_name.get((tenant, name))
        if cached is not None and now - cached[0] < QUEUE_CACHE_S:
            return cached[1]
        queue = await self._queue(connection, tenant, name)
        self._remember(queue, now)
        return queue

    async def _cached_queues_by_id(self, connection: Any, ids: set[str]) -> dict[str, QueueRecord]:
        now = asyncio.get_running_loop().time()
        found = {
            qid: self._by_id[qid][1] for qid in ids if qid in self._by_id and now - self._by_id[qid][0] < QUEUE_CACHE_S
        }
        missing = ids - set(found)
        if missing:
            for queue in (await self.repo.queues_by_id(connection, missing)).values():
                self._remember(queue, now)
                found[queue.id] = queue
        return found

    def _remember(self, queue: QueueRecord, now: float) -> None:
        if len(self._by_id) > 10_000:  # queues are few; this only bounds a pathological tenant
            self._by_name.clear()
            self._by_id.clear()
        self._by_name[(queue.tenant, queue.name)] = (now, queue)
        self._by_id[queue.id] = (now, queue)

    def _forget(self, tenant: str, name: str) -> None:
        cached = self._by_name.pop((tenant, name), None)
        if cached is not None:
            self._by_id.pop(cached[1].id, None)

    def _may_add(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None or not (principal.can(Permission.QUEUES_ADD) or principal.can(Permission.ROBOT_AGENT)):
            raise Forbidden(f"adding queue items needs the permission {Permission.QUEUES_ADD.value!r}")

    async def _check_robot(self, queue: QueueRecord, tenant: str, robot: str) -> None:
        """Refuse (`forbidden`) a robot the queue does not let take, add or finish its items."""
        allowed_robots, allowed_groups = queue.settings.robots, queue.settings.robot_groups
        if not allowed_robots and not allowed_groups:
            return
        if robot in allowed_robots:
            return
        presence = self.directory.get(tenant, robot) or await self.directory.fetch(tenant, robot)
        if presence is not None and set(presence.groups) & set(allowed_groups):
            return
        raise Forbidden(f"robot {robot} may not use queue {queue.name!r}: it is for {_allowed(queue.settings)}")

    def _emit_changed(
        self,
        tx: Transaction,
        tenant: str,
        queue: str,
        state: ItemState,
        changed: Sequence[ItemRecord],
        *,
        robot: str | None,
        actor: str | None,
    ) -> None:
        reason = changed[0].reason if len(changed) == 1 else ""
        tx.emit(
            _changed_event(tenant, queue, state, [item.id for item in changed], actor=actor, robot=robot, reason=reason)
        )

    def _emit_grouped(
        self,
        tx: Transaction,
        tenant: str,
        changed: Iterable[ItemRecord],
        *,
        robot: str | None,
        actor: str | None = None,
    ) -> None:
        groups: dict[tuple[str, ItemState], list[ItemRecord]] = defaultdict(list)
        for item in changed:
            groups[(item.queue, item.state)].append(item)
        for (queue, state), grouped in groups.items():
            self._emit_changed(tx, tenant, queue, state, grouped, robot=robot or grouped[0].robot, actor=actor)


def _changed_event(
    tenant: str,
    queue: str,
    state: ItemState,
    ids: Sequence[str],
    *,
    actor: str | None,
    robot: str | None = None,
    reason: str = "",
    count: int | None = None,
) -> Event:
    return Event.of(
        ItemStateChangedEvent(
            queue=queue,
            state=state,
            count=len(ids) if count is None else count,
            item_ids=list(ids[:MAX_EVENT_ITEM_IDS]),
            robot=robot,
            reason=reason,
        ),
        tenant=tenant,
        actor=actor,
    )


def _ending_row(item: ItemRecord, ending: states.Ending, now: datetime, *, lease: int) -> dict[str, Any]:
    """The parameters of `QueueRepository.finish_many` for one item that ends without a retry."""
    return {
        "b_id": item.id,
        "b_lease": lease,
        "b_state": ending.state.value,
        "b_exception": ending.exception.value if ending.exception is not None else None,
        "b_reason": ending.reason,
        "b_output": json_text(item.output) if ending.state is ItemState.SUCCESSFUL else None,
        "b_now": now,
    }


def _ended(item: ItemRecord, ending: states.Ending, now: datetime, *, retried_by: str | None) -> None:
    """Show on `item` what was written of its ending."""
    item.state, item.exception, item.reason = ending.state, ending.exception, ending.reason
    item.output = item.output if ending.state is ItemState.SUCCESSFUL else None
    item.lease_expires_at, item.ended_at, item.updated_at, item.retried_by = None, now, now, retried_by


def _allowed(settings: QueueSettings) -> str:
    parts = []
    if settings.robot_groups:
        parts.append("robots of group " + ", ".join(settings.robot_groups))
    if settings.robots:
        parts.append("robot " + ", ".join(settings.robots))
    return " and ".join(parts)


def _span(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


@lru_cache(maxsize=256)
def _compiled(schema_json: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_json)
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _validator(settings: QueueSettings) -> jsonschema.protocols.Validator | None:
    """The validator of a queue's content schema; `bad_request` when the schema is not a valid one."""
    if settings.content_schema is None:
        return None
    try:
        return _compiled(json.dumps(settings.content_schema, sort_keys=True))
    except jsonschema.SchemaError as exc:
        where = "".join(f".{part}" for part in exc.path)
        raise BadRequest(
            f"settings.content_schema{where}: not a valid JSON Schema: {_first_line(exc.message)}"
        ) from None


def _check_contents(queue: QueueRecord, request: ItemAdd) -> None:
    """Refuse the request (`bad_request`, naming the item, the path and the rule) when an item's
    content fails the queue's schema."""
    validator = _validator(queue.settings)
    if validator is None:
        return
    for n, item in enumerate(request.items):
        error = jsonschema.exceptions.best_match(validator.iter_errors(item.content))
        if error is None:
            continue
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        rule = f"{error.validator}: {_shown(error.validator_value)}"
        raise BadRequest(
            f"items[{n}].content{path}: fails the schema of queue {queue.name!r} (rule {rule})",
            details={"item": n, "path": f"content{path}", "rule": str(error.validator)},
        )


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid"


__all__ = ["QueuesService"]
