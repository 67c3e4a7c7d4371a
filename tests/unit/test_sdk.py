"""The SDK scripts import, in this process: with herder's environment, and without it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from herder.robot import sdk


@pytest.fixture
def outside_herder(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HERDER_* variable, as when a script is developed by hand."""
    for name in list(os.environ):
        if name.startswith("HERDER_"):
            monkeypatch.delenv(name)


@dataclass
class Job:
    """The files and log pipe of a job, as the runner would set them up."""

    folder: Path
    log_r: int

    def records(self) -> list[dict[str, object]]:
        """The SDK records written so far."""
        os.set_blocking(self.log_r, False)
        data = b""
        try:
            while chunk := os.read(self.log_r, 65536):
                data += chunk
        except BlockingIOError:
            pass
        return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def in_herder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Job]:
    """The environment the runner gives a script, pointing at files under tmp_path and a real pipe."""
    (tmp_path / "input.json").write_text('{"name": "Ada", "items": [1, 2]}')
    log_r, log_w = os.pipe()
    variables = {
        sdk.ENV_INPUT_FILE: "input.json",
        sdk.ENV_OUTPUT_FILE: "output.json",
        sdk.ENV_STOP_FILE: "stop",
        sdk.ENV_ERROR_FILE: "error.txt",
    }
    for name, file in variables.items():
        monkeypatch.setenv(name, str(tmp_path / file))
    monkeypatch.setenv(sdk.ENV_LOG_FD, str(log_w))
    try:
        yield Job(folder=tmp_path, log_r=log_r)
    finally:
        os.close(log_r)
        os.close(log_w)


@pytest.mark.usefixtures("outside_herder")
def test_outside_herder_the_sdk_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert sdk.job_input() == {}
    assert sdk.should_stop() is False
    sdk.log.info("invoice.read", number=42, customer="ACME Ltd")
    sdk.set_output({"total": 12.5})
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("INFO    invoice.read number=42 customer='ACME Ltd'")
    assert err[1] == 'output: {"total": 12.5}'


def test_the_input_is_read_once_and_handed_out_fresh(in_herder: Job) -> None:
    first = sdk.job_input()
    assert first == {"name": "Ada", "items": [1, 2]}
    first["name"] = "changed"
    (in_herder.folder / "input.json").write_text("{}")
    assert sdk.job_input() == {"name": "Ada", "items": [1, 2]}


def test_records_are_json_lines_with_level_and_fields(in_herder: Job) -> None:
    sdk.log.debug("a", n=1)
    sdk.log.info("b", who="me")
    sdk.log.warning("c")
    sdk.log.error("d", when=Path("/x"))  # what JSON cannot hold is logged as its str()
    records = in_herder.records()
    assert [(r["level"], r["message"], r["fields"]) for r in records] == [
        ("debug", "a", {"n": 1}),
        ("info", "b", {"who": "me"}),
        ("warning", "c", {}),
        ("error", "d", {"when": "/x"}),
    ]
    assert all(isinstance(r["time"], str) and r["time"].endswith("+00:00") for r in records)


def test_a_huge_record_is_shortened_to_fit_a_line(in_herder: Job) -> None:
    sdk.log.info("big", blob="x" * 100_000, n=3)
    sdk.log.info("many", **{f"f{i}": "y" * 200 for i in range(100)})
    big, many = in_herder.records()
    assert big["fields"] == {"blob": "x" * 256 + "…", "n": 3, "cut": True}
    assert many["fields"]["cut"] is True  # type: ignore[index]
    assert len(json.dumps(many).encode()) <= sdk.MAX_RECORD_BYTES


def test_a_log_fd_that_is_not_a_pipe_falls_back_to_stderr(
    in_herder: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with (tmp_path / "other").open("w") as other:
        monkeypatch.setenv(sdk.ENV_LOG_FD, str(other.fileno()))
        sdk.log.warning("where.am.i")
    assert "WARNING where.am.i" in capsys.readouterr().err
    assert (tmp_path / "other").read_text() == ""


def test_the_output_is_replaced_atomically(in_herder: Job) -> None:
    sdk.set_output({"a": 1})
    sdk.set_output({"b": [True, None, "ü"]})
    assert json.loads((in_herder.folder / "output.json").read_text()) == {"b": [True, None, "ü"]}
    assert sorted(p.name for p in in_herder.folder.iterdir()) == ["input.json", "output.json"]


@pytest.mark.parametrize("value", [["a"], {"when": object()}, {1: "int key"}, {"x": float("nan")}])
def test_an_output_that_is_not_a_json_object_is_a_type_error(in_herder: Job, value: object) -> None:
    with pytest.raises(TypeError):
        sdk.set_output(value)  # type: ignore[arg-type]
    assert not (in_herder.folder / "output.json").exists()


def test_an_output_too_large_for_a_report_is_refused(in_herder: Job) -> None:
    with pytest.raises(ValueError, match="more than"):
        sdk.set_output({"blob": "x" * sdk.MAX_OUTPUT_BYTES})


def test_should_stop_leaves_a_marker_the_first_time_it_is_true(in_herder: Job) -> None:
    stop = in_herder.folder / "stop"
    marker = Path(sdk.stop_seen_marker(str(stop)))
    assert sdk.should_stop() is False
    assert not marker.exists()
    stop.touch()
    assert sdk.should_stop() is True
    assert marker.exists()
    assert sdk.should_stop() is True
