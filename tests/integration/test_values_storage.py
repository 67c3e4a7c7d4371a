"""JSON-safe values come back from SQLite and PostgreSQL exactly as they went in, as a job's input and output."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from herder.protocol import codec
from herder.protocol.errors import BadRequest
from herder.protocol.jobs import JobInfo, JobState, Priority
from herder.protocol.messages import new_id, utcnow
from herder.protocol.packages import EntryKind, EntryPoint, PackageRef
from herder.protocol.values import MAX_DEPTH, MAX_SAFE_INTEGER, check_value
from herder.services.common import database
from herder.services.jobs.records import JobRecord
from herder.services.jobs.repository import JobRepository
from tests.json_values import nasty_text, safe_objects, safe_text, same

EXAMPLES = 40
TENANT = "default"
PACKAGE = PackageRef(
    process="p",
    version="1",
    sha256="a" * 64,
    size=1,
    object="a" * 64,
    entry=EntryPoint(kind=EntryKind.PYTHON, target="m:f"),
)


def deepest() -> dict[str, Any]:
    """An object nested exactly MAX_DEPTH levels, the most a value may be."""
    value: dict[str, Any] = {"leaf": [1.5, "x"]}  # this object and its list: two levels
    for level in range(MAX_DEPTH - 2):
        value = {f"l{level}": value}
    return value


NASTY: list[dict[str, Any]] = [
    {},
    {"separators": "\u2028\u2029", "emoji": "😀👍🏽", "astral": "\U0010ffff", "rtl": "שלום", "bom": "\ufeff"},
    {"controls": "\x01\x1f\x7f\n\r\t", "quotes": "\"\\'", "escaped_nul_text": "\\u0000", "json": '{"a": 1}'},
    {"": "", "\u2028": [], "😀": {}, " ": None, "a.b[0]": True, "ü": False},
    {"max": MAX_SAFE_INTEGER, "min": -MAX_SAFE_INTEGER, "zero": 0, "negzero": -0.0, "one": 1.0},
    {"huge": 1e308, "negative": -1e308, "tiny": 5e-324, "third": 1 / 3, "e": 2.718281828459045},
    deepest(),
    {"mixed": [1, 1.0, True, "1", None, [1], {"1": 1}]},
]


def record(value: dict[str, Any], text: str) -> JobRecord:
    """An ended job whose input and output are `value`, and whose reason and error are `text`."""
    return JobRecord(
        id=new_id(),
        tenant=TENANT,
        process="p",
        version="1",
        package=PACKAGE,
        priority=Priority.NORMAL,
        state=JobState.FAULTED,
        reason=text,
        attempt=1,
        input=value,
        output=value,
        error=text,
        created_at=utcnow(),
    )


def test_accepted_values_round_trip_through_the_database(db_url: str) -> None:
    repository = JobRepository()
    with asyncio.Runner() as runner:
        engine = database.create_engine(db_url)

        async def stored_and_read(value: dict[str, Any], text: str) -> None:
            check_value(value)  # only JSON-safe values are stored
            job = record(value, text)
            async with engine.begin() as connection:
                await repository.insert(connection, job)
            async with engine.connect() as connection:
                back = await repository.get(connection, TENANT, job.id)
            assert back is not None
            assert same(back.input, value) and same(back.output, value)
            assert (back.reason, back.error) == (text, text)
            shown = codec.load(JobInfo, codec.dump(back.info()))
            assert same(shown.input, value) and same(shown.output, value)

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(safe_objects, safe_text | nasty_text)
        def drawn(value: dict[str, Any], text: str) -> None:
            runner.run(stored_and_read(value, text))

        try:
            for value in NASTY:
                runner.run(stored_and_read(value, "nasty: \u2028 😀 \x01"))
            drawn()
        finally:
            runner.run(engine.dispose())


def test_the_deepest_example_is_exactly_as_deep_as_allowed() -> None:
    check_value(deepest())
    with pytest.raises(BadRequest, match=f"nested deeper than {MAX_DEPTH} levels"):
        check_value({"one_more": deepest()})
