"""Finding a stack: the data folder and its context file, or a URL and token for a remote one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import platformdirs
import typer
from nats.aio.client import Client as NATS

from herder.client.connection import Unreachable, connect, display_nats_url
from herder.client.errors import SetupError
from herder.client.requests import Client
from herder.protocol.messages import Model
from herder.protocol.subjects import DEFAULT_TENANT

M = TypeVar("M", bound=Model)

CONTEXT_FILE = "context.json"
ENV_DATA_DIR = "HERDER_DATA_DIR"
ENV_URL = "HERDER_URL"
ENV_TOKEN = "HERDER_TOKEN"

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
    nats_token: str | None = None
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
                nats_token=raw.get("nats_token"),
                db_url=raw.get("db_url"),
                pid=raw.get("pid"),
            )
        except FileNotFoundError:
            raise SetupError(
                f"no herder stack has run from {path.parent} (no {path.name} there); "
                "start one with 'herder up', or pass --url for a remote stack"
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


@dataclass(frozen=True)
class Target:
    """The stack a command talks to."""

    nats_url: str
    token: str | None
    tenant: str
    where: str  # how to name it in messages: the data folder or the URL


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


def resolve(data_dir: Path | None, url: str | None, token_file: Path | None) -> Target:
    """Find the stack: `--url` (with a token from `--token-file` or HERDER_TOKEN), else the data folder."""
    token = read_token_file(token_file) if token_file else os.environ.get(ENV_TOKEN) or None
    if url:
        return Target(nats_url=url, token=token, tenant=DEFAULT_TENANT, where=display_nats_url(url))
    folder = data_dir or default_data_dir()
    context = Context.read(folder / CONTEXT_FILE)
    return Target(nats_url=context.nats_url, token=token or context.token, tenant=context.tenant, where=str(folder))


@asynccontextmanager
async def connected(target: Target, name: str) -> AsyncIterator[NATS]:
    """A connection to the stack's NATS, closed afterwards; when nothing answers, say herder is not running."""
    try:
        nc = await connect(target.nats_url, name=name)
    except Unreachable as exc:
        raise SetupError(f"herder is not running at {target.where}: {exc.reason}; start it with 'herder up'") from None
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
