"""Plain callables on NumPy arrays or torch tensors, as the batched ExternalSource the engine checks.

The user writes what they have: ``fn(*inputs) -> output(s)`` and their hand-written
``vjp(cotangent, *inputs) -> gradient(s)`` (and optionally ``jvp(tangents, *inputs)``), on NumPy
arrays (when the inputs are NumPy) or torch tensors. No torch autograd is involved: the gradient
checked is exactly the one ``vjp`` returns. ``vectorized=True`` says the callables accept a
leading batch dimension (``fn`` on inputs, ``vjp`` on cotangents, ``jvp`` on tangents), so a whole
batch is one call; otherwise they are called once per batch item.

Outputs: one array, a tuple/list of arrays (named "out0", "out1", ...) or a dict of arrays by name
(identifiers). The cotangent ``vjp`` receives has the same form.
Gradients: one array when there is one input, else a tuple with an entry per input (None for an
input that is not differentiated).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gradcheck_svc.errors import OutputTypeError

__all__ = ["CallableSource"]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise OutputTypeError(f"{what} must be an array or a tensor, got {type(value).__name__}") from exc


class CallableSource:
    """``fn`` / ``vjp`` / ``jvp`` callables seen as an ExternalSource (see engine/external.py)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        vjp: Callable[..., Any],
        inputs: Sequence[Any],
        *,
        jvp: Callable[..., Any] | None = None,
        vectorized: bool = False,
        numpy: bool | None = None,
    ) -> None:
        if not callable(fn) or not callable(vjp) or (jvp is not None and not callable(jvp)):
            raise TypeError("fn, vjp (and jvp when given) must be callable")
        self._fn, self._vjp, self._jvp = fn, vjp, jvp
        self._vectorized = vectorized
        # NumPy in, NumPy to the callables; torch in, torch to them.
        self._numpy = not all(isinstance(x, torch.Tensor) for x in inputs) if numpy is None else numpy
        self._n_inputs = len(inputs)
        self._names: list[str] | None = None

    # ------------------------------------------------------------------ ExternalSource
    @property
    def output_names(self) -> list[str]:
        if self._names is None:
            raise RuntimeError("outputs are known after the first evaluation")
        return self._names

    @property
    def has_jvp(self) -> bool:
        return self._jvp is not None

    def evaluate(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._batched(lambda *xs: self._outputs(self._fn(*xs)), inputs)

    def vjp(
        self, inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], wanted: Sequence[bool]
    ) -> list[torch.Tensor | None]:
        base = [self._out(x) for x in inputs]
        lead = (cotangents[0].shape[0],) if self._vectorized else ()

        def one(*cots: Any) -> list[torch.Tensor]:
            grads = self._per_input(self._vjp(self._pack(cots), *base), "vjp")
            return [
                _as_tensor(g, "a gradient") if w and g is not None else torch.zeros(*lead, *x.shape)
                for g, w, x in zip(grads, wanted, inputs, strict=True)
            ]

        grads = self._batched(one, cotangents)
        return [g.to(x.dtype) if w else None for g, w, x in zip(grads, wanted, inputs, strict=True)]

    def jvp(
        self, inputs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        if self._jvp is None:
            raise RuntimeError("no jvp callable was given")
        jvp = self._jvp
        base = [self._out(x) for x in inputs]
        size = next(t.shape[0] for t in tangents if t is not None)
        full = [
            torch.zeros(size, *x.shape, dtype=x.dtype) if t is None else t
            for t, x in zip(tangents, inputs, strict=True)
        ]
        return self._batched(lambda *ts: self._outputs(jvp(tuple(ts), *base)), full)

    # ------------------------------------------------------------------ helpers
    def _out(self, tensor: torch.Tensor) -> Any:
        """A tensor as the callables want it: NumPy array or torch tensor."""
        return tensor.detach().cpu().numpy() if self._numpy else tensor.detach().clone()

    def _batched(
        self, call: Callable[..., list[torch.Tensor]], batch: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if self._vectorized:
            return call(*(self._out(b) for b in batch))
        rows = [call(*(self._out(b[i]) for b in batch)) for i in range(batch[0].shape[0])]
        return [torch.stack([row[k] for row in rows]) for k in range(len(rows[0]))]

    def _outputs(self, value: Any) -> list[torch.Tensor]:
        if isinstance(value, Mapping):
            names, values = [str(k) for k in value], list(value.values())
        elif isinstance(value, tuple | list):
            names, values = [f"out{k}" for k in range(len(value))], list(value)
        else:
            names, values = ["output"], [value]
        if self._names is None:
            self._names = names
        elif names != self._names:
            raise OutputTypeError(f"fn returned outputs {names}, earlier {self._names}")
        return [_as_tensor(v, "an output of fn") for v in values]

    def _pack(self, parts: Sequence[Any]) -> Any:
        """The cotangent in the shape of fn's result: one array, a tuple, or a dict."""
        names = self.output_names
        if names == ["output"]:
            return parts[0]
        if names == [f"out{k}" for k in range(len(names))]:
            return tuple(parts)
        return dict(zip(names, parts, strict=True))

    def _per_input(self, grads: Any, what: str) -> list[Any]:
        if self._n_inputs == 1 and not isinstance(grads, tuple | list):
            return [grads]
        if not isinstance(grads, tuple | list) or len(grads) != self._n_inputs:
            raise OutputTypeError(f"{what} must return one gradient per input ({self._n_inputs})")
        return list(grads)
