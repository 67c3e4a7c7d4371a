"""Messages of the `secrets` service: assets (global variables) and credentials.

An asset is a named value of one type (text, bool, integer, JSON, calendar); a credential is a
username and a secret. Each has a global value and may have values for a robot group or for one
robot; a robot reads the most specific: its own, then its groups' (in the order the robot lists
its groups), then the global one.

No secret is ever in clear on the bus. A secret on its way to the service (`credential_set`) is
sealed to the service's transport key (`secrets_key`); a credential on its way to a robot is sealed
to the robot's own key, registered by its agent (`robot_key_set`), with the robot, the job and the
name bound in; a revealed secret is sealed to the key the asking CLI made for that one request.
See `herder.client.sealing`.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from herder.protocol.errors import HerderError
from herder.protocol.jobs import JobId
from herder.protocol.messages import Creating, EventData, Model, Request, matching
from herder.protocol.registry import Name
from herder.protocol.values import SafeText, check_value

SERVICE = "secrets"

SECRET_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
SecretName = Annotated[
    str,
    matching(SECRET_NAME_PATTERN, "must be 1 to 63 letters, digits, '.', '-' or '_', starting with a letter or digit"),
]
# A sealed box as text (see `herder.client.sealing.Sealed.text`), and an X25519 public key as text.
SealedText = Annotated[
    str, Field(min_length=1, max_length=64 * 1024), matching(r"[A-Za-z0-9_.-]+", "must be a sealed box")
]
PublicKeyText = Annotated[
    str, matching(r"[A-Za-z0-9_-]{43}", "must be an X25519 public key as base64url (43 characters)")
]

MAX_TEXT_CHARS = 10_000
MAX_JSON_BYTES = 64 * 1024
MAX_CALENDAR_DATES = 3660
MAX_USERNAME_CHARS = 256
MAX_SECRET_BYTES = 8 * 1024
MAX_DESCRIPTION_CHARS = 1000
MAX_PROCESSES = 100
# `credential list` flags a password expiring within this many days.
EXPIRY_WARNING_DAYS = 14


class AssetType(StrEnum):
    TEXT = "text"
    BOOL = "bool"
    INTEGER = "integer"
    JSON = "json"
    CALENDAR = "calendar"


class ScopeKind(StrEnum):
    GLOBAL = "global"
    GROUP = "group"
    ROBOT = "robot"


class Scope(Model):
    """Where a value applies: everywhere, to a robot group, or to one robot."""

    kind: ScopeKind = ScopeKind.GLOBAL
    name: Name | None = None

    @model_validator(mode="after")
    def _named_unless_global(self) -> Scope:
        if (self.kind is ScopeKind.GLOBAL) != (self.name is None):
            raise ValueError("a global scope names nothing; a group or robot scope names its group or robot")
        return self

    @classmethod
    def of(cls, *, robot: str | None = None, group: str | None = None) -> Scope:
        if robot is not None and group is not None:
            raise ValueError("give a robot or a group, not both")
        if robot is not None:
            return cls(kind=ScopeKind.ROBOT, name=robot)
        if group is not None:
            return cls(kind=ScopeKind.GROUP, name=group)
        return cls()

    def describe(self) -> str:
        return "global" if self.kind is ScopeKind.GLOBAL else f"{self.kind.value} {self.name}"


def parse_asset_value(kind: AssetType, value: Any) -> Any:
    """`value` as an asset of type `kind`, or `ValueError` naming the type. Integers and booleans are
    never confused (JSON's `true` is not 1); a calendar is a list of dates as YYYY-MM-DD, kept sorted
    and unique."""
    what = f"a {kind.value} asset's value"
    if kind is AssetType.TEXT:
        if not isinstance(value, str):
            raise ValueError(f"{what} is a string, not {type(value).__name__}")
        if len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"{what} holds up to {MAX_TEXT_CHARS:,} characters, not {len(value):,}")
        return _json_safe(value, what, MAX_JSON_BYTES)
    if kind is AssetType.BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"{what} is true or false, not {value!r}")
        return value
    if kind is AssetType.INTEGER:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} is a whole number, not {value!r}")
        return _json_safe(value, what, MAX_JSON_BYTES)
    if kind is AssetType.JSON:
        return _json_safe(value, what, MAX_JSON_BYTES)
    if not isinstance(value, list):
        raise ValueError(f"{what} is a list of dates (YYYY-MM-DD), the days it marks as non-working")
    if len(value) > MAX_CALENDAR_DATES:
        raise ValueError(f"{what} holds up to {MAX_CALENDAR_DATES} dates, not {len(value)}")
    days: set[date] = set()
    for n, day in enumerate(value):
        parsed = _DAY.fullmatch(day) if isinstance(day, str) else None
        try:
            if parsed is None:
                raise ValueError(day)
            days.add(date.fromisoformat(day))
        except ValueError:
            raise ValueError(
                f"value[{n}]: {day!r} is not a date as YYYY-MM-DD (a calendar asset holds dates)"
            ) from None
    return [day.isoformat() for day in sorted(days)]


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _json_safe(value: Any, what: str, max_bytes: int) -> Any:
    try:
        check_value(value, what="value", max_bytes=max_bytes)
    except HerderError as exc:
        raise ValueError(f"{what}: {exc.message}") from None
    return value


# --- assets ---


class AssetValue(Model):
    """One value of an asset, at one scope."""

    scope: Scope
    value: Any
    updated_at: datetime
    updated_by: str | None = None


class AssetInfo(Model):
    """An asset with all its values."""

    name: str
    type: AssetType
    description: str = ""
    robots_may_write: bool = False
    values: list[AssetValue] = Field(default_factory=list)
    created_at: datetime


class AssetSet(Creating, Request[AssetInfo]):
    """Set an asset's value at a scope; the first set creates the asset with its type."""

    service = SERVICE
    verb = "asset_set"

    name: SecretName
    type: AssetType | None = None  # needed to create; when given later, it must be the asset's
    value: Any
    scope: Scope = Field(default_factory=Scope)
    description: SafeText | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    robots_may_write: bool | None = None


class AssetResolved(Model):
    """The value a robot reads, and which scope it came from."""

    name: str
    type: AssetType
    value: Any
    scope: Scope


class AssetGet(Request[AssetResolved]):
    """The value of an asset as a robot reads it: the calling robot's own, or (for people) the robot named."""

    service = SERVICE
    verb = "asset_get"

    name: SecretName
    robot: Name | None = None


class AssetList(Model):
    assets: list[AssetInfo]


class AssetListRequest(Request[AssetList]):
    service = SERVICE
    verb = "asset_list"


class AssetDelete(Request[AssetInfo]):
    """Delete one value of an asset (`scope`), or the whole asset (no scope)."""

    service = SERVICE
    verb = "asset_delete"

    name: SecretName
    scope: Scope | None = None


class AssetWrite(Request[AssetResolved]):
    """A robot writes an asset it may write: the global value, or its own (`own`)."""

    service = SERVICE
    verb = "asset_write"

    name: SecretName
    value: Any
    own: bool = False


# --- credentials ---


class TransportKey(Model):
    """The key a secret is sealed to on its way to the service."""

    public_key: str


class TransportKeyRequest(Request[TransportKey]):
    service = SERVICE
    verb = "secrets_key"


class CredentialValue(Model):
    """One value of a credential, at one scope: never its secret."""

    scope: Scope
    username: str
    expires_on: date | None = None
    expired: bool = False
    expires_soon: bool = False
    updated_at: datetime
    updated_by: str | None = None


class CredentialInfo(Model):
    name: str
    description: str = ""
    robots_may_write: bool = False
    # The processes whose jobs may read it; empty: every process.
    processes: list[str] = Field(default_factory=list)
    values: list[CredentialValue] = Field(default_factory=list)
    created_at: datetime


class CredentialSet(Creating, Request[CredentialInfo]):
    """Set a credential's username and secret at a scope. The secret travels sealed to the service's
    transport key (`secrets_key`), in the context `credential_set_context`."""

    service = SERVICE
    verb = "credential_set"

    name: SecretName
    username: SafeText = Field(max_length=MAX_USERNAME_CHARS)
    sealed_secret: SealedText
    sealed_to: PublicKeyText
    scope: Scope = Field(default_factory=Scope)
    expires_on: date | None = None
    description: SafeText | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    robots_may_write: bool | None = None
    processes: list[Name] | None = Field(None, max_length=MAX_PROCESSES)


class CredentialList(Model):
    credentials: list[CredentialInfo]


class CredentialListRequest(Request[CredentialList]):
    service = SERVICE
    verb = "credential_list"


class CredentialDelete(Request[CredentialInfo]):
    """Delete one value of a credential (`scope`), or the whole credential (no scope)."""

    service = SERVICE
    verb = "credential_delete"

    name: SecretName
    scope: Scope | None = None


class SealedCredential(Model):
    """A credential for its reader: the username, and the secret sealed to the reader's key."""

    name: str
    username: str
    sealed_secret: str
    scope: Scope
    expires_on: date | None = None


class CredentialReveal(Request[SealedCredential]):
    """An operator reads a secret (with the right to), sealed to a key made for this request."""

    service = SERVICE
    verb = "credential_reveal"

    name: SecretName
    robot: Name | None = None  # the value that robot would read; else the global one
    reply_key: PublicKeyText


class CredentialFetch(Request[SealedCredential]):
    """A robot reads a credential for the job it runs, sealed to its registered key."""

    service = SERVICE
    verb = "credential_fetch"

    name: SecretName
    job_id: JobId


class CredentialWrite(Request[CredentialInfo]):
    """A robot writes a credential it may write (its own value with `own`, else the global one)."""

    service = SERVICE
    verb = "credential_write"

    name: SecretName
    username: SafeText = Field(max_length=MAX_USERNAME_CHARS)
    sealed_secret: SealedText
    sealed_to: PublicKeyText
    job_id: JobId
    own: bool = False


class RobotKey(Model):
    robot: str
    public_key: str
    registered_at: datetime


class RobotKeySet(Request[RobotKey]):
    """A robot agent registers its sealing key. The first key stays: a different one is refused until
    an operator resets it (`robot_key_reset`), so a stolen token alone cannot redirect credentials."""

    service = SERVICE
    verb = "robot_key_set"

    public_key: PublicKeyText


class RobotKeyReset(Request[RobotKey]):
    """Forget a robot's sealing key (it was reinstalled); its agent registers a new one when it starts."""

    service = SERVICE
    verb = "robot_key_reset"

    robot: Name


class RewrapReport(Model):
    """What a rewrap did: every stored secret's data key is now wrapped by the current master key,
    but for those that failed (which stay as they were)."""

    current_version: int
    versions_loaded: list[int]
    rewrapped: int
    # Stored secrets per master key version, after the rewrap.
    in_use: dict[str, int]
    failed: list[str] = Field(default_factory=list)


class SecretsRewrap(Request[RewrapReport]):
    """Load the master keys again (a version was added) and rewrap every data key under the current one."""

    service = SERVICE
    verb = "secrets_rewrap"


# --- contexts: what each sealed box is bound to ---


def credential_set_context(tenant: str, name: str, scope: Scope) -> tuple[str, ...]:
    return ("credential-set", tenant, name, scope.kind.value, scope.name or "")


def credential_write_context(tenant: str, robot: str, job_id: str, name: str) -> tuple[str, ...]:
    return ("credential-write", tenant, robot, job_id, name)


def credential_fetch_context(tenant: str, robot: str, job_id: str, name: str) -> tuple[str, ...]:
    return ("credential-fetch", tenant, robot, job_id, name)


def credential_reveal_context(tenant: str, name: str, reply_key: str) -> tuple[str, ...]:
    return ("credential-reveal", tenant, name, reply_key)


# --- events: who did what, never the value ---


class AssetChangedEvent(EventData):
    event_type: ClassVar[str] = "secrets.asset_changed"

    name: str
    scope: Scope | None
    change: str  # set | written | deleted


class CredentialChangedEvent(EventData):
    event_type: ClassVar[str] = "secrets.credential_changed"

    name: str
    scope: Scope | None
    change: str  # set | written | deleted
    # Where the change came from: a robot's host, or what the client said (`Hd-Origin`).
    origin: str | None = None


class CredentialReadEvent(EventData):
    event_type: ClassVar[str] = "secrets.credential_read"

    name: str
    scope: Scope
    reader: str
    robot: str | None = None
    job_id: str | None = None
    revealed: bool = False
    # Where the request came from, as the bus saw it (the connection's name).
    origin: str | None = None
