"""The JetStream streams, buckets and object stores herder's services keep (connecting is in `herder.client`)."""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from herder.protocol import subjects

EVENTS_MAX_AGE_S = 30 * 24 * 3600.0
EVENTS_DUPLICATE_WINDOW_S = 120.0
LOGS_MAX_AGE_S = 14 * 24 * 3600.0
LOGS_MAX_BYTES = 4 * 1024**3
# Durable requests wait this long for their service; one still unread after a week is dropped.
REQUESTS_MAX_AGE_S = 7 * 24 * 3600.0
REQUESTS_MAX_BYTES = 1024**3
# A request published again under the same `Nats-Msg-Id` within this window is stored once: as long as
# an idempotency key answers repeats (services/common/idempotency.py, IDEMPOTENCY_WINDOW_S).
REQUESTS_DUPLICATE_WINDOW_S = 24 * 3600.0


@dataclass(frozen=True)
class JetStreamSettings:
    """How herder's JetStream assets are stored: replicas is 1 on one node, 3 on a cluster."""

    replicas: int = 1


async def ensure_tenant(js: JetStreamContext, tenant: str, settings: JetStreamSettings) -> None:
    """Create (or update) the JetStream assets of one tenant: its event stream, its log stream, its
    stream of durable requests and the object store of its package archives."""
    await ensure_event_stream(js, tenant, settings)
    await ensure_log_stream(js, tenant, settings)
    await ensure_request_stream(js, tenant, settings)
    await ensure_object_store(js, subjects.packages_bucket(tenant), settings)


async def ensure_event_stream(js: JetStreamContext, tenant: str, settings: JetStreamSettings) -> None:
    """Create or update a tenant's event stream (`hd.<tenant>.evt.>`), keeping 30 days of events."""
    await _ensure_stream(
        js,
        StreamConfig(
            name=subjects.events_stream(tenant),
            description=f"herder state-change events of tenant {tenant}",
            subjects=[subjects.events_stream_subjects(tenant)],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=EVENTS_MAX_AGE_S,
            duplicate_window=EVENTS_DUPLICATE_WINDOW_S,
            num_replicas=settings.replicas,
        ),
    )


async def ensure_log_stream(js: JetStreamContext, tenant: str, settings: JetStreamSettings) -> None:
    """Create or update a tenant's log stream (`hd.<tenant>.tel.*.log.*`): jobs' log lines, 14 days or 4 GiB."""
    await _ensure_stream(
        js,
        StreamConfig(
            name=subjects.logs_stream(tenant),
            description=f"herder job logs of tenant {tenant}, one subject per job",
            subjects=[subjects.logs_stream_subjects(tenant)],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=LOGS_MAX_AGE_S,
            max_bytes=LOGS_MAX_BYTES,
            duplicate_window=EVENTS_DUPLICATE_WINDOW_S,
            num_replicas=settings.replicas,
        ),
    )


async def ensure_request_stream(js: JetStreamContext, tenant: str, settings: JetStreamSettings) -> None:
    """Create or update a tenant's stream of durable requests (`hd.<tenant>.req.>`), on file, each
    request kept until its service has dealt with it (a week at most)."""
    await _ensure_stream(
        js,
        StreamConfig(
            name=subjects.requests_stream(tenant),
            description=f"herder durable requests of tenant {tenant}, kept until served",
            subjects=[subjects.requests_stream_subjects(tenant)],
            # Work-queue retention: a request leaves the stream once its service acknowledges it. The
            # verdict is in the service's table, so the stream holds only what is still to be done,
            # and a request's token (in its headers) does not linger on disk after it was used. The
            # duplicate window outlives the message: a publish retried after the request was served
            # is still recognised and stored no second time.
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            # A full stream refuses the publisher (who then knows), rather than dropping an older
            # request nobody would hear of.
            discard=DiscardPolicy.NEW,
            max_age=REQUESTS_MAX_AGE_S,
            max_bytes=REQUESTS_MAX_BYTES,
            duplicate_window=REQUESTS_DUPLICATE_WINDOW_S,
            num_replicas=settings.replicas,
        ),
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError:
            pass  # created meanwhile by another process
    await js.update_stream(config)


async def ensure_bucket(js: JetStreamContext, bucket: str, settings: JetStreamSettings) -> KeyValue:
    """Open the KV bucket `bucket`, creating it first if it does not exist."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=settings.replicas)
        )


async def ensure_object_store(js: JetStreamContext, bucket: str, settings: JetStreamSettings) -> ObjectStore:
    """Open the object store `bucket`, creating it first if it does not exist."""
    try:
        return await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_object_store(
                bucket, ObjectStoreConfig(bucket=bucket, storage=StorageType.FILE, replicas=settings.replicas)
            )
        except nats.js.errors.BadRequestError:
            return await js.object_store(bucket)  # created meanwhile by another process
