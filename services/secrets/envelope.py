"""Envelope encryption of secrets at rest: each secret under its own data key, wrapped by a master key.

A stored credential is `AES-256-GCM(data key, secret)`, and the data key is stored beside it
wrapped by the master key: `AES-256-GCM(master key, data key)`, with the master key's version.
Both encryptions carry the same associated data, which names the tenant, the credential and the
scope: a ciphertext copied to another row does not decrypt. Rotating the master key rewraps the
data keys (small, and no secret is decrypted for it); the ciphertexts stay as they are.

The master keys come from `HERDER_MASTER_KEY` or from a key file (JSON: `{"current": N, "keys":
{"1": "<base64>", ...}}`), which `herder up` makes on first start, readable by its owner only.
`HERDER_MASTER_KEY` is base64 of 32 bytes (one key, version 1), or versions with their keys,
current first: `2:<base64>,1:<base64>`. Rotating adds a version (`add_version`), rewraps every data
key under it, and then lets the old version go (`retire_version`) once nothing uses it.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from herder.client.errors import SetupError

KEY_BYTES = 32
NONCE_BYTES = 12
MASTER_KEY_ENV = "HERDER_MASTER_KEY"
KEY_FILE = "master.key"


class DecryptionFailed(Exception):
    """A stored secret that does not decrypt: the master key is not the one it was written with,
    or the row was changed or moved."""


@dataclass(frozen=True)
class Sealed:
    """A secret as stored: which master key wrapped its data key, the wrapped key, and the ciphertext."""

    key_version: int
    wrapped_key: bytes  # nonce + AES-GCM of the data key
    ciphertext: bytes  # nonce + AES-GCM of the secret


class KeyRing:
    """The master keys by version; new secrets are written under the current one."""

    def __init__(self, keys: dict[int, bytes], current: int) -> None:
        if current not in keys:
            raise SetupError(f"the master key file names version {current} as current, but holds no such key")
        for version, key in keys.items():
            if len(key) != KEY_BYTES:
                raise SetupError(f"master key version {version} is {len(key)} bytes; a master key is {KEY_BYTES}")
        self._keys = dict(keys)
        self.current = current

    @property
    def versions(self) -> list[int]:
        return sorted(self._keys)

    def seal(self, secret: bytes, context: bytes) -> Sealed:
        """Encrypt `secret` under a fresh data key, wrapped by the current master key."""
        data_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        return Sealed(
            self.current,
            self._encrypt(self._keys[self.current], data_key, context),
            self._encrypt(data_key, secret, context),
        )

    def open(self, sealed: Sealed, context: bytes) -> bytes:
        """The secret in `sealed`; `DecryptionFailed` if it does not decrypt in `context`."""
        master = self._keys.get(sealed.key_version)
        if master is None:
            raise DecryptionFailed(f"it was written under master key version {sealed.key_version}, which is not loaded")
        data_key = self._decrypt(master, sealed.wrapped_key, context)
        return self._decrypt(data_key, sealed.ciphertext, context)

    def rewrap(self, sealed: Sealed, context: bytes) -> Sealed:
        """`sealed` with its data key wrapped by the current master key; the ciphertext is unchanged."""
        if sealed.key_version == self.current:
            return sealed
        master = self._keys.get(sealed.key_version)
        if master is None:
            raise DecryptionFailed(f"it was written under master key version {sealed.key_version}, which is not loaded")
        data_key = self._decrypt(master, sealed.wrapped_key, context)
        return Sealed(self.current, self._encrypt(self._keys[self.current], data_key, context), sealed.ciphertext)

    def derive(self, purpose: str, version: int | None = None) -> bytes:
        """A 32-byte key for `purpose`, derived from the master key of `version` (the current one by
        default): the same on every replica that holds that master key."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=f"herder {purpose}".encode())
        return hkdf.derive(self._keys[self.current if version is None else version])

    @staticmethod
    def _encrypt(key: bytes, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(key).encrypt(nonce, plaintext, context)

    @staticmethod
    def _decrypt(key: bytes, blob: bytes, context: bytes) -> bytes:
        if len(blob) < NONCE_BYTES + 16:
            raise DecryptionFailed("the stored value is too short to be a ciphertext")
        try:
            return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context)
        except InvalidTag:
            raise DecryptionFailed("it does not decrypt: the master key differs, or the row was changed") from None


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise SetupError(f"{where} is not base64") from None
    if len(key) != KEY_BYTES:
        raise SetupError(f"{where} is {len(key)} bytes; a master key is {KEY_BYTES} bytes (base64 of 32 random bytes)")
    return key


def new_key_text() -> str:
    """A new random master key, as base64."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def load_ring(data_dir: Path | None, *, create: bool) -> KeyRing:
    """The master keys: from HERDER_MASTER_KEY when it is set, else from the key file in `data_dir`
    (made there, 0600, when `create` and there is none)."""
    from_env = os.environ.get(MASTER_KEY_ENV)
    if from_env:
        return ring_from_env(from_env)
    if data_dir is None:
        raise SetupError(f"the secrets service needs a master key: set {MASTER_KEY_ENV} or give it a data folder")
    path = data_dir / KEY_FILE
    if not path.exists():
        if not create:
            raise SetupError(f"no master key: {path} does not exist and {MASTER_KEY_ENV} is not set")
        write_key_file(path, {1: new_key_text()}, 1)
    return read_key_file(path)


def ring_from_env(text: str) -> KeyRing:
    """The ring `HERDER_MASTER_KEY` names: one key (version 1), or `N:<base64>` pairs, current first."""
    if ":" not in text:
        return KeyRing({1: _decode_key(text, MASTER_KEY_ENV)}, 1)
    keys: dict[int, bytes] = {}
    for n, part in enumerate(text.split(",")):
        version, _, key = part.strip().partition(":")
        if not version.isdigit() or int(version) < 1 or int(version) in keys:
            raise SetupError(f"{MASTER_KEY_ENV}: part {n + 1} is not 'VERSION:BASE64' with a new version number")
        keys[int(version)] = _decode_key(key, f"{MASTER_KEY_ENV} version {version}")
    return KeyRing(keys, next(iter(keys)))


def add_version(path: Path) -> int:
    """Add a new random master key to the key file at `path` and make it current; its version."""
    ring_file = json.loads(path.read_text())
    keys = {int(version): text for version, text in ring_file["keys"].items()}
    version = max(keys) + 1
    keys[version] = new_key_text()
    write_key_file(path, keys, version)
    return version


def retire_version(path: Path, version: int) -> None:
    """Remove master key `version` from the key file (the caller made sure nothing uses it)."""
    ring_file = json.loads(path.read_text())
    keys = {int(v): text for v, text in ring_file["keys"].items()}
    current = int(ring_file["current"])
    if version == current:
        raise SetupError(f"master key version {version} is the current one; rotate to a new one first")
    if version not in keys:
        raise SetupError(f"{path} holds no master key version {version}")
    del keys[version]
    write_key_file(path, keys, current)


def read_key_file(path: Path) -> KeyRing:
    try:
        document = json.loads(path.read_text())
        keys = {int(version): _decode_key(text, f"{path}: key {version}") for version, text in document["keys"].items()}
        current = int(document["current"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, SetupError):
            raise
        raise SetupError(f"{path} is not a herder master key file ({exc})") from None
    try:
        return KeyRing(keys, current)
    except SetupError as exc:
        raise SetupError(f"{path}: {exc}") from None


def write_key_file(path: Path, keys: dict[int, str], current: int) -> None:
    """Write the key file through a new 0600 file moved into place, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as out:
        json.dump({"current": current, "keys": {str(v): text for v, text in sorted(keys.items())}}, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
