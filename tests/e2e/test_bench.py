"""The RPC benchmark still runs end to end (a tiny run; its figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_rpc.py"


def test_the_rpc_benchmark_completes_and_reports_both_sides() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--json",
            "--requests=40",
            "--concurrent-requests=64",
            "--concurrency=4",
            "--warmup=5",
            "--rounds=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["results"]) == {"sequential", "concurrent"}
    for name, expected in (("sequential", 40), ("concurrent", 64)):
        result = report["results"][name]
        for side in ("herder", "raw"):
            figures = result[side]
            assert figures["requests"] == expected
            assert 0 < figures["p50_us"] <= figures["p99_us"]
            assert figures["caller_cpu_us"] > 0
        assert result["p50_ratio"] == result["herder"]["p50_us"] / result["raw"]["p50_us"]


def test_the_benchmark_refuses_nonsense_options() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--rounds=0"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "--rounds must be at least 1" in done.stderr


DISPATCH = BENCH.parent / "bench_dispatch.py"


def test_the_dispatch_benchmark_completes_and_reports_every_figure() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(DISPATCH),
            "--json",
            "--db=sqlite",
            "--jobs=12",
            "--robots=2",
            "--warmup=2",
            "--connections=5",
            "--restarts=1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    sqlite = report["results"]["sqlite"]
    assert set(sqlite["dispatch"]) == {"one at a time", "every robot busy"}
    for figures in sqlite["dispatch"].values():
        assert figures["jobs"] == 12
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert sqlite["dispatch"]["every robot busy"]["in_flight"] == 2
    throughput = sqlite["throughput"]
    assert (throughput["jobs"], throughput["failed"]) == (12, 0)
    assert throughput["jobs_per_s"] > 0
    assert set(sqlite["connect"]) == {"cli", "robot"}
    assert all(0 < c["p50_ms"] <= c["p99_ms"] and c["connections"] == 5 for c in sqlite["connect"].values())
    restart = sqlite["restart"]
    assert restart["restarts"] == 1 and 0 < restart["p50_s"] <= restart["max_s"]


def test_the_dispatch_benchmark_refuses_nonsense_options() -> None:
    done = subprocess.run(
        [sys.executable, str(DISPATCH), "--robots=0"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "--robots must be at least 1" in done.stderr
