"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Up, running_up


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """`herder up` as a subprocess, for one test."""
    with running_up(tmp_path) as stack:
        yield stack
