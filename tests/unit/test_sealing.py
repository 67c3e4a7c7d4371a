"""Sealed boxes: one opens with its recipient's key in its context, and with nothing else; keys on disk."""

from __future__ import annotations

import base64
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from herder.client import sealing
from herder.client.sealing import KEY_BYTES, NONCE_BYTES, Sealed, SealError

SECRET = b"correct horse battery staple"
CONTEXT = sealing.context("credential-fetch", "acme", "robot-a", "job-1", "sap-login")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def flipped(data: bytes, index: int, mask: int = 0xFF) -> bytes:
    """`data` with the byte at `index` changed (every bit of it, by default)."""
    changed = bytearray(data)
    changed[index] ^= mask
    return bytes(changed)


def raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


@pytest.fixture
def robot_a() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


@pytest.fixture
def box(robot_a: X25519PrivateKey) -> Sealed:
    return sealing.seal(robot_a.public_key(), SECRET, CONTEXT)


def test_a_box_opens_with_its_recipients_key_in_its_context(robot_a: X25519PrivateKey, box: Sealed) -> None:
    assert sealing.open_sealed(robot_a, box, CONTEXT) == SECRET


def test_any_bytes_round_trip_even_empty_and_binary(robot_a: X25519PrivateKey) -> None:
    for plaintext in (b"", b"\x00\xff" * 100, "pässwörd ✓".encode()):
        sealed = sealing.seal(robot_a.public_key(), plaintext, CONTEXT)
        assert sealing.open_sealed(robot_a, sealed, CONTEXT) == plaintext


def test_the_ciphertext_does_not_hold_the_secret_in_clear(box: Sealed) -> None:
    assert SECRET not in box.ciphertext
    assert SECRET.decode() not in box.text()


def test_robot_b_cannot_open_a_box_sealed_for_robot_a(box: Sealed) -> None:
    robot_b = X25519PrivateKey.generate()
    with pytest.raises(SealError, match="does not open"):
        sealing.open_sealed(robot_b, box, CONTEXT)


def test_a_box_does_not_open_in_another_context(robot_a: X25519PrivateKey, box: Sealed) -> None:
    others = [
        sealing.context("credential-fetch", "acme", "robot-a", "job-2", "sap-login"),  # another job
        sealing.context("credential-fetch", "acme", "robot-a", "job-1", "other-login"),  # another credential
        sealing.context("credential-fetch", "acme", "robot-b", "job-1", "sap-login"),  # another robot
        sealing.context("credential-fetch", "other", "robot-a", "job-1", "sap-login"),  # another tenant
        sealing.context("credential-reveal", "acme", "robot-a", "job-1", "sap-login"),  # another purpose
        b"",
    ]
    for other in others:
        with pytest.raises(SealError, match="does not open"):
            sealing.open_sealed(robot_a, box, other)


@pytest.mark.parametrize("part", ["ephemeral", "nonce", "ciphertext"])
def test_a_box_with_any_byte_changed_does_not_open(robot_a: X25519PrivateKey, box: Sealed, part: str) -> None:
    data: bytes = getattr(box, part)
    for index in range(len(data)):
        changed = replace(box, **{part: flipped(data, index)})
        with pytest.raises(SealError):
            sealing.open_sealed(robot_a, changed, CONTEXT)


@pytest.mark.parametrize("part", ["ephemeral", "nonce", "ciphertext"])
def test_a_box_with_any_single_bit_changed_does_not_open(robot_a: X25519PrivateKey, box: Sealed, part: str) -> None:
    # X25519 ignores the top bit of a public key's last byte: only the key's bytes in the HKDF salt catch that one.
    data: bytes = getattr(box, part)
    for index in range(len(data)):
        for bit in range(8):
            changed = replace(box, **{part: flipped(data, index, 1 << bit)})
            with pytest.raises(SealError):
                sealing.open_sealed(robot_a, changed, CONTEXT)


def test_a_box_whose_ephemeral_key_is_not_usable_does_not_open(robot_a: X25519PrivateKey, box: Sealed) -> None:
    # An all-zero point has a small order: the exchange gives an all-zero secret, which cryptography refuses.
    with pytest.raises(SealError, match="ephemeral key"):
        sealing.open_sealed(robot_a, replace(box, ephemeral=bytes(KEY_BYTES)), CONTEXT)


def test_each_box_of_the_same_plaintext_differs(robot_a: X25519PrivateKey) -> None:
    first = sealing.seal(robot_a.public_key(), SECRET, CONTEXT)
    second = sealing.seal(robot_a.public_key(), SECRET, CONTEXT)
    assert first.ephemeral != second.ephemeral
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext
    assert sealing.open_sealed(robot_a, first, CONTEXT) == sealing.open_sealed(robot_a, second, CONTEXT) == SECRET


def test_a_box_has_the_sizes_of_its_parts(box: Sealed) -> None:
    assert len(box.ephemeral) == KEY_BYTES
    assert len(box.nonce) == NONCE_BYTES
    assert len(box.ciphertext) == len(SECRET) + 16  # the GCM tag


def test_a_box_as_text_round_trips(robot_a: X25519PrivateKey, box: Sealed) -> None:
    text = box.text()
    assert text.isascii()
    assert text.count(".") == 2
    assert "=" not in text
    again = Sealed.from_text(text)
    assert again == box
    assert sealing.open_sealed(robot_a, again, CONTEXT) == SECRET


def test_a_box_as_text_uses_only_base64url_and_dots(robot_a: X25519PrivateKey) -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    for _ in range(20):
        text = sealing.seal(robot_a.public_key(), SECRET, CONTEXT).text()
        assert set(text) <= allowed


@pytest.mark.parametrize("text", ["", "abc", "a.b", "a.b.c.d", "....", "a..b.c"])
def test_from_text_refuses_a_wrong_number_of_parts(text: str) -> None:
    # "a..b.c" has four parts; "" has one.
    with pytest.raises(SealError, match="three parts"):
        Sealed.from_text(text)


def test_from_text_refuses_what_is_not_base64(box: Sealed) -> None:
    ephemeral, nonce, ciphertext = box.text().split(".")
    # One character more than a multiple of four cannot be base64; nor can text outside ASCII.
    assert len(nonce) % 4 == 0
    bad_texts = [
        f"{'A' * 45}.{nonce}.{ciphertext}",
        f"{ephemeral}.{nonce}A.{ciphertext}",
        f"{ephemeral}.{nonce}.{'A' * 61}",
        f"{ephemeral}.{'é' * 16}.{ciphertext}",
    ]
    for bad in bad_texts:
        with pytest.raises(SealError, match="base64url"):
            Sealed.from_text(bad)


def test_from_text_refuses_parts_of_the_wrong_sizes(box: Sealed) -> None:
    wrong = [
        Sealed(box.ephemeral[:-1], box.nonce, box.ciphertext),
        Sealed(box.ephemeral + b"x", box.nonce, box.ciphertext),
        Sealed(box.ephemeral, box.nonce[:-1], box.ciphertext),
        Sealed(box.ephemeral, box.nonce + b"x", box.ciphertext),
        Sealed(box.ephemeral, box.nonce, box.ciphertext[:15]),  # shorter than a GCM tag
        Sealed(box.ephemeral, box.nonce, b""),
    ]
    for sealed in wrong:
        with pytest.raises(SealError, match="wrong sizes"):
            Sealed.from_text(sealed.text())


def test_from_text_accepts_a_ciphertext_of_just_a_tag(robot_a: X25519PrivateKey) -> None:
    empty = sealing.seal(robot_a.public_key(), b"", CONTEXT)
    assert len(empty.ciphertext) == 16
    assert sealing.open_sealed(robot_a, Sealed.from_text(empty.text()), CONTEXT) == b""


def test_a_public_key_as_text_round_trips(robot_a: X25519PrivateKey) -> None:
    text = sealing.public_text(robot_a.public_key())
    assert len(text) == 43
    assert "=" not in text
    public = sealing.public_from_text(text)
    assert sealing.public_text(public) == text
    # A box sealed to the key read back opens with the private key.
    assert sealing.open_sealed(robot_a, sealing.seal(public, SECRET, CONTEXT), CONTEXT) == SECRET


@pytest.mark.parametrize("size", [0, 1, 16, KEY_BYTES - 1, KEY_BYTES + 1, 64])
def test_public_from_text_refuses_a_key_of_the_wrong_length(size: int) -> None:
    with pytest.raises(SealError, match=f"{KEY_BYTES} bytes, not {size}"):
        sealing.public_from_text(b64(b"k" * size))


def test_public_from_text_refuses_what_is_not_base64() -> None:
    for bad in ("A" * 41, "é" * 43):  # 41 is one more than a multiple of four
        with pytest.raises(SealError, match="base64url"):
            sealing.public_from_text(bad)


def test_context_is_unambiguous() -> None:
    assert sealing.context("a", "bc") != sealing.context("ab", "c")
    assert sealing.context("a", "") != sealing.context("a")
    assert sealing.context("", "a") != sealing.context("a", "")
    assert sealing.context("x") != sealing.context("x", "")


def test_context_is_the_same_for_the_same_parts() -> None:
    assert sealing.context("t", "robot", "job") == sealing.context("t", "robot", "job")
    assert isinstance(sealing.context(), bytes)
    assert sealing.context() != sealing.context("")


def test_load_or_create_key_makes_a_file_its_owner_alone_reads(tmp_path: Path) -> None:
    path = tmp_path / "robot.key"
    key = sealing.load_or_create_key(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == raw_private(key)
    assert len(path.read_bytes()) == KEY_BYTES


def test_load_or_create_key_returns_the_same_key_the_second_time(tmp_path: Path) -> None:
    path = tmp_path / "robot.key"
    first = sealing.load_or_create_key(path)
    second = sealing.load_or_create_key(path)
    assert raw_private(first) == raw_private(second)
    # A box sealed to the first opens with the second.
    assert sealing.open_sealed(second, sealing.seal(first.public_key(), SECRET, CONTEXT), CONTEXT) == SECRET


def test_load_or_create_key_makes_the_folder_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "robot.key"
    key = sealing.load_or_create_key(path)
    assert path.parent.is_dir()
    assert path.read_bytes() == raw_private(key)


def test_load_or_create_keys_in_two_files_differ(tmp_path: Path) -> None:
    first = sealing.load_or_create_key(tmp_path / "a.key")
    second = sealing.load_or_create_key(tmp_path / "b.key")
    assert raw_private(first) != raw_private(second)


@pytest.mark.parametrize("size", [0, 1, KEY_BYTES - 1, KEY_BYTES + 1, 64])
def test_load_or_create_key_refuses_a_file_of_the_wrong_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "robot.key"
    path.write_bytes(b"x" * size)
    with pytest.raises(SealError, match=f"holds {size} bytes"):
        sealing.load_or_create_key(path)
    # The file is left as it was, for its owner to look at.
    assert path.read_bytes() == b"x" * size


def test_context_parts_holding_nul_are_still_unambiguous() -> None:
    assert sealing.context("a", "b\x00c") != sealing.context("a\x00b", "c")
