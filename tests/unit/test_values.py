"""JSON-safe values: what is accepted survives every codec unchanged; what is refused is named by its path."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from herder.protocol import codec
from herder.protocol.errors import BadRequest
from herder.protocol.jobs import MAX_INPUT_BYTES, MAX_OUTPUT_BYTES, JobReport, JobStart, Outcome
from herder.protocol.packages import EntryKind, PackagePublish
from herder.protocol.registry import RobotConnect
from herder.protocol.values import (
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    check_object,
    check_value,
    parse_json_object,
    refuse_nul,
    without_nul,
)
from herder.robot import sdk
from tests.json_values import safe_objects, safe_text, same

# Keys that a path shows as `.key`, and the parts of a path to put a bad value at.
plain_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
path_parts = st.lists(plain_keys | st.integers(0, 3), max_size=6)


def json_bytes(value: Any) -> int:
    """The size herder measures: UTF-8 JSON with json's default separators."""
    return len(json.dumps(value, ensure_ascii=False).encode())


def placed(parts: list[str | int], leaf: Any) -> tuple[dict[str, Any], str]:
    """A value holding `leaf` under `root` at `parts`, and the path a refusal should name."""
    inner = leaf
    for part in reversed(parts):
        # "Other" is no plain key the strategy draws: it never replaces `part`.
        inner = [0] * part + [inner] if isinstance(part, int) else {part: inner, "Other": 1}
    path = "input.root" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    return {"first": "fine", "root": inner}, path


def refusal(value: Any, **kwargs: Any) -> str:
    """The message of the `BadRequest` that checking `value` as `input` raises."""
    with pytest.raises(BadRequest) as caught:
        check_value(value, what="input", **kwargs)
    message = caught.value.message
    assert "\n" not in message and len(message) < 400, message
    return message


def nested_lists(depth: int) -> list[Any]:
    """A list nested `depth` levels deep, the outermost included."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_dicts(depth: int) -> dict[str, Any]:
    """An object nested `depth` levels deep, the outermost included."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


# --- accepted values ---


@given(safe_objects)
def test_accepted_values_round_trip_unchanged_through_msgpack_and_json(value: dict[str, Any]) -> None:
    check_value(value)
    request = JobStart(process="p", robot="r", input=value)
    for content_type in (codec.MSGPACK, codec.JSON):
        back = codec.load(JobStart, codec.dump(request, content_type), content_type)
        assert same(back.input, value), content_type
    report = JobReport(job_id="a" * 32, attempt=1, outcome=Outcome.SUCCESSFUL, output=value)
    assert same(codec.load(JobReport, codec.dump(report)).output, value)
    assert same(json.loads(json.dumps(value)), value)


@given(safe_objects)
def test_the_size_limit_is_the_utf8_json_size_to_the_byte(value: dict[str, Any]) -> None:
    size = json_bytes(value)
    check_value(value, max_bytes=size)
    assert "larger than" in refusal(value, max_bytes=size - 1)


def test_the_input_limit_is_256_kib_of_json() -> None:
    padding = MAX_INPUT_BYTES - json_bytes({"a": ""})
    JobStart(process="p", robot="r", input={"a": "é" * (padding // 2)})
    with pytest.raises(ValueError, match="larger than 256 KiB as JSON"):
        JobStart(process="p", robot="r", input={"a": "x" * (padding + 1)})


def test_the_protocol_and_the_sdk_agree_on_the_output_limit() -> None:
    assert MAX_OUTPUT_BYTES == sdk.MAX_OUTPUT_BYTES


@pytest.mark.parametrize("nested", [nested_lists, nested_dicts])
def test_nesting_of_exactly_max_depth_is_accepted(nested: Any) -> None:
    check_value(nested(MAX_DEPTH))
    assert refusal(nested(MAX_DEPTH + 1)).endswith(f": nested deeper than {MAX_DEPTH} levels")


# --- refused values ---

bad_integers = st.integers(min_value=MAX_SAFE_INTEGER + 1) | st.integers(max_value=-MAX_SAFE_INTEGER - 1)


@given(path_parts, bad_integers)
def test_integers_beyond_2_53_are_refused_at_their_path(parts: list[str | int], number: int) -> None:
    value, path = placed(parts, number)
    message = refusal(value)
    assert message.startswith(f"{path}: ")
    assert message.endswith("is outside the integers JSON-safe values may hold (±9007199254740991)")


@given(path_parts, st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_and_infinities_are_refused_at_their_path(parts: list[str | int], number: float) -> None:
    value, path = placed(parts, number)
    assert refusal(value).startswith(f"{path}: {number!r} is not a finite number")


@given(path_parts, safe_text, safe_text)
def test_nul_in_a_string_is_refused_at_its_path(parts: list[str | int], head: str, tail: str) -> None:
    value, path = placed(parts, head + "\x00" + tail)
    assert refusal(value).startswith(f'{path}: the string holds a NUL character ("\\x00") at index {len(head)}')


# Short enough that the path is never cut in the middle.
@given(st.lists(plain_keys | st.integers(0, 3), max_size=3), st.text(st.characters(codec="utf-8"), max_size=5))
def test_nul_in_a_key_is_refused_at_that_key(parts: list[str | int], head: str) -> None:
    key = head + "\x00"
    value, path = placed(parts, {key: 1})
    assert refusal(value).startswith(
        f'{path}[{key!r}]: the key holds a NUL character ("\\x00") at index {key.index(chr(0))}'
    )


@given(
    path_parts,
    st.sampled_from(
        [
            (b"bytes", "a Python bytes is not a JSON-safe value"),
            ((1, 2), "a Python tuple is not a JSON-safe value"),
            ({1, 2}, "a Python set is not a JSON-safe value"),
            ("a\ud800", "the string holds a lone surrogate (U+D800) at index 1, which is not Unicode"),
        ]
    ),
)
def test_other_types_and_lone_surrogates_are_refused_at_their_path(
    parts: list[str | int], leaf_and_problem: tuple[Any, str]
) -> None:
    leaf, problem = leaf_and_problem
    value, path = placed(parts, leaf)
    assert refusal(value).startswith(f"{path}: {problem}")


@given(path_parts)
def test_too_deep_is_refused_at_the_first_level_too_many(parts: list[str | int]) -> None:
    value, path = placed(parts, nested_lists(MAX_DEPTH))
    # The outer object is level 1 and each part one more, so the nested lists start at level
    # 2 + len(parts): the first one too many is that many lists in.
    expected = path + "[0]" * (MAX_DEPTH + 1 - (2 + len(parts)))
    assert refusal(value) == f"{expected}: nested deeper than {MAX_DEPTH} levels"


def test_a_key_that_is_not_a_string_is_refused_at_its_object() -> None:
    assert refusal({"a": {1: "x"}}) == "input.a: has the key 1 (a number); object keys must be strings"


def test_unusual_keys_are_quoted_in_the_path_and_long_ones_cut() -> None:
    assert refusal({"two words": [math.nan]}).startswith("input['two words'][0]: nan")
    long_key = "k\n" * 500
    message = refusal({long_key: 10**30})
    assert message.startswith("input['k\\nk\\n") and "…" in message


def test_a_huge_value_is_never_echoed() -> None:
    assert refusal({"n": 10**5000}).startswith("input.n: an integer of about 5001 digits is outside")
    assert refusal({"s": "secret " * 100_000 + "\x00"}) == (
        'input.s: the string holds a NUL character ("\\x00") at index 700000, which herder cannot store; remove it'
    )


@pytest.mark.parametrize("nested", [nested_lists, nested_dicts])
def test_a_value_100000_deep_is_refused_without_recursion(nested: Any) -> None:
    deep = nested(100_000)
    assert refusal({"a": deep}).endswith(f": nested deeper than {MAX_DEPTH} levels")
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        JobStart(process="p", robot="r", input={"a": deep})
    with pytest.raises(BadRequest, match=f"--input: nested deeper than {MAX_DEPTH} levels"):
        parse_json_object("[" * 100_000 + "]" * 100_000)


def test_a_body_100000_deep_is_a_bad_request_in_msgpack_and_json() -> None:
    head = msgpack.packb({"process": "p", "robot": "r"})
    # A map of three entries where the packed one has two, the third being an input nested 100,000 deep.
    body = b"\x83" + head[1:] + msgpack.packb("input") + b"\x81" + msgpack.packb("a") + b"\x91" * 100_000 + b"\x90"
    with pytest.raises(BadRequest):
        codec.load(JobStart, body)
    text = '{"process": "p", "robot": "r", "input": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    with pytest.raises(BadRequest):
        codec.load(JobStart, text.encode(), codec.JSON)


def test_the_check_is_the_same_for_every_way_in() -> None:
    bad = {"invoices": [{}, {}, {}, {"amount": 10**30}]}
    expected = "input.invoices[3].amount: 1000000000000000000000000000000 is outside"
    assert refusal(bad).startswith(expected)
    with pytest.raises(BadRequest, match=r"^--input\.invoices\[3\]\.amount: 1000000000000000000000000000000 is"):
        parse_json_object(json.dumps(bad))


# --- the pydantic types, inside request models ---


def test_a_request_names_the_field_path_of_a_bad_value_in_msgpack() -> None:
    # msgpack holds integers to 2^64; JSON-safe values do not.
    body = msgpack.packb({"process": "p", "robot": "r", "input": {"a": {"b": 2**60}}})
    with pytest.raises(BadRequest) as caught:
        codec.load(JobStart, body)
    assert caught.value.code.value == "bad_request"
    assert caught.value.message == (
        "invalid JobStart: input.a.b: 1152921504606846976 is outside the integers JSON-safe values may hold "
        "(±9007199254740991)"
    )
    assert caught.value.details["errors"][0]["field"] == "input.a.b"


def test_a_request_names_the_field_path_of_a_bad_value_in_json() -> None:
    body = b'{"process": "p", "robot": "r", "input": {"list": [1, NaN]}}'
    with pytest.raises(BadRequest) as caught:
        codec.load(JobStart, body, codec.JSON)
    assert caught.value.message == (
        "invalid JobStart: input.list[1]: nan is not a finite number; JSON-safe values hold finite numbers only"
    )


def test_a_report_output_that_is_too_large_or_unsafe_is_refused() -> None:
    fields = {"job_id": "a" * 32, "attempt": 1, "outcome": "successful"}
    with pytest.raises(BadRequest, match=r"output: larger than 256 KiB as JSON"):
        codec.load(JobReport, msgpack.packb({**fields, "output": {"x": "y" * MAX_OUTPUT_BYTES}}))
    with pytest.raises(BadRequest, match=r"output\.x\[0\]: the string holds a NUL"):
        codec.load(JobReport, msgpack.packb({**fields, "output": {"x": ["\x00"]}}))
    with pytest.raises(BadRequest, match=r"output\.x: a Python bytes is not a JSON-safe value"):
        codec.load(JobReport, msgpack.packb({**fields, "output": {"x": b"raw"}}, use_bin_type=True))


@pytest.mark.parametrize(
    ("model", "fields", "field"),
    [
        (RobotConnect, {"robot": "r", "session": "s", "agent_version": "1.0\x00"}, "agent_version"),
        (RobotConnect, {"robot": "r", "session": "s", "current_job": "\x00"}, "current_job"),
        (JobReport, {"job_id": "a" * 32, "attempt": 1, "outcome": "faulted", "reason": "\x00"}, "reason"),
        (JobReport, {"job_id": "a" * 32, "attempt": 1, "outcome": "faulted", "error": "bad\x00"}, "error"),
        (
            PackagePublish,
            {
                "process": "p",
                "version": "1",
                "sha256": "a" * 64,
                "size": 1,
                "entry": {"kind": EntryKind.COMMAND.value, "target": "run", "args": ["ok", "x\x00"]},
            },
            "entry.args.1",
        ),
        (
            PackagePublish,
            {
                "process": "p",
                "version": "1",
                "sha256": "a" * 64,
                "size": 1,
                "entry": {"kind": "python", "target": "m:f"},
                "description": "\x00",
            },
            "description",
        ),
    ],
)
def test_text_that_reaches_a_database_refuses_nul(model: Any, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        codec.load(model, msgpack.packb(fields))
    [error] = caught.value.details["errors"]
    assert error["field"] == field
    assert error["problem"].startswith('holds a NUL character ("\\x00") at index')
    assert "\n" not in caught.value.message


def test_length_limits_are_checked_and_worded_before_nul() -> None:
    fields = {"job_id": "a" * 32, "attempt": 1, "outcome": "faulted"}
    with pytest.raises(BadRequest, match="error: String should have at most 8000 characters"):
        codec.load(JobReport, msgpack.packb({**fields, "error": "\x00" * 8001}))
    with pytest.raises(BadRequest, match="reason: String should have at most 2000 characters"):
        codec.load(JobReport, msgpack.packb({**fields, "reason": "\x00" * 2001}))


# --- text helpers and parsing ---


def test_without_nul_keeps_the_length_so_limits_still_hold() -> None:
    assert without_nul("a\x00b\x00") == "a\u2400b\u2400"
    assert refuse_nul(without_nul("\x00" * 10)) == "\u2400" * 10
    with pytest.raises(ValueError, match="at index 1"):
        refuse_nul("a\x00")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "--input: not valid JSON (Expecting value at line 1 column 1)"),
        ("[1]", '--input: not a JSON object but an array; give an object, like {"name": "Ada"}'),
        ("null", '--input: not a JSON object but null; give an object, like {"name": "Ada"}'),
        ('{"n": 1' + "0" * 5000 + "}", "--input: holds an integer of thousands of digits, far outside"),
        ('{"n": 1e999}', "--input.n: inf is not a finite number"),
        ('{"s": "\\ud800"}', "--input.s: the string holds a lone surrogate (U+D800) at index 0"),
        ('{"s": "\\u0000"}', '--input.s: the string holds a NUL character ("\\x00") at index 0'),
    ],
)
def test_parse_json_object_refuses_in_one_line(text: str, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_json_object(text)
    assert caught.value.message.startswith(message)
    assert "\n" not in caught.value.message


@given(safe_objects)
def test_parse_json_object_reads_back_what_json_wrote(value: dict[str, Any]) -> None:
    assert same(parse_json_object(json.dumps(value)), value)
    assert same(parse_json_object(json.dumps(value, ensure_ascii=False).encode(), what="output"), value)


def test_check_object_refuses_what_is_not_an_object() -> None:
    with pytest.raises(BadRequest, match=r"^output: not a JSON object but a string;"):
        check_object("text", what="output")
    assert check_object({"a": [1]}) == {"a": [1]}
