"""Planted backward bugs across torch's operator database: how many does each checker catch?

    python benchmarks/bench_mutants.py                      # first sample of every op
    python benchmarks/bench_mutants.py --samples 3          # the first three samples of every op
    python benchmarks/bench_mutants.py --ops linalg fft -v  # ops whose name contains one of these
    python benchmarks/bench_mutants.py --part 1/3           # every third op, to split the sweep

Each op_db sample (loaded as ``bench_opinfo`` does) is wrapped in a custom ``autograd.Function``
whose forward is the op and whose backward is the op's true vector-Jacobian product (computed
with ``torch.autograd.grad`` inside), then mutated in realistic ways:

- ``elem_max`` / ``elem_rand``: one element of one input's gradient scaled by 1.01 (the element
  with the largest gradient, or one drawn at random);
- ``all_1.01`` / ``all_0.5``: one input's whole gradient scaled by 1.01, or by 0.5 (a dropped
  factor);
- ``roll`` / ``sign_half`` / ``transpose``: one input's gradient rolled by one element, negated on
  its second half, or transposed (square matrices only);
- ``ones``: the gradient of grad_output = ones, whatever grad_output's values.

The mutated input is the first one on which the mutant is visible: a mutant whose vjp equals the
true one for a random grad_output (relative difference under 1e-10, or a difference under 1e-10
of the size a vjp has from fn's values over its inputs', where the true vjp is rounding of 0) is
skipped as invisible.
The un-mutated wrapper is checked too: it must pass wherever the plain op passes (a false alarm
otherwise). Checked by ``gradcheck_svc.check`` in the default mode (auto) and ``mode="fast"``, in
float64 and on float32 copies of the same inputs (fn runs on float64 copies by default), and by
``torch.autograd.gradcheck`` in float64 as the anchor. Printed per mutation kind: caught / visible;
then every visible mutant the default mode passes, with its err/tol and, for one-element mutants,
how large the mutated column is next to its block's largest (a 1% change of an element 1e-7 of
its block is below float32's resolution, not a miss).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_opinfo import _entries, _ops, _sample_function, _short, _time_limit
from torch.autograd.gradcheck import GradcheckError

import gradcheck_svc as gc

KINDS = ("elem_max", "elem_rand", "all_1.01", "all_0.5", "roll", "sign_half", "transpose", "ones")
_INVISIBLE = 1e-10
_MAX_ENTRIES = 20_000  # custom Functions have no vmap: every Jacobian row is its own backward call
# (checker name, dtype, mode); torch's gradcheck is the anchor, float64 only.
CHECKERS = (
    ("auto64", torch.float64, "auto"),
    ("fast64", torch.float64, "fast"),
    ("auto32", torch.float32, "auto"),
    ("fast32", torch.float32, "fast"),
)


def _leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def true_vjp(
    fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor | None, ...]
) -> list[torch.Tensor]:
    """The op's own vector-Jacobian product at ``inputs`` for the output cotangents ``grads``."""
    with torch.enable_grad():
        xs = tuple(x.detach().requires_grad_(True) for x in inputs)
        outs = _leaves(fn(*xs))
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        if not pairs:
            return [torch.zeros_like(x) for x in xs]
        found = torch.autograd.grad(
            [o for o, _ in pairs], xs, [g for _, g in pairs], allow_unused=True, materialize_grads=True
        )
    return [g.detach() for g in found]


def mutate(kind: str, g: torch.Tensor, element: int) -> torch.Tensor:
    """One input's gradient ``g`` with the bug ``kind`` planted (``ones`` is planted upstream)."""
    flat = g.detach().reshape(-1).clone()
    if kind in ("elem_max", "elem_rand"):
        flat[element] = flat[element] * 1.01
    elif kind == "all_1.01":
        flat = flat * 1.01
    elif kind == "all_0.5":
        flat = flat * 0.5
    elif kind == "roll":
        flat = flat.roll(1)
    elif kind == "sign_half":
        flat[flat.numel() // 2 :] = -flat[flat.numel() // 2 :]
    elif kind == "transpose":
        return g.detach().transpose(-2, -1).clone()
    return flat.reshape(g.shape)


@dataclass(frozen=True)
class Plant:
    kind: str  # "none": the true gradient
    target: int = 0  # which input's gradient is mutated
    element: int = 0  # for the one-element kinds


def differentiable_outputs(fn: Callable[..., Any], args: tuple[torch.Tensor, ...]) -> list[bool]:
    """Which of fn's outputs autograd differentiates (``save_mean`` of a batch norm is not)."""
    with torch.enable_grad():
        outs = _leaves(fn(*(a.detach().requires_grad_(True) for a in args)))
    return [o.requires_grad for o in outs]


def wrapped(
    fn: Callable[..., Any], plant: Plant, n_outputs: int, differentiable: list[bool] | None = None
) -> Callable[..., Any]:
    """``fn`` as a custom Function whose backward is the true vjp with ``plant`` planted; outputs
    autograd does not differentiate (``differentiable``) are marked so."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: torch.Tensor) -> Any:
            ctx.save_for_backward(*inputs)
            outs = [o.clone() for o in _leaves(fn(*inputs))]
            flags = differentiable or [True] * len(outs)
            ctx.mark_non_differentiable(
                *[o for o, d in zip(outs, flags, strict=True) if not (d and _differentiable(o))]
            )
            return tuple(outs)

        @staticmethod
        def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
            inputs = ctx.saved_tensors
            if plant.kind == "ones":
                grads = tuple(None if g is None else torch.ones_like(g) for g in grads)
            found = true_vjp(fn, inputs, grads)
            if plant.kind not in ("none", "ones"):
                found[plant.target] = mutate(plant.kind, found[plant.target], plant.element)
            return tuple(found)

    def call(*inputs: torch.Tensor) -> Any:
        outs = Planted.apply(*inputs)
        return outs[0] if n_outputs == 1 else outs

    call.__qualname__ = getattr(fn, "__qualname__", "fn")
    return call


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = sum(float((x - y).double().norm()) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5
    size = sum(float(y.double().norm()) ** 2 for y in b) ** 0.5
    return diff / max(size, 1e-300)


def plants(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], seed: int) -> dict[str, Plant]:
    """One visible plant per kind: the first input on which the mutant changes the vjp."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outs = _leaves(fn(*args))
    cot = tuple(
        torch.randn(o.shape, generator=gen, dtype=o.dtype) if _differentiable(o) else None for o in outs
    )
    truth = true_vjp(fn, args, cot)
    # The true vjp may itself be rounding (corrcoef of two numbers is 1: its gradient is 0 or
    # 1e-17); a mutant of rounding is no visible bug. The floor: the size a vjp has from the
    # cotangent and fn's values over its inputs'.
    size = max((float(o.abs().max()) for o in outs if _differentiable(o) and o.numel()), default=1.0)
    spread = max((float(a.abs().max()) for a in args if a.numel()), default=1.0)
    cot_size = max((float(c.abs().max()) for c in cot if c is not None and c.numel()), default=1.0)
    floor = _INVISIBLE * cot_size * max(size, 1.0) / max(spread, 1.0)
    truth_size = sum(float(g.double().norm()) ** 2 for g in truth) ** 0.5
    found: dict[str, Plant] = {}
    for kind in KINDS:
        for target, g in enumerate(truth):
            if g.numel() == 0:
                continue
            if kind == "transpose" and (g.dim() < 2 or g.shape[-1] != g.shape[-2]):
                continue
            element = 0
            if kind == "elem_max":
                element = int(g.abs().reshape(-1).argmax())
            elif kind == "elem_rand":
                element = int(torch.randint(g.numel(), (1,), generator=gen))
            if kind == "ones":
                ones = tuple(None if c is None else torch.ones_like(c) for c in cot)
                bad = true_vjp(fn, args, ones)
            else:
                bad = list(truth)
                bad[target] = mutate(kind, g, element)
            if _relative(bad, truth) * truth_size >= floor and _relative(bad, truth) >= _INVISIBLE:
                found[kind] = Plant(kind, target, element)
                break
    return found


@dataclass
class Verdict:
    ok: bool
    ratio: float = 0.0
    crashed: str = ""


def ours(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], mode: str, limit: int) -> Verdict:
    try:
        with _time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = gc.check(fn, *args, mode=mode)
    except Exception as exc:
        return Verdict(False, crashed=_short(exc))
    return Verdict(report.ok, max((p.max_error_ratio for p in report.pairs), default=0.0))


def theirs(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], op: Any, limit: int) -> Verdict:
    try:
        with _time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = torch.autograd.gradcheck(
                fn,
                tuple(a.detach().clone().requires_grad_() for a in args),
                nondet_tol=op.gradcheck_nondet_tol,
            )
        return Verdict(bool(ok))
    except GradcheckError:
        return Verdict(False)
    except Exception as exc:
        return Verdict(False, crashed=_short(exc))


def column_share(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], plant: Plant) -> float:
    """How large the mutated Jacobian column is next to the largest of its block (max |entry|)."""
    with torch.no_grad():
        outs = _leaves(fn(*args))
    x = args[plant.target]
    best = 0.0
    mine = 0.0
    for index, out in enumerate(outs):
        if not _differentiable(out):
            continue

        def one(v: torch.Tensor, index: int = index) -> torch.Tensor:
            xs = list(args)
            xs[plant.target] = v
            return _leaves(fn(*xs))[index]

        jac = torch.autograd.functional.jacobian(one, x.detach()).reshape(out.numel(), x.numel())
        block = float(jac.abs().max()) if jac.numel() else 0.0
        if block > best:
            best = block
            mine = float(jac[:, plant.element].abs().max())
    return mine / best if best else 0.0


def _share(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], plant: Plant) -> float | None:
    """``column_share``, None where torch's jacobian cannot take fn (complex outputs)."""
    try:
        return column_share(fn, args, plant)
    except RuntimeError:
        return None


@dataclass
class Tally:
    visible: int = 0
    caught: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class Miss:
    where: str
    kind: str
    checker: str
    ratio: float
    share: float | None


def _copies(args: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(a.detach().to(dtype).clone() for a in args)


def sweep(ops: list[Any], samples: int, limit: int, verbose: bool) -> None:
    tallies: dict[str, Tally] = {k: Tally() for k in KINDS}
    misses: list[Miss] = []
    alarms: list[str] = []  # correct wrapper fails where the plain op passes
    crashes: list[str] = []
    checked = 0
    seconds: dict[str, float] = defaultdict(float)
    for op in ops:
        if torch.float64 not in op.supported_backward_dtypes("cpu"):
            continue
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        torch.manual_seed(0)
        try:
            sample_list = list(op.sample_inputs("cpu", torch.float64, requires_grad=True))
        except Exception as exc:
            print(f"  {name}: cannot build samples ({_short(exc)})", file=sys.stderr)
            continue
        for index, sample in enumerate(sample_list[:samples]):
            fn, args = _sample_function(op, sample)
            if not args or any(a.is_complex() for a in args):
                continue
            try:
                if _entries(args, fn) > _MAX_ENTRIES:
                    continue
                n_out = len(_leaves(fn(*args)))
                flags = differentiable_outputs(fn, args)
                planted = plants(fn, args, seed=index)
            except Exception:
                continue  # the op raises on this sample: nothing to check
            where = f"{name}[{index}]"
            checked += 1
            ok32 = torch.float32 in op.supported_backward_dtypes("cpu")
            base: dict[str, bool] = {}
            for label, dtype, mode in CHECKERS:
                if dtype == torch.float32 and not ok32:
                    continue
                plain = ours(fn, _copies(args, dtype), mode, limit)
                right = ours(wrapped(fn, Plant("none"), n_out, flags), _copies(args, dtype), mode, limit)
                base[label] = plain.ok
                if plain.ok and not right.ok:
                    alarms.append(f"{where} {label}: correct wrapper fails ({right.crashed or right.ratio})")
                if right.crashed and not plain.crashed:
                    crashes.append(f"{where} {label}: {right.crashed}")
            for kind, plant in planted.items():
                tally = tallies[kind]
                tally.visible += 1
                bad = wrapped(fn, plant, n_out, flags)
                for label, dtype, mode in CHECKERS:
                    if label not in base:
                        continue
                    start = time.perf_counter()
                    verdict = ours(bad, _copies(args, dtype), mode, limit)
                    seconds[label] += time.perf_counter() - start
                    if not verdict.ok:
                        tally.caught[label] += 1
                    elif mode == "auto":
                        share = _share(fn, args, plant) if kind.startswith("elem") else None
                        misses.append(Miss(where, kind, label, verdict.ratio, share))
                        if verbose:
                            print(f"  missed: {where} {kind} {label} err/tol {verdict.ratio:.3g}", flush=True)
                start = time.perf_counter()
                if not theirs(bad, args, op, limit).ok:
                    tally.caught["torch64"] += 1
                seconds["torch64"] += time.perf_counter() - start
            if verbose:
                print(f"  {where}: {len(planted)} visible mutants", flush=True)
    labels = [c[0] for c in CHECKERS] + ["torch64"]
    print(f"\n=== {checked} samples of {len(ops)} ops; caught / visible mutants ===")
    print(f"  {'kind':10s} " + " ".join(f"{label:>10s}" for label in labels))
    total = Tally()
    for kind in KINDS:
        tally = tallies[kind]
        total.visible += tally.visible
        cells = []
        for label in labels:
            total.caught[label] += tally.caught[label]
            cells.append(f"{tally.caught[label]:>5d}/{tally.visible:<4d}")
        print(f"  {kind:10s} " + " ".join(cells))
    print(f"  {'all':10s} " + " ".join(f"{total.caught[lb]:>5d}/{total.visible:<4d}" for lb in labels))
    print("  seconds on mutants: " + ", ".join(f"{lb} {seconds[lb]:.1f}" for lb in labels))
    print(f"  correct wrapper fails where the plain op passes: {len(alarms)}")
    for line in alarms:
        print(f"    {line}")
    print(f"  correct wrapper raised where the plain op did not: {len(crashes)}")
    for line in crashes[:10]:
        print(f"    {line}")
    print(f"  visible mutants passed in the default mode: {len(misses)}")
    for miss in misses:
        share = "" if miss.share is None else f", column/block max {miss.share:.2g}"
        print(f"    {miss.where} {miss.kind} {miss.checker}: err/tol {miss.ratio:.3g}{share}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1, help="samples per op (from the first)")
    parser.add_argument("--ops", nargs="*", default=[], help="only ops whose name contains one of these")
    parser.add_argument("--limit", type=int, default=60, help="seconds allowed per check")
    parser.add_argument("--part", default="1/1", help="K/N: every N-th op from the K-th, to split a sweep")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    k, n = (int(v) for v in args.part.split("/"))
    sweep(_ops(args.ops)[k - 1 :: n], args.samples, args.limit, args.verbose)


if __name__ == "__main__":
    main()
