"""Hypothesis strategies for JSON-safe values (see protocol/values.py), shared by the unit and integration tests."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from herder.protocol.values import MAX_SAFE_INTEGER

safe_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
# Text that breaks naive code: line and paragraph separators, astral characters, controls, quotes, a BOM.
nasty_text = st.sampled_from(
    ["", "\u2028\u2029", "é", "😀👍🏽", "\U0010ffff", "\x7f\x01\n\t", '"\\', "\ufeff", "שלום", "a" * 50]
)
safe_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
    | st.sampled_from([MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 0])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([-0.0, 1e308, -1e308, 5e-324])
    | safe_text
    | nasty_text
)
safe_keys = safe_text | nasty_text
safe_values = st.recursive(
    safe_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(safe_keys, children, max_size=4),
    max_leaves=25,
)
safe_objects = st.dictionaries(safe_keys, safe_values, max_size=5)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (1 is not 1.0 is not True; -0.0 is not 0.0)."""
    return bool(a == b and json.dumps(a) == json.dumps(b))
