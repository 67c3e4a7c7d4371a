"""`herder tap`: state-change events, live, one line each."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import timedelta
from typing import Annotated, Any

import typer
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from herder.cli.context import (
    BundleOption,
    DataDirOption,
    JsonOption,
    Target,
    TokenFileOption,
    UrlOption,
    connected,
    resolve,
)
from herder.cli.output import fail, run
from herder.protocol import codec, subjects
from herder.protocol.errors import BadRequest
from herder.protocol.messages import Event, utcnow

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Payload fields that are noise on a one-line view (they stay in --json).
_SKIP = frozenset({"token_id"})


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `2h`, `1d`, `1h30m`: a duration, or `BadRequest`."""
    position, seconds = 0, 0.0
    for match in _DURATION.finditer(text.strip()):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not text.strip() or position != len(text.strip()):
        raise BadRequest(f"{text!r} is not a duration; write it like 30s, 15m, 2h or 1d")
    return timedelta(seconds=seconds)


def format_line(event: Event, subject: str) -> str:
    """One event as a line: time, tenant, subject, actor and the payload's fields."""
    fields = " ".join(f"{key}={_value(value)}" for key, value in event.data.items() if key not in _SKIP)
    actor = f" by {event.actor}" if event.actor else ""
    return f"{event.time.strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3]}Z {event.tenant} {subject}{actor} {fields}".rstrip()


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if text and " " not in text else json.dumps(text)


def tap(
    pattern: Annotated[
        str | None,
        typer.Argument(
            help="Which events: a domain ('jobs'), 'jobs.job_state_changed', or a full subject 'hd.default.evt.>'."
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Replay stored events this far back first (30s, 15m, 2h, 1d)."),
    ] = None,
    count: Annotated[int | None, typer.Option("--count", help="Stop after this many events.", min=1)] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Print state-change events as they are published, one line each, until Ctrl-C."""
    target = resolve(data_dir, url, token_file, bundle)
    try:
        subject = subjects.events_filter(pattern, tenant=target.tenant)
        start = utcnow() - parse_duration(since) if since else None
    except BadRequest as exc:
        fail(exc.message, 2)
    run(lambda: _tap(target, subject, start, count, json_out))


async def _tap(target: Target, subject: str, start: Any, count: int | None, json_out: bool) -> None:
    done = asyncio.Event()
    seen = 0

    async def show(msg: Msg) -> None:
        nonlocal seen
        if count is not None and seen >= count:
            return
        try:
            event = codec.load(Event, msg.data, codec.content_type_of(msg.headers))
        except BadRequest:
            line = (
                json.dumps({"subject": msg.subject, "undecodable_bytes": len(msg.data)})
                if json_out
                else (f"{msg.subject} (undecodable, {len(msg.data)} bytes)")
            )
        else:
            line = (
                json.dumps({"subject": msg.subject, **event.model_dump(mode="json")})
                if json_out
                else format_line(event, msg.subject)
            )
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        seen += 1
        if count is not None and seen >= count:
            done.set()

    config = (
        ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
        if start is not None
        else ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    )
    async with connected(target, "herder-tap") as nc:
        subscription = await nc.jetstream().subscribe(
            subject, stream=subjects.events_stream(target.tenant), cb=show, ordered_consumer=True, config=config
        )
        print(f"tapping {subject} on {target.where}; Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            await done.wait()
        finally:
            await subscription.unsubscribe()
