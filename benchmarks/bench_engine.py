"""Engine speed and memory, side by side with torch.autograd.gradcheck in the same run.

    python benchmarks/bench_engine.py            # all scenarios (a few minutes on 2 cores)
    python benchmarks/bench_engine.py --quick    # N=1000 only, no N=3000
    python benchmarks/bench_engine.py --sections full --sizes 3000   # the N=3000 rows alone

Ratios, not absolute times: the machines are noisy. Each row runs the same
function on the same inputs with default options of both tools (float64),
checks that both reach the same verdict, and prints torch_time / our_time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import gradcheck_svc as gc


def _timed(call: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _torch_verdict(fn, x, check: Callable = torch.autograd.gradcheck, **kw) -> bool:
    try:
        return bool(check(fn, (x.clone().requires_grad_(),), **kw))
    except Exception:
        return False


def sin_tanh(n: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return (lambda x: torch.sin(torch.tanh(w @ x))), x


def side_by_side(
    case: str,
    fn: Callable,
    x: torch.Tensor,
    repeat: int,
    torch_check: Callable = torch.autograd.gradcheck,
    torch_kw: dict | None = None,
    **ours: object,
) -> dict:
    """Time torch's checker and ours on the same function and input, default options of both:
    the median of ``repeat`` runs each, the two tools taking turns so that a change in the
    machine's load hits both alike."""
    if torch_kw is None:
        torch_kw = {"fast_mode": True} if ours.get("mode") == "fast" else {}
    t_torch, t_ours, v_torch, report = [], [], False, None
    for _ in range(repeat):
        seconds, v_torch = _timed(lambda: _torch_verdict(fn, x, torch_check, **torch_kw))
        t_torch.append(seconds)
        seconds, report = _timed(lambda: gc.check(fn, x, **ours))
        t_ours.append(seconds)
    assert report is not None
    return dict(
        case=case,
        torch_s=statistics.median(t_torch),
        ours_s=statistics.median(t_ours),
        same_verdict=v_torch == report.ok,
    )


def full_and_fast(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        fn, x = sin_tanh(n)
        rows.append(side_by_side(f"full, sin(tanh(Wx)), N={n}", fn, x, 1, mode="full"))
        rows.append(side_by_side(f"fast, sin(tanh(Wx)), N={n}", fn, x, 21, mode="fast"))
    return rows


def higher_order(n: int) -> list[dict]:
    """order=2 against gradgradcheck, forward_ad against gradcheck(check_forward_ad=True)."""
    fn, x = sin_tanh(n)
    return [
        side_by_side(f"order 2 vs gradgradcheck, N={n}", fn, x, 1, torch.autograd.gradgradcheck, {}, order=2),
        side_by_side(
            f"forward_ad vs check_forward_ad, N={n}",
            fn,
            x,
            1,
            torch.autograd.gradcheck,
            {"check_forward_ad": True},
            forward_ad=True,
        ),
    ]


SMALL_OPS: dict[str, Callable[[], tuple[Callable, torch.Tensor]]] = {
    "sin": lambda: (torch.sin, torch.randn(64, dtype=torch.float64)),
    "exp*tanh": lambda: (lambda x: torch.exp(x) * torch.tanh(x), torch.randn(100, dtype=torch.float64)),
    "softmax": lambda: (lambda x: torch.softmax(x, -1), torch.randn(8, 16, dtype=torch.float64)),
    "log_softmax": lambda: (lambda x: torch.log_softmax(x, 0), torch.randn(50, dtype=torch.float64)),
    "layer_norm": lambda: (
        lambda x: torch.nn.functional.layer_norm(x, (16,)),
        torch.randn(8, 16, dtype=torch.float64),
    ),
    "matmul": lambda: (lambda x: x @ x.T, torch.randn(10, 10, dtype=torch.float64)),
    "cumsum": lambda: (lambda x: torch.cumsum(x, 0), torch.randn(100, dtype=torch.float64)),
    "conv1d": lambda: (
        lambda x: torch.nn.functional.conv1d(x, torch.ones(2, 3, 3, dtype=torch.float64)),
        torch.randn(1, 3, 30, dtype=torch.float64),
    ),
    "sigmoid": lambda: (torch.sigmoid, torch.randn(200, dtype=torch.float64)),
    "norm": lambda: (lambda x: x.norm(dim=-1), torch.randn(20, 10, dtype=torch.float64)),
    "gelu": lambda: (torch.nn.functional.gelu, torch.randn(128, dtype=torch.float64)),
    "logsumexp": lambda: (lambda x: torch.logsumexp(x, 1), torch.randn(12, 12, dtype=torch.float64)),
}


def small_inputs() -> list[dict]:
    rows = []
    for name, make in SMALL_OPS.items():
        torch.manual_seed(0)
        fn, x = make()
        rows.append(side_by_side(f"small: {name} {list(x.shape)}", fn, x, 3))
    return rows


def _elementwise_memory_child() -> None:
    x = torch.randn(20000, dtype=torch.float64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = gc.check(torch.tanh, x, mode="full")
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            dict(
                ok=report.ok,
                peak_gib=peak / 2**20,
                before_gib=before / 2**20,
                seconds=elapsed,
                checked=report.pairs[0].elements_checked,
            )
        )
    )


def elementwise_memory() -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N=1000 only")
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="N of the dense rows (default 1000 3000; --quick: 1000)"
    )
    parser.add_argument(
        "--sections", default="full,small,higher,memory", help="comma-separated: full,small,higher,memory"
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _elementwise_memory_child()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # Both tools pay torch's one-time lazy imports on first use (sympy through autograd, the
    # torch.func machinery and torch._dynamo on the first batched vjp: about 2 s together): not
    # timed. A dense 64x64 Jacobian takes the batched vjp path; a 16-element sin would not.
    warm = torch.randn(64, dtype=torch.float64)
    mix = torch.randn(64, 64, dtype=torch.float64)
    gc.check(lambda x: torch.tanh(mix @ x), warm, mode="full")
    gc.check(lambda x: torch.tanh(mix @ x), warm, mode="fast")
    _torch_verdict(lambda x: torch.tanh(mix @ x), warm)
    sections = set(args.sections.split(","))
    rows: list[dict] = []
    if "full" in sections:
        rows += full_and_fast(args.sizes or ([1000] if args.quick else [1000, 3000]))
    if "higher" in sections:
        rows += higher_order(1000)
    if "small" in sections:
        rows += small_inputs()
    print(f"{'case':<40} {'torch s':>9} {'ours s':>9} {'speed-up':>9}  same verdict")
    for r in rows:
        speedup = r["torch_s"] / r["ours_s"]
        print(
            f"{r['case']:<40} {r['torch_s']:>9.4f} {r['ours_s']:>9.4f} {speedup:>8.1f}x  {r['same_verdict']}"
        )
    small = [r["torch_s"] / r["ours_s"] for r in rows if r["case"].startswith("small")]
    if small:
        mean = statistics.geometric_mean(small)
        print(f"small inputs: geometric-mean speed-up {mean:.2f}x, worst {min(small):.2f}x")
    if "memory" not in sections:
        return
    mem = elementwise_memory()
    print(
        f"full mode, tanh elementwise N=M=20000: {mem['checked']} entries, ok={mem['ok']}, "
        f"{mem['seconds']:.1f} s, peak RSS {mem['peak_gib']:.2f} GiB (limit 2 GiB)"
    )


if __name__ == "__main__":
    main()
