"""The fence: what each kind of principal may publish and subscribe to on the bus, per tenant. Pure.

nats-server enforces these lists, not herder: the auth service hands each connecting principal a
user JWT carrying exactly its permissions (the auth callout), and the server refuses any publish
or subscription outside them. So

- a **robot** hears only its own command subject and its own inbox, publishes only its own
  telemetry and the few verbs robots call, answers the commands it gets, and reads the package
  archives of its tenant;
- a **client** (the CLI, an integrator's script in any language) sends requests to its tenant's
  services, hears only its own inbox, and reads its tenant's events, job logs and package
  archives through JetStream (never writes into them; operators may upload archives); a client
  whose role may start jobs also publishes durable job requests into its tenant's request stream
  (`hd.<tenant>.req.jobs`, where only the jobs service reads them: their tokens stay with services);
- a **service** connects with the stack's service credential, which the callout exempts, and may
  do anything.

No connection but a service's can see another principal's requests (their tokens), heartbeats or
commands. Tenants are fenced by the same lists: every subject, stream and bucket named here is
one tenant's.

A principal's inbox (where replies reach it) is `_INBOX_<digest>` with the digest derived from its
token, so that a client can name it before it connects and nobody else can listen there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from herder.protocol import subjects

# Every herder client that is not a service sets this inbox prefix; nats-py's default `_INBOX`
# would be outside its permissions.
INBOX_PREFIX = "_INBOX_"
_INBOX_DIGEST_CHARS = 32
_INBOX_SALT = b"herder-inbox:"

# The verbs a robot calls with its own token (service, verb). A later issue that gives robots a
# verb adds it here, and only here.
ROBOT_VERBS: tuple[tuple[str, str], ...] = (
    ("registry", "robot_connect"),
    ("registry", "robot_goodbye"),
    ("jobs", "report"),
    ("jobs", "resume"),
    ("jobs", "robot_start"),
    ("jobs", "robot_job"),
    ("packages", "resolve"),
    ("queues", "item_add"),
    ("queues", "item_next"),
    ("queues", "item_result"),
    ("queues", "item_postpone"),
    ("queues", "item_progress"),
    ("secrets", "secrets_key"),
    ("secrets", "asset_get"),
    ("secrets", "asset_write"),
    ("secrets", "credential_fetch"),
    ("secrets", "credential_write"),
    ("secrets", "robot_key_set"),
    ("storage", "file_list"),
    ("storage", "file_delete"),
    ("storage", "download"),
    ("storage", "upload_begin"),
    ("storage", "upload_chunk"),
    ("storage", "upload_end"),
    ("storage", "upload_cancel"),
)

# The NATS service API's discovery subjects: a client may ask who serves what (`herder status`).
_DISCOVERY = "$SRV.>"
_JS_ACCOUNT_INFO = "$JS.API.INFO"
# The subject nats-server sends authorization requests to; only the auth service listens there.
AUTH_CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"


def inbox_prefix(token: str) -> str:
    """The inbox prefix of the principal holding `token`: `_INBOX_` and 32 hex digits of a salted
    SHA-256 of it (never the token's own hash, which keys the token store)."""
    digest = hashlib.sha256(_INBOX_SALT + token.encode()).hexdigest()[:_INBOX_DIGEST_CHARS]
    return f"{INBOX_PREFIX}{digest}"


@dataclass(frozen=True, slots=True)
class BusPermissions:
    """What one connection may publish and subscribe to; `allow_responses` lets it answer requests
    it received (one reply each), wherever they asked to be answered."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def _stream_reader(stream: str) -> tuple[str, ...]:
    """The JetStream API calls that read one stream through consumers of one's own: look it up,
    create, inspect, pull from and delete consumers, fetch single messages, answer flow control.
    Not durable consumers, not purges, not writes."""
    api = "$JS.API"
    return (
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.FC.{stream}.>",
        f"$JS.ACK.{stream}.>",
    )


def robot_permissions(tenant: str, robot: str, token: str) -> BusPermissions:
    """A robot's: its commands and inbox; its telemetry, the robot verbs and its tenant's packages."""
    verbs = tuple(subjects.service(tenant, service, verb) for service, verb in ROBOT_VERBS)
    return BusPermissions(
        publish=(
            f"{subjects.PREFIX}.{subjects.check_tenant(tenant)}.tel.{subjects.check_token(robot, 'robot')}.>",
            *verbs,
            *_stream_reader(subjects.object_store_stream(subjects.packages_bucket(tenant))),
        ),
        subscribe=(subjects.command_listen(tenant, robot), f"{inbox_prefix(token)}.>"),
        allow_responses=True,
    )


def client_permissions(tenant: str, token: str, *, uploads_packages: bool, starts_jobs: bool = False) -> BusPermissions:
    """A client's: requests to its tenant's services and its own inbox; reading its tenant's events,
    logs and packages; uploading package archives when its role may publish packages; publishing
    durable job requests (`hd.<tenant>.req.jobs`) when its role may start jobs."""
    bucket = subjects.packages_bucket(tenant)
    uploads = subjects.object_store_writes(bucket) if uploads_packages else ()
    job_requests = (subjects.job_requests(tenant),) if starts_jobs else ()
    return BusPermissions(
        publish=(
            f"{subjects.PREFIX}.{subjects.check_tenant(tenant)}.svc.>",
            *job_requests,
            *_stream_reader(subjects.events_stream(tenant)),
            *_stream_reader(subjects.logs_stream(tenant)),
            *_stream_reader(subjects.object_store_stream(bucket)),
            *uploads,
            _DISCOVERY,
            _JS_ACCOUNT_INFO,
        ),
        subscribe=(f"{inbox_prefix(token)}.>",),
    )


__all__ = [
    "AUTH_CALLOUT_SUBJECT",
    "INBOX_PREFIX",
    "ROBOT_VERBS",
    "BusPermissions",
    "client_permissions",
    "inbox_prefix",
    "robot_permissions",
]
