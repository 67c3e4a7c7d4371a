"""The request client the CLI, robots and services all use."""

from __future__ import annotations

import asyncio
import socket
from typing import TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from herder.client.backoff import backoff
from herder.client.connection import refused
from herder.protocol import codec, subjects
from herder.protocol.codec import BEARER, Header
from herder.protocol.errors import BadRequest, Conflict, Forbidden, HerderError, Internal, Unavailable
from herder.protocol.messages import Creating, Model, Request, new_id
from herder.protocol.version import SCHEMA_VERSION

DEFAULT_TIMEOUT_S = 5.0
# A creating request that got no answer (a timeout, no responders: the service may have crashed
# after creating) is sent again under the same idempotency key, so the retry cannot create twice.
CREATE_RETRIES = 2
CREATE_RETRY_BASE_S = 0.5
CREATE_RETRY_MAX_S = 4.0

R = TypeVar("R", bound=Model)


class Client:
    """Sends request models to herder services and returns their reply models.

    An error reply raises the matching `HerderError`; no answer in time raises `Unavailable`
    naming the subject. A creating request (its model inherits `Creating`) carries an idempotency
    key, a fresh random one unless the caller gives one, and is retried under that key when
    nothing answers: the service returns the first reply to a repeat, never a second object.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        token: str | None,
        tenant: str = subjects.DEFAULT_TENANT,
        timeout: float = DEFAULT_TIMEOUT_S,
        content_type: str = codec.MSGPACK,
    ) -> None:
        self.nc = nc
        self.tenant = subjects.check_token(tenant, "tenant")
        self.timeout = timeout
        self.content_type = content_type
        self._token = token
        self._authorization = BEARER + token if token else None
        # The subject and headers of a verb are the same on every call: built once, sent as they are.
        self._routes: dict[tuple[str, str, str, str], tuple[str, dict[str, str]]] = {}

    def acting_as(self, token: str | None, tenant: str) -> Client:
        """This client with another token and tenant (itself when they are the same)."""
        if token == self._token and tenant == self.tenant:
            return self
        return Client(self.nc, token=token, tenant=tenant, timeout=self.timeout, content_type=self.content_type)

    async def request(
        self,
        request: Request[R],
        *,
        service: str | None = None,
        tenant: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
    ) -> R:
        """Send `request` and return its reply; `service` names the target of shared verbs like `health`.

        For a creating request, `idempotency_key` (else its `request_id`, else a fresh random key) is
        sent in `Nats-Msg-Id`, and the request is sent again under it, up to CREATE_RETRIES times,
        when no service answered; pass the same key again to retry it yourself later.
        """
        service_name = service or request.service
        if not service_name:
            raise ValueError(f"{type(request).__name__} is served by every service: say which one")
        subject, headers = self._route(tenant or self.tenant, service_name, request.verb)
        data = codec.dump(request, self.content_type)
        codec.check_size(data, "request")
        wait = self.timeout if timeout is None else timeout
        if request.creates:
            return await self._create(
                request, service_name, subject, headers, data, wait, idempotency_key, correlation_id
            )
        if correlation_id or idempotency_key:
            headers = dict(headers)
            if correlation_id:
                headers[Header.CORRELATION_ID] = correlation_id
            if idempotency_key:
                headers[Header.MSG_ID] = idempotency_key
        try:
            reply = await self.nc.request(subject, data, timeout=wait, headers=headers)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise self._unanswered(exc, subject, service_name, wait) from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            raise Unavailable("the connection to NATS is closed", details={"subject": subject}) from None
        return _reply(request, reply, service_name)

    async def _create(
        self,
        request: Request[R],
        service_name: str,
        subject: str,
        headers: dict[str, str],
        data: bytes,
        wait: float,
        idempotency_key: str | None,
        correlation_id: str | None,
    ) -> R:
        """Send a creating request under one idempotency key, again when nothing answered."""
        body_key = request.request_id if isinstance(request, Creating) else None
        headers = {**headers, Header.MSG_ID: idempotency_key or body_key or new_id()}
        if correlation_id:
            headers[Header.CORRELATION_ID] = correlation_id
        attempt = 0
        while True:
            try:
                reply = await self.nc.request(subject, data, timeout=wait, headers=headers)
                return _reply(request, reply, service_name)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                error: HerderError = self._unanswered(exc, subject, service_name, wait)
                if isinstance(error, Forbidden) or attempt >= CREATE_RETRIES:
                    raise error from None
            except Conflict as exc:
                # The first request under this key is still being processed: its reply is worth waiting for.
                if not exc.details.get("in_progress") or attempt >= CREATE_RETRIES:
                    raise
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                raise Unavailable("the connection to NATS is closed", details={"subject": subject}) from None
            attempt += 1
            await asyncio.sleep(backoff(attempt, base_s=CREATE_RETRY_BASE_S, max_s=CREATE_RETRY_MAX_S))

    def _unanswered(self, exc: Exception, subject: str, service_name: str, wait: float) -> HerderError:
        """The error for a request nothing answered: refused by the bus, timed out, or without responders."""
        # A request the bus refused reaches nobody: say that, not that nobody answered.
        why = refused(self.nc, subject)
        if why is not None:
            return Forbidden(
                f"the bus refused this connection's request to {subject} ({why.removeprefix('nats: ')}); "
                "its token does not allow it",
                details={"subject": subject},
            )
        if isinstance(exc, nats.errors.TimeoutError):
            return Unavailable(
                f"no reply from {subject} within {wait:g} s; the {service_name} service may be down or overloaded",
                details={"subject": subject},
            )
        return Unavailable(
            f"no {service_name} service is running to answer {subject}; "
            f"start one with 'herder up' or 'herder service run {service_name}'",
            # Nobody received the request: sending it again cannot do anything twice.
            details={"subject": subject, "no_responders": True},
        )

    def _route(self, tenant: str, service: str, verb: str) -> tuple[str, dict[str, str]]:
        """The subject and the constant headers of a verb; a caller without a correlation id gets
        one from the service, which returns it in error replies."""
        key = (tenant, service, verb, self.content_type)
        route = self._routes.get(key)
        if route is None:
            headers = {Header.TYPE: f"{service}.{verb}", Header.SCHEMA: _SCHEMA, Header.ORIGIN: _ORIGIN}
            if self.content_type != codec.MSGPACK:
                headers[Header.CONTENT_TYPE] = self.content_type
            if self._authorization:
                headers[Header.AUTHORIZATION] = self._authorization
            route = self._routes[key] = (subjects.service(tenant, service, verb), headers)
        return route


# The host this process runs on, as requests say where they come from.
_ORIGIN = (socket.gethostname() or "unknown")[:128]


def _reply(request: Request[R], reply: Msg, service_name: str) -> R:
    """The reply model of `request` from the reply message; an error reply raises its exception."""
    if reply.headers and codec.is_error_reply(reply.headers):
        codec.raise_error_reply(reply.data, reply.headers)
    try:
        return codec.load(request.reply_model, reply.data, codec.content_type_of(reply.headers))  # type: ignore[return-value]
    except BadRequest as exc:
        raise Internal(
            f"the {service_name} service sent a reply this client cannot read ({exc.message}); "
            "are the client and the service the same version?"
        ) from None


_SCHEMA = str(SCHEMA_VERSION)
