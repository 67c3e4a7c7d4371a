"""The exception tree maps one-to-one to the wire codes."""

from __future__ import annotations

import pytest

from herder.protocol.errors import ERROR_CLASSES, BadRequest, ErrorCode, HerderError, NotFound, error_for


def test_one_class_per_code_and_each_code_stable() -> None:
    assert set(ERROR_CLASSES) == set(ErrorCode)
    assert {code.value for code in ErrorCode} >= {
        "bad_request",
        "not_found",
        "conflict",
        "forbidden",
        "unauthenticated",
        "unavailable",
        "internal",
        "licence_exhausted",
    }
    for code, cls in ERROR_CLASSES.items():
        assert cls.code is code
        assert issubclass(cls, HerderError)


def test_the_docstring_is_the_default_message() -> None:
    assert NotFound().message == "The thing asked for does not exist."
    assert BadRequest("custom").message == "custom"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_for_builds_the_matching_exception(code: ErrorCode) -> None:
    error = error_for(code.value, "message", {"k": "v"})
    assert error.code is code
    assert error.details == {"k": "v"}
