"""The service runtime over a real nats-server: round trips, every error code, and the edges."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from nats.aio.client import Client as NATS

from herder.client import discovery
from herder.client.connection import sync
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import Role, TokenCreate, WhoAmI
from herder.protocol.codec import Header
from herder.protocol.errors import (
    ERROR_CLASSES,
    BadRequest,
    ErrorCode,
    Forbidden,
    Internal,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
)
from herder.protocol.messages import Empty, Model, Request
from herder.services.common.runtime import RequestContext, Service, ServiceRunner, endpoint
from tests.conftest import Stack
from tests.support import eventually, migrated


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """The runtime does not depend on the database kind: SQLite is enough here."""
    return migrated(f"sqlite:///{tmp_path / 'herder.db'}")


class EchoReply(Model):
    text: str
    n: int
    tenant: str
    actor: str | None
    correlation_id: str
    instance: str


class Echo(Request[EchoReply]):
    service = "probe"
    verb = "echo"

    text: str
    n: int = 0


class Fail(Request[Empty]):
    service = "probe"
    verb = "fail"

    code: str


class Boom(Request[Empty]):
    service = "probe"
    verb = "boom"


class Wait(Request[Empty]):
    service = "probe"
    verb = "wait"


class Open(Request[EchoReply]):
    service = "probe"
    verb = "open"

    text: str = "open"


class Guarded(Request[Empty]):
    service = "probe"
    verb = "guarded"


class Ghost(Request[Empty]):
    service = "ghost"
    verb = "nothing"


class ProbeService(Service):
    """A service made for testing the runtime."""

    name = "probe"

    async def setup(self) -> None:
        self.gate = asyncio.Event()
        self.barrier: asyncio.Barrier | None = None
        self.entered = 0

    @endpoint()
    async def echo(self, request: Echo, ctx: RequestContext) -> EchoReply:
        return EchoReply(
            text=request.text,
            n=request.n,
            tenant=ctx.tenant,
            actor=ctx.actor,
            correlation_id=ctx.correlation_id,
            instance=self.instance_id,
        )

    @endpoint()
    async def fail(self, request: Fail, ctx: RequestContext) -> Empty:
        raise ERROR_CLASSES[ErrorCode(request.code)](f"asked to fail with {request.code}", details={"why": "test"})

    @endpoint()
    async def boom(self, request: Boom, ctx: RequestContext) -> Empty:
        raise RuntimeError("kaboom")

    @endpoint()
    async def wait(self, request: Wait, ctx: RequestContext) -> Empty:
        self.entered += 1
        if self.barrier is not None:
            await self.barrier.wait()
        await self.gate.wait()
        return Empty()

    @endpoint(authenticated=False)
    async def open(self, request: Open, ctx: RequestContext) -> EchoReply:
        return EchoReply(
            text=request.text,
            n=0,
            tenant=ctx.tenant,
            actor=ctx.actor,
            correlation_id="",
            instance=self.instance_id,
        )

    @endpoint(permission="probe.guarded")
    async def guarded(self, request: Guarded, ctx: RequestContext) -> Empty:
        return Empty()


async def start_probe(stack: Stack) -> ServiceRunner:
    assert stack.host.runtime is not None
    runner = ServiceRunner(ProbeService(stack.host.runtime))
    await runner.start()
    return runner


@pytest.fixture
async def probe(stack: Stack) -> AsyncIterator[ServiceRunner]:
    runner = await start_probe(stack)
    try:
        yield runner
    finally:
        await runner.stop(timeout=1)


async def operator_token(stack: Stack) -> str:
    created = await stack.client.request(TokenCreate(name="operator-1", role=Role.OPERATOR))
    return created.secret


async def test_a_request_round_trips_with_its_context(stack: Stack, probe: ServiceRunner) -> None:
    reply = await stack.client.request(Echo(text="hello", n=7), correlation_id="corr-42")
    assert (reply.text, reply.n, reply.tenant, reply.actor) == ("hello", 7, "default", "admin")
    assert reply.correlation_id == "corr-42"


async def test_correlation_ids_come_back_when_sent_and_are_made_when_needed(stack: Stack, probe: ServiceRunner) -> None:
    auth = {"Authorization": f"Bearer {stack.admin_token}"}
    body = codec.dump(Echo(text="x"))
    subject = subjects.service("default", "probe", "echo")

    plain = await stack.nc.request(subject, body, headers=auth, timeout=2)
    assert not plain.headers  # a msgpack success travels without headers
    made = msgpack.unpackb(plain.data)["correlation_id"]
    assert len(made) == 32

    traced = await stack.nc.request(subject, body, headers={**auth, "Hd-Correlation-Id": "job-7.step-2"}, timeout=2)
    assert traced.headers == {"Hd-Correlation-Id": "job-7.step-2"}

    # An id the service will not log (spaces, too long) is replaced, not echoed.
    odd = await stack.nc.request(subject, body, headers={**auth, "Hd-Correlation-Id": "a b"}, timeout=2)
    assert not odd.headers
    assert msgpack.unpackb(odd.data)["correlation_id"] != "a b"

    failed = await stack.nc.request(subjects.service("default", "probe", "boom"), b"", headers=auth, timeout=2)
    error = msgpack.unpackb(failed.data)
    assert (failed.headers or {})["Hd-Correlation-Id"] == error["correlation_id"]
    assert error["correlation_id"] in error["message"]


async def test_a_json_client_gets_json(stack: Stack, probe: ServiceRunner) -> None:
    client = stack.client_with(stack.admin_token)
    client.content_type = codec.JSON
    assert (await client.request(Echo(text="json"))).text == "json"


@pytest.mark.parametrize("code", list(ErrorCode))
async def test_each_error_code_reaches_the_caller_as_its_exception(
    stack: Stack, probe: ServiceRunner, code: ErrorCode
) -> None:
    with pytest.raises(ERROR_CLASSES[code]) as caught:
        await stack.client.request(Fail(code=code.value))
    assert caught.value.message == f"asked to fail with {code.value}"
    assert caught.value.details["why"] == "test"


async def test_an_unexpected_exception_is_internal_and_the_service_keeps_serving(
    stack: Stack, probe: ServiceRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(Internal) as caught:
        await stack.client.request(Boom(), correlation_id="trace-me")
    assert "trace-me" in caught.value.message
    assert caught.value.details["correlation_id"] == "trace-me"
    assert "kaboom" not in caught.value.message  # the reason stays in the log
    logged = capsys.readouterr()
    assert "kaboom" in logged.err + logged.out
    assert (await stack.client.request(Echo(text="still here"))).text == "still here"


async def test_an_invalid_body_is_a_bad_request(stack: Stack, probe: ServiceRunner) -> None:
    reply = await stack.nc.request(
        subjects.service("default", "probe", "echo"),
        msgpack.packb({"text": 12, "n": "many"}),
        headers={Header.AUTHORIZATION: f"Bearer {stack.admin_token}"},
        timeout=2,
    )
    with pytest.raises(BadRequest) as caught:
        codec.raise_error_reply(reply.data, reply.headers or {})
    fields = {error["field"] for error in caught.value.details["errors"]}
    assert fields == {"text", "n"}


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "needs a token"),
        ("Bearer hd_not-a-real-token", "unknown or revoked"),
        ("Basic YWRtaW46YWRtaW4=", "Bearer <token>"),
    ],
)
async def test_requests_without_a_valid_token_are_unauthenticated(
    stack: Stack, probe: ServiceRunner, authorization: str | None, message: str
) -> None:
    headers = {Header.AUTHORIZATION: authorization} if authorization else {}
    reply = await stack.nc.request(
        subjects.service("default", "probe", "echo"), codec.dump(Echo(text="x")), headers=headers
    )
    with pytest.raises(Unauthenticated, match=message):
        codec.raise_error_reply(reply.data, reply.headers or {})


async def test_an_open_endpoint_takes_callers_without_a_token(stack: Stack, probe: ServiceRunner) -> None:
    reply = await stack.client_with(None).request(Open())
    assert reply.actor is None


async def test_a_role_without_the_permission_is_forbidden(stack: Stack, probe: ServiceRunner) -> None:
    operator = stack.client_with(await operator_token(stack))
    with pytest.raises(Forbidden, match=r"probe\.guarded"):
        await operator.request(Guarded())
    await stack.client.request(Guarded())


async def test_a_token_is_fenced_to_its_tenant(stack: Stack, probe: ServiceRunner, nc: NATS) -> None:
    # The bus refuses a client's request to another tenant's services: it reaches nobody...
    with pytest.raises(Forbidden, match=r"the bus refused .*hd\.acme\.svc\.probe\.echo"):
        await stack.client_with(stack.admin_token, tenant="acme").request(Echo(text="x"), timeout=1)
    # ... and a service holds the same line for a request that gets there anyway.
    with pytest.raises(Forbidden, match="tenant 'default', not 'acme'"):
        await Client(nc, token=stack.admin_token, tenant="acme").request(Echo(text="x"))


async def test_no_service_means_unavailable_naming_the_subject(stack: Stack) -> None:
    with pytest.raises(Unavailable, match=r"hd\.default\.svc\.ghost\.nothing"):
        await stack.client.request(Ghost())


async def test_a_silent_service_times_out_as_unavailable(stack: Stack, nc: NATS) -> None:
    await nc.subscribe(subjects.service("default", "ghost", "nothing"), cb=_ignore)
    await sync(nc)
    with pytest.raises(Unavailable, match=r"no reply from hd\.default\.svc\.ghost\.nothing within 0\.2 s"):
        await stack.client.request(Ghost(), timeout=0.2)


async def _ignore(_msg: object) -> None:
    return None


async def test_an_oversized_request_is_refused_on_both_sides(stack: Stack, probe: ServiceRunner) -> None:
    with pytest.raises(PayloadTooLarge):
        await stack.client.request(Echo(text="x" * codec.MAX_PAYLOAD_BYTES))
    body = msgpack.packb({"text": "x" * codec.MAX_PAYLOAD_BYTES})
    reply = await stack.nc.request(
        subjects.service("default", "probe", "echo"),
        body,
        headers={Header.AUTHORIZATION: f"Bearer {stack.admin_token}"},
        timeout=5,
    )
    with pytest.raises(BadRequest) as caught:
        codec.raise_error_reply(reply.data, reply.headers or {})
    assert caught.value.details["size"] == len(body)
    assert caught.value.details["max_payload"] == codec.MAX_PAYLOAD_BYTES


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        (Header.TYPE, "probe.fail", "takes probe.echo, not probe.fail"),
        (Header.SCHEMA, "99", "schema version"),
    ],
)
async def test_mismatched_type_or_newer_schema_is_a_bad_request(
    stack: Stack, probe: ServiceRunner, header: str, value: str, message: str
) -> None:
    reply = await stack.nc.request(
        subjects.service("default", "probe", "echo"),
        codec.dump(Echo(text="x")),
        headers={Header.AUTHORIZATION: f"Bearer {stack.admin_token}", header: value},
    )
    with pytest.raises(BadRequest, match=message):
        codec.raise_error_reply(reply.data, reply.headers or {})


async def test_plain_nats_py_speaking_json_integrates(stack: Stack, probe: ServiceRunner) -> None:
    """What an integrator in another language does: JSON in, JSON out, errors as JSON bodies."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.admin_token}"}
    reply = await stack.nc.request("hd.default.svc.auth.whoami", b"", headers=headers, timeout=2)
    assert (reply.headers or {})["Content-Type"] == "application/json"
    assert json.loads(reply.data)["name"] == "admin"

    reply = await stack.nc.request("hd.default.svc.probe.echo", b'{"text": "hi", "n": 3}', headers=headers)
    assert json.loads(reply.data)["text"] == "hi"

    reply = await stack.nc.request("hd.default.svc.probe.echo", b'{"n": "three"}', headers=headers)
    body = json.loads(reply.data)
    assert (reply.headers or {})["Nats-Service-Error-Code"] == "bad_request"
    assert body["code"] == "bad_request"
    assert {e["field"] for e in body["details"]["errors"]} == {"text", "n"}

    reply = await stack.nc.request(
        "hd.default.svc.auth.token_create", b'{"name": "x"}', headers={"Content-Type": "application/json"}
    )
    assert json.loads(reply.data)["code"] == "unauthenticated"


async def test_a_request_published_without_a_reply_subject_does_no_harm(stack: Stack, probe: ServiceRunner) -> None:
    await stack.nc.publish(subjects.service("default", "probe", "boom"), b"\x80")
    await stack.nc.publish(subjects.service("default", "probe", "echo"), b"\xc1")
    await stack.nc.flush()
    assert (await stack.client.request(Echo(text="fine"))).text == "fine"


async def test_statistics_count_requests_and_errors(stack: Stack, probe: ServiceRunner) -> None:
    for _ in range(5):
        await stack.client.request(Echo(text="x"))
    with pytest.raises(Forbidden):
        await stack.client.request(Fail(code="forbidden"))
    summary = {s.name: s for s in discovery.summarize(await discovery.gather(stack.nc))}
    assert summary["probe"].requests == 6
    assert summary["probe"].errors == 1
    assert summary["probe"].average_ms is not None and summary["probe"].average_ms > 0
    assert "auth" in summary


async def test_replicas_share_the_requests(stack: Stack, probe: ServiceRunner) -> None:
    second = await start_probe(stack)
    try:
        replies = await asyncio.gather(*(stack.client.request(Echo(text=str(i))) for i in range(60)))
        assert len({reply.instance for reply in replies}) == 2
        instances = {s.name: s.instances for s in discovery.summarize(await discovery.gather(stack.nc))}
        assert instances["probe"] == 2
    finally:
        await second.stop(timeout=1)


async def test_requests_are_served_concurrently(stack: Stack, probe: ServiceRunner) -> None:
    # Every handler waits until all eight are inside at once: served one by one, this would hang.
    service = probe.service
    assert isinstance(service, ProbeService)
    service.barrier = asyncio.Barrier(8)
    service.gate.set()
    await asyncio.wait_for(asyncio.gather(*(stack.client.request(Wait()) for _ in range(8))), timeout=5)


async def test_stopping_drains_requests_in_flight(stack: Stack) -> None:
    runner = await start_probe(stack)
    service = runner.service
    assert isinstance(service, ProbeService)
    in_flight = asyncio.create_task(stack.client.request(Wait(), timeout=5))
    await eventually(lambda: service.entered == 1)
    stopping = asyncio.create_task(runner.stop(timeout=5))

    async def left_the_bus() -> bool:
        return not any(reply["name"] == "probe" for reply in await discovery.gather(stack.nc, "PING"))

    # It takes no more requests, yet the one in flight is still being served.
    assert await eventually(left_the_bus, timeout=5)
    assert not in_flight.done() and not stopping.done()
    service.gate.set()
    assert await in_flight == Empty()
    await stopping
    with pytest.raises(Unavailable):
        await stack.client.request(Echo(text="after"))


async def test_whoami_answers_for_the_admin(stack: Stack) -> None:
    principal = await stack.client.request(WhoAmI())
    assert (principal.name, principal.role) == ("admin", Role.ADMIN)
