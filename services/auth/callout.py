"""The auth callout: nats-server asks, for every connecting robot and client, whether to admit it and how.

nats-server sends each authorization request to `$SYS.REQ.USER.AUTH` (sealed to the stack's
curve key); every auth instance listens there in the queue group `auth`. The token the client
presented is looked up like a request's bearer token (the token mirror, then the bucket for a
token made a moment ago); a live one gets a user JWT carrying its principal's permissions
(`core.admit`), anything else an error, which the server turns into "Authorization Violation".
The server bounds how long it waits (the credential's auth timeout): a callout that is slow or
down refuses connections, it never hangs the server.
"""

from __future__ import annotations

import contextlib

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from herder.protocol.errors import HerderError
from herder.protocol.fence import AUTH_CALLOUT_SUBJECT
from herder.services.auth import jwt
from herder.services.auth.core import admit
from herder.services.common.credentials import ACCOUNT, ServiceCredential
from herder.services.common.tokens import TokenResolver, token_hash

# The header in which nats-server names the curve key it sealed a request with.
SERVER_XKEY_HEADER = "Nats-Server-Xkey"
QUEUE = "auth"


class Callout:
    """Answers nats-server's authorization requests for the robots and clients that connect."""

    def __init__(
        self, nc: NATS, tokens: TokenResolver, credential: ServiceCredential, log: structlog.stdlib.BoundLogger
    ) -> None:
        self._nc = nc
        self._tokens = tokens
        self._issuer = credential.issuer
        self._curve = credential.curve
        self._log = log
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Start answering."""
        self._subscription = await self._nc.subscribe(AUTH_CALLOUT_SUBJECT, queue=QUEUE, cb=self._on_request)

    async def stop(self) -> None:
        """Stop answering: connections are refused until another auth instance answers."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        sealed_by = (msg.headers or {}).get(SERVER_XKEY_HEADER)
        try:
            data = self._curve.open(msg.data, sealed_by) if sealed_by else msg.data
            request = jwt.read_request(data.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            # Not a request of a server of this stack: no answer, and the server (if it is one) refuses.
            self._log.warning("callout.unreadable_request", error=str(exc))
            return
        answer = await self.answer(request)
        payload = answer.encode()
        if sealed_by:
            payload = self._curve.seal(payload, sealed_by)
        with contextlib.suppress(Exception):
            await msg.respond(payload)

    async def answer(self, request: jwt.AuthorizationRequest) -> str:
        """The signed authorization response for `request`."""
        secret = request.token
        if not secret:
            self._log.info("callout.refused", client=request.client_id, host=request.client_host, reason="no token")
            return jwt.response(request, self._issuer, error="a herder token is required")
        hashed = token_hash(secret)
        principal = self._tokens.lookup(secret) or await self._tokens.fetch(secret)
        try:
            admission = admit(principal, secret, hashed)
        except HerderError as exc:
            self._log.info("callout.refused", client=request.client_id, host=request.client_host, reason=exc.message)
            return jwt.response(request, self._issuer, error=exc.message)
        user = jwt.user_jwt(
            request, name=admission.name, account=ACCOUNT, permissions=admission.permissions, issuer=self._issuer
        )
        return jwt.response(request, self._issuer, user=user)
