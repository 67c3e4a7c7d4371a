"""The stack's own certificate authority, and the certificate nats-server presents to off-host clients.

When herder listens beyond loopback it serves NATS over TLS. On first start it makes a private CA
(`ensure_ca`) in a folder of its data directory, and a server certificate that CA signs
(`ensure_server_certificate`) naming every DNS name and address the server answers to
(`local_names`). Each bundle carries the CA certificate, so a robot trusts this stack alone, not
whatever the system store trusts. The folder holds:

    ca.crt       the CA certificate (public; every bundle carries a copy)
    ca.key       the CA's private key (0600): whoever holds it can impersonate this stack
    server.crt   nats-server's certificate, signed by the CA (`tls { cert_file }`; on a cluster, the routes' too)
    server.key   its private key (0600) (`tls { key_file }`)

The server certificate looks after itself: it is issued again on start when it expires within
RENEW_BEFORE_DAYS, lacks a name the server should answer to, or was not signed by this CA.

Rotating the CA (its key may have leaked, or it nears the end of its ten years): stop the stack,
move the folder away (`mv tls tls.old`), and start the stack again; herder makes a new CA and a
new server certificate. Every bundle made before carries the old CA, and robots holding one
refuse the new server: re-issue every bundle, then delete the old folder.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from herder.client.errors import SetupError

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"

CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 730
RENEW_BEFORE_DAYS = 30
# Certificates start an hour in the past, so that a robot whose clock runs a little behind the
# server's accepts one issued a moment ago.
BACKDATE_S = 3600
MAX_COMMON_NAME_CHARS = 64  # X.509's upper bound
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
FOLDER_MODE = 0o700

WILDCARD_ADDRESSES = frozenset({"", "*", "0.0.0.0", "::"})
# Addresses reserved for documentation: connecting a UDP socket to one sends nothing, but makes the
# kernel pick the route (and so the source address) that traffic off this host would take.
_ROUTE_PROBES = ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1"))
_DISCARD_PORT = 9
_DNS_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")
_MAX_DNS_NAME_CHARS = 253

log = structlog.get_logger("herder.certificates")


@dataclass(frozen=True)
class CertificateAuthority:
    """The stack's private CA: its certificate, its key, and the files they live in."""

    cert_file: Path
    key_file: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def pem(self) -> str:
        """The CA certificate in PEM, as bundles carry it."""
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True)
class ServerCertificate:
    """nats-server's certificate and key (for its `tls { cert_file, key_file }` block), and the CA's file."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    certificate: x509.Certificate


def ensure_ca(folder: Path) -> CertificateAuthority:
    """The CA in `folder`, made there (an EC P-256 key and a self-signed certificate) if there is none.

    Raises `SetupError` when the CA's files are there but incomplete, damaged, open to other users,
    or do not belong together: herder never replaces a CA by itself, since every bundle trusts it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    cert_file, key_file = folder / CA_CERT_FILE, folder / CA_KEY_FILE
    if not cert_file.exists() and not key_file.exists():
        # Another herder starting at the same moment may win the race: then load the CA it made.
        with contextlib.suppress(FileExistsError):
            return _create_ca(cert_file, key_file)
    return _load_ca(folder, cert_file, key_file)


def _create_ca(cert_file: Path, key_file: Path) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herder"),
            x509.NameAttribute(NameOID.COMMON_NAME, _ca_common_name(now)),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=BACKDATE_S))
        .not_valid_after(now + timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a certificate on disk is what says "there is a CA here".
    _install(key_file, _key_pem(key), PRIVATE_MODE, replace=False)
    _install(cert_file, certificate.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, replace=False)
    log.info("tls.ca.created", cert_file=str(cert_file), subject=certificate.subject.rfc4514_string())
    return CertificateAuthority(cert_file=cert_file, key_file=key_file, certificate=certificate, key=key)


def _ca_common_name(now: datetime) -> str:
    suffix = f" {now:%Y-%m-%d}"
    host = socket.gethostname().split(".")[0] or "localhost"
    return f"herder CA {host}"[: MAX_COMMON_NAME_CHARS - len(suffix)] + suffix


def _load_ca(folder: Path, cert_file: Path, key_file: Path) -> CertificateAuthority:
    def damaged(what: str) -> SetupError:
        return SetupError(
            f"the herder CA in {folder} is unusable: {what}; move {folder} away to make a new CA "
            "(then re-issue every bundle)"
        )

    for present, missing in ((cert_file, key_file), (key_file, cert_file)):
        if not missing.exists():
            raise damaged(f"{present.name} is there but {missing.name} is missing")
    if _open_to_others(key_file):
        raise SetupError(
            f"{key_file} can be read or changed by other users; chmod 600 {key_file} "
            f"(if someone may have copied it, move {folder} away to make a new CA and re-issue every bundle)"
        )
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except OSError as exc:
        raise SetupError(f"cannot read {cert_file}: {exc.strerror or exc}") from None
    except ValueError:
        raise damaged(f"{cert_file.name} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise SetupError(f"cannot read {key_file}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):
        raise damaged(f"{key_file.name} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise damaged(f"{key_file.name} is not an EC key")
    if not _same_key(certificate.public_key(), key.public_key()):
        raise damaged(f"{key_file.name} is not the key of {cert_file.name}")
    if not _is_ca(certificate):
        raise damaged(f"{cert_file.name} is not a CA certificate")
    if certificate.not_valid_after_utc <= datetime.now(UTC):
        raise damaged(f"it expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    return CertificateAuthority(cert_file=cert_file, key_file=key_file, certificate=certificate, key=key)


def ensure_server_certificate(
    folder: Path, ca: CertificateAuthority, *, dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> ServerCertificate:
    """nats-server's certificate in `folder`, signed by `ca` and naming `dns_names` and `ip_addresses`.

    The one on disk is kept when it names them all, was signed by `ca`, and is valid for more than
    RENEW_BEFORE_DAYS; otherwise a new key and certificate replace it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    wanted_dns = _dns_names(dns_names)
    wanted_ips = _ip_addresses(ip_addresses)
    if not wanted_dns and not wanted_ips:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    cert_file, key_file = folder / SERVER_CERT_FILE, folder / SERVER_KEY_FILE
    reason = _reissue_reason(cert_file, key_file, ca, wanted_dns, wanted_ips, datetime.now(UTC))
    if reason is None:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        return ServerCertificate(cert_file=cert_file, key_file=key_file, ca_file=ca.cert_file, certificate=certificate)
    key, certificate = _issue_server_certificate(ca, wanted_dns, wanted_ips)
    # The key first: nats-server reads both only when it starts, after this returns.
    _install(key_file, _key_pem(key), PRIVATE_MODE, replace=True)
    _install(cert_file, certificate.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, replace=True)
    log.info(
        "tls.server_certificate.issued",
        reason=reason,
        cert_file=str(cert_file),
        dns_names=[str(name) for name in wanted_dns],
        ip_addresses=[str(address) for address in wanted_ips],
        not_after=certificate.not_valid_after_utc.isoformat(),
    )
    return ServerCertificate(cert_file=cert_file, key_file=key_file, ca_file=ca.cert_file, certificate=certificate)


def _reissue_reason(
    cert_file: Path,
    key_file: Path,
    ca: CertificateAuthority,
    dns_names: list[str],
    ip_addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    now: datetime,
) -> str | None:
    """Why the server certificate on disk must be issued again, or None to keep it."""
    if not cert_file.exists() or not key_file.exists():
        return "none yet"
    # A key others could read may have been copied: a new one is the remedy, and costs nothing.
    if _open_to_others(key_file):
        return "its key was open to other users"
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return "damaged"
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(certificate.public_key(), key.public_key()):
        return "its key does not match"
    try:
        certificate.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by this CA"
    if certificate.not_valid_after_utc - now < timedelta(days=RENEW_BEFORE_DAYS):
        return f"expires on {certificate.not_valid_after_utc:%Y-%m-%d}"
    try:
        usages = set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = set()
    # Cluster routes authenticate both ways: a certificate made before they did lacks client auth.
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usages:
        return "not usable for both ends of a connection (server and client authentication)"
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "names nothing"
    have_dns = {name.lower() for name in names.get_values_for_type(x509.DNSName)}
    have_ips = set(names.get_values_for_type(x509.IPAddress))
    lacking = [name for name in dns_names if name not in have_dns] + [str(a) for a in ip_addresses if a not in have_ips]
    if lacking:
        return f"lacks {', '.join(lacking)}"
    return None


def _issue_server_certificate(
    ca: CertificateAuthority, dns_names: list[str], ip_addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    # A certificate valid after its CA expires would fail anyway; say so in its dates.
    not_after = min(now + timedelta(days=SERVER_VALIDITY_DAYS), ca.certificate.not_valid_after_utc)
    common_name = (dns_names[0] if dns_names else str(ip_addresses[0]))[:MAX_COMMON_NAME_CHARS]
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    alternative_names += [x509.IPAddress(address) for address in ip_addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herder"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=BACKDATE_S))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        # clientAuth too: cluster nodes present this certificate to each other on the mutual-TLS routes.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return key, certificate


def local_names(listen: str) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a server listening on `listen` should be known by.

    For a wildcard (`0.0.0.0`, `::`) that is every address of this host found cheaply and with no
    extra dependency: loopback, what the host's names resolve to, the source addresses of the
    routes off the host and, on Linux, every interface address (from /proc/net). For one address it is that address. The
    DNS names are the host's fully qualified and short names and `localhost` (and `listen` itself
    when it is a name). `listen` may carry a port (`0.0.0.0:4222`, `[::]:4222`); it is ignored.
    """
    host = _without_port(listen.strip())
    names = _host_names()
    if host in WILDCARD_ADDRESSES:
        return names, _local_addresses()
    try:
        return names, [str(ipaddress.ip_address(host))]
    except ValueError:
        return _unique([host.lower().rstrip("."), *names]), _resolve(host)


def _without_port(listen: str) -> str:
    if listen.startswith("["):
        return listen[1:].split("]", 1)[0]
    host, colon, port = listen.rpartition(":")
    # Two colons or more without brackets is an IPv6 address, not a host and port.
    if colon and port.isdigit() and ":" not in host:
        return host
    return listen


def _host_names() -> list[str]:
    hostname = socket.gethostname()
    candidates = [socket.getfqdn(), hostname, hostname.split(".")[0]]
    names = _unique(name.lower().rstrip(".") for name in candidates)
    # "localhost" last: the first name is the certificate's common name, which people read.
    return [name for name in names if name != "localhost" and _is_dns_name(name) and not _is_ip(name)] + ["localhost"]


def _local_addresses() -> list[str]:
    found: list[str] = ["127.0.0.1"]
    if _has_ipv6_loopback():
        found.append("::1")
    for name in (socket.gethostname(), socket.getfqdn()):
        found += _resolve(name)
    found += _route_sources()
    found += _linux_interface_addresses()
    usable = []
    for text in _unique(found):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        # Link-local addresses need a scope to be dialled, and nobody dials those by certificate name.
        if not (address.is_link_local or address.is_multicast or address.is_unspecified):
            usable.append(str(address))
    return usable


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _resolve(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return _unique(_plain_address(str(info[4][0])) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6))


def _route_sources() -> list[str]:
    sources = []
    for family, probe in _ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, _DISCARD_PORT))
                sources.append(_plain_address(str(sock.getsockname()[0])))
        except OSError:
            continue
    return sources


def _linux_interface_addresses() -> list[str]:
    addresses: list[str] = []
    with contextlib.suppress(OSError):
        addresses += _parse_fib_trie(Path("/proc/net/fib_trie").read_text())
    with contextlib.suppress(OSError):
        addresses += _parse_if_inet6(Path("/proc/net/if_inet6").read_text())
    return addresses


def _parse_fib_trie(text: str) -> list[str]:
    """The IPv4 addresses of this host's interfaces, from Linux's /proc/net/fib_trie.

    An address of the host is a leaf (`|-- 10.0.0.5`) followed by `/32 host LOCAL`.
    """
    addresses = []
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            leaf = stripped[4:].strip()
        elif leaf is not None and stripped.split()[:3] == ["/32", "host", "LOCAL"]:
            with contextlib.suppress(ValueError):
                addresses.append(str(ipaddress.IPv4Address(leaf)))
    return _unique(addresses)


def _parse_if_inet6(text: str) -> list[str]:
    """The IPv6 addresses of this host's interfaces, from Linux's /proc/net/if_inet6 (32 hex digits first)."""
    addresses = []
    for line in text.splitlines():
        fields = line.split()
        if fields:
            with contextlib.suppress(ValueError):
                addresses.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return _unique(addresses)


def _plain_address(text: str) -> str:
    return text.split("%", 1)[0]  # an IPv6 scope ("fe80::1%eth0") is no part of the address


def _dns_names(names: Iterable[str]) -> list[str]:
    checked = []
    for name in names:
        normal = name.strip().lower().rstrip(".")
        if not _is_dns_name(normal) or _is_ip(normal):
            raise SetupError(f"{name!r} is not a DNS name a certificate can carry")
        checked.append(normal)
    return _unique(checked)


def _ip_addresses(addresses: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    checked = []
    for text in addresses:
        try:
            checked.append(ipaddress.ip_address(_plain_address(text.strip())))
        except ValueError:
            raise SetupError(f"{text!r} is not an IP address") from None
    return list(dict.fromkeys(checked))


def _is_dns_name(name: str) -> bool:
    return len(name) <= _MAX_DNS_NAME_CHARS and _DNS_NAME.fullmatch(name) is not None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _same_key(left: object, right: ec.EllipticCurvePublicKey) -> bool:
    return isinstance(left, ec.EllipticCurvePublicKey) and left.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == right.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _open_to_others(path: Path) -> bool:
    """Whether users other than the owner may read or change `path` (never on Windows, which has no modes)."""
    if os.name != "posix":
        return False
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def _install(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Put `data` at `path` whole or not at all, created with `mode` (so never, not even briefly, wider).

    The data goes to a new temporary file beside `path` first; then a rename replaces `path`
    (`replace=True`), or a hard link creates it and fails if it exists (`replace=False`).
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise
        except OSError:
            # A file system without hard links: create the file in place, still never over another.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
