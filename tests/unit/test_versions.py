"""Version ordering: what "latest" means, the same everywhere."""

from __future__ import annotations

import random

import pytest

from herder.packaging.versions import compare, newest, newest_first, version_key


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.9.0", "1.10.0"),
        ("1.0.0", "1.0.1"),
        ("1.0.9", "1.1.0"),
        ("0.9", "1.0"),
        ("2.0.0-rc1", "2.0.0"),
        ("2.0.0-beta2", "2.0.0-rc1"),
        ("2.0.0-alpha", "2.0.0-beta"),
        ("2.0.0-rc2", "2.0.0-rc10"),
        ("1.0.0a1", "1.0.0"),
        ("1.0.4", "1.0.5a1"),
        ("1.0.0", "1.0.0.1"),
        ("1.0", "1.0.0"),
        ("1", "2"),
        ("9", "10"),
        ("1.0.0+build5", "1.0.0"),
        ("2024.12.31", "2025.1.1"),
        ("1_2_3", "1_2_4"),
        ("1.0.0-RC1", "1.0.0-rc2"),
        ("v1", "v2"),
        ("release", "1"),
    ],
)
def test_newer_versions_sort_above_older(older: str, newer: str) -> None:
    assert compare(older, newer) == -1
    assert compare(newer, older) == 1
    assert version_key(older) < version_key(newer)
    assert newest([older, newer]) == newer == newest([newer, older])


def test_separators_and_leading_zeros_tie_only_on_the_rules_and_the_text_breaks_the_tie() -> None:
    # Equal by the rules, but different strings: the order is still total and stable.
    for a, b in [("1.0", "1-0"), ("1.01", "1.1"), ("1.0.0-RC1", "1.0.0-rc1"), ("1+0", "1_0")]:
        assert version_key(a)[0] == version_key(b)[0]
        assert compare(a, b) != 0
        assert compare(a, b) == -compare(b, a)
    assert compare("1.2.3", "1.2.3") == 0


def test_newest_first_is_a_total_order_whatever_the_input_order() -> None:
    expected = ["10.0", "2.0.0", "2.0.0-rc10", "2.0.0-rc2", "2.0.0-beta", "1.10.0", "1.9.0", "1.0.0.1", "1.0.0", "1.0"]
    rng = random.Random(7)
    for _ in range(20):
        shuffled = expected[:]
        rng.shuffle(shuffled)
        assert newest_first(shuffled) == expected


def test_ordering_is_transitive_on_a_mixed_bag() -> None:
    bag = ["1", "1.0", "1.0.0", "1.0.0-rc1", "1.0.0a", "1.0.0+b", "1-0", "01", "1.0.1", "a", "b1", "B1", "1.a"]
    ordered = sorted(bag, key=version_key)
    for i, lower in enumerate(ordered):
        for higher in ordered[i + 1 :]:
            assert compare(lower, higher) == -1, (lower, higher)


def test_newest_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no versions to choose from"):
        newest([])
