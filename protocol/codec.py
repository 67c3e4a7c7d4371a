"""Bytes in, models out, and back: the one place herder encodes and decodes the wire.

Bodies are msgpack by default. A request whose `Content-Type` header is
`application/json` is read as JSON and answered in JSON, so any language's NATS
client (and the `nats` CLI) can integrate. Metadata rides in NATS headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from herder.protocol.errors import BadRequest, HerderError, PayloadTooLarge, error_for
from herder.protocol.messages import ErrorBody, Model
from herder.protocol.values import ValueRefused, join_path

MSGPACK = "application/msgpack"
JSON = "application/json"

# NATS's default max_payload is 1 MiB for headers and body together; herder keeps
# bodies under this so the headers always fit beside them.
MAX_PAYLOAD_BYTES = 1_000_000


class Header:
    """Names of the NATS headers herder reads and writes."""

    CONTENT_TYPE = "Content-Type"
    TYPE = "Hd-Type"
    SCHEMA = "Hd-Schema"
    AUTHORIZATION = "Authorization"
    CORRELATION_ID = "Hd-Correlation-Id"
    MSG_ID = "Nats-Msg-Id"
    # Where a request was sent from, as its sender says (the host): recorded with reads of secrets.
    ORIGIN = "Hd-Origin"
    # Where the answer to a durable request (one published to a JetStream stream, which keeps no
    # reply subject of its own) goes: a subject of the sender's own inbox.
    REPLY_TO = "Hd-Reply-To"
    # The NATS service API's error headers, so `nats micro` and other clients see errors too.
    ERROR = "Nats-Service-Error"
    ERROR_CODE = "Nats-Service-Error-Code"


BEARER = "Bearer "

M = TypeVar("M", bound=Model)


def content_type_of(headers: Mapping[str, str] | None) -> str:
    """The codec a message asks for: JSON when its `Content-Type` says so, msgpack otherwise."""
    if headers:
        value = headers.get(Header.CONTENT_TYPE)
        if value and value.split(";", 1)[0].strip().lower() == JSON:
            return JSON
    return MSGPACK


def check_size(data: bytes, what: str = "message", max_payload: int = MAX_PAYLOAD_BYTES) -> None:
    """Raise `PayloadTooLarge` when `data` is larger than herder allows."""
    if len(data) > max_payload:
        raise PayloadTooLarge(len(data), max_payload, what=what)


def dump(model: Model, content_type: str = MSGPACK) -> bytes:
    """Encode a model as `content_type`. A model's top-level `bytes` fields (a chunk of a file) travel
    as msgpack bin, and in JSON as the model's config says (base64)."""
    if content_type == JSON:
        return model.model_dump_json().encode()
    binary = _binary_fields(type(model))
    plain = model.model_dump(mode="json", exclude=set(binary) if binary else None)
    for name in binary:
        plain[name] = getattr(model, name)
    packed: bytes = msgpack.packb(plain, use_bin_type=True)
    return packed


@cache
def _binary_fields(model_cls: type[Model]) -> tuple[str, ...]:
    return tuple(name for name, field in model_cls.model_fields.items() if field.annotation is bytes)


def load(model_cls: type[M], data: bytes, content_type: str = MSGPACK) -> M:
    """Decode and validate `data` as `model_cls`, or raise `BadRequest` saying what is wrong."""
    try:
        if content_type == JSON:
            return model_cls.model_validate_json(data)
        return model_cls.model_validate(unpack(data))
    except ValidationError as exc:
        raise invalid(model_cls.__name__, exc) from None


def unpack(data: bytes) -> Any:
    """Decode a msgpack body into plain Python values, or raise `BadRequest`."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadRequest(f"the body is not valid msgpack ({type(exc).__name__})") from None


def invalid(what: str, exc: ValidationError) -> BadRequest:
    """A `BadRequest` listing what failed validation, without echoing the input."""
    # Never echo the input back: it may hold a secret. The context is read only for the path inside
    # a free-form value that `values.ValueRefused` carries, and is not passed on.
    problems = [_problem(err) for err in exc.errors(include_url=False, include_input=False)]
    shown = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return BadRequest(f"invalid {what}: {shown}{more}", details={"errors": problems[:20]})


def _problem(err: ErrorDetails) -> dict[str, str]:
    """One failed check as `{"field": "input.a[3]", "problem": "…"}`."""
    field = ".".join(str(part) for part in err["loc"])
    refused = err.get("ctx", {}).get("error")
    if isinstance(refused, ValueRefused):
        return {"field": join_path(field, refused.path) or "(body)", "problem": refused.problem}
    return {"field": field or "(body)", "problem": _plain(err["msg"])}


def _plain(problem: str) -> str:
    # pydantic puts "Value error, " before the words of a validator; the words say enough.
    return problem.removeprefix("Value error, ")


def error_reply(error: HerderError, content_type: str, correlation_id: str | None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an error reply."""
    body = ErrorBody(code=error.code.value, message=error.message, details=error.details, correlation_id=correlation_id)
    headers = {
        Header.CONTENT_TYPE: content_type,
        Header.ERROR_CODE: error.code.value,
        # Header values are one line; the body keeps the full message.
        Header.ERROR: error.message.replace("\r", " ").replace("\n", " ")[:500],
    }
    if correlation_id:
        headers[Header.CORRELATION_ID] = correlation_id
    try:
        data = dump(body, content_type)
    except (TypeError, ValueError):
        data = dump(body.model_copy(update={"details": {}}), content_type)
    return data, headers


def is_error_reply(headers: Mapping[str, str] | None) -> bool:
    """Whether a reply carries an error."""
    return headers is not None and Header.ERROR_CODE in headers


def raise_error_reply(data: bytes, headers: Mapping[str, str]) -> None:
    """Turn an error reply into the matching exception and raise it."""
    code = headers.get(Header.ERROR_CODE, "internal")
    message = headers.get(Header.ERROR, "") or "the service reported an error"
    details: dict[str, Any] = {}
    if data:
        try:
            body = load(ErrorBody, data, content_type_of(headers))
        except BadRequest:
            body = None
        if body is not None:
            code, message, details = body.code, body.message, dict(body.details)
            if body.correlation_id:
                details.setdefault("correlation_id", body.correlation_id)
    raise error_for(code, message, details)


__all__ = [
    "JSON",
    "MAX_PAYLOAD_BYTES",
    "MSGPACK",
    "Header",
    "check_size",
    "content_type_of",
    "dump",
    "error_reply",
    "is_error_reply",
    "load",
    "raise_error_reply",
    "unpack",
]
