"""The connection bundle: the one file that connects a machine to a herder stack.

It holds the stack's NATS URLs, its CA certificate (none for a stack that listens on loopback
only), a token, the tenant, and the robot's name when it is a robot's bundle. On the stack's
machine `herder robot add NAME --bundle FILE` writes one; on the robot's machine `herder robot run
NAME --bundle FILE` reads it. The token is a secret: the file is created readable by its owner
alone, a file others can read is refused, and neither an error nor a repr ever shows the token.

On disk it is JSON:

    {"kind": "herder-bundle", "version": 1, "created_at": "2026-01-05T09:30:00+00:00",
     "urls": ["tls://ts-01.example:4333"], "ca_pem": "-----BEGIN CERTIFICATE-----...",
     "token": "hd_...", "tenant": "default", "robot": "r1"}
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from herder.client.errors import SetupError
from herder.client.tls import load_ca_certificates
from herder.protocol.errors import BadRequest
from herder.protocol.subjects import DEFAULT_TENANT, check_tenant, check_token

BUNDLE_KIND = "herder-bundle"
BUNDLE_VERSION = 1
BUNDLE_MODE = 0o600
MAX_BUNDLE_BYTES = 1_000_000  # a bundle is a few kilobytes; anything this big is some other file

_REMAKE = "make a new one with 'herder robot add NAME --bundle FILE' on the stack's machine"


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """Where a stack is and how to prove who we are to it: URLs, CA certificate, token, tenant, robot.

    `ca_pem` is None for a stack that listens on loopback only (it serves no TLS); `robot` is set
    in a robot's bundle.
    """

    urls: list[str]
    ca_pem: str | None
    token: str
    tenant: str = DEFAULT_TENANT
    robot: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __repr__(self) -> str:
        # The token is a secret, and the CA certificate a screenful: neither belongs in a log line.
        ca = "present" if self.ca_pem else None
        return (
            f"Bundle(urls={self.urls!r}, tenant={self.tenant!r}, robot={self.robot!r}, ca_pem={ca!r}, "
            f"token='***', created_at={self.created_at.isoformat()!r})"
        )

    def to_json(self) -> str:
        """The bundle as the file holds it."""
        document: dict[str, Any] = {
            "kind": BUNDLE_KIND,
            "version": BUNDLE_VERSION,
            "created_at": self.created_at.isoformat(),
            "urls": list(self.urls),
            "ca_pem": self.ca_pem,
            "token": self.token,
            "tenant": self.tenant,
            "robot": self.robot,
        }
        return json.dumps(document, indent=2) + "\n"


def write_bundle(path: Path, bundle: Bundle) -> None:
    """Create `path` holding `bundle`, readable by its owner alone; `SetupError` if `path` exists.

    The file appears whole or not at all: the bundle goes to a temporary file beside it first,
    which a hard link then names `path` (failing, rather than replacing, when `path` exists).
    """
    path = Path(path)
    if os.path.lexists(path):
        raise SetupError(f"{path} exists already; choose a new file for the bundle")
    data = bundle.to_json().encode()
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), BUNDLE_MODE)
        except OSError as exc:
            raise SetupError(f"cannot write the bundle {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise SetupError(f"{path} exists already; choose a new file for the bundle") from None
        except OSError:
            _write_in_place(path, data)  # a file system without hard links (a FAT memory stick)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _write_in_place(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), BUNDLE_MODE)
    except FileExistsError:
        raise SetupError(f"{path} exists already; choose a new file for the bundle") from None
    except OSError as exc:
        raise SetupError(f"cannot write the bundle {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def read_bundle(path: Path) -> Bundle:
    """The bundle in `path`; `SetupError` when it is missing, unreadable, open to other users, or not a
    bundle this herder understands."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            raw = handle.read(MAX_BUNDLE_BYTES + 1)
    except FileNotFoundError:
        raise SetupError(f"no bundle at {path}; {_REMAKE}") from None
    except IsADirectoryError:
        raise SetupError(f"{path} is a folder, not a bundle") from None
    except OSError as exc:
        raise SetupError(f"cannot read the bundle {path}: {exc.strerror or exc}") from None
    # Checked before the contents are looked at: the token inside is a secret.
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SetupError(
            f"{path} can be read or changed by other users (mode {stat.S_IMODE(mode):o}) and holds a secret token; "
            f"chmod 600 {path}"
        )
    if len(raw) > MAX_BUNDLE_BYTES:
        raise SetupError(f"{path} is not a herder bundle (far too big for one)")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SetupError(f"{path} is not a herder bundle (not JSON)") from None
    if not isinstance(document, dict) or document.get("kind") != BUNDLE_KIND:
        raise SetupError(f'{path} is not a herder bundle (no "kind": "{BUNDLE_KIND}")')
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _damaged(path, "version")
    if version > BUNDLE_VERSION:
        raise SetupError(
            f"{path} is a version {version} bundle, newer than this herder reads (version {BUNDLE_VERSION}); "
            "upgrade herder on this machine"
        )
    return _bundle_of(path, document)


def _bundle_of(path: Path, document: dict[str, Any]) -> Bundle:
    """The bundle a version-1 document describes; `SetupError` naming the first field that is wrong.

    No message shows a value: one of them is the token.
    """
    urls = document.get("urls")
    if not isinstance(urls, list) or not urls or not all(isinstance(url, str) and url.strip() for url in urls):
        raise _damaged(path, "urls")
    token = document.get("token")
    if not isinstance(token, str) or not token.strip():
        raise _damaged(path, "token")
    ca_pem = document.get("ca_pem")
    if ca_pem is not None:
        if not isinstance(ca_pem, str):
            raise _damaged(path, "ca_pem")
        try:
            load_ca_certificates(ca_pem)
        except ValueError:
            raise _damaged(path, "ca_pem") from None
    tenant = document.get("tenant", DEFAULT_TENANT)
    try:
        check_tenant(tenant)
    except BadRequest:
        raise _damaged(path, "tenant") from None
    robot = document.get("robot")
    if robot is not None:
        try:
            check_token(robot, "robot")
        except BadRequest:
            raise _damaged(path, "robot") from None
    try:
        created_at = datetime.fromisoformat(document["created_at"])
    except (KeyError, TypeError, ValueError):
        raise _damaged(path, "created_at") from None
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return Bundle(
        urls=[url.strip() for url in urls],
        ca_pem=ca_pem,
        token=token.strip(),
        tenant=tenant,
        robot=robot,
        created_at=created_at,
    )


def _damaged(path: Path, name: str) -> SetupError:
    return SetupError(f"{path} is a damaged herder bundle ({name!r} is missing or wrong); {_REMAKE}")
