"""TLS to a herder stack: trust the stack's own CA, and nothing else.

A stack that listens beyond loopback serves NATS over TLS with a certificate its private CA signed;
the bundle (or a CA file) carries that CA's certificate. The context built here trusts that CA
alone, not the system's store, so no public CA can vouch for an impostor, and checks that the
certificate names the host dialled.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from herder.client.errors import SetupError

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def load_ca_certificates(ca_pem: str) -> list[x509.Certificate]:
    """The certificates in `ca_pem`; `ValueError` when it holds none, or a damaged one."""
    certificates = x509.load_pem_x509_certificates(ca_pem.encode("ascii", errors="replace"))
    if not certificates:
        raise ValueError("no certificate")
    return certificates


def client_context(ca_pem: str) -> ssl.SSLContext:
    """A client SSL context that accepts only a server whose certificate the CA in `ca_pem` signed
    for the name dialled, over TLS 1.2 or newer; `SetupError` when `ca_pem` is no certificate."""
    try:
        load_ca_certificates(ca_pem)
    except ValueError:
        raise SetupError(
            "the stack's CA certificate is damaged (no PEM certificate); get a new bundle from the stack's machine"
        ) from None
    # PROTOCOL_TLS_CLIENT loads no CA at all (unlike create_default_context, which loads the system
    # store), and requires a certificate that names the host.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_TLS_VERSION
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError:
        raise SetupError(
            "the stack's CA certificate cannot be used for TLS; get a new bundle from the stack's machine"
        ) from None
    return context


def read_ca_file(path: Path) -> str:
    """The PEM text of the CA certificate in `path`; `SetupError` when it is missing, unreadable or damaged."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise SetupError(f"no CA certificate at {path}; copy the stack's ca.crt there, or use a bundle") from None
    except UnicodeDecodeError:
        raise SetupError(f"{path} is not a PEM certificate; copy the stack's ca.crt again") from None
    except OSError as exc:
        raise SetupError(f"cannot read the CA certificate {path}: {exc.strerror or exc}") from None
    try:
        load_ca_certificates(text)
    except ValueError:
        raise SetupError(f"{path} is not a PEM certificate (or is damaged); copy the stack's ca.crt again") from None
    return text
