"""Connecting to NATS and preparing JetStream."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from herder.client.connection import connect, display_nats_url, sync
from herder.client.errors import SetupError
from herder.protocol import subjects
from herder.services.common.bus import JetStreamSettings, ensure_bucket, ensure_event_stream
from herder.services.common.natsserver import EmbeddedNats


async def test_an_unreachable_server_is_one_clear_line() -> None:
    with pytest.raises(SetupError, match=r"cannot reach NATS at nats://127\.0\.0\.1:1: connection refused"):
        await connect("nats://127.0.0.1:1", name="test")


async def test_a_cluster_url_skips_a_server_that_is_down(nats_url: str) -> None:
    nc = await connect(f"nats://127.0.0.1:1,{nats_url}", name="test")
    try:
        assert nc.is_connected
    finally:
        await nc.close()


async def test_every_server_down_is_one_clear_line() -> None:
    with pytest.raises(SetupError, match="connection refused"):
        await connect("nats://127.0.0.1:1,nats://127.0.0.1:2", name="test")


@pytest.mark.parametrize("url", ["http://localhost:4222", "nats://"])
async def test_a_bad_url_says_how_to_write_one(url: str) -> None:
    with pytest.raises(SetupError, match="nats://HOST:PORT"):
        await connect(url, name="test")


def test_printed_urls_hide_credentials() -> None:
    assert display_nats_url("nats://s3cret@127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert display_nats_url("nats://user:pw@host:4222") == "nats://host:4222"
    assert display_nats_url("nats://t@a:4222, nats://t@b:4222") == "nats://a:4222,nats://b:4222"


async def test_streams_and_buckets_are_created_idempotently(nc: NATS) -> None:
    js = nc.jetstream()
    for _ in range(2):
        await ensure_event_stream(js, "default", JetStreamSettings())
        await ensure_bucket(js, subjects.TOKENS_BUCKET, JetStreamSettings())
    info = await js.stream_info(subjects.events_stream("default"))
    assert info.config.subjects == [subjects.events_stream_subjects("default")]
    assert info.config.duplicate_window == 120


async def test_a_token_protected_server_refuses_strangers_and_admits_the_holder(tmp_path: object) -> None:
    from pathlib import Path

    server = EmbeddedNats(Path(str(tmp_path)) / "nats", token="let-me-in")
    server.start()
    try:
        config = (Path(str(tmp_path)) / "nats" / "nats-server.conf").read_text()
        assert "let-me-in" not in config  # only the bcrypt hash is written
        for _ in range(20):  # the refusal is named every time, however the server closes the socket
            with pytest.raises(SetupError, match="refused the credentials"):
                await connect(server.url, name="stranger")
        nc = await connect(server.client_url, name="holder")
        assert nc.is_connected
        await nc.close()
    finally:
        server.stop()
    assert server.pid is None


async def test_after_sync_another_connection_finds_new_subscriptions(nc: NATS, nats_url: str) -> None:
    """A responder is reachable as soon as `sync` returns, from any connection."""
    caller = await connect(nats_url, name="caller")
    try:
        for n in range(100):
            subject = f"sync.test.{n}"

            async def answer(msg: Msg) -> None:
                await msg.respond(b"here")

            await nc.subscribe(subject, queue="q", cb=answer)
            await sync(nc)
            assert (await caller.request(subject, b"", timeout=2)).data == b"here"
    finally:
        await caller.close()
