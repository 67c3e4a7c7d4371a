"""Every NATS subject herder uses is built here, and only here.

Subjects carry the tenant right after the fixed prefix, so NATS permissions can
fence a tenant or a robot by subject:

    hd.<tenant>.svc.<service>.<verb>     requests to services (queue group = service)
    hd.<tenant>.cmd.<host>.<agent>       commands to a robot or a host's _coordinator
    hd.<tenant>.evt.<domain>.<event>     state changes, kept in the HERDER_EVENTS stream
    hd.<tenant>.tel.<robot>.<kind>       heartbeats, logs, screenshots
    hd.<tenant>.tel.<robot>.log.<job>    one job's log lines, kept in the HERDER_LOGS stream
    hd.<tenant>.req.<service>            durable requests, kept in the HERDER_REQUESTS stream until
                                         served (`hd.<tenant>.req.jobs`: job requests of integrators)
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from herder.protocol.errors import BadRequest

PREFIX = "hd"
ANY = "*"
COORDINATOR = "_coordinator"
DEFAULT_TENANT = "default"

TOKENS_BUCKET = "HERDER_TOKENS"
ROBOTS_BUCKET = "HERDER_ROBOTS"
HEARTBEAT = "heartbeat"
LOG = "log"
# The kind of subject durable requests are published on: `hd.<tenant>.req.<service>`.
REQUESTS = "req"
# Stands for "no robot" where a subject needs one: the log of a job that never reached a robot.
NO_ROBOT = "_"

MAX_TOKEN_LENGTH = 128
# Printable, no whitespace, none of NATS's separators or wildcards.
_TOKEN = re.compile(rf"[^\s.*>\x00-\x1f\x7f]{{1,{MAX_TOKEN_LENGTH}}}")
# Tenant names stand in subjects and in the names of JetStream streams and buckets.
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def events_stream(tenant: str) -> str:
    """The JetStream stream of a tenant's events: `HERDER_EVENTS_<tenant>`, holding `hd.<tenant>.evt.>`.

    Each tenant's events, logs and packages live in JetStream assets of their own, so that the bus
    fences a tenant by stream, and one tenant's volume never evicts another's history.
    """
    return f"HERDER_EVENTS_{check_tenant(tenant)}"


def events_stream_subjects(tenant: str) -> str:
    """What a tenant's event stream holds."""
    return f"{PREFIX}.{check_tenant(tenant)}.evt.>"


def logs_stream(tenant: str) -> str:
    """The JetStream stream of a tenant's job logs: `HERDER_LOGS_<tenant>`, holding `hd.<tenant>.tel.*.log.*`."""
    return f"HERDER_LOGS_{check_tenant(tenant)}"


def logs_stream_subjects(tenant: str) -> str:
    """What a tenant's log stream holds."""
    return f"{PREFIX}.{check_tenant(tenant)}.tel.*.{LOG}.*"


def requests_stream(tenant: str) -> str:
    """The JetStream stream of a tenant's durable requests: `HERDER_REQUESTS_<tenant>`, holding `hd.<tenant>.req.>`.

    A request published there waits for its service, however long that service is down, and is
    removed once the service has answered it."""
    return f"HERDER_REQUESTS_{check_tenant(tenant)}"


def requests_stream_subjects(tenant: str) -> str:
    """What a tenant's stream of durable requests holds."""
    return f"{PREFIX}.{check_tenant(tenant)}.{REQUESTS}.>"


def job_requests(tenant: str) -> str:
    """`hd.<tenant>.req.jobs`: where integrators publish durable job requests (JetStream keeps them)."""
    return _join((tenant, "tenant"), (REQUESTS, "kind"), ("jobs", "service"))


def packages_bucket(tenant: str) -> str:
    """The object store of a tenant's package archives: `HERDER_PACKAGES_<tenant>`, objects named by sha256."""
    return f"HERDER_PACKAGES_{check_tenant(tenant)}"


def storage_bucket(tenant: str) -> str:
    """The object store of a tenant's storage buckets' files: `HERDER_STORAGE_<tenant>`, one object per
    file (named `<bucket id>/<path>`), and each chunk of an upload in progress staged as its own object."""
    return f"HERDER_STORAGE_{check_tenant(tenant)}"


def object_store_stream(bucket: str) -> str:
    """The JetStream stream behind an object store."""
    return f"OBJ_{bucket}"


def object_chunks(bucket: str, nuid: str) -> str:
    """Where the chunks of one object of an object store are: `$O.<bucket>.C.<nuid>`."""
    return f"$O.{bucket}.C.{check_token(nuid, 'object id')}"


def object_meta(bucket: str, name: str) -> str:
    """Where the metadata of the object `name` of an object store is: `$O.<bucket>.M.<name in base64url>`."""
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def object_store_writes(bucket: str) -> tuple[str, str]:
    """The subjects an upload to an object store publishes to: its chunks and its metadata."""
    return (f"$O.{bucket}.C.>", f"$O.{bucket}.M.>")


def check_tenant(tenant: str) -> str:
    """`tenant` if it is a tenant name (it names subjects and JetStream assets), else `BadRequest`."""
    if not isinstance(tenant, str) or _TENANT.fullmatch(tenant) is None:
        raise BadRequest(
            f"tenant {tenant!r} must be 1 to 32 lower-case letters, digits, '-' or '_', starting with a letter or digit"
        )
    return tenant


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


def command_listen(tenant: str, agent: str) -> str:
    """Every command to `agent`, whichever host it is addressed to: what a robot agent subscribes to
    before it knows its host (a robot's name is unique in its tenant)."""
    return ".".join([PREFIX, check_token(tenant, "tenant"), "cmd", ANY, check_token(agent, "agent")])


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


def heartbeat(tenant: str, robot: str) -> str:
    """`hd.<tenant>.tel.<robot>.heartbeat`: a robot's heartbeats."""
    return telemetry(tenant, robot, HEARTBEAT)


def heartbeat_listen() -> str:
    """Every robot's heartbeats, of every tenant: what the registry subscribes to."""
    return f"{PREFIX}.{ANY}.tel.{ANY}.{HEARTBEAT}"


def job_log(tenant: str, robot: str, job_id: str) -> str:
    """`hd.<tenant>.tel.<robot>.log.<job>`: the log lines of one job as its robot runs it."""
    return ".".join([telemetry(tenant, robot, LOG), check_token(job_id, "job id")])


def job_log_filter(tenant: str, job_id: str) -> str:
    """Every log line of one job, whichever robot wrote it."""
    return f"{PREFIX}.{check_token(tenant, 'tenant')}.tel.{ANY}.{LOG}.{check_token(job_id, 'job id')}"


def parse_telemetry(subject: str) -> tuple[str, str, str]:
    """(tenant, robot, kind) of `hd.<tenant>.tel.<robot>.<kind>[...]`, or `BadRequest`."""
    parts = subject.split(".")
    if len(parts) < 5 or parts[0] != PREFIX or parts[2] != "tel":
        raise BadRequest(f"{subject!r} is not a telemetry subject hd.<tenant>.tel.<robot>.<kind>")
    return parts[1], parts[3], parts[4]


def robot_key(tenant: str, robot: str) -> str:
    """The key of a robot in the HERDER_ROBOTS bucket: `<tenant>.<robot>`."""
    return f"{check_token(tenant, 'tenant')}.{check_token(robot, 'robot')}"


def events_filter(pattern: str | None = None, tenant: str = ANY) -> str:
    """A subject filter over the event stream.

    `None` or `>` means every event of `tenant`; a bare domain (`jobs`) means all of its events;
    `auth.>` or `auth.token_created` is relative to the tenant's events; a pattern starting with
    `hd.` is taken as written.
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
    if "." not in pattern and pattern != "*":
        pattern += ".>"
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
