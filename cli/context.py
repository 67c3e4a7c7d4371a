"""Finding a stack: the data folder and its context file, a connection bundle, or a URL and token.

Every command that talks to a stack connects as the principal its token names: the token the
caller gave (--token-file, HERDER_TOKEN), the one in a bundle (--bundle), or the stack's admin
token in the context file of the data folder. nats-server admits that principal through the
fence, with its own permissions; a refused token is named in the error by where it came from.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import platformdirs
import typer
from nats.aio.client import Client as NATS

from herder.client.bundle import read_bundle
from herder.client.connection import (
    Credentials,
    CredentialsRefused,
    Unreachable,
    connect,
    display_nats_url,
    reachable,
)
from herder.client.errors import SetupError
from herder.client.requests import Client
from herder.client.tls import read_ca_file
from herder.protocol.errors import Unauthenticated
from herder.protocol.messages import Model
from herder.protocol.subjects import DEFAULT_TENANT

M = TypeVar("M", bound=Model)

CONTEXT_FILE = "context.json"
ENV_DATA_DIR = "HERDER_DATA_DIR"
ENV_URL = "HERDER_URL"
ENV_TOKEN = "HERDER_TOKEN"
ENV_BUNDLE = "HERDER_BUNDLE"
ENV_CA_FILE = "HERDER_CA_FILE"

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar=ENV_DATA_DIR,
        show_envvar=True,
        help="Folder of an embedded stack (its NATS store, SQLite database and context file). "
        "Default: the user's data folder.",
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar=ENV_URL,
        show_envvar=True,
        help="NATS URL of a stack started elsewhere; the token then comes from --token-file or HERDER_TOKEN.",
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the API token ('-' reads it from standard input). Tokens are never "
        "taken on the command line; HERDER_TOKEN works too.",
    ),
]
BundleOption = Annotated[
    Path | None,
    typer.Option(
        "--bundle",
        envvar=ENV_BUNDLE,
        show_envvar=True,
        help="A connection bundle (made by 'herder token create --bundle' or 'herder robot add --bundle'): "
        "the stack's URLs, its CA and a token, in one file.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def default_data_dir() -> Path:
    """`$HERDER_DATA_DIR`, else the user's data folder for herder."""
    configured = os.environ.get(ENV_DATA_DIR)
    return Path(configured) if configured else Path(platformdirs.user_data_dir("herder"))


@dataclass
class Context:
    """What a client needs to reach a stack, as kept in `<data dir>/context.json` (mode 0600)."""

    nats_url: str
    token: str | None = None
    tenant: str = DEFAULT_TENANT
    ca_file: str | None = None
    advertised_urls: list[str] | None = None
    db_url: str | None = None
    pid: int | None = None

    @classmethod
    def read(cls, path: Path) -> Context:
        """Load a context file, or raise `SetupError` saying what is wrong with it."""
        try:
            raw = json.loads(path.read_text())
            return cls(
                nats_url=str(raw["nats_url"]),
                token=raw.get("token"),
                tenant=raw.get("tenant") or DEFAULT_TENANT,
                ca_file=raw.get("ca_file"),
                advertised_urls=raw.get("advertised_urls"),
                db_url=raw.get("db_url"),
                pid=raw.get("pid"),
            )
        except FileNotFoundError:
            raise SetupError(
                f"no herder stack has run from {path.parent} (no {path.name} there); "
                "start one with 'herder up', or pass --bundle FILE (or --url) for a remote stack"
            ) from None
        except PermissionError:
            raise SetupError(f"cannot read {path}: permission denied (it belongs to the stack's owner)") from None
        except (ValueError, KeyError, TypeError):
            raise SetupError(f"{path} is damaged; stop the stack and start it again with 'herder up'") from None

    def write(self, path: Path) -> None:
        """Save atomically, readable by the owner only."""
        data = {key: value for key, value in asdict(self).items() if value is not None}
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(temporary, path)

    def ca_pem(self) -> str | None:
        """The stack's CA certificate, when it serves TLS."""
        return read_ca_file(Path(self.ca_file)) if self.ca_file else None


@dataclass(frozen=True)
class Target:
    """The stack a command talks to, and as whom."""

    nats_url: str
    token: str | None
    tenant: str
    where: str  # how to name the stack in messages: the data folder, the bundle or the URL
    token_source: str = ""  # how to name where the token came from: "--token-file t.txt", "HERDER_TOKEN", …
    ca_pem: str | None = None
    # Where machines elsewhere reach this stack (bundles hold these); the URL itself when unknown.
    advertised_urls: tuple[str, ...] = ()


def read_token_file(path: Path) -> str:
    """The token in `path` ('-' for standard input), stripped."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise SetupError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    token = text.strip()
    if not token:
        raise SetupError(f"the token file {path} is empty")
    return token


def resolve(data_dir: Path | None, url: str | None, token_file: Path | None, bundle: Path | None = None) -> Target:
    """Find the stack and the token to talk to it with.

    A token from --token-file or HERDER_TOKEN goes with --url, a bundle or the data folder; a
    bundle brings its own URLs, CA and token; without either, the data folder's context file
    names the stack and lends its admin token.
    """
    token, source = _given_token(token_file)
    ca_pem = read_ca_file(Path(os.environ[ENV_CA_FILE])) if os.environ.get(ENV_CA_FILE) else None
    if bundle is not None:
        found = read_bundle(bundle)
        urls = ",".join(found.urls)
        return Target(
            nats_url=url or urls,
            token=token or found.token,
            tenant=found.tenant,
            where=f"the stack of bundle {bundle}",
            token_source=source or f"the bundle {bundle}",
            ca_pem=ca_pem or found.ca_pem,
            advertised_urls=tuple(found.urls),
        )
    if url:
        return Target(
            nats_url=url,
            token=token,
            tenant=DEFAULT_TENANT,
            where=display_nats_url(url),
            token_source=source,
            ca_pem=ca_pem,
            advertised_urls=tuple(server.strip() for server in url.split(",")),
        )
    folder = data_dir or default_data_dir()
    context = Context.read(folder / CONTEXT_FILE)
    return Target(
        nats_url=context.nats_url,
        token=token or context.token,
        tenant=context.tenant,
        where=str(folder),
        token_source=source or f"the admin token in {folder / CONTEXT_FILE}",
        ca_pem=ca_pem or context.ca_pem(),
        advertised_urls=tuple(context.advertised_urls or [context.nats_url]),
    )


def _given_token(token_file: Path | None) -> tuple[str | None, str]:
    if token_file is not None:
        return read_token_file(token_file), f"--token-file {token_file}"
    if os.environ.get(ENV_TOKEN):
        return os.environ[ENV_TOKEN].strip(), ENV_TOKEN
    return None, ""


@asynccontextmanager
async def connected(target: Target, name: str, *, refused: str | None = None, **options: Any) -> AsyncIterator[NATS]:
    """A connection to the stack as the target's principal, closed afterwards; one line when that fails
    (`refused` says what to make of a refused token, when the caller knows better; `options` go to
    `client.connection.connect`)."""
    if not target.token:
        why = await reachable(target.nats_url)
        if why is not None:
            raise SetupError(f"herder is not running at {target.where}: {why}; start it with 'herder up'")
        raise SetupError(
            f"no token to talk to the stack at {target.where} with; give one with --token-file FILE, "
            f"{ENV_TOKEN} or --bundle FILE"
        )
    try:
        nc = await connect(
            target.nats_url, name=name, credentials=Credentials(token=target.token), ca_pem=target.ca_pem, **options
        )
    except Unreachable as exc:
        raise SetupError(f"herder is not running at {target.where}: {exc.reason}; start it with 'herder up'") from None
    except CredentialsRefused:
        if refused is not None:
            raise Unauthenticated(refused) from None
        raise Unauthenticated(
            f"the stack at {target.where} refused the token from {target.token_source} (unknown or revoked, "
            f"or no auth service is running there); give a valid one with --token-file FILE, {ENV_TOKEN} "
            "or --bundle FILE"
        ) from None
    try:
        yield nc
    finally:
        await nc.close()


def call(target: Target, send: Callable[[Client], Awaitable[M]]) -> M:
    """Connect to the stack, send one request with the target's token, and return the reply."""

    async def main() -> M:
        async with connected(target, "herder-cli") as nc:
            return await send(Client(nc, token=target.token, tenant=target.tenant))

    return asyncio.run(main())
