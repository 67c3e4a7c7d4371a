"""The jobs service's record of durable job requests: one verdict per request message, never its token.

Every request read from a tenant's `hd.<tenant>.req.jobs` gets one row, accepted (with the job it
made) or refused (with the error code and reason), so that an operator sees what integrators asked
and why a request made no job (`jobs.requests`, `herder`'s read verb). A message is known by its
stream sequence and the time the stream stored it: a redelivery of a message whose verdict was
recorded (its acknowledgement was lost) records nothing a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.jobs import JobRequestInfo, JobRequestState
from herder.protocol.messages import new_id
from herder.services.common.database import UtcDateTime

metadata = MetaData()

job_requests = Table(
    "jobs_requests",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("request_id", String(64)),
    # The message in the tenant's HERDER_REQUESTS stream: its sequence and when the stream stored it.
    Column("message_seq", BigInteger(), nullable=False),
    Column("published_at", UtcDateTime(), nullable=False),
    Column("state", String(16), nullable=False),
    Column("code", String(32)),
    Column("reason", Text(), nullable=False),
    Column("principal", String(128)),
    Column("process", String(64)),
    Column("job_id", String(32)),
    Column("tries", Integer(), nullable=False),
    Column("decided_at", UtcDateTime(), nullable=False),
    # One verdict per message, whichever replica recorded it, however often it was delivered.
    Index("ux_jobs_requests_message", "tenant", "message_seq", "published_at", unique=True),
    # Listed newest first; looked up by request id.
    Index("ix_jobs_requests_decided", "tenant", "decided_at"),
    Index("ix_jobs_requests_request_id", "tenant", "request_id"),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the jobs service decided about one request message."""

    tenant: str
    message_seq: int
    published_at: datetime
    state: JobRequestState
    request_id: str | None
    reason: str
    decided_at: datetime
    tries: int = 1
    code: str | None = None
    principal: str | None = None
    process: str | None = None
    job_id: str | None = None

    def info(self) -> JobRequestInfo:
        """The verdict as `jobs.requests` shows it."""
        return JobRequestInfo(
            request_id=self.request_id,
            state=self.state,
            code=self.code,
            reason=self.reason,
            principal=self.principal,
            process=self.process,
            job_id=self.job_id,
            tries=self.tries,
            published_at=self.published_at,
            decided_at=self.decided_at,
        )


def _record_statement(dialect_insert: Any) -> Any:
    """Insert a verdict unless its message has one already (both databases speak `ON CONFLICT DO NOTHING`)."""
    return (
        dialect_insert(job_requests)
        .on_conflict_do_nothing(index_elements=["tenant", "message_seq", "published_at"])
        .returning(job_requests.c.id)
    )


_RECORD = {"postgresql": _record_statement(postgresql_insert), "sqlite": _record_statement(sqlite_insert)}


async def record(connection: AsyncConnection, verdict: Verdict) -> bool:
    """Store `verdict` in the transaction of `connection`; False when its message had one already."""
    result = await connection.execute(
        _RECORD[connection.dialect.name],
        {
            "id": new_id(),
            "tenant": verdict.tenant,
            "request_id": verdict.request_id,
            "message_seq": verdict.message_seq,
            "published_at": verdict.published_at,
            "state": verdict.state.value,
            "code": verdict.code,
            "reason": verdict.reason,
            "principal": verdict.principal,
            "process": verdict.process,
            "job_id": verdict.job_id,
            "tries": verdict.tries,
            "decided_at": verdict.decided_at,
        },
    )
    return result.first() is not None


async def listing(
    connection: AsyncConnection,
    tenant: str,
    *,
    state: JobRequestState | None = None,
    request_id: str | None = None,
    limit: int = 100,
) -> list[Verdict]:
    """A tenant's verdicts, newest first: all, or those in `state`, or of `request_id`."""
    query = select(job_requests).where(job_requests.c.tenant == tenant)
    if state is not None:
        query = query.where(job_requests.c.state == state.value)
    if request_id is not None:
        query = query.where(job_requests.c.request_id == request_id)
    query = query.order_by(job_requests.c.decided_at.desc(), job_requests.c.message_seq.desc()).limit(limit)
    rows = (await connection.execute(query)).mappings().all()
    return [
        Verdict(
            tenant=row["tenant"],
            message_seq=row["message_seq"],
            published_at=row["published_at"],
            state=JobRequestState(row["state"]),
            request_id=row["request_id"],
            reason=row["reason"],
            decided_at=row["decided_at"],
            tries=row["tries"],
            code=row["code"],
            principal=row["principal"],
            process=row["process"],
            job_id=row["job_id"],
        )
        for row in rows
    ]
