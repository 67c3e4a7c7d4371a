"""Commands to robots on `hd.<tenant>.cmd.<host>.<robot>`: sent with a reply subject, acknowledged by the robot.

The sender owns one inbox subscription for every acknowledgement, so putting a command on the
wire is a publish and nothing more: the jobs service does it before it answers the request that
caused it, and waits for the acknowledgement afterwards, in the background.

A command that is not acknowledged is sent again, a few times, with growing pauses; the robot
recognises a repeated command by its job id and attempt and acknowledges it again without acting
twice. A robot that does not listen at all (NATS answers "no responders") is offline: the command
is not repeated, and the robot's presence decides what becomes of the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from herder.client.backoff import backoff
from herder.protocol import codec, subjects
from herder.protocol.errors import HerderError
from herder.protocol.jobs import Command, CommandAck, KillCommand, StartCommand, StopCommand

ACK_TIMEOUT_S = 2.0
SEND_ATTEMPTS = 4
RESEND_BACKOFF_S = 0.5
RESEND_BACKOFF_MAX_S = 4.0
_STATUS = "Status"
_NO_RESPONDERS = "503"

AnyCommand = StartCommand | StopCommand | KillCommand

log = structlog.get_logger("herder.jobs.commands")


class CommandSender:
    """Sends commands to robots and matches their acknowledgements to them."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._inbox = nc.new_inbox()
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Listen for acknowledgements."""
        self._subscription = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    async def stop(self) -> None:
        """Stop listening; commands still waiting for an acknowledgement get none."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None
        for waiting in self._waiting.values():
            waiting.cancel()
        self._waiting.clear()

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg)

    async def post(self, tenant: str, host: str, robot: str, command: AnyCommand) -> asyncio.Future[Msg]:
        """Put `command` on the wire; return the future of the robot's reply."""
        token = str(next(self._tokens))
        reply: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = reply
        try:
            await self._nc.publish(
                subjects.command(tenant, host, robot),
                codec.dump(Command(command=command)),
                reply=f"{self._inbox}.{token}",
            )
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return reply

    async def deliver(
        self,
        tenant: str,
        host: str,
        robot: str,
        command: AnyCommand,
        *,
        posted: asyncio.Future[Msg] | None = None,
        attempts: int = SEND_ATTEMPTS,
        timeout_s: float = ACK_TIMEOUT_S,
    ) -> CommandAck | None:
        """Wait for the acknowledgement of a command (sending it first unless `posted` says it was
        sent), sending it again when none comes; None when the robot is not listening or never answers.

        The robot may acknowledge with `accepted=False` and a reason (busy with another job)."""
        for attempt in range(1, attempts + 1):
            try:
                reply = posted if posted is not None else await self.post(tenant, host, robot, command)
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return None
            posted = None
            try:
                msg = await asyncio.wait_for(reply, timeout_s)
            except TimeoutError:
                log.warning(
                    "command.unacknowledged", robot=robot, kind=command.kind, job_id=command.job_id, send=attempt
                )
                if attempt < attempts:
                    await asyncio.sleep(backoff(attempt, base_s=RESEND_BACKOFF_S, max_s=RESEND_BACKOFF_MAX_S))
                continue
            if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
                log.info("command.no_robot", robot=robot, kind=command.kind, job_id=command.job_id)
                return None
            return _ack(command, msg)
        return None


def _ack(command: AnyCommand, msg: Msg) -> CommandAck:
    try:
        if msg.headers and codec.is_error_reply(msg.headers):
            codec.raise_error_reply(msg.data, msg.headers)
        return codec.load(CommandAck, msg.data, codec.content_type_of(msg.headers))
    except HerderError as exc:
        return CommandAck(
            job_id=command.job_id, attempt=command.attempt, session="", accepted=False, detail=exc.message
        )
