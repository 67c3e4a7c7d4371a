"""The operator files in deploy/: nats-server accepts its configs, the 3-node cluster forms, the unit parses.

The configs are checked with the real nats-server next to this Python (`nats-server -t`), with their
JetStream store moved to a temporary folder and the client token given through the environment,
the way an operator runs them. The cluster configs are also started for real on free local ports.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import bcrypt
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
NATS_DIR = ROOT / "deploy" / "nats"
NATS_CONFIGS = sorted(NATS_DIR.glob("*.conf"))
CLUSTER_CONFIGS = [NATS_DIR / f"cluster-{node}.conf" for node in (1, 2, 3)]
UNIT_FILE = ROOT / "deploy" / "systemd" / "herder-service@.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "herder.env.example"
NATS_SERVER = Path(sys.executable).parent / "nats-server"
TOKEN_VARIABLE = "HERDER_NATS_TOKEN"

CLUSTER_DEADLINE_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def _variables(config: str) -> set[str]:
    """The `$NAME` references of a nats-server config, comments left out."""
    code = "\n".join(re.sub(r"(^|\s)(#|//).*$", "", line) for line in config.splitlines())
    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", code))


def _substitute(text: str, pattern: str, replacement: str | Callable[[re.Match[str]], str]) -> str:
    """`re.sub` over lines that must be there: a config that drifted fails loudly here."""
    result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count, f"no line matches {pattern!r}"
    return result


def _with_store_dir(config: str, store_dir: Path) -> str:
    return _substitute(config, r"^(\s*store_dir:\s*).*$", lambda m: m.group(1) + json.dumps(str(store_dir)))


def _token_value(token: str) -> str:
    """An environment value nats-server reads as a string (it parses the value as config text)."""
    return json.dumps(token)


def _bcrypt(token: str) -> str:
    return bcrypt.hashpw(token.encode(), bcrypt.gensalt(rounds=10)).decode()


def _check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _server_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
    env.update(extra)
    return env


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
@pytest.mark.parametrize("hashed", [False, True], ids=["plain-token", "bcrypt-token"])
def test_nats_config_is_valid(config_path: Path, hashed: bool, tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    config = tmp_path / config_path.name
    config.write_text(_with_store_dir(config_path.read_text(), tmp_path / "jetstream"))

    result = _check_config(config, _server_env(**{TOKEN_VARIABLE: _token_value(_bcrypt(token) if hashed else token)}))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("config_path", NATS_CONFIGS, ids=lambda path: path.name)
def test_nats_config_takes_its_token_from_the_environment(config_path: Path, tmp_path: Path) -> None:
    text = config_path.read_text()
    assert _variables(text) == {TOKEN_VARIABLE}
    assert re.search(r"authorization\s*\{[^}]*\btoken:\s*\$" + TOKEN_VARIABLE + r"\b", text)
    config = tmp_path / config_path.name
    config.write_text(_with_store_dir(text, tmp_path / "jetstream"))

    # Without the variable the server refuses the config rather than starting unauthenticated.
    result = _check_config(config, _server_env())

    assert result.returncode != 0
    assert TOKEN_VARIABLE in result.stdout + result.stderr


@pytest.mark.parametrize("config_path", NATS_CONFIGS, ids=lambda path: path.name)
def test_nats_config_ports_store_and_payload(config_path: Path) -> None:
    text = config_path.read_text()
    assert re.search(r"^port:\s*4222\s*$", text, re.MULTILINE)
    assert re.search(r"^http_port:\s*8222\s*$", text, re.MULTILINE)
    assert re.search(r"^max_payload:\s*1MB\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*store_dir:\s*\"/var/lib/herder/nats\"\s*$", text, re.MULTILINE)
    assert re.search(r"^jetstream\s*\{", text, re.MULTILINE)


@pytest.mark.parametrize("node", [1, 2, 3])
def test_cluster_config_names_its_node_and_routes_to_the_others(node: int) -> None:
    text = CLUSTER_CONFIGS[node - 1].read_text()
    assert re.search(rf"^server_name:\s*n{node}\s*$", text, re.MULTILINE)
    cluster = re.search(r"^cluster\s*\{(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert cluster is not None
    assert re.search(r"^\s*name:\s*herder\s*$", cluster.group(1), re.MULTILINE)
    assert re.search(r"^\s*port:\s*6222\s*$", cluster.group(1), re.MULTILINE)
    routes = set(re.findall(r"nats-route://(nats-\d):6222", cluster.group(1)))
    assert routes == {f"nats-{other}" for other in (1, 2, 3) if other != node}


# --- the 3-node cluster, started for real ------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    urls: list[str]  # client URLs, token included
    token: str
    logs: list[Path]

    def log_tail(self) -> str:
        parts = []
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            parts.append(f"--- {log.parent.name}\n" + "\n".join(lines[-15:]))
        return "\n".join(parts)


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


def _local_cluster_config(
    text: str, store_dir: Path, client_port: int, cluster_port: int, http_port: int, cluster_ports: list[int]
) -> str:
    text = _with_store_dir(text, store_dir)
    text = _substitute(text, r"^(\s*host:\s*).*$", r"\g<1>127.0.0.1")
    text = _substitute(text, r"^port:\s*4222\s*$", f"port: {client_port}")
    text = _substitute(text, r"^http_port:\s*8222\s*$", f"http_port: {http_port}")
    text = _substitute(text, r"^(\s+port:\s*)6222\s*$", rf"\g<1>{cluster_port}")
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The three cluster configs, run on free ports of 127.0.0.1 with temporary stores."""
    ports = _free_ports(9)
    client_ports, cluster_ports, http_ports = ports[0:3], ports[3:6], ports[6:9]
    token = secrets.token_hex(16)
    # The hashed form, as an operator would set it from `nats server passwd`.
    env = _server_env(**{TOKEN_VARIABLE: _token_value(_bcrypt(token))})
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for index, source in enumerate(CLUSTER_CONFIGS):
            folder = tmp_path / f"n{index + 1}"
            folder.mkdir()
            config = folder / source.name
            config.write_text(
                _local_cluster_config(
                    source.read_text(),
                    folder / "jetstream",
                    client_ports[index],
                    cluster_ports[index],
                    http_ports[index],
                    cluster_ports,
                )
            )
            log = folder / "nats-server.log"
            logs.append(log)
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(
                        [str(NATS_SERVER), "-c", str(config)],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    )
                )
        yield Cluster(
            urls=[f"nats://{token}@127.0.0.1:{port}" for port in client_ports],
            token=token,
            logs=logs,
        )
    finally:
        _stop(processes)
    assert all(process.returncode is not None for process in processes)


async def _until(deadline: float, attempt: Callable[[], Awaitable[T]], what: str, cluster: Cluster) -> T:
    """Retry `attempt` until it returns, on a short poll, failing with the server logs at the deadline."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await attempt()
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            if loop.time() >= deadline:
                pytest.fail(f"{what} within {CLUSTER_DEADLINE_S:g} s: {exc!r}\n{cluster.log_tail()}")
        await asyncio.sleep(0.1)


async def _quiet(_exc: Exception) -> None:
    """Connection errors while the servers come up are expected; the deadline reports them."""


async def _connect(cluster: Cluster, servers: list[str], deadline: float) -> NATS:
    """Connect once a server in `servers` accepts the token, retrying until the deadline."""
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(
            nats.connect(
                servers=servers,
                name="herder-deploy-test",
                connect_timeout=1,
                max_reconnect_attempts=-1,  # keep trying: the servers are still starting
                reconnect_time_wait=0.1,
                error_cb=_quiet,
            ),
            timeout=remaining,
        )
    except TimeoutError:
        pytest.fail(f"no node accepted the token within {CLUSTER_DEADLINE_S:g} s\n{cluster.log_tail()}")


async def test_cluster_configs_form_a_jetstream_cluster_with_r3_streams(cluster: Cluster) -> None:
    deadline = asyncio.get_running_loop().time() + CLUSTER_DEADLINE_S
    nc = await _connect(cluster, cluster.urls, deadline)
    try:
        assert nc.max_payload >= 1_000_000
        js = nc.jetstream(timeout=2)
        stream = StreamConfig(name="DEPLOY_R3", subjects=["deploy.r3.>"], num_replicas=3)

        info = await _until(deadline, lambda: js.add_stream(stream), "the cluster took no R3 stream", cluster)
        assert info.config.num_replicas == 3

        async def replicated() -> None:
            current = await js.stream_info("DEPLOY_R3")
            replicas = current.cluster.replicas if current.cluster else None
            if not (current.cluster and current.cluster.leader and replicas and len(replicas) == 2):
                raise nats.errors.Error("the stream has no leader and two replicas yet")
            if not all(replica.current for replica in replicas):
                raise nats.errors.Error("a replica is not current yet")
            assert {current.cluster.leader, *(replica.name for replica in replicas)} == {"n1", "n2", "n3"}

        await _until(deadline, replicated, "the R3 stream did not get three current copies", cluster)

        ack = await js.publish("deploy.r3.hello", b"hello", timeout=5)
        assert ack.stream == "DEPLOY_R3"
        assert ack.seq == 1
        account = await js.account_info()
        assert account.streams == 1
    finally:
        await nc.close()


async def test_cluster_refuses_a_wrong_token(cluster: Cluster) -> None:
    deadline = asyncio.get_running_loop().time() + CLUSTER_DEADLINE_S
    good = cluster.urls[0]
    # Wait for the node to accept its token, so that the refusal below is about the token.
    nc = await _connect(cluster, [good], deadline)
    await nc.close()

    intruder = NATS()
    try:
        with pytest.raises(nats.errors.Error) as refused:
            await intruder.connect(
                good.replace(cluster.token, secrets.token_hex(16)),
                connect_timeout=2,
                allow_reconnect=False,
                error_cb=_quiet,
            )
    finally:
        await intruder.close()  # a refused connect leaves its socket open otherwise
    assert "authorization violation" in str(refused.value).lower()


# --- systemd ------------------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    # systemd allows repeated keys (several Environment= lines): keep the last, as a plain INI reader would.
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT_FILE.read_text(), source=str(UNIT_FILE))
    return parser


def test_systemd_unit_parses_and_runs_the_instance_service() -> None:
    unit = _unit()

    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert "herder service run %i" in service["ExecStart"]
    assert service["ExecStart"].split()[0].endswith("/herder")
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


def test_env_example_documents_the_variables_without_secrets() -> None:
    text = ENV_EXAMPLE.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )

    assert {"HERDER_URL", "HERDER_DB"} <= settings.keys()
    assert "CHANGE-ME" in settings["HERDER_URL"]
    assert "CHANGE-ME" in settings["HERDER_DB"]
