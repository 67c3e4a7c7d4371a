"""Asset values by type: what each type accepts, what it refuses and how it says so; the scope of a value."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from herder.protocol.errors import BadRequest
from herder.protocol.secrets import (
    MAX_CALENDAR_DATES,
    MAX_TEXT_CHARS,
    AssetType,
    Scope,
    ScopeKind,
    parse_asset_value,
)
from herder.protocol.values import MAX_SAFE_INTEGER

# What `check_value` (inside `parse_asset_value`) refuses comes out as a `BadRequest`, not a `ValueError`:
# see the strict xfails below. These tests check such values are refused at all.
Refused = (ValueError, BadRequest)


def refusal(kind: AssetType, value: Any) -> str:
    """The message of the `ValueError` that parsing `value` as `kind` raises."""
    with pytest.raises(ValueError) as caught:  # noqa: PT011 - the callers check the message
        parse_asset_value(kind, value)
    return str(caught.value)


# --- text ---


@pytest.mark.parametrize("value", ["", "plain", "ünïcödé ✓", "line\nbreak", "x" * MAX_TEXT_CHARS])
def test_text_accepts_a_string(value: str) -> None:
    assert parse_asset_value(AssetType.TEXT, value) == value


@pytest.mark.parametrize("value", [1, 1.5, True, None, b"bytes", ["a"], {"a": "b"}])
def test_text_refuses_what_is_not_a_string(value: object) -> None:
    message = refusal(AssetType.TEXT, value)
    assert "text" in message
    assert type(value).__name__ in message


def test_text_refuses_more_than_its_maximum() -> None:
    message = refusal(AssetType.TEXT, "x" * (MAX_TEXT_CHARS + 1))
    assert "text" in message
    assert f"{MAX_TEXT_CHARS:,}" in message


@pytest.mark.parametrize("value", ["a\x00b", "\x00", "lone \ud800 surrogate"])
def test_text_refuses_what_a_database_cannot_store(value: str) -> None:
    with pytest.raises(Refused, match=r"NUL|surrogate"):
        parse_asset_value(AssetType.TEXT, value)


def test_text_refuses_a_nul_with_a_value_error_naming_text() -> None:
    assert "text" in refusal(AssetType.TEXT, "a\x00b")


# --- bool ---


@pytest.mark.parametrize("value", [True, False])
def test_bool_accepts_true_and_false(value: bool) -> None:
    assert parse_asset_value(AssetType.BOOL, value) is value


@pytest.mark.parametrize("value", [1, 0, "true", "false", None, 1.0, [True]])
def test_bool_refuses_anything_but_true_and_false(value: object) -> None:
    message = refusal(AssetType.BOOL, value)
    assert "bool" in message
    assert repr(value) in message


# --- integer ---


@pytest.mark.parametrize("value", [0, 1, -1, 42, MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER])
def test_integer_accepts_whole_numbers_within_the_safe_range(value: int) -> None:
    result = parse_asset_value(AssetType.INTEGER, value)
    assert result == value
    assert type(result) is int


@pytest.mark.parametrize("value", [True, False, 1.0, 1.5, "1", None, [1]])
def test_integer_refuses_booleans_floats_and_strings(value: object) -> None:
    message = refusal(AssetType.INTEGER, value)
    assert "integer" in message
    assert repr(value) in message


@pytest.mark.parametrize("value", [MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1, 2**64, -(2**100)])
def test_integer_refuses_whole_numbers_beyond_the_safe_range(value: int) -> None:
    with pytest.raises(Refused, match="outside the integers"):
        parse_asset_value(AssetType.INTEGER, value)


def test_integer_refuses_a_number_beyond_the_safe_range_with_a_value_error_naming_integer() -> None:
    assert "integer" in refusal(AssetType.INTEGER, MAX_SAFE_INTEGER + 1)


# --- json ---


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        2.5,
        "text",
        [],
        {},
        {"a": [1, 2.5, None, True, "x", {"b": {"c": []}}], "ünï": "✓"},
        [[[[{"deep": MAX_SAFE_INTEGER}]]]],
    ],
)
def test_json_accepts_json_safe_values(value: object) -> None:
    assert parse_asset_value(AssetType.JSON, value) == value


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), {"a": [1, float("nan")]}, {"n": float("inf")}]
)
def test_json_refuses_numbers_that_are_not_finite(value: object) -> None:
    with pytest.raises(Refused, match="not a finite number"):
        parse_asset_value(AssetType.JSON, value)


@pytest.mark.parametrize("value", [{1: "x"}, {"a": {1, 2}}, b"bytes", {"s": "a\x00b"}])
def test_json_refuses_what_is_not_json_safe(value: object) -> None:
    with pytest.raises(Refused):
        parse_asset_value(AssetType.JSON, value)


def test_json_refuses_a_value_that_names_where_the_problem_is() -> None:
    with pytest.raises(Refused, match=r"value\.a\[1\]"):
        parse_asset_value(AssetType.JSON, {"a": [1, float("nan")]})


def test_json_refuses_nan_with_a_value_error_naming_json() -> None:
    assert "json" in refusal(AssetType.JSON, float("nan")).lower()


# --- calendar ---


def test_calendar_accepts_dates_and_keeps_them_sorted_and_unique() -> None:
    value = ["2025-12-25", "2025-01-01", "2025-12-25", "2024-02-29"]
    assert parse_asset_value(AssetType.CALENDAR, value) == ["2024-02-29", "2025-01-01", "2025-12-25"]


def test_calendar_accepts_an_empty_list_and_leaves_its_input_alone() -> None:
    assert parse_asset_value(AssetType.CALENDAR, []) == []
    value = ["2025-02-01", "2025-01-01"]
    parse_asset_value(AssetType.CALENDAR, value)
    assert value == ["2025-02-01", "2025-01-01"]


@pytest.mark.parametrize("value", ["2025-01-01", None, {"2025-01-01": True}, ("2025-01-01",), 20250101])
def test_calendar_refuses_what_is_not_a_list(value: object) -> None:
    message = refusal(AssetType.CALENDAR, value)
    assert "calendar" in message
    assert "list" in message


@pytest.mark.parametrize("bad", ["2025-13-01", "2025-02-30", "2023-02-29", "tomorrow", "", 20250101, None, ["x"]])
def test_calendar_refuses_a_bad_date_naming_its_index(bad: object) -> None:
    message = refusal(AssetType.CALENDAR, ["2025-01-01", bad, "2025-01-03"])
    assert message.startswith("value[1]: ")
    assert repr(bad) in message
    assert "YYYY-MM-DD" in message


def test_calendar_refuses_more_than_its_maximum_of_dates() -> None:
    # Counted before duplicates go: the list given is too long, however few distinct days it holds.
    message = refusal(AssetType.CALENDAR, ["2025-01-01"] * (MAX_CALENDAR_DATES + 1))
    assert "calendar" in message
    assert str(MAX_CALENDAR_DATES) in message
    assert len(parse_asset_value(AssetType.CALENDAR, ["2025-01-01"] * MAX_CALENDAR_DATES)) == 1


@pytest.mark.parametrize("bad", ["20250101", "2025-W01-3"])
def test_calendar_refuses_dates_not_written_as_yyyy_mm_dd(bad: str) -> None:
    assert refusal(AssetType.CALENDAR, [bad]).startswith("value[0]: ")


# --- scope ---


def test_the_global_scope_names_nothing() -> None:
    scope = Scope()
    assert scope.kind is ScopeKind.GLOBAL
    assert scope.name is None
    assert scope.describe() == "global"
    assert Scope.of() == scope
    with pytest.raises(ValidationError, match="global scope names nothing"):
        Scope(kind=ScopeKind.GLOBAL, name="robot-1")


@pytest.mark.parametrize("kind", [ScopeKind.GROUP, ScopeKind.ROBOT])
def test_a_group_or_robot_scope_needs_a_name(kind: ScopeKind) -> None:
    with pytest.raises(ValidationError, match="names its group or robot"):
        Scope(kind=kind)
    with pytest.raises(ValidationError):
        Scope(kind=kind, name="not a name")  # spaces are no robot or group name
    assert Scope(kind=kind, name="finance-1").describe() == f"{kind.value} finance-1"


def test_scope_of_a_robot_or_a_group() -> None:
    robot = Scope.of(robot="robot-1")
    assert (robot.kind, robot.name) == (ScopeKind.ROBOT, "robot-1")
    assert robot.describe() == "robot robot-1"
    group = Scope.of(group="finance")
    assert (group.kind, group.name) == (ScopeKind.GROUP, "finance")
    assert group.describe() == "group finance"


def test_scope_of_both_a_robot_and_a_group_is_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        Scope.of(robot="robot-1", group="finance")


def test_scopes_are_values() -> None:
    # Equal scopes are one key of a dict, as the service resolves values by scope.
    by_scope = {Scope.of(robot="robot-1"): 1, Scope(): 2}
    assert by_scope[Scope(kind=ScopeKind.ROBOT, name="robot-1")] == 1
    assert by_scope[Scope.of()] == 2
    assert Scope.of(robot="x1") != Scope.of(group="x1")
