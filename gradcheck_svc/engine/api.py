"""Public entry points of the engine: ``check`` and ``assert_grads``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from gradcheck_svc.engine.agreement import all_finite, same_values
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.devices import compare_devices, resolve_device
from gradcheck_svc.engine.edge_inputs import (
    empty_pairs,
    explain_written_inputs,
    mark_nonfinite_inputs,
    mark_nonfinite_outputs,
    note_skipped_outputs,
    written_input_pairs,
)
from gradcheck_svc.engine.expectation import apply_expectation
from gradcheck_svc.engine.fast import run_fast
from gradcheck_svc.engine.full import run_full
from gradcheck_svc.engine.precision import TF32_NOTE, on_cuda, tf32_off
from gradcheck_svc.engine.problem import Problem, build_problem
from gradcheck_svc.engine.progress import Progress, ProgressFn
from gradcheck_svc.engine.reference import Reference, choose_reference
from gradcheck_svc.engine.second_order import second_order_problem
from gradcheck_svc.engine.taylor import run_taylor
from gradcheck_svc.engine.threads import check_batch, guessed_batch, serial_if_small
from gradcheck_svc.engine.tiny import run_tiny
from gradcheck_svc.errors import (
    FunctionRaisedError,
    GradientMismatch,
    InvalidOptionError,
    NotCallableError,
)
from gradcheck_svc.options import (
    CallArguments,
    CheckOptions,
    call_arguments,
    explicit_options,
    resolve_options,
)
from gradcheck_svc.report import PairReport, Report, Status

__all__ = ["assert_grads", "check"]


# The dtypes whose products TF32 would round (see precision.py).
_TF32_DTYPES = (torch.float32, torch.complex64)


def _function_name(fn: Any) -> str:
    """A readable name: ``Cube`` for ``Cube.apply``, ``torch.sin`` for the builtin, the class of a module."""
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return owner.__name__
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    if getattr(fn, "__module__", None) in (None, "torch", "torch._C", "torch._C._VariableFunctions") or (
        isinstance(owner, type) and owner.__name__ == "_VariableFunctionsClass"
    ):
        public = getattr(fn, "__name__", name)
        if getattr(torch, public, None) is fn:
            return f"torch.{public}"
    return name


def check(
    fn: Callable[..., Any],
    *inputs: Any,
    fn_kwargs: dict[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    wrt: str | int | Sequence[str | int] | None = None,
    expect: Literal["match", "mismatch"] = "match",
    deadline: float | None = None,
    cancelled: Callable[[], bool] | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> Report:
    """Compare the autograd gradients of ``fn`` at ``inputs`` with error-bounded finite differences.

    Returns a ``Report``; a mismatch does not raise (see ``assert_grads``). ``fn_kwargs`` reach
    ``fn`` unchanged; ``input_names`` names the positional inputs in the report. ``wrt`` names
    the inputs / parameters to check (``"weight"``, ``"inputs[1]['scale']"``, ``"parameters"``,
    a position); ``expect="mismatch"`` passes only when autograd and finite differences disagree
    (straight-through estimators, gradient reversal). ``deadline`` (a ``time.monotonic()``
    value) and ``cancelled`` are polled between chunks; ``progress(done, total)`` hears of
    finite-difference columns done between chunks. Every other keyword is an option of
    ``CheckOptions``.
    """
    started = time.perf_counter()
    opts: CheckOptions = resolve_options(**options)
    call = call_arguments(
        fn_kwargs=fn_kwargs,
        input_names=input_names,
        wrt=wrt,
        expect=expect,
        deadline=deadline,
        cancelled=cancelled,
    )
    if progress is not None and not callable(progress):
        raise InvalidOptionError(f"progress must be callable, got {type(progress).__name__}")
    if not callable(fn):
        raise NotCallableError(
            f"fn must be callable (a function, an nn.Module, ...), got {type(fn).__name__}"
        )
    device = resolve_device(opts.device, inputs)
    fn_kwargs, input_names = call.fn_kwargs, call.input_names
    guess = guessed_batch(fn, inputs, opts.mode, opts.projections, opts.fast_threshold)
    # From fn's first call on: f(x) must come from the same arithmetic at every call, and on busy
    # cores the first call on several threads costs most of a small check.
    with tf32_off(on_cuda(device, fn, inputs)) as tf32_was_allowed, serial_if_small(guess) as resize:
        problem, _ = build_problem(
            fn, inputs, fn_kwargs, input_names=input_names, device=device, upcast=opts.upcast, wrt=call.wrt
        )
        n, m, leaves = problem.n_inputs, problem.n_outputs, len(problem.leaves)
        resize(check_batch(n, m, leaves, opts.mode, opts.projections, opts.fast_threshold))
        report = _check_problem(problem, fn, inputs, opts, call, device, progress)
    if tf32_was_allowed and any(leaf.dtype in _TF32_DTYPES for leaf in problem.leaves):
        report.notes.append(TF32_NOTE)
    report.timings["total_s"] = round(time.perf_counter() - started, 6)
    return apply_expectation(report, call.expect)


def _check_problem(
    problem: Problem,
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    opts: CheckOptions,
    call: CallArguments,
    device: torch.device | None,
    progress: ProgressFn | None,
) -> Report:
    """The check of a built problem: reference, analytic and numeric sides, verdicts, report."""
    fn_kwargs, input_names = call.fn_kwargs, call.input_names
    # The Taylor test and order 2 keep their numeric side in the user's dtype (see reference.py).
    reference = choose_reference(
        problem,
        fn,
        inputs,
        fn_kwargs,
        input_names=input_names,
        device=device,
        enabled=opts.scheme == "central" and opts.order == 1,
        wrt=call.wrt,
    )
    if opts.order == 2:
        problem = second_order_problem(problem, seed=opts.seed)
        reference = Reference(problem, reference.name, reference.reason)
    ctx = Context(problem, opts, deadline=call.deadline, cancelled=call.cancelled, reference=reference)
    if reference.name != "float64" and reference.reason:
        ctx.note(f"finite differences in {reference.name}: {reference.reason}")

    if not all_finite(ctx.f0):
        ctx.note("fn's value is NaN or infinite at this point: affected elements cannot be checked")
    note_skipped_outputs(problem, ctx.note)

    mode = _mode(ctx, opts)
    if progress is not None:
        ctx.progress = Progress(progress, _progress_total(ctx, opts, mode))
    try:
        pairs, mode = _run_mode(ctx, opts, mode)
    except FunctionRaisedError as exc:
        if not problem.written_inputs():
            raise
        pairs = written_input_pairs(problem, mode, exc)
    mark_nonfinite_inputs(problem, ctx.f0, pairs, ctx.note)
    if not all_finite(ctx.f0):
        mark_nonfinite_outputs(problem, ctx.f0, pairs)
    forward_nondeterministic = _forward_is_nondeterministic(ctx)
    if opts.compare_devices:
        pairs.append(compare_devices(fn, inputs, dict(fn_kwargs or {}), input_names, opts))
    if forward_nondeterministic:
        for pair in pairs:
            pair.status = Status.NONDETERMINISTIC
            pair.message = "fn returned different values for the same input"
    explain_written_inputs(problem, pairs, ctx.note)
    pairs.sort(key=lambda p: (p.check.value != "reverse", p.output, p.input))

    if ctx.progress is not None:
        ctx.progress.finish()
    ctx.timings["total_s"] = 0.0  # set by ``check``, in this place among the timings
    leaf_dtypes = sorted({leaf.dtype_name for leaf in problem.leaves})
    return Report(
        ok=all(p.ok for p in pairs),
        pairs=pairs,
        dtype=leaf_dtypes[0] if len(leaf_dtypes) == 1 else ",".join(leaf_dtypes),
        device=str(ctx.f0.device),
        mode=mode,
        scheme=opts.scheme,
        order=opts.order,
        function=_function_name(fn),
        notes=ctx.notes,
        options=_resolved_options(opts, ctx),
        timings={k: round(v, 6) for k, v in ctx.timings.items()},
    )


def _run_mode(ctx: Context, opts: CheckOptions, mode: str) -> tuple[list[PairReport], str]:
    """The pairs of the mode chosen, and the mode they were checked in."""
    if ctx.problem.n_outputs * ctx.problem.n_inputs == 0:
        return empty_pairs(ctx.problem, mode), mode
    if opts.scheme == "taylor":
        return run_taylor(ctx), "taylor"
    if mode == "full":
        tiny = run_tiny(ctx)
        return (tiny if tiny is not None else [a.report() for a in run_full(ctx).values()]), mode
    return run_fast(ctx), mode


def _mode(ctx: Context, opts: CheckOptions) -> str:
    """The mode asked for; under "auto", full up to ``fast_threshold`` Jacobian entries, else fast."""
    if opts.mode != "auto":
        return opts.mode
    entries = ctx.problem.n_outputs * ctx.problem.n_inputs
    if entries <= opts.fast_threshold:
        return "full"
    ctx.note(
        f"mode='auto' chose fast mode (random projections): the Jacobian has {entries} entries, over "
        f"fast_threshold={opts.fast_threshold}; mode='full' checks every element"
    )
    return "fast"


def _progress_total(ctx: Context, opts: CheckOptions, mode: str) -> int:
    """Finite-difference columns the check will evaluate: every column in full mode, one per
    projection and leaf in fast mode; 0 (unknown, nothing reported) for the Taylor test."""
    if opts.scheme == "taylor":
        return 0
    if mode == "full":
        return sum(leaf.size for leaf in ctx.problem.leaves)
    return opts.projections * len(ctx.problem.leaves)


def _resolved_options(opts: CheckOptions, ctx: Context) -> dict[str, object]:
    """The options set, the relative finite-difference step each leaf used, and the reference."""
    resolved: dict[str, object] = explicit_options(opts)
    steps = [ctx.eps(leaf) for leaf in ctx.numeric_problem.leaves]
    resolved["eps"] = steps[0] if len(set(steps)) == 1 else steps
    resolved["reference"] = ctx.reference.name if ctx.reference is not None else ""
    return resolved


def _forward_is_nondeterministic(ctx: Context) -> bool:
    """Compare f(x) from the first evaluation with later evaluations at the same point."""
    repeats = ctx.numeric_repeats or [ctx.evaluator.base()]
    unstable = not all(same_values(ctx.numeric_f0, again, ctx.numeric_machine_eps) for again in repeats)
    unstable |= not all(same_values(ctx.f0, again, ctx.machine_eps) for again in ctx.analytic.forward_values)
    if unstable:
        ctx.note("fn is not deterministic: two calls at the same point returned different values")
    return unstable


def assert_grads(fn: Callable[..., Any], *inputs: Any, **options: Any) -> Report:
    """Like ``check`` but raise ``GradientMismatch`` (an AssertionError) when gradients disagree."""
    __tracebackhide__ = True
    report = check(fn, *inputs, **options)
    if not report.ok:
        raise GradientMismatch(report)
    return report
