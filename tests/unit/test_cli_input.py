"""`herder job start --input JSON`: what is not a JSON-safe object is refused in one line, before any connection."""

from __future__ import annotations

import json

import pytest

from herder.cli.app import main
from herder.cli.jobs import _parse_input
from herder.protocol.errors import BadRequest
from herder.protocol.jobs import MAX_INPUT_BYTES

DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": ' + DEEP + "}", "--input: nested deeper than 32 levels"),
        # Deep, but not so deep that json gives up: the path says where the 33rd level starts.
        ('{"a": ' + "[" * 100 + "]" * 100 + "}", "--input.a" + "[0]" * 31 + ": nested deeper than 32 levels"),
        (
            json.dumps({"blob": "x" * MAX_INPUT_BYTES}),
            "--input: larger than 256 KiB as JSON; pass big data by reference",
        ),
        (
            '{"n": 1000000000000000000000000000000}',
            "--input.n: 1000000000000000000000000000000 is outside the integers",
        ),
        ("[1, 2]", "--input: not a JSON object but an array"),
        ("not json", "--input: not valid JSON"),
    ],
)
def test_a_bad_input_is_one_line_from_the_command(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["herder", "job", "start", "hello", "--robot", "r1", "--input", text])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"herder: {message}") and line.endswith(" [bad_request]")
    assert len(line) < 300


def test_the_parsed_input_is_the_object_given() -> None:
    assert _parse_input(None) == {}
    assert _parse_input('{"name": "Ada", "n": 9007199254740991, "x": [1.5, null]}') == {
        "name": "Ada",
        "n": 9007199254740991,
        "x": [1.5, None],
    }
    with pytest.raises(BadRequest, match=r"^--input\.name: the string holds a NUL"):
        _parse_input('{"name": "A\\u0000da"}')
