"""Where a check runs, and the CPU-vs-CUDA comparison of the analytic side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gradcheck_svc.engine.analytic import Analytic
from gradcheck_svc.engine.problem import Problem, build_problem
from gradcheck_svc.errors import DeviceUnavailableError
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.report import Check, PairReport, Status

__all__ = ["compare_devices", "resolve_device"]


def resolve_device(requested: str | None, inputs: Sequence[Any]) -> torch.device | None:
    """None keeps the inputs where they are; "auto" prefers CUDA; "cuda" must exist."""
    if requested is None:
        return None
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "device='cuda' was asked for but CUDA is not available here "
            f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}); "
            "use device='auto' to fall back to the CPU"
        )
    return torch.device(requested)


def _jacobian(
    fn: Any,
    inputs: Sequence[Any],
    kwargs: dict[str, Any],
    names: Sequence[str] | None,
    options: CheckOptions,
    device: torch.device,
) -> tuple[Problem, list[torch.Tensor]]:
    problem, _ = build_problem(fn, inputs, kwargs, input_names=names, device=device, upcast=options.upcast)
    analytic = Analytic(problem, lambda _: None)
    m = problem.n_outputs
    eye = torch.eye(m, dtype=torch.float64, device=device)
    rows = analytic.rows(eye)
    return problem, [r.cpu() for r in rows]


def compare_devices(
    fn: Any,
    inputs: Sequence[Any],
    kwargs: dict[str, Any],
    names: Sequence[str] | None,
    options: CheckOptions,
) -> PairReport:
    """Largest difference between the reverse-mode Jacobians computed on CPU and on CUDA."""
    if not torch.cuda.is_available():
        raise DeviceUnavailableError("compare_devices=True needs CUDA, which is not available here")
    if isinstance(fn, torch.nn.Module):
        fn_cpu, fn_cuda = fn.to("cpu"), fn
    else:
        fn_cpu = fn_cuda = fn
    cpu_inputs = pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, list(inputs))
    problem, cpu_rows = _jacobian(fn_cpu, cpu_inputs, kwargs, names, options, torch.device("cpu"))
    if isinstance(fn, torch.nn.Module):
        fn_cuda = fn.to("cuda")
    _, cuda_rows = _jacobian(fn_cuda, inputs, kwargs, names, options, torch.device("cuda"))
    worst = 0.0
    scale = 0.0
    for a, b in zip(cpu_rows, cuda_rows, strict=True):
        if a.numel():
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
    tolerance = (options.rtol if options.rtol is not None else 1e-4) * max(scale, 1e-30)
    ok = worst <= max(tolerance, options.nondet_tol)
    leaf = problem.leaves[0]
    return PairReport(
        output="outputs",
        input="inputs",
        check=Check.DEVICES,
        status=Status.PASS if ok else Status.FAIL,
        mode="full",
        output_shape=[problem.n_outputs],
        input_shape=[problem.n_inputs],
        dtype=leaf.dtype_name,
        max_abs_error=worst,
        max_rel_error=worst / scale if scale else 0.0,
        max_error_ratio=worst / tolerance if tolerance else 0.0,
        message=f"largest |J_cpu - J_cuda| = {worst:.3e} (Jacobian scale {scale:.3e})",
    )
