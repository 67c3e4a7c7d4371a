"""Bearer tokens: how they are hashed, and how every service process resolves them.

The auth service is the system of record (hashes in its tables) and projects each
live token into the HERDER_TOKENS KV bucket as `sha256(token) -> Principal`. Every
service process mirrors that bucket through a watch, so checking a token is a
dictionary lookup, and a revocation reaches every replica within milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from nats.js.kv import KeyValue

from herder.client.tasks import Supervisor
from herder.protocol import codec
from herder.protocol.auth import Permission, Principal, PrincipalKind, Role
from herder.protocol.subjects import DEFAULT_TENANT
from herder.services.common.mirror import START_TIMEOUT_S, KvMirror

TOKEN_PREFIX = "hd_"
TOKEN_BYTES = 32
# A service's token: `hd_svc_<service>_<signature>`, made by the stack's processes for the requests
# one service makes of another with no caller behind it (the scheduler starting a job at 03:00).
SERVICE_TOKEN_PREFIX = "hd_svc_"
_SERVICE_TOKEN = re.compile(r"hd_svc_([a-z][a-z0-9-]{0,31})_([0-9a-f]{64})")

log = structlog.get_logger("herder.tokens")

# Called with (token hash, the principal it stood for) when a token leaves the bucket.
OnRemoved = Callable[[str, Principal], Coroutine[Any, Any, None]]


def new_secret() -> str:
    """A fresh API token: `hd_` and 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(secret: str) -> str:
    """The key a token is stored under. Tokens carry 256 random bits, so a plain SHA-256 is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def service_token(key: bytes, service: str) -> str:
    """The token service `service` presents to other services: its name, signed with the stack's
    service token key. It is never written anywhere, travels only in request headers (which only
    services see), and the auth callout does not admit it to the bus."""
    return f"{SERVICE_TOKEN_PREFIX}{service}_{_sign(key, service)}"


def _sign(key: bytes, service: str) -> str:
    return hmac.new(key, f"service:{service}".encode(), hashlib.sha256).hexdigest()


def service_principal(key: bytes | None, secret: str) -> Principal | None:
    """The service a service token stands for, or None when `secret` is not a valid one."""
    if key is None or not secret.startswith(SERVICE_TOKEN_PREFIX):
        return None
    found = _SERVICE_TOKEN.fullmatch(secret)
    if found is None or not hmac.compare_digest(found.group(2), _sign(key, found.group(1))):
        return None
    return Principal(
        kind=PrincipalKind.SERVICE,
        name=found.group(1),
        tenant=DEFAULT_TENANT,
        role=Role.ADMIN,
        permissions=frozenset({Permission.ALL}),
    )


def _principal(data: bytes) -> Principal:
    return codec.load(Principal, data)


def _short(key: str) -> str:
    # A token hash is as good as the token to whoever can put it in the bucket; logs show a prefix.
    return key[:8]


class TokenResolver:
    """Resolves bearer tokens to principals from a live mirror of the HERDER_TOKENS bucket.

    The watch runs as task `herder.tokens.watch` under `supervisor` (a supervisor of its own when
    none is given): a watch that fails is logged and restarted, and catches up on what it missed."""

    def __init__(self, kv: KeyValue, *, supervisor: Supervisor | None = None, service_key: bytes | None = None) -> None:
        self._service_key = service_key
        self._mirror = KvMirror(
            kv,
            _principal,
            name="herder.tokens",
            on_change=self._changed,
            supervisor=supervisor,
            log_key=_short,
            log=log,
        )
        self._on_removed: list[OnRemoved] = []

    def on_removed(self, callback: OnRemoved) -> None:
        """Have `callback` called for every token that leaves the bucket from now on (revoked, or its
        robot removed), one at a time, in the order they went."""
        self._on_removed.append(callback)

    async def _changed(self, key: str, before: Principal | None, after: Principal | None) -> None:
        if before is not None and after is None:
            for callback in self._on_removed:
                await callback(key, before)

    @property
    def bucket(self) -> KeyValue:
        """The HERDER_TOKENS bucket this resolver mirrors."""
        return self._mirror.bucket

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start mirroring the bucket, and return once the current contents are loaded."""
        await self._mirror.start(timeout)

    async def stop(self) -> None:
        """Stop mirroring."""
        await self._mirror.stop()

    def lookup(self, secret: str) -> Principal | None:
        """The principal of a token as the mirror knows it; None may also mean "not mirrored yet"."""
        return self._mirror.get(token_hash(secret))

    def service(self, secret: str) -> Principal | None:
        """The service a service token stands for (None for any other token). Kept apart from
        `lookup`, which the auth callout uses: a service token is good for requests, not for the bus."""
        return service_principal(self._service_key, secret)

    def service_token(self, service: str) -> str:
        """The token `service` presents when it asks another service with no caller behind it."""
        if self._service_key is None:
            raise RuntimeError("this token resolver was made without the stack's service token key")
        return service_token(self._service_key, service)

    async def fetch(self, secret: str) -> Principal | None:
        """The principal of a token as the bucket holds it: for a token created a moment ago,
        which may not have reached the mirror yet. Not cached: the watch stays the mirror's one
        writer, so a revocation cannot be undone."""
        return await self._mirror.fetch(token_hash(secret))

    async def fetch_hash(self, key: str) -> Principal | None:
        """The principal the bucket holds under a token hash (None when none)."""
        return await self._mirror.fetch(key)

    async def resolve(self, secret: str) -> Principal | None:
        """The principal a token stands for, or None when it is unknown or revoked."""
        return self.lookup(secret) or await self.fetch(secret)

    def snapshot(self) -> dict[str, Principal]:
        """A copy of the mirror: token hash -> principal."""
        return self._mirror.snapshot()
