"""The auth service's decisions, free of I/O: principals of tokens, revocation, the bootstrap admin, and
how the fence admits a connection."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from herder.protocol.auth import ROLE_PERMISSIONS, Permission, Principal, PrincipalKind, Role, TokenInfo
from herder.protocol.errors import Conflict, Unauthenticated
from herder.protocol.fence import BusPermissions, client_permissions, robot_permissions

# The name of the admin token the stack creates for itself on first start.
BOOTSTRAP_TOKEN_NAME = "admin"
SYSTEM_ACTOR = "herder"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One row of `auth_tokens`."""

    id: str
    tenant: str
    name: str
    role: Role
    token_hash: str
    created_at: datetime
    created_by: str | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    @property
    def live(self) -> bool:
        """Whether the token still opens doors."""
        return self.revoked_at is None

    def principal(self) -> Principal:
        """The principal a request carrying this token acts as."""
        return Principal(
            kind=PrincipalKind.TOKEN,
            name=self.name,
            tenant=self.tenant,
            role=self.role,
            permissions=ROLE_PERMISSIONS[self.role],
            token_id=self.id,
        )

    def info(self) -> TokenInfo:
        """The token as shown to people: everything but the hash."""
        return TokenInfo(
            id=self.id,
            name=self.name,
            role=self.role,
            tenant=self.tenant,
            created_at=self.created_at,
            created_by=self.created_by,
            revoked_at=self.revoked_at,
            revoked_by=self.revoked_by,
        )


def check_revoke(token: TokenRecord, live_admins: int) -> None:
    """Refuse to revoke the tenant's last live admin token: nobody could create another."""
    if token.role is Role.ADMIN and live_admins <= 1:
        raise Conflict(
            f"{token.name!r} is the last admin token of tenant {token.tenant!r}; "
            "create another admin token before revoking it"
        )


class BootstrapAction(StrEnum):
    """What the stack does about its own admin token at start-up."""

    KEEP = "keep"  # the token it already holds is a live admin token
    CREATE = "create"  # the tenant has no admin token: make the first
    ROTATE = "rotate"  # admin tokens exist but the stack lost its own: replace the bootstrap token
    NONE = "none"  # admin tokens exist elsewhere; leave them be


def plan_bootstrap(*, held_token_is_admin: bool, live_admins: int, may_rotate: bool) -> BootstrapAction:
    """Decide how the stack gets an admin token it can write to its context file."""
    if held_token_is_admin:
        return BootstrapAction.KEEP
    if live_admins == 0:
        return BootstrapAction.CREATE
    return BootstrapAction.ROTATE if may_rotate else BootstrapAction.NONE


@dataclass(frozen=True, slots=True)
class Admission:
    """How the fence admits one connection: the name it goes by on the bus and what it may do there."""

    name: str
    permissions: BusPermissions


# A connection's name on the bus is `<kind>/<tenant>/<principal>/<token hash>`: nats-server shows it
# as the connection's user, so that the connections of one token can be found and closed.
_CONNECTION_NAME_PARTS = 4


def connection_name(principal: Principal, token_hash: str) -> str:
    """The name a principal's connection goes by on the bus."""
    return f"{principal.kind.value}/{principal.tenant}/{principal.name}/{token_hash}"


def token_hash_of(name: str) -> str | None:
    """The token hash in a connection's name, or None when the connection is not a principal's (a service's)."""
    parts = name.split("/")
    if len(parts) != _CONNECTION_NAME_PARTS or parts[0] not in {kind.value for kind in PrincipalKind}:
        return None
    return parts[3] if len(parts[3]) == TOKEN_HASH_CHARS else None


TOKEN_HASH_CHARS = 64


def admit(principal: Principal | None, token: str, token_hash: str) -> Admission:
    """The admission of a connection presenting `token` (whose hash is `token_hash`), or `Unauthenticated`
    when no live principal holds it."""
    if principal is None:
        raise Unauthenticated("the token is unknown or revoked")
    name = connection_name(principal, token_hash)
    if principal.kind is PrincipalKind.ROBOT:
        return Admission(name=name, permissions=robot_permissions(principal.tenant, principal.name, token))
    uploads = principal.can(Permission.PACKAGES_PUBLISH)
    starts = principal.can(Permission.JOBS_START)
    permissions = client_permissions(principal.tenant, token, uploads_packages=uploads, starts_jobs=starts)
    return Admission(name=name, permissions=permissions)
