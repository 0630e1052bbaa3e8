"""A CheckRequest, validated and resolved into what the engine needs: a callable, points, options.

Everything a client sent is checked here, against the server's limits, before any check runs;
problems raise InvalidRequestError (with the field's path), UnknownFunctionError or
LimitExceededError, which server.status turns into gRPC codes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from gradcheck_svc.binding import bind_point, build_module, fill_arguments
from gradcheck_svc.codec import (
    decode_arguments,
    decode_module,
    decode_options,
    decode_sampling,
    decode_tensor,
    decode_value,
    validate_shape,
)
from gradcheck_svc.engine.guard import largest_output
from gradcheck_svc.errors import (
    BindingError,
    DeviceUnavailableError,
    InvalidRequestError,
    LimitExceededError,
    SpecError,
    UnknownFunctionError,
)
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import (
    Expression,
    ExpressionLimits,
    FunctionRegistry,
    RegisteredFunction,
    parse_expression,
    sample_points,
)
from gradcheck_svc.specs.params import check_scalar_value
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = [
    "LIGHT_ELEMENTS",
    "LIGHT_INPUTS",
    "LIGHT_JACOBIAN",
    "CheckPlan",
    "PlannedPoint",
    "is_light",
    "plan_check",
    "runs_in_worker",
]

# A check sized up front whose inputs and every intermediate are this small cannot reach the memory
# budget (the engine's batches are sized from a measured evaluation) nor run long between the
# engine's own deadline polls, so it runs without the per-op guard and its cost (a Python call per
# torch op, several times a tiny check's own time). Everything else runs under the guard. The
# Jacobian counts too: inputs x largest intermediate bounds it, and full mode holds it dense (at
# 650 inputs and 30,000 outputs, both small, a full check held 1.4 GB without the guard): a dense
# Jacobian of LIGHT_JACOBIAN entries is 8 MB in float64, and the engine holds a few such arrays.
LIGHT_INPUTS = 4096
LIGHT_ELEMENTS = 65536
LIGHT_JACOBIAN = 1 << 20

_INPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]']{0,63}\Z")


@dataclass(frozen=True)
class PlannedPoint:
    names: list[str]
    tensors: list[Any]  # the positional arguments: tensors, and constants where the client sent some


@dataclass(frozen=True)
class CheckPlan:
    """A request ready to run: ``fn(*point.tensors)`` for every point, with ``options``."""

    label: str
    fn: Callable[..., Any]
    points: list[PlannedPoint]
    options: dict[str, Any] = field(default_factory=dict)
    client_options: frozenset[str] = frozenset()  # the option names the client set
    operator_code: bool = False  # a function the operator registered (not an expression or built-in)
    fn_kwargs: dict[str, Any] = field(default_factory=dict)  # a registered module's forward keywords
    # Builds the module ``fn`` stands for (its class): run where the check runs, so the operator's
    # constructor runs in the worker process like the rest of its code.
    build_fn: Callable[[], Any] | None = None
    light: bool = False  # sized up front and small everywhere: see LIGHT_ELEMENTS

    @property
    def device(self) -> str:
        return str(self.options.get("device") or "auto")

    def own_copy(self) -> CheckPlan:
        """This plan with containers of its own (points, options, keywords); the tensors' values,
        which the engine only reads, are shared, and a tensor that requires grad is a leaf of its
        own (a ``.grad`` written to it stays with this check). Field by field through
        ``__dict__``: ``dataclasses.replace`` costs three times as much, and a kept plan is copied
        on every check that reuses it."""
        copied = object.__new__(CheckPlan)
        fields = copied.__dict__
        fields.update(self.__dict__)
        fields["points"] = [
            PlannedPoint(list(p.names), [_own_leaf(t) for t in p.tensors]) for p in self.points
        ]
        fields["options"] = dict(self.options)
        fields["fn_kwargs"] = dict(self.fn_kwargs)
        return copied


def _own_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return value.detach().requires_grad_(True)
    return value


def runs_in_worker(isolation: str, operator_code: bool, light: bool = False) -> bool:
    """The one rule for what runs in a killable worker process: everything under
    ``isolation=process``, nothing under ``thread``; under ``auto``, operator functions and every
    check not sized up front as light. The CheckGuard bounds a check at every torch op, but one
    long op (an SVD of a large matrix) runs to its end in a thread: only a worker can be stopped
    in the middle of it. Light checks stay in threads, where they cost no process hand-off."""
    if isolation == "thread":
        return False
    return isolation == "process" or operator_code or not light


def plan_check(request: pb.CheckRequest, settings: Settings, registry: FunctionRegistry) -> CheckPlan:
    """Validate in this order: the function, the points, the options."""
    label, fn, expression = _function(request.function, settings, registry)
    if expression is not None:  # the common light case: nothing of the registry is involved
        points = _points(request, settings, expression)
        largest = _check_intermediates(expression, points, settings)
        client_options, options = _request_options(request.options, settings)
        return CheckPlan(
            label=label,
            fn=fn,
            points=points,
            options=options,
            client_options=client_options,
            light=_light(largest, points),
        )
    points = _fill(request.function, _points(request, settings, expression))
    operator_code = not registry.get(request.function.registered.name).builtin
    # elements of the largest tensor one evaluation creates, if known
    largest = None if operator_code else _check_builtin_sizes(fn, points, settings)
    client_options, options = _request_options(request.options, settings)
    return CheckPlan(
        label=label,
        fn=fn,
        points=points,
        options=options,
        client_options=client_options,
        operator_code=operator_code,
        fn_kwargs=_module_params(request.function, registry),
        build_fn=_module_builder(request.function, registry, settings),
        light=_light(largest, points),
    )


def _light(largest: int | None, points: list[PlannedPoint]) -> bool:
    inputs = max(
        (sum(t.numel() for t in p.tensors if isinstance(t, torch.Tensor)) for p in points), default=0
    )
    return largest is not None and is_light(inputs, largest)


def is_light(inputs: int, largest: int) -> bool:
    """Whether a check of ``inputs`` input elements whose largest intermediate (or output) has
    ``largest`` elements is small everywhere: inputs, intermediates and Jacobian."""
    return inputs <= LIGHT_INPUTS and largest <= LIGHT_ELEMENTS and inputs * largest <= LIGHT_JACOBIAN


# ----------------------------------------------------------------------------- function


def _function(
    spec: pb.FunctionSpec, settings: Settings, registry: FunctionRegistry
) -> tuple[str, Callable[..., Any], Expression | None]:
    kind = spec.WhichOneof("kind")
    if kind == "expression":
        try:
            expression = _parse(spec.expression, settings.max_expression_length)
        except SpecError as exc:
            raise InvalidRequestError("function.expression", str(exc)) from None
        if not expression.variables:
            raise InvalidRequestError("function.expression", "has no variables: nothing to differentiate")
        return expression.text, expression, expression
    if kind == "registered":
        label, fn = bind_registered(spec.registered, registry)
        return label, fn, None
    raise InvalidRequestError("function", "set either expression or registered")


def bind_registered(
    spec: pb.RegisteredFunction, registry: FunctionRegistry
) -> tuple[str, Callable[..., Any]]:
    """The binding step on its own: a registered name and its parameters -> (label, callable).

    A registered module class stays the class here: the plan's ``build_fn`` builds the instance
    where the check runs, and its parameters become the forward's keywords (``fn_kwargs``)."""
    entry = registry.get(spec.name)  # UnknownFunctionError -> NOT_FOUND
    try:
        params = {k: decode_value(v) for k, v in spec.params.items()}
        if entry.module_class:
            return entry.name, entry.fn
        return entry.name, entry.bind(params)
    except (SpecError, InvalidRequestError) as exc:
        if isinstance(exc, UnknownFunctionError):
            raise
        raise InvalidRequestError("function.registered.params", str(exc)) from None


def _module_entry(spec: pb.FunctionSpec, registry: FunctionRegistry) -> RegisteredFunction | None:
    if spec.WhichOneof("kind") != "registered":
        return None
    entry = registry.get(spec.registered.name)
    return entry if entry.module_class else None


def _module_builder(
    spec: pb.FunctionSpec, registry: FunctionRegistry, settings: Settings
) -> Callable[[], Any] | None:
    """For a registered module class: its constructor arguments and state, checked now; built later."""
    entry = _module_entry(spec, registry)
    if entry is None:
        return None
    msg = spec.registered
    where = "function.registered.module"
    _check_tensor_count(len(msg.module.tensors), settings, f"{where}.tensors")
    init, state = decode_module(msg.module, max_elements=settings.max_tensor_elements, field=where)
    if sum(t.numel() for t in state.values()) > settings.max_request_elements:
        raise LimitExceededError(
            f"{where}: parameters and buffers exceed max_request_elements={settings.max_request_elements}"
        )
    try:
        for i, value in enumerate([*init.args, *init.kwargs.values()]):
            check_scalar_value(f"init[{i}]", value)
    except SpecError as exc:
        raise InvalidRequestError(where, str(exc)) from None

    def build() -> Any:
        try:
            return build_module(entry, init, state if msg.HasField("module") else None)
        except BindingError as exc:
            raise InvalidRequestError(where, str(exc)) from None

    return build


def _module_params(spec: pb.FunctionSpec, registry: FunctionRegistry) -> dict[str, Any]:
    """A module's forward keywords, checked (a function has its keywords bound already)."""
    entry = _module_entry(spec, registry)
    if entry is None:
        return {}
    params = {k: decode_value(v) for k, v in spec.registered.params.items()}
    try:
        return entry.check_params(params)
    except SpecError as exc:
        raise InvalidRequestError("function.registered.params", str(exc)) from None


def _fill(spec: pb.FunctionSpec, points: list[PlannedPoint]) -> list[PlannedPoint]:
    """Points of a registered call with constant positional arguments: the full argument list each."""
    if spec.WhichOneof("kind") != "registered" or not spec.registered.arguments:
        return points
    arguments = decode_arguments(spec.registered.arguments, "function.registered.arguments")
    filled = []
    for i, point in enumerate(points):
        try:
            values, names = fill_arguments(arguments, dict(zip(point.names, point.tensors, strict=True)), "")
        except BindingError as exc:
            raise InvalidRequestError(f"function.registered.arguments (point {i})", str(exc)) from None
        filled.append(PlannedPoint(names, values))
    return filled


# ----------------------------------------------------------------------------- points


def _points(
    request: pb.CheckRequest, settings: Settings, expression: Expression | None
) -> list[PlannedPoint]:
    kind = request.WhichOneof("points")
    if kind == "explicit_points":
        named = _explicit(request.explicit_points, settings)
    elif kind == "sampling":
        named = _sampled(request.sampling, settings)
    else:
        raise InvalidRequestError("points", "set either explicit_points or sampling")
    return [_bind(i, point, expression, kind) for i, point in enumerate(named)]


def _check_count(count: int, settings: Settings, field: str) -> None:
    if count == 0:
        raise InvalidRequestError(field, "needs at least one evaluation point")
    if count > settings.max_points:
        raise LimitExceededError(f"{field}: {count} points, more than max_points={settings.max_points}")


def _check_name(name: str, field: str) -> None:
    if not _INPUT_NAME.match(name):
        raise InvalidRequestError(
            field,
            f"{name[:80]!r} is not a valid input name (a letter or _, then up to 63 of [A-Za-z0-9_.[]'])",
        )


def _check_tensor_count(count: int, settings: Settings, field: str) -> None:
    """Each tensor costs its decoding and binding whatever its size: a request of a million scalars
    (well within max_request_elements) would take a minute of planning before any deadline runs."""
    if count > settings.max_request_tensors:
        raise LimitExceededError(
            f"{field}: {count} tensors, more than max_request_tensors={settings.max_request_tensors}"
        )


def _explicit(msg: pb.ExplicitPoints, settings: Settings) -> list[list[tuple[str, torch.Tensor]]]:
    _check_count(len(msg.points), settings, "explicit_points.points")
    _check_tensor_count(sum(len(p.tensors) for p in msg.points), settings, "explicit_points.points")
    # Validate every shape first, so an oversized request is refused before anything is decoded.
    total = 0
    for i, point in enumerate(msg.points):
        for j, named in enumerate(point.tensors):
            where = f"explicit_points.points[{i}].tensors[{j}]"
            total += validate_shape(named.tensor.shape, settings.max_tensor_elements, f"{where}.tensor.shape")
            if total > settings.max_request_elements:
                raise LimitExceededError(
                    f"request has more than {settings.max_request_elements} tensor elements "
                    f"(max_request_elements={settings.max_request_elements})"
                )
    out = []
    for i, point in enumerate(msg.points):
        if not point.tensors:
            raise InvalidRequestError(f"explicit_points.points[{i}].tensors", "needs at least one tensor")
        tensors = []
        for j, named in enumerate(point.tensors):
            where = f"explicit_points.points[{i}].tensors[{j}]"
            _check_name(named.name, f"{where}.name")
            if not named.HasField("tensor"):
                raise InvalidRequestError(f"{where}.tensor", "is missing")
            tensor = decode_tensor(
                named.tensor, max_elements=settings.max_tensor_elements, field=f"{where}.tensor"
            )
            tensors.append((named.name, tensor))
        out.append(tensors)
    return out


def _sampled(msg: pb.SamplingSpec, settings: Settings) -> list[list[tuple[str, torch.Tensor]]]:
    _check_tensor_count(len(msg.inputs), settings, "sampling.inputs")
    spec = decode_sampling(msg, max_elements=settings.max_tensor_elements)
    _check_count(spec.count, settings, "sampling.count")
    _check_tensor_count(len(spec.inputs) * spec.count, settings, "sampling")
    per_point = sum(validate_shape(i.shape, settings.max_tensor_elements) for i in spec.inputs)
    if per_point * spec.count > settings.max_request_elements:
        raise LimitExceededError(
            f"sampling: {spec.count} points of {per_point} elements exceed "
            f"max_request_elements={settings.max_request_elements}"
        )
    seen: set[str] = set()
    for k, i in enumerate(spec.inputs):
        _check_name(i.name, f"sampling.inputs[{k}].name")
        if i.name in seen:  # sampled points are keyed by name: a second one would silently win
            raise InvalidRequestError(f"sampling.inputs[{k}].name", f"{i.name!r} is given twice")
        seen.add(i.name)
    return [list(point.items()) for point in sample_points(spec)]


def _bind(
    index: int, point: Sequence[tuple[str, torch.Tensor]], expression: Expression | None, kind: str
) -> PlannedPoint:
    where = f"explicit_points.points[{index}]" if kind == "explicit_points" else "sampling.inputs"
    try:
        names, values = bind_point(point, expression.variables if expression is not None else None)
    except BindingError as exc:
        field = where if exc.position is None else f"{where}.tensors[{exc.position}].name"
        raise InvalidRequestError(field, str(exc)) from None
    return PlannedPoint(names, values)


def _check_intermediates(
    expression: Expression, points: list[PlannedPoint], settings: Settings
) -> int | None:
    """Refuse expressions that would build an oversized tensor (e.g. outer(x, x)), before running them."""
    signatures = {
        tuple(zip(p.names, ((tuple(t.shape), t.dtype) for t in p.tensors), strict=True)) for p in points
    }
    found: int | None = 0
    for signature in signatures:
        largest = _largest_intermediate(expression, signature)
        found = None if largest < 0 or found is None else max(found, largest)
        if largest > settings.max_tensor_elements:
            raise LimitExceededError(
                f"function.expression: evaluation would create a tensor of {largest} elements "
                f"(max_tensor_elements={settings.max_tensor_elements})"
            )
    return found


def _check_builtin_sizes(
    fn: Callable[..., Any], points: list[PlannedPoint], settings: Settings
) -> int | None:
    """Built-in torch ops get the same size check as expressions: conv1d with a huge padding or
    outer of two long vectors is refused before it allocates."""
    shapes = {tuple(_signature(t) for t in p.tensors): p for p in points}
    found: int | None = 0
    for point in shapes.values():  # one meta run per distinct set of shapes
        try:
            largest = largest_output(fn, point.tensors)
        except Exception:  # a shape error shows up in the point's report when the check runs
            found = None
            continue
        found = None if found is None else max(found, largest)
        if largest > settings.max_tensor_elements:
            raise LimitExceededError(
                f"function.registered: evaluation would create a tensor of {largest} elements "
                f"(max_tensor_elements={settings.max_tensor_elements})"
            )
    return found


def _signature(value: Any) -> tuple[Any, ...]:
    """What a size check depends on: a tensor's shape and dtype, a constant argument's value."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    return ("constant", repr(value))


# CI jobs send the same expressions at the same shapes over and over: parse and size them once.
# Expressions are immutable, so one parsed tree can serve every thread.
@functools.lru_cache(maxsize=1024)
def _parse(text: str, max_length: int) -> Expression:
    return parse_expression(text, ExpressionLimits(max_length=max_length))


@functools.lru_cache(maxsize=4096)
def _largest_intermediate(expression: Expression, signature: tuple[tuple[str, Any], ...]) -> int:
    inputs = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in signature}
    try:
        return expression.largest_intermediate(inputs)
    except Exception:  # a shape error shows up in the point's report when the check runs
        return -1  # unknown


# ----------------------------------------------------------------------------- options


# Clients send the same few option sets over and over; each set is validated once. The wire gives
# every option one type, so equal keys are equal options (refusals raise, and are not cached).
@functools.lru_cache(maxsize=1024)
def _validate_options(items: tuple[tuple[str, Any], ...]) -> None:
    try:
        CheckOptions(**dict(items))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InvalidRequestError(f"options.{loc}" if loc else "options", err["msg"]) from None


def _request_options(msg: pb.Options, settings: Settings) -> tuple[frozenset[str], dict[str, Any]]:
    """The names of the options the client set, and the options the engine gets (a fresh dict)."""
    data = msg.SerializeToString()
    server = (settings.max_jacobian_entries, settings.max_evaluations, settings.device)
    if len(data) > _CACHED_OPTIONS_BYTES:  # unknown fields, say: decoded each time, never kept
        return _options_on_wire.__wrapped__(data, *server)
    names, options = _options_on_wire(data, *server)
    return names, dict(options)


# Every known option set fits; a longer message (unknown fields) would only fill the cache.
_CACHED_OPTIONS_BYTES = 512


# Clients send the same few option sets over and over, byte for byte (Options holds scalars and
# enums only: equal sets are equal bytes); each is decoded and validated once. Refusals raise and
# are not cached.
@functools.lru_cache(maxsize=1024)
def _options_on_wire(
    data: bytes, max_jacobian_entries: int, max_evaluations: int, device: str
) -> tuple[frozenset[str], dict[str, Any]]:
    sent = decode_options(pb.Options.FromString(data))
    limits = {"max_jacobian_entries": max_jacobian_entries, "max_evaluations": max_evaluations}
    return frozenset(sent), _options(sent, limits, device)


def _options(sent: dict[str, Any], limits: dict[str, int], default_device: str) -> dict[str, Any]:
    """The options a client sent (decoded), validated, with the server's limits and device."""
    options = dict(sent)
    for name, value in options.items():
        # NaN and infinite tolerances or steps would turn every verdict into "ok" or into noise.
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"options.{name}", f"must be a finite number, got {value}")
    _validate_options(tuple(sorted(options.items())))
    # The server's limits always apply; a client may only ask for lower ones.
    for name, limit in limits.items():
        options[name] = min(options.get(name) or 2**62, limit)
    device = options.get("device") or default_device
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device 'cuda' was asked for, but this server has no CUDA device")
    if options.get("compare_devices") and not torch.cuda.is_available():
        raise DeviceUnavailableError("compare_devices needs CUDA, and this server has no CUDA device")
    options["device"] = device
    return options
