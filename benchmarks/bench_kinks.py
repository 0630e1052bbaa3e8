"""Verdicts at kinks, ties and on piecewise functions, over many seeds, side by side with torch.

    python benchmarks/bench_kinks.py                         # 30 seeds, float64 and float32, every mode
    python benchmarks/bench_kinks.py --seeds 100 --sizes 8 --dtypes float32 --own-dtype
    python benchmarks/bench_kinks.py --cases topk_ties relu_near0 --modes full -v

The cases (tests/engine/kink_cases.py): relu, leaky_relu, abs, clamp, hardtanh, hardswish at and
near their corners and on grids; max, amax, min, maxpool, topk, sort, median and cummax of inputs
with ties; hand-written relu, soft-threshold, hinge loss and smooth-L1 Functions at their switch
points; a composition of smooth and piecewise parts. Points are integers or multiples of 0.5 or
0.25 (as tests people write), or a corner plus offsets around the finite-difference steps.

Each case is checked at ``--seeds`` points of each size, dtype and mode: the correct function
(a verdict that is not ok is a *false alarm*: correct code must pass, or be reported a kink), a
twin 1% off at an element where the function is smooth (must be caught), a twin off by
``(jump + 1) g`` at an element on a corner, outside every subgradient (must be caught), and one
that counts a tie twice (the gradient of one of two equal inputs added to the other's; see the
report for which of those an element-wise check can see). ``--own-dtype``: the function refuses
float64 copies, so differences stay in its dtype. Modes: full, fast, auto (the
default options). torch.autograd.gradcheck runs in float64 on the same points (its false alarms
at kinks are expected: it knows no kinks).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))

from corpus import only_in
from kink_cases import KINK_CASES, kink_element, make_kink_input, planted, smooth_element, tied_pair

import gradcheck_svc as gc

DTYPES = {"float64": torch.float64, "float32": torch.float32}
MODES = {"full": {"mode": "full"}, "fast": {"mode": "fast"}, "auto": {}}
_COLUMN = {"smooth": 3, "at_kink": 5, "at_tie": 7}  # where a twin's caught count goes in a row


def _torch_ok(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    try:
        return torch.autograd.gradcheck(fn, (x.detach().clone().requires_grad_(True),), raise_exception=False)
    except RuntimeError:
        return False


def run(args: argparse.Namespace) -> int:
    cases = [c for c in KINK_CASES if not args.cases or c.name in args.cases]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    # label -> false alarms, correct runs, kinks reported, caught/runs smooth, at a kink, at a tie
    table: dict[str, list[int]] = collections.defaultdict(lambda: [0] * 9)
    notes: dict[str, list[str]] = collections.defaultdict(list)
    started = time.perf_counter()
    for n in args.sizes:
        for case in cases:
            for seed in seeds:
                x64 = make_kink_input(case, seed, n, torch.float64)
                twins: dict[str, tuple[int, float]] = {}
                j = smooth_element(case, x64)
                if j is not None:
                    twins["smooth"] = (j, 0.0)
                for kind, pick in (("at_kink", kink_element), ("at_tie", tied_pair)):
                    found = pick(case, x64)
                    if found is not None:
                        twins[kind] = found
                if args.torch:
                    row = table[f"torch gradcheck float64 n={n}"]
                    row[1] += 1
                    if not _torch_ok(case.fn, x64):
                        row[0] += 1
                    for kind, (j, offset) in twins.items():
                        caught = not _torch_ok(planted(case, kind, j, offset), x64)
                        row[_COLUMN[kind]] += caught
                        row[_COLUMN[kind] + 1] += 1
                for dtype_name in args.dtypes:
                    dtype = DTYPES[dtype_name]
                    x = x64.to(dtype)

                    def bind(fn: Callable, dtype: torch.dtype = dtype) -> Callable:
                        return only_in(dtype, fn) if args.own_dtype else fn

                    for mode in args.modes:
                        label = f"{dtype_name}{' own' if args.own_dtype else ''} {mode} n={n}"
                        row = table[label]
                        report = gc.check(bind(case.fn), x, seed=seed, **MODES[mode])
                        row[1] += 1
                        row[2] += report.ok and any(p.kinks for p in report.pairs)
                        if not report.ok:
                            row[0] += 1
                            notes[label].append(f"false alarm {case.name} seed {seed}")
                            if args.verbose:
                                print(f"--- {label} {case.name} seed {seed} x={x.tolist()}\n{report}")
                        for kind, (j, offset) in twins.items():
                            bad = gc.check(bind(planted(case, kind, j, offset)), x, seed=seed, **MODES[mode])
                            k = _COLUMN[kind]
                            row[k + 1] += 1
                            if bad.ok:
                                notes[label].append(f"missed {case.name}[{kind}] seed {seed}")
                                if args.verbose:
                                    print(f"--- missed {label} {case.name}[{kind}@{j}] seed {seed}\n{bad}")
                            else:
                                row[k] += 1
    print(
        f"{len(cases)} piecewise cases, seeds {seeds.start}-{seeds.stop - 1}, sizes {args.sizes}"
        + (", functions refusing float64 copies" if args.own_dtype else "")
        + f" ({time.perf_counter() - started:.0f} s)"
    )
    print(
        f"{'dtype mode size':<30} {'false alarms':>14} {'kink verdicts':>14} "
        f"{'caught smooth':>15} {'caught at kink':>15} {'caught at tie':>15}"
    )
    for label, (fa, n_ok, kinks, cs, ns, ck, nk, ct, nt) in sorted(
        table.items(), key=lambda kv: kv[0].startswith("torch")
    ):
        counts = f"{cs:>7}/{ns:<7} {ck:>7}/{nk:<7} {ct:>7}/{nt:<7}"
        print(f"{label:<30} {fa:>6}/{n_ok:<7} {kinks:>6}/{n_ok:<7} {counts}")
    for label, lines in notes.items():
        by_case = collections.Counter(line.rsplit(" seed ", 1)[0] for line in lines)
        print(f"\n{label}: " + ", ".join(f"{name} x{count}" for name, count in by_case.most_common()))
        print("  e.g. " + "; ".join(lines[:6]))
    return 0 if not notes else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8], help="input elements (default 8)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--cases", nargs="+", default=None, choices=[c.name for c in KINK_CASES])
    parser.add_argument("--own-dtype", action="store_true", help="functions refuse float64 copies")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip torch's gradcheck")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every false alarm and miss")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
