"""NATS key pairs as the auth callout needs them: an account key that signs, and a curve key that seals.

nats-server trusts the auth service by the public half of an account nkey (`issuer` in its
`auth_callout` block): the service signs every authorization response and user JWT with the seed.
With a curve key (`xkey`), the server also encrypts each authorization request to the service, so
the credentials a client presented never cross the bus in the clear.

nkeys are base32 text: a prefix byte naming the role (A… for accounts, X… for curve keys, S… for
seeds), 32 bytes of key, and a CRC-16. The `nkeys` package handles signing keys; it does not know
curve keys, so they are encoded here with the same rules and sealed with PyNaCl's box
(X25519 + XSalsa20-Poly1305), the format nats-server's `xkv1` expects.
"""

from __future__ import annotations

import base64
import binascii
import os

import nacl.exceptions
import nacl.public
import nacl.signing
import nkeys

from herder.client.errors import SetupError

_SEED = nkeys.PREFIX_BYTE_SEED
_ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT
_CURVE = 23 << 3  # base32 'X'
_SEALED_VERSION = b"xkv1"
_NONCE_BYTES = nacl.public.Box.NONCE_SIZE
_RAW_KEY_BYTES = 32


def _encode(payload: bytes) -> str:
    checksum = nkeys.crc16(payload).to_bytes(2, byteorder="little")
    return base64.b32encode(payload + checksum).decode().rstrip("=")


def _decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise SetupError(f"{what} is not an nkey (bad base32)") from None
    payload, checksum = raw[:-2], raw[-2:]
    if len(payload) < 1 + _RAW_KEY_BYTES or nkeys.crc16(payload).to_bytes(2, byteorder="little") != checksum:
        raise SetupError(f"{what} is not an nkey (bad length or checksum)")
    return payload


def _seed(role: int, raw: bytes) -> str:
    return _encode(bytes([_SEED | role >> 5, (31 & role) << 3]) + raw)


def _seed_raw(seed: str, role: int, what: str) -> bytes:
    payload = _decode(seed, what)
    if payload[0] & 248 != _SEED or ((payload[0] & 7) << 5 | (payload[1] & 248) >> 3) != role:
        raise SetupError(f"{what} is not the seed of the right kind of nkey")
    return payload[2:]


def new_account_seed() -> str:
    """A fresh account signing key, as its seed (`SA…`)."""
    return _seed(_ACCOUNT, os.urandom(_RAW_KEY_BYTES))


def new_curve_seed() -> str:
    """A fresh curve (X25519) key, as its seed (`SX…`)."""
    return _seed(_CURVE, os.urandom(_RAW_KEY_BYTES))


class AccountKey:
    """An account nkey that signs JWTs (the auth callout's issuer)."""

    def __init__(self, seed: str) -> None:
        _seed_raw(seed, _ACCOUNT, "the callout issuer seed")
        self._pair = nkeys.from_seed(seed.encode())
        self.public_key: str = self._pair.public_key.decode()

    def sign(self, data: bytes) -> bytes:
        """The ed25519 signature of `data`."""
        signature: bytes = self._pair.sign(data)
        return signature


def verify(public_key: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` was made by the nkey whose public key is `public_key`."""
    try:
        payload = _decode(public_key, "the signer's public key")
    except SetupError:
        return False
    verifying = nacl.signing.VerifyKey(payload[1 : 1 + _RAW_KEY_BYTES])
    try:
        verifying.verify(data, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


class CurveKey:
    """A curve nkey that opens what is sealed to it and seals to others (nats-server's `xkv1` format)."""

    def __init__(self, seed: str) -> None:
        self._private = nacl.public.PrivateKey(_seed_raw(seed, _CURVE, "the callout curve seed"))
        self.public_key: str = _encode(bytes([_CURVE]) + bytes(self._private.public_key))

    def open(self, sealed: bytes, sender: str) -> bytes:
        """Decrypt `sealed` from the holder of the curve key `sender`; `ValueError` if it is not that."""
        if not sealed.startswith(_SEALED_VERSION):
            raise ValueError("not a sealed message (no xkv1 header)")
        box = nacl.public.Box(self._private, _public(sender))
        body = sealed[len(_SEALED_VERSION) :]
        try:
            opened: bytes = box.decrypt(body[_NONCE_BYTES:], body[:_NONCE_BYTES])
        except nacl.exceptions.CryptoError:
            raise ValueError("the sealed message does not open with this key") from None
        return opened

    def seal(self, data: bytes, recipient: str) -> bytes:
        """Encrypt `data` so that only the holder of the curve key `recipient` can read it."""
        box = nacl.public.Box(self._private, _public(recipient))
        sealed: bytes = box.encrypt(data, os.urandom(_NONCE_BYTES))  # the nonce, then MAC and ciphertext
        return _SEALED_VERSION + sealed


def _public(key: str) -> nacl.public.PublicKey:
    try:
        payload = _decode(key, "the peer's curve key")
    except SetupError as exc:
        raise ValueError(exc.message) from None
    if payload[0] != _CURVE:
        raise ValueError("the peer's key is not a curve key")
    return nacl.public.PublicKey(payload[1 : 1 + _RAW_KEY_BYTES])
