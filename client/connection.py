"""Connecting to NATS: the one seam every herder process (CLI, robot, service) goes through.

Every connection is a principal. Robots and clients present their herder token, which the auth
service's callout turns into the permissions nats-server enforces for them (see
`herder.protocol.fence`); their inbox is the one the fence lets them hear. Services present the
stack's service credential. Off-host servers speak TLS, verified against the stack's own CA.

nats-server reports what a connection was refused (a publish or subscription outside its
permissions) asynchronously, as an error on the connection: `refusals` keeps the recent ones so
that a request that got no answer can say the bus refused it rather than that nobody answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from herder.client.errors import SetupError
from herder.client.tls import client_context
from herder.protocol.fence import inbox_prefix

CONNECT_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 1.0
# How many refusals of the server a connection remembers.
REFUSALS_KEPT = 32
_SERVICE_INBOX = "_INBOX"
_PERMISSIONS = "permissions violation"

log = structlog.get_logger("herder.connection")


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a connection authenticates: a herder token (robots, people and programs) or the stack's
    service credential (a user and password the auth callout exempts)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if (self.token is None) == (self.user is None):
            raise ValueError("credentials are a token, or a user and password")

    def __repr__(self) -> str:
        who = "token" if self.token is not None else f"user {self.user}"
        return f"Credentials({who}, secret hidden)"

    @property
    def inbox_prefix(self) -> str:
        """Where this principal hears replies: the inbox the fence gives its token, or any for a service."""
        return inbox_prefix(self.token) if self.token is not None else _SERVICE_INBOX


class Unreachable(SetupError):
    """No NATS server answered at the URL (as opposed to one that answered and refused)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot reach NATS at {where}: {reason}")
        self.reason = reason


class CredentialsRefused(SetupError):
    """The server refused the credentials: an unknown or revoked token, a removed robot, or no auth
    service running to vouch for it."""

    def __init__(self, where: str) -> None:
        super().__init__(f"NATS at {where} refused the credentials (authorization violation)")
        self.where = where


class TlsRefused(SetupError):
    """The TLS handshake failed: the server is not who the CA says, or speaks no TLS."""


def display_nats_url(url: str) -> str:
    """A NATS URL (or a comma-separated list of them) fit to print: any user, password or token removed."""
    if "," in url:
        return ",".join(display_nats_url(server.strip()) for server in url.split(","))
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


_refusals: weakref.WeakKeyDictionary[NATS, deque[str]] = weakref.WeakKeyDictionary()


def refusals(nc: NATS) -> list[str]:
    """What the server refused this connection lately, newest last (its own words)."""
    return list(_refusals.get(nc, ()))


def refused(nc: NATS, subject: str, *, action: str = "publish", prefix: bool = False) -> str | None:
    """The server's refusal of a publish to `subject` (or with `action="subscription"`, of a subscription
    on it; with `prefix`, to any subject starting so), if it sent one."""
    # nats-py hands the server's words on in lower case.
    needle = f'{action} to "{subject}{"" if prefix else chr(34)}'.lower()
    for text in reversed(refusals(nc)):
        if needle in text.lower():
            return text
    return None


async def connect(
    url: str,
    *,
    name: str,
    credentials: Credentials,
    ca_pem: str | None = None,
    max_reconnect_attempts: int = -1,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    reconnect_delay: Callable[[int], float] | None = None,
) -> NATS:
    """Connect to NATS at `url` as the principal `credentials` name, or raise `SetupError` saying why not.

    The first connection gives up at once when the credentials are refused or every server in
    `url` refuses the connection, and after CONNECT_TIMEOUT_S otherwise; once connected, the
    client reconnects for as long as it lives (a cluster URL may list several servers). With
    `ca_pem`, the server must present a certificate of that CA (URLs then start with tls://).

    `on_disconnected` and `on_reconnected` are told when the connection is lost and back (their
    failures are logged, never raised into nats-py); `reconnect_delay(n)` is the pause before the
    n-th attempt in a row to get it back (a fleet should spread its attempts: see `client.backoff`).
    """
    servers = [server.strip() for server in url.split(",")]
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise SetupError(f"{display_nats_url(server)!r} is not a NATS URL; use nats://HOST:PORT or tls://HOST:PORT")
    tls = client_context(ca_pem) if ca_pem is not None else None
    if tls is not None:
        servers = [_as_tls(server) for server in servers]
    seen: list[BaseException] = []
    hopeless = asyncio.Event()
    kept: deque[str] = deque(maxlen=REFUSALS_KEPT)

    async def remember(exc: Exception) -> None:
        text = str(exc)
        if _PERMISSIONS in text.lower():
            kept.append(text)
            log.warning("bus.refused", connection=name, error=text.removeprefix("nats: "))
            return
        seen.append(exc)
        refusals_count = sum(isinstance(error, ConnectionRefusedError) for error in seen)
        if _refuses_credentials(exc) or _tls_failed(exc) or refusals_count >= len(servers):
            hopeless.set()

    # nats-py retries the first connection for as long as reconnecting is allowed: watch its errors.
    # The client is made here so that a connection given up on can still be closed, sockets and all.
    nc = NATS()
    attempt = asyncio.ensure_future(
        nc.connect(
            servers,
            name=name,
            # nats-py's hints say int; it takes seconds as any number (nats.connect is untyped).
            connect_timeout=CONNECT_TIMEOUT_S,  # type: ignore[arg-type]
            max_reconnect_attempts=max_reconnect_attempts,
            reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]
            error_cb=remember,
            token=credentials.token,
            user=credentials.user,
            password=credentials.password,
            inbox_prefix=credentials.inbox_prefix,
            tls=tls,
            disconnected_cb=_guarded(on_disconnected, "disconnected"),
            reconnected_cb=_guarded(on_reconnected, "reconnected"),
            reconnect_to_server_handler=_paced(reconnect_delay) if reconnect_delay is not None else None,
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
            _refusals[nc] = kept
            return nc
        seen.append(failure)
    else:
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, OSError):
            await attempt
    with contextlib.suppress(Exception):
        await nc.close()
    cause = _most_telling(seen)
    where = display_nats_url(url)
    if cause is not None and _refuses_credentials(cause):
        raise CredentialsRefused(where)
    if cause is not None and _tls_failed(cause):
        raise TlsRefused(f"cannot open a TLS connection to NATS at {where}: {_describe(cause)}")
    reason = _describe(cause) if cause is not None else f"no answer within {CONNECT_TIMEOUT_S:g} s"
    raise Unreachable(where, reason)


async def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why no server of `url` greets a TCP client with NATS's INFO line, or None when one does (it
    asks nothing of the server's auth: for saying "not running" before "no token")."""
    why = "no server listed"
    for server in (part.strip() for part in url.split(",")):
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if not parts.hostname:
            continue
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, parts.port or 4222), timeout
            )
        except (OSError, TimeoutError) as exc:
            why = _describe(exc)
            continue
        try:
            greeting = await asyncio.wait_for(reader.read(4), timeout)
        except (OSError, TimeoutError) as exc:
            why = _describe(exc)
            greeting = b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if greeting.startswith(b"INFO"):
            return None
        why = why if not greeting else "what answers there is not a NATS server"
    return why


def _guarded(
    callback: Callable[[], Awaitable[None]] | None, what: str
) -> Callable[[], Coroutine[Any, Any, None]] | None:
    if callback is None:
        return None

    async def call() -> None:
        try:
            await callback()
        except Exception:
            log.exception("connection.callback_failed", callback=what)

    return call


def _paced(delay: Callable[[int], float]) -> Callable[[list[Any], dict[str, Any]], tuple[Any, float]]:
    """A nats-py server-selection hook that waits `delay(n)` before the n-th attempt in a row (the count
    starts over once an attempt got through: nats-py resets a server's `reconnects` then)."""
    turn = {"server": 0}

    def choose(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        server = servers[turn["server"] % len(servers)]
        turn["server"] += 1
        attempt = max(int(getattr(server, "reconnects", 0)), 0) + 1
        return server, delay(attempt)

    return choose


def _as_tls(server: str) -> str:
    parts = urlsplit(server if "://" in server else f"nats://{server}")
    return urlunsplit(("tls", parts.netloc, parts.path, "", "")) if parts.scheme == "nats" else server


def _refuses_credentials(error: BaseException) -> bool:
    return "authorization" in str(error).lower() or isinstance(error, nats.errors.AuthorizationError)


def _tls_failed(error: BaseException) -> bool:
    return isinstance(error, ssl.SSLError)


def _most_telling(errors: list[BaseException]) -> BaseException | None:
    """Of the errors a connection attempt met, the one that says most: a refusal of credentials first."""
    for error in errors:
        if _refuses_credentials(error) or _tls_failed(error):
            return error
    return errors[-1] if errors else None


async def sync(nc: NATS, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Return once the server has taken in every command this connection sent before.

    nats-py's `flush()` writes its PING ahead of commands still queued for the socket, so its
    PONG does not prove a new subscription is in place; a message to ourselves behind them does.
    Publishing to one's own inbox is a service's right: robots and clients need no such proof, as
    their requests queue behind their subscriptions in the order they were made.
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
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate is not one the given CA signed ({exc.verify_message})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().strip("'\"").removeprefix("nats: ")
    return text or type(exc).__name__
