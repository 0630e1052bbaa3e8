"""torch's own operator database (OpInfo) as a peer test suite, side by side with torch.autograd.gradcheck.

    python benchmarks/bench_opinfo.py                       # first sample of every op, float64 and float32
    python benchmarks/bench_opinfo.py --samples all         # every sample (~40 min per dtype on 2 cores)
    python benchmarks/bench_opinfo.py --ops linalg fft      # ops whose name contains any of these
    python benchmarks/bench_opinfo.py --dtype float64 -v    # one dtype, every sample's verdict printed
    python benchmarks/bench_opinfo.py --device cuda         # the ops' samples on the GPU
    python benchmarks/bench_opinfo.py --part 1/4 --no-torch # a quarter of the ops, ours alone

Each sample of each op that supports autograd on the device (``--device``, default cpu) is checked
by ``gradcheck_svc.check`` (default options) and by ``torch.autograd.gradcheck`` (default options,
the op's own ``nondet_tol``), on the same function and the same inputs. Printed: agreements,
disagreements with their reasons (the exception or the failing pairs), and the total time of each
tool.

In float64 the goal is no sample where torch passes and we fail or crash. In float32, torch's checker
is known to fail most samples (its tolerances are float64's); the figure that matters is our pass rate.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError

import gradcheck_svc as gc

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Samples larger than this many Jacobian entries are skipped: torch's dense gradcheck takes minutes.
_MAX_ENTRIES = 200_000
_LISTED = 25  # disagreements printed one by one


@dataclass
class Outcome:
    ok: bool
    seconds: float
    reason: str = ""  # why it failed: an exception or the failing pairs
    ratio: float = 0.0  # our largest err/tol (ours only)
    crashed: bool = False  # raised instead of returning a verdict


@dataclass
class Row:
    op: str
    sample: int
    ours: Outcome
    theirs: Outcome
    why: str = ""  # when only torch fails: what about the sample explains it


def _why_torch_fails(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], ratio: float) -> str:
    """What about a sample explains a torch failure that we do not share."""
    with torch.no_grad():
        outs = [t for t in torch.utils._pytree.tree_leaves(fn(*args)) if isinstance(t, torch.Tensor)]
    widest = max((a.real.dtype.itemsize if a.is_complex() else a.dtype.itemsize) for a in args)
    narrow = sorted(
        {
            str(t.dtype)
            for t in outs
            if (t.is_floating_point() or t.is_complex()) and t.real.dtype.itemsize < widest
        }
    )
    if narrow:
        return f"the output is {', '.join(narrow)}: torch holds it to float64 tolerances, we to its own dtype"
    if any(t.is_floating_point() and bool(t.isnan().any()) for t in outs):
        return "fn is NaN at this point: NaN on both sides, which torch counts as a mismatch"
    if widest < 8:
        return "float32 inputs: torch's finite differences carry float32 rounding far above its tolerances"
    return f"we find analytic = numeric within tolerance (largest err/tol {ratio:.2g})"


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise _Timeout(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:150]}"


def _sample_function(op: Any, sample: Any) -> tuple[Callable[..., Any], tuple[torch.Tensor, ...]]:
    """The function of the inputs that require grad, as torch's own test_ops_gradients builds it."""
    variant = op.get_op()

    def listed(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in value)

    if listed(sample.input):
        everything = chain(sample.input, sample.args, sample.kwargs.values())
    else:
        everything = chain((sample.input,), sample.args, sample.kwargs.values())
    grad_args = tuple(t for t in everything if isinstance(t, torch.Tensor) and t.requires_grad)

    def recompose(inputs: tuple[torch.Tensor, ...], value: Any, at: int) -> tuple[Any, int]:
        if listed(value):
            out = []
            for t in value:
                if t.requires_grad:
                    out.append(inputs[at])
                    at += 1
                else:
                    out.append(t)
            return out, at
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return inputs[at], at + 1
        return value, at

    def fn(*inputs: torch.Tensor) -> Any:
        at = 0
        first, at = recompose(inputs, sample.input, at)
        args = [first]
        for value in sample.args:
            value, at = recompose(inputs, value, at)
            args.append(value)
        kwargs = {}
        for key, value in sample.kwargs.items():
            kwargs[key], at = recompose(inputs, value, at)
        output = op.gradcheck_wrapper(variant, *args, **kwargs)
        if sample.output_process_fn_grad is not None:
            return sample.output_process_fn_grad(output)
        return output

    fn.__qualname__ = op.name
    return fn, grad_args


def _ours(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], limit: int) -> Outcome:
    start = time.perf_counter()
    try:
        with _time_limit(limit):
            report = gc.check(fn, *args)
    except Exception as exc:
        return Outcome(False, time.perf_counter() - start, _short(exc), crashed=True)
    seconds = time.perf_counter() - start
    ratio = max((p.max_error_ratio for p in report.pairs), default=0.0)
    if report.ok:
        return Outcome(True, seconds, ratio=ratio)
    reasons = []
    for pair in report.failures[:3]:
        worst = pair.worst[0] if pair.worst else None
        where = (
            f" at {worst.location(pair.output, pair.input)}: analytic {worst.analytic:.4g}, "
            f"numeric {worst.numeric:.4g}, tol {worst.tolerance:.2g}"
            if worst
            else ""
        )
        reasons.append(f"{pair.status.value} {pair.title}{where}")
    return Outcome(False, seconds, "; ".join(reasons))


def _theirs(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], op: Any, limit: int) -> Outcome:
    start = time.perf_counter()
    try:
        with _time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = torch.autograd.gradcheck(fn, args, nondet_tol=op.gradcheck_nondet_tol)
        return Outcome(bool(ok), time.perf_counter() - start)
    except GradcheckError as exc:
        return Outcome(False, time.perf_counter() - start, _short(exc))
    except Exception as exc:
        return Outcome(False, time.perf_counter() - start, _short(exc), crashed=True)


def _entries(args: tuple[torch.Tensor, ...], fn: Callable[..., Any]) -> int:
    with torch.no_grad():
        out = fn(*args)
    outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum(t.numel() for t in outs) * sum(t.numel() for t in args)


def _ops(filters: list[str], skip: list[str] | None = None) -> list[Any]:
    from torch.testing._internal.common_methods_invocations import op_db

    chosen = []
    for op in op_db:
        if not op.supports_autograd:
            continue
        if filters and not any(f in op.name or f in op.variant_test_name for f in filters):
            continue
        if skip and any(f in op.name or f in op.variant_test_name for f in skip):
            continue
        chosen.append(op)
    return chosen


def sweep(
    dtype: torch.dtype,
    ops: list[Any],
    every_sample: bool,
    limit: int,
    verbose: bool,
    device: str = "cpu",
    torch_too: bool = True,
) -> list[Row]:
    rows: list[Row] = []
    for op in ops:
        if dtype not in op.supported_backward_dtypes(device):
            continue
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        torch.manual_seed(0)
        try:
            samples = op.sample_inputs(device, dtype, requires_grad=True)
        except Exception as exc:
            print(f"  {name}: cannot build samples ({_short(exc)})", file=sys.stderr)
            continue
        for index, sample in enumerate(samples):
            if index and not every_sample:
                break
            fn, args = _sample_function(op, sample)
            if not args:
                continue
            try:
                if _entries(args, fn) > _MAX_ENTRIES:
                    continue
            except Exception:
                continue  # the op itself raises on this sample: nothing for either tool to check
            # Each tool gets its own copies: a failed check must not leave state for the other.
            ours = _ours(fn, tuple(a.detach().clone() for a in args), limit)
            theirs = (
                _theirs(
                    fn, tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args), op, limit
                )
                if torch_too
                else Outcome(False, 0.0, "not run")
            )
            row = Row(name, index, ours, theirs)
            if ours.ok and not theirs.ok:
                row.why = _why_torch_fails(fn, args, ours.ratio)
            rows.append(row)
            if verbose:
                mark = "ok " if ours.ok else "BAD"
                took = f"ours {ours.seconds:.3f}s torch {theirs.seconds:.3f}s"
                print(f"  {mark} {name}[{index}] {took} {ours.reason}")
    return rows


def _report(dtype_name: str, rows: list[Row]) -> None:
    n = len(rows)
    ours_ok = sum(r.ours.ok for r in rows)
    theirs_ok = sum(r.theirs.ok for r in rows)
    agree = sum(r.ours.ok == r.theirs.ok for r in rows)
    ours_s = sum(r.ours.seconds for r in rows)
    theirs_s = sum(r.theirs.seconds for r in rows)
    print(f"\n=== {dtype_name}: {n} samples of {len({r.op for r in rows})} ops ===")
    print(
        f"  gradcheck_svc : {ours_ok}/{n} pass ({100 * ours_ok / max(n, 1):.1f}%), "
        f"{sum(r.ours.crashed for r in rows)} raised, {ours_s:.1f} s"
    )
    print(
        f"  torch         : {theirs_ok}/{n} pass ({100 * theirs_ok / max(n, 1):.1f}%), "
        f"{sum(r.theirs.crashed for r in rows)} raised, {theirs_s:.1f} s"
    )
    print(f"  agree {agree}/{n}; time ours/torch = {ours_s / max(theirs_s, 1e-9):.2f}")
    only_theirs = [r for r in rows if r.theirs.ok and not r.ours.ok]
    print(f"  torch passes, we fail: {len(only_theirs)}")
    for r in only_theirs:
        print(f"    {r.op}[{r.sample}]: {r.ours.reason}")
    only_ours = [r for r in rows if r.ours.ok and not r.theirs.ok]
    print(f"  we pass, torch fails: {len(only_ours)}")
    kinds = Counter(r.theirs.reason.split(":")[0] for r in only_ours)
    print(
        "    torch's reasons: " + ", ".join(f"{k or 'returned False'} x{v}" for k, v in kinds.most_common())
    )
    whys = Counter(r.why.split(":")[0].split(" (")[0] for r in only_ours)
    print("    explained by: " + ", ".join(f"{k} x{v}" for k, v in whys.most_common()))
    for r in only_ours[:_LISTED]:
        print(f"    {r.op}[{r.sample}]: torch: {r.theirs.reason} -- {r.why}")
    if len(only_ours) > _LISTED:
        print(f"    ... and {len(only_ours) - _LISTED} more")
    both = [r for r in rows if not r.ours.ok and not r.theirs.ok]
    print(f"  both fail: {len(both)}")
    for r in both:
        print(f"    {r.op}[{r.sample}]: ours: {r.ours.reason} | torch: {r.theirs.reason}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", choices=["first", "all"], default="first")
    parser.add_argument("--ops", nargs="*", default=[], help="only ops whose name contains one of these")
    parser.add_argument("--dtype", choices=[*_DTYPES, "both"], default="both")
    parser.add_argument("--limit", type=int, default=60, help="seconds allowed per sample and tool")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the samples live")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="leave out ops whose name contains one of these"
    )
    parser.add_argument("--part", default="1/1", help="K/N: every N-th op from the K-th, to split a sweep")
    parser.add_argument("--no-torch", action="store_true", help="our verdicts alone (torch's not run)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    k, n = (int(v) for v in args.part.split("/"))
    ops = _ops(args.ops, args.skip)[k - 1 :: n]
    names = list(_DTYPES) if args.dtype == "both" else [args.dtype]
    for name in names:
        rows = sweep(
            _DTYPES[name],
            ops,
            args.samples == "all",
            args.limit,
            args.verbose,
            args.device,
            not args.no_torch,
        )
        _report(f"{name} on {args.device}", rows)


if __name__ == "__main__":
    main()
