"""scripts/bench/bench_router.py: the JSON it ends with, and the routing requirement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POLICIES = {"hearth", "oracle", "random", "round_robin", "least_outstanding", "power_of_two"}
KEYS = {"p50_ms", "p95_ms", "p99_ms", "throughput_rps"}


def bench(*args: str) -> dict[str, dict[str, dict[str, float]]]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "bench_router.py"), "--json", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result: dict[str, dict[str, dict[str, float]]] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_default_run_meets_the_requirement() -> None:
    """Default settings (fixed seed, 3600 s simulated per run, 50% and 80% load)."""
    result = bench()
    assert set(result) == {"0.5", "0.8"}
    for by_policy in result.values():
        assert set(by_policy) == POLICIES
        for figures in by_policy.values():
            assert set(figures) == KEYS
            assert all(isinstance(v, float) and v > 0 for v in figures.values())
            assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
        hearth = by_policy["hearth"]["p95_ms"]
        assert hearth <= 1.15 * by_policy["oracle"]["p95_ms"]
        for baseline in POLICIES - {"hearth", "oracle"}:
            assert hearth < by_policy[baseline]["p95_ms"], baseline


def test_seed_repeats_and_options() -> None:
    short = ("--duration", "300", "--loads", "0.6", "--seed", "7")
    first = bench(*short)
    assert first == bench(*short)
    assert set(first) == {"0.6"}
    assert set(first["0.6"]) == POLICIES
