"""Public entry points of the engine: ``check`` and ``assert_grads``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.devices import compare_devices, resolve_device
from gradcheck_svc.engine.fast import run_fast
from gradcheck_svc.engine.full import run_full
from gradcheck_svc.engine.problem import build_problem
from gradcheck_svc.engine.progress import Progress, ProgressFn
from gradcheck_svc.engine.second_order import second_order_problem
from gradcheck_svc.engine.taylor import run_taylor
from gradcheck_svc.errors import GradientMismatch, NotCallableError
from gradcheck_svc.options import CheckOptions, resolve_options
from gradcheck_svc.report import Report, Status

__all__ = ["assert_grads", "check"]


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
    deadline: float | None = None,
    cancelled: Callable[[], bool] | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> Report:
    """Compare the autograd gradients of ``fn`` at ``inputs`` with error-bounded finite differences.

    Returns a ``Report``; a mismatch does not raise (see ``assert_grads``). ``fn_kwargs`` reach
    ``fn`` unchanged; ``input_names`` names the positional inputs in the report. ``deadline``
    (a ``time.monotonic()`` value) and ``cancelled`` are polled between chunks; ``progress(done,
    total)`` hears of finite-difference columns done between chunks. Every other keyword is an
    option of ``CheckOptions``.
    """
    started = time.perf_counter()
    opts: CheckOptions = resolve_options(**options)
    if not callable(fn):
        raise NotCallableError(
            f"fn must be callable (a function, an nn.Module, ...), got {type(fn).__name__}"
        )
    device = resolve_device(opts.device, inputs)
    problem, _ = build_problem(
        fn, inputs, dict(fn_kwargs or {}), input_names=input_names, device=device, upcast=opts.upcast
    )
    if opts.order == 2:
        problem = second_order_problem(problem, seed=opts.seed)
    ctx = Context(problem, opts, deadline=deadline, cancelled=cancelled)

    if not bool(torch.isfinite(ctx.f0).all()):
        ctx.note("fn's value is NaN or infinite at this point: affected elements cannot be checked")

    entries = problem.n_outputs * problem.n_inputs
    mode = opts.mode if opts.mode != "auto" else ("full" if entries <= opts.fast_threshold else "fast")
    if progress is not None:
        columns = sum(leaf.size for leaf in problem.leaves)
        total = columns if mode == "full" else opts.projections * len(problem.leaves)
        ctx.progress = Progress(progress, 0 if opts.scheme == "taylor" else total)
    if opts.scheme == "taylor":
        pairs = run_taylor(ctx)
        mode = "taylor"
    elif mode == "full":
        pairs = [a.report() for a in run_full(ctx).values()]
    else:
        pairs = run_fast(ctx)
    forward_nondeterministic = _forward_is_nondeterministic(ctx)
    if opts.compare_devices:
        pairs.append(compare_devices(fn, inputs, dict(fn_kwargs or {}), input_names, opts))
    if forward_nondeterministic:
        for pair in pairs:
            pair.status = Status.NONDETERMINISTIC
            pair.message = "fn returned different values for the same input"
    pairs.sort(key=lambda p: (p.check.value != "reverse", p.output, p.input))

    if ctx.progress is not None:
        ctx.progress.finish()
    ctx.timings["total_s"] = time.perf_counter() - started
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


def _resolved_options(opts: CheckOptions, ctx: Context) -> dict[str, object]:
    """The options set, plus the relative finite-difference step each leaf used."""
    resolved: dict[str, object] = opts.model_dump(exclude_defaults=True)
    steps = [ctx.eps(leaf) for leaf in ctx.problem.leaves]
    resolved["eps"] = steps[0] if len(set(steps)) == 1 else steps
    return resolved


def _forward_is_nondeterministic(ctx: Context) -> bool:
    """Compare f(x) from the first evaluation with the analytic side's own forward passes."""
    values = ctx.analytic.forward_values or [ctx.evaluator.base()]
    f0 = ctx.f0
    # With autograd on, a library may pick another kernel and round differently: a few ulps
    # are not nondeterminism (and smaller noise shows up in the error bars anyway).
    scale = f0.abs().nan_to_num(nan=0.0, posinf=0.0)
    allowed = 64 * ctx.machine_eps * (scale + (scale.max() if scale.numel() else 0.0))
    for again in values:
        same = ((again - f0).abs() <= allowed) | (again == f0) | (again.isnan() & f0.isnan())
        if not bool(same.all()):
            ctx.note("fn is not deterministic: two calls at the same point returned different values")
            return True
    return False


def assert_grads(fn: Callable[..., Any], *inputs: Any, **options: Any) -> Report:
    """Like ``check`` but raise ``GradientMismatch`` (an AssertionError) when gradients disagree."""
    __tracebackhide__ = True
    report = check(fn, *inputs, **options)
    if not report.ok:
        raise GradientMismatch(report)
    return report
