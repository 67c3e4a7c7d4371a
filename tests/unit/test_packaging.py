"""herder installs under one namespace, and pyproject lists every package folder."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"protocol", "services", "robot", "coordinator", "cli"}


def _declared() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"])


def test_every_package_folder_is_declared() -> None:
    found = set()
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT).parts
            found.add(".".join(("herder", *relative)))
    assert found == _declared()


def test_every_declared_package_imports_from_its_folder() -> None:
    for package in _declared():
        assert importlib.util.find_spec(package) is not None, package
    spec = importlib.util.find_spec("herder.protocol")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent == ROOT / "protocol"
