"""The pure parts of idempotent creating verbs: digests, key hashes, sealed replies, the repeat decision,
the `Creating` mixin, and the client's key and retries (over a fake connection)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import pytest
from pydantic import ValidationError

from herder.client import requests
from herder.client.requests import Client
from herder.protocol import codec
from herder.protocol.auth import Principal, PrincipalKind, Role
from herder.protocol.codec import Header
from herder.protocol.errors import Conflict, Unavailable
from herder.protocol.messages import Creating, Model, Request
from herder.services.common import idempotency
from herder.services.common.idempotency import Record, Repeat, Scope, judge, key_hash, request_digest, seal, unseal

SCOPE = Scope("default", "probe", "make")
KEY = "5f0c9a1e2b7d4c3a8e6f1b2d3c4a5e6f"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ADMIN = Principal(kind=PrincipalKind.TOKEN, name="admin", role=Role.ADMIN)


class Made(Model):
    id: str
    secret: str


class Make(Creating, Request[Made]):
    service = "probe"
    verb = "make"

    name: str
    size: int = 1
    tags: dict[str, int] = {}


class MakeOtherOrder(Request[Made], Creating):
    service = "probe"
    verb = "make_other"

    name: str


class Read(Request[Made]):
    service = "probe"
    verb = "read"


# --- the digest of a request ---


def test_the_digest_ignores_the_request_id_and_the_order_of_fields() -> None:
    plain = request_digest(Make(name="a", tags={"x": 1, "y": 2}), ADMIN)
    assert request_digest(Make(name="a", tags={"y": 2, "x": 1}, request_id="k-1"), ADMIN) == plain
    assert request_digest(Make.model_validate({"tags": {"y": 2, "x": 1}, "name": "a", "size": 1}), ADMIN) == plain
    assert len(plain) == 64 and int(plain, 16) >= 0


@pytest.mark.parametrize(
    "other",
    [
        Make(name="b", tags={"x": 1, "y": 2}),
        Make(name="a", size=2, tags={"x": 1, "y": 2}),
        Make(name="a", tags={"x": 1}),
    ],
)
def test_the_digest_differs_for_another_request(other: Make) -> None:
    assert request_digest(other, ADMIN) != request_digest(Make(name="a", tags={"x": 1, "y": 2}), ADMIN)


def test_the_digest_differs_for_another_caller() -> None:
    operator = Principal(kind=PrincipalKind.TOKEN, name="ci", role=Role.OPERATOR)
    robot = Principal(kind=PrincipalKind.ROBOT, name="admin", role=Role.ROBOT)
    digests = {request_digest(Make(name="a"), who) for who in (ADMIN, operator, robot, None)}
    assert len(digests) == 4


# --- the key's hash ---


def test_the_key_hash_is_a_salted_sha256_that_depends_on_the_scope() -> None:
    hashed = key_hash(SCOPE, KEY)
    assert len(hashed) == 64 and KEY not in hashed
    assert hashed == key_hash(Scope("default", "probe", "make"), KEY)
    assert hashed != hashlib.sha256(KEY.encode()).hexdigest()  # salted: not the bare hash of the key
    others = {key_hash(scope, KEY) for scope in (Scope("acme", "probe", "make"), Scope("default", "jobs", "make"))}
    others.add(key_hash(Scope("default", "probe", "start"), KEY))
    others.add(key_hash(SCOPE, KEY + "0"))
    assert hashed not in others and len(others) == 4


# --- sealed replies ---


def test_a_sealed_reply_opens_with_its_key_and_holds_no_plaintext() -> None:
    reply = codec.dump(Made(id="obj-1", secret="hd_the-secret-shown-once"))
    sealed = seal(SCOPE, KEY, reply)
    assert b"hd_the-secret-shown-once" not in sealed and b"obj-1" not in sealed
    assert KEY.encode() not in sealed
    assert unseal(SCOPE, KEY, sealed) == reply
    assert seal(SCOPE, KEY, reply) != sealed  # a fresh nonce each time


def test_a_sealed_reply_does_not_open_with_another_key_scope_or_a_tampered_byte() -> None:
    sealed = seal(SCOPE, KEY, b"the reply")
    assert unseal(SCOPE, KEY[:-1] + "0", sealed) is None
    assert unseal(Scope("acme", "probe", "make"), KEY, sealed) is None
    assert unseal(Scope("default", "probe", "other"), KEY, sealed) is None
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    assert unseal(SCOPE, KEY, bytes(tampered)) is None
    assert unseal(SCOPE, KEY, b"\x02" + sealed[1:]) is None  # an unknown format version
    assert unseal(SCOPE, KEY, b"") is None


def test_shown_keys_are_cut_short() -> None:
    assert idempotency.shown(KEY) == KEY[:8] + "…"
    assert idempotency.shown("short") == "short"


# --- what a repeat does ---


def record(
    *, digest: str = "d", reply: bytes | None = b"r", age_s: float = 0.0, expires_in_s: float = 3600.0
) -> Record:
    return Record(
        request_digest=digest,
        object_id="obj-1",
        reply=reply,
        created_at=NOW - timedelta(seconds=age_s),
        expires_at=NOW + timedelta(seconds=expires_in_s),
    )


@pytest.mark.parametrize(
    ("found", "verdict"),
    [
        (None, Repeat.NEW),
        (record(expires_in_s=0.0), Repeat.NEW),
        (record(expires_in_s=-1.0), Repeat.NEW),
        (record(digest="other"), Repeat.DIFFERENT),
        (record(digest="other", reply=None), Repeat.DIFFERENT),
        (record(), Repeat.REPLY),
        (record(age_s=3600.0), Repeat.REPLY),
        (record(reply=None, age_s=0.5), Repeat.WAIT),
        (record(reply=None, age_s=idempotency.REPLY_WAIT_S), Repeat.REBUILD),
        (record(reply=None, age_s=600.0), Repeat.REBUILD),
    ],
)
def test_the_repeat_decision(found: Record | None, verdict: Repeat) -> None:
    assert judge(found, "d", NOW) is verdict


def test_the_window_is_a_day_at_least() -> None:
    assert idempotency.IDEMPOTENCY_WINDOW_S >= 24 * 3600.0


# --- the Creating mixin ---


@pytest.mark.parametrize("model", [Make, MakeOtherOrder])
def test_creating_requests_take_a_request_id_and_still_refuse_unknown_fields(model: type[Request[Made]]) -> None:
    assert model.creates is True
    assert model.model_validate({"name": "a", "request_id": "0123abcd-ef.9:x_"}).request_id == "0123abcd-ef.9:x_"  # type: ignore[attr-defined]
    with pytest.raises(ValidationError):
        model.model_validate({"name": "a", "bogus": 1})


@pytest.mark.parametrize("bad", ["", "a b", "k" * 65, "ключ", "a\x00b"])
def test_a_request_id_must_be_a_short_plain_token(bad: str) -> None:
    with pytest.raises(ValidationError, match="1 to 64 letters"):
        Make(name="a", request_id=bad)


def test_other_requests_do_not_create() -> None:
    assert Read.creates is False
    assert "request_id" not in Read.model_fields


# --- the client: a key per call, kept across its retries ---


class FakeNats:
    """Answers `request` from a script: an exception to raise, or a reply to return."""

    def __init__(self, *script: BaseException | Made) -> None:
        self.script = list(script)
        self.sent: list[dict[str, str]] = []

    async def request(self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str]) -> Any:
        self.sent.append(dict(headers))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return _Reply(codec.dump(step))


class _Reply:
    def __init__(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.data = data
        self.headers = headers


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests, "CREATE_RETRY_BASE_S", 0.0)
    monkeypatch.setattr(requests, "CREATE_RETRY_MAX_S", 0.0)


def client(nc: FakeNats) -> Client:
    return Client(nc, token="hd_x")  # type: ignore[arg-type]


MADE = Made(id="obj-1", secret="s")


async def test_each_creating_call_gets_a_fresh_random_key() -> None:
    nc = FakeNats(MADE, MADE)
    await client(nc).request(Make(name="a"))
    await client(nc).request(Make(name="a"))
    keys = [headers[Header.MSG_ID] for headers in nc.sent]
    assert len(set(keys)) == 2 and all(len(key) == 32 and int(key, 16) >= 0 for key in keys)


async def test_a_creating_request_that_timed_out_is_retried_under_the_same_key() -> None:
    nc = FakeNats(nats.errors.TimeoutError(), nats.errors.NoRespondersError(), MADE)
    assert await client(nc).request(Make(name="a")) == MADE
    assert len(nc.sent) == 3 and len({headers[Header.MSG_ID] for headers in nc.sent}) == 1


async def test_the_callers_key_or_request_id_is_the_one_sent_and_retried() -> None:
    nc = FakeNats(nats.errors.TimeoutError(), MADE, MADE)
    await client(nc).request(Make(name="a"), idempotency_key="mine-1")
    await client(nc).request(Make(name="a", request_id="body-1"))
    assert [headers[Header.MSG_ID] for headers in nc.sent] == ["mine-1", "mine-1", "body-1"]


async def test_retries_are_bounded() -> None:
    nc = FakeNats(*(nats.errors.TimeoutError() for _ in range(requests.CREATE_RETRIES + 1)))
    with pytest.raises(Unavailable, match="no reply"):
        await client(nc).request(Make(name="a"))
    assert len(nc.sent) == requests.CREATE_RETRIES + 1


async def test_a_request_still_in_progress_is_retried_and_other_conflicts_are_not() -> None:
    in_progress, _ = codec.error_reply(idempotency.AlreadyClaimed(), codec.MSGPACK, None)

    class ConflictOnce(FakeNats):
        async def request(self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str]) -> Any:
            if not self.sent:
                self.sent.append(dict(headers))
                _, reply_headers = codec.error_reply(idempotency.AlreadyClaimed(), codec.MSGPACK, None)
                return _Reply(in_progress, reply_headers)
            return await super().request(subject, data, timeout=timeout, headers=headers)

    nc = ConflictOnce(MADE)
    assert await client(nc).request(Make(name="a")) == MADE
    assert len({headers[Header.MSG_ID] for headers in nc.sent}) == 1 and len(nc.sent) == 2

    taken, taken_headers = codec.error_reply(Conflict("robot r1 exists"), codec.MSGPACK, None)

    class Taken(FakeNats):
        async def request(self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str]) -> Any:
            self.sent.append(dict(headers))
            return _Reply(taken, taken_headers)

    once = Taken()
    with pytest.raises(Conflict, match="r1 exists"):
        await client(once).request(Make(name="a"))
    assert len(once.sent) == 1


async def test_other_requests_carry_no_key_and_are_never_retried() -> None:
    nc = FakeNats(MADE, nats.errors.TimeoutError())
    await client(nc).request(Read())
    assert Header.MSG_ID not in nc.sent[0]
    with pytest.raises(Unavailable):
        await client(nc).request(Read())
    assert len(nc.sent) == 2
