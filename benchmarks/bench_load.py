"""Load: many checks at fixed concurrency against one ``gradcheck-svc serve`` on loopback.

    .venv/bin/python benchmarks/bench_load.py [--count 10000] [--concurrency 16] [--warmup 1000]
        [--workload mix|layer|medium|large] [--server-arg=--FLAG=VALUE] [--json]

A server subprocess (loopback, port 0, CPU) takes ``--warmup`` checks first; then its resident
memory is read (psutil), ``--count`` checks run from ``--concurrency`` client threads sharing one
Client, and the memory is read again. Reports errors, p50 / p99 latency, throughput, the CPU time
per check of the server and its worker processes (steadier than throughput on a shared machine)
and the resident-memory growth after warm-up (goal: zero errors, growth under 50 MB).

``--workload mix`` (default) cycles through small checks: the three seed expressions at float32
and float64, a registered built-in and a two-point request, so the server exercises parsing
caches, both dtypes and multi-point answers. ``layer`` is ``tanh(x @ w)`` on 320 inputs,
``medium`` the same on 1280, ``large`` one dense check on 1500 (use ``--concurrency 1``).
``--server-arg`` passes a flag to ``serve`` (``--server-arg=--torch-threads=2``). ``run_load``
is importable (tests/hardening/test_load.py runs a small one).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from gradcheck_svc.client import Client

MB = 1024 * 1024


@dataclass
class LoadResult:
    count: int
    concurrency: int
    errors: int
    p50_ms: float
    p99_ms: float
    checks_per_s: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_growth_mb: float
    server_cpu_ms_per_check: float = math.nan
    error_samples: list[str] = field(default_factory=list)


def _mix() -> list[Callable[[Client], bool]]:
    """Small checks: the seed expressions, a registered built-in, a two-point request."""
    f32, f64 = torch.float32, torch.float64
    calls: list[Callable[[Client], bool]] = []
    for dtype in (f32, f64):
        x = torch.tensor(100.0, dtype=dtype)
        u, v = torch.tensor(2.0, dtype=dtype), torch.tensor(4.0, dtype=dtype)
        calls += [
            lambda c, x=x: c.check("sin(x / 2**1.5)", x=x).ok,
            lambda c, x=x: c.check("x**2", x=x / 10).ok,
            lambda c, u=u, v=v: c.check("u**2 + v**3 + u*v", u=u, v=v).ok,
        ]
    w = torch.linspace(-1, 1, 8, dtype=f64)
    calls += [
        lambda c: c.check_registered("torch.tanh", w).ok,
        lambda c: all(r.ok for r in c.check_points("x * x", [{"x": w}, {"x": w + 1}])),
    ]
    return calls


def _layer() -> list[Callable[[Client], bool]]:
    """``tanh(x @ w)`` on a 4 x 16 input and 16 x 16 weights (320 inputs, 64 outputs), full mode:
    just above what the engine counts as small."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.float64, generator=gen)
    w = torch.randn(16, 16, dtype=torch.float64, generator=gen) / 4
    return [lambda c: c.check("tanh(x @ w)", x=x, w=w, options={"mode": "full"}).ok]


def _medium() -> list[Callable[[Client], bool]]:
    """A layer on a few thousand elements (1280 inputs, 256 outputs), full mode: a check the engine
    does not count as small, so it keeps torch's thread count."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, dtype=torch.float64, generator=gen)
    w = torch.randn(32, 32, dtype=torch.float64, generator=gen) / 32**0.5
    return [lambda c: c.check("tanh(x @ w)", x=x, w=w, options={"mode": "full"}).ok]


def _large() -> list[Callable[[Client], bool]]:
    """One dense check on 1500 elements (a 1500 x 1500 Jacobian, full mode): big batches, where
    torch's threads can help when cores are free."""
    x = torch.randn(1500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return [lambda c: c.check("softmax(x, dim=-1)", x=x, options={"mode": "full"}).ok]


WORKLOADS: dict[str, Callable[[], list[Callable[[Client], bool]]]] = {
    "mix": _mix,
    "layer": _layer,
    "medium": _medium,
    "large": _large,
}


class ServerProcess:
    """``gradcheck-svc serve`` on a free loopback port; ``address`` once it says it listens."""

    def __init__(self, *args: str) -> None:
        script = Path(sys.executable).parent / "gradcheck-svc"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "gradcheck_svc.cli"]
        self.proc = subprocess.Popen(
            [*command, "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # one log line per check: tens of thousands
            text=True,
            env=os.environ | {"GRADCHECK_LOG_LEVEL": "WARNING"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = line.removeprefix("listening on ").strip()
        self.ps = psutil.Process(self.proc.pid)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / MB

    def cpu_seconds(self) -> float:
        """CPU time of the server and of its live worker processes (checks that run in workers)."""
        total = 0.0
        for proc in [self.ps, *self.ps.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run_load(
    address: str,
    rss: Callable[[], float],
    *,
    count: int,
    concurrency: int,
    warmup: int,
    cpu: Callable[[], float] | None = None,
    workload: str = "mix",
) -> LoadResult:
    calls = WORKLOADS[workload]()
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    with Client(address, timeout=60) as client:

        def one(i: int, record: bool) -> None:
            started = time.perf_counter()
            try:
                ok = calls[i % len(calls)](client)
                problem = None if ok else "a check came back not ok"
            except Exception as exc:  # every failure counts; the run goes on
                problem = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - started
            with lock:
                if problem is not None:
                    errors.append(problem)
                if record:
                    latencies.append(elapsed)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(warmup), itertools.repeat(False)))
            errors.clear()  # warm-up failures would show in the real run too; count only that
            before = rss()
            cpu_before = cpu() if cpu else math.nan
            started = time.perf_counter()
            list(pool.map(one, range(count), itertools.repeat(True)))
            wall = time.perf_counter() - started
            cpu_used = cpu() - cpu_before if cpu else math.nan
            after = rss()
    latencies.sort()
    return LoadResult(
        count=count,
        concurrency=concurrency,
        errors=len(errors),
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        checks_per_s=count / wall,
        rss_after_warmup_mb=before,
        rss_end_mb=after,
        rss_growth_mb=after - before,
        server_cpu_ms_per_check=1000 * cpu_used / count,
        error_samples=errors[:5],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), default="mix", help="which checks (default mix)"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra 'serve' flag, e.g. --server-arg=--torch-threads=1",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    server = ServerProcess(*args.server_arg)
    try:
        result = run_load(
            server.address,
            server.rss_mb,
            count=args.count,
            concurrency=args.concurrency,
            warmup=args.warmup,
            cpu=server.cpu_seconds,
            workload=args.workload,
        )
    finally:
        server.stop()
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(
            f"{args.workload}: {result.count} checks at concurrency {result.concurrency}: "
            f"{result.errors} errors, "
            f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, {result.checks_per_s:.0f} checks/s, "
            f"server CPU {result.server_cpu_ms_per_check:.2f} ms per check; "
            f"server RSS {result.rss_after_warmup_mb:.1f} MB after warm-up -> {result.rss_end_mb:.1f} MB "
            f"(growth {result.rss_growth_mb:+.1f} MB)"
        )
        for sample in result.error_samples:
            print("  error:", sample)
    ok = result.errors == 0 and result.rss_growth_mb < 50
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
