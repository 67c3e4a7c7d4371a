"""The operator files in deploy/: nats-server accepts its configs, the fenced 3-node cluster forms over
TLS and keeps the fence across its nodes, the systemd files say what deploy/README.md says.

Each config is set up the way deploy/README.md tells an operator to, in a temporary folder: the
stack's service credential (`herder fence init`), the `auth.conf` each config includes, made from it
(`herder fence server-config`), and the stack's CA with a server certificate for 127.0.0.1 and
localhost (`herder fence tls`); the configs' paths are pointed there, and their ports at free local
ones. Then the real nats-server checks them (`nats-server -t`) and runs them.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from herder.client.connection import Credentials, CredentialsRefused, connect
from herder.client.requests import Client
from herder.client.tls import client_context
from herder.protocol.auth import PrincipalKind, Role, TokenCreate, TokenRevoke, WhoAmI
from herder.protocol.registry import RobotAdd, RobotRemove, RobotType
from herder.services.auth.service import AuthService
from herder.services.common.bus import JetStreamSettings
from herder.services.common.certificates import ensure_ca, ensure_server_certificate
from herder.services.common.credentials import AUTH_TIMEOUT_S, ServiceCredential, server_config
from herder.services.common.host import HostConfig, ServiceHost
from herder.services.registry.service import RegistryService
from tests.support import eventually, migrated

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
NATS_DIR = ROOT / "deploy" / "nats"
NATS_CONFIGS = sorted(NATS_DIR.glob("*.conf"))
SINGLE_CONFIG = NATS_DIR / "single.conf"
CLUSTER_CONFIGS = [NATS_DIR / f"cluster-{node}.conf" for node in (1, 2, 3)]
UNIT_FILE = ROOT / "deploy" / "systemd" / "herder-service@.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "herder.env.example"
README = ROOT / "deploy" / "README.md"
NATS_SERVER = Path(sys.executable).parent / "nats-server"

# Where the configs expect the stack's files on a NATS node (deploy/README.md).
FENCE_FILE = "auth.conf"
TLS_DIR = "/etc/herder/tls"
CA_FILE = f"{TLS_DIR}/ca.crt"
SERVER_CERT = f"{TLS_DIR}/server.crt"
SERVER_KEY = f"{TLS_DIR}/server.key"
STORE_DIR = "/var/lib/herder/nats"

START_DEADLINE_S = 30.0
STOP_TIMEOUT_S = 10.0
# How long a revoked token's or removed robot's connection may stay on the bus (docs/security.md).
DISCONNECT_WITHIN_S = 5.0
# The server answers a refused client once its auth timeout has passed; this much slack on top.
REFUSAL_SLACK_S = 1.5
HTTP_TIMEOUT_S = 1.0
_PR_SET_PDEATHSIG = 1


# --- the stack's fence and certificates, as an operator makes them ------------------------------------


@dataclass(frozen=True)
class Fence:
    """What `herder fence init` and `herder fence tls` make: the service credential, the CA and the
    nodes' certificate."""

    credential: ServiceCredential
    tls_dir: Path
    ca_pem: str


@pytest.fixture
def fence(tmp_path: Path) -> Fence:
    """A stack's service credential, CA and server certificate (for 127.0.0.1 and localhost)."""
    credential_file = tmp_path / "service-credential.json"
    ServiceCredential.generate().write(credential_file)
    tls_dir = tmp_path / "tls"
    ca = ensure_ca(tls_dir)
    ensure_server_certificate(tls_dir, ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    # Read back as the services read it: the file is what travels to their machines.
    return Fence(credential=ServiceCredential.read(credential_file), tls_dir=tls_dir, ca_pem=ca.pem)


def _code(config: str) -> str:
    """A nats-server config without its comments."""
    return "\n".join(re.sub(r"(^|\s)(#|//).*$", "", line) for line in config.splitlines())


def _variables(config: str) -> set[str]:
    """The `$NAME` references of a nats-server config, comments left out."""
    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", _code(config)))


def _block(config: str, name: str) -> str:
    """The body of a top-level block (`name { ... }` whose closing brace starts a line)."""
    found = re.search(rf"^{name}\s*\{{(.*?)^\}}", _code(config), re.MULTILINE | re.DOTALL)
    assert found is not None, f"no top-level {name} block"
    return found.group(1)


def _substitute(text: str, pattern: str, replacement: str | Callable[[re.Match[str]], str]) -> str:
    """`re.sub` over lines that must be there: a config that drifted fails loudly here."""
    result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count, f"no line matches {pattern!r}"
    return result


def _with_store_dir(config: str, store_dir: Path) -> str:
    return _substitute(config, r"^(\s*store_dir:\s*).*$", lambda m: m.group(1) + json.dumps(str(store_dir)))


def _with_tls_dir(config: str, tls_dir: Path) -> str:
    """The config with its certificate files taken from `tls_dir` instead of /etc/herder/tls."""
    return _substitute(
        config,
        r'^(\s*(?:cert_file|key_file|ca_file):\s*)"/etc/herder/tls/([^"/]+)"\s*$',
        lambda m: m.group(1) + json.dumps(str(tls_dir / m.group(2))),
    )


def _install(folder: Path, name: str, config: str, fence: Fence | None) -> Path:
    """Write a node's config into `folder`, and beside it the fence it includes (unless None), made
    from the credential as `herder fence server-config --out auth.conf` makes it."""
    folder.mkdir(parents=True, exist_ok=True)
    if fence is not None:
        (folder / FENCE_FILE).write_text(server_config(fence.credential))
        (folder / FENCE_FILE).chmod(0o600)
    path = folder / name
    path.write_text(config)
    return path


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    # From another folder: nats-server must find the include beside the config, not in its cwd.
    return subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(path)],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- nats-server configs: syntax and contents --------------------------------------------------------


def test_deploy_ships_single_and_cluster_configs() -> None:
    assert NATS_SERVER.is_file(), f"no nats-server next to {sys.executable}"
    assert [path.name for path in NATS_CONFIGS] == [
        "cluster-1.conf",
        "cluster-2.conf",
        "cluster-3.conf",
        "single.conf",
    ]


@pytest.mark.parametrize("config_path", NATS_CONFIGS, ids=lambda path: path.name)
def test_nats_config_is_valid_with_the_fence_and_certificates(config_path: Path, fence: Fence, tmp_path: Path) -> None:
    text = _with_tls_dir(_with_store_dir(config_path.read_text(), tmp_path / "jetstream"), fence.tls_dir)
    config = _install(tmp_path / "node", config_path.name, text, fence)

    result = _check_config(config)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("missing", [FENCE_FILE, "server.key"])
@pytest.mark.parametrize("config_path", NATS_CONFIGS, ids=lambda path: path.name)
def test_nats_config_refuses_to_start_without_the_fence_or_its_certificate(
    config_path: Path, missing: str, fence: Fence, tmp_path: Path
) -> None:
    text = _with_tls_dir(_with_store_dir(config_path.read_text(), tmp_path / "jetstream"), fence.tls_dir)
    config = _install(tmp_path / "node", config_path.name, text, fence)
    (config.parent / missing if missing == FENCE_FILE else fence.tls_dir / missing).unlink()

    result = _check_config(config)

    # The server never comes up unfenced or in plain text because a file was forgotten.
    assert result.returncode != 0
    assert missing in result.stdout + result.stderr


@pytest.mark.parametrize("config_path", NATS_CONFIGS, ids=lambda path: path.name)
def test_nats_config_includes_the_fence_and_holds_no_credentials(config_path: Path) -> None:
    code = _code(config_path.read_text())
    assert re.search(r'^include\s+"auth\.conf"\s*$', code, re.MULTILINE)
    # The fence lives in auth.conf alone: no shared token, user or variable is left in the file.
    assert _variables(code) == set()
    assert not re.search(r"^\s*(authorization|accounts|token|user|password)\b", code, re.MULTILINE)


@pytest.mark.parametrize("config_path", NATS_CONFIGS, ids=lambda path: path.name)
def test_nats_config_ports_store_payload_and_client_tls(config_path: Path) -> None:
    text = config_path.read_text()
    assert re.search(r"^port:\s*4222\s*$", text, re.MULTILINE)
    assert re.search(r'^http:\s*"127\.0\.0\.1:8222"\s*$', text, re.MULTILINE)  # monitoring on loopback
    assert re.search(r"^max_payload:\s*1MB\s*$", text, re.MULTILINE)
    assert re.search(rf'^\s*store_dir:\s*"{STORE_DIR}"\s*$', _block(text, "jetstream"), re.MULTILINE)
    tls = _block(text, "tls")
    assert re.search(rf'^\s*cert_file:\s*"{SERVER_CERT}"\s*$', tls, re.MULTILINE)
    assert re.search(rf'^\s*key_file:\s*"{SERVER_KEY}"\s*$', tls, re.MULTILINE)


@pytest.mark.parametrize("node", [1, 2, 3])
def test_cluster_config_names_its_node_and_routes_to_the_others_over_mutual_tls(node: int) -> None:
    text = CLUSTER_CONFIGS[node - 1].read_text()
    assert re.search(rf"^server_name:\s*n{node}\s*$", text, re.MULTILINE)
    cluster = _block(text, "cluster")
    assert re.search(r"^\s*name:\s*herder\s*$", cluster, re.MULTILINE)
    assert re.search(r"^\s*port:\s*6222\s*$", cluster, re.MULTILINE)
    routes = set(re.findall(r"nats-route://(nats-\d):6222", cluster))
    assert routes == {f"nats-{other}" for other in (1, 2, 3) if other != node}
    tls = re.search(r"^\s*tls\s*\{(.*?)\}", cluster, re.MULTILINE | re.DOTALL)
    assert tls is not None, "the cluster routes have no tls block"
    assert re.search(rf'^\s*cert_file:\s*"{SERVER_CERT}"\s*$', tls.group(1), re.MULTILINE)
    assert re.search(rf'^\s*key_file:\s*"{SERVER_KEY}"\s*$', tls.group(1), re.MULTILINE)
    assert re.search(rf'^\s*ca_file:\s*"{CA_FILE}"\s*$', tls.group(1), re.MULTILINE)
    assert re.search(r"^\s*verify:\s*true\s*$", tls.group(1), re.MULTILINE)


# --- the configs, started for real --------------------------------------------------------------------


@dataclass(frozen=True)
class Nodes:
    """Running nats-servers of one deploy config each, on free ports of 127.0.0.1, with the stack's fence."""

    fence: Fence
    client_ports: list[int]
    http_ports: list[int]
    logs: list[Path]

    @property
    def urls(self) -> list[str]:
        """The nodes' client URLs, over TLS."""
        return [f"tls://127.0.0.1:{port}" for port in self.client_ports]

    def log_tail(self) -> str:
        """The last lines of each node's log, for a failure message."""
        parts = []
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            parts.append(f"--- {log.parent.name}\n" + "\n".join(lines[-15:]))
        return "\n".join(parts)

    async def until(self, deadline: float, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Retry `attempt` on a short poll until it returns; fail with the servers' logs at the deadline."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await attempt()
            except (OSError, TimeoutError, nats.errors.Error, AssertionError) as exc:
                if loop.time() >= deadline:
                    pytest.fail(f"{what} within {START_DEADLINE_S:g} s: {exc!r}\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def healthy(self) -> None:
        """Wait until every node's /healthz says it is up with JetStream (the cluster has a meta leader)."""
        deadline = asyncio.get_running_loop().time() + START_DEADLINE_S

        async def all_healthy() -> None:
            statuses = await asyncio.gather(*(asyncio.to_thread(_healthz, port) for port in self.http_ports))
            assert all(status == "ok" for status in statuses), statuses

        await self.until(deadline, all_healthy, "the nodes did not report healthy")


def _healthz(http_port: int) -> str:
    """What a node's monitoring endpoint says of its health ("ok", or why not)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=HTTP_TIMEOUT_S) as answer:
            return str(json.load(answer).get("status"))
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.read(200).decode(errors="replace")


def _varz(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/varz", timeout=HTTP_TIMEOUT_S) as answer:
        varz: dict[str, Any] = json.load(answer)
    return varz


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _local_config(text: str, folder: Path, fence: Fence, client_port: int, http_port: int) -> str:
    """A deploy config pointed at `folder` and the fence's certificates, on loopback and free ports."""
    text = _with_tls_dir(_with_store_dir(text, folder / "jetstream"), fence.tls_dir)
    text = _substitute(text, r"^(\s*host:\s*).*$", r"\g<1>127.0.0.1")
    text = _substitute(text, r"^port:\s*4222\s*$", f"port: {client_port}")
    return _substitute(text, r'^http:\s*"127\.0\.0\.1:8222"\s*$', f'http: "127.0.0.1:{http_port}"')


def _local_cluster_config(
    text: str, folder: Path, fence: Fence, client_port: int, http_port: int, cluster_ports: list[int], node: int
) -> str:
    text = _local_config(text, folder, fence, client_port, http_port)
    text = _substitute(text, r"^(\s+port:\s*)6222\s*$", rf"\g<1>{cluster_ports[node]}")
    # Routes dial 127.0.0.1, which the certificate names, so the nodes' mutual TLS checks out.
    return _substitute(
        text,
        r"nats-route://nats-(\d):6222",
        lambda m: f"nats-route://127.0.0.1:{cluster_ports[int(m.group(1)) - 1]}",
    )


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM should pytest die without tearing down, so none is left behind.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _running(configs: list[Path]) -> Iterator[list[Path]]:
    """Start a nats-server on each config at once; yield their log files; stop them all after."""
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for config in configs:
            log = config.parent / "nats-server.log"
            logs.append(log)
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(
                        [str(NATS_SERVER), "-c", str(config)],
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    )
                )
        yield logs
    finally:
        _stop(processes)
    assert all(process.returncode is not None for process in processes)


@pytest.fixture
def single(tmp_path: Path, fence: Fence) -> Iterator[Nodes]:
    """single.conf, run on free ports of 127.0.0.1 with a temporary store."""
    client_port, http_port = _free_ports(2)
    folder = tmp_path / "single"
    text = _local_config(SINGLE_CONFIG.read_text(), folder, fence, client_port, http_port)
    config = _install(folder, SINGLE_CONFIG.name, text, fence)
    with _running([config]) as logs:
        yield Nodes(fence=fence, client_ports=[client_port], http_ports=[http_port], logs=logs)


@pytest.fixture
def cluster(tmp_path: Path, fence: Fence) -> Iterator[Nodes]:
    """The three cluster configs, run on free ports of 127.0.0.1 with temporary stores."""
    ports = _free_ports(9)
    client_ports, cluster_ports, http_ports = ports[0:3], ports[3:6], ports[6:9]
    configs = []
    for index, source in enumerate(CLUSTER_CONFIGS):
        folder = tmp_path / f"n{index + 1}"
        text = _local_cluster_config(
            source.read_text(), folder, fence, client_ports[index], http_ports[index], cluster_ports, index
        )
        # Each node gets its own auth.conf, as each operator runs `herder fence server-config` there.
        configs.append(_install(folder, source.name, text, fence))
    with _running(configs) as logs:
        yield Nodes(fence=fence, client_ports=client_ports, http_ports=http_ports, logs=logs)


async def _quiet(_exc: Exception) -> None:
    """Connection errors while the servers come up are expected; the deadline reports them."""


async def _connect_as_service(nodes: Nodes, deadline: float) -> NATS:
    """A service connection over TLS, once a node accepts it, retrying until the deadline."""
    credential = nodes.fence.credential
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(
            nats.connect(
                servers=nodes.urls,
                name="herder-deploy-test",
                user=credential.service.user,
                password=credential.service.password,
                tls=client_context(nodes.fence.ca_pem),
                connect_timeout=1,
                max_reconnect_attempts=-1,  # keep trying: the servers are still starting
                reconnect_time_wait=0.1,
                error_cb=_quiet,
            ),
            timeout=remaining,
        )
    except TimeoutError:
        pytest.fail(f"no node accepted the service credential within {START_DEADLINE_S:g} s\n{nodes.log_tail()}")


async def _refuses_plain_tcp(port: int) -> None:
    """A client that speaks plain NATS, with the service's own password even, gets nowhere on `port`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        info = json.loads((await asyncio.wait_for(reader.readline(), 5)).removeprefix(b"INFO "))
        assert info["tls_required"] is True
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"user":"herder-service","pass":"x"}\r\nPING\r\n')
        await writer.drain()
        # The server reads those bytes as a broken TLS handshake and hangs up: no PONG, ever.
        answer = await asyncio.wait_for(reader.read(), 5)
        assert b"PONG" not in answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_single_config_serves_tls_and_jetstream_behind_the_fence(single: Nodes) -> None:
    deadline = asyncio.get_running_loop().time() + START_DEADLINE_S
    nc = await _connect_as_service(single, deadline)
    try:
        assert nc.max_payload >= 1_000_000
        assert nc._server_info.get("auth_required") is True
        account = await nc.jetstream(timeout=2).account_info()
        assert account.streams == 0
    finally:
        await nc.close()
    await _refuses_plain_tcp(single.client_ports[0])


async def test_cluster_configs_form_a_jetstream_cluster_over_tls_with_r3_streams(cluster: Nodes) -> None:
    deadline = asyncio.get_running_loop().time() + START_DEADLINE_S
    nc = await _connect_as_service(cluster, deadline)
    try:
        assert nc.max_payload >= 1_000_000
        js = nc.jetstream(timeout=2)
        stream = StreamConfig(name="DEPLOY_R3", subjects=["deploy.r3.>"], num_replicas=3)

        info = await cluster.until(deadline, lambda: js.add_stream(stream), "the cluster took no R3 stream")
        assert info.config.num_replicas == 3

        async def replicated() -> None:
            current = await js.stream_info("DEPLOY_R3")
            replicas = current.cluster.replicas if current.cluster else None
            if not (current.cluster and current.cluster.leader and replicas and len(replicas) == 2):
                raise nats.errors.Error("the stream has no leader and two replicas yet")
            if not all(replica.current for replica in replicas):
                raise nats.errors.Error("a replica is not current yet")
            assert {current.cluster.leader, *(replica.name for replica in replicas)} == {"n1", "n2", "n3"}

        await cluster.until(deadline, replicated, "the R3 stream did not get three current copies")

        ack = await js.publish("deploy.r3.hello", b"hello", timeout=5)
        assert ack.stream == "DEPLOY_R3"
        assert ack.seq == 1
        account = await js.account_info()
        assert account.streams == 1
    finally:
        await nc.close()
    # The routes that carried all this insist on a certificate of the stack's CA from each peer.
    for port in cluster.http_ports:
        routes = (await asyncio.to_thread(_varz, port))["cluster"]
        assert routes["tls_required"] is True
        assert routes["tls_verify"] is True


async def test_cluster_refuses_plain_tcp_and_a_made_up_token(cluster: Nodes) -> None:
    await cluster.healthy()
    await asyncio.gather(*(_refuses_plain_tcp(port) for port in cluster.client_ports))

    # No auth service runs: the callout goes unanswered, and the server refuses the client when its
    # auth timeout (in auth.conf) has passed, rather than hanging.
    started = time.monotonic()
    with pytest.raises(CredentialsRefused):
        await connect(
            cluster.urls[1],
            name="intruder",
            credentials=Credentials(token="hd_made-up-token"),
            ca_pem=cluster.fence.ca_pem,
            max_reconnect_attempts=0,
        )
    assert time.monotonic() - started < AUTH_TIMEOUT_S + REFUSAL_SLACK_S


# --- the fence across the cluster: herder's auth and registry services on it --------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database for the services (the fence does not depend on the database)."""
    return migrated(f"sqlite:///{tmp_path / 'herder.db'}")


@dataclass(frozen=True)
class FencedCluster:
    """The cluster with herder's auth and registry services on it, and its first admin token."""

    nodes: Nodes
    host: ServiceHost
    admin_token: str

    @property
    def auth(self) -> AuthService:
        """The auth service instance."""
        service = self.host.services["auth"]
        assert isinstance(service, AuthService)
        return service

    async def connect(self, node: int, token: str, name: str) -> NATS:
        """A connection with `token` to node `node` (0-based) alone, over TLS, through the callout."""
        return await connect(
            self.nodes.urls[node], name=name, credentials=Credentials(token=token), ca_pem=self.nodes.fence.ca_pem
        )


@pytest.fixture
async def fenced(cluster: Nodes, sqlite_url: str, tmp_path: Path) -> AsyncIterator[FencedCluster]:
    """auth and registry on the cluster (all three URLs, R3 assets), bootstrapped as `herder service run
    auth registry` does."""
    await cluster.healthy()
    host = ServiceHost(
        HostConfig(
            nats_url=",".join(cluster.urls),
            db_url=sqlite_url,
            services=(AuthService, RegistryService),
            credential=cluster.fence.credential,
            ca_pem=cluster.fence.ca_pem,
            data_dir=tmp_path,
            jetstream=JetStreamSettings(replicas=3),
            migrate=False,
        )
    )
    await host.start()
    try:
        auth = host.services["auth"]
        assert isinstance(auth, AuthService)
        admin = await auth.bootstrap_admin(None, may_rotate=False)
        assert admin is not None
        yield FencedCluster(nodes=cluster, host=host, admin_token=admin)
    finally:
        await host.stop()


def _node_of(nodes: Nodes, nc: NATS) -> int:
    """Which node (0-based) a connection is on."""
    url = nc.connected_url
    assert url is not None and url.port is not None
    return nodes.client_ports.index(url.port)


async def _disconnected(nc: NATS, since: float) -> None:
    """Wait for the server to close `nc`, at most DISCONNECT_WITHIN_S after `since`; fail if it stays."""
    await eventually(lambda: not nc.is_connected, timeout=DISCONNECT_WITHIN_S)
    assert time.monotonic() - since < DISCONNECT_WITHIN_S


async def test_the_fence_holds_on_every_node_of_the_cluster(fenced: FencedCluster) -> None:
    """Tokens are admitted on every node, and a removed robot's or revoked token's connection is closed
    on whichever node it is: the auth service finds it through the system account and has that server
    close it. nats-py picks one of the three URLs at random, so the robot and the token go where the
    auth service is not (the robot on node 3, the token on node 2, when it is elsewhere)."""
    nodes = fenced.nodes
    admins = await asyncio.gather(*(fenced.connect(node, fenced.admin_token, f"admin-{node}") for node in range(3)))
    try:
        # Admitted on every node, wherever the auth service listens: the callout crosses the routes.
        for node, nc in enumerate(admins):
            assert _node_of(nodes, nc) == node
        principals = await asyncio.gather(*(Client(nc, token=fenced.admin_token).request(WhoAmI()) for nc in admins))
        assert {(principal.kind, principal.role) for principal in principals} == {(PrincipalKind.TOKEN, Role.ADMIN)}

        # Put the robot and the token on nodes other than the one the auth service closes connections
        # through (its system connection), so that the close must reach another server.
        assert fenced.host.nc is not None
        system_node = _node_of(nodes, fenced.auth._system)
        service_node = _node_of(nodes, fenced.host.nc)
        free = [node for node in (2, 1, 0) if node not in (system_node, service_node)]
        robot_node = free[0]
        token_node = next(node for node in (1, 2, 0) if node not in (system_node, robot_node))
        admin = Client(admins[0], token=fenced.admin_token, timeout=10.0)

        added = await admin.request(RobotAdd(name="r3", type=RobotType.UNATTENDED, host="box1"))
        robot = await fenced.connect(robot_node, added.token, "robot-r3")
        created = await admin.request(TokenCreate(name="ci", role=Role.INTEGRATOR))
        integrator = await fenced.connect(token_node, created.secret, "integrator")
        try:
            assert robot.is_connected
            assert _node_of(nodes, robot) == robot_node
            assert (await Client(integrator, token=created.secret).request(WhoAmI())).name == "ci"
            assert _node_of(nodes, integrator) == token_node

            removed_at = time.monotonic()
            await admin.request(RobotRemove(name="r3"))
            await _disconnected(robot, removed_at)
            revoked_at = time.monotonic()
            await admin.request(TokenRevoke(name="ci"))
            await _disconnected(integrator, revoked_at)
        finally:
            await robot.close()
            await integrator.close()

        # And they stay off: every node refuses them now.
        for node in range(3):
            for token in (added.token, created.secret):
                with pytest.raises(CredentialsRefused):
                    await fenced.connect(node, token, "comeback")
    finally:
        for nc in admins:
            await nc.close()


# --- systemd ------------------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    # systemd allows repeated keys (several Environment= lines): keep the last, as a plain INI reader would.
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT_FILE.read_text(), source=str(UNIT_FILE))
    return parser


def test_systemd_unit_parses_and_runs_the_instance_services() -> None:
    unit = _unit()

    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    command = service["ExecStart"].split()
    assert command[0].endswith("/herder")
    assert command[1:4] == ["service", "run", "$HERDER_SERVICES"]
    assert "--no-migrate" in command
    assert "$HERDER_OPTIONS" in command
    # The instance name is the services to run, unescaped: `herder-service@auth.service`, or several
    # (`systemd-escape 'auth registry'`) split at spaces by the unbraced $HERDER_SERVICES.
    assert re.search(r'^Environment="HERDER_SERVICES=%I"$', UNIT_FILE.read_text(), re.MULTILINE)
    assert service["EnvironmentFile"] == "/etc/herder/herder.env"
    assert service["User"] == "herder"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "30"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/herder" in service["ReadWritePaths"].split()
    assert service["PrivateTmp"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def _settings(text: str) -> dict[str, str]:
    """The assignments of an environment file, commented-out examples included when `text` is uncommented."""
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def test_env_example_documents_the_variables_without_secrets() -> None:
    text = ENV_EXAMPLE.read_text()
    settings = _settings(text)

    assert {"HERDER_URL", "HERDER_DB", "HERDER_SERVICE_CREDENTIAL", "HERDER_CA_FILE", "HERDER_OPTIONS"} <= set(settings)
    assert settings["HERDER_SERVICE_CREDENTIAL"] == "/etc/herder/service-credential.json"
    assert settings["HERDER_CA_FILE"] == "/etc/herder/tls/ca.crt"
    assert "CHANGE-ME" in settings["HERDER_DB"]
    # No secret is in the example: the NATS side takes none (services hold the credential file),
    # and the only password, the database's, is a placeholder.
    assert "@" not in settings["HERDER_URL"]
    assert not re.search(r"token|password", settings["HERDER_URL"], re.IGNORECASE)


def test_env_example_on_a_cluster_lists_three_tls_nodes_and_three_replicas() -> None:
    # The cluster's settings are commented out in the example; an operator uncomments them.
    cluster = _settings(re.sub(r"^#(HERDER_\w+=)", r"\1", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))

    urls = cluster["HERDER_URL"].split(",")
    assert urls == ["tls://nats-1:4222", "tls://nats-2:4222", "tls://nats-3:4222"]
    assert "--stream-replicas 3" in cluster["HERDER_OPTIONS"]


def test_the_unit_and_the_example_give_options_herder_service_run_has() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "herder.cli.app", "service", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    known = set(re.findall(r"--[a-z][a-z-]+", result.stdout))
    assert {"--stream-replicas", "--no-migrate", "--credential", "--ca-file"} <= known  # the help was read
    example = re.sub(r"^#(HERDER_\w+=)", r"\1", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    given = [_unit()["Service"]["ExecStart"], *re.findall(r"^HERDER_OPTIONS=(.*)$", example, re.MULTILINE)]
    used = {option for line in given for option in re.findall(r"--[a-z][a-z-]+", line)}
    assert used, "no options found"
    assert used <= known, f"not options of 'herder service run': {sorted(used - known)}"
