"""Following a job as it runs: its state changes (from the event stream) and its log lines (from the log stream).

Both are read through JetStream consumers of the caller's own tenant, so a client needs no more than
read access to its tenant's streams: it never listens on the subjects services and robots use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.errors import BadRequest
from herder.protocol.jobs import JobInfo, JobShow, JobStateChangedEvent, LogRecord, LogStream
from herder.protocol.messages import Event

# How long to wait for a job's last log line once the job has ended (it follows the end closely).
END_OF_LOG_WAIT_S = 3.0
# How often a follower asks for the job's state, in case an event was missed.
POLL_S = 5.0

OnState = Callable[[JobStateChangedEvent], None]
OnLog = Callable[[LogRecord], None]


class JobFollower:
    """Follows one job live until it has ended and its log is complete.

    Call `listen()` before the job is created (so that no state change is missed), then
    `follow(job)` once its id is known. `on_state` sees each state change of the job, `on_log`
    each of its log lines, in order, the closing `end` line included.
    """

    def __init__(
        self, nc: NATS, client: Client, *, on_state: OnState | None = None, on_log: OnLog | None = None
    ) -> None:
        self.nc = nc
        self.client = client
        self.tenant = client.tenant
        self._on_state = on_state
        self._on_log = on_log
        self.job_id: str | None = None
        # Changes that arrive before the job's id is known (the reply to its start may come after).
        self._early: list[JobStateChangedEvent] = []
        self._ended = asyncio.Event()
        self._log_complete = asyncio.Event()
        self._subscriptions: list[Any] = []

    async def listen(self) -> None:
        """Start reading the tenant's job state changes from now on."""
        js = self.nc.jetstream()
        self._subscriptions.append(
            await js.subscribe(
                subjects.event(self.tenant, "jobs", "job_state_changed"),
                stream=subjects.events_stream(self.tenant),
                cb=self._on_event,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
            )
        )

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = codec.load(Event, msg.data, codec.content_type_of(msg.headers))
            change = JobStateChangedEvent.model_validate(event.data)
        except (BadRequest, ValueError):
            return
        if self.job_id is None:
            self._early.append(change)
        else:
            self._changed(change)

    def _changed(self, change: JobStateChangedEvent) -> None:
        if change.job_id != self.job_id:
            return
        if self._on_state is not None:
            self._on_state(change)
        if change.state.final:
            self._ended.set()

    async def follow(self, job: JobInfo) -> JobInfo:
        """Deliver the job's states and log lines until it has ended; return it as it ended."""
        self.job_id = job.id
        for change in self._early:
            self._changed(change)
        self._early.clear()
        js = self.nc.jetstream()
        self._subscriptions.append(
            await js.subscribe(
                subjects.job_log_filter(self.tenant, job.id),
                stream=subjects.logs_stream(self.tenant),
                cb=self._on_log_msg,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
        )
        try:
            current = job
            while not current.state.final:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), POLL_S)
                current = await self.client.request(JobShow(id=job.id))
            # The job has ended; its last log line (written by the jobs service) closes the log.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._log_complete.wait(), END_OF_LOG_WAIT_S)
            return current
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop reading."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _on_log_msg(self, msg: Msg) -> None:
        try:
            record = codec.load(LogRecord, msg.data)
        except BadRequest:
            return
        if self._on_log is not None:
            self._on_log(record)
        if record.stream is LogStream.END:
            self._log_complete.set()
