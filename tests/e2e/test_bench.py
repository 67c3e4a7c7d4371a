"""The benchmarks still run end to end (tiny runs; their figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import Postgres

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


QUEUES = BENCH.parent / "bench_queues.py"


def run_queues_benchmark(database: str) -> dict[str, Any]:
    """A tiny run of the queues benchmark on one database; its JSON report."""
    done = subprocess.run(
        [
            sys.executable,
            str(QUEUES),
            "--json",
            f"--db={database}",
            "--items=30",
            "--consumers=3",
            "--batch=4",
            "--warmup=5",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert len(report["environment"]["load_average_at_start"]) == 3
    return report


def check_herder_cycles(result: dict[str, Any]) -> None:
    assert set(result["cycles"]) == {"single", "batch"}
    for mode, count in (("single", 1), ("batch", 4)):
        cycle = result["cycles"][mode]
        assert (cycle["mode"], cycle["count"], cycle["items"]) == (mode, count, 30)
        assert cycle["items_per_s"] > 0
        assert (cycle["double_claims"], cycle["unfinished"], cycle["refused_results"]) == (0, 0, 0)
        assert (cycle["successful"], cycle["left_open"]) == (30, 0)
        assert 0 < cycle["next_p50_ms"] <= cycle["next_p99_ms"]
        assert 0 < cycle["result_p50_ms"] <= cycle["result_p99_ms"]
        assert cycle["cpu"]["caller_us"] > 0
    assert result["cycles"]["single"]["result_requests"] == 30
    adding = result["adding"]
    assert (adding["items"], adding["requests"]) == (30, 1)
    assert adding["items_per_s"] > 0


def test_the_queues_benchmark_completes_and_counts_every_item_on_sqlite() -> None:
    report = run_queues_benchmark("sqlite")
    sqlite = report["results"]["sqlite"]
    check_herder_cycles(sqlite)
    assert sqlite["pgqueuer"] is None and sqlite["ratios"] == {}
    assert report["targets_met"] == {"double claims == 0, every herder run": True}


@pytest.mark.postgres
def test_the_queues_benchmark_measures_pgqueuer_beside_herder_on_postgres(postgres: Postgres) -> None:
    report = run_queues_benchmark("postgres")
    result = report["results"]["postgres"]
    check_herder_cycles(result)
    assert "synchronous_commit on" in report["environment"]["postgres"]
    pgqueuer = result["pgqueuer"]
    for mode, batch in (("single", 1), ("batch", 4)):
        cycle = pgqueuer["cycles"][mode]
        assert (cycle["batch_size"], cycle["jobs"]) == (batch, 30)
        assert (cycle["double_claims"], cycle["unfinished"], cycle["left_queued"]) == (0, 0, 0)
        assert result["ratios"][mode] == round(result["cycles"][mode]["items_per_s"] / cycle["jobs_per_s"], 2)
    assert pgqueuer["adding"]["items"] == 30
    assert len(report["targets_met"]) == 4


def test_the_queues_benchmark_refuses_nonsense_options() -> None:
    done = subprocess.run(
        [sys.executable, str(QUEUES), "--batch=5000"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "--batch must be at most 1000" in done.stderr


SECRETS = BENCH.parent / "bench_secrets.py"


def test_the_secrets_benchmark_fetches_sealed_credentials_and_counts_every_one() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(SECRETS),
            "--json",
            "--robots=3",
            "--fetches=60",
            "--warmup=5",
            "--paced-rate=0",
            "--crypto-ops=50",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    runs = report["results"]["sqlite"]["runs"]
    for mode in ("sealed", "unsealed"):
        run = runs[mode]
        assert (run["fetches"], run["mismatches"], run["errors"]) == (60, 0, 0)
        assert run["fetches_per_s"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"]
        assert run["cpu"]["services_us"] > 0
    crypto = report["results"]["sqlite"]["crypto"]
    assert crypto["per_fetch_us"] > 0
    assert report["targets_met"]["mismatches and errors == 0, every run"] is True


SCHEDULER = BENCH.parent / "bench_scheduler.py"


def test_the_scheduler_benchmark_measures_every_fire_of_its_window() -> None:
    done = subprocess.run(
        [sys.executable, str(SCHEDULER), "--json", "--triggers=60", "--burst=20", "--seconds=4", "--robots=2"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    spread, burst = report["results"]
    # Four seconds of the spread load: the four triggers due in them, one fire each.
    assert (spread["load"], spread["fires"], spread["misses"], spread["duplicates"]) == ("spread", 4, 0, 0)
    assert (burst["load"], burst["fires"], burst["misses"], burst["duplicates"]) == ("burst", 20, 0, 0)
    for result in (spread, burst):
        assert 0 <= result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
