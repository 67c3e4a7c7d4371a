"""Subject builders and parsers."""

from __future__ import annotations

import pytest

from herder.protocol import subjects
from herder.protocol.errors import BadRequest


def test_every_family_is_built_with_the_tenant_after_the_prefix() -> None:
    assert subjects.service("acme", "jobs", "start") == "hd.acme.svc.jobs.start"
    assert subjects.command("acme", "ts-01", "robot7") == "hd.acme.cmd.ts-01.robot7"
    assert subjects.command("acme", "ts-01", subjects.COORDINATOR) == "hd.acme.cmd.ts-01._coordinator"
    assert subjects.event("acme", "jobs", "started") == "hd.acme.evt.jobs.started"
    assert subjects.telemetry("acme", "robot7", "heartbeat") == "hd.acme.tel.robot7.heartbeat"
    assert subjects.service_listen("jobs", "start") == "hd.*.svc.jobs.start"
    assert subjects.event_type_subject("acme", "auth.token_created") == "hd.acme.evt.auth.token_created"


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b", "tab\t", "new\nline", "a*", "x>", "\x00", "x" * 129])
def test_tokens_refuse_dots_wildcards_spaces_and_empties(bad: str) -> None:
    with pytest.raises(BadRequest):
        subjects.service(bad, "jobs", "start")
    with pytest.raises(BadRequest):
        subjects.command("acme", bad, "robot")
    with pytest.raises(BadRequest):
        subjects.telemetry("acme", "robot", bad)


def test_the_error_names_the_part_that_is_wrong() -> None:
    with pytest.raises(BadRequest, match="host"):
        subjects.command("acme", "ts.01", "robot")


@pytest.mark.parametrize("good", ["a", "ACME-01", "robot_7", "ünïcode", "x" * 128])
def test_ordinary_names_pass(good: str) -> None:
    assert subjects.check_token(good) == good


def test_parse_service_round_trips() -> None:
    parsed = subjects.parse_service(subjects.service("t1", "auth", "whoami"))
    assert (parsed.tenant, parsed.service, parsed.verb) == ("t1", "auth", "whoami")
    with pytest.raises(BadRequest):
        subjects.parse_service("hd.t1.evt.auth.whoami")


def test_parse_event_round_trips() -> None:
    parsed = subjects.parse_event("hd.t1.evt.auth.token_created")
    assert parsed.type == "auth.token_created"
    with pytest.raises(BadRequest):
        subjects.parse_event("hd.t1.evt.auth")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (None, "hd.*.evt.>"),
        (">", "hd.*.evt.>"),
        ("auth.>", "hd.*.evt.auth.>"),
        ("auth.token_created", "hd.*.evt.auth.token_created"),
        ("hd.acme.evt.>", "hd.acme.evt.>"),
    ],
)
def test_event_filters(pattern: str | None, expected: str) -> None:
    assert subjects.events_filter(pattern) == expected


@pytest.mark.parametrize("bad", ["auth.>.x", "hd.acme.svc.>", "a..b", "auth. x"])
def test_bad_event_filters(bad: str) -> None:
    with pytest.raises(BadRequest):
        subjects.events_filter(bad)
