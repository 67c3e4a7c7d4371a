"""herder installs under one namespace, and pyproject lists every package folder."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"protocol", "services", "robot", "coordinator", "cli", "client", "packaging"}
# Only the commands that run services (`herder up`, `service run`, `db upgrade`) or set up their
# servers (`herder fence`) may load them.
# The CLI's commands that run services or tend a local stack's own files (its fence, its master key).
SERVICE_RUNNERS = {ROOT / "cli" / "stack.py", ROOT / "cli" / "fence.py", ROOT / "cli" / "secrets.py"}


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


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_nothing_outside_services_imports_services() -> None:
    offenders = []
    for folder in FOLDERS - {"services"}:
        for path in (ROOT / folder).rglob("*.py"):
            if path in SERVICE_RUNNERS:
                continue
            services = sorted(m for m in _imported_modules(path) if m.startswith("herder.services"))
            if services:
                offenders.append(f"{path.relative_to(ROOT)}: {', '.join(services)}")
    assert not offenders, "these import herder.services: " + "; ".join(offenders)


def test_every_declared_package_imports_from_its_folder() -> None:
    for package in _declared():
        assert importlib.util.find_spec(package) is not None, package
    spec = importlib.util.find_spec("herder.protocol")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent == ROOT / "protocol"


def test_every_registered_service_is_found_under_its_name() -> None:
    from herder.services import catalog

    assert catalog.NAMES
    for name in catalog.NAMES:
        assert catalog.service_class(name).name == name


def test_the_cli_starts_without_the_services_database_code() -> None:
    """Commands that only talk to a stack load no SQLAlchemy or Alembic (most of the start-up time)."""
    probe = "import sys, herder.cli.app; print(sorted(m for m in ('sqlalchemy', 'alembic') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
