"""Random bytes and random msgpack maps thrown at a live endpoint: every one gets a clear answer,
the service keeps serving, and no stored state is damaged."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import TokenCreate, TokenCreated, TokenListRequest, WhoAmI
from herder.protocol.codec import Header
from herder.protocol.messages import ErrorBody
from herder.services.auth.service import AuthService
from herder.services.common.credentials import ServiceCredential
from herder.services.common.host import HostConfig, ServiceHost
from tests.support import connect_as

T = TypeVar("T")
EXAMPLES = 1000
SUBJECT = subjects.service("default", "auth", "token_create")


class LiveStack:
    """The auth service on an event loop of its own thread, so synchronous hypothesis tests can call it."""

    def __init__(self, nats_url: str, db_url: str, data_dir: Path, credential: ServiceCredential) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.host = ServiceHost(
            HostConfig(
                nats_url=nats_url, db_url=db_url, services=(AuthService,), credential=credential, data_dir=data_dir
            )
        )
        self.run(self.host.start())
        auth = self.host.services["auth"]
        assert isinstance(auth, AuthService)
        admin = self.run(auth.bootstrap_admin(None, may_rotate=False))
        assert admin is not None
        self.admin = admin
        self.nc = self.run(connect_as(nats_url, admin, name="fuzzer"))
        self.client = Client(self.nc, token=admin)
        self.created: set[str] = set()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def send(self, body: bytes, content_type: str = codec.MSGPACK) -> Msg:
        headers = {Header.AUTHORIZATION: f"Bearer {self.admin}", Header.CONTENT_TYPE: content_type}
        return self.run(self.nc.request(SUBJECT, body, headers=headers, timeout=5))

    def close(self) -> None:
        self.run(self.nc.close())
        self.run(self.host.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def live(nats_url: str, tmp_path: Path, credential: ServiceCredential) -> Iterator[LiveStack]:
    stack = LiveStack(nats_url, f"sqlite:///{tmp_path / 'fuzz.db'}", tmp_path, credential)
    try:
        yield stack
    finally:
        stack.close()


def check_answer(live: LiveStack, reply: Msg) -> None:
    """A reply is a token, or a bad_request/conflict error; never silence, never anything else."""
    if codec.is_error_reply(reply.headers):
        headers = reply.headers or {}
        code = headers[Header.ERROR_CODE]
        assert code in ("bad_request", "conflict"), (code, headers.get(Header.ERROR))
        body = codec.load(ErrorBody, reply.data, codec.content_type_of(reply.headers))
        assert body.message
        return
    created = codec.load(TokenCreated, reply.data, codec.content_type_of(reply.headers))
    live.created.add(created.token.name)


def still_serves(live: LiveStack) -> None:
    """The service answers properly, and the tokens it holds are exactly those it said it made."""
    assert live.run(live.client.request(WhoAmI())).name == "admin"
    made = live.run(live.client.request(TokenCreate(name="after-the-storm")))
    assert made.secret.startswith("hd_")
    listed = {token.name for token in live.run(live.client.request(TokenListRequest())).tokens}
    assert listed == {"admin", "after-the-storm", *live.created}


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=80)
    | st.binary(max_size=80),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=12,
)
msgpack_maps = st.dictionaries(
    st.sampled_from(["name", "role", "secret", "include_revoked"]) | st.text(max_size=12),
    msgpack_values | st.sampled_from(["admin", "operator", "integrator", "ok-name", "Bad Name"]),
    max_size=6,
)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


def test_random_bytes_get_bad_request_and_leave_the_service_serving(live: LiveStack) -> None:
    seen = 0

    @FUZZ
    @given(body=st.binary(max_size=2048))
    def throw(body: bytes) -> None:
        nonlocal seen
        seen += 1
        check_answer(live, live.send(body))

    throw()
    assert seen >= EXAMPLES
    still_serves(live)


def test_random_msgpack_maps_get_clear_answers_and_damage_nothing(live: LiveStack) -> None:
    seen = 0

    @FUZZ
    @given(body=msgpack_maps)
    def throw(body: dict[str, Any]) -> None:
        nonlocal seen
        seen += 1
        check_answer(live, live.send(msgpack.packb(body, use_bin_type=True)))

    throw()
    assert seen >= EXAMPLES
    still_serves(live)


def test_random_text_sent_as_json_gets_clear_answers(live: LiveStack) -> None:
    @settings(FUZZ, max_examples=300)
    @given(body=st.text(max_size=300).map(str.encode) | st.sampled_from([b"null", b"[]", b"1", b'{"name": null}']))
    def throw(body: bytes) -> None:
        reply = live.send(body, codec.JSON)
        assert (reply.headers or {})[Header.CONTENT_TYPE] == codec.JSON
        check_answer(live, reply)

    throw()
    still_serves(live)
