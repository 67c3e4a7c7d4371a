"""The pure decisions about durable job requests: what a message says, who may send it, what a failure means."""

from __future__ import annotations

import json

import pytest

from herder.protocol import codec
from herder.protocol.auth import ROLE_PERMISSIONS, Principal, PrincipalKind, Role
from herder.protocol.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Internal,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from herder.protocol.fence import inbox_prefix
from herder.protocol.jobs import JobStart
from herder.services.common.idempotency import AlreadyClaimed
from herder.services.jobs.requests import GiveUp, Retry, admit, after_failure, is_final, read_incoming

TOKEN = "hd_integrator-token"
INBOX = inbox_prefix(TOKEN)


def headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **extra}


def principal(role: Role = Role.INTEGRATOR, tenant: str = "default") -> Principal:
    return Principal(kind=PrincipalKind.TOKEN, name="erp", tenant=tenant, role=role, permissions=ROLE_PERMISSIONS[role])


def test_the_header_id_wins_over_the_body_and_the_body_serves_without_one() -> None:
    body = json.dumps({"process": "p", "request_id": "from-body"}).encode()
    assert read_incoming(headers(**{"Nats-Msg-Id": "from-header"}), body).request_id == "from-header"
    assert read_incoming(headers(), body).request_id == "from-body"
    packed = codec.dump(JobStart(process="p", robot="r1", request_id="packed"))
    assert read_incoming({"Authorization": f"Bearer {TOKEN}"}, packed).request_id == "packed"


@pytest.mark.parametrize(
    ("msg_id", "body", "problem"),
    [
        (None, b'{"process": "p"}', "a durable request needs an id"),
        (None, b"", "a durable request needs an id"),
        (None, b"{not json", "a durable request needs an id"),
        ("has space", b"{}", "header Nats-Msg-Id"),
        ("x" * 65, b"{}", "header Nats-Msg-Id"),
        (None, b'{"request_id": 7}', "request_id in the body"),
        (None, b'{"request_id": "a.b*c"}', "request_id in the body"),
    ],
)
def test_a_missing_or_unfit_request_id_says_why(msg_id: str | None, body: bytes, problem: str) -> None:
    incoming = read_incoming(headers(**({"Nats-Msg-Id": msg_id} if msg_id else {})), body)
    assert incoming.request_id is None
    assert incoming.id_problem is not None and problem in incoming.id_problem


def test_answers_go_only_to_the_senders_own_inbox() -> None:
    assert read_incoming(headers(**{"Hd-Reply-To": f"{INBOX}.jobs.1"}), b"{}").reply_to == f"{INBOX}.jobs.1"
    for elsewhere in (
        "hd.default.cmd.box1.r1",
        "hd.default.evt.jobs.job_created",
        f"{inbox_prefix('another token')}.x",
        INBOX,
        f"{INBOX}.*",
        f"{INBOX}.>",
        f"{INBOX}..x",
        f"{INBOX}.a b",
    ):
        incoming = read_incoming(headers(**{"Hd-Reply-To": elsewhere}), b"{}")
        assert incoming.reply_to is None and incoming.reply_problem is not None, elsewhere
        assert INBOX in incoming.reply_problem


def test_the_token_and_correlation_id_are_read_but_never_made_up() -> None:
    assert read_incoming({}, b"").auth_problem == (
        "this request needs a token: send the header 'Authorization: Bearer <token>'"
    )
    assert read_incoming({"Authorization": "Basic abc"}, b"").secret is None
    incoming = read_incoming(headers(**{"Hd-Correlation-Id": "order-1"}), b"")
    assert (incoming.secret, incoming.correlation_id, incoming.correlation_sent) == (TOKEN, "order-1", True)
    odd = read_incoming(headers(**{"Hd-Correlation-Id": "a b"}), b"")
    assert not odd.correlation_sent and len(odd.correlation_id) == 32
    assert read_incoming({"Authorization": f"Bearer {TOKEN}"}, b"").content_type == codec.MSGPACK


def test_only_principals_of_the_tenant_that_may_start_jobs_are_admitted() -> None:
    assert admit(principal(), "default").name == "erp"
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        admit(None, "default")
    with pytest.raises(Forbidden, match="tenant 'acme'"):
        admit(principal(tenant="acme"), "default")
    with pytest.raises(Forbidden, match=r"lacks the permission 'jobs\.start'"):
        admit(principal(Role.ROBOT), "default")


def test_refusals_are_final_and_outages_are_not() -> None:
    for final in (BadRequest(), Unauthenticated(), Forbidden(), NotFound(), Conflict("taken")):
        assert is_final(final)
    for passing in (Unavailable(), Internal(), AlreadyClaimed(), TimeoutError(), OSError(), RuntimeError()):
        assert not is_final(passing)


def test_a_failing_request_is_tried_again_with_a_growing_pause_then_given_up() -> None:
    pauses = [after_failure(tries, max_tries=5) for tries in range(1, 5)]
    assert all(isinstance(pause, Retry) for pause in pauses)
    assert [p.delay_s <= 2 ** (n - 1) for n, p in enumerate(pauses, 1) if isinstance(p, Retry)] == [True] * 4
    assert after_failure(5, max_tries=5) == GiveUp(5)
    assert after_failure(9, max_tries=5) == GiveUp(9)
