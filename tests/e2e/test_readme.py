"""The README's example of another program talking to herder works as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import Up, herder

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def readme_example(section: str) -> str:
    """The first Python block of a section of the README."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(f"## {section}\n") :]
    body = body[: body.find("\n## ", 1)]
    found = re.search(r"```python\n(.*?)```", body, re.DOTALL)
    assert found is not None, f"no Python example under '## {section}'"
    return found.group(1)


def test_the_nats_py_example_starts_a_job_as_written(up: Up, tmp_path: Path) -> None:
    for args in (
        ("robot", "add", "invoices-1", "--type", "unattended", "--host", "ts-01", "--save-token", str(tmp_path / "t")),
        ("package", "publish", str(ROOT / "examples" / "hello")),
    ):
        done = herder(*args, env=up.env)
        assert done.returncode == 0, done.stderr
    script = tmp_path / "example.py"
    script.write_text(readme_example("Talking to herder from other programs"))

    ran = subprocess.run(
        [sys.executable, str(script)], env={"HERDER_DATA_DIR": str(up.data_dir)}, capture_output=True, text=True
    )

    assert ran.returncode == 0, ran.stderr
    job_id, state, reason = ran.stdout.strip().split(" ", 2)
    assert state == "Pending" and "invoices-1" in reason  # its robot is not running
    shown = herder("job", "show", job_id, env=up.env)
    assert shown.returncode == 0 and "hello" in shown.stdout
