"""What is being checked: the function, its differentiable leaves and outputs, flattened.

The engine sees every check as a map between flat real vectors
``F(r_0, ..., r_{L-1}) -> y`` where each ``r_i`` is the real view of one
differentiable leaf (a complex tensor contributes its real and imaginary parts)
and ``y`` concatenates the real views of every floating/complex output, in
float64 (the subtraction of two float32 values is exact in float64, so finite
differences lose nothing to the upcast).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils import _pytree as pytree

from gradcheck_svc.engine.agreement import all_finite, same_contents
from gradcheck_svc.errors import (
    FunctionRaisedError,
    InvalidOptionError,
    NothingToCheckError,
    OutputTypeError,
    UnsupportedTensorError,
)

__all__ = ["Leaf", "OutputBlock", "Problem", "build_problem", "flat_index"]

_LISTED = 3  # elements named one by one in notes about an input


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _index(entry: pytree.KeyEntry) -> int:
    """The position a list entry of a pytree path names (torch types path entries only as KeyEntry)."""
    return cast(pytree.SequenceKey[Any], entry).idx


def _flat_real(t: torch.Tensor) -> torch.Tensor:
    """An output as a flat float64 vector; a complex output as (re, im) pairs.

    ``stack`` rather than ``view_as_real``: the latter refuses conjugate views (``fft.ifft``),
    and its backward views our cotangent as complex, which fails when the cotangent row sits
    at an odd storage offset (a complex output after an odd-sized real one).
    """
    if t.is_complex():
        t = torch.stack((t.real, t.imag), dim=-1)
    flat = t if t.dim() == 1 else t.reshape(-1)
    return flat if flat.dtype == torch.float64 else flat.to(torch.float64)


@dataclass
class Leaf:
    """One differentiable input tensor (or module parameter), seen as a flat real vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the tensor's own dtype (complex64 for a complex leaf)
    value: torch.Tensor  # detached, on the check's device, in the check's dtype
    offset: int = 0  # first column of this leaf in the concatenated input vector

    @property
    def is_complex(self) -> bool:
        return self.dtype.is_complex

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def real_dtype(self) -> torch.dtype:
        return self.value.real.dtype if self.is_complex else self.dtype

    @functools.cached_property
    def real(self) -> torch.Tensor:
        """Flat real view: (numel,) or (2 * numel,) for complex leaves (made once: a check asks
        for it at every evaluation)."""
        if self.is_complex:
            return torch.view_as_real(self.value.contiguous()).reshape(-1)
        return self.value.reshape(-1)

    @functools.cached_property
    def size(self) -> int:
        """Elements of ``real`` (the value is fixed: asked often, counted once)."""
        return self.value.numel() * (2 if self.is_complex else 1)

    @functools.cached_property
    def all_finite(self) -> bool:
        """Whether every element is finite (asked by several steps of a check; the value is fixed)."""
        return all_finite(self.real)

    def finite_positions(self) -> torch.Tensor:
        """Positions of ``real`` that can be perturbed: +-inf and NaN have no finite step."""
        if self.all_finite:
            return torch.arange(self.size, device=self.value.device)
        return torch.isfinite(self.real).nonzero().squeeze(1)

    def nonfinite_elements(self) -> tuple[list[tuple[list[int], str, float]], int]:
        """Up to a few non-finite elements as (index, part, value), and how many there are."""
        bad = (~torch.isfinite(self.real)).nonzero().squeeze(1)
        shown = []
        for position in bad[:_LISTED].tolist():
            index, part = flat_index(position, self.shape, self.is_complex)
            shown.append((index, part, float(self.real[position])))
        return shown, bad.numel()

    @functools.cached_property
    def layout(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """How the user's tensor lies in memory when it is a dense permutation of row-major
        (a transposed view, channels-last): the order of its dims by stride and the inverse;
        None for a contiguous tensor (or one with gaps or overlaps, which fn gets contiguous).

        fn gets its inputs in this layout at every call, as the user passes them: a backward
        that reads strides (or assumes contiguity) is wrong only there."""
        value = self.value
        if value.dim() < 2 or value.is_contiguous():
            return None
        strides = value.stride()
        order = tuple(sorted(range(value.dim()), key=lambda d: -strides[d]))
        if not value.permute(order).is_contiguous():
            return None
        inverse = tuple(sorted(range(value.dim()), key=lambda d: order[d]))
        return order, inverse

    def graph_input(self) -> torch.Tensor:
        """A fresh copy to differentiate with respect to: a real leaf in its own shape and
        layout, so that no view separates it from fn in the graph (the backward of a view costs
        as much as a small op's); a complex leaf as its flat real view (fn gets ``from_real``)."""
        if self.is_complex:
            return self.real.detach().clone().requires_grad_(True)
        if self.layout is not None:
            return self.value.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        return self.value.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)

    @functools.cached_property
    def as_called(self) -> torch.Tensor:
        """The leaf in its own shape as ``Problem.flat`` passes it unperturbed (made once)."""
        return self.from_real(self.real)

    def fresh(self, values: list[float]) -> torch.Tensor:
        """A new tensor of a real leaf's shape holding ``values`` (its flat real elements): what
        ``from_real`` makes of a fresh row, without the row."""
        real = self.real
        if not self.shape:
            return torch.scalar_tensor(values[0], dtype=real.dtype, device=real.device)
        made = torch.tensor(values, dtype=real.dtype, device=real.device)
        return made if len(self.shape) == 1 else made.reshape(self.shape)

    def from_real(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of ``real``, in the user's ``layout``; differentiable and vmap-friendly."""
        value = (
            torch.view_as_complex(flat.reshape(*self.shape, 2))
            if self.is_complex
            else flat.reshape(self.shape)
        )
        if self.layout is None:
            return value
        order, inverse = self.layout
        return value.permute(order).contiguous().permute(inverse)


@dataclass
class OutputBlock:
    """One checked output tensor: its rows in the concatenated output vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    size: int

    @property
    def is_complex(self) -> bool:
        return self.dtype.is_complex

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.size)


def flat_index(position: int, shape: Sequence[int], is_complex: bool) -> tuple[list[int], str]:
    """Multi-index (and "re"/"im" part for complex tensors) of a flat real position."""
    part = ""
    if is_complex:
        position, part = divmod(position, 2)[0], ("re", "im")[position % 2]
    index: list[int] = []
    for dim in reversed(list(shape)):
        position, rem = divmod(position, dim) if dim else (position, 0)
        index.append(rem)
    return list(reversed(index)), part


@dataclass
class Problem:
    """A function with its leaves fixed: ``flat(reals) -> y`` plus naming."""

    fn: Callable[..., Any]
    leaves: list[Leaf]
    outputs: list[OutputBlock] = field(default_factory=list)
    # How to rebuild the call from leaf values: a pytree of (args, params) with slots.
    _spec: Any = None
    _template: list[Any] = field(default_factory=list)
    _slots: list[int] = field(default_factory=list)
    _kwargs: dict[str, Any] = field(default_factory=dict)
    # (flat output, graph inputs) of the first call, made with autograd on (a real leaf's input in
    # its own shape, a complex one's flat: see ``Leaf.graph_input``); None for derived problems.
    first_call: tuple[torch.Tensor, list[torch.Tensor]] | None = None
    # fn's lone float64 output of the first call in its own shape, where the flat output views it:
    # the backward starts there, with no view node to run back through.
    first_root: torch.Tensor | None = None
    # Per floating/complex output tensor, whether it is checked: outputs autograd marks
    # non-differentiable are not (None: all are). Names of the skipped ones, for the report.
    kept_outputs: list[bool] | None = None
    skipped_outputs: list[str] = field(default_factory=list)
    # Every input a pytree leaf and fn no module: the call's arguments are the template itself,
    # rebuilt without the pytree (a check calls fn a few times; each unflatten costs a dozen us).
    flat_arguments: bool = False
    # (name, slot in the template, version) of every tensor fn is called with as given (inputs,
    # module parameters and buffers) before the first call: a version that moves names an input
    # fn writes into.
    watched: list[tuple[str, int, int]] = field(default_factory=list)

    def written_inputs(self) -> list[str]:
        """Names of the inputs (or module buffers) fn has written into in place since the problem
        was built: every later call then sees the value the previous one left there."""
        return [name for name, slot, version in self.watched if _version(self._template[slot]) != version]

    def inputs_a_call_writes(self) -> list[str]:
        """Names of the inputs one more call of fn changes, on copies: writes the version counter
        does not see (through ``.data``, numpy, ``torch.no_grad``) included. A diagnosis for a
        check that found fn's values changing from call to call: it costs a call and a copy."""
        copies = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in self._template]
        before = {slot: copies[slot].clone() for _, slot, _ in self.watched}
        try:
            with torch.no_grad():
                self._call_flat(copies)
        except Exception:  # fn's own error was reported where it happened; nothing more to learn
            return []
        return [name for name, slot, _ in self.watched if not same_contents(before[slot], copies[slot])]

    @functools.cached_property
    def n_inputs(self) -> int:
        """Input elements in all (the leaves are fixed once the problem is built)."""
        return sum(leaf.size for leaf in self.leaves)

    @property
    def n_outputs(self) -> int:
        return sum(out.size for out in self.outputs)

    def call(self, values: Sequence[torch.Tensor]) -> Any:
        """Call fn with leaf tensors replaced by ``values`` (tensors in their own shape)."""
        flat = list(self._template)
        for slot, value in zip(self._slots, values, strict=True):
            flat[slot] = value
        return self._call_flat(flat)

    def _call_flat(self, flat: list[Any]) -> Any:
        """Call fn with every argument (and module parameter or buffer) from ``flat``."""
        if self.flat_arguments:
            return self.fn(*flat, **self._kwargs)
        args, params = pytree.tree_unflatten(flat, self._spec)
        if isinstance(self.fn, torch.nn.Module):
            return torch.func.functional_call(self.fn, params, tuple(args), self._kwargs)
        return self.fn(*args, **self._kwargs)

    def flat(self, *reals: torch.Tensor) -> torch.Tensor:
        """F(r_0, ..., r_{L-1}) -> concatenated real view of the outputs, float64."""
        values = [leaf.from_real(r) for leaf, r in zip(self.leaves, reals, strict=True)]
        return self.flatten_output(self.call(values))

    def flatten_output(self, out: Any) -> torch.Tensor:
        """The checked output tensors of one call as one flat float64 vector."""
        if self.kept_outputs is None and isinstance(out, torch.Tensor) and _differentiable(out):
            if len(self.outputs) == 1 and (
                out.shape != self.outputs[0].shape or out.dtype != self.outputs[0].dtype
            ):
                self._changed_outputs([out])
            return _flat_real(out)  # one tensor: no tree to walk, nothing to join
        found = [out] if isinstance(out, torch.Tensor) else pytree.tree_leaves(out)
        tensors = [t for t in found if _differentiable(t)]
        if self.kept_outputs is not None:
            if len(tensors) != len(self.kept_outputs):
                self._changed_outputs(tensors)
            tensors = [t for t, kept in zip(tensors, self.kept_outputs, strict=True) if kept]
        if self.outputs and (
            len(tensors) != len(self.outputs)
            or any(
                t.shape != b.shape or t.dtype != b.dtype for t, b in zip(tensors, self.outputs, strict=True)
            )
        ):
            self._changed_outputs(tensors)
        parts = [_flat_real(t) for t in tensors]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _changed_outputs(self, tensors: Sequence[torch.Tensor]) -> None:
        """fn returned other output tensors than at the first call: no Jacobian relates the two."""

        def described(shapes: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
            return ", ".join(f"{list(shape)} {str(dtype).removeprefix('torch.')}" for shape, dtype in shapes)

        first = described([(b.shape, b.dtype) for b in self.outputs])
        now = described([(tuple(t.shape), t.dtype) for t in tensors])
        raise OutputTypeError(
            f"fn's outputs changed between calls: {now or 'none'} here, {first} at the first call; "
            "fn must return tensors of the same shapes and dtypes at every point near the input"
        )

    def call_replaced(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """``flat_replace`` with leaf ``index`` given in its own shape: the flat outputs."""
        values = [value if k == index else leaf.as_called for k, leaf in enumerate(self.leaves)]
        return self.flatten_output(self.call(values))

    def flat_replace(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """``flat`` with only leaf ``index`` replaced by a real vector (for vmap over one leaf);
        the other leaves go as ``as_called`` (their views made once, not at every evaluation)."""
        return self.call_replaced(index, self.leaves[index].from_real(value))

    def base_reals(self) -> list[torch.Tensor]:
        return [leaf.real for leaf in self.leaves]


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write); -1 where torch keeps none."""
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return -1


def _output_name(out: Any, path: Any) -> str:
    return "output" if isinstance(out, torch.Tensor) else "output" + pytree.keystr(path)


def _paths(out: Any) -> list[tuple[Any, Any]]:
    """The output's leaves with their pytree paths (a lone tensor without walking a tree)."""
    if isinstance(out, torch.Tensor):
        return [((), out)]
    return pytree.tree_flatten_with_path(out)[0]


def _select_outputs(problem: Problem, out: Any) -> None:
    """Skip outputs autograd marks non-differentiable, as torch.autograd.gradcheck does.

    ``native_layer_norm``'s mean and rstd, ``ctx.mark_non_differentiable`` outputs: they carry no
    gradient by design. Only when some output does require grad: if none does, every output is
    kept and its (zero) autograd Jacobian is compared, which catches a forgotten graph.
    """
    paths = [(p, t) for p, t in _paths(out) if _differentiable(t)]
    kept = [t.requires_grad for _, t in paths]
    if any(kept) and not all(kept):
        problem.kept_outputs = kept
        problem.skipped_outputs = [
            _output_name(out, p) for (p, _), k in zip(paths, kept, strict=True) if not k
        ]


def _output_blocks(out: Any, kept: list[bool] | None) -> list[OutputBlock]:
    paths = _paths(out)
    blocks: list[OutputBlock] = []
    offset = 0
    position = -1
    for path, t in paths:
        if not _differentiable(t):
            continue
        position += 1
        if kept is not None and not kept[position]:
            continue
        name = _output_name(out, path)
        _require_strided(t, name)
        size = t.numel() * (2 if t.is_complex() else 1)
        blocks.append(OutputBlock(name, tuple(t.shape), t.dtype, offset, size))
        offset += size
    if not blocks:
        kinds = sorted({type(t).__name__ for _, t in paths}) or [type(out).__name__]
        raise OutputTypeError(
            f"fn returned no floating-point or complex tensor (got {', '.join(kinds)}); "
            "return the tensor(s) whose gradients should be checked"
        )
    return blocks


def _require_strided(t: torch.Tensor, what: str) -> None:
    """Finite differences perturb a dense tensor element by element: a sparse layout has no such
    elements to move (its zeros are structural), so say so instead of failing inside torch."""
    if t.layout != torch.strided:
        raise UnsupportedTensorError(
            f"{what} is a {str(t.layout).removeprefix('torch.')} tensor; gradients are checked on "
            "dense (strided) tensors: pass t.to_dense() and convert inside fn"
        )


ALL_PARAMETERS = "parameters"  # a ``wrt`` entry naming every parameter of an nn.Module


class _Selection:
    """``wrt``: names or paths of the tensors to check. A name selects that tensor and every
    tensor below it (``inputs[1]`` selects ``inputs[1]['scale']``, ``layer`` selects
    ``layer.weight``); an int is a positional input; ``"parameters"`` is every module parameter."""

    def __init__(self, wrt: Sequence[str | int], heads: Sequence[str]) -> None:
        self.entries: list[str] = []
        for entry in wrt:
            if isinstance(entry, int):
                if not -len(heads) <= entry < len(heads):
                    raise InvalidOptionError(f"wrt={entry}: there are only {len(heads)} positional inputs")
                entry = heads[entry]
            self.entries.append(entry.replace('"', "'").replace(" ", ""))
        self.used: set[str] = set()

    def __call__(self, name: str, is_param: bool) -> bool:
        compact = name.replace(" ", "")
        hit = False
        for entry in self.entries:
            if (
                compact == entry
                or compact.startswith((entry + "[", entry + "."))
                or (is_param and entry == ALL_PARAMETERS)
            ):
                self.used.add(entry)
                hit = True
        return hit

    def check_all_used(self, differentiable: list[str], other: list[str]) -> None:
        for entry in self.entries:
            if entry in self.used:
                continue
            if any(n == entry or n.startswith((entry + "[", entry + ".")) for n in other):
                raise InvalidOptionError(f"wrt={entry!r} is not a floating-point or complex tensor")
            raise InvalidOptionError(
                f"wrt={entry!r} names no input or parameter; differentiable ones: {', '.join(differentiable)}"
            )


def build_problem(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    input_names: Sequence[str] | None,
    device: torch.device | None,
    upcast: bool,
    wrt: Sequence[str | int] | None = None,
) -> tuple[Problem, Any]:
    """Select the leaves to check, move/cast them, and evaluate fn once. Returns (problem, output)."""
    if input_names is not None and len(input_names) != len(inputs):
        raise NothingToCheckError(f"{len(input_names)} input_names given for {len(inputs)} inputs")
    heads = list(input_names) if input_names is not None else [f"inputs[{i}]" for i in range(len(inputs))]
    selection = _Selection(wrt, heads) if wrt is not None else None
    differentiable: list[str] = []
    other: list[str] = []

    def convert(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        if device is not None:
            t = t.to(device)
        # A lazily conjugated or negated view is resolved: view_as_real refuses it.
        t = t.resolve_conj().resolve_neg()
        if upcast and t.is_floating_point():
            t = t.to(torch.float64)
        elif upcast and t.is_complex():
            t = t.to(torch.complex128)
        return t

    params: dict[str, torch.Tensor] = {}
    trainable: set[str] = set()
    parameters: set[str] = set()  # parameters, not buffers
    if isinstance(fn, torch.nn.Module):
        for name, p in fn.named_parameters():
            params[name] = p
            parameters.add(name)
            if p.requires_grad and _differentiable(p):
                trainable.add(name)
        for name, b in fn.named_buffers():
            params[name] = b

    tree = (list(inputs), params)
    flat_arguments = not isinstance(fn, torch.nn.Module) and all(isinstance(t, torch.Tensor) for t in inputs)
    paths: list[tuple[tuple[pytree.KeyEntry, ...], Any]] = []
    if flat_arguments:
        # Tensors only, no module: the names pytree would give, without walking a tree (the spec
        # is not needed: ``Problem.call`` passes a flat argument list as it is).
        spec = None
    else:
        paths, spec = pytree.tree_flatten_with_path(tree)
    # (name, value, is a module's parameter) of every pytree leaf, in the order of ``paths``
    named = (
        [(heads[i], t, False) for i, t in enumerate(inputs)]
        if flat_arguments
        else [
            (cast(pytree.MappingKey[str, Any], path[1]).key, t, True)
            if _index(path[0]) == 1
            else (heads[_index(path[1])] + pytree.keystr(path[2:]), t, False)
            for path, t in paths
        ]
    )
    any_requires_grad = any(
        isinstance(t, torch.Tensor) and t.requires_grad and _differentiable(t)
        for _, t, is_param in named
        if not is_param
    )
    template: list[Any] = []
    slots: list[int] = []
    leaves: list[Leaf] = []
    for slot, (name, t, is_param) in enumerate(named):
        value = convert(t)
        template.append(value)
        if is_param:
            selected = name in trainable
        else:
            selected = _differentiable(t) and (t.requires_grad or not any_requires_grad)
        (differentiable if _differentiable(t) else other).append(str(name))
        if selection is not None:
            selected = _differentiable(t) and selection(str(name), is_param and name in parameters)
        if selected:
            _require_strided(value, str(name))
            slots.append(slot)
            leaves.append(Leaf(str(name), tuple(value.shape), value.dtype, value))
    if selection is not None:
        selection.check_all_used(differentiable, other)
    if not leaves:
        raise NothingToCheckError(
            "nothing to differentiate: pass at least one floating-point or complex tensor "
            "(integer tensors and other values are passed through unchanged)"
        )
    offset = 0
    for leaf in leaves:
        leaf.offset = offset
        offset += leaf.size

    problem = Problem(fn=fn, leaves=leaves, _spec=spec, _template=template, _slots=slots, _kwargs=kwargs)
    # (a None input is a pytree node without leaves, a list input a node with several)
    problem.flat_arguments = flat_arguments or (
        not isinstance(fn, torch.nn.Module)
        and len(paths) == len(inputs)
        and all(len(path) == 2 for path, _ in paths)
    )
    problem.watched = [
        (str(name), slot, _version(value))
        for slot, ((name, _, _), value) in enumerate(zip(named, template, strict=True))
        if isinstance(value, torch.Tensor)
    ]
    # The first call runs with autograd on: its graph serves the analytic side, its value is f(x).
    reals = [leaf.graph_input() for leaf in leaves]
    with torch.enable_grad():
        try:
            out = problem.call(
                [leaf.from_real(r) if leaf.is_complex else r for leaf, r in zip(leaves, reals, strict=True)]
            )
        except Exception as exc:  # the user's function: any exception is theirs to see
            raise FunctionRaisedError(
                f"fn raised at the evaluation point: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(out, torch.Tensor) and not pytree.tree_leaves(out):
            raise OutputTypeError(f"fn returned {type(out).__name__}, not a tensor")
        _select_outputs(problem, out)
        problem.outputs = _output_blocks(out, problem.kept_outputs)
        flat = problem.flatten_output(out)
        problem.first_call = (flat, reals)
        if (
            flat is not out
            and isinstance(out, torch.Tensor)
            and out.dtype == torch.float64
            and flat._base is out
        ):
            problem.first_root = out
    return problem, out
