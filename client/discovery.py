"""What runs on the bus, from the NATS service API (`$SRV.PING|INFO|STATS`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

GATHER_TIMEOUT_S = 1.0
# Replies come from every instance at once; this long without one means they are all in.
QUIET_S = 0.15


@dataclass
class ServiceSummary:
    """One service across all its instances."""

    name: str
    versions: set[str] = field(default_factory=set)
    instances: int = 0
    requests: int = 0
    errors: int = 0
    processing_ns: int = 0

    @property
    def average_ms(self) -> float | None:
        """Average processing time per request, in milliseconds."""
        return self.processing_ns / self.requests / 1e6 if self.requests else None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "name": self.name,
            "versions": sorted(self.versions),
            "instances": self.instances,
            "requests": self.requests,
            "errors": self.errors,
            "average_ms": None if self.average_ms is None else round(self.average_ms, 3),
        }


def summarize(stats: Iterable[dict[str, Any]]) -> list[ServiceSummary]:
    """Fold `$SRV.STATS` replies (one per instance) into one summary per service, by name."""
    summaries: dict[str, ServiceSummary] = {}
    for reply in stats:
        name = reply.get("name")
        if not isinstance(name, str):
            continue
        summary = summaries.setdefault(name, ServiceSummary(name=name))
        summary.instances += 1
        if reply.get("version"):
            summary.versions.add(str(reply["version"]))
        for endpoint in reply.get("endpoints") or []:
            summary.requests += int(endpoint.get("num_requests", 0))
            summary.errors += int(endpoint.get("num_errors", 0))
            summary.processing_ns += int(endpoint.get("processing_time", 0))
    return sorted(summaries.values(), key=lambda summary: summary.name)


async def gather(nc: NATS, verb: str = "STATS", timeout: float = GATHER_TIMEOUT_S) -> list[dict[str, Any]]:
    """Ask every service instance on the bus (`$SRV.<verb>`) and collect the replies."""
    return await gather_replies(nc, f"$SRV.{verb}", timeout=timeout)


async def gather_replies(
    nc: NATS, subject: str, payload: bytes = b"", *, timeout: float = GATHER_TIMEOUT_S, quiet_s: float = QUIET_S
) -> list[dict[str, Any]]:
    """Publish to `subject`, which many answer (every service instance, every server), and collect
    their JSON replies until `quiet_s` passes without one, or `timeout`."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    last_seen = time.monotonic()

    async def collect(msg: Msg) -> None:
        nonlocal last_seen
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            return
        last_seen = time.monotonic()

    subscription = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(subject, payload, reply=inbox)
        await nc.flush()
        deadline = time.monotonic() + timeout
        while (now := time.monotonic()) < deadline:
            if replies and now - last_seen >= quiet_s:
                break
            await asyncio.sleep(min(quiet_s / 3, deadline - now))
    finally:
        # On a connection closing under us this fails; it must not replace what is propagating.
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
    return replies
