"""Commands to robots on `hd.<tenant>.cmd.<host>.<robot>`: sent as requests, acknowledged by the robot.

A command that is not acknowledged is sent again, a few times, with growing pauses; the robot
recognises a repeated command by its job id and attempt and acknowledges it again without acting
twice. A robot that does not listen at all (no responders) is offline: the command is not repeated
here, and the robot's presence decides what becomes of the job.
"""

from __future__ import annotations

import asyncio

import nats.errors
import structlog
from nats.aio.client import Client as NATS

from herder.protocol import codec, subjects
from herder.protocol.errors import HerderError
from herder.protocol.jobs import Command, CommandAck, KillCommand, StartCommand, StopCommand

ACK_TIMEOUT_S = 2.0
SEND_ATTEMPTS = 4
RESEND_BACKOFF_S = 0.5

log = structlog.get_logger("herder.jobs.commands")


async def send(
    nc: NATS,
    tenant: str,
    host: str,
    robot: str,
    command: StartCommand | StopCommand | KillCommand,
    *,
    attempts: int = SEND_ATTEMPTS,
    timeout_s: float = ACK_TIMEOUT_S,
) -> CommandAck | None:
    """Send `command` until the robot acknowledges it; None when the robot is not listening or never
    answers. The robot may acknowledge with `accepted=False` and a reason (busy with another job)."""
    subject = subjects.command(tenant, host, robot)
    payload = codec.dump(Command(command=command))
    pause = RESEND_BACKOFF_S
    for attempt in range(1, attempts + 1):
        try:
            reply = await nc.request(subject, payload, timeout=timeout_s)
        except nats.errors.NoRespondersError:
            log.info("command.no_robot", robot=robot, kind=command.kind, job_id=command.job_id)
            return None
        except nats.errors.TimeoutError:
            log.warning("command.unacknowledged", robot=robot, kind=command.kind, job_id=command.job_id, send=attempt)
            if attempt < attempts:
                await asyncio.sleep(pause)
                pause *= 2
            continue
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            return None
        try:
            if reply.headers and codec.is_error_reply(reply.headers):
                codec.raise_error_reply(reply.data, reply.headers)
            return codec.load(CommandAck, reply.data, codec.content_type_of(reply.headers))
        except HerderError as exc:
            return CommandAck(
                job_id=command.job_id, attempt=command.attempt, session="", accepted=False, detail=exc.message
            )
    return None
