"""Verdict quality: false alarms on correct code and catch rates of planted bugs, over many seeds.

    python benchmarks/bench_verdicts.py                  # 50 seeds, float64/float32/float16/bfloat16
    python benchmarks/bench_verdicts.py --seeds 10 --dtypes float32 --modes fast
    python benchmarks/bench_verdicts.py --seeds 50 --first-seed 50   # seeds 50..99
    python benchmarks/bench_verdicts.py --seeds 20 --modes large     # default options, 64x64
    python benchmarks/bench_verdicts.py --seeds 10 --device cuda     # on the GPU

The corpus (tests/engine/corpus.py) holds correct custom autograd.Functions of the kinds people
write (tanh-GeLU with bias, sparsemax, SiLU, softplus, softmax, logsumexp, a layer-norm-like row
normalisation, a smooth clip, linear + tanh) and planted-bug twins of each (a dropped factor in one
term, 1% on one term, a sign, a transposed matrix, a missing broadcast reduction). Each is checked
at ``--seeds`` random points per dtype and mode with default options. ``auto`` runs a larger input
with a lowered ``fast_threshold`` so that auto really picks fast mode; ``large`` runs the default
options on 64x64 inputs, where they pick fast mode themselves. ``--own-dtype`` makes every
function refuse any dtype but the one it is checked in (as a function holding float32 constants
does), so the finite differences stay in that dtype instead of coming from float64 copies.

The table: false alarms = correct functions failing (should be 0), caught = buggy twins failing
(should be all of them).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))

from corpus import CASES, make_inputs, only_in

import gradcheck_svc as gc

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MODE_OPTIONS = {
    "full": ({"mode": "full"}, (6, 5)),
    "fast": ({"mode": "fast"}, (6, 5)),
    "auto": ({"fast_threshold": 100}, (12, 8)),
    # the default options at 64x64, where auto picks fast mode (logsumexp's one output per row: full)
    "large": ({}, (64, 64)),
}


def run(
    seeds: int,
    dtypes: list[str],
    modes: list[str],
    verbose: bool,
    own_dtype: bool = False,
    first_seed: int = 0,
    device: str = "cpu",
) -> int:
    rows = []
    misses: dict[tuple[str, str], list[str]] = defaultdict(list)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for mode in modes:
            options, shape = MODE_OPTIONS[mode]
            started = time.perf_counter()
            correct_runs = false_alarms = bug_runs = caught = 0
            for case in CASES:
                for seed in range(first_seed, first_seed + seeds):
                    inputs = tuple(t.to(device) for t in make_inputs(case, seed, dtype, shape))
                    bind = (lambda *b, d=dtype, c=case: only_in(d, c.bound(*b))) if own_dtype else case.bound
                    report = gc.check(bind(), *inputs, seed=seed, **options)
                    correct_runs += 1
                    if not report.ok:
                        false_alarms += 1
                        misses[(dtype_name, mode)].append(f"false alarm {case.name} seed {seed}")
                        if verbose:
                            print(report)
                    for bug in case.bugs:
                        report = gc.check(bind(bug), *inputs, seed=seed, **options)
                        bug_runs += 1
                        if report.ok:
                            misses[(dtype_name, mode)].append(f"missed {case.name}[{bug}] seed {seed}")
                        else:
                            caught += 1
            rows.append(
                (
                    dtype_name,
                    mode,
                    false_alarms,
                    correct_runs,
                    caught,
                    bug_runs,
                    time.perf_counter() - started,
                )
            )
    print(
        f"{len(CASES)} correct functions, {sum(len(c.bugs) for c in CASES)} buggy twins, {seeds} seeds each"
        + (f" (from seed {first_seed})" if first_seed else "")
        + (", every function refusing dtypes other than its own (in-dtype differences)" if own_dtype else "")
    )
    print(f"{'dtype':<9} {'mode':<5} {'false alarms':>16} {'caught':>16} {'time':>8}")
    for dtype_name, mode, fa, n_ok, c, n_bug, seconds in rows:
        print(
            f"{dtype_name:<9} {mode:<5} {fa:>5}/{n_ok:<4} {100 * fa / n_ok:5.1f}% "
            f"{c:>5}/{n_bug:<4} {100 * c / n_bug:5.1f}% {seconds:7.1f}s"
        )
    for (dtype_name, mode), lines in misses.items():
        shown = lines[:12]
        print(f"\n{dtype_name} {mode}: " + "; ".join(shown) + (" ..." if len(lines) > len(shown) else ""))
        # Which functions the misses and false alarms come from, counted over every seed.
        by_case = collections.Counter(line.rsplit(" seed ", 1)[0] for line in lines)
        print("  in all: " + ", ".join(f"{name} x{n}" for name, n in by_case.most_common()))
    return 0 if not misses else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["full", "fast", "auto"], choices=list(MODE_OPTIONS))
    parser.add_argument("--verbose", action="store_true", help="print the report of every false alarm")
    parser.add_argument(
        "--own-dtype", action="store_true", help="functions refuse float64 copies: in-dtype differences"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the inputs live")
    args = parser.parse_args()
    return run(
        args.seeds, args.dtypes, args.modes, args.verbose, args.own_dtype, args.first_seed, args.device
    )


if __name__ == "__main__":
    sys.exit(main())
