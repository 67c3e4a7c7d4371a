"""The queues service's tables, and every query it makes of them.

Guards in the schema, not only in the code: a unique index holds each reference of a unique-reference
queue once, and every change of an item is a conditional update on the state (and lease) it was
decided from, so two replicas never both move an item. Taking items locks the chosen rows with
`FOR UPDATE SKIP LOCKED` on PostgreSQL, so concurrent robots take different items without waiting
on each other; SQLite transactions are serialised in the one process that may open the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    UniqueConstraint,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.jobs import Priority
from herder.protocol.queues import ExceptionKind, ItemFilter, ItemInfo, ItemState, NewItem, QueueInfo, QueueSettings
from herder.services.common.database import UtcDateTime
from herder.services.queues import states
from herder.services.queues.states import TagRule

metadata = MetaData()

queues = Table(
    "queues_queues",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("name", String(63), nullable=False),
    Column("settings", Text(), nullable=False),
    Column("next_seq", BigInteger(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    Column("updated_at", UtcDateTime()),
    UniqueConstraint("tenant", "name", name="ux_queues_queues_name"),
)

items = Table(
    "queues_items",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("queue_id", String(32), nullable=False),
    Column("seq", BigInteger(), nullable=False),
    Column("state", String(16), nullable=False),
    Column("content", Text(), nullable=False),
    Column("reference", String(256)),
    Column("unique_ref", String(256)),
    Column("priority", String(8), nullable=False),
    Column("rank", Integer(), nullable=False),
    Column("lane", Integer(), nullable=False),
    Column("deadline", UtcDateTime()),
    Column("postpone_until", UtcDateTime()),
    Column("tags", Text(), nullable=False),
    Column("progress", Text(), nullable=False),
    Column("output", Text()),
    Column("exception", String(16)),
    Column("reason", Text(), nullable=False),
    Column("robot", String(63)),
    Column("job_id", String(32)),
    Column("lease", Integer(), nullable=False),
    Column("lease_expires_at", UtcDateTime()),
    Column("attempt", Integer(), nullable=False),
    Column("retry_of", String(32)),
    Column("retried_by", String(32)),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    Column("started_at", UtcDateTime()),
    Column("ended_at", UtcDateTime()),
    Column("updated_at", UtcDateTime(), nullable=False),
    # New items only, in processing order: what a take walks (see migration queues_0002).
    Index(
        "ix_queues_items_next",
        "queue_id",
        "lane",
        "rank",
        "deadline",
        "seq",
        postgresql_where=text("state = 'New'"),
        sqlite_where=text("state = 'New'"),
    ),
    Index("ix_queues_items_seq", "queue_id", "seq"),
    Index("ix_queues_items_holder", "tenant", "robot", "state"),
    Index("ix_queues_items_job", "job_id"),
    Index("ix_queues_items_lease", "state", "lease_expires_at"),
    Index("ix_queues_items_created", "queue_id", "state", "created_at"),
    Index("ux_queues_items_reference", "queue_id", "unique_ref", unique=True),
)

# Processing times for the statistics are read from at most this many of the newest ended items.
STATS_SAMPLE = 10_000
_NEW = ItemState.NEW.value
_IN_PROGRESS = ItemState.IN_PROGRESS.value

_FINISH = (
    update(items)
    .where(items.c.id == bindparam("b_id"), items.c.state == _IN_PROGRESS, items.c.lease == bindparam("b_lease"))
    .values(
        state=bindparam("b_state"),
        exception=bindparam("b_exception"),
        reason=bindparam("b_reason"),
        output=bindparam("b_output"),
        lease_expires_at=None,
        ended_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        retried_by=None,
    )
)


@dataclass(frozen=True, slots=True)
class QueueRecord:
    """A queue as stored."""

    id: str
    tenant: str
    name: str
    settings: QueueSettings
    created_at: datetime
    created_by: str | None = None

    def info(self) -> QueueInfo:
        return QueueInfo(
            name=self.name,
            tenant=self.tenant,
            settings=self.settings,
            created_at=self.created_at,
            created_by=self.created_by,
        )


@dataclass(slots=True)
class ItemRecord:
    """An item as stored (and as the service changes it before writing it back)."""

    id: str
    tenant: str
    queue_id: str
    queue: str
    seq: int
    state: ItemState
    content: dict[str, Any]
    reference: str | None
    priority: Priority
    deadline: datetime | None
    postpone_until: datetime | None
    tags: list[str]
    progress: str
    output: dict[str, Any] | None
    exception: ExceptionKind | None
    reason: str
    robot: str | None
    job_id: str | None
    lease: int
    lease_expires_at: datetime | None
    attempt: int
    retry_of: str | None
    retried_by: str | None
    created_at: datetime
    created_by: str | None
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime
    unique_ref: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def info(self) -> ItemInfo:
        return ItemInfo(
            id=self.id,
            queue=self.queue,
            state=self.state,
            content=self.content,
            reference=self.reference,
            priority=self.priority,
            deadline=self.deadline,
            postpone_until=self.postpone_until,
            tags=self.tags,
            progress=self.progress,
            output=self.output,
            exception=self.exception,
            reason=self.reason,
            robot=self.robot,
            job_id=self.job_id,
            lease=self.lease,
            lease_expires_at=self.lease_expires_at,
            attempt=self.attempt,
            retry_of=self.retry_of,
            retried_by=self.retried_by,
            created_at=self.created_at,
            created_by=self.created_by,
            started_at=self.started_at,
            ended_at=self.ended_at,
            updated_at=self.updated_at,
        )


def _queue(row: RowMapping) -> QueueRecord:
    return QueueRecord(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        settings=QueueSettings.model_validate_json(row["settings"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


def _item(row: Mapping[Any, Any], queue: str) -> ItemRecord:
    return ItemRecord(
        id=row["id"],
        tenant=row["tenant"],
        queue_id=row["queue_id"],
        queue=queue,
        seq=row["seq"],
        state=ItemState(row["state"]),
        content=json.loads(row["content"]),
        reference=row["reference"],
        unique_ref=row["unique_ref"],
        priority=Priority(row["priority"]),
        deadline=row["deadline"],
        postpone_until=row["postpone_until"],
        tags=[tag for tag in row["tags"].split(";") if tag],
        progress=row["progress"],
        output=json.loads(row["output"]) if row["output"] is not None else None,
        exception=ExceptionKind(row["exception"]) if row["exception"] is not None else None,
        reason=row["reason"],
        robot=row["robot"],
        job_id=row["job_id"],
        lease=row["lease"],
        lease_expires_at=row["lease_expires_at"],
        attempt=row["attempt"],
        retry_of=row["retry_of"],
        retried_by=row["retried_by"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        updated_at=row["updated_at"],
    )


def json_text(value: dict[str, Any] | None) -> str | None:
    """A free-form value as stored: compact JSON text."""
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def new_item_row(
    *,
    item_id: str,
    queue: QueueRecord,
    seq: int,
    item: NewItem,
    now: datetime,
    created_by: str | None,
    attempt: int = 1,
    retry_of: str | None = None,
) -> dict[str, Any]:
    """The row of a New item; a first attempt in a unique-reference queue claims its reference."""
    claims_reference = queue.settings.unique_references and attempt == 1 and item.reference is not None
    return {
        "id": item_id,
        "tenant": queue.tenant,
        "queue_id": queue.id,
        "seq": seq,
        "state": _NEW,
        "content": json_text(item.content),
        "reference": item.reference,
        "unique_ref": item.reference if claims_reference else None,
        "priority": item.priority.value,
        "rank": item.priority.rank,
        "lane": 0 if item.deadline is not None else 1,
        "deadline": item.deadline,
        "postpone_until": item.postpone_until,
        "tags": states.stored_tags(item.tags),
        "progress": "",
        "output": None,
        "exception": None,
        "reason": "",
        "robot": None,
        "job_id": None,
        "lease": 0,
        "lease_expires_at": None,
        "attempt": attempt,
        "retry_of": retry_of,
        "retried_by": None,
        "created_at": now,
        "created_by": created_by,
        "started_at": None,
        "ended_at": None,
        "updated_at": now,
    }


def retry_row(
    record: ItemRecord, queue: QueueRecord, *, copy_id: str, seq: int, now: datetime, created_by: str | None
) -> dict[str, Any]:
    """The row of the New copy that retries `record`: the same work, attempt + 1, without its postponement."""
    work = NewItem(
        content=record.content,
        reference=record.reference,
        priority=record.priority,
        deadline=record.deadline,
        tags=record.tags,
    )
    return new_item_row(
        item_id=copy_id,
        queue=queue,
        seq=seq,
        item=work,
        now=now,
        created_by=created_by,
        attempt=record.attempt + 1,
        retry_of=record.id,
    )


def record_of(row: Mapping[Any, Any], queue_name: str) -> ItemRecord:
    """An item as a row of it (read, or about to be written) describes it."""
    return _item(row, queue_name)


def _apply_filter(query: Select[Any], where: ItemFilter | None, tags: TagRule) -> Select[Any]:
    if where is None:
        return query
    if where.states:
        query = query.where(items.c.state.in_([state.value for state in where.states]))
    if where.reference is not None:
        query = query.where(items.c.reference.like(states.reference_like(where.reference), escape="\\"))
    for tag in tags.required:
        query = query.where(items.c.tags.like(f"%;{states.like_escape(tag)};%", escape="\\"))
    for tag in tags.excluded:
        query = query.where(items.c.tags.not_like(f"%;{states.like_escape(tag)};%", escape="\\"))
    if where.robot is not None:
        query = query.where(items.c.robot == where.robot)
    if where.created_after is not None:
        query = query.where(items.c.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(items.c.created_at < where.created_before)
    return query


@lru_cache(maxsize=4)
def _by_id_statement(dialect: str, lock: bool) -> Select[Any]:
    """Items of tenant `b_tenant` by their ids (`b_ids`), with their queue's name; locked when asked."""
    query = (
        select(items, queues.c.name.label("queue_name"))
        .join(queues, queues.c.id == items.c.queue_id)
        .where(items.c.tenant == bindparam("b_tenant"), items.c.id.in_(bindparam("b_ids", expanding=True)))
    )
    if lock and dialect == "postgresql":
        query = query.with_for_update(of=items)
    return query


@lru_cache(maxsize=256)
def _take_statement(dialect: str, tags: TagRule, reference: str | None, priority: Priority | None) -> Update:
    """The statement `QueueRepository.take` runs, built once per dialect and filter: building one
    costs more than running it. Its parameters: `b_queue`, `b_now`, `b_count`, `b_robot`, `b_job`
    and `b_expires` (the new lease's end)."""
    now = bindparam("b_now", type_=UtcDateTime())
    chosen = (
        select(items.c.id)
        .where(
            items.c.queue_id == bindparam("b_queue"),
            items.c.state == _NEW,
            or_(items.c.postpone_until.is_(None), items.c.postpone_until <= now),
        )
        .order_by(items.c.lane, items.c.rank, items.c.deadline, items.c.seq)
        .limit(bindparam("b_count", type_=Integer()))
    )
    chosen = _apply_filter(chosen, ItemFilter(reference=reference), tags)
    if priority is not None:
        chosen = chosen.where(items.c.priority == priority.value)
    if dialect == "postgresql":
        # As a CTE, which PostgreSQL runs once: a subquery in IN may be run again, and take more.
        picked = chosen.with_for_update(skip_locked=True).cte("picked")
        which = and_(items.c.id == picked.c.id, items.c.state == _NEW)
    else:
        # SQLite runs the statement under its one write lock, so the rows chosen are still New;
        # a second test of the state here would have it walk every New item by the state index
        # instead of finding the chosen ones by key.
        which = items.c.id.in_(chosen.scalar_subquery())
    return (
        update(items)
        .where(which)
        .values(
            state=_IN_PROGRESS,
            robot=bindparam("b_robot"),
            job_id=bindparam("b_job"),
            lease=items.c.lease + 1,
            lease_expires_at=bindparam("b_expires", type_=UtcDateTime()),
            started_at=now,
            postpone_until=None,
            progress="",
            updated_at=now,
        )
        .returning(*items.c)
    )


class QueueRepository:
    """Reads and writes of queues and items, on a connection the caller's transaction owns."""

    # --- queues ---

    async def create_queue(self, connection: AsyncConnection, record: QueueRecord) -> None:
        await connection.execute(
            insert(queues).values(
                id=record.id,
                tenant=record.tenant,
                name=record.name,
                settings=record.settings.model_dump_json(),
                next_seq=1,
                created_at=record.created_at,
                created_by=record.created_by,
                updated_at=record.created_at,
            )
        )

    async def update_queue(
        self, connection: AsyncConnection, queue: QueueRecord, settings: QueueSettings, now: datetime
    ) -> None:
        await connection.execute(
            update(queues).where(queues.c.id == queue.id).values(settings=settings.model_dump_json(), updated_at=now)
        )

    async def queue(self, connection: AsyncConnection, tenant: str, name: str) -> QueueRecord | None:
        row = (
            (await connection.execute(select(queues).where(queues.c.tenant == tenant, queues.c.name == name)))
            .mappings()
            .first()
        )
        return _queue(row) if row is not None else None

    async def queues_by_id(self, connection: AsyncConnection, ids: Iterable[str]) -> dict[str, QueueRecord]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        rows = (await connection.execute(select(queues).where(queues.c.id.in_(wanted)))).mappings().all()
        return {row["id"]: _queue(row) for row in rows}

    async def list_queues(self, connection: AsyncConnection, tenant: str) -> list[QueueRecord]:
        rows = (
            (await connection.execute(select(queues).where(queues.c.tenant == tenant).order_by(queues.c.name)))
            .mappings()
            .all()
        )
        return [_queue(row) for row in rows]

    async def all_queues(self, connection: AsyncConnection) -> list[QueueRecord]:
        rows = (await connection.execute(select(queues))).mappings().all()
        return [_queue(row) for row in rows]

    async def reserve_seq(self, connection: AsyncConnection, queue: QueueRecord, count: int) -> int:
        """Reserve `count` consecutive sequence numbers of `queue` (first in, first out); return the
        first. Locks the queue's row until the transaction ends: adds to one queue are serialised."""
        result = await connection.execute(
            update(queues)
            .where(queues.c.id == queue.id)
            .values(next_seq=queues.c.next_seq + count)
            .returning(queues.c.next_seq)
        )
        after: int = result.scalar_one()
        return after - count

    # --- items: adding ---

    async def insert_items(self, connection: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await connection.execute(insert(items), list(rows))

    async def taken_references(
        self, connection: AsyncConnection, queue: QueueRecord, references: list[str]
    ) -> list[str]:
        """Which of `references` the unique-reference `queue` holds already."""
        found: list[str] = []
        for start in range(0, len(references), 500):
            chunk = references[start : start + 500]
            rows = await connection.execute(
                select(items.c.unique_ref).where(items.c.queue_id == queue.id, items.c.unique_ref.in_(chunk))
            )
            found += [row[0] for row in rows]
        return found

    # --- items: taking ---

    async def take(
        self,
        connection: AsyncConnection,
        queue: QueueRecord,
        *,
        count: int,
        now: datetime,
        robot: str,
        job_id: str | None,
        tags: TagRule,
        reference: str | None,
        priority: Priority | None,
    ) -> list[ItemRecord]:
        """Give up to `count` of the queue's visible New items, in processing order, to `robot`
        under fresh leases; return them as they are now, in that order.

        One statement: the chosen rows are locked as they are chosen (`SKIP LOCKED` on PostgreSQL,
        so concurrent takers pass each other by) and moved in the same breath."""
        statement = _take_statement(connection.dialect.name, tags, reference, priority)
        rows = (
            (
                await connection.execute(
                    statement,
                    {
                        "b_queue": queue.id,
                        "b_now": now,
                        "b_count": count,
                        "b_robot": robot,
                        "b_job": job_id,
                        "b_expires": now + timedelta(seconds=queue.settings.lease_s),
                    },
                )
            )
            .mappings()
            .all()
        )
        taken = [_item(row, queue.name) for row in rows]
        # RETURNING keeps no order: put them back in processing order.
        taken.sort(
            key=lambda item: (item.deadline is None, item.priority.rank, item.deadline or item.created_at, item.seq)
        )
        return taken

    async def finish_many(self, connection: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
        """End held items in one go (rows of `b_id`, `b_lease`, `b_state`, `b_exception`, `b_reason`,
        `b_output`, `b_now`), each only if still InProgress under its lease. The caller holds the rows
        locked (or SQLite's write lock), so none can have moved since it read them."""
        if rows:
            await connection.execute(_FINISH, list(rows))

    # --- items: reading ---

    async def items_by_id(
        self, connection: AsyncConnection, tenant: str, ids: Sequence[str], *, lock: bool = False
    ) -> dict[str, ItemRecord]:
        """Items by id (of `tenant` only), with their queue's name; locked for update when asked."""
        found: dict[str, ItemRecord] = {}
        wanted = sorted(set(ids))
        statement = _by_id_statement(connection.dialect.name, lock)
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            for row in (await connection.execute(statement, {"b_tenant": tenant, "b_ids": chunk})).mappings():
                found[row["id"]] = _item(row, row["queue_name"])
        return found

    async def held(
        self,
        connection: AsyncConnection,
        *,
        tenant: str | None = None,
        robot: str | None = None,
        job_id: str | None = None,
        lease_expired_by: datetime | None = None,
        limit: int = 1000,
    ) -> list[ItemRecord]:
        """InProgress items held by a robot, for a job, or whose lease expired by a time."""
        query = (
            select(items, queues.c.name.label("queue_name"))
            .join(queues, queues.c.id == items.c.queue_id)
            .where(items.c.state == _IN_PROGRESS)
            .limit(limit)
        )
        if tenant is not None:
            query = query.where(items.c.tenant == tenant)
        if robot is not None:
            query = query.where(items.c.robot == robot)
        if job_id is not None:
            query = query.where(items.c.job_id == job_id)
        if lease_expired_by is not None:
            query = query.where(items.c.lease_expires_at <= lease_expired_by)
        rows = (await connection.execute(query)).mappings().all()
        return [_item(row, row["queue_name"]) for row in rows]

    async def jobs_holding(self, connection: AsyncConnection, job_ids: Sequence[str]) -> list[str]:
        """Which of `job_ids` hold InProgress items."""
        wanted = sorted(set(job_ids))
        found: list[str] = []
        for start in range(0, len(wanted), 500):
            rows = await connection.execute(
                select(items.c.job_id)
                .where(items.c.job_id.in_(wanted[start : start + 500]), items.c.state == _IN_PROGRESS)
                .distinct()
            )
            found += [row[0] for row in rows]
        return found

    async def holders(self, connection: AsyncConnection) -> list[tuple[str, str]]:
        """(tenant, robot) of every robot holding an InProgress item."""
        rows = await connection.execute(
            select(items.c.tenant, items.c.robot).where(items.c.state == _IN_PROGRESS).distinct()
        )
        return [(tenant, robot) for tenant, robot in rows if robot is not None]

    async def stale_new(self, connection: AsyncConnection, queue: QueueRecord, created_by: datetime) -> list[str]:
        """New items of `queue` created at or before `created_by` (for abandonment)."""
        rows = await connection.execute(
            select(items.c.id)
            .where(items.c.queue_id == queue.id, items.c.state == _NEW, items.c.created_at <= created_by)
            .limit(1000)
        )
        return [row[0] for row in rows]

    async def page(
        self,
        connection: AsyncConnection,
        queue: QueueRecord,
        where: ItemFilter,
        tags: TagRule,
        *,
        after_seq: int | None,
        limit: int,
    ) -> list[ItemRecord]:
        """Items of `queue` matching `where`, by sequence, after `after_seq`."""
        query = select(items).where(items.c.queue_id == queue.id).order_by(items.c.seq).limit(limit)
        if after_seq is not None:
            query = query.where(items.c.seq > after_seq)
        query = _apply_filter(query, where, tags)
        rows = (await connection.execute(query)).mappings().all()
        return [_item(row, queue.name) for row in rows]

    async def matching_ids(
        self, connection: AsyncConnection, queue: QueueRecord, where: ItemFilter, tags: TagRule, limit: int
    ) -> list[str]:
        query = select(items.c.id).where(items.c.queue_id == queue.id).order_by(items.c.seq).limit(limit)
        query = _apply_filter(query, where, tags)
        return [row[0] for row in await connection.execute(query)]

    async def chain(self, connection: AsyncConnection, item: ItemRecord) -> list[ItemRecord]:
        """Every attempt of the work `item` is part of, first attempt first."""
        first = item
        seen = {item.id}
        while first.retry_of is not None and first.retry_of not in seen:
            found = (await self.items_by_id(connection, item.tenant, [first.retry_of])).get(first.retry_of)
            if found is None:
                break
            seen.add(found.id)
            first = found
        chain = [first]
        while chain[-1].retried_by is not None and chain[-1].retried_by not in {link.id for link in chain}:
            found = (await self.items_by_id(connection, item.tenant, [chain[-1].retried_by])).get(chain[-1].retried_by)
            if found is None:
                break
            chain.append(found)
        return chain

    # --- items: changing ---

    async def finish(
        self,
        connection: AsyncConnection,
        item: ItemRecord,
        *,
        from_state: ItemState,
        lease: int | None,
        values: dict[str, Any],
    ) -> bool:
        """Write `values` to `item` if it is still in `from_state` (under `lease`, when given)."""
        conditions = [items.c.id == item.id, items.c.state == from_state.value]
        if lease is not None:
            conditions.append(items.c.lease == lease)
        result = await connection.execute(update(items).where(and_(*conditions)).values(**values))
        return bool(result.rowcount)

    async def move_many(
        self,
        connection: AsyncConnection,
        ids: Sequence[str],
        *,
        from_states: Sequence[ItemState],
        values: dict[str, Any],
    ) -> int:
        """Write `values` to every item of `ids` still in one of `from_states`; return how many moved."""
        moved = 0
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            result = await connection.execute(
                update(items)
                .where(items.c.id.in_(chunk), items.c.state.in_([state.value for state in from_states]))
                .values(**values)
            )
            moved += result.rowcount or 0
        return moved

    # --- statistics ---

    async def counts(self, connection: AsyncConnection, queue: QueueRecord) -> dict[str, int]:
        rows = await connection.execute(
            select(items.c.state, func.count()).where(items.c.queue_id == queue.id).group_by(items.c.state)
        )
        return {state: count for state, count in rows}

    async def processing_times(self, connection: AsyncConnection, queue: QueueRecord) -> list[float]:
        """Seconds from taken to ended of the newest Successful and Failed items (a sample)."""
        rows = await connection.execute(
            select(items.c.started_at, items.c.ended_at)
            .where(
                items.c.queue_id == queue.id,
                items.c.state.in_([ItemState.SUCCESSFUL.value, ItemState.FAILED.value]),
                items.c.started_at.is_not(None),
                items.c.ended_at.is_not(None),
            )
            .order_by(items.c.ended_at.desc())
            .limit(STATS_SAMPLE)
        )
        return [max((ended - started).total_seconds(), 0.0) for started, ended in rows]

    async def open_created_by(self, connection: AsyncConnection, queue: QueueRecord, cutoff: datetime) -> int:
        """Open (New, InProgress) items of `queue` created at or before `cutoff`."""
        result = await connection.execute(
            select(func.count()).where(
                items.c.queue_id == queue.id,
                items.c.state.in_([_NEW, _IN_PROGRESS]),
                items.c.created_at <= cutoff,
            )
        )
        return int(result.scalar_one())


__all__ = [
    "ItemRecord",
    "QueueRecord",
    "QueueRepository",
    "items",
    "json_text",
    "metadata",
    "new_item_row",
    "queues",
    "record_of",
    "retry_row",
]
