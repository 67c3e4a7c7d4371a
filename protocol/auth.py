"""Messages of the `auth` service: who a caller is, and the API tokens that say so."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import StringConstraints, field_validator

from herder.protocol.messages import Creating, EventData, Model, Request
from herder.protocol.subjects import DEFAULT_TENANT

SERVICE = "auth"

# Token names are short, lower-case, and safe in a subject, a file name and a table.
TokenName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", min_length=1, max_length=63)]


class PrincipalKind(StrEnum):
    """What sort of caller a principal is."""

    TOKEN = "token"
    ROBOT = "robot"
    USER = "user"
    # One of herder's own services, asking another with no caller behind it (a trigger firing).
    SERVICE = "service"


class Role(StrEnum):
    """Built-in roles; an API token carries exactly one. `robot` belongs to robot tokens alone."""

    ADMIN = "admin"
    OPERATOR = "operator"
    INTEGRATOR = "integrator"
    ROBOT = "robot"


class Permission(StrEnum):
    """Permissions that endpoints demand. `*` grants every one."""

    ALL = "*"
    TOKENS_MANAGE = "auth.tokens.manage"
    ROBOTS_READ = "registry.robots.read"
    ROBOTS_MANAGE = "registry.robots.manage"
    PACKAGES_READ = "packages.read"
    PACKAGES_PUBLISH = "packages.publish"
    JOBS_READ = "jobs.read"
    JOBS_START = "jobs.start"
    JOBS_STOP = "jobs.stop"
    QUEUES_READ = "queues.read"
    # Create queues, change their settings, delete and retry items by hand.
    QUEUES_MANAGE = "queues.manage"
    # Add items to queues (robots may too, with their own token).
    QUEUES_ADD = "queues.add"
    ASSETS_READ = "secrets.assets.read"
    # Set and delete assets.
    ASSETS_MANAGE = "secrets.assets.manage"
    # List credentials (names, usernames, scopes, expiry: never a secret).
    CREDENTIALS_READ = "secrets.credentials.read"
    CREDENTIALS_MANAGE = "secrets.credentials.manage"
    # See a credential's secret (`credential get --reveal`): admins only, until finer roles come.
    SECRETS_REVEAL = "secrets.reveal"
    # Rewrap the stored secrets under a new master key (`herder secrets rotate-key`): admins only.
    SECRETS_ROTATE = "secrets.rotate"
    # List and download the files of storage buckets.
    STORAGE_READ = "storage.read"
    # Upload and delete files in storage buckets.
    STORAGE_WRITE = "storage.write"
    # Create storage buckets, change their limits and who may use them, delete them.
    STORAGE_MANAGE = "storage.manage"
    # Add, enable, disable and remove triggers (firing one by hand takes jobs.start).
    TRIGGERS_MANAGE = "scheduler.triggers.manage"
    # What a robot agent may do with its own token: connect, heartbeat, report on its jobs, take,
    # add and finish queue items.
    ROBOT_AGENT = "robot.agent"


# What each role may do. An operator runs the fleet; an integrator starts and watches jobs.
ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.ADMIN: frozenset({Permission.ALL}),
    Role.OPERATOR: frozenset(
        {
            Permission.ROBOTS_READ,
            Permission.ROBOTS_MANAGE,
            Permission.PACKAGES_READ,
            Permission.PACKAGES_PUBLISH,
            Permission.JOBS_READ,
            Permission.JOBS_START,
            Permission.JOBS_STOP,
            Permission.QUEUES_READ,
            Permission.QUEUES_MANAGE,
            Permission.QUEUES_ADD,
            Permission.ASSETS_READ,
            Permission.ASSETS_MANAGE,
            Permission.CREDENTIALS_READ,
            Permission.CREDENTIALS_MANAGE,
            Permission.STORAGE_READ,
            Permission.STORAGE_WRITE,
            Permission.STORAGE_MANAGE,
            Permission.TRIGGERS_MANAGE,
        }
    ),
    Role.INTEGRATOR: frozenset(
        {
            Permission.ROBOTS_READ,
            Permission.PACKAGES_READ,
            Permission.JOBS_READ,
            Permission.JOBS_START,
            Permission.QUEUES_READ,
            Permission.QUEUES_ADD,
            Permission.ASSETS_READ,
            Permission.STORAGE_READ,
        }
    ),
    # Robots look up the packages they run by hand (attended runs); jobs bring theirs with them.
    Role.ROBOT: frozenset({Permission.ROBOT_AGENT, Permission.PACKAGES_READ}),
}


class Principal(Model):
    """The authenticated caller of a request: its name, tenant, role and permissions."""

    kind: PrincipalKind
    name: str
    tenant: str = DEFAULT_TENANT
    role: Role
    permissions: frozenset[str] = frozenset()
    token_id: str | None = None

    def can(self, permission: str) -> bool:
        """Whether this principal holds `permission`."""
        return Permission.ALL in self.permissions or permission in self.permissions


class TokenInfo(Model):
    """An API token as listed: never its secret."""

    id: str
    name: str
    role: Role
    tenant: str
    created_at: datetime
    created_by: str | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None


class TokenCreated(Model):
    """The reply to `token_create`: the only time the secret is shown."""

    token: TokenInfo
    secret: str


class TokenCreate(Creating, Request[TokenCreated]):
    """Create an API token for an integrator or operator."""

    service = SERVICE
    verb = "token_create"

    name: TokenName
    role: Role = Role.OPERATOR

    @field_validator("role")
    @classmethod
    def _not_robot(cls, role: Role) -> Role:
        if role is Role.ROBOT:
            raise ValueError("robot tokens are issued by 'herder robot add', not as API tokens")
        return role


class TokenList(Model):
    """The reply to `token_list`."""

    tokens: list[TokenInfo]


class TokenListRequest(Request[TokenList]):
    """List the tenant's API tokens; revoked ones only when asked."""

    service = SERVICE
    verb = "token_list"

    include_revoked: bool = False


class TokenRevoked(Model):
    """The reply to `token_revoke`."""

    token: TokenInfo


class TokenRevoke(Request[TokenRevoked]):
    """Revoke an API token by name; requests carrying it are refused from then on."""

    service = SERVICE
    verb = "token_revoke"

    name: TokenName


class WhoAmI(Request[Principal]):
    """Ask who the caller is."""

    service = SERVICE
    verb = "whoami"


class _TokenEvent(EventData):
    """What every token event says: which token, by name and role (never its secret or hash)."""

    token_id: str
    name: str
    role: Role


class TokenCreatedEvent(_TokenEvent):
    """An API token was created."""

    event_type: ClassVar[str] = "auth.token_created"


class TokenRevokedEvent(_TokenEvent):
    """An API token was revoked."""

    event_type: ClassVar[str] = "auth.token_revoked"


__all__ = [
    "ROLE_PERMISSIONS",
    "SERVICE",
    "Permission",
    "Principal",
    "PrincipalKind",
    "Role",
    "TokenCreate",
    "TokenCreated",
    "TokenCreatedEvent",
    "TokenInfo",
    "TokenList",
    "TokenListRequest",
    "TokenName",
    "TokenRevoke",
    "TokenRevoked",
    "TokenRevokedEvent",
    "WhoAmI",
]
