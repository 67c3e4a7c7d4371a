"""herder's error codes and the one exception tree that maps to them.

A service raises one of these; the runtime turns it into an error reply carrying
the code, the message and optional details; the client turns the reply back into
the same exception. A robot, the CLI and an integrator in another language all
see the same code and message.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorCode(StrEnum):
    """The stable codes of error replies. New codes may be added; existing ones never change meaning."""

    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    LICENCE_EXHAUSTED = "licence_exhausted"
    DECRYPTION_FAILED = "decryption_failed"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class HerderError(Exception):
    """Something went wrong in herder; the subclass says what, with a stable wire code."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str | None = None, *, details: dict[str, Any] | None = None) -> None:
        self.message = message or (self.__doc__ or self.code.value).strip().splitlines()[0]
        self.details: dict[str, Any] = details or {}
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"


class BadRequest(HerderError):
    """The request is malformed or fails validation."""

    code = ErrorCode.BAD_REQUEST


class PayloadTooLarge(BadRequest):
    """The message is larger than herder's maximum payload."""

    def __init__(self, size: int, max_payload: int, *, what: str = "message") -> None:
        super().__init__(
            f"the {what} is {size} bytes, more than the maximum of {max_payload} bytes",
            details={"size": size, "max_payload": max_payload},
        )
        self.size = size
        self.max_payload = max_payload


class Unauthenticated(HerderError):
    """The request carries no valid token."""

    code = ErrorCode.UNAUTHENTICATED


class Forbidden(HerderError):
    """The caller is known but not allowed to do this."""

    code = ErrorCode.FORBIDDEN


class NotFound(HerderError):
    """The thing asked for does not exist."""

    code = ErrorCode.NOT_FOUND


class Conflict(HerderError):
    """The request conflicts with the current state."""

    code = ErrorCode.CONFLICT


class LicenceExhausted(HerderError):
    """Every licence slot of this kind is in use."""

    code = ErrorCode.LICENCE_EXHAUSTED


class Unavailable(HerderError):
    """No service answered in time; it may be down or overloaded."""

    code = ErrorCode.UNAVAILABLE


class DecryptionFailed(HerderError):
    """A stored secret does not decrypt (the master key is not the one it was written with, or its
    row was changed); that secret alone is refused, and nothing is overwritten."""

    code = ErrorCode.DECRYPTION_FAILED


class Internal(HerderError):
    """The service failed unexpectedly; its log has the details under the correlation id."""

    code = ErrorCode.INTERNAL


ERROR_CLASSES: dict[ErrorCode, type[HerderError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthenticated,
        Forbidden,
        NotFound,
        Conflict,
        LicenceExhausted,
        DecryptionFailed,
        Unavailable,
        Internal,
    )
}


def error_for(code: str, message: str, details: dict[str, Any] | None = None) -> HerderError:
    """The exception for a wire error code; an unknown code (from a newer peer) becomes `Internal`."""
    try:
        cls = ERROR_CLASSES[ErrorCode(code)]
    except ValueError:
        return Internal(message, details={**(details or {}), "code": code})
    return cls(message, details=details)
