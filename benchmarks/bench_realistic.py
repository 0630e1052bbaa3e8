"""Realistic checks side by side: torch.autograd.gradcheck and gradcheck-svc in the same run.

    python benchmarks/bench_realistic.py           # every case, with planted-bug twins and float32
    python benchmarks/bench_realistic.py --quick   # one repeat, no float32 column

Each row: the same function and inputs (float64), default options of both tools; the verdicts
must agree (a correct function passes both, its planted-bug twin fails both). The float32
column is gradcheck-svc alone on float32 inputs, where torch's checker is not comparable (it
asks for float64). Ratios, not absolute times: the machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_realistic_cases import CASES, Case
from torch.autograd.gradcheck import GradcheckError

import gradcheck_svc as gc


def _module_as_function(fn: Callable, inputs: tuple) -> tuple[Callable, tuple]:
    """torch's checker sees a module's parameters only when they are inputs: make them inputs."""
    if not isinstance(fn, torch.nn.Module):
        return fn, inputs
    names = [n for n, p in fn.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_() for n, p in fn.named_parameters() if p.requires_grad]
    n_in = len(inputs)

    def functional(*args: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(fn, dict(zip(names, args[n_in:], strict=True)), args[:n_in])

    return functional, (*inputs, *params)


def _torch_check(fn: Callable, inputs: tuple) -> bool:
    fn, inputs = _module_as_function(fn, inputs)
    try:
        return bool(torch.autograd.gradcheck(fn, tuple(t.detach().clone().requires_grad_() for t in inputs)))
    except GradcheckError:
        return False


def _ours(fn: Callable, inputs: tuple, dtype: torch.dtype = torch.float64) -> bool:
    if dtype != torch.float64 and isinstance(fn, torch.nn.Module):
        fn = fn.to(dtype)
    cast = tuple(t.detach().to(dtype).requires_grad_() for t in inputs)
    report = gc.check(fn, *cast)
    if dtype != torch.float64 and isinstance(fn, torch.nn.Module):
        fn.double()
    return report.ok


def _timed(call: Callable[[], bool], repeat: int) -> tuple[float, bool]:
    ((seconds, verdict),) = _timed_side_by_side([call], repeat)
    return seconds, verdict


def _timed_side_by_side(calls: list[Callable[[], bool]], repeat: int) -> list[tuple[float, bool]]:
    """Each call's median time and its verdict, the calls taking turns: on a shared machine a
    burst of other work then falls on every tool alike, not on all the repeats of one."""
    times: list[list[float]] = [[] for _ in calls]
    verdicts: list[set[bool]] = [set() for _ in calls]
    for _ in range(repeat):
        for call, spent, seen in zip(calls, times, verdicts, strict=True):
            start = time.perf_counter()
            seen.add(call())
            spent.append(time.perf_counter() - start)
    if any(len(seen) != 1 for seen in verdicts):
        raise RuntimeError("a verdict changed between repeats")
    return [(statistics.median(spent), seen.pop()) for spent, seen in zip(times, verdicts, strict=True)]


def run_case(case: Case, *, buggy: bool, repeat: int, float32: bool) -> dict:
    fn, inputs = case.build(buggy)
    n = sum(t.numel() for t in inputs) + sum(
        p.numel() for p in (fn.parameters() if isinstance(fn, torch.nn.Module) else ())
    )
    (t_torch, v_torch), (t_ours, v_ours) = _timed_side_by_side(
        [lambda: _torch_check(fn, inputs), lambda: _ours(fn, inputs)], repeat
    )
    row = dict(
        name=case.name + (" [bug]" if buggy else ""),
        kind=case.kind,
        elements=n,
        torch_s=t_torch,
        ours_s=t_ours,
        torch_ok=v_torch,
        ours_ok=v_ours,
        expected_ok=not buggy,
    )
    if float32:
        try:
            row["f32_s"], row["f32_ok"] = _timed(lambda: _ours(fn, inputs, torch.float32), 1)
        except gc.FunctionRaisedError:  # fn closes over float64 constants: no float32 run of it
            row["f32_s"], row["f32_ok"] = None, None
    return row


def _ok(flag: bool) -> str:
    return "pass" if flag else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one repeat, no float32 column")
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    parser.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # Both tools pay torch's one-time lazy imports on first use: warm both up, untimed. The
    # dense row path (torch.func.vjp under vmap) imports torch._dynamo on its first call, about
    # a second once per process, so the warm-up takes that path too (a dense 64x64 Jacobian).
    warm = torch.randn(64, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(64, 64, dtype=torch.float64)
    gc.check(lambda x: torch.tanh(mix @ x), warm)
    torch.autograd.gradcheck(lambda x: torch.tanh(mix @ x), (warm,))

    wanted = [w for w in args.only.split(",") if w]
    rows = []
    for case in CASES:
        if wanted and not any(w in case.name for w in wanted):
            continue
        measured = [run_case(case, buggy=False, repeat=repeat, float32=not args.quick)]
        if case.has_bug:
            # Timed like the correct row (median of the repeats): one sample on a shared machine
            # can be off by a factor of two either way.
            measured.append(run_case(case, buggy=True, repeat=repeat, float32=False))
        rows += measured
        if args.verbose:
            for row in measured:
                print(row, flush=True)

    header = (
        f"{'function':<34} {'kind':<18} {'elems':>6} {'torch s':>9} {'ours s':>9} {'speed-up':>9}  verdicts"
    )
    if not args.quick:
        header += "   f32 s  f32"
    print(header)
    agree = True
    for r in rows:
        speedup = r["torch_s"] / r["ours_s"]
        same = r["torch_ok"] == r["ours_ok"] == r["expected_ok"]
        agree &= same
        line = (
            f"{r['name']:<34} {r['kind']:<18} {r['elements']:>6} {r['torch_s']:>9.4f} {r['ours_s']:>9.4f} "
            f"{speedup:>8.1f}x  {_ok(r['torch_ok'])}/{_ok(r['ours_ok'])}{'' if same else ' MISMATCH'}"
        )
        if r.get("f32_s") is not None:
            line += f"  {r['f32_s']:>7.4f}  {_ok(r['f32_ok'])}"
        elif "f32_s" in r:
            line += "      n/a  (float64 constants in fn)"
        print(line)
    correct = [r["torch_s"] / r["ours_s"] for r in rows if r["expected_ok"]]
    every = [r["torch_s"] / r["ours_s"] for r in rows]
    print(
        f"geometric-mean speed-up: {statistics.geometric_mean(correct):.2f}x on correct functions "
        f"(worst {min(correct):.2f}x), {statistics.geometric_mean(every):.2f}x with the bug twins "
        f"(worst {min(every):.2f}x); verdicts {'all agree' if agree else 'DISAGREE'}"
    )


if __name__ == "__main__":
    main()
