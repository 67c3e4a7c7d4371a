"""The NATS JWTs of the auth callout: reading authorization requests, writing responses and user JWTs.

nats-server sends the callout an authorization request (a JWT it signed, naming the server, a
fresh user nkey for the connection, and what the client presented); the callout answers with an
authorization response (a JWT signed by the issuer account key) that either carries a user JWT —
the connection's identity, account and permissions — or an error. Pure but for the signature
arithmetic of `herder.services.common.keys`; the wire format is NATS's (JWT v2: a JSON header and
claims, base64url without padding, signed with ed25519).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from herder.protocol.fence import BusPermissions
from herder.services.common.keys import AccountKey, verify

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_REQUEST_AUDIENCE = "nats-authorization-request"
_VERSION = 2
_UNLIMITED = -1


class InvalidRequest(ValueError):
    """An authorization request that cannot be read or was not signed by the server it names."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], issuer: AccountKey, *, now: float | None = None) -> str:
    """A JWT of `claims`, issued (and signed) by `issuer`; `iat`, `iss` and `jti` are filled in."""
    body = {**claims, "iat": int(now if now is not None else time.time()), "iss": issuer.public_key}
    # The id is a digest of the claims, as NATS's own library makes it; nothing depends on its form.
    body["jti"] = base64.b32encode(hashlib.sha256(_compact(body)).digest()).decode().rstrip("=")
    signing_input = f"{_b64(_compact(_HEADER))}.{_b64(_compact(body))}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


def _compact(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode(token: str) -> dict[str, Any]:
    """The claims of a JWT signed by the nkey its `iss` names; `InvalidRequest` otherwise."""
    try:
        header_b64, claims_b64, signature_b64 = token.split(".")
        header = json.loads(_unb64(header_b64))
        claims = json.loads(_unb64(claims_b64))
        signature = _unb64(signature_b64)
    except ValueError:
        raise InvalidRequest("not a JWT") from None
    if not isinstance(header, dict) or header.get("alg") != _HEADER["alg"] or not isinstance(claims, dict):
        raise InvalidRequest("not a NATS JWT")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not verify(issuer, f"{header_b64}.{claims_b64}".encode(), signature):
        raise InvalidRequest("the JWT's signature does not match its issuer")
    return claims


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """What nats-server asks about one connecting client."""

    server_id: str  # the server's public nkey: the audience of the response
    server_name: str
    server_xkey: str | None
    user_nkey: str  # the connection's user: the subject of the response and of the user JWT
    client_id: int
    client_host: str
    client_name: str
    token: str | None  # what the client sent as its token
    username: str | None


def read_request(token: str) -> AuthorizationRequest:
    """Read (and check the signature of) an authorization request; `InvalidRequest` if it is not one."""
    claims = decode(token)
    nats = claims.get("nats")
    if claims.get("aud") != _REQUEST_AUDIENCE or not isinstance(nats, dict):
        raise InvalidRequest("not an authorization request")
    server = nats.get("server_id") or {}
    client = nats.get("client_info") or {}
    options = nats.get("connect_opts") or {}
    user_nkey = nats.get("user_nkey")
    if not isinstance(user_nkey, str) or not isinstance(server.get("id"), str):
        raise InvalidRequest("the authorization request names no user or server")
    if server["id"] != claims.get("iss"):
        raise InvalidRequest("the authorization request was not signed by the server it names")
    return AuthorizationRequest(
        server_id=server["id"],
        server_name=str(server.get("name", "")),
        server_xkey=server.get("xkey") or None,
        user_nkey=user_nkey,
        client_id=int(client.get("id", 0)),
        client_host=str(client.get("host", "")),
        client_name=str(client.get("name", "")),
        token=options.get("auth_token") or None,
        username=options.get("user") or None,
    )


def user_jwt(
    request: AuthorizationRequest,
    *,
    name: str,
    account: str,
    permissions: BusPermissions,
    issuer: AccountKey,
    expires_at: float | None = None,
) -> str:
    """The user JWT that admits the connection of `request` to `account` as `name`, with `permissions`."""
    limits: dict[str, Any] = {
        "pub": {"allow": list(permissions.publish)},
        "sub": {"allow": list(permissions.subscribe)},
        "subs": _UNLIMITED,
        "data": _UNLIMITED,
        "payload": _UNLIMITED,
        "type": "user",
        "version": _VERSION,
    }
    if permissions.allow_responses:
        limits["resp"] = {"max": 1, "ttl": 0}
    claims: dict[str, Any] = {"sub": request.user_nkey, "aud": account, "name": name, "nats": limits}
    if expires_at is not None:
        claims["exp"] = int(expires_at)
    return encode(claims, issuer)


def response(
    request: AuthorizationRequest, issuer: AccountKey, *, user: str | None = None, error: str | None = None
) -> str:
    """The authorization response: `user` (a user JWT) admits the client, `error` refuses it."""
    nats: dict[str, Any] = {"type": "authorization_response", "version": _VERSION}
    if user is not None:
        nats["jwt"] = user
    if error is not None:
        nats["error"] = error
    return encode({"sub": request.user_nkey, "aud": request.server_id, "nats": nats}, issuer)
