"""Verdicts on custom autograd.Functions modelled on public code, over many seeds and shapes.

    python benchmarks/bench_wild.py                            # 50 seeds, every dtype, mode, shape
    python benchmarks/bench_wild.py --seeds 50 --first-seed 100 --dtypes float32 --own-dtype
    python benchmarks/bench_wild.py --cases entmax15 rms_norm --modes full --torch

The corpus is tests/engine/corpus_wild.py (entmax, Mish, Swish, fused bias+GeLU, RMSNorm,
LayerNorm, cross-entropy with label smoothing, focal loss, rotary embedding, smooth-L1, bilinear
sampling, the docs' LinearFunction, two outputs, a recomputing backward, ...) and
tests/engine/corpus_wild2.py (sparsemax, soft-DTW, a fused GRU cell, depthwise conv, GroupNorm,
weight standardisation on a transposed weight, attention recomputed from its logsumexp, Chamfer
distance with integer outputs, interp1d, a complex multiply, an in-place ELU, a polar transform,
a sort, a correlation layer, ...) and tests/engine/corpus_kinky.py (relu, leaky relu, hardtanh,
abs, a relu MLP and a max pool on random normal inputs; ``--corpus`` picks one or "all"), each
correct and with planted-bug twins. Every case is checked with ``gradcheck_svc.check`` at
``--seeds`` points per shape ("small" 6x5, "medium" 16x12, "large" 64x64, where the default options
pick fast mode for most cases: the column "fast" counts the checks that ran in it), dtype and mode:

- ``full``, ``fast``: that mode; ``auto``: the default options (auto picks full at these sizes);
  ``auto-fast``: auto with ``fast_threshold=100``, so that auto really picks fast mode.
- ``--own-dtype``: every function refuses float64 copies, so finite differences stay in its dtype.

A planted bug can be invisible at a point (1% on a row of entmax whose support is one element:
that row's gradient is 0 either way). Such runs are counted apart: the buggy backward's Jacobian,
computed in float64 at the same point, is compared with the correct one, and a bug whose Jacobian
differs by less than 1e-10 relative is "invisible", not "missed". ``--torch`` also runs
torch.autograd.gradcheck in float64 at the same points and lists every run where the two verdicts
differ.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))

from corpus import only_in
from corpus_kinky import KINKY_CASES
from corpus_wild import WILD_CASES, WildCase, make_wild_inputs
from corpus_wild2 import WILD_CASES_2

import gradcheck_svc as gc

DTYPES = {"float64": torch.float64, "float32": torch.float32}
# "large": 4096 elements, where the default options pick fast mode for most cases
SHAPES = {"small": (6, 5), "medium": (16, 12), "large": (64, 64)}
MODES = {"full": {"mode": "full"}, "fast": {"mode": "fast"}, "auto": {}, "auto-fast": {"fast_threshold": 100}}
INVISIBLE = 1e-10
CORPORA = {
    "first": WILD_CASES,
    "second": WILD_CASES_2,
    "both": WILD_CASES + WILD_CASES_2,
    "kinky": KINKY_CASES,
    "all": WILD_CASES + WILD_CASES_2 + KINKY_CASES,
}


def _grad_inputs(case: WildCase, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The inputs as torch.autograd.gradcheck wants them: the checked ones requiring grad."""
    return [
        _copy(t).requires_grad_(_inexact(t) and (case.grad is None or case.grad[i]))
        for i, t in enumerate(inputs)
    ]


def _inexact(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy with the same strides (a non-contiguous input stays one)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.detach())


def _differentiable(out: object) -> tuple[torch.Tensor, ...]:
    """The floating and complex outputs (integer ones, such as returned indices, have no gradient)."""
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(o for o in outs if _inexact(o))


def _vjps(case: WildCase, bug: str, inputs: list[torch.Tensor], cotangents: list) -> torch.Tensor:
    """The backward's products with a few cotangents, every checked input's gradient flattened."""
    wrt = [t for t in inputs if t.requires_grad]
    outs = _differentiable(case.bound(bug)(*inputs))
    rows = []
    for cot in cotangents:
        grads = torch.autograd.grad(outs, wrt, cot, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(w)).reshape(-1)
                    for g, w in zip(grads, wrt, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def _invisible(case: WildCase, bug: str, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the buggy backward equals the correct one at this point: their products with
    random cotangents (which tell two different Jacobians apart with probability 1) agree."""
    grad_in = _grad_inputs(case, inputs)
    outs = _differentiable(case.bound()(*grad_in))
    g = torch.Generator().manual_seed(1234)
    cotangents = [[torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs] for _ in range(3)]
    right, wrong = _vjps(case, "none", grad_in, cotangents), _vjps(case, bug, grad_in, cotangents)
    scale = right.abs().max().clamp_min(1e-300)
    return bool((right - wrong).abs().max() / scale < INVISIBLE)


def _torch_ok(case: WildCase, bug: str, inputs: tuple[torch.Tensor, ...]) -> bool:
    try:
        return torch.autograd.gradcheck(case.bound(bug), _grad_inputs(case, inputs), raise_exception=False)
    except RuntimeError:
        return False


def run(args: argparse.Namespace) -> int:
    cases = [c for c in CORPORA[args.corpus] if not args.cases or c.name in args.cases]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = []
    misses: dict[str, list[str]] = collections.defaultdict(list)
    torch_rows: dict[str, list[int]] = {}
    disagreements: list[str] = []
    visible_cache: dict[tuple[str, str, str, int], bool] = {}
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        if args.torch:
            counts = [0, 0, 0, 0]  # false alarms, correct runs, caught, visible bug runs
            for case in cases:
                for seed in seeds:
                    inputs = make_wild_inputs(case, seed, torch.float64, shape)
                    ours = gc.check(case.bound(), *inputs, seed=seed).ok
                    theirs = _torch_ok(case, "none", inputs)
                    counts[0] += not theirs
                    counts[1] += 1
                    if ours != theirs:
                        disagreements.append(
                            f"{shape_name} {case.name} seed {seed}: ours {ours}, torch {theirs}"
                        )
                    for bug in case.bugs:
                        key = (shape_name, case.name, bug, seed)
                        if key not in visible_cache:
                            visible_cache[key] = not _invisible(case, bug, inputs)
                        if not visible_cache[key]:
                            continue
                        ours = gc.check(case.bound(bug), *inputs, seed=seed).ok
                        theirs = _torch_ok(case, bug, inputs)
                        counts[2] += not theirs
                        counts[3] += 1
                        if ours != theirs:
                            disagreements.append(
                                f"{shape_name} {case.name}[{bug}] seed {seed}: ours {ours}, torch {theirs}"
                            )
            torch_rows[shape_name] = counts
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for mode in args.modes:
                options = MODES[mode]
                label = f"{dtype_name}{' own' if args.own_dtype else ''} {mode} {shape_name}"
                started = time.perf_counter()
                n_ok = fa = n_bug = caught = invisible = n_fast = 0
                for case in cases:
                    for seed in seeds:
                        inputs = make_wild_inputs(case, seed, dtype, shape)
                        inputs64 = make_wild_inputs(case, seed, torch.float64, shape)

                        def bind(bug: str = "none", case: WildCase = case, dtype: torch.dtype = dtype):
                            return only_in(dtype, case.bound(bug)) if args.own_dtype else case.bound(bug)

                        report = gc.check(bind(), *inputs, seed=seed, **options)
                        n_ok += 1
                        n_fast += report.mode == "fast"
                        if not report.ok:
                            fa += 1
                            misses[label].append(f"false alarm {case.name} seed {seed}")
                            if args.verbose:
                                print(report)
                        for bug in case.bugs:
                            key = (shape_name, case.name, bug, seed)
                            if key not in visible_cache:
                                visible_cache[key] = not _invisible(case, bug, inputs64)
                            if not visible_cache[key]:
                                invisible += 1
                                continue
                            n_bug += 1
                            report = gc.check(bind(bug), *inputs, seed=seed, **options)
                            n_fast += report.mode == "fast"
                            if report.ok:
                                misses[label].append(f"missed {case.name}[{bug}] seed {seed}")
                            else:
                                caught += 1
                rows.append(
                    (label, fa, n_ok, caught, n_bug, invisible, n_fast, time.perf_counter() - started)
                )
                if args.progress:
                    print("done:", *rows[-1], flush=True)
    n_bugs = sum(len(c.bugs) for c in cases)
    print(
        f"{len(cases)} correct functions, {n_bugs} buggy twins, seeds {seeds.start}-{seeds.stop - 1}"
        + (
            ", every function refusing dtypes other than its own (in-dtype differences)"
            if args.own_dtype
            else ""
        )
    )
    print(
        f"{'dtype mode shape':<28} {'false alarms':>14} {'caught/visible':>18} {'invisible':>9} "
        f"{'fast':>9} {'time':>7}"
    )
    for label, fa, n_ok, caught, n_bug, invisible, n_fast, seconds in rows:
        print(
            f"{label:<28} {fa:>5}/{n_ok:<4} {100 * fa / max(n_ok, 1):4.1f}% "
            f"{caught:>5}/{n_bug:<4} {100 * caught / max(n_bug, 1):5.1f}% {invisible:>9} "
            f"{n_fast:>4}/{n_ok + n_bug:<4} {seconds:6.1f}s"
        )
    for shape_name, (fa, n_ok, caught, n_bug) in torch_rows.items():
        print(
            f"{'torch gradcheck f64 ' + shape_name:<28} {fa:>5}/{n_ok:<4} {100 * fa / max(n_ok, 1):4.1f}% "
            f"{caught:>5}/{n_bug:<4} {100 * caught / max(n_bug, 1):5.1f}%"
        )
    if args.torch:
        print(f"\nverdicts differing from torch.autograd.gradcheck (float64): {len(disagreements)}")
        for line in disagreements[:20]:
            print("  " + line)
    for label, lines in misses.items():
        by_case = collections.Counter(line.rsplit(" seed ", 1)[0] for line in lines)
        print(f"\n{label}: " + ", ".join(f"{name} x{n}" for name, n in by_case.most_common()))
        print("  e.g. " + "; ".join(lines[:6]))
    return 0 if not misses else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--corpus",
        default="both",
        choices=list(CORPORA),
        help="corpus_wild.py, corpus_wild2.py, both, corpus_kinky.py or all",
    )
    parser.add_argument("--cases", nargs="+", default=None, choices=sorted({c.name for c in CORPORA["all"]}))
    parser.add_argument("--own-dtype", action="store_true", help="functions refuse float64 copies")
    parser.add_argument(
        "--torch", action="store_true", help="compare with torch.autograd.gradcheck (float64)"
    )
    parser.add_argument("--progress", action="store_true", help="print each row as soon as it is measured")
    parser.add_argument("--verbose", action="store_true", help="print the report of every false alarm")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
