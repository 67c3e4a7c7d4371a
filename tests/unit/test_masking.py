"""Masking secrets in a job's log: every occurrence, in text and in values, keys included; short ones refused."""

from __future__ import annotations

import pytest

from herder.robot.masking import MASK, MIN_MASKED_CHARS, Masks

SECRET = "hunter2!"


@pytest.fixture
def masks() -> Masks:
    masks = Masks()
    assert masks.add(SECRET)
    return masks


def test_no_masks_until_a_secret_is_added() -> None:
    masks = Masks()
    assert not masks
    assert masks.text(f"the password is {SECRET}") == f"the password is {SECRET}"
    assert masks.add(SECRET) is True
    assert masks


def test_a_secret_is_masked_everywhere_in_text(masks: Masks) -> None:
    assert masks.text(f"{SECRET}") == MASK
    assert masks.text(f"login with {SECRET} then {SECRET}, again:{SECRET}{SECRET}") == (
        f"login with {MASK} then {MASK}, again:{MASK}{MASK}"
    )
    assert masks.text("nothing to hide here") == "nothing to hide here"
    assert SECRET not in masks.text(f"a\n{SECRET}\nb")


def test_a_secret_is_masked_in_nested_values_and_keys(masks: Masks) -> None:
    value = {
        "user": "ada",
        "password": SECRET,
        SECRET: "as a key",
        f"key-{SECRET}": [f"in a list: {SECRET}", {"deeper": [SECRET, 1, None]}],
        "tuple": ("plain", SECRET),
    }
    assert masks.value(value) == {
        "user": "ada",
        "password": MASK,
        MASK: "as a key",
        f"key-{MASK}": [f"in a list: {MASK}", {"deeper": [MASK, 1, None]}],
        "tuple": ["plain", MASK],
    }
    assert masks.value(SECRET) == MASK
    assert masks.value([SECRET]) == [MASK]


def test_masking_a_value_leaves_the_original_unchanged(masks: Masks) -> None:
    value = {"password": SECRET, "list": [SECRET]}
    masks.value(value)
    assert value == {"password": SECRET, "list": [SECRET]}


@pytest.mark.parametrize("value", [None, True, False, 0, 1234, 3.5, b"hunter2!", bytearray(b"hunter2!")])
def test_values_that_are_not_strings_pass_unchanged(masks: Masks, value: object) -> None:
    assert masks.value(value) is value


def test_keys_that_are_not_strings_pass_unchanged(masks: Masks) -> None:
    assert masks.value({1: SECRET, None: "x", (1, 2): "y"}) == {1: MASK, None: "x", (1, 2): "y"}


@pytest.mark.parametrize("secret", ["", "a", "ab", "x" * (MIN_MASKED_CHARS - 1)])
def test_a_secret_too_short_to_mask_is_refused(secret: str) -> None:
    masks = Masks()
    assert masks.add(secret) is False
    assert not masks
    text = f"a line with {secret} in it: {secret}"
    assert masks.text(text) == text
    assert masks.value({secret: [secret]}) == {secret: [secret]}


def test_a_secret_of_the_minimum_length_is_masked() -> None:
    masks = Masks()
    secret = "k" * MIN_MASKED_CHARS
    assert masks.add(secret) is True
    assert masks.text(f"[{secret}]") == f"[{MASK}]"


def test_a_short_secret_beside_a_long_one_is_not_masked(masks: Masks) -> None:
    assert masks.add("abc") is False
    assert masks.text(f"abc {SECRET}") == f"abc {MASK}"


def test_a_secret_inside_a_longer_one_masks_both_fully() -> None:
    # Added shorter first: the longer is still masked whole, not as "hunter" + MASK.
    inner, outer = "hunter", "hunter2024"
    masks = Masks()
    assert masks.add(inner)
    assert masks.add(outer)
    assert masks.text(f"{outer} and {inner}") == f"{MASK} and {MASK}"
    other = Masks()
    assert other.add(outer)
    assert other.add(inner)
    assert other.text(f"{inner}|{outer}|{outer}{inner}") == f"{MASK}|{MASK}|{MASK}{MASK}"


def test_adding_a_secret_twice_is_harmless(masks: Masks) -> None:
    assert masks.add(SECRET) is True
    assert masks.text(f"{SECRET}{SECRET}") == f"{MASK}{MASK}"


def test_masking_is_case_sensitive(masks: Masks) -> None:
    assert masks.text(SECRET.upper()) == SECRET.upper()


def test_overlapping_secrets_leave_no_part_of_either() -> None:
    masks = Masks()
    assert masks.add("abcdef") and masks.add("defghi")
    assert masks.text("x abcdefghi y") == "x *** y"


def test_keys_that_mask_alike_keep_their_values() -> None:
    masks = Masks()
    masks.add("hunter22")
    masks.add("swordfish")
    masked = masks.value({"hunter22": 1, "swordfish": 2})
    assert sorted(masked.values()) == [1, 2]
    assert all("hunter22" not in key and "swordfish" not in key for key in masked)
