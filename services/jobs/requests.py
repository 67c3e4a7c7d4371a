"""Durable job requests: integrators publish job starts into a JetStream stream, and the jobs service
creates each job once, whenever it runs.

An integrator in any language publishes a `JobStart` body (msgpack, or JSON with `Content-Type:
application/json`) to `hd.<tenant>.req.jobs`, with its token in `Authorization: Bearer …` and a
request id of its choosing in `Nats-Msg-Id` (or `request_id` in the body). The tenant's
`HERDER_REQUESTS_<tenant>` stream keeps the request until a jobs replica reads it through the one
durable consumer all replicas share (`jobs_requests`): a request published while no jobs service
runs is served when one starts. The stream stores a publish repeated under the same `Nats-Msg-Id`
once; beyond that, the request id is the idempotency key of the `jobs.start` verb, in its scope, so
a repeat (or the same key sent as a plain `jobs.start` request) gives the same job.

Every request gets one verdict, recorded in `jobs_requests` (`request_log`) and answered on the
subject its `Hd-Reply-To` header names, if any (one of the sender's own inbox), in its content type:

- **accepted**: the job, created by `JobsService.create` exactly as `jobs.start` creates it (its
  `jobs.job_created` event carries the request id), or the job an earlier request under that id made;
- **refused**: a missing, unknown or revoked token, a role or tenant that may not start jobs, a body
  that is not a `JobStart`, an unknown process or robot, a conflict. Final: recorded, answered with
  the error reply `jobs.start` would give, announced by a `jobs.request_refused` event, and
  acknowledged, so never tried again.

A failure that may pass (the database, a service that does not answer in time) is negatively
acknowledged with a backoff; after MAX_TRIES deliveries the request is refused "gave up after N
tries". Verdicts are decided by the pure functions at the top of this module; `JobRequests` reads
messages, asks them, writes the record, publishes and acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeGuard

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.client.backoff import backoff
from herder.client.tasks import error_line
from herder.protocol import codec, fence, subjects
from herder.protocol.auth import Permission, Principal, PrincipalKind
from herder.protocol.codec import BEARER, Header
from herder.protocol.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    HerderError,
    Internal,
    Unauthenticated,
    Unavailable,
)
from herder.protocol.jobs import SERVICE, JobInfo, JobRequestRefusedEvent, JobRequestState, JobStart
from herder.protocol.messages import (
    IDEMPOTENCY_KEY_PATTERN,
    IDEMPOTENCY_KEY_RULE,
    Event,
    Model,
    new_id,
    utcnow,
)
from herder.services.common import database, idempotency
from herder.services.common.bus import ensure_request_stream
from herder.services.common.idempotency import Repeat
from herder.services.common.runtime import RequestContext
from herder.services.jobs import request_log
from herder.services.jobs.request_log import Verdict

if TYPE_CHECKING:
    from herder.services.jobs.service import JobsService

# The one durable consumer of a tenant's job requests, shared by every jobs replica.
DURABLE = "jobs_requests"
# The verb whose idempotency scope durable requests share: a key sent either way makes one job.
START_VERB = JobStart.verb
# A request is tried this many times (deliveries) before it is refused "gave up after N tries".
MAX_TRIES = 10
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0
# Requests fetched at once, then served one after another, in the order they were published. Each
# one's acknowledgement timer is reset when its turn comes; ACK_WAIT_S covers a batch whose every
# request waits out a slow service (the packages service's 5 s answer time).
BATCH = 8
FETCH_WAIT_S = 1.0
ACK_WAIT_S = 60.0
MAX_ACK_PENDING = 1000

NO_ID = (
    "a durable request needs an id: send a random one (32 hex digits will do) in the header "
    f"{Header.MSG_ID}, or as request_id in the body, and the same one again when you repeat the request"
)
NO_TOKEN = "this request needs a token: send the header 'Authorization: Bearer <token>'"

_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_EMPTY = {codec.MSGPACK: b"\x80", codec.JSON: b"{}"}


# --- deciding, without I/O ---


class _Keyed(Model):
    """Just the request id of a body, read before the body is validated (other fields are ignored)."""

    request_id: Any = None


@dataclass(frozen=True, slots=True)
class Incoming:
    """What one request message says about itself, read from its headers (and its body's request id)."""

    content_type: str
    correlation_id: str  # the sender's, or one made for this request (error answers carry it)
    correlation_sent: bool  # whether the sender gave it (a successful answer echoes only the sender's)
    secret: str | None  # the bearer token; never logged, never stored
    auth_problem: str | None  # why the Authorization header is unusable, if it is
    request_id: str | None  # a valid idempotency key, or None
    id_problem: str | None  # why there is no usable request id, if there is none
    reply_to: str | None  # where to answer: a subject of the sender's own inbox, or None
    reply_problem: str | None  # why Hd-Reply-To was refused, if it was


def read_incoming(headers: Mapping[str, str] | None, data: bytes) -> Incoming:
    """Read the metadata of a request message; never raises (what is wrong is refused later, in order)."""
    headers = headers or {}
    content_type = codec.content_type_of(headers)
    sent = headers.get(Header.CORRELATION_ID)
    if sent is not None and _CORRELATION_ID.fullmatch(sent) is None:
        sent = None  # not an id this service will log or echo; it makes its own
    secret, auth_problem = _bearer(headers.get(Header.AUTHORIZATION))
    request_id, id_problem = _request_id(headers.get(Header.MSG_ID), data, content_type)
    reply_to, reply_problem = _reply_subject(headers.get(Header.REPLY_TO), secret)
    return Incoming(
        content_type=content_type,
        correlation_id=sent or new_id(),
        correlation_sent=sent is not None,
        secret=secret,
        auth_problem=auth_problem,
        request_id=request_id,
        id_problem=id_problem,
        reply_to=reply_to,
        reply_problem=reply_problem,
    )


def _bearer(authorization: str | None) -> tuple[str | None, str | None]:
    if not authorization:
        return None, NO_TOKEN
    if not authorization.startswith(BEARER) or not authorization[len(BEARER) :].strip():
        return None, "the Authorization header must read 'Bearer <token>'"
    return authorization[len(BEARER) :].strip(), None


def _request_id(header: str | None, data: bytes, content_type: str) -> tuple[str | None, str | None]:
    """The request id (the header wins over the body's `request_id`), or why there is none."""
    if header:
        if _IDEMPOTENCY_KEY.fullmatch(header) is None:
            return None, f"the request id (header {Header.MSG_ID}) {IDEMPOTENCY_KEY_RULE}"
        return header, None
    try:
        value = codec.load(_Keyed, data or _EMPTY[content_type], content_type).request_id
    except BadRequest:
        value = None  # the body is refused on its own, once the caller is known
    if value is None:
        return None, NO_ID
    if not isinstance(value, str) or _IDEMPOTENCY_KEY.fullmatch(value) is None:
        return None, f"the request id (request_id in the body) {IDEMPOTENCY_KEY_RULE}"
    return value, None


def _reply_subject(value: str | None, secret: str | None) -> tuple[str | None, str | None]:
    """Where to answer, if the sender may listen there: a subject of its own inbox. Anything else
    would have a service publish wherever a request named (on robots' command subjects, as events)."""
    if value is None:
        return None, None
    if secret is None:
        return None, None  # refused for its token first; with none, there is no inbox to answer in
    prefix = fence.inbox_prefix(secret)
    problem = (
        f"the reply subject (header {Header.REPLY_TO}) must be a subject of your own inbox, "
        f"{prefix}.<anything>, without wildcards"
    )
    if not value.startswith(prefix + "."):
        return None, problem
    try:
        for token in value[len(prefix) + 1 :].split("."):
            subjects.check_token(token, "reply subject token")
    except BadRequest:
        return None, problem
    return value, None


def admit(principal: Principal | None, tenant: str) -> Principal:
    """The principal, if it may start jobs in `tenant`; otherwise the error saying why not (the same
    checks and words as the service runtime's for a `jobs.start` request)."""
    if principal is None:
        raise Unauthenticated("the token is unknown or revoked")
    if principal.tenant != tenant and principal.kind is not PrincipalKind.SERVICE:
        raise Forbidden(f"this token belongs to tenant {principal.tenant!r}, not {tenant!r}")
    if not principal.can(Permission.JOBS_START):
        raise Forbidden(f"role '{principal.role}' lacks the permission '{Permission.JOBS_START}'")
    return principal


def _job_start(incoming: Incoming, data: bytes, principal: Principal) -> JobStart:
    """The body as a `JobStart`; `trigger` (and with it `max_concurrent`) is the scheduler's alone."""
    request = codec.load(JobStart, data or _EMPTY[incoming.content_type], incoming.content_type)
    if request.trigger is not None and principal.kind is not PrincipalKind.SERVICE:
        raise Forbidden("only the scheduler names the trigger of a job; leave trigger out")
    return request


def is_final(error: BaseException) -> TypeGuard[HerderError]:
    """Whether a failure is the request's own (refuse it) rather than one that may pass (try again):
    herder's refusals are final, except `unavailable`, `internal` and a key still being processed."""
    if not isinstance(error, HerderError) or isinstance(error, Unavailable | Internal):
        return False
    return not (isinstance(error, Conflict) and error.details.get("in_progress"))


@dataclass(frozen=True, slots=True)
class Retry:
    """Deliver the request again after `delay_s`."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Refuse the request: it was tried `tries` times."""

    tries: int


def after_failure(tries: int, *, max_tries: int | None = None) -> Retry | GiveUp:
    """What follows the `tries`-th delivery of a request that failed in a way that may pass: another
    try after a backoff with jitter (so that requests held up by one outage do not retry in
    lockstep), or, from `max_tries` (MAX_TRIES) on, giving up."""
    if tries >= (MAX_TRIES if max_tries is None else max_tries):
        return GiveUp(tries)
    return Retry(backoff(tries, base_s=RETRY_BASE_S, max_s=RETRY_MAX_S))


def failure_words(error: BaseException) -> str:
    """A failure in one line fit for the record and the caller: herder's message, or the kind of fault."""
    if isinstance(error, HerderError):
        return error.message
    if isinstance(error, DBAPIError):
        return "the database failed (the service log has the details)"
    return f"{error_line(error).split(':', 1)[0]} (the service log has the details)"


# --- the consumer ---


@dataclass(frozen=True, slots=True)
class _Message:
    """Where a request message sits in its stream, and how often it was delivered."""

    tenant: str
    seq: int
    published_at: datetime
    tries: int


class _DurableContext(RequestContext):
    """A request context whose idempotency claim is the durable request's id, in `jobs.start`'s scope."""

    __slots__ = ("_key_claim",)

    def __init__(
        self,
        key_claim: idempotency.Claim,
        *,
        tenant: str,
        principal: Principal,
        correlation_id: str | None,
        service_log: structlog.stdlib.BoundLogger,
    ) -> None:
        super().__init__(
            tenant=tenant,
            principal=principal,
            correlation_id=correlation_id,
            idempotency_key=key_claim.key,
            service_log=service_log,
        )
        self._key_claim = key_claim

    async def claim(self, connection: AsyncConnection, object_id: str) -> None:
        """Claim the request id for `object_id` in the transaction that creates the job."""
        await self._key_claim.take(connection, object_id)


class JobRequests:
    """Reads the durable job requests of each tenant followed, and gives each one verdict.

    `start` follows the default tenant; `follow` another. Each tenant's consumer runs as the
    supervised task `jobs.requests.<tenant>` of the jobs service: a failure is logged, and it starts
    again (an unacknowledged request is delivered again)."""

    def __init__(self, service: JobsService) -> None:
        self._service = service
        self._runtime = service.runtime
        self._log: structlog.stdlib.BoundLogger = service.log.bind(component="jobs.requests")
        self._tenants: set[str] = set()
        self._store: idempotency.IdempotencyStore | None = None

    @property
    def store(self) -> idempotency.IdempotencyStore:
        """The idempotency keys, in the jobs service's database."""
        if self._store is None:
            raise RuntimeError("the job requests are not started yet; call JobRequests.start() first")
        return self._store

    async def start(self) -> None:
        """Follow the default tenant's requests."""
        self._store = idempotency.IdempotencyStore(self._service.engine)
        await self.follow(subjects.DEFAULT_TENANT)

    async def follow(self, tenant: str) -> None:
        """Serve `tenant`'s durable job requests from now on (its consumer makes the stream if missing)."""
        if tenant in self._tenants:
            return
        self._tenants.add(tenant)
        self._service.tasks.watch(_task_name(tenant), lambda: self._consume(tenant))

    async def stop(self) -> None:
        """Stop reading requests; one being served is delivered again later if it was not acknowledged."""
        for tenant in sorted(self._tenants):
            await self._service.tasks.cancel(_task_name(tenant))
        self._tenants.clear()

    async def listing(
        self, tenant: str, *, state: JobRequestState | None, request_id: str | None, limit: int
    ) -> list[Verdict]:
        """A tenant's recorded verdicts, newest first."""
        async with database.read(self._service.engine) as connection:
            return await request_log.listing(connection, tenant, state=state, request_id=request_id, limit=limit)

    async def _consume(self, tenant: str) -> None:
        """Read `tenant`'s requests through the shared durable consumer until cancelled, one at a time
        in the order they were published (on this replica; replicas share the stream between them)."""
        js = self._runtime.js
        stream = subjects.requests_stream(tenant)
        await ensure_request_stream(js, tenant, self._runtime.jetstream)
        config = api.ConsumerConfig(
            durable_name=DURABLE,
            description=f"the jobs service's durable job requests of tenant {tenant}",
            filter_subject=subjects.job_requests(tenant),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            # Unbounded here: the service counts the tries and gives up itself, with a verdict.
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
        )
        with contextlib.suppress(nats.js.errors.BadRequestError):  # made already, by this or another replica
            await js.add_consumer(stream, config)
        subscription = await js.pull_subscribe_bind(DURABLE, stream=stream)
        self._log.info("jobs.requests_following", tenant=tenant, stream=stream)
        try:
            while True:
                try:
                    messages = await subscription.fetch(BATCH, timeout=FETCH_WAIT_S)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for message in messages:
                    await self._serve(tenant, message)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _serve(self, tenant: str, msg: Msg) -> None:
        """Give one request message its verdict, or have it delivered again; never raises but for the
        connection (an acknowledgement that cannot be sent)."""
        metadata = msg.metadata
        where = _Message(
            tenant=tenant, seq=metadata.sequence.stream, published_at=metadata.timestamp, tries=metadata.num_delivered
        )
        await msg.in_progress()
        incoming = read_incoming(msg.headers, msg.data)
        principal: Principal | None = None
        process: str | None = None
        try:
            principal = await self._caller(incoming, tenant, msg.data)
            request = _job_start(incoming, msg.data, principal)
            process = request.process
            job, repeat = await self._create(incoming, tenant, principal, request)
        except Exception as exc:
            if is_final(exc):
                await self._refuse(msg, where, incoming, exc, principal=principal, process=process)
            else:
                await self._failed(msg, where, incoming, exc, principal=principal, process=process)
            return
        await self._accept(msg, where, incoming, job, repeat=repeat, principal=principal)

    async def _caller(self, incoming: Incoming, tenant: str, data: bytes) -> Principal:
        """Who sent the request, if it may start jobs here: checked first, as the runtime checks a request."""
        codec.check_size(data, "request")
        if incoming.secret is None:
            raise Unauthenticated(incoming.auth_problem or NO_TOKEN)
        if incoming.reply_problem is not None:
            raise BadRequest(incoming.reply_problem)
        if incoming.request_id is None:
            raise BadRequest(incoming.id_problem or NO_ID)
        tokens = self._runtime.tokens
        secret = incoming.secret
        # The mirror answers almost every time; only a token created a moment ago needs the bucket.
        return admit(tokens.lookup(secret) or tokens.service(secret) or await tokens.fetch(secret), tenant)

    async def _create(
        self, incoming: Incoming, tenant: str, principal: Principal, request: JobStart
    ) -> tuple[JobInfo, bool]:
        """Create the job under the request id, or find the one an earlier request under it made:
        (the job, whether it was made before)."""
        assert incoming.request_id is not None and incoming.secret is not None
        claim = idempotency.Claim(
            scope=_scope(tenant),
            key=incoming.request_id,
            digest=idempotency.request_digest(request, principal),
        )
        ctx = _DurableContext(
            claim,
            tenant=tenant,
            principal=principal,
            correlation_id=incoming.correlation_id,
            service_log=self._service.log,
        )
        ctx.bearer = incoming.secret  # to resolve the package as the caller, with no more rights than it has
        try:
            job = await self._service.create(
                request, ctx, trigger=request.trigger, max_concurrent=request.max_concurrent
            )
        except HerderError:
            if claim.object_id is not None:
                raise  # this request claimed the key: the error is its own
            repeated = await self._repeat(claim, ctx)
            if repeated is None:
                raise
            return repeated, True
        # As the runtime keeps a first reply: a repeat sent as a `jobs.start` request gets it back.
        await self.store.save_reply(claim, codec.dump(job))
        return job, False

    async def _repeat(self, claim: idempotency.Claim, ctx: RequestContext) -> JobInfo | None:
        """The job an earlier request under `claim`'s key made; None when there was none. The same
        steps as the runtime's answer to a repeated request (`ServiceRunner._repeat`)."""
        deadline = time.monotonic() + idempotency.REPLY_WAIT_S
        polls = 0
        while True:
            record = await self.store.lookup(claim)
            verdict = idempotency.judge(record, claim.digest, utcnow(), wait_s=idempotency.REPLY_WAIT_S)
            if verdict is Repeat.NEW:
                return None
            assert record is not None
            if verdict is Repeat.DIFFERENT:
                raise Conflict(
                    f"idempotency key {idempotency.shown(claim.key)!r} was used for a different request; "
                    "send a new key with a new request"
                )
            if verdict is Repeat.REPLY:
                assert record.reply is not None
                opened = idempotency.unseal(claim.scope, claim.key, record.reply)
                if opened is not None:
                    with contextlib.suppress(BadRequest):  # a reply this version cannot read: rebuilt below
                        return codec.load(JobInfo, opened)
            elif verdict is Repeat.WAIT and time.monotonic() < deadline:
                polls += 1
                pause = backoff(polls, base_s=idempotency.REPLY_POLL_BASE_S, max_s=idempotency.REPLY_POLL_MAX_S)
                await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
                continue
            rebuilt = await self._service.replay(START_VERB, record.object_id, ctx)
            if rebuilt is None:
                raise idempotency.AlreadyClaimed()
            if not isinstance(rebuilt, JobInfo):
                raise TypeError(
                    f"JobsService.replay({START_VERB!r}) returned a {type(rebuilt).__name__}, not a JobInfo"
                )
            return rebuilt

    async def _accept(
        self, msg: Msg, where: _Message, incoming: Incoming, job: JobInfo, *, repeat: bool, principal: Principal
    ) -> None:
        """Record an accepted request, answer it with its job, and acknowledge it."""
        reason = "the job was made by an earlier request with this id" if repeat else ""
        verdict = self._verdict(
            where, incoming, JobRequestState.ACCEPTED, reason, principal=principal, process=job.process, job_id=job.id
        )
        try:
            async with self._service.engine.begin() as connection:
                await request_log.record(connection, verdict)
        except Exception as exc:
            # The job exists; the verdict must be on record too. Delivered again, the request finds
            # its job under its id, and the verdict is written then.
            await self._again(msg, where, incoming, exc)
            return
        self._log.info(
            "jobs.request_accepted",
            tenant=where.tenant,
            request_id=incoming.request_id,
            correlation_id=incoming.correlation_id,
            job_id=job.id,
            repeat=repeat,
            actor=principal.name,
            tries=where.tries,
        )
        await self._answer(incoming, codec.dump(job, incoming.content_type), _reply_headers(incoming))
        await msg.ack()

    async def _refuse(
        self,
        msg: Msg,
        where: _Message,
        incoming: Incoming,
        error: HerderError,
        *,
        principal: Principal | None,
        process: str | None,
    ) -> None:
        """Record a refusal with its event, answer it, and acknowledge it: it is not tried again."""
        verdict = self._verdict(
            where,
            incoming,
            JobRequestState.REFUSED,
            error.message,
            principal=principal,
            process=process,
            code=error.code.value,
        )
        try:
            async with self._runtime.events.transaction(defer=True) as tx:
                if await request_log.record(tx.connection, verdict):
                    tx.emit(
                        Event.of(
                            JobRequestRefusedEvent(
                                request_id=verdict.request_id,
                                code=error.code.value,
                                reason=error.message,
                                process=process,
                                tries=where.tries,
                            ),
                            tenant=where.tenant,
                            actor=verdict.principal,
                        )
                    )
        except Exception as exc:
            await self._again(msg, where, incoming, exc)  # a refusal not on record is not final yet
            return
        self._log.info(
            "jobs.request_refused",
            tenant=where.tenant,
            request_id=incoming.request_id,
            correlation_id=incoming.correlation_id,
            code=error.code.value,
            reason=error.message,
            actor=verdict.principal,
            tries=where.tries,
        )
        data, headers = codec.error_reply(error, incoming.content_type, incoming.correlation_id)
        await self._answer(incoming, data, headers)
        await msg.ack()

    async def _failed(
        self,
        msg: Msg,
        where: _Message,
        incoming: Incoming,
        error: BaseException,
        *,
        principal: Principal | None,
        process: str | None,
    ) -> None:
        """A failure that may pass: try again later, or, after MAX_TRIES, refuse the request."""
        if not isinstance(error, HerderError | DBAPIError | OSError | TimeoutError | nats.errors.Error):
            # Not an outage: a fault of herder's. Logged with its traceback; bounded like the rest.
            self._log.error(
                "jobs.request_failed",
                tenant=where.tenant,
                request_id=incoming.request_id,
                correlation_id=incoming.correlation_id,
                exc_info=error,
            )
        decision = after_failure(where.tries)
        if isinstance(decision, Retry):
            self._log.warning(
                "jobs.request_retry",
                tenant=where.tenant,
                request_id=incoming.request_id,
                tries=where.tries,
                retry_in_s=round(decision.delay_s, 3),
                error=failure_words(error),
            )
            await msg.nak(delay=decision.delay_s)
            return
        if await self._made_before(incoming, where.tenant):
            # Its job exists (a try committed, and what followed failed): the next delivery finds it.
            await self._again(msg, where, incoming, error)
            return
        gave_up = Unavailable(f"gave up after {decision.tries} tries: {failure_words(error)}")
        await self._refuse(msg, where, incoming, gave_up, principal=principal, process=process)

    async def _made_before(self, incoming: Incoming, tenant: str) -> bool:
        """Whether the request id holds a claim (a job was made under it); True when that cannot be
        told either (the database is down): giving up must never hide a job that exists."""
        if incoming.request_id is None:
            return False
        probe = idempotency.Claim(scope=_scope(tenant), key=incoming.request_id, digest="")
        try:
            return await self.store.lookup(probe) is not None
        except Exception:
            return True

    async def _again(self, msg: Msg, where: _Message, incoming: Incoming, error: BaseException) -> None:
        """Have the request delivered again after a backoff: its verdict could not be written."""
        delay_s = backoff(where.tries, base_s=RETRY_BASE_S, max_s=RETRY_MAX_S)
        self._log.warning(
            "jobs.request_unrecorded",
            tenant=where.tenant,
            request_id=incoming.request_id,
            tries=where.tries,
            retry_in_s=round(delay_s, 3),
            error=failure_words(error),
        )
        await msg.nak(delay=delay_s)

    def _verdict(
        self,
        where: _Message,
        incoming: Incoming,
        state: JobRequestState,
        reason: str,
        *,
        principal: Principal | None,
        process: str | None,
        job_id: str | None = None,
        code: str | None = None,
    ) -> Verdict:
        return Verdict(
            tenant=where.tenant,
            message_seq=where.seq,
            published_at=where.published_at,
            state=state,
            request_id=incoming.request_id,
            reason=reason,
            decided_at=utcnow(),
            tries=where.tries,
            principal=principal.name if principal is not None else None,
            process=process,
            job_id=job_id,
            code=code,
        )

    async def _answer(self, incoming: Incoming, data: bytes, headers: dict[str, str]) -> None:
        """Publish the answer where the request asked for it; best effort: the record is the truth."""
        if incoming.reply_to is None:
            return
        try:
            codec.check_size(data, "reply")
            await self._runtime.nc.publish(incoming.reply_to, data, headers=headers)
        except Exception as exc:
            self._log.warning("jobs.request_reply_failed", request_id=incoming.request_id, error=repr(exc))


def _scope(tenant: str) -> idempotency.Scope:
    return idempotency.Scope(tenant, SERVICE, START_VERB)


def _task_name(tenant: str) -> str:
    return f"jobs.requests.{tenant}"


def _reply_headers(incoming: Incoming) -> dict[str, str]:
    headers = {Header.CONTENT_TYPE: incoming.content_type}
    if incoming.correlation_sent:
        headers[Header.CORRELATION_ID] = incoming.correlation_id
    return headers


__all__ = [
    "DURABLE",
    "MAX_TRIES",
    "GiveUp",
    "Incoming",
    "JobRequests",
    "Retry",
    "admit",
    "after_failure",
    "failure_words",
    "is_final",
    "read_incoming",
]
