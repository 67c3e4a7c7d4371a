"""Bearer tokens: how they are hashed, and how every service process resolves them.

The auth service is the system of record (hashes in its tables) and projects each
live token into the HERDER_TOKENS KV bucket as `sha256(token) -> Principal`. Every
service process mirrors that bucket through a watch, so checking a token is a
dictionary lookup, and a revocation reaches every replica within milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets

import nats.js.errors
import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from herder.protocol import codec
from herder.protocol.auth import Principal
from herder.protocol.errors import BadRequest

TOKEN_PREFIX = "hd_"
TOKEN_BYTES = 32

log = structlog.get_logger("herder.tokens")


def new_secret() -> str:
    """A fresh API token: `hd_` and 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(secret: str) -> str:
    """The key a token is stored under. Tokens carry 256 random bits, so a plain SHA-256 is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenResolver:
    """Resolves bearer tokens to principals from a live mirror of the HERDER_TOKENS bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._principals: dict[str, Principal] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def bucket(self) -> KeyValue:
        """The HERDER_TOKENS bucket this resolver mirrors."""
        return self._kv

    async def start(self, timeout: float = 10.0) -> None:
        """Start mirroring the bucket, and return once the current contents are loaded."""
        watcher = await self._kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher), name="herder.tokens.watch")
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """Stop mirroring."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # the end of the initial contents
                    self._ready.set()
                    continue
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    self._principals.pop(entry.key, None)
                    continue
                try:
                    self._principals[entry.key] = codec.load(Principal, entry.value)
                except BadRequest:
                    log.warning("tokens.unreadable_entry", key=entry.key[:8])
                self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def lookup(self, secret: str) -> Principal | None:
        """The principal of a token as the mirror knows it; None may also mean "not mirrored yet"."""
        return self._principals.get(token_hash(secret))

    async def fetch(self, secret: str) -> Principal | None:
        """The principal of a token as the bucket holds it: for a token created a moment ago,
        which may not have reached the mirror yet. Not cached: the watch stays the mirror's one
        writer, so a revocation cannot be undone."""
        try:
            entry = await self._kv.get(token_hash(secret))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return codec.load(Principal, entry.value)
        except BadRequest:
            return None

    async def resolve(self, secret: str) -> Principal | None:
        """The principal a token stands for, or None when it is unknown or revoked."""
        return self.lookup(secret) or await self.fetch(secret)

    def snapshot(self) -> dict[str, Principal]:
        """A copy of the mirror: token hash -> principal."""
        return dict(self._principals)
