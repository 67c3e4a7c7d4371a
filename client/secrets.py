"""Credentials for people and programs: set one (the secret sealed to the secrets service on the
way), and reveal one (sealed to a key made for that one request, opened here).

The CLI, the gateway and tests use these; a robot's script reads credentials through its agent.
"""

from __future__ import annotations

from datetime import date

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from herder.client import sealing
from herder.client.requests import Client
from herder.protocol.errors import Conflict, Internal
from herder.protocol.messages import Model
from herder.protocol.secrets import (
    CredentialInfo,
    CredentialReveal,
    CredentialSet,
    Scope,
    TransportKeyRequest,
    credential_reveal_context,
    credential_set_context,
)


class Revealed(Model):
    """A credential's secret, in clear, for the one who asked; `repr` and `str` hide it."""

    name: str
    username: str
    secret: str
    scope: Scope
    expires_on: date | None = None

    def __repr__(self) -> str:
        scope = self.scope.describe()
        return f"Revealed(name={self.name!r}, username={self.username!r}, secret='***', scope={scope!r})"

    __str__ = __repr__


async def set_credential(
    client: Client,
    name: str,
    username: str,
    secret: str,
    *,
    scope: Scope | None = None,
    expires_on: date | None = None,
    description: str | None = None,
    robots_may_write: bool | None = None,
    processes: list[str] | None = None,
    idempotency_key: str | None = None,
) -> CredentialInfo:
    """Set credential `name` at `scope` (global by default); the secret leaves this process sealed."""
    scope = scope or Scope()
    for attempt in range(2):
        key = (await client.request(TransportKeyRequest())).public_key
        context = sealing.context(*credential_set_context(client.tenant, name, scope))
        box = sealing.seal(sealing.public_from_text(key), secret.encode(), context)
        request = CredentialSet(
            name=name,
            username=username,
            sealed_secret=box.text(),
            sealed_to=key,
            scope=scope,
            expires_on=expires_on,
            description=description,
            robots_may_write=robots_may_write,
            processes=processes,
        )
        try:
            return await client.request(request, idempotency_key=idempotency_key)
        except Conflict as exc:
            if attempt == 0 and "transport key" in exc.message:
                continue  # the service's key changed under us (a master key rotation): seal again
            raise
    raise AssertionError("unreachable")


async def reveal_credential(client: Client, name: str, *, robot: str | None = None) -> Revealed:
    """The secret of credential `name` (the value `robot` would read, else the global one)."""
    private = X25519PrivateKey.generate()
    reply_key = sealing.public_text(private.public_key())
    reply = await client.request(CredentialReveal(name=name, robot=robot, reply_key=reply_key))
    context = sealing.context(*credential_reveal_context(client.tenant, reply.name, reply_key))
    try:
        secret = sealing.open_sealed(private, sealing.Sealed.from_text(reply.sealed_secret), context)
    except sealing.SealError as exc:
        raise Internal(f"the revealed secret of {name!r} did not open here ({exc})") from None
    return Revealed(
        name=reply.name, username=reply.username, secret=secret.decode(), scope=reply.scope, expires_on=reply.expires_on
    )
