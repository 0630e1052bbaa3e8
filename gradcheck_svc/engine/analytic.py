"""Analytic Jacobians from autograd: reverse-mode rows, columns, forward-mode columns.

Each quantity is tried with ``torch.func`` + vmap first (one batched call),
then with ``torch.autograd.grad(is_grads_batched=True)``, then with a plain
loop, because user code (old-style autograd.Function, ``.item()``, numpy in a
backward) supports the first two only sometimes. The path that worked is kept
for the rest of the check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import torch
from torch.autograd import forward_ad

from gradcheck_svc.engine.agreement import within
from gradcheck_svc.engine.evaluate import describe as _describe
from gradcheck_svc.engine.evaluate import why_not_batched
from gradcheck_svc.engine.problem import Problem
from gradcheck_svc.errors import BackwardNotDifferentiableError, CheckError, FunctionRaisedError

__all__ = ["Analytic", "func_vjp"]

_T = TypeVar("_T")

# The engine behind torch.autograd.grad (retain_graph, create_graph, inputs, allow_unused, accumulate).
_run_backward = torch.autograd.Variable._execution_engine.run_backward
_FEW_ROWS = 4
_PROBE_ROWS = 3  # rows of the first batched result recomputed one at a time, to trust the batching


def func_vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., tuple[torch.Tensor, ...]]]:
    """``torch.func.vjp`` without ``has_aux``: torch types its result as a 2- or 3-tuple."""
    return cast(tuple[Any, Callable[..., tuple[torch.Tensor, ...]]], torch.func.vjp(fn, *primals))


def _float64_values(g: torch.Tensor) -> torch.Tensor:
    """``g.detach().to(torch.float64)``, without the two ops where ``g`` is that already."""
    if g.requires_grad or g.dtype != torch.float64:
        return g.detach().to(torch.float64)
    return g


def _flat(g: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """A gradient as ``(*batch, n)``: one with respect to a leaf in its own shape (the first
    call's graph inputs) comes in that shape."""
    return g if g.dim() == len(batch) + 1 else g.reshape(*batch, -1)


def _values(g: torch.Tensor) -> list[float]:
    """A flat gradient's elements; autograd may return a zero tensor without storage to read."""
    return [0.0] * g.numel() if g._is_zerotensor() else g.tolist()


def _hint(exc: BaseException) -> str:
    """Why autograd refused a graph the check runs more than once, where its message says so."""
    if "modified by an inplace operation" in str(exc):
        return (
            " (the check runs the backward several times on one graph: a tensor it saved was "
            "written in place after the forward, by the backward itself or by a later call of fn)"
        )
    return ""


class Analytic:
    """Autograd side of a check for one problem (one evaluation point)."""

    def __init__(self, problem: Problem, on_note: Callable[[str], None]) -> None:
        self.problem = problem
        self._note = on_note
        self._paths = ["func", "batched", "loop"]
        self._batching_verified = False
        self._vjp_fn: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self._graph: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._onehot: list[torch.Tensor] = []  # cotangents of ``few_rows``
        # fn's value from each forward the analytic side ran: a free second evaluation at the
        # point, compared with the first to detect a nondeterministic forward.
        self.forward_values: list[torch.Tensor] = []

    def adopt_graph(
        self, y: torch.Tensor, reals: list[torch.Tensor], root: torch.Tensor | None = None
    ) -> None:
        """Reuse the graph of a forward already made with autograd on (the check's first call):
        ``y`` flat, or its ``root`` when that is fn's lone output in its own shape."""
        if y.requires_grad:
            self._graph = (y if root is None else root, reals)

    # ------------------------------------------------------------------ helpers
    def _func_vjp(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        if self._vjp_fn is None:
            value, self._vjp_fn = func_vjp(self.problem.flat, *self.problem.base_reals())
            self.forward_values.append(value.detach())
        return self._vjp_fn

    def _autograd_graph(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._graph is None:
            reals = [r.detach().clone().requires_grad_(True) for r in self.problem.base_reals()]
            with torch.enable_grad():
                y = self.problem.flat(*reals)
            if not y.requires_grad:
                # Detached outputs have a zero autograd Jacobian: that is the analytic answer to compare.
                self._note("fn's output does not require grad (detached or computed outside autograd)")
                y = y + 0 * sum(r.sum() for r in reals)
            self._graph = (y, reals)
            self.forward_values.append(y.detach())
        return self._graph

    def _grads(
        self, y: torch.Tensor, reals: list[torch.Tensor], cotangent: torch.Tensor, batched: bool
    ) -> list[torch.Tensor]:
        shape = (cotangent.shape[0],) if batched else ()
        cotangent = cotangent.clone()  # the backward's to keep: one may write into its grad_output
        if y.dim() != 1:  # a root in fn's own output shape
            cotangent = cotangent.reshape((*shape, *y.shape))
        if batched or y.device.type != "cpu" or type(y) is not torch.Tensor:
            grads = torch.autograd.grad(
                y, reals, cotangent, retain_graph=True, allow_unused=True, is_grads_batched=batched
            )
        else:  # autograd.grad's checks of arguments made here cost a quarter of a small backward
            grads = _run_backward((y,), (cotangent,), True, False, tuple(reals), True, False)
        return [
            torch.zeros(*shape, r.numel(), dtype=r.dtype, device=r.device) if g is None else _flat(g, shape)
            for g, r in zip(grads, reals, strict=True)
        ]

    def _run(self, name: str, attempts: Mapping[str, Callable[[], _T]]) -> _T:
        """Try the remaining paths in order; drop the ones that fail for good."""
        last: BaseException | None = None
        for path in list(self._paths):
            if path not in attempts:
                continue
            try:
                return attempts[path]()
            except (CheckError, torch.cuda.OutOfMemoryError):
                raise
            except Exception as exc:
                last = exc
                if path != "loop":
                    self._paths.remove(path)
                    how = "torch.func" if path == "func" else "batched autograd.grad"
                    self._note(f"{name} computed without {how}, which cannot run fn ({why_not_batched(exc)})")
        cause = "no path could run" if last is None else _describe(last) + _hint(last)
        raise FunctionRaisedError(f"backward raised while computing {name}: {cause}") from last

    # ------------------------------------------------------------------ rows
    def rows(self, cotangents: torch.Tensor) -> list[torch.Tensor]:
        """``J^T c`` for each row ``c`` of ``cotangents (R, M)``: one ``(R, n_i)`` float64 tensor per leaf."""

        def func() -> list[torch.Tensor]:
            # A copy: a backward may write into its grad_output, and callers reuse their cotangents.
            grads: tuple[torch.Tensor, ...] = torch.vmap(self._func_vjp())(cotangents.clone())
            return list(grads)

        def batched() -> list[torch.Tensor]:
            y, reals = self._autograd_graph()
            return self._grads(y, reals, cotangents, batched=True)

        def loop() -> list[torch.Tensor]:
            y, reals = self._autograd_graph()
            rows = [self._grads(y, reals, c, batched=False) for c in cotangents]
            return [torch.stack([row[i] for row in rows]) for i in range(len(reals))]

        attempts = {"func": func, "batched": batched, "loop": loop}
        if cotangents.shape[0] <= _FEW_ROWS and "func" in self._paths:
            # A handful of backward calls costs less than setting up a vmap over them.
            attempts = {"loop": loop}
        result = self._run("reverse-mode rows", attempts)
        if len(attempts) > 1 and self._paths[0] != "loop" and not self._batching_verified:
            self._batching_verified = True
            if not self._batching_agrees(cotangents, result):
                self._paths = ["loop"]
                self._note(
                    "torch.vmap's batched backward disagrees with fn's own backward here (a torch "
                    "batching rule); the backward is run one row at a time"
                )
                result = loop()
        return [_float64_values(g) for g in result]

    def few_rows(self, m: int, scale: float = 1.0) -> list[list[list[float]]] | None:
        """``rows`` of the identity's ``m`` rows as Python floats, ``(n_i, m)`` per leaf (the
        transposed Jacobian), for a problem of a handful of rows: the plain backward calls ``rows``
        makes there, without tensors to stack and read back (a float of any dtype reads back as
        its float64 value, as ``rows`` converts it). None where ``rows`` would batch them.
        ``scale`` (a power of two) multiplies the cotangents and divides the results."""
        if m > _FEW_ROWS or ("func" not in self._paths and self._paths != ["loop"]):
            return None
        try:
            y, reals = self._autograd_graph()
            if len(self._onehot) != m:  # the rows of the identity, made once per check
                eye = torch.eye(m, dtype=torch.float64, device=y.device)
                self._onehot = list(eye.unbind()) if m > 1 else [eye.reshape(1)]
            cotangents = self._onehot if scale == 1.0 else [c * scale for c in self._onehot]
            per_row = [self._grads(y, reals, c, batched=False) for c in cotangents]
        except (CheckError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:  # as ``_run`` words the loop's failure
            raise FunctionRaisedError(
                f"backward raised while computing reverse-mode rows: {_describe(exc)}{_hint(exc)}"
            ) from exc
        values = [[_values(g) for g in row] for row in per_row]  # [row][leaf] -> (n_i,)
        if scale != 1.0:
            values = [[[v / scale for v in leaf] for leaf in row] for row in values]
        if m == 1:
            return [[[v] for v in leaf] for leaf in values[0]]
        return [[list(column) for column in zip(*leaf, strict=True)] for leaf in zip(*values, strict=True)]

    def _batching_agrees(self, cotangents: torch.Tensor, batched: list[torch.Tensor]) -> bool:
        """Recompute a few rows with plain autograd, the backward training runs, and compare.

        vmap runs a backward through batching rules, and torch has had wrong ones (``cdist``):
        the check must judge the backward a user's training calls, not a batched stand-in.
        """
        count = cotangents.shape[0]
        picked = sorted({round(k * (count - 1) / max(1, _PROBE_ROWS - 1)) for k in range(_PROBE_ROWS)})
        y, reals = self._autograd_graph()
        for row in picked:
            single = self._grads(y, reals, cotangents[row], batched=False)
            for leaf, a, b in zip(self.problem.leaves, single, batched, strict=True):
                b = b[row]
                if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b):
                    continue  # the usual answer, in one op (NaN is unequal: it goes on below)
                a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
                eps = torch.finfo(leaf.real_dtype).eps
                scale = (
                    float(
                        torch.maximum(a.abs(), b.abs()).nan_to_num(nan=0.0, posinf=0.0).max(),
                    )
                    if a.numel()
                    else 0.0
                )
                allowed = min(2.0**16 * eps, 1e-2) * scale + torch.finfo(torch.float64).tiny
                if not within(a, b, allowed):
                    return False
        return True

    # ------------------------------------------------------------------ columns (reverse over reverse)
    def columns(self, index: int, directions: torch.Tensor) -> torch.Tensor:
        """``J u`` for rows ``u`` of ``directions (C, n_index)``, from the backward (vjp of the vjp)."""
        m = self.problem.n_outputs
        leaves = self.problem.leaves

        def func() -> torch.Tensor:
            vjp_fn = self._func_vjp()
            probe = torch.zeros(m, dtype=torch.float64, device=directions.device)
            _, vjp_of_vjp = func_vjp(vjp_fn, probe)
            zeros = [
                torch.zeros(leaf.size, dtype=leaf.real_dtype, device=directions.device) for leaf in leaves
            ]

            def column(u: torch.Tensor) -> torch.Tensor:
                cotangent = tuple(u if i == index else z for i, z in enumerate(zeros))
                return vjp_of_vjp(cotangent)[0]

            columns: torch.Tensor = torch.vmap(column)(directions.to(leaves[index].real_dtype))
            return columns

        def autograd_path(batched: bool) -> torch.Tensor:
            y, reals = self._autograd_graph()
            probe = torch.zeros(m, dtype=y.dtype, device=y.device, requires_grad=True)
            with torch.enable_grad():
                shaped = probe if y.dim() == 1 else probe.reshape(y.shape)
                (g,) = torch.autograd.grad(y, [reals[index]], shaped, create_graph=True, allow_unused=True)
            if g is None:
                return torch.zeros(directions.shape[0], m, dtype=torch.float64, device=y.device)
            g = _flat(g, ())
            if not g.requires_grad:
                raise BackwardNotDifferentiableError(
                    "the backward of fn is not differentiable (it detaches or leaves autograd), so the "
                    "Jacobian cannot be streamed by columns; use mode='fast' or a smaller input"
                )
            u = directions.to(g.dtype)
            if batched:
                (cols,) = torch.autograd.grad(g, probe, u, retain_graph=True, is_grads_batched=True)
                return cols
            return torch.stack([torch.autograd.grad(g, probe, row, retain_graph=True)[0] for row in u])

        result = self._run(
            "reverse-mode columns",
            {"func": func, "batched": lambda: autograd_path(True), "loop": lambda: autograd_path(False)},
        )
        return result.detach().to(torch.float64)

    # ------------------------------------------------------------------ forward mode
    def jvp_columns(self, index: int, directions: torch.Tensor) -> torch.Tensor:
        """``J u`` from forward-mode AD (jvp) for rows ``u`` of ``directions (C, n_index)``."""
        base = self.problem.leaves[index].real
        problem = self.problem

        def one_func(u: torch.Tensor) -> torch.Tensor:
            tangent: torch.Tensor = torch.func.jvp(lambda r: problem.flat_replace(index, r), (base,), (u,))[1]
            return tangent

        def func() -> torch.Tensor:
            columns: torch.Tensor = torch.vmap(one_func)(directions.to(base.dtype))
            return columns

        def loop() -> torch.Tensor:
            cols = []
            for u in directions.to(base.dtype):
                with forward_ad.dual_level():
                    dual = forward_ad.make_dual(base.detach(), u)  # type: ignore[no-untyped-call]  # untyped in torch
                    y = problem.flat_replace(index, dual)
                    tangent = forward_ad.unpack_dual(y).tangent  # type: ignore[no-untyped-call]  # untyped in torch
                cols.append(torch.zeros_like(y) if tangent is None else tangent)
            return torch.stack(cols)

        try:
            with torch.no_grad():
                result = func()
        except Exception as exc:
            try:
                with torch.no_grad():
                    result = loop()
            except Exception as exc2:
                raise FunctionRaisedError(
                    f"forward-mode AD failed: {_describe(exc2)} (vmap path: {_describe(exc)}); "
                    "a custom autograd.Function needs a jvp staticmethod for forward_ad=True"
                ) from exc2
        return result.detach().to(torch.float64)
