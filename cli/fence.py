"""`herder fence init|server-config|tls`: the fence of a stack whose NATS servers you run yourself.

`herder up` puts up its own fence. A cluster (or any NATS server you run) needs three things:
the stack's service credential on every machine that runs herder services, the matching
configuration in every nats-server (accounts, system account, auth callout), and TLS
certificates from the stack's own CA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from herder.cli.output import fail

fence_app = typer.Typer(
    help="The bus fence of a stack whose NATS servers you run yourself (herder up makes its own).",
    no_args_is_help=True,
)

CredentialFile = Annotated[
    Path,
    typer.Option(
        "--credential",
        envvar="HERDER_SERVICE_CREDENTIAL",
        show_envvar=True,
        help="The service credential file.",
    ),
]


@fence_app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", help="Where to write the new service credential (mode 0600).")],
) -> None:
    """Make a stack's service credential: the services' password, the system user's, and the auth
    callout's signing and encryption keys. Copy it (0600) to every machine that runs herder services."""
    from herder.services.common.credentials import ServiceCredential

    if out.exists():
        fail(f"{out} exists already; a stack has one credential: keep it, or move it away to make a new one")
    ServiceCredential.generate().write(out)
    print(f"wrote the service credential to {out}; next: 'herder fence server-config --credential {out}'")


@fence_app.command("server-config")
def server_config(
    credential: CredentialFile,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write to this file (mode 0600) instead of standard output."),
    ] = None,
) -> None:
    """Print the nats-server configuration that puts up the fence: herder's account (with JetStream),
    the system account, and the auth callout. Include it in every server's config ('include auth.conf')."""
    from herder.services.common.credentials import ServiceCredential, server_config

    text = server_config(ServiceCredential.read(credential))
    if out is None:
        sys.stdout.write(text)
        return
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    print(f"wrote the fence's nats-server configuration to {out}", file=sys.stderr)


@fence_app.command("tls")
def tls(
    folder: Annotated[Path, typer.Option("--dir", help="The folder of the stack's CA and certificates.")],
    names: Annotated[
        list[str],
        typer.Option("--name", help="A host name or address the servers are reached by; repeat for each."),
    ],
) -> None:
    """Make (once) the stack's CA and a server certificate for these names, for nats-server's
    `tls { cert_file, key_file }` on the client and cluster ports. Bundles carry the CA."""
    import ipaddress

    from herder.services.common.certificates import ensure_ca, ensure_server_certificate

    dns_names: list[str] = []
    ip_addresses: list[str] = []
    for name in names:
        try:
            ipaddress.ip_address(name)
            ip_addresses.append(name)
        except ValueError:
            dns_names.append(name)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = ensure_ca(folder)
    server = ensure_server_certificate(folder, ca, dns_names=dns_names, ip_addresses=ip_addresses)
    print(f"CA          {ca.cert_file}\ncertificate {server.cert_file}\nkey         {server.key_file}")
