"""A stack beyond loopback: TLS with the stack's own CA, bundles, and plain TCP only when asked for."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import nats
import pytest

from herder.client.bundle import read_bundle
from herder.client.connection import Credentials, TlsRefused, connect
from herder.services.common.certificates import ensure_ca
from tests.e2e.harness import herder, running_up

pytestmark = pytest.mark.e2e

# Nothing of the developer's own stack may leak into these commands.
_FOREIGN = ("HERDER_DATA_DIR", "HERDER_URL", "HERDER_TOKEN", "HERDER_BUNDLE", "HERDER_CA_FILE")


def _clean(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN}
    return {**env, **extra}


async def _plain_client_is_refused(port: int, token: str) -> None:
    """A client that speaks plain NATS to the TLS port gets nowhere."""
    refused = False
    try:
        nc = await nats.connect(
            f"nats://127.0.0.1:{port}", token=token, connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=0
        )
    except Exception:
        refused = True
    else:
        await nc.close()
    assert refused, "a client without TLS was let in"


async def _client_without_the_ca_is_refused(url: str, token: str, other_ca: str) -> None:
    with pytest.raises(TlsRefused, match="not one the given CA signed"):
        await connect(url, name="stranger", credentials=Credentials(token=token), ca_pem=other_ca)


def test_beyond_loopback_the_stack_serves_tls_and_a_bundle_is_all_a_client_needs(tmp_path: Path) -> None:
    with running_up(tmp_path, "--listen", "0.0.0.0", "--advertise", "127.0.0.1") as stack:
        home = _clean(HERDER_DATA_DIR=str(stack.data_dir))
        context = json.loads((stack.data_dir / "context.json").read_text())
        ca_file = Path(context["ca_file"])
        assert context["nats_url"].startswith("tls://")
        assert context["advertised_urls"][0].startswith("tls://127.0.0.1:")
        for key in ("ca.key", "server.key"):
            assert (ca_file.parent / key).stat().st_mode & 0o777 == 0o600
        status = herder("status", env=home)
        assert status.returncode == 0, status.stderr

        bundle = tmp_path / "ops.bundle"
        made = herder("token", "create", "ops", "--bundle", str(bundle), env=home)
        assert made.returncode == 0, made.stderr
        assert bundle.stat().st_mode & 0o777 == 0o600
        found = read_bundle(bundle)
        assert found.ca_pem == ca_file.read_text()
        assert found.token not in made.stdout + made.stderr

        # Another machine has the bundle alone: no data folder, no token given.
        me = herder("whoami", "--bundle", str(bundle), "--json", env=_clean())
        assert me.returncode == 0, me.stderr
        assert json.loads(me.stdout)["name"] == "ops"

        url = found.urls[0]
        port = int(url.rsplit(":", 1)[1])
        asyncio.run(_client_without_the_ca_is_refused(url, found.token, ensure_ca(tmp_path / "other-ca").pem))
        asyncio.run(_plain_client_is_refused(port, found.token))


def test_plain_tcp_beyond_loopback_needs_insecure_and_says_so(tmp_path: Path) -> None:
    with running_up(tmp_path, "--listen", "0.0.0.0", "--insecure") as stack:
        assert "warning: serving plain TCP on 0.0.0.0 (--insecure)" in stack.log.read_text()
        context = json.loads((stack.data_dir / "context.json").read_text())
        assert context["nats_url"].startswith("nats://")
        assert "ca_file" not in context
        assert herder("status", env=_clean(HERDER_DATA_DIR=str(stack.data_dir))).returncode == 0
