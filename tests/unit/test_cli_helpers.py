"""Pure parts of the CLI: durations, event lines, the status summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from herder.cli.tap import format_line, parse_duration
from herder.client.discovery import summarize
from herder.protocol.errors import BadRequest
from herder.protocol.messages import Event


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("1.5h", 5400),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["", "10", "h", "5 minutes", "-5m", "1x", "m5"])
def test_bad_durations_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(BadRequest, match="30s"):
        parse_duration(bad)


def test_an_event_line_has_time_tenant_subject_actor_and_fields() -> None:
    event = Event(
        id="e1",
        type="auth.token_created",
        tenant="acme",
        time=datetime(2026, 11, 22, 7, 0, 1, 123456, tzinfo=UTC),
        actor="admin",
        data={"token_id": "abc", "name": "ci", "role": "operator", "note": "two words"},
    )
    line = format_line(event, "hd.acme.evt.auth.token_created")
    assert line == (
        '2026-11-22T07:00:01.123Z acme hd.acme.evt.auth.token_created by admin name=ci role=operator note="two words"'
    )


def test_summarize_folds_instances_by_service() -> None:
    replies = [
        {
            "name": "auth",
            "version": "0.1.0",
            "endpoints": [
                {"num_requests": 10, "num_errors": 1, "processing_time": 10_000_000},
                {"num_requests": 0, "num_errors": 0, "processing_time": 0},
            ],
        },
        {
            "name": "auth",
            "version": "0.1.0",
            "endpoints": [{"num_requests": 30, "num_errors": 2, "processing_time": 30_000_000}],
        },
        {"name": "jobs", "version": "0.2.0", "endpoints": []},
        {"no": "name"},
    ]
    auth, jobs = summarize(replies)
    assert (auth.name, auth.instances, auth.requests, auth.errors) == ("auth", 2, 40, 3)
    assert auth.average_ms == pytest.approx(1.0)
    assert (jobs.name, jobs.instances, jobs.average_ms) == ("jobs", 1, None)
    assert jobs.as_dict()["versions"] == ["0.2.0"]
