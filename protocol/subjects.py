"""Every NATS subject herder uses is built here, and only here.

Subjects carry the tenant right after the fixed prefix, so NATS permissions can
fence a tenant or a robot by subject:

    hd.<tenant>.svc.<service>.<verb>     requests to services (queue group = service)
    hd.<tenant>.cmd.<host>.<agent>       commands to a robot or a host's _coordinator
    hd.<tenant>.evt.<domain>.<event>     state changes, kept in the HERDER_EVENTS stream
    hd.<tenant>.tel.<robot>.<kind>       heartbeats, logs, screenshots
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from herder.protocol.errors import BadRequest

PREFIX = "hd"
ANY = "*"
COORDINATOR = "_coordinator"
DEFAULT_TENANT = "default"

EVENTS_STREAM = "HERDER_EVENTS"
EVENTS_STREAM_SUBJECTS = f"{PREFIX}.*.evt.>"
TOKENS_BUCKET = "HERDER_TOKENS"

MAX_TOKEN_LENGTH = 128
# Printable, no whitespace, none of NATS's separators or wildcards.
_TOKEN = re.compile(rf"[^\s.*>\x00-\x1f\x7f]{{1,{MAX_TOKEN_LENGTH}}}")


def check_token(value: str, what: str = "subject token") -> str:
    """Return `value` if it can stand as one subject token, else raise `BadRequest` saying why."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} must not be empty")
    if _TOKEN.fullmatch(value) is None:
        if len(value) > MAX_TOKEN_LENGTH:
            raise BadRequest(f"{what} {value[:20]!r}… is longer than {MAX_TOKEN_LENGTH} characters")
        raise BadRequest(f"{what} {value!r} must not contain dots, wildcards, spaces or control characters")
    return value


def _join(*tokens: tuple[str, str]) -> str:
    return ".".join([PREFIX, *(check_token(value, what) for value, what in tokens)])


def service(tenant: str, service_name: str, verb: str) -> str:
    """`hd.<tenant>.svc.<service>.<verb>`: where a service answers a verb for a tenant."""
    return _join((tenant, "tenant"), ("svc", "kind"), (service_name, "service"), (verb, "verb"))


def service_listen(service_name: str, verb: str) -> str:
    """The subject a service subscribes to: its verb, for every tenant."""
    return ".".join([PREFIX, ANY, "svc", check_token(service_name, "service"), check_token(verb, "verb")])


def command(tenant: str, host: str, agent: str) -> str:
    """`hd.<tenant>.cmd.<host>.<agent>`: commands to one robot, or to a host's `_coordinator`."""
    return _join((tenant, "tenant"), ("cmd", "kind"), (host, "host"), (agent, "agent"))


def event(tenant: str, domain: str, name: str) -> str:
    """`hd.<tenant>.evt.<domain>.<event>`: one state-change event."""
    return _join((tenant, "tenant"), ("evt", "kind"), (domain, "domain"), (name, "event"))


def event_type_subject(tenant: str, event_type: str) -> str:
    """The subject of an event type written `domain.event`, e.g. `auth.token_created`."""
    domain, sep, name = event_type.partition(".")
    if not sep:
        raise BadRequest(f"event type {event_type!r} must be written domain.event")
    return event(tenant, domain, name)


def telemetry(tenant: str, robot: str, kind: str) -> str:
    """`hd.<tenant>.tel.<robot>.<kind>`: heartbeats, logs and screenshots of one robot."""
    return _join((tenant, "tenant"), ("tel", "kind"), (robot, "robot"), (kind, "telemetry kind"))


def events_filter(pattern: str | None = None, tenant: str = ANY) -> str:
    """A subject filter over the event stream.

    `None` or `>` means every event of `tenant`; `auth.>` or `auth.token_created` is
    relative to the tenant's events; a pattern starting with `hd.` is taken as written.
    """
    if tenant != ANY:
        check_token(tenant, "tenant")
    if not pattern or pattern == ">":
        return f"{PREFIX}.{tenant}.evt.>"
    if pattern.startswith(PREFIX + "."):
        _check_filter(pattern)
        if pattern.split(".")[2:3] not in (["evt"], ["*"]):
            raise BadRequest(f"event filter {pattern!r} must match hd.<tenant>.evt.…")
        return pattern
    _check_filter(pattern)
    return f"{PREFIX}.{tenant}.evt.{pattern}"


def _check_filter(pattern: str) -> None:
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        if part in ("*", ">"):
            if part == ">" and i != len(parts) - 1:
                raise BadRequest(f"in filter {pattern!r}, '>' may only come last")
            continue
        check_token(part, "filter token")


@dataclass(frozen=True, slots=True)
class ServiceSubject:
    """A parsed service subject."""

    tenant: str
    service: str
    verb: str


def parse_service(subject: str) -> ServiceSubject:
    """Split `hd.<tenant>.svc.<service>.<verb>` into its parts, or raise `BadRequest`."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != PREFIX or parts[2] != "svc":
        raise BadRequest(f"{subject!r} is not a service subject hd.<tenant>.svc.<service>.<verb>")
    return ServiceSubject(tenant=parts[1], service=parts[3], verb=parts[4])


@dataclass(frozen=True, slots=True)
class EventSubject:
    """A parsed event subject."""

    tenant: str
    domain: str
    name: str

    @property
    def type(self) -> str:
        """The event type, `domain.event`."""
        return f"{self.domain}.{self.name}"


def parse_event(subject: str) -> EventSubject:
    """Split `hd.<tenant>.evt.<domain>.<event>` into its parts, or raise `BadRequest`."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != PREFIX or parts[2] != "evt":
        raise BadRequest(f"{subject!r} is not an event subject hd.<tenant>.evt.<domain>.<event>")
    return EventSubject(tenant=parts[1], domain=parts[3], name=parts[4])
