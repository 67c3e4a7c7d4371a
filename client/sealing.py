"""Sealed boxes: a secret encrypted to one recipient's X25519 key, so that only it can open it.

A credential on its way to a robot, a revealed secret on its way to an operator's CLI, and a new
secret on its way from a CLI to the secrets service all travel sealed: nothing on the bus (not
even a capture of the services' own traffic) holds the secret in clear.

The construction is the usual one (as in HPKE's base mode, or libsodium's sealed boxes, built
from the `cryptography` package's primitives): the sender makes an ephemeral X25519 key pair,
derives a one-time AES-256-GCM key with HKDF-SHA256 from the shared secret (salted with both
public keys), and encrypts under it. The associated data binds the box to what it is for (the
tenant, the robot, the job, the credential's name): a box opened in another context fails.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"herder sealed box v1"
KEY_BYTES = 32
NONCE_BYTES = 12


class SealError(Exception):
    """A box that does not open: the wrong key, another context, or bytes changed on the way."""


@dataclass(frozen=True)
class Sealed:
    """A sealed box: the sender's ephemeral public key, the nonce and the ciphertext (with its tag)."""

    ephemeral: bytes
    nonce: bytes
    ciphertext: bytes

    def text(self) -> str:
        """The box as one ASCII string (for JSON and msgpack alike)."""
        return ".".join(_b64(part) for part in (self.ephemeral, self.nonce, self.ciphertext))

    @classmethod
    def from_text(cls, text: str) -> Sealed:
        parts = text.split(".")
        if len(parts) != 3:
            raise SealError("a sealed box has three parts separated by '.'")
        try:
            ephemeral, nonce, ciphertext = (_unb64(part) for part in parts)
        except ValueError:
            raise SealError("a sealed box is base64url text") from None
        if len(ephemeral) != KEY_BYTES or len(nonce) != NONCE_BYTES or len(ciphertext) < 16:
            raise SealError("a sealed box's parts have the wrong sizes")
        return cls(ephemeral, nonce, ciphertext)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_text(key: X25519PublicKey) -> str:
    """A public key as base64url text, as it is registered and sent."""
    return _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_from_text(text: str) -> X25519PublicKey:
    """A public key from its text; `SealError` if it is not one."""
    try:
        raw = _unb64(text)
    except ValueError:
        raise SealError("a public key is base64url text") from None
    if len(raw) != KEY_BYTES:
        raise SealError(f"an X25519 public key is {KEY_BYTES} bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def _box_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ephemeral + recipient, info=_INFO)
    return hkdf.derive(shared)


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(recipient: X25519PublicKey, plaintext: bytes, context: bytes) -> Sealed:
    """Seal `plaintext` so that only the holder of `recipient`'s private key can open it, in `context`."""
    ephemeral_key = X25519PrivateKey.generate()
    ephemeral = _raw(ephemeral_key.public_key())
    key = _box_key(ephemeral_key.exchange(recipient), ephemeral, _raw(recipient))
    nonce = os.urandom(NONCE_BYTES)
    return Sealed(ephemeral, nonce, AESGCM(key).encrypt(nonce, plaintext, context))


def open_sealed(private: X25519PrivateKey, box: Sealed, context: bytes) -> bytes:
    """The plaintext of `box`; `SealError` if it was not sealed to `private` in `context`, or was changed."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(box.ephemeral))
    except ValueError:
        raise SealError("the box's ephemeral key is not a usable X25519 key") from None
    key = _box_key(shared, box.ephemeral, _raw(private.public_key()))
    try:
        return AESGCM(key).decrypt(box.nonce, box.ciphertext, context)
    except (InvalidTag, ValueError):
        raise SealError("the box does not open with this key in this context") from None


def context(*parts: str) -> bytes:
    """Associated data from named parts, unambiguous however the parts are chosen: each part goes in
    after its length."""
    encoded = [part.encode() for part in ("herder", *parts)]
    return b"".join(len(part).to_bytes(4, "big") + part for part in encoded)


def load_or_create_key(path: Path) -> X25519PrivateKey:
    """The X25519 private key in `path`, made (readable by its owner only) when there is none."""
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != KEY_BYTES:
            raise SealError(f"{path} holds {len(raw)} bytes, not an X25519 private key; move it away to make a new one")
        return X25519PrivateKey.from_private_bytes(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    # Created 0600 in one step: never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as out:
        out.write(raw)
    return key
