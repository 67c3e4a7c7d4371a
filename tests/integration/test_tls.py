"""The stack's own CA and server certificate, proven against a real nats-server that requires TLS."""

from __future__ import annotations

import json
import re
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from herder.client.errors import SetupError
from herder.client.tls import client_context, read_ca_file
from herder.services.common.certificates import (
    CA_VALIDITY_DAYS,
    CertificateAuthority,
    ServerCertificate,
    ensure_ca,
    ensure_server_certificate,
    local_names,
)
from herder.services.common.natsserver import server_binary
from tests.support import wait_until

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="file modes are POSIX")
CONNECT_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 10.0


def mode_of(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


def serial(path: Path) -> int:
    """The serial number of the certificate in `path`."""
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """A fresh CA in this test's folder."""
    return ensure_ca(tmp_path / "tls")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    """Another stack's CA."""
    return ensure_ca(tmp_path / "other-tls")


@contextmanager
def tls_nats(folder: Path, server: ServerCertificate) -> Iterator[int]:
    """A nats-server on 127.0.0.1 that requires TLS with `server`'s certificate; yields its port."""
    ports_dir = folder / "ports"
    ports_dir.mkdir(parents=True)
    config = folder / "nats-server.conf"
    config.write_text(
        "\n".join(
            [
                'host: "127.0.0.1"',
                "port: -1",
                f"ports_file_dir: {json.dumps(str(ports_dir))}",
                "tls {",
                f"  cert_file: {json.dumps(str(server.cert_file))}",
                f"  key_file: {json.dumps(str(server.key_file))}",
                "}",
            ]
        )
        + "\n"
    )
    log_file = folder / "nats-server.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [str(server_binary()), "-c", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:

        def port() -> int | None:
            assert process.poll() is None, f"nats-server exited: {log_file.read_text()}"
            for ports_file in ports_dir.glob("*.ports"):
                try:
                    url: str = json.loads(ports_file.read_text())["nats"][0]
                except (ValueError, KeyError, IndexError):
                    continue  # half written
                assert url.startswith("tls://"), url
                number = int(url.rsplit(":", 1)[1])
                return number if greeting(number) else None
            return None

        ready = wait_until(port)
        assert ready is not None
        yield ready
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def greeting(port: int) -> dict[str, object] | None:
    """The INFO a NATS server on `port` greets a TCP client with, before any TLS."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as sock:
            line = sock.makefile("rb").readline()
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    info: dict[str, object] = json.loads(line[5:])
    return info


async def connect(url: str, context: ssl.SSLContext | None, *, tls_hostname: str | None = None) -> NATS:
    """One attempt at a connection, no retries: the first error is raised."""

    async def quiet(exc: Exception) -> None:
        pass  # the test looks at the raised error; nats-py's own report would only repeat it

    options: dict[str, object] = {"tls": context} if context else {}
    if tls_hostname:
        options["tls_hostname"] = tls_hostname
    return await nats.connect(
        url,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=CONNECT_TIMEOUT_S,
        error_cb=quiet,
        **options,
    )


async def round_trip(nc: NATS) -> None:
    """A request to ourselves comes back: the connection carries messages both ways."""

    async def echo(msg: Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    await nc.subscribe("tls.echo", cb=echo)
    reply = await nc.request("tls.echo", b"ping", timeout=CONNECT_TIMEOUT_S)
    assert reply.data == b"pong:ping"


def test_the_ca_is_made_once_and_kept(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    ca = ensure_ca(folder)
    assert mode_of(folder) == 0o700
    if sys.platform != "win32":
        assert mode_of(ca.key_file) == 0o600
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (constraints.ca, constraints.path_length) == (True, 0)
    usage = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert "herder CA" in ca.certificate.subject.rfc4514_string()
    lifetime = ca.certificate.not_valid_after_utc - ca.certificate.not_valid_before_utc
    assert lifetime >= timedelta(days=CA_VALIDITY_DAYS)

    again = ensure_ca(folder)
    assert again.certificate == ca.certificate
    assert again.pem == ca.pem == read_ca_file(ca.cert_file)
    assert sorted(path.name for path in folder.iterdir()) == ["ca.crt", "ca.key"]  # no temporary files left


def test_the_server_certificate_is_kept_until_it_must_change(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    folder = ca.cert_file.parent
    first = ensure_server_certificate(folder, ca, dns_names=["ts-01.example"], ip_addresses=["127.0.0.1"])
    if sys.platform != "win32":
        assert mode_of(first.key_file) == 0o600
    assert first.ca_file == ca.cert_file
    first.certificate.verify_directly_issued_by(ca.certificate)
    usage = first.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # Both: the nodes of a cluster present it to each other on the mutual-TLS routes.
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]

    kept = ensure_server_certificate(folder, ca, dns_names=["TS-01.example."], ip_addresses=["127.0.0.1"])
    assert kept.certificate == first.certificate
    assert serial(kept.cert_file) == first.certificate.serial_number

    wider = ensure_server_certificate(folder, ca, dns_names=["ts-01.example", "ts-01"], ip_addresses=["127.0.0.1"])
    assert wider.certificate.serial_number != first.certificate.serial_number
    names = wider.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["ts-01.example", "ts-01"]

    # Names the certificate holds already, fewer than it has: no reason to change it.
    narrower = ensure_server_certificate(folder, ca, dns_names=["ts-01"], ip_addresses=[])
    assert narrower.certificate == wider.certificate

    # A certificate another CA signed (the CA folder was swapped, say) is replaced by one of ours.
    foreign = ensure_server_certificate(
        tmp_path / "foreign", other_ca, dns_names=["ts-01.example", "ts-01"], ip_addresses=["127.0.0.1"]
    )
    foreign.cert_file.replace(wider.cert_file)
    foreign.key_file.replace(wider.key_file)
    ours = ensure_server_certificate(folder, ca, dns_names=["ts-01.example", "ts-01"], ip_addresses=["127.0.0.1"])
    ours.certificate.verify_directly_issued_by(ca.certificate)
    assert serial(ours.cert_file) not in (foreign.certificate.serial_number, wider.certificate.serial_number)


def test_a_server_certificate_near_its_end_is_reissued(ca: CertificateAuthority) -> None:
    folder = ca.cert_file.parent
    current = ensure_server_certificate(folder, ca, dns_names=["ts-01.example"], ip_addresses=[])
    # The same certificate, ending in ten days.
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ending = (
        x509.CertificateBuilder()
        .subject_name(current.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=700))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(current.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False)
        .sign(ca.key, hashes.SHA256())
    )
    current.cert_file.write_bytes(ending.public_bytes(serialization.Encoding.PEM))
    current.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    renewed = ensure_server_certificate(folder, ca, dns_names=["ts-01.example"], ip_addresses=[])
    assert renewed.certificate.serial_number != ending.serial_number
    assert renewed.certificate.not_valid_after_utc > now + timedelta(days=365)


@posix_only
def test_a_server_key_others_could_read_is_replaced(ca: CertificateAuthority) -> None:
    folder = ca.cert_file.parent
    first = ensure_server_certificate(folder, ca, dns_names=["ts-01.example"], ip_addresses=[])
    first.key_file.chmod(0o644)
    second = ensure_server_certificate(folder, ca, dns_names=["ts-01.example"], ip_addresses=[])
    assert second.certificate.serial_number != first.certificate.serial_number
    assert mode_of(second.key_file) == 0o600


def test_a_damaged_ca_is_refused_and_says_what_to_do(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    folder = ca.cert_file.parent
    fix = rf"move {re.escape(str(folder))} away to make a new CA \(then re-issue every bundle\)$"

    other_ca.key_file.replace(ca.key_file)
    with pytest.raises(SetupError, match=rf"ca\.key is not the key of ca\.crt; {fix}"):
        ensure_ca(folder)

    ca.key_file.write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
    with pytest.raises(SetupError, match=rf"ca\.key is not an unencrypted PEM private key; {fix}"):
        ensure_ca(folder)

    ca.cert_file.write_text("not a certificate")
    with pytest.raises(SetupError, match=rf"ca\.crt is not a PEM certificate; {fix}"):
        ensure_ca(folder)

    ca.cert_file.unlink()
    with pytest.raises(SetupError, match=rf"ca\.key is there but ca\.crt is missing; {fix}"):
        ensure_ca(folder)


@posix_only
def test_a_ca_key_others_could_read_is_refused(ca: CertificateAuthority) -> None:
    ca.key_file.chmod(0o640)
    with pytest.raises(
        SetupError, match=rf"can be read or changed by other users; chmod 600 {re.escape(str(ca.key_file))} "
    ):
        ensure_ca(ca.cert_file.parent)


def test_a_damaged_ca_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="no CA certificate at"):
        read_ca_file(tmp_path / "absent.crt")
    (tmp_path / "junk.crt").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SetupError, match=r"junk\.crt is not a PEM certificate"):
        read_ca_file(tmp_path / "junk.crt")
    with pytest.raises(SetupError, match="CA certificate is damaged"):
        client_context("not a certificate")


def test_the_client_trusts_the_given_ca_alone(ca: CertificateAuthority) -> None:
    context = client_context(ca.pem)
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.get_ca_certs(binary_form=True) == [ca.certificate.public_bytes(serialization.Encoding.DER)]


async def test_a_client_that_trusts_the_ca_talks_over_tls(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = ensure_server_certificate(ca.cert_file.parent, ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    with tls_nats(tmp_path / "nats", server) as port:
        info = greeting(port)
        assert info is not None and info["tls_required"] is True
        nc = await connect(f"tls://127.0.0.1:{port}", client_context(read_ca_file(server.ca_file)))
        try:
            assert nc.is_connected
            await round_trip(nc)
        finally:
            await nc.close()


async def test_a_client_that_trusts_another_ca_is_refused(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    server = ensure_server_certificate(ca.cert_file.parent, ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    with tls_nats(tmp_path / "nats", server) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
            await connect(f"tls://127.0.0.1:{port}", client_context(other_ca.pem))
        # Nor does the system's store vouch for it: a client with the default context is refused too.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(f"tls://127.0.0.1:{port}", ssl.create_default_context())


async def test_a_certificate_for_other_names_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = ensure_server_certificate(ca.cert_file.parent, ca, dns_names=["ts-01.example"], ip_addresses=[])
    with tls_nats(tmp_path / "nats", server) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            await connect(f"tls://127.0.0.1:{port}", client_context(ca.pem))
        # The same server, dialled by the name its certificate carries, is fine.
        nc = await connect(f"tls://127.0.0.1:{port}", client_context(ca.pem), tls_hostname="ts-01.example")
        await nc.close()


async def test_plain_nats_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = ensure_server_certificate(ca.cert_file.parent, ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    with tls_nats(tmp_path / "nats", server) as port:
        # A client that speaks plain NATS after the greeting gets no answer: the server hangs up.
        with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as sock:
            stream = sock.makefile("rwb")
            assert stream.readline().startswith(b"INFO ")
            stream.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            stream.flush()
            assert b"PONG" not in stream.read()  # read() returns once the server has closed the connection
        # nats-py upgrades a nats:// URL when the server requires TLS, and then needs the CA as well.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(f"nats://127.0.0.1:{port}", None)


def test_a_wildcard_listener_is_known_by_every_local_name() -> None:
    dns_names, ip_addresses = local_names("0.0.0.0")
    assert "localhost" in dns_names
    assert socket.gethostname().split(".")[0].lower() in dns_names
    assert "127.0.0.1" in ip_addresses
    # The address this host's traffic leaves from, when it has a route off the host at all.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            assert probe.getsockname()[0] in ip_addresses
    except OSError:
        pass
    assert local_names("::") == local_names("[::]:4222")
    assert local_names("10.1.2.3:4333") == (dns_names, ["10.1.2.3"])
    assert local_names("ts-01.example")[0][0] == "ts-01.example"


async def test_a_certificate_for_local_names_works_for_each(tmp_path: Path, ca: CertificateAuthority) -> None:
    dns_names, ip_addresses = local_names("0.0.0.0")
    server = ensure_server_certificate(ca.cert_file.parent, ca, dns_names=dns_names, ip_addresses=ip_addresses)
    short_name = socket.gethostname().split(".")[0].lower()
    with tls_nats(tmp_path / "nats", server) as port:
        for url, tls_hostname in [
            (f"tls://127.0.0.1:{port}", None),
            (f"tls://localhost:{port}", None),
            (f"tls://127.0.0.1:{port}", short_name),
        ]:
            context = client_context(ca.pem)
            # As strict as Python 3.13's default context, so that robots on newer Pythons accept it too.
            context.verify_flags |= ssl.VERIFY_X509_STRICT
            nc = await connect(url, context, tls_hostname=tls_hostname)
            try:
                await round_trip(nc)
            finally:
                await nc.close()
