"""Idempotent creating verbs: a key is claimed together with the object it creates, and the first reply
is kept for repeats.

A creating request may carry an idempotency key (the `Nats-Msg-Id` header, or `request_id` in the
body). The handler claims the key in the very transaction that creates its object, so the key and
the object commit together or not at all; a concurrent duplicate fails on the table's unique key and
rolls back. Once the handler has answered, the runtime stores the reply on the claim, and a repeat of
the request within `IDEMPOTENCY_WINDOW_S` gets that reply back instead of a second object, also after
the service restarts. A repeat that finds the claim without a reply (the first is still running, or
crashed after its commit) waits briefly, then asks the service to rebuild the reply from the object.

The table never holds a key: only a salted SHA-256 of it, and the reply sealed with AES-GCM under a
key derived from the idempotency key itself (HKDF-SHA256), so the database alone cannot open a reply
(`robot_add` and `token_create` answer with a secret shown once); only a caller presenting the same
key can. That protection is worth what the key's randomness is worth: **callers should use random
keys** (herder's client sends 128 random bits), never counters or names, which could be guessed from
the hash and would unlock the reply.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    Column,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    bindparam,
    delete,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from herder.protocol.auth import Principal
from herder.protocol.errors import Conflict
from herder.protocol.messages import Model, utcnow
from herder.services.common import database
from herder.services.common.database import UtcDateTime

# How long a claimed key answers repeats; a repeat after that creates again.
IDEMPOTENCY_WINDOW_S = 24 * 3600.0
# How long a repeat waits for the first request's reply before asking the service to rebuild it.
REPLY_WAIT_S = 3.0
REPLY_POLL_BASE_S = 0.02
REPLY_POLL_MAX_S = 0.25
PURGE_INTERVAL_S = 3600.0

_KEY_HASH_SALT = b"herder.idempotency.key-hash.v1"
_REPLY_KEY_INFO = b"herder.idempotency.reply-key.v1"
_SEALED_VERSION = b"\x01"
_NONCE_BYTES = 12
_AES_KEY_BYTES = 32
_SHOWN_KEY_CHARS = 8

metadata = MetaData()

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant", String(128), nullable=False),
    Column("service", String(128), nullable=False),
    Column("verb", String(128), nullable=False),
    Column("key_hash", String(64), nullable=False),
    Column("request_digest", String(64), nullable=False),
    Column("object_id", String(255), nullable=False),
    Column("reply", LargeBinary(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    # The unique key a concurrent duplicate's claim fails on.
    PrimaryKeyConstraint("tenant", "service", "verb", "key_hash", name="pk_idempotency_keys"),
    Index("ix_idempotency_keys_expires_at", "expires_at"),
)

log = structlog.get_logger("herder.idempotency")

# Built once: every creating request runs the first two, and most the third.
_KEY_ROW = (
    idempotency_keys.c.tenant == bindparam("k_tenant"),
    idempotency_keys.c.service == bindparam("k_service"),
    idempotency_keys.c.verb == bindparam("k_verb"),
    idempotency_keys.c.key_hash == bindparam("k_hash"),
)


def _claim_statement(dialect_insert: Any, *returning: Any) -> Any:
    """Claim a key in one statement: insert its row, or take over the row of an expired claim; a live
    claim changes nothing (no row returned). Both databases speak `ON CONFLICT ... DO UPDATE ... WHERE`."""
    statement = dialect_insert(idempotency_keys)
    taken_over = {
        name: statement.excluded[name] for name in ("request_digest", "object_id", "reply", "created_at", "expires_at")
    }
    return statement.on_conflict_do_update(
        index_elements=["tenant", "service", "verb", "key_hash"],
        set_=taken_over,
        where=idempotency_keys.c.expires_at <= statement.excluded.created_at,
    ).returning(*(returning or (idempotency_keys.c.object_id,)))


_CLAIM = {"postgresql": _claim_statement(postgresql_insert), "sqlite": _claim_statement(sqlite_insert)}
# The same, naming the key of each row claimed, for many keys in one statement.
_CLAIM_MANY = {
    dialect: _claim_statement(insert, idempotency_keys.c.key_hash, idempotency_keys.c.object_id)
    for dialect, insert in (("postgresql", postgresql_insert), ("sqlite", sqlite_insert))
}
_SAVE_REPLY = (
    update(idempotency_keys)
    .where(
        *_KEY_ROW,
        idempotency_keys.c.object_id == bindparam("k_object_id"),
        idempotency_keys.c.request_digest == bindparam("k_digest"),
    )
    .values(reply=bindparam("k_reply"))
)
_LOOKUP = select(
    idempotency_keys.c.request_digest,
    idempotency_keys.c.object_id,
    idempotency_keys.c.reply,
    idempotency_keys.c.created_at,
    idempotency_keys.c.expires_at,
).where(*_KEY_ROW, idempotency_keys.c.expires_at > bindparam("now"))


class AlreadyClaimed(Conflict):
    """Another request with this idempotency key is being processed; retry in a moment."""

    def __init__(self) -> None:
        # `in_progress` tells herder's client that retrying under the same key is safe.
        super().__init__(details={"in_progress": True})


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a key is claimed: keys of different tenants, services or verbs never meet."""

    tenant: str
    service: str
    verb: str

    def encode(self) -> bytes:
        """The scope as bytes, for hashing and as the associated data of a sealed reply."""
        # No part holds a NUL (subject tokens and keys exclude control characters), so NUL separates.
        return b"\0".join(part.encode() for part in (self.tenant, self.service, self.verb))


def key_hash(scope: Scope, key: str) -> str:
    """What the table stores instead of `key`: a SHA-256 of the key salted with herder's label and its scope."""
    return hashlib.sha256(b"\0".join((_KEY_HASH_SALT, scope.encode(), key.encode()))).hexdigest()


def request_digest(request: Model, principal: Principal | None) -> str:
    """The SHA-256 of a canonical JSON of `request` (without its `request_id`) and of who sent it.

    A repeat must be the same request from the same caller: a key reused for another request, or
    presented by another principal, is refused rather than answered with someone else's reply.
    """
    body = request.model_dump(mode="json", exclude={"request_id"})
    caller = None if principal is None else f"{principal.kind.value}:{principal.name}"
    canonical = json.dumps(
        {"caller": caller, "request": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _reply_key(scope: Scope, key: str) -> bytes:
    hkdf = HKDF(algorithm=SHA256(), length=_AES_KEY_BYTES, salt=None, info=_REPLY_KEY_INFO + b"\0" + scope.encode())
    return hkdf.derive(key.encode())


def _associated_data(scope: Scope, hashed_key: str) -> bytes:
    # Binds a sealed reply to its row: moved to another row, it no longer opens.
    return scope.encode() + b"\0" + hashed_key.encode()


def seal(scope: Scope, key: str, reply: bytes) -> bytes:
    """`reply` encrypted with AES-GCM under a key derived from the idempotency key: version, nonce, ciphertext."""
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(_reply_key(scope, key)).encrypt(nonce, reply, _associated_data(scope, key_hash(scope, key)))
    return _SEALED_VERSION + nonce + sealed


def unseal(scope: Scope, key: str, sealed: bytes) -> bytes | None:
    """The reply `seal` encrypted, or None when `sealed` does not open with this key and scope."""
    if sealed[:1] != _SEALED_VERSION:
        return None
    nonce, ciphertext = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
    try:
        return AESGCM(_reply_key(scope, key)).decrypt(nonce, ciphertext, _associated_data(scope, key_hash(scope, key)))
    except (InvalidTag, ValueError):
        return None


def shown(key: str) -> str:
    """The start of a key, fit for messages and logs: the whole key would unlock its reply."""
    return key[:_SHOWN_KEY_CHARS] + ("…" if len(key) > _SHOWN_KEY_CHARS else "")


@dataclass(frozen=True, slots=True)
class Record:
    """A claimed key as the table holds it."""

    request_digest: str
    object_id: str
    reply: bytes | None
    created_at: datetime
    expires_at: datetime


class Repeat(StrEnum):
    """What to do with a request whose key may have been claimed before."""

    NEW = "new"  # no live claim: run the handler, which claims the key
    REPLY = "reply"  # answer the stored reply
    DIFFERENT = "different"  # refuse: the key was claimed for another request
    WAIT = "wait"  # the first request is probably still running: look again shortly
    REBUILD = "rebuild"  # the first request committed but its reply was never stored: ask the service


def judge(record: Record | None, digest: str, now: datetime, *, wait_s: float = REPLY_WAIT_S) -> Repeat:
    """Decide what a request with `digest` does about the claim `record` of its key, at `now`."""
    if record is None or record.expires_at <= now:
        return Repeat.NEW
    if record.request_digest != digest:
        return Repeat.DIFFERENT
    if record.reply is not None:
        return Repeat.REPLY
    if now < record.created_at + timedelta(seconds=wait_s):
        return Repeat.WAIT
    return Repeat.REBUILD


@dataclass(slots=True)
class Claim:
    """One request's idempotency key, to be claimed in the transaction that creates its object."""

    scope: Scope
    key: str = field(repr=False)  # never logged, never stored
    digest: str
    hashed_key: str = field(init=False)
    # The object the key was claimed for, once `take` ran in this request.
    object_id: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.hashed_key = key_hash(self.scope, self.key)

    def row(self) -> dict[str, str]:
        """The parameters naming this key's row in the prebuilt statements."""
        return {
            "k_tenant": self.scope.tenant,
            "k_service": self.scope.service,
            "k_verb": self.scope.verb,
            "k_hash": self.hashed_key,
        }

    async def take(self, connection: AsyncConnection, object_id: str) -> None:
        """Claim the key for `object_id` in the transaction of `connection`; `AlreadyClaimed` when a
        concurrent request with the same key claimed it first (the transaction must then roll back)."""
        now = utcnow()
        try:
            result = await connection.execute(
                _CLAIM[connection.dialect.name],
                {
                    "tenant": self.scope.tenant,
                    "service": self.scope.service,
                    "verb": self.scope.verb,
                    "key_hash": self.hashed_key,
                    "request_digest": self.digest,
                    "object_id": object_id,
                    "reply": None,
                    "created_at": now,
                    "expires_at": now + timedelta(seconds=IDEMPOTENCY_WINDOW_S),
                },
            )
        except IntegrityError:
            raise AlreadyClaimed() from None
        if result.first() is None:
            raise AlreadyClaimed()  # a live claim holds the key: the transaction must roll back
        self.object_id = object_id


async def claim_many(connection: AsyncConnection, claims: list[tuple[Claim, str]]) -> set[str]:
    """Claim many keys, each for its object, in one statement in the transaction of `connection`;
    the hashed keys claimed. A key that a live claim holds is left as it is (not in the answer): see
    `lookup_many` for what it was claimed for."""
    if not claims:
        return set()
    now = utcnow()
    expires = now + timedelta(seconds=IDEMPOTENCY_WINDOW_S)
    rows = [
        {
            "tenant": claim.scope.tenant,
            "service": claim.scope.service,
            "verb": claim.scope.verb,
            "key_hash": claim.hashed_key,
            "request_digest": claim.digest,
            "object_id": object_id,
            "reply": None,
            "created_at": now,
            "expires_at": expires,
        }
        for claim, object_id in claims
    ]
    statement = _CLAIM_MANY[connection.dialect.name]
    taken = {row.key_hash: row.object_id for row in await connection.execute(statement, rows)}
    claimed = set()
    for claim, object_id in claims:
        if taken.get(claim.hashed_key) == object_id:
            claim.object_id = object_id
            claimed.add(claim.hashed_key)
    return claimed


async def lookup_many(connection: AsyncConnection, scope: Scope, hashed_keys: list[str]) -> dict[str, Record]:
    """The live claims of these hashed keys of `scope`, by hashed key."""
    if not hashed_keys:
        return {}
    query = select(
        idempotency_keys.c.key_hash,
        idempotency_keys.c.request_digest,
        idempotency_keys.c.object_id,
        idempotency_keys.c.reply,
        idempotency_keys.c.created_at,
        idempotency_keys.c.expires_at,
    ).where(
        idempotency_keys.c.tenant == scope.tenant,
        idempotency_keys.c.service == scope.service,
        idempotency_keys.c.verb == scope.verb,
        idempotency_keys.c.key_hash.in_(hashed_keys),
        idempotency_keys.c.expires_at > utcnow(),
    )
    return {
        row.key_hash: Record(
            request_digest=row.request_digest,
            object_id=row.object_id,
            reply=row.reply,
            created_at=row.created_at,
            expires_at=row.expires_at,
        )
        for row in await connection.execute(query)
    }


class IdempotencyStore:
    """The claimed keys of one database: looking them up, storing replies, purging expired claims."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def lookup(self, claim: Claim) -> Record | None:
        """The live record of `claim`'s key, if it was claimed before."""
        async with database.read(self._engine) as connection:
            row = (await connection.execute(_LOOKUP, {**claim.row(), "now": utcnow()})).first()
        if row is None:
            return None
        return Record(
            request_digest=row.request_digest,
            object_id=row.object_id,
            reply=row.reply,
            created_at=row.created_at,
            expires_at=row.expires_at,
        )

    async def save_reply(self, claim: Claim, reply: bytes) -> bool:
        """Store the sealed reply on the claim `claim` took; best effort: False (and a log line) when it fails.

        The object exists by now, so a failure here must not fail the request: a repeat then gets the
        reply rebuilt by the service instead.
        """
        if claim.object_id is None:
            raise RuntimeError("the idempotency key was not claimed; call ctx.claim in the creating transaction")
        try:
            sealed = seal(claim.scope, claim.key, reply)
            async with self._engine.begin() as connection:
                await connection.execute(
                    _SAVE_REPLY,
                    {**claim.row(), "k_object_id": claim.object_id, "k_digest": claim.digest, "k_reply": sealed},
                )
        except Exception as exc:
            log.warning(
                "idempotency.reply_not_stored",
                service=claim.scope.service,
                verb=claim.scope.verb,
                object_id=claim.object_id,
                error=repr(exc),
            )
            return False
        return True

    async def purge(self) -> int:
        """Delete the expired claims; return how many went."""
        async with self._engine.begin() as connection:
            result = await connection.execute(delete(idempotency_keys).where(idempotency_keys.c.expires_at <= utcnow()))
        return result.rowcount or 0
