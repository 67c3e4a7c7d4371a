"""The base models every herder message is built on."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from herder.protocol import subjects
from herder.protocol.version import SCHEMA_VERSION


class Model(BaseModel):
    """A message on the wire. Replies and events ignore fields they do not know, so older peers
    keep working when a newer one adds a field."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: ClassVar[int] = SCHEMA_VERSION


def matching(pattern: str, rule: str) -> AfterValidator:
    """A validator for text that must match `pattern`, failing with `rule` in words ("must be …"),
    not with the pattern: people and other programs read these errors."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise ValueError(rule)
        return value

    checker: Callable[[str], str] = check
    return AfterValidator(checker)


ReplyT = TypeVar("ReplyT", bound=Model)


class Request(Model, Generic[ReplyT]):
    """A request to one service verb; `ReplyT` is the model of its successful reply.

    Subclasses set `service` and `verb`; the subject is `hd.<tenant>.svc.<service>.<verb>`.
    Requests refuse unknown fields: a misspelt field is an error, not a silent no-op.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    service: ClassVar[str]
    verb: ClassVar[str]
    reply_model: ClassVar[type[Model]]
    # Whether the verb creates something, and so honours an idempotency key: see `Creating`.
    creates: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        for base in cls.__mro__:
            metadata = getattr(base, "__pydantic_generic_metadata__", None)
            if metadata and metadata["origin"] is Request and metadata["args"]:
                cls.reply_model = metadata["args"][0]
                break
        # Set here rather than inherited, so the order of the bases cannot hide the mixin.
        cls.creates = issubclass(cls, Creating)


IDEMPOTENCY_KEY_PATTERN = r"[A-Za-z0-9._:-]{1,64}"
IDEMPOTENCY_KEY_RULE = "must be 1 to 64 letters, digits or . _ : - (a random one: 32 hex digits will do)"


class Creating(Model):
    """The mixin of every request that creates something (a job, a robot, a token, a package version).

    A creating verb honours an idempotency key: a repeat of the request under the same key, within
    24 hours, returns the first reply instead of creating a second object. The key rides in the
    `Nats-Msg-Id` header, or, for JSON callers whose NATS client makes headers awkward, in this
    `request_id` field; when both are given, the header wins. The key should be random (herder's
    client sends 128 random bits): whoever presents it gets the first reply back, secrets included.

        class JobStart(Creating, Request[JobInfo]):
            ...
    """

    # Requests refuse unknown fields; said here too, so the mixin can stand on either side of `Request`.
    model_config = ConfigDict(frozen=True, extra="forbid")

    creates: ClassVar[bool] = True

    # Left out of the encoded request when absent: most callers key by the header.
    request_id: Annotated[str, matching(IDEMPOTENCY_KEY_PATTERN, IDEMPOTENCY_KEY_RULE)] | None = Field(
        None, exclude_if=lambda key: key is None
    )


class Empty(Model):
    """A reply with nothing to say beyond success."""


class ErrorBody(Model):
    """The body of an error reply; the same fields ride in the `Nats-Service-Error*` headers."""

    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str | None = None


def new_id() -> str:
    """A fresh random identifier: 128 random bits as 32 hex digits."""
    return os.urandom(16).hex()


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class EventData(Model):
    """The payload of one kind of event; subclasses name their type as `domain.event`."""

    event_type: ClassVar[str]


class Event(Model):
    """A state change, as kept in the HERDER_EVENTS stream."""

    id: str
    type: str
    tenant: str
    time: datetime
    actor: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, data: EventData, *, tenant: str, actor: str | None) -> Event:
        """Wrap a typed payload in an envelope with a fresh id and the current time."""
        return cls(
            id=new_id(),
            type=data.event_type,
            tenant=tenant,
            time=utcnow(),
            actor=actor,
            data=data.model_dump(mode="json"),
        )

    @property
    def subject(self) -> str:
        """`hd.<tenant>.evt.<domain>.<event>`."""
        return subjects.event_type_subject(self.tenant, self.type)


class DatabaseHealth(Model):
    """How a service instance sees its database."""

    ok: bool
    dialect: str
    latency_ms: float | None = None
    error: str | None = None


class ComponentHealth(Model):
    """One background component of a service instance (a sweep, a mirror of a bucket): running,
    restarting after a failure, or stopped; with its last failure, in one line."""

    name: str
    status: str
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None


class HealthReply(Model):
    """What `health` answers: the instance, its uptime, its database and its background components."""

    service: str
    version: str
    instance: str
    uptime_s: float
    database: DatabaseHealth | None = None
    components: list[ComponentHealth] = Field(default_factory=list)


class HealthCheck(Request[HealthReply]):
    """Ask a service how it is; every service answers `health`, so the caller names the service."""

    service = ""
    verb = "health"
