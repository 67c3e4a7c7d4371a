"""Envelope encryption at rest: a value opens in its own row only, rotation rewraps, master keys load."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from herder.client import sealing
from herder.client.errors import SetupError
from herder.services.secrets import envelope
from herder.services.secrets.envelope import KEY_BYTES, MASTER_KEY_ENV, NONCE_BYTES, DecryptionFailed, KeyRing, Sealed

SECRET = b"s3cr3t-p4ssw0rd"
ROW = sealing.context("credential-at-rest", "acme", "sap-login", "global", "")


def key_of(byte: int) -> bytes:
    return bytes([byte]) * KEY_BYTES


def text_of(key: bytes) -> str:
    return base64.b64encode(key).decode()


def flipped(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0xFF
    return bytes(changed)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing({1: os.urandom(KEY_BYTES)}, 1)


@pytest.fixture
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HERDER_MASTER_KEY: the keys come from the key file."""
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)


def test_a_sealed_value_opens_in_its_context(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, ROW)
    assert sealed.key_version == 1
    assert ring.open(sealed, ROW) == SECRET


def test_a_sealed_value_is_not_in_clear_and_each_seal_differs(ring: KeyRing) -> None:
    first = ring.seal(SECRET, ROW)
    second = ring.seal(SECRET, ROW)
    assert SECRET not in first.ciphertext
    assert first.ciphertext != second.ciphertext
    assert first.wrapped_key != second.wrapped_key
    # Nonce, data key (32 bytes) and tag; nonce, secret and tag.
    assert len(first.wrapped_key) == NONCE_BYTES + KEY_BYTES + 16
    assert len(first.ciphertext) == NONCE_BYTES + len(SECRET) + 16


def test_an_empty_secret_round_trips(ring: KeyRing) -> None:
    assert ring.open(ring.seal(b"", ROW), ROW) == b""


@pytest.mark.parametrize(
    "other",
    [
        sealing.context("credential-at-rest", "other-tenant", "sap-login", "global", ""),
        sealing.context("credential-at-rest", "acme", "other-login", "global", ""),
        sealing.context("credential-at-rest", "acme", "sap-login", "robot", "robot-1"),
        sealing.context("credential-at-rest", "acme", "sap-login", "group", "finance"),
        b"",
    ],
)
def test_a_value_moved_to_another_row_does_not_open(ring: KeyRing, other: bytes) -> None:
    sealed = ring.seal(SECRET, ROW)
    with pytest.raises(DecryptionFailed, match="does not decrypt"):
        ring.open(sealed, other)


def test_a_value_with_any_byte_of_its_wrapped_key_changed_does_not_open(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, ROW)
    for index in range(len(sealed.wrapped_key)):
        with pytest.raises(DecryptionFailed):
            ring.open(replace(sealed, wrapped_key=flipped(sealed.wrapped_key, index)), ROW)


def test_a_value_with_any_byte_of_its_ciphertext_changed_does_not_open(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, ROW)
    for index in range(len(sealed.ciphertext)):
        with pytest.raises(DecryptionFailed):
            ring.open(replace(sealed, ciphertext=flipped(sealed.ciphertext, index)), ROW)


def test_a_value_cut_short_does_not_open(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, ROW)
    with pytest.raises(DecryptionFailed, match="too short"):
        ring.open(replace(sealed, wrapped_key=sealed.wrapped_key[: NONCE_BYTES + 15]), ROW)
    with pytest.raises(DecryptionFailed, match="too short"):
        ring.open(replace(sealed, ciphertext=b""), ROW)


def test_swapped_ciphertexts_of_two_values_do_not_open(ring: KeyRing) -> None:
    # Each value has its own data key: a ciphertext beside another's wrapped key does not open, even in the same row.
    first = ring.seal(b"first secret", ROW)
    second = ring.seal(b"second secret", ROW)
    with pytest.raises(DecryptionFailed):
        ring.open(replace(first, ciphertext=second.ciphertext), ROW)
    with pytest.raises(DecryptionFailed):
        ring.open(replace(second, ciphertext=first.ciphertext), ROW)
    assert ring.open(first, ROW) == b"first secret"
    assert ring.open(second, ROW) == b"second secret"


def test_a_ring_with_another_master_key_does_not_open(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, ROW)
    other = KeyRing({1: os.urandom(KEY_BYTES)}, 1)
    with pytest.raises(DecryptionFailed, match="master key differs"):
        other.open(sealed, ROW)


def test_a_ring_without_the_values_version_names_it() -> None:
    sealed = KeyRing({3: key_of(3)}, 3).seal(SECRET, ROW)
    later = KeyRing({4: key_of(4)}, 4)
    with pytest.raises(DecryptionFailed, match="version 3, which is not loaded"):
        later.open(sealed, ROW)
    with pytest.raises(DecryptionFailed, match="version 3, which is not loaded"):
        later.rewrap(sealed, ROW)


def test_rewrap_moves_a_value_to_the_current_master_key() -> None:
    old, new = key_of(1), key_of(2)
    sealed = KeyRing({1: old}, 1).seal(SECRET, ROW)
    both = KeyRing({1: old, 2: new}, 2)
    rewrapped = both.rewrap(sealed, ROW)
    assert rewrapped.key_version == 2
    assert rewrapped.wrapped_key != sealed.wrapped_key
    assert rewrapped.ciphertext == sealed.ciphertext
    assert both.open(rewrapped, ROW) == SECRET
    # The old key can go once every value is rewrapped.
    assert KeyRing({2: new}, 2).open(rewrapped, ROW) == SECRET
    with pytest.raises(DecryptionFailed, match="version 2, which is not loaded"):
        KeyRing({1: old}, 1).open(rewrapped, ROW)


def test_rewrap_of_a_value_already_under_the_current_key_changes_nothing(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, ROW)
    assert ring.rewrap(sealed, ROW) is sealed


def test_rewrap_in_another_context_fails() -> None:
    sealed = KeyRing({1: key_of(1)}, 1).seal(SECRET, ROW)
    both = KeyRing({1: key_of(1), 2: key_of(2)}, 2)
    with pytest.raises(DecryptionFailed):
        both.rewrap(sealed, sealing.context("credential-at-rest", "acme", "other-login", "global", ""))


def test_a_ring_writes_under_its_current_version_and_opens_every_version() -> None:
    old = KeyRing({1: key_of(1)}, 1).seal(SECRET, ROW)
    both = KeyRing({1: key_of(1), 2: key_of(2)}, 2)
    assert both.versions == [1, 2]
    assert both.seal(SECRET, ROW).key_version == 2
    assert both.open(old, ROW) == SECRET


def test_derive_is_deterministic_and_separates_purposes_and_keys() -> None:
    ring = KeyRing({1: key_of(7)}, 1)
    same = KeyRing({1: key_of(7)}, 1)
    other = KeyRing({1: key_of(8)}, 1)
    tokens = ring.derive("tokens")
    assert len(tokens) == KEY_BYTES
    assert tokens == ring.derive("tokens") == same.derive("tokens")
    assert tokens != ring.derive("transport")
    assert tokens != other.derive("tokens")
    assert tokens != key_of(7)


def test_derive_uses_the_current_version() -> None:
    assert KeyRing({1: key_of(1), 2: key_of(2)}, 2).derive("x") == KeyRing({2: key_of(2)}, 2).derive("x")
    assert KeyRing({1: key_of(1), 2: key_of(2)}, 1).derive("x") == KeyRing({1: key_of(1)}, 1).derive("x")


def test_a_ring_refuses_a_current_version_it_does_not_hold() -> None:
    with pytest.raises(SetupError, match="version 2 as current"):
        KeyRing({1: key_of(1)}, 2)
    with pytest.raises(SetupError, match="version 1 as current"):
        KeyRing({}, 1)


@pytest.mark.parametrize("size", [0, 16, KEY_BYTES - 1, KEY_BYTES + 1])
def test_a_ring_refuses_a_key_of_the_wrong_length(size: int) -> None:
    with pytest.raises(SetupError, match=f"version 2 is {size} bytes"):
        KeyRing({1: key_of(1), 2: b"k" * size}, 1)


def test_load_ring_takes_the_key_in_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = os.urandom(KEY_BYTES)
    monkeypatch.setenv(MASTER_KEY_ENV, text_of(key))
    ring = envelope.load_ring(tmp_path, create=True)
    assert ring.current == 1
    assert ring.versions == [1]
    assert KeyRing({1: key}, 1).open(ring.seal(SECRET, ROW), ROW) == SECRET
    # With the key in the environment, no key file is made.
    assert not (tmp_path / envelope.KEY_FILE).exists()


def test_load_ring_takes_the_environment_without_a_data_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, f"  {text_of(key_of(5))}\n")
    ring = envelope.load_ring(None, create=False)
    assert ring.derive("x") == KeyRing({1: key_of(5)}, 1).derive("x")


@pytest.mark.parametrize("value", ["not base64!", "****", "é" * 44])
def test_load_ring_refuses_an_environment_key_that_is_not_base64(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, value)
    with pytest.raises(SetupError, match=f"{MASTER_KEY_ENV} is not base64"):
        envelope.load_ring(None, create=False)


@pytest.mark.parametrize("size", [1, 16, KEY_BYTES - 1, KEY_BYTES + 1, 64])
def test_load_ring_refuses_an_environment_key_of_the_wrong_length(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, text_of(b"k" * size))
    with pytest.raises(SetupError, match=f"{MASTER_KEY_ENV} is {size} bytes"):
        envelope.load_ring(None, create=False)


@pytest.mark.usefixtures("no_env_key")
def test_load_ring_makes_a_key_file_its_owner_alone_reads(tmp_path: Path) -> None:
    first = envelope.load_ring(tmp_path, create=True)
    path = tmp_path / envelope.KEY_FILE
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["current"] == 1
    assert list(document["keys"]) == ["1"]
    assert len(base64.b64decode(document["keys"]["1"])) == KEY_BYTES
    assert not path.with_name(path.name + ".new").exists()
    assert first.versions == [1]

    second = envelope.load_ring(tmp_path, create=True)
    assert path.read_text() == json.dumps(document)
    assert second.open(first.seal(SECRET, ROW), ROW) == SECRET
    assert envelope.load_ring(tmp_path, create=False).derive("x") == first.derive("x")


@pytest.mark.usefixtures("no_env_key")
def test_load_ring_makes_the_data_folder_when_missing(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "secrets"
    ring = envelope.load_ring(folder, create=True)
    assert (folder / envelope.KEY_FILE).is_file()
    assert ring.current == 1


@pytest.mark.usefixtures("no_env_key")
def test_load_ring_without_a_key_file_and_without_create_fails(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="does not exist") as caught:
        envelope.load_ring(tmp_path, create=False)
    assert str(tmp_path / envelope.KEY_FILE) in caught.value.message
    assert MASTER_KEY_ENV in caught.value.message
    assert not (tmp_path / envelope.KEY_FILE).exists()


@pytest.mark.usefixtures("no_env_key")
def test_load_ring_without_a_key_or_a_data_folder_fails() -> None:
    with pytest.raises(SetupError, match=MASTER_KEY_ENV):
        envelope.load_ring(None, create=True)


@pytest.mark.usefixtures("no_env_key")
def test_an_empty_environment_key_falls_back_to_the_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    envelope.write_key_file(tmp_path / envelope.KEY_FILE, {1: text_of(key_of(9))}, 1)
    monkeypatch.setenv(MASTER_KEY_ENV, "")
    ring = envelope.load_ring(tmp_path, create=False)
    assert ring.derive("x") == KeyRing({1: key_of(9)}, 1).derive("x")


@pytest.mark.usefixtures("no_env_key")
@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe garbage",
        b"[]",
        b"{}",
        b'{"current": 1}',
        b'{"keys": {"1": "AAAA"}}',
        b'{"current": "one", "keys": {}}',
        b'{"current": 1, "keys": []}',
        b'{"current": 1, "keys": {"one": "AAAA"}}',
        b'{"current": 1, "keys": {"1": 5}}',
        b'{"current": 1, "keys": {"1": "not base64!"}}',
        b'{"current": 1, "keys": {"1": "AAAA"}}',
        b'{"current": 2, "keys": {"1": "' + text_of(key_of(1)).encode() + b'"}}',
    ],
)
def test_a_corrupt_key_file_is_refused_naming_its_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / envelope.KEY_FILE
    path.write_bytes(content)
    with pytest.raises(SetupError) as caught:
        envelope.load_ring(tmp_path, create=True)
    # The last one is refused by the ring, which names the version rather than the file.
    if b'"current": 2' not in content:
        assert str(path) in caught.value.message
    # A corrupt file is never replaced by a new key.
    assert path.read_bytes() == content


def test_a_key_file_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / envelope.KEY_FILE
    path.mkdir()
    with pytest.raises(SetupError, match="not a herder master key file") as caught:
        envelope.read_key_file(path)
    assert str(path) in caught.value.message


def test_a_key_file_round_trips_two_versions(tmp_path: Path) -> None:
    path = tmp_path / "keys" / envelope.KEY_FILE
    old = KeyRing({1: key_of(1)}, 1).seal(SECRET, ROW)
    envelope.write_key_file(path, {2: text_of(key_of(2)), 1: text_of(key_of(1))}, 2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["keys"] == {"1": text_of(key_of(1)), "2": text_of(key_of(2))}
    ring = envelope.read_key_file(path)
    assert ring.versions == [1, 2]
    assert ring.current == 2
    assert ring.open(old, ROW) == SECRET
    assert KeyRing({2: key_of(2)}, 2).open(ring.seal(SECRET, ROW), ROW) == SECRET


def test_writing_a_key_file_replaces_the_old_one_whole(tmp_path: Path) -> None:
    path = tmp_path / envelope.KEY_FILE
    envelope.write_key_file(path, {1: text_of(key_of(1))}, 1)
    # A leftover from a write that stopped half-way does not stop the next.
    path.with_name(path.name + ".new").write_text("half")
    envelope.write_key_file(path, {1: text_of(key_of(1)), 2: text_of(key_of(2))}, 2)
    assert envelope.read_key_file(path).versions == [1, 2]
    assert not path.with_name(path.name + ".new").exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_new_key_text_is_a_fresh_usable_key() -> None:
    first, second = envelope.new_key_text(), envelope.new_key_text()
    assert first != second
    assert len(base64.b64decode(first, validate=True)) == KEY_BYTES
    ring = KeyRing({1: base64.b64decode(first)}, 1)
    assert ring.open(ring.seal(SECRET, ROW), ROW) == SECRET


def test_a_stored_value_is_a_plain_frozen_record(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, ROW)
    copied = Sealed(sealed.key_version, bytes(sealed.wrapped_key), bytes(sealed.ciphertext))
    assert copied == sealed
    assert ring.open(copied, ROW) == SECRET
    with pytest.raises(AttributeError):
        sealed.key_version = 2  # type: ignore[misc]
