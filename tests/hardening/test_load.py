"""A small version of benchmarks/bench_load.py in the suite: zero errors, bounded memory growth."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_load.py"


def _bench_load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_500_checks_at_concurrency_8_without_errors_or_growth() -> None:
    bench = _bench_load()
    server = bench.ServerProcess()
    try:
        result = bench.run_load(server.address, server.rss_mb, count=500, concurrency=8, warmup=100)
    finally:
        server.stop()
    assert result.errors == 0, result.error_samples
    assert result.rss_growth_mb < 30, result
    assert server.proc.returncode == 0  # SIGTERM after the run: drained and exited cleanly
