"""The stack's service credential: what herder's services connect with, and what the auth callout signs with.

One JSON file, mode 0600, made once per stack (`herder up` makes it in its data folder; a cluster
makes it with `herder fence init` and copies it to every machine that runs services):

- the password of the `herder-service` user, whom nats-server's auth callout exempts: services
  connect as it, with every permission;
- the password of the `herder-system` user in the system account, which the auth service uses to
  find and disconnect the connections of revoked tokens and removed robots;
- the seed of the account key that signs the callout's answers (nats-server trusts its public
  half, the `issuer`), and the seed of the curve key the server encrypts authorization requests to.

`server_config` writes the matching nats-server configuration: accounts, the system account and
the `authorization { auth_callout { … } }` block. nats-server keeps bcrypt hashes of the passwords.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from herder.client.connection import Credentials
from herder.client.errors import SetupError
from herder.services.common.keys import AccountKey, CurveKey, new_account_seed, new_curve_seed

KIND = "herder-service-credential"
VERSION = 1
ACCOUNT = "HERDER"
SYSTEM_ACCOUNT = "SYS"
SERVICE_USER = "herder-service"
SYSTEM_USER = "herder-system"
# How long nats-server waits for the auth service to answer before it refuses a connection.
AUTH_TIMEOUT_S = 2.0
# The passwords are 256 random bits: a slow hash adds nothing against guessing, and nats-server
# pays it on every service connection.
BCRYPT_ROUNDS = 4
PASSWORD_BYTES = 32


@dataclass(frozen=True)
class ServiceCredential:
    """The secrets of one stack's fence."""

    service_password: str
    system_password: str
    issuer_seed: str
    curve_seed: str

    def __repr__(self) -> str:
        return "ServiceCredential(secrets hidden)"

    @classmethod
    def generate(cls) -> ServiceCredential:
        """Fresh secrets for a new stack."""
        return cls(
            service_password=secrets.token_urlsafe(PASSWORD_BYTES),
            system_password=secrets.token_urlsafe(PASSWORD_BYTES),
            issuer_seed=new_account_seed(),
            curve_seed=new_curve_seed(),
        )

    @property
    def service(self) -> Credentials:
        """How a service connects."""
        return Credentials(user=SERVICE_USER, password=self.service_password)

    @property
    def system(self) -> Credentials:
        """How the auth service reaches the system account."""
        return Credentials(user=SYSTEM_USER, password=self.system_password)

    @property
    def service_token_key(self) -> bytes:
        """The key service tokens are signed with (see `herder.services.common.tokens.service_token`):
        derived from the service password, so every process of the stack holds it and nobody else."""
        return hashlib.sha256(b"herder-service-token:" + self.service_password.encode()).digest()

    @property
    def issuer(self) -> AccountKey:
        """The key that signs the callout's answers."""
        return AccountKey(self.issuer_seed)

    @property
    def curve(self) -> CurveKey:
        """The key authorization requests are sealed to."""
        return CurveKey(self.curve_seed)

    def write(self, path: Path) -> None:
        """Save atomically, readable by the owner only."""
        data = {
            "kind": KIND,
            "version": VERSION,
            "service_password": self.service_password,
            "system_password": self.system_password,
            "issuer_seed": self.issuer_seed,
            "curve_seed": self.curve_seed,
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: Path) -> ServiceCredential:
        """Load a credential file, or raise `SetupError` saying what is wrong with it."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise SetupError(
                f"no service credential at {path}; make one with 'herder fence init' (herder up makes its own)"
            ) from None
        except PermissionError:
            raise SetupError(f"cannot read the service credential {path}: permission denied") from None
        except (OSError, ValueError):
            raise SetupError(f"{path} is not a readable service credential (damaged JSON)") from None
        if not isinstance(raw, dict) or raw.get("kind") != KIND:
            raise SetupError(f"{path} is not a herder service credential")
        if raw.get("version") != VERSION:
            raise SetupError(f"{path} is a credential of version {raw.get('version')}; this herder reads {VERSION}")
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise SetupError(f"the service credential {path} is readable by others; run 'chmod 600 {path}'")
        try:
            credential = cls(
                service_password=str(raw["service_password"]),
                system_password=str(raw["system_password"]),
                issuer_seed=str(raw["issuer_seed"]),
                curve_seed=str(raw["curve_seed"]),
            )
            credential.issuer, credential.curve  # noqa: B018 - both seeds must be keys
        except (KeyError, SetupError) as exc:
            detail = exc.message if isinstance(exc, SetupError) else f"{exc} is missing"
            raise SetupError(f"{path} is damaged: {detail}") from None
        return credential

    @classmethod
    def load_or_create(cls, path: Path) -> ServiceCredential:
        """The credential in `path`, made there first if there is none."""
        if not path.exists():
            cls.generate().write(path)
        return cls.read(path)


def _user(name: str, password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()
    return f"{{ user: {json.dumps(name)}, password: {json.dumps(hashed)} }}"


def server_config(credential: ServiceCredential, *, auth_timeout_s: float = AUTH_TIMEOUT_S) -> str:
    """The part of nats-server's configuration that puts up the fence: herder's account (with
    JetStream) and its service user, the system account and its user, and the auth callout that
    admits everyone else through the auth service."""
    return "\n".join(
        [
            "accounts {",
            f"  {ACCOUNT} {{",
            "    jetstream: enabled",
            f"    users: [ {_user(SERVICE_USER, credential.service_password)} ]",
            "  }",
            f"  {SYSTEM_ACCOUNT} {{",
            f"    users: [ {_user(SYSTEM_USER, credential.system_password)} ]",
            "  }",
            "}",
            f"system_account: {SYSTEM_ACCOUNT}",
            "authorization {",
            f"  timeout: {auth_timeout_s:g}",
            "  auth_callout {",
            f"    issuer: {json.dumps(credential.issuer.public_key)}",
            f"    account: {ACCOUNT}",
            f"    auth_users: [ {json.dumps(SERVICE_USER)}, {json.dumps(SYSTEM_USER)} ]",
            f"    xkey: {json.dumps(credential.curve.public_key)}",
            "  }",
            "}",
            "",
        ]
    )
