"""The request client the CLI, robots and services all use."""

from __future__ import annotations

from typing import TypeVar

import nats.errors
from nats.aio.client import Client as NATS

from herder.client.connection import refused
from herder.protocol import codec, subjects
from herder.protocol.codec import BEARER, Header
from herder.protocol.errors import BadRequest, Forbidden, Internal, Unavailable
from herder.protocol.messages import Model, Request
from herder.protocol.version import SCHEMA_VERSION

DEFAULT_TIMEOUT_S = 5.0

R = TypeVar("R", bound=Model)


class Client:
    """Sends request models to herder services and returns their reply models.

    An error reply raises the matching `HerderError`; no answer in time raises `Unavailable`
    naming the subject.
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
        """Send `request` and return its reply; `service` names the target of shared verbs like `health`."""
        service_name = service or request.service
        if not service_name:
            raise ValueError(f"{type(request).__name__} is served by every service: say which one")
        subject, headers = self._route(tenant or self.tenant, service_name, request.verb)
        data = codec.dump(request, self.content_type)
        codec.check_size(data, "request")
        if correlation_id or idempotency_key:
            headers = dict(headers)
            if correlation_id:
                headers[Header.CORRELATION_ID] = correlation_id
            if idempotency_key:
                headers[Header.MSG_ID] = idempotency_key
        wait = self.timeout if timeout is None else timeout
        try:
            reply = await self.nc.request(subject, data, timeout=wait, headers=headers)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            # A request the bus refused reaches nobody: say that, not that nobody answered.
            why = refused(self.nc, subject)
            if why is not None:
                raise Forbidden(
                    f"the bus refused this connection's request to {subject} ({why.removeprefix('nats: ')}); "
                    "its token does not allow it",
                    details={"subject": subject},
                ) from None
            if isinstance(exc, nats.errors.TimeoutError):
                raise Unavailable(
                    f"no reply from {subject} within {wait:g} s; the {service_name} service may be down or overloaded",
                    details={"subject": subject},
                ) from None
            raise Unavailable(
                f"no {service_name} service is running to answer {subject}; "
                f"start one with 'herder up' or 'herder service run {service_name}'",
                details={"subject": subject},
            ) from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            raise Unavailable("the connection to NATS is closed", details={"subject": subject}) from None
        if reply.headers and codec.is_error_reply(reply.headers):
            codec.raise_error_reply(reply.data, reply.headers)
        try:
            return codec.load(request.reply_model, reply.data, codec.content_type_of(reply.headers))  # type: ignore[return-value]
        except BadRequest as exc:
            raise Internal(
                f"the {service_name} service sent a reply this client cannot read ({exc.message}); "
                "are the client and the service the same version?"
            ) from None

    def _route(self, tenant: str, service: str, verb: str) -> tuple[str, dict[str, str]]:
        """The subject and the constant headers of a verb; a caller without a correlation id gets
        one from the service, which returns it in error replies."""
        key = (tenant, service, verb, self.content_type)
        route = self._routes.get(key)
        if route is None:
            headers = {Header.TYPE: f"{service}.{verb}", Header.SCHEMA: _SCHEMA}
            if self.content_type != codec.MSGPACK:
                headers[Header.CONTENT_TYPE] = self.content_type
            if self._authorization:
                headers[Header.AUTHORIZATION] = self._authorization
            route = self._routes[key] = (subjects.service(tenant, service, verb), headers)
        return route


_SCHEMA = str(SCHEMA_VERSION)
