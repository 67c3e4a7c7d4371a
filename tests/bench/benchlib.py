"""What herder's benchmarks share: percentiles and a description of the machine they ran on.

The benchmarks run as scripts (`python tests/bench/bench_*.py`), so this module is imported from
the script's own folder.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from typing import Any, TypeVar

from herder.services.common.natsserver import server_binary

N = TypeVar("N", int, float)


def percentile(ordered: Sequence[N], fraction: float) -> N:
    """Nearest-rank percentile of sorted values."""
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return ordered[index]


def environment() -> dict[str, Any]:
    """The versions and the machine a benchmark ran on."""
    try:
        server = subprocess.run(
            [str(server_binary()), "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except Exception:
        server = "unknown"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nats_py": metadata.version("nats-py"),
        "pydantic": metadata.version("pydantic"),
        "msgpack": metadata.version("msgpack"),
        "sqlalchemy": metadata.version("SQLAlchemy"),
        "nats_server": server,
    }
