"""Small checks and the first check in a fresh process, side by side with torch.autograd.gradcheck.

    python benchmarks/bench_small.py              # in-process rows and fresh-process rows (~1 min)
    python benchmarks/bench_small.py --repeat 400 --fresh 7
    python benchmarks/bench_small.py --threads 1 --fresh 0   # both tools on one thread: on busy
                                                             # cores, the ratios without contention
    python benchmarks/bench_small.py --fast-only --fresh 0   # the fast-mode rows alone

In-process rows: the three seed examples, ``F.linear`` on a 4x16 input (input, weight and bias
checked) and fast mode on the dense ``sin(tanh(W x))`` at N=1000; float64, default options of both
tools (torch with ``fast_mode=True`` in the fast column), the median of many repeats taken in
alternation so that machine noise hits both sides alike. Fresh-process rows: a new interpreter that
imports and runs one seed check, the whole process timed from outside and the import and the first
check timed inside. Ratios are torch_time / our_time (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import gradcheck_svc as gc


def _seed_square() -> tuple[Callable, tuple[torch.Tensor, ...]]:
    return (lambda x: x**2), (torch.tensor(9.0, dtype=torch.float64),)


def _seed_sin() -> tuple[Callable, tuple[torch.Tensor, ...]]:
    return (lambda x: torch.sin(x / 2**1.5)), (torch.tensor(100.0, dtype=torch.float64),)


def _seed_two() -> tuple[Callable, tuple[torch.Tensor, ...]]:
    u, v = torch.tensor(2.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    return (lambda u, v: u * v + u**2 + v**3), (u, v)


def _linear() -> tuple[Callable, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    return F.linear, (x, w, b)


def _sin_tanh_1000() -> tuple[Callable, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 1000, generator=g, dtype=torch.float64) / 1000**0.5
    x = torch.randn(1000, generator=g, dtype=torch.float64)
    return (lambda x: torch.sin(torch.tanh(w @ x))), (x,)


CASES: dict[str, Callable[[], tuple[Callable, tuple[torch.Tensor, ...]]]] = {
    "x**2 at 9": _seed_square,
    "sin(x/2**1.5) at 100": _seed_sin,
    "uv+u^2+v^3 at (2,4)": _seed_two,
    "F.linear 4x16 (x, w, b)": _linear,
}


def _torch_check(fn: Callable, inputs: tuple[torch.Tensor, ...], fast: bool) -> bool:
    leaves = tuple(t.detach().clone().requires_grad_() for t in inputs)
    try:
        return bool(torch.autograd.gradcheck(fn, leaves, fast_mode=fast))
    except Exception:
        return False


def _our_check(fn: Callable, inputs: tuple[torch.Tensor, ...], fast: bool) -> bool:
    return gc.check(fn, *inputs, mode="fast" if fast else "auto").ok


def side_by_side(case: str, make: Callable, fast: bool, repeat: int) -> dict:
    """Median time of each tool, measured in alternation on the same function and inputs."""
    fn, inputs = make()
    v_torch, v_ours = _torch_check(fn, inputs, fast), _our_check(fn, inputs, fast)  # warm both
    times: dict[str, list[float]] = {"torch": [], "ours": []}
    for _ in range(repeat):
        for name, call in (("torch", _torch_check), ("ours", _our_check)):
            start = time.perf_counter()
            call(fn, inputs, fast)
            times[name].append(time.perf_counter() - start)
    return dict(
        case=f"{'fast' if fast else 'full'}, {case}",
        torch_s=statistics.median(times["torch"]),
        ours_s=statistics.median(times["ours"]),
        same_verdict=v_torch == v_ours,
    )


# A fresh interpreter: import, then the first check, each timed inside; printed as JSON.
_CHILD = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
{import_tool}
t2 = time.perf_counter()
x = torch.tensor(9.0, dtype=torch.float64)
ok = {first_check}
t3 = time.perf_counter()
print(json.dumps(dict(torch_import_s=t1 - t0, tool_import_s=t2 - t1, check_s=t3 - t2, ok=bool(ok))))
"""

_TOOLS = {
    "torch": dict(
        import_tool="",
        first_check="torch.autograd.gradcheck(lambda x: x**2, (x.requires_grad_(),))",
    ),
    "ours": dict(import_tool="import gradcheck_svc as gc", first_check="gc.check(lambda x: x**2, x).ok"),
}


def _fresh(tool: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(**_TOOLS[tool])], capture_output=True, text=True, check=True
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - start
    return row


def fresh_process(repeat: int) -> dict[str, dict[str, float]]:
    """Median of each timing over ``repeat`` fresh interpreters per tool, run in alternation."""
    runs: dict[str, list[dict]] = {"torch": [], "ours": []}
    for _ in range(repeat):
        for tool in runs:
            runs[tool].append(_fresh(tool))
    keys = ("process_s", "torch_import_s", "tool_import_s", "check_s")
    return {
        tool: {k: statistics.median(r[k] for r in rows) for k in keys} | {"ok": all(r["ok"] for r in rows)}
        for tool, rows in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=200, help="repeats per small in-process row")
    parser.add_argument("--dense-repeat", type=int, default=30, help="repeats of the N=1000 fast row")
    parser.add_argument("--fresh", type=int, default=5, help="fresh processes per tool")
    parser.add_argument("--fresh-only", action="store_true", help="only the fresh-process rows")
    parser.add_argument("--fast-only", action="store_true", help="only the fast-mode in-process rows")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for the in-process rows (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, default options")
    rows = []
    for fast in () if args.fresh_only else (True,) if args.fast_only else (False, True):
        for case, make in CASES.items():
            rows.append(side_by_side(case, make, fast, args.repeat))
    if not args.fresh_only:
        rows.append(side_by_side("sin(tanh(Wx)) N=1000", _sin_tanh_1000, True, args.dense_repeat))
    print(f"{'case':<40} {'torch ms':>9} {'ours ms':>9} {'speed-up':>9}  same verdict")
    for r in rows:
        print(
            f"{r['case']:<40} {1e3 * r['torch_s']:>9.3f} {1e3 * r['ours_s']:>9.3f} "
            f"{r['torch_s'] / r['ours_s']:>8.2f}x  {r['same_verdict']}"
        )
    if args.fresh <= 0:
        return
    fresh = fresh_process(args.fresh)
    t, o = fresh["torch"], fresh["ours"]
    print(
        f"\nfresh process, x**2 at 9 (median of {args.fresh}):"
        f"  {'torch s':>9} {'ours s':>9} {'ours-torch':>11}"
    )
    for key, label in (
        ("process_s", "whole process (outside)"),
        ("torch_import_s", "import torch"),
        ("tool_import_s", "import gradcheck_svc"),
        ("check_s", "first check"),
    ):
        print(f"  {label:<38} {t[key]:>9.3f} {o[key]:>9.3f} {o[key] - t[key]:>+11.3f}")
    print(
        "  import gradcheck_svc + first check, ours - torch's first check: "
        f"{o['tool_import_s'] + o['check_s'] - t['check_s']:+.3f} s"
    )
    print(f"  verdicts: torch {t['ok']}, ours {o['ok']}")


if __name__ == "__main__":
    main()
