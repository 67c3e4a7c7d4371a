"""Connecting to NATS and preparing JetStream."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from herder.client.connection import Credentials, CredentialsRefused, connect, display_nats_url, sync
from herder.client.errors import SetupError
from herder.protocol import subjects
from herder.services.common.bus import JetStreamSettings, ensure_bucket, ensure_event_stream
from herder.services.common.credentials import ServiceCredential
from herder.services.common.natsserver import EmbeddedNats

ANYONE = Credentials(token="hd_whoever")


async def test_an_unreachable_server_is_one_clear_line() -> None:
    with pytest.raises(SetupError, match=r"cannot reach NATS at nats://127\.0\.0\.1:1: connection refused"):
        await connect("nats://127.0.0.1:1", name="test", credentials=ANYONE)


async def test_a_cluster_url_skips_a_server_that_is_down(nats_url: str, credential: ServiceCredential) -> None:
    nc = await connect(f"nats://127.0.0.1:1,{nats_url}", name="test", credentials=credential.service)
    try:
        assert nc.is_connected
    finally:
        await nc.close()


async def test_every_server_down_is_one_clear_line() -> None:
    with pytest.raises(SetupError, match="connection refused"):
        await connect("nats://127.0.0.1:1,nats://127.0.0.1:2", name="test", credentials=ANYONE)


@pytest.mark.parametrize("url", ["http://localhost:4222", "nats://"])
async def test_a_bad_url_says_how_to_write_one(url: str) -> None:
    with pytest.raises(SetupError, match="nats://HOST:PORT"):
        await connect(url, name="test", credentials=ANYONE)


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


async def test_the_server_is_fenced_from_the_start(tmp_path: Path) -> None:
    """The embedded server admits the services' credential and refuses anyone else (no auth service
    runs here to vouch for a token), every time; its config holds no secret in the clear."""
    credential = ServiceCredential.generate()
    server = EmbeddedNats(tmp_path / "nats", credential=credential)
    server.start()
    try:
        config = (tmp_path / "nats" / "nats-server.conf").read_text()
        for secret in (credential.service_password, credential.system_password, credential.issuer_seed):
            assert secret not in config  # bcrypt hashes and public keys only
        for _ in range(5):  # the refusal is named every time, however the server closes the socket
            with pytest.raises(CredentialsRefused):
                await connect(server.url, name="stranger", credentials=ANYONE, max_reconnect_attempts=0)
            with pytest.raises(CredentialsRefused):
                await connect(server.url, name="guesser", credentials=Credentials(user="herder-service", password="no"))
        nc = await connect(server.url, name="service", credentials=credential.service)
        assert nc.is_connected
        await nc.close()
    finally:
        server.stop()
    assert server.pid is None


async def test_after_sync_another_connection_finds_new_subscriptions(
    nc: NATS, nats_url: str, credential: ServiceCredential
) -> None:
    """A responder is reachable as soon as `sync` returns, from any connection."""
    caller = await connect(nats_url, name="caller", credentials=credential.service)
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
