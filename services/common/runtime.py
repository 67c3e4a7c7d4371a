"""The service base every herder service is built on, over the NATS service API (`nats.micro`).

A service declares endpoints as methods taking a validated request model and a
`RequestContext`, returning a reply model:

    class AuthService(Service):
        name = "auth"

        @endpoint(permission=Permission.TOKENS_MANAGE)
        async def token_create(self, request: TokenCreate, ctx: RequestContext) -> TokenCreated:
            ...

Each endpoint listens on `hd.*.svc.<service>.<verb>` in a queue group named after
the service, so any number of replicas share the load, and `nats micro ls` and
`$SRV.PING|INFO|STATS` discover them. Before a handler runs, the runtime checks
the size, the message type and schema headers, the bearer token, the tenant and
the permission, and decodes the body; anything wrong gets an error reply with a
stable code and the service keeps serving. An unexpected exception gets
`internal` with a correlation id, and its traceback goes to the log.

A verb that creates something is declared `@endpoint(idempotent=True)`, its request model inherits
`Creating`, and its handler claims the caller's idempotency key in the transaction that creates the
object; a repeat of the request then gets the first reply (see `herder.services.common.idempotency`):

    @endpoint(permission=Permission.JOBS_START, idempotent=True)
    async def start(self, request: JobStart, ctx: RequestContext) -> JobInfo:
        job_id = new_id()
        async with self.runtime.events.transaction() as tx:
            await ctx.claim(tx.connection, job_id)  # first: a duplicate fails here, before any work
            await self.repo.insert(tx.connection, ...)
        return JobInfo(...)

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        return await self.job_info(ctx.tenant, object_id)  # when the first reply was never stored
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.micro.request import Request as MicroRequest
from nats.micro.service import EndpointConfig, ServiceConfig, ServiceStats
from nats.micro.service import Service as MicroService
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from herder.client import connection
from herder.client.backoff import backoff
from herder.client.requests import Client
from herder.client.tasks import Supervisor
from herder.protocol import codec, subjects
from herder.protocol.auth import Principal, PrincipalKind
from herder.protocol.codec import BEARER, Header
from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, Internal, Unauthenticated
from herder.protocol.messages import (
    IDEMPOTENCY_KEY_PATTERN,
    IDEMPOTENCY_KEY_RULE,
    ComponentHealth,
    Creating,
    HealthCheck,
    HealthReply,
    Model,
    Request,
    new_id,
    utcnow,
)
from herder.protocol.version import SCHEMA_VERSION, VERSION
from herder.services.common import bus, database, idempotency
from herder.services.common.credentials import ServiceCredential
from herder.services.common.events import EventPublisher
from herder.services.common.idempotency import Repeat
from herder.services.common.tokens import TokenResolver

# Requests one service instance works on at once; past this, NATS buffers them.
MAX_IN_FLIGHT = 256
DRAIN_TIMEOUT_S = 10.0
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)

Handler = Callable[[Any, "RequestContext"], Awaitable[Model]]
F = TypeVar("F", bound=Callable[..., Awaitable[Model]])


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What the `endpoint` decorator records about a handler."""

    request_model: type[Request[Any]]
    permission: str | None
    authenticated: bool
    idempotent: bool = False


def endpoint(
    *, permission: str | None = None, authenticated: bool = True, idempotent: bool = False
) -> Callable[[F], F]:
    """Mark a service method as the handler of the verb of its request model.

    `permission` is demanded of the caller; `authenticated=False` lets callers without a token in.
    `idempotent=True` (for verbs that create; the request model must inherit `Creating`) makes a repeat
    under the same idempotency key answer the first reply: the handler claims the key with
    `ctx.claim` in its creating transaction, and the service may rebuild lost replies in `replay`.
    """

    def mark(handler: F) -> F:
        hints = get_type_hints(handler)
        parameters = list(inspect.signature(handler).parameters)
        if len(parameters) != 3:
            raise TypeError(f"{handler.__qualname__} must take (self, request, ctx)")
        request_model = hints.get(parameters[1])
        if not (isinstance(request_model, type) and issubclass(request_model, Request)):
            raise TypeError(f"{handler.__qualname__}: annotate the request with its Request model")
        if idempotent and not issubclass(request_model, Creating):
            raise TypeError(
                f"{handler.__qualname__}: an idempotent endpoint's request must inherit Creating "
                f"(so that JSON callers can send request_id); {request_model.__name__} does not"
            )
        handler.__herder_endpoint__ = EndpointSpec(  # type: ignore[attr-defined]
            request_model=request_model,
            permission=None if permission is None else str(permission),
            authenticated=authenticated,
            idempotent=idempotent,
        )
        return handler

    return mark


class RequestContext:
    """Who asked, for which tenant, under which correlation id; with a logger bound to them."""

    __slots__ = (
        "_claim",
        "_correlation_id",
        "_keep_reply",
        "_log",
        "_service_log",
        "bearer",
        "idempotency_key",
        "origin",
        "principal",
        "tenant",
    )

    def __init__(
        self,
        *,
        tenant: str,
        principal: Principal | None,
        correlation_id: str | None,
        idempotency_key: str | None,
        service_log: structlog.stdlib.BoundLogger,
        origin: str | None = None,
    ) -> None:
        self.tenant = tenant
        self.principal = principal
        self.idempotency_key = idempotency_key
        # Where the caller says it sent the request from (its host): informative, not proof.
        self.origin = origin
        # The caller's token, so that a service can ask another on the caller's behalf (and with no
        # more rights than the caller has). Never logged, never stored.
        self.bearer: str | None = None
        self._correlation_id = correlation_id
        self._service_log = service_log
        self._log: structlog.stdlib.BoundLogger | None = None
        # Set by the runtime for an idempotent endpoint's request that carries a key.
        self._claim: idempotency.Claim | None = None
        # The sealed first reply to store under the claim, once it has been sent (see `_create`).
        self._keep_reply: Callable[[], Awaitable[object]] | None = None

    async def claim(self, connection: AsyncConnection, object_id: str) -> None:
        """Claim this request's idempotency key for `object_id`, in the transaction that creates it.

        Call it first in that transaction: the key and the object then commit together or not at
        all, and a concurrent duplicate fails here with `AlreadyClaimed` (let it propagate: the
        transaction rolls back, and the runtime answers the duplicate with the first request's reply).
        A no-op when the request carries no key or the endpoint is not idempotent.
        """
        if self._claim is not None:
            await self._claim.take(connection, object_id)

    @property
    def correlation_id(self) -> str:
        """The caller's correlation id, or one made for this request when the caller sent none."""
        if self._correlation_id is None:
            self._correlation_id = new_id()
        return self._correlation_id

    @property
    def actor(self) -> str | None:
        """The name of the caller, as recorded in events and audit records."""
        return self.principal.name if self.principal else None

    def robot_name(self) -> str:
        """The robot whose own token made this request; `Forbidden` for any other caller."""
        if self.principal is None or self.principal.kind is not PrincipalKind.ROBOT:
            raise Forbidden("only a robot's own token can do this; register the robot with 'herder robot add'")
        return self.principal.name

    def on_behalf(self, client: Client) -> Client:
        """A client that asks other services as this request's caller, in its tenant."""
        return client.acting_as(self.bearer, self.tenant)

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        """The service's logger bound to this request (built on first use: most requests never log)."""
        if self._log is None:
            self._log = self._service_log.bind(tenant=self.tenant, actor=self.actor, correlation_id=self.correlation_id)
        return self._log


@dataclass(frozen=True)
class BusAddress:
    """Where the bus is: its URL (comma-separated for a cluster) and the CA its TLS certificates come from."""

    url: str
    ca_pem: str | None = None


@dataclass
class Runtime:
    """What a service is given to work with: the bus, the database, tokens and events, and the stack's
    service credential (for the services that connect again, e.g. to the system account)."""

    nc: NATS
    js: JetStreamContext
    engine: AsyncEngine | None
    tokens: TokenResolver
    events: EventPublisher
    address: BusAddress | None = None
    credential: ServiceCredential | None = None
    # The process's own background work (the token mirror, the outbox relay): `health` reports it too.
    supervisor: Supervisor = field(default_factory=Supervisor)
    _reconnected: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def on_reconnected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Have `callback` called whenever the connection to NATS is back after it was lost."""
        self._reconnected.append(callback)

    async def reconnected(self) -> None:
        """Tell those who asked that the connection is back (what they raise is logged)."""
        for callback in list(self._reconnected):
            try:
                await callback()
            except Exception:
                self.log.exception("runtime.reconnect_listener_failed")

    data_dir: Path | None = None
    jetstream: bus.JetStreamSettings = field(default_factory=bus.JetStreamSettings)
    log: structlog.stdlib.BoundLogger = field(default_factory=lambda: structlog.get_logger("herder"))

    def service_client(self, service: str, *, timeout: float | None = None) -> Client:
        """A client that asks other services as the service `service` itself (every permission, any
        tenant): for work no caller asked for, such as a trigger firing. Pass the tenant per request."""
        token = self.tokens.service_token(service)
        return Client(self.nc, token=token) if timeout is None else Client(self.nc, token=token, timeout=timeout)

    @cached_property
    def client(self) -> Client:
        """A client with no token of its own: pass it to `RequestContext.on_behalf` to ask another
        service as the caller."""
        return Client(self.nc, token=None)


class Service:
    """Base of every herder service: subclasses set `name` and declare `@endpoint` methods."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    version: ClassVar[str] = VERSION

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.log: structlog.stdlib.BoundLogger = runtime.log.bind(service=self.name)
        self.instance_id = new_id()[:12]
        self._started = time.monotonic()
        # The instance's background work: logged when it fails, restarted, stopped after `teardown`.
        self.tasks = Supervisor(log=self.log)

    @property
    def engine(self) -> AsyncEngine:
        """The database engine; a service that owns tables cannot run without one."""
        if self.runtime.engine is None:
            raise RuntimeError(f"the {self.name} service needs a database")
        return self.runtime.engine

    async def setup(self) -> None:
        """Prepare before the first request (caches, JetStream assets). Runs once per instance."""

    async def teardown(self) -> None:
        """Release what `setup` took, after the last request."""

    async def replay(self, verb: str, object_id: str, ctx: RequestContext) -> Model | None:
        """Rebuild the reply of an idempotent `verb` from the object it created, for a repeat whose
        first request committed but never stored its reply (it crashed, or is still running after
        the wait). None (the default) means it cannot: the repeat is told to retry in a moment.

        A secret shown once (a token) cannot be rebuilt: answer without it.
        """
        return None

    @endpoint()
    async def health(self, request: HealthCheck, ctx: RequestContext) -> HealthReply:
        """Every service answers `health`: its instance, uptime and database."""
        engine = self.runtime.engine
        states = [*self.runtime.supervisor.states().values(), *self.tasks.states().values()]
        return HealthReply(
            service=self.name,
            version=self.version,
            instance=self.instance_id,
            uptime_s=round(time.monotonic() - self._started, 3),
            database=await database.check(engine) if engine is not None else None,
            components=[
                ComponentHealth(
                    name=state.name,
                    status=state.status.value,
                    restarts=state.restarts,
                    failures=state.failures,
                    last_error=state.last_error,
                )
                for state in states
            ],
        )

    @classmethod
    def endpoints(cls) -> dict[str, tuple[str, EndpointSpec]]:
        """verb -> (method name, spec), for every `@endpoint` method of the class."""
        found: dict[str, tuple[str, EndpointSpec]] = {}
        for attribute in dir(cls):
            spec = getattr(getattr(cls, attribute), "__herder_endpoint__", None)
            if isinstance(spec, EndpointSpec):
                found[spec.request_model.verb] = (attribute, spec)
        return found


@dataclass
class EndpointCounters:
    """Request, error and latency counts of one endpoint, reported through `$SRV.STATS`."""

    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    last_error: str = ""

    def record(self, elapsed_ns: int, error: HerderError | None) -> None:
        """Count one served request."""
        self.requests += 1
        self.processing_ns += elapsed_ns
        if error is not None:
            self.errors += 1
            self.last_error = f"{error.code.value}: {error.message}"[:200]


class _MicroService(MicroService):
    """`nats.micro`'s service, reporting herder's counters.

    nats-py delivers one subscription's messages one after another, so herder's endpoints hand
    each request to a task; nats.micro's own counters would then time only that hand-over.
    """

    def __init__(self, nc: NATS, config: ServiceConfig, counters: dict[str, EndpointCounters]) -> None:
        super().__init__(nc, config)
        self._herder_counters = counters

    def stats(self) -> ServiceStats:
        stats = super().stats()
        for endpoint_stats in stats.endpoints:
            counters = self._herder_counters.get(endpoint_stats.name)
            if counters is None:
                continue
            endpoint_stats.num_requests = counters.requests
            endpoint_stats.num_errors = counters.errors
            endpoint_stats.last_error = counters.last_error
            endpoint_stats.processing_time = counters.processing_ns
            endpoint_stats.average_processing_time = counters.processing_ns // max(counters.requests, 1)
        return stats

    async def reset(self) -> None:
        await super().reset()
        for name in self._herder_counters:
            self._herder_counters[name] = EndpointCounters()


@dataclass(frozen=True, slots=True)
class _Route:
    verb: str
    message_type: str
    spec: EndpointSpec
    handler: Handler
    counters: EndpointCounters


class ServiceRunner:
    """Serves one service instance on the bus: registration, dispatch, statistics and draining."""

    def __init__(self, service: Service, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.service = service
        self._runtime = service.runtime
        self._log = service.log
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._counters: dict[str, EndpointCounters] = {}
        self._micro: _MicroService | None = None
        self._idempotency: idempotency.IdempotencyStore | None = None

    async def start(self) -> None:
        """Run the service's setup, then register it and its endpoints with the NATS service API."""
        endpoints = self.service.endpoints()
        if any(spec.idempotent for _attribute, spec in endpoints.values()):
            # Claims live in the database: an idempotent endpoint without one would create duplicates.
            self._idempotency = idempotency.IdempotencyStore(self.service.engine)
        await self.service.setup()
        name = self.service.name
        self._micro = _MicroService(
            self._runtime.nc,
            ServiceConfig(
                name=name,
                version=self.service.version,
                description=self.service.description or (type(self.service).__doc__ or "").strip(),
                metadata={"schema": str(SCHEMA_VERSION), "instance": self.service.instance_id},
                queue_group=name,
            ),
            self._counters,
        )
        await self._micro.start()
        for verb, (attribute, spec) in endpoints.items():
            counters = self._counters.setdefault(verb, EndpointCounters())
            route = _Route(
                verb=verb,
                message_type=f"{name}.{verb}",
                spec=spec,
                handler=getattr(self.service, attribute),
                counters=counters,
            )
            await self._micro.add_endpoint(
                EndpointConfig(
                    name=verb,
                    subject=subjects.service_listen(name, verb),
                    queue_group=name,
                    handler=partial(self._accept, route),
                )
            )
        await connection.sync(self._runtime.nc)
        self._log.info("service.started", instance=self.service.instance_id, verbs=sorted(self._counters))

    async def stop(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Stop taking requests, let those in flight finish (up to `timeout`), then tear down."""
        if self._micro is not None:
            await self._micro.stop()
            self._micro = None
        if self._in_flight:
            _done, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                self._log.warning("service.drain_timeout", cancelled=len(pending))
        await self.service.teardown()
        await self.service.tasks.stop()
        self._log.info("service.stopped", instance=self.service.instance_id)

    async def _accept(self, route: _Route, request: MicroRequest) -> None:
        # Waiting here when every slot is taken holds back the subscription: NATS buffers the rest.
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(route, request))
        self._in_flight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _serve(self, route: _Route, request: MicroRequest) -> None:
        started = time.perf_counter_ns()
        headers = request.headers or {}
        content_type = codec.content_type_of(headers)
        sent_id = headers.get(Header.CORRELATION_ID)
        if sent_id is not None and _CORRELATION_ID.fullmatch(sent_id) is None:
            sent_id = None  # not an id this service will log or echo; it makes its own
        ctx = RequestContext(
            tenant=subjects.parse_service(request.subject).tenant,
            principal=None,
            correlation_id=sent_id,
            idempotency_key=headers.get(Header.MSG_ID),
            service_log=self._log,
            origin=_origin(headers.get(Header.ORIGIN)),
        )
        error: HerderError | None = None
        reply_headers: dict[str, str] | None = None
        try:
            reply = await self._handle(route, request.data, headers, content_type, ctx)
            data = codec.dump(reply, content_type)
            codec.check_size(data, "reply")
            # A msgpack success needs no headers; a caller that sent a correlation id gets it back.
            if content_type != codec.MSGPACK:
                reply_headers = {Header.CONTENT_TYPE: content_type}
            if sent_id is not None:
                reply_headers = {**(reply_headers or {}), Header.CORRELATION_ID: sent_id}
        except HerderError as exc:
            error = exc
        except Exception:
            self._log.exception(
                "request.failed", verb=route.verb, subject=request.subject, correlation_id=ctx.correlation_id
            )
            error = Internal(
                f"{route.message_type} failed unexpectedly; the service log has the details "
                f"under correlation id {ctx.correlation_id}",
                details={"correlation_id": ctx.correlation_id},
            )
        if error is not None:
            data, reply_headers = codec.error_reply(error, content_type, ctx.correlation_id)
            if not isinstance(error, Internal):  # internal errors were logged with their traceback
                self._log.info(
                    "request.refused",
                    verb=route.verb,
                    code=error.code.value,
                    reason=error.message,
                    correlation_id=ctx.correlation_id,
                )
        try:
            await request.respond(data, headers=reply_headers)
        except ValueError:
            pass  # published without a reply subject: nobody to answer
        except Exception as exc:
            self._log.warning("request.reply_failed", verb=route.verb, error=repr(exc))
        route.counters.record(time.perf_counter_ns() - started, error)
        if ctx._keep_reply is not None:
            await ctx._keep_reply()  # best effort: it logs its own failure

    async def _handle(
        self, route: _Route, data: bytes, headers: dict[str, str], content_type: str, ctx: RequestContext
    ) -> Model:
        codec.check_size(data, "request")
        message_type = headers.get(Header.TYPE)
        if message_type and message_type != route.message_type:
            raise BadRequest(f"this endpoint takes {route.message_type}, not {message_type}")
        schema = headers.get(Header.SCHEMA)
        if schema and (not schema.isdigit() or int(schema) > SCHEMA_VERSION):
            raise BadRequest(
                f"schema version {schema!r} is not one this service speaks (it speaks up to {SCHEMA_VERSION})"
            )
        authorization = headers.get(Header.AUTHORIZATION)
        if authorization:
            secret = _bearer_secret(authorization)
            # The mirror answers almost every time; only a token created a moment ago needs the bucket.
            tokens = self._runtime.tokens
            principal = tokens.lookup(secret) or tokens.service(secret) or await tokens.fetch(secret)
            ctx.principal = _admit(route.spec, principal, ctx.tenant)
            ctx.bearer = secret
        elif route.spec.authenticated:
            raise Unauthenticated("this request needs a token: send the header 'Authorization: Bearer <token>'")
        model = codec.load(route.spec.request_model, data or _EMPTY[content_type], content_type)
        if route.spec.idempotent:
            return await self._create(route, model, ctx)
        return await route.handler(model, ctx)

    async def _create(self, route: _Route, request: Request[Any], ctx: RequestContext) -> Model:
        """Run an idempotent endpoint: answer a repeat from its first reply, else run the handler and keep its reply."""
        # The header wins over the body's request_id.
        key = ctx.idempotency_key or (request.request_id if isinstance(request, Creating) else None)
        if not key:
            return await route.handler(request, ctx)
        if _IDEMPOTENCY_KEY.fullmatch(key) is None:
            raise BadRequest(f"the idempotency key (header {Header.MSG_ID}) {IDEMPOTENCY_KEY_RULE}")
        store = self._idempotency
        assert store is not None  # made in `start` for every service with an idempotent endpoint
        ctx.idempotency_key = key
        claim = idempotency.Claim(
            scope=idempotency.Scope(ctx.tenant, self.service.name, route.verb),
            key=key,
            digest=idempotency.request_digest(request, ctx.principal),
        )
        # No lookup first: a repeat finds the key claimed when its handler claims it (`AlreadyClaimed`),
        # and is answered below; a first request, by far the most common, pays for one insert.
        ctx._claim = claim
        try:
            reply = await route.handler(request, ctx)
        except HerderError:
            if claim.object_id is not None:
                raise  # this request claimed the key: the error is its own
            # A duplicate that lost the race (`AlreadyClaimed`), or that failed on what the first one
            # created (a name now taken), answers as a repeat of the first.
            repeated = await self._repeat(route, store, claim, ctx)
            if repeated is None:
                raise
            return repeated
        if claim.object_id is None:
            ctx.log.warning("idempotency.unclaimed", verb=route.verb, key=idempotency.shown(key))
        else:
            # Stored once the reply is on its way (`_serve`): a repeat arriving before that waits for it.
            ctx._keep_reply = partial(store.save_reply, claim, codec.dump(reply))
        return reply

    async def _repeat(
        self, route: _Route, store: idempotency.IdempotencyStore, claim: idempotency.Claim, ctx: RequestContext
    ) -> Model | None:
        """The answer to a repeat of an earlier request with the key of `claim`; None when there was none."""
        deadline = time.monotonic() + idempotency.REPLY_WAIT_S
        polls = 0
        while True:
            record = await store.lookup(claim)
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
                    try:
                        return codec.load(route.spec.request_model.reply_model, opened)
                    except BadRequest:
                        pass  # stored by a version whose reply this one cannot read: rebuild it
                ctx.log.warning("idempotency.reply_unreadable", verb=route.verb, object_id=record.object_id)
            elif verdict is Repeat.WAIT and time.monotonic() < deadline:
                polls += 1
                pause = backoff(polls, base_s=idempotency.REPLY_POLL_BASE_S, max_s=idempotency.REPLY_POLL_MAX_S)
                await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
                continue
            rebuilt = await self.service.replay(route.verb, record.object_id, ctx)
            if rebuilt is None:
                raise idempotency.AlreadyClaimed()
            if not isinstance(rebuilt, route.spec.request_model.reply_model):
                raise TypeError(
                    f"{type(self.service).__name__}.replay({route.verb!r}) returned a {type(rebuilt).__name__}, "
                    f"not a {route.spec.request_model.reply_model.__name__}"
                )
            return rebuilt


def _origin(value: str | None) -> str | None:
    """The origin a caller gave, if it is a plausible host name (printable, short)."""
    if value is None or _ORIGIN.fullmatch(value) is None:
        return None
    return value


_ORIGIN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def _bearer_secret(authorization: str) -> str:
    if not authorization.startswith(BEARER):
        raise Unauthenticated("the Authorization header must read 'Bearer <token>'")
    return authorization[len(BEARER) :].strip()


def _admit(spec: EndpointSpec, principal: Principal | None, tenant: str) -> Principal:
    """The principal, if it may call this endpoint in this tenant; otherwise the error saying why not."""
    if principal is None:
        raise Unauthenticated("the token is unknown or revoked")
    if principal.tenant != tenant and principal.kind is not PrincipalKind.SERVICE:
        raise Forbidden(f"this token belongs to tenant {principal.tenant!r}, not {tenant!r}")
    if spec.permission is not None and not principal.can(spec.permission):
        raise Forbidden(f"role '{principal.role}' lacks the permission '{spec.permission}'")
    return principal


_EMPTY = {codec.MSGPACK: b"\x80", codec.JSON: b"{}"}
