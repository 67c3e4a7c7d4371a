"""The codec: bytes in, bytes out, no server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgpack
import pytest

from herder.protocol import codec
from herder.protocol.auth import Principal, PrincipalKind, Role, TokenCreate
from herder.protocol.codec import Header
from herder.protocol.errors import (
    ERROR_CLASSES,
    BadRequest,
    ErrorCode,
    HerderError,
    Internal,
    PayloadTooLarge,
)
from herder.protocol.messages import Event


def test_msgpack_round_trip_keeps_every_field() -> None:
    principal = Principal(kind=PrincipalKind.TOKEN, name="ci", role=Role.OPERATOR, permissions=frozenset({"a", "b"}))
    data = codec.dump(principal)
    assert msgpack.unpackb(data)["name"] == "ci"
    assert codec.load(Principal, data) == principal


def test_json_round_trip_is_plain_json() -> None:
    request = TokenCreate(name="robot-1", role=Role.INTEGRATOR)
    data = codec.dump(request, codec.JSON)
    assert json.loads(data) == {"name": "robot-1", "role": "integrator"}
    assert codec.load(TokenCreate, data, codec.JSON) == request


def test_datetimes_survive_msgpack() -> None:
    event = Event(id="e1", type="auth.token_created", tenant="default", time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert codec.load(Event, codec.dump(event)).time == event.time


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, codec.MSGPACK),
        ({}, codec.MSGPACK),
        ({Header.CONTENT_TYPE: "application/json"}, codec.JSON),
        ({Header.CONTENT_TYPE: "Application/JSON; charset=utf-8"}, codec.JSON),
        ({Header.CONTENT_TYPE: "application/msgpack"}, codec.MSGPACK),
        ({Header.CONTENT_TYPE: "text/plain"}, codec.MSGPACK),
    ],
)
def test_content_type_follows_the_header(headers: dict[str, str] | None, expected: str) -> None:
    assert codec.content_type_of(headers) == expected


@pytest.mark.parametrize("garbage", [b"\xc1", b"\x92\x01", b"\x81\x01\x02", b"\xd4\x01\x02", b"\x80\x80", b""])
def test_undecodable_or_wrongly_shaped_msgpack_is_a_bad_request(garbage: bytes) -> None:
    with pytest.raises(BadRequest):
        codec.load(TokenCreate, garbage)


def test_invalid_json_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="invalid TokenCreate"):
        codec.load(TokenCreate, b"{not json", codec.JSON)


def test_validation_errors_name_the_field_but_never_echo_the_input() -> None:
    secret = "hunter2-SECRET-VALUE"
    with pytest.raises(BadRequest) as caught:
        codec.load(TokenCreate, msgpack.packb({"name": secret}))
    error = caught.value
    assert "name" in error.message
    assert secret not in error.message
    assert secret not in json.dumps(error.details)
    assert error.details["errors"][0]["field"] == "name"


def test_unknown_fields_are_refused_in_requests() -> None:
    with pytest.raises(BadRequest, match="nmae"):
        codec.load(TokenCreate, msgpack.packb({"name": "ok", "nmae": "typo"}))


def test_unknown_fields_are_ignored_in_replies() -> None:
    data = msgpack.packb({"kind": "token", "name": "x", "role": "admin", "added_later": 1})
    assert codec.load(Principal, data).name == "x"


def test_check_size_refuses_one_byte_too_many() -> None:
    codec.check_size(b"x" * codec.MAX_PAYLOAD_BYTES)
    with pytest.raises(PayloadTooLarge) as caught:
        codec.check_size(b"x" * (codec.MAX_PAYLOAD_BYTES + 1), "request")
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert caught.value.details == {
        "size": codec.MAX_PAYLOAD_BYTES + 1,
        "max_payload": codec.MAX_PAYLOAD_BYTES,
    }
    assert "request" in caught.value.message


@pytest.mark.parametrize("content_type", [codec.MSGPACK, codec.JSON])
@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_survives_the_wire(code: ErrorCode, content_type: str) -> None:
    error = ERROR_CLASSES[code]("it went wrong\nbadly", details={"thing": 1})
    data, headers = codec.error_reply(error, content_type, "cid-1")
    assert headers[Header.ERROR_CODE] == code.value
    assert "\n" not in headers[Header.ERROR]
    assert codec.is_error_reply(headers)
    with pytest.raises(HerderError) as caught:
        codec.raise_error_reply(data, headers)
    assert type(caught.value) is ERROR_CLASSES[code]
    assert caught.value.message == "it went wrong\nbadly"
    assert caught.value.details == {"thing": 1, "correlation_id": "cid-1"}


def test_an_error_reply_without_a_body_still_raises_from_its_headers() -> None:
    with pytest.raises(HerderError) as caught:
        codec.raise_error_reply(b"", {Header.ERROR_CODE: "not_found", Header.ERROR: "no such robot"})
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert caught.value.message == "no such robot"


def test_an_unknown_code_from_a_newer_peer_becomes_internal_and_keeps_the_code() -> None:
    with pytest.raises(Internal) as caught:
        codec.raise_error_reply(b"", {Header.ERROR_CODE: "quota_exceeded", Header.ERROR: "too many"})
    assert caught.value.details["code"] == "quota_exceeded"


def test_success_replies_are_not_errors() -> None:
    assert not codec.is_error_reply(None)
    assert not codec.is_error_reply({Header.CONTENT_TYPE: codec.MSGPACK})
