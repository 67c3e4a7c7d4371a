"""Connecting to NATS: the one seam every herder process (CLI, robot, service) goes through."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client as NATS

from herder.client.errors import SetupError

CONNECT_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 1.0


class Unreachable(SetupError):
    """No NATS server answered at the URL (as opposed to one that answered and refused)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot reach NATS at {where}: {reason}")
        self.reason = reason


def display_nats_url(url: str) -> str:
    """A NATS URL (or a comma-separated list of them) fit to print: any user, password or token removed."""
    if "," in url:
        return ",".join(display_nats_url(server.strip()) for server in url.split(","))
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


async def connect(url: str, *, name: str) -> NATS:
    """Connect to NATS at `url`, or raise `SetupError` with one line saying why not.

    The first connection gives up at once when the credentials are refused or every server in
    `url` refuses the connection, and after CONNECT_TIMEOUT_S otherwise; once connected, the
    client reconnects for as long as it lives (a cluster URL may list several servers).
    """
    servers = [server.strip() for server in url.split(",")]
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise SetupError(f"{display_nats_url(server)!r} is not a NATS URL; use nats://HOST:PORT")
    seen: list[BaseException] = []
    hopeless = asyncio.Event()

    async def remember(exc: Exception) -> None:
        seen.append(exc)
        refusals = sum(isinstance(error, ConnectionRefusedError) for error in seen)
        if _refuses_credentials(exc) or refusals >= len(servers):
            hopeless.set()

    # nats-py retries the first connection for as long as reconnecting is allowed: watch its errors.
    attempt = asyncio.ensure_future(
        nats.connect(
            servers,
            name=name,
            connect_timeout=CONNECT_TIMEOUT_S,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_S,
            error_cb=remember,
        )
    )
    verdict = asyncio.ensure_future(hopeless.wait())
    try:
        await asyncio.wait({attempt, verdict}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        verdict.cancel()
    if attempt.done():
        failure = attempt.exception()
        if failure is None:
            return attempt.result()
        seen.append(failure)
    else:
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, OSError):
            await attempt
    cause = _most_telling(seen)
    where = display_nats_url(url)
    if cause is not None and _refuses_credentials(cause):
        raise SetupError(f"NATS at {where} refused the credentials (authorization violation); check the token")
    reason = _describe(cause) if cause is not None else f"no answer within {CONNECT_TIMEOUT_S:g} s"
    raise Unreachable(where, reason)


def _refuses_credentials(error: BaseException) -> bool:
    return "authorization" in str(error).lower()


def _most_telling(errors: list[BaseException]) -> BaseException | None:
    """Of the errors a connection attempt met, the one that says most: a refusal of credentials first."""
    for error in errors:
        if _refuses_credentials(error):
            return error
    return errors[-1] if errors else None


async def sync(nc: NATS, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Return once the server has taken in every command this connection sent before.

    nats-py's `flush()` writes its PING ahead of commands still queued for the socket, so its
    PONG does not prove a new subscription is in place; a message to ourselves behind them does.
    """
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(inbox, b"")
        await subscription.next_msg(timeout=timeout)
    except nats.errors.TimeoutError:
        raise SetupError(f"NATS did not confirm this connection's subscriptions within {timeout:g} s") from None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().strip("'\"").removeprefix("nats: ")
    return text or type(exc).__name__
