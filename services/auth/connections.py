"""The bus connections of principals, as nats-server reports them, and closing those that lost their right.

Revoking a token or removing a robot must take effect on the bus, not only in the services: the
auth service finds the connections the callout admitted for that token (each goes by
`<kind>/<tenant>/<principal>/<token hash>`, see `core.connection_name`) and has their server close
them; their clients' reconnections are then refused by the callout. It asks every server of the
cluster at once (`$SYS.REQ.SERVER.PING.CONNZ`) and each server closes its own (`…KICK`), over a
connection to the system account made with the service credential.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from herder.client.discovery import gather_replies
from herder.services.auth.core import token_hash_of

CONNZ_SUBJECT = "$SYS.REQ.SERVER.PING.CONNZ"
KICK_SUBJECT = "$SYS.REQ.SERVER.{server}.KICK"
# Replies come from every server at once; this long without one means they are all in.
QUIET_S = 0.1
KICK_TIMEOUT_S = 2.0
# More than a fleet has connections: CONNZ answers in pages of this many.
CONNZ_PAGE = 10_000


@dataclass(frozen=True, slots=True)
class Connection:
    """One client connection as a server reports it."""

    server: str  # the server's id
    cid: int
    user: str  # what it goes by: a principal's connection name, or a service's user
    name: str  # the name the client gave itself

    @property
    def token_hash(self) -> str | None:
        """The hash of the token it was admitted with; None for a service's connection."""
        return token_hash_of(self.user)


class Connections:
    """Lists and closes client connections of one account, through a system-account connection."""

    def __init__(self, system: NATS, account: str) -> None:
        self._nc = system
        self._account = account

    async def find(self, *, user: str | None = None) -> list[Connection]:
        """The account's open client connections on every server (those of `user` only, when given)."""
        options: dict[str, Any] = {"acc": self._account, "auth": True, "limit": CONNZ_PAGE}
        if user is not None:
            options["user"] = user
        found: list[Connection] = []
        for reply in await gather_replies(self._nc, CONNZ_SUBJECT, json.dumps(options).encode(), quiet_s=QUIET_S):
            server = (reply.get("server") or {}).get("id")
            for entry in (reply.get("data") or {}).get("connections") or []:
                if server and entry.get("account") == self._account:
                    found.append(
                        Connection(
                            server=server,
                            cid=int(entry.get("cid", 0)),
                            user=str(entry.get("authorized_user", "")),
                            name=str(entry.get("name", "")),
                        )
                    )
        return found

    async def close(self, connections: list[Connection]) -> int:
        """Have each connection's server close it; how many were closed (a gone one counts as closed)."""
        closed = 0
        for connection in connections:
            try:
                await self._nc.request(
                    KICK_SUBJECT.format(server=connection.server),
                    json.dumps({"cid": connection.cid}).encode(),
                    timeout=KICK_TIMEOUT_S,
                )
                closed += 1
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                continue  # that server is gone: so is the connection
        return closed

    async def close_where(self, doomed: Callable[[Connection], bool], *, user: str | None = None) -> int:
        """Close the connections `doomed` picks; how many."""
        return await self.close([connection for connection in await self.find(user=user) if doomed(connection)])
