"""A function whose values and derivatives come from outside torch, checked like any other.

A client in another language (or NumPy, JAX, C++ behind a binding) owns ``f`` and its hand-written
vector-Jacobian product. ``external_function(source)`` wraps such a source as a torch function with
a custom ``autograd.Function``: its forward asks the source for values, its backward for the
source's own VJPs, its ``jvp`` for the source's JVPs. The engine then checks it exactly as it
checks a torch function (finite differences with error bars, kinks, nondeterminism, structure,
fast mode), none the wiser.

Batching matters when every evaluation is a round trip: the ``vmap`` rules hand the source a whole
batch of points (or cotangents, or tangents) with a leading batch dimension, so the engine's
batched finite differences and batched VJPs become one request each. Derivatives of the source's
VJP (order 2) do not exist: the backward is not differentiable, and ``check`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import torch

__all__ = ["ExternalSource", "checked_inputs", "external_function"]


class ExternalSource(Protocol):
    """What the engine needs from a function it cannot see into.

    Every call is batched: tensors carry a leading batch dimension B (possibly 1).
    """

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs, in order; ``["output"]`` for a single unnamed output."""
        ...

    @property
    def has_jvp(self) -> bool: ...

    def evaluate(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every input as (B, *shape) -> every output as (B, *shape)."""
        ...

    def vjp(
        self, inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], wanted: Sequence[bool]
    ) -> list[torch.Tensor | None]:
        """At the unbatched ``inputs``: cotangents (B, *output shape) -> (B, *input shape) if wanted."""
        ...

    def jvp(
        self, inputs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """At the unbatched ``inputs``: tangents (B, *input shape) or None (zero) -> (B, *output shape)."""
        ...


def checked_inputs(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """The engine's rule, which both ends of a remote check must share: inputs with requires_grad,
    else every floating or complex input."""
    differentiable = [t.is_floating_point() or t.is_complex() for t in tensors]
    flagged = [d and t.requires_grad for d, t in zip(differentiable, tensors, strict=True)]
    return flagged if any(flagged) else differentiable


def _batched(values: Sequence[Any], dims: Sequence[int | None], size: int) -> list[Any]:
    """Move each batch dimension to the front; repeat unbatched tensors ``size`` times."""
    out = []
    for value, dim in zip(values, dims, strict=True):
        if not isinstance(value, torch.Tensor):
            out.append(value)
        elif dim is None:
            out.append(value.unsqueeze(0).expand(size, *value.shape))
        else:
            out.append(value.movedim(dim, 0))
    return out


def _apply(function: type[torch.autograd.Function]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``function.apply`` typed: torch leaves it unannotated; every Function here returns a tuple."""
    return cast(Callable[..., tuple[torch.Tensor, ...]], function.apply)


class _Evaluate(torch.autograd.Function):
    """y = f(x) from the source; backward and jvp from the source's own products."""

    generate_vmap_rule = False

    @staticmethod
    def forward(source: ExternalSource, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(out.squeeze(0) for out in source.evaluate([x.unsqueeze(0) for x in inputs]))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.source = inputs[0]
        ctx.inputs = [x.detach() for x in inputs[1:]]
        ctx.tangent_inputs = inputs[1:]

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        wanted = tuple(ctx.needs_input_grad[1:])
        grads = _apply(_Vjp)(ctx.source, ctx.inputs, wanted, *cotangents)
        it = iter(grads)
        return (None, *(next(it) if w else None for w in wanted))

    @staticmethod
    def jvp(ctx: Any, _source: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if not ctx.source.has_jvp:
            raise NotImplementedError("the external function has no Jacobian-vector products (jvp)")
        return _apply(_Jvp)(ctx.source, ctx.inputs, *tangents)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], source: ExternalSource, *inputs: torch.Tensor) -> Any:
        outputs = source.evaluate(_batched(inputs, in_dims[1:], info.batch_size))
        return tuple(outputs), tuple(0 for _ in outputs)


class _Vjp(torch.autograd.Function):
    """The source's VJPs for a batch of cotangents (not differentiable: the source gives no more)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(
        source: ExternalSource,
        inputs: list[torch.Tensor],
        wanted: tuple[bool, ...],
        *cotangents: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        grads = source.vjp(inputs, [c.unsqueeze(0) for c in cotangents], wanted)
        return tuple(g.squeeze(0) for g in grads if g is not None)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise RuntimeError("the backward of an external function is not differentiable (order 2)")

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        source: ExternalSource,
        inputs: list[torch.Tensor],
        wanted: tuple[bool, ...],
        *cotangents: torch.Tensor,
    ) -> Any:
        grads = source.vjp(inputs, _batched(cotangents, in_dims[3:], info.batch_size), wanted)
        kept = tuple(g for g in grads if g is not None)
        return kept, tuple(0 for _ in kept)


class _Jvp(torch.autograd.Function):
    """The source's JVPs for a batch of tangents."""

    generate_vmap_rule = False

    @staticmethod
    def forward(
        source: ExternalSource, inputs: list[torch.Tensor], *tangents: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        batch = [None if t is None else t.unsqueeze(0) for t in tangents]
        return tuple(out.squeeze(0) for out in source.jvp(inputs, batch))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        source: ExternalSource,
        inputs: list[torch.Tensor],
        *tangents: Any,
    ) -> Any:
        outputs = source.jvp(inputs, _batched(tangents, in_dims[2:], info.batch_size))
        return tuple(outputs), tuple(0 for _ in outputs)


class ExternalFunction:
    """The callable the engine checks: ``fn(*inputs)`` evaluated by ``source``."""

    def __init__(self, source: ExternalSource, name: str) -> None:
        self.source = source
        self.__name__ = self.__qualname__ = name

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        outputs = _apply(_Evaluate)(self.source, *inputs)
        names = self.source.output_names
        if names == ["output"]:
            return outputs[0]
        return dict(zip(names, outputs, strict=True))


def external_function(source: ExternalSource, name: str = "external") -> ExternalFunction:
    """Wrap ``source`` as a function ``check`` accepts (its name labels the report)."""
    return ExternalFunction(source, name)
