"""Conversions between gradcheck_svc's Python objects and the gradcheck_svc.v1 protobuf messages.

Tensors: a dtype enum, a shape and little-endian C-contiguous bytes. Decoding validates everything
(known dtype, non-negative dims, element count computed without overflow and within the limit,
``len(data) == numel * itemsize``) before a single element is allocated, and then only reinterprets
the validated bytes with ``torch.frombuffer``: no pickle, no ``torch.load``.

Reports and options convert both ways, field by field, so a Report that crossed the wire equals the
one the engine built (tests/service/test_codec.py checks every model field is covered).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from google.protobuf import duration_pb2

from gradcheck_svc.errors import InvalidRequestError, LimitExceededError
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.report import Check, ElementError, PairReport, Report, Status
from gradcheck_svc.specs.sampling import SampledInput, SamplingSpec
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = [
    "DTYPES",
    "decode_options",
    "decode_report",
    "decode_sampling",
    "decode_tensor",
    "decode_value",
    "dtype_from_name",
    "encode_duration",
    "encode_options",
    "encode_point",
    "encode_report",
    "encode_sampling",
    "encode_tensor",
    "encode_value",
    "report_fields",
    "validate_shape",
]

# proto enum <-> torch dtype. Order matters only for Capabilities listings.
DTYPES: Mapping[int, torch.dtype] = {
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_COMPLEX64: torch.complex64,
    pb.DTYPE_COMPLEX128: torch.complex128,
    pb.DTYPE_INT8: torch.int8,
    pb.DTYPE_INT16: torch.int16,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_BOOL: torch.bool,
}
_DTYPE_ENUMS: Mapping[torch.dtype, int] = {v: k for k, v in DTYPES.items()}
_ITEMSIZES: Mapping[torch.dtype, int] = {d: d.itemsize for d in DTYPES.values()}
# Real dtypes NumPy has too: tensors of them encode through NumPy, one torch call instead of
# several (a check's tensors are few and small, so the count of calls is what costs). bfloat16 has
# no NumPy twin and complex tensors may carry a lazy conjugation: both take the torch path.
_NUMPY_DTYPES: Mapping[torch.dtype, np.dtype[Any]] = {
    d: np.dtype(str(d).removeprefix("torch."))
    for d in DTYPES.values()
    if not d.is_complex and d != torch.bfloat16
}
_BIG_ENDIAN = sys.byteorder == "big"
MAX_DIMS = 32


def dtype_from_name(name: str) -> torch.dtype:
    """'float32' / 'DTYPE_FLOAT32' / 'torch.float32' -> torch.float32 (ValueError when unknown)."""
    key = name.strip().lower().removeprefix("torch.").removeprefix("dtype_")
    for dtype in DTYPES.values():
        if str(dtype).removeprefix("torch.") == key:
            return dtype
    known = ", ".join(str(d).removeprefix("torch.") for d in DTYPES.values())
    raise ValueError(f"unknown dtype {name!r} (known: {known})")


# ----------------------------------------------------------------------------- tensors


def validate_shape(shape: Sequence[int], max_elements: int, field: str = "shape") -> int:
    """Return the element count of ``shape``; reject negative dims and counts above ``max_elements``.

    The product is built step by step and stops as soon as it passes the limit, so a shape whose
    product would overflow int64 is refused like any other oversized one; so is any single dimension
    above the limit, even when another dimension is zero.
    """
    if not shape:  # a scalar: one element
        return 1
    if len(shape) > MAX_DIMS:
        raise InvalidRequestError(field, f"has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    for i, dim in enumerate(shape):
        if dim < 0:
            raise InvalidRequestError(f"{field}[{i}]", f"dimension {dim} is negative")
        if dim > max_elements:
            # Even next to a zero dim: torch cannot lay out strides for such a shape.
            raise LimitExceededError(
                f"{field}[{i}]: dimension {dim} is larger than max_tensor_elements={max_elements}"
            )
    if any(dim == 0 for dim in shape):
        return 0
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > max_elements:
            raise LimitExceededError(
                f"{field}: tensor of shape {list(shape)} has more than {max_elements} elements "
                f"(max_tensor_elements={max_elements})"
            )
    return numel


def decode_tensor(msg: pb.Tensor, *, max_elements: int, field: str = "tensor") -> torch.Tensor:
    """A validated CPU tensor owning its memory (InvalidRequestError / LimitExceededError otherwise)."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidRequestError(f"{field}.dtype", f"unknown or unset dtype {msg.dtype}")
    numel = validate_shape(msg.shape, max_elements, f"{field}.shape")
    itemsize = _ITEMSIZES[dtype]
    data = msg.data  # each read of the field is a fresh copy of the bytes: read once
    if len(data) != numel * itemsize:
        raise InvalidRequestError(
            f"{field}.data",
            f"has {len(data)} bytes; shape {list(msg.shape)} of {_dtype_name(dtype)} "
            f"needs {numel * itemsize}",
        )
    if numel == 0:
        tensor = torch.empty(tuple(msg.shape), dtype=dtype)
    else:
        # bytearray: torch.frombuffer wants a writable buffer, and the tensor must own its memory.
        # Straight to torch, not through NumPy: on a server whose caches the last check emptied,
        # each library a request touches costs more than the call (measured: a third less).
        tensor = torch.frombuffer(bytearray(data), dtype=dtype).reshape(tuple(msg.shape))
        if _BIG_ENDIAN and itemsize > 1:
            tensor = _byteswap(tensor)
    return (
        tensor.requires_grad_(msg.requires_grad) if msg.requires_grad and _differentiable(dtype) else tensor
    )


def encode_tensor(tensor: torch.Tensor) -> pb.Tensor:
    """Any tensor (any device, layout, strides) -> little-endian C-contiguous bytes."""
    msg = pb.Tensor()
    fill_tensor(msg, tensor)
    return msg


def fill_tensor(msg: pb.Tensor, tensor: torch.Tensor) -> None:
    """``encode_tensor`` into a message already in place (a request's field): no copy of the bytes."""
    dtype_enum = _DTYPE_ENUMS.get(tensor.dtype)
    if dtype_enum is None:
        raise TypeError(
            f"dtype {tensor.dtype} cannot be sent (supported: {', '.join(map(str, DTYPES.values()))})"
        )
    msg.dtype = pb.Dtype.ValueType(dtype_enum)
    msg.shape.extend(tensor.shape)
    msg.data = _tensor_bytes(tensor)
    if tensor.requires_grad:
        msg.requires_grad = True


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach()
    if tensor.dtype in _NUMPY_DTYPES and not _BIG_ENDIAN and flat.is_cpu:
        try:
            return bytes(flat.numpy().tobytes())  # C order whatever the strides
        except RuntimeError:  # a lazily negated view, say: torch resolves it below
            pass
    flat = flat.to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    if _BIG_ENDIAN and flat.element_size() > 1:
        flat = _byteswap(flat)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _byteswap(tensor: torch.Tensor) -> torch.Tensor:
    raw = tensor.reshape(-1).view(torch.uint8).reshape(-1, tensor.element_size()).flip(-1)
    return raw.contiguous().view(tensor.dtype).reshape(tensor.shape)


def _differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_point(point: Mapping[str, torch.Tensor], msg: pb.Point | None = None) -> pb.Point:
    """A point's named tensors, into ``msg`` when given (a request's own field: nothing is copied)."""
    msg = pb.Point() if msg is None else msg
    for name, tensor in point.items():
        fill_tensor(msg.tensors.add(name=name).tensor, tensor)
    return msg


# ----------------------------------------------------------------------------- sampling


def encode_sampling(spec: SamplingSpec) -> pb.SamplingSpec:
    inputs = []
    for i in spec.inputs:
        if i.distribution == "uniform":
            dist = pb.Distribution(uniform=pb.Uniform(low=i.low, high=i.high))
        else:
            dist = pb.Distribution(normal=pb.Normal(mean=i.mean, std=i.std))
        inputs.append(
            pb.SampledInput(
                name=i.name,
                shape=list(i.shape),
                dtype=pb.Dtype.ValueType(_DTYPE_ENUMS[i.dtype]),
                distribution=dist,
                requires_grad=i.requires_grad,
            )
        )
    # int64 on the wire, 64 unsigned bits for the generator: seeds from 2**63 up travel negative.
    seed = spec.seed - 2**64 if spec.seed >= 2**63 else spec.seed
    return pb.SamplingSpec(inputs=inputs, point_count=spec.count, seed=seed)


def decode_sampling(msg: pb.SamplingSpec, *, max_elements: int, field: str = "sampling") -> SamplingSpec:
    """Validated SamplingSpec (shapes within the limit, floating dtypes, finite parameters)."""
    if not msg.inputs:
        raise InvalidRequestError(f"{field}.inputs", "needs at least one input")
    if msg.point_count < 0:
        raise InvalidRequestError(f"{field}.point_count", "must not be negative")
    inputs = []
    for k, i in enumerate(msg.inputs):
        where = f"{field}.inputs[{k}]"
        validate_shape(i.shape, max_elements, f"{where}.shape")
        dtype = DTYPES.get(i.dtype) if i.dtype else torch.float64
        if dtype is None or not _differentiable(dtype):
            raise InvalidRequestError(f"{where}.dtype", "must be a floating or complex dtype")
        kind = i.distribution.WhichOneof("kind")
        if kind == "uniform":
            low, high = i.distribution.uniform.low, i.distribution.uniform.high
            _finite(f"{where}.distribution.uniform", low, high)
            if not high > low:
                raise InvalidRequestError(f"{where}.distribution.uniform", "high must be greater than low")
            params: dict[str, Any] = {"distribution": "uniform", "low": low, "high": high}
        else:
            mean, std = i.distribution.normal.mean, i.distribution.normal.std or 1.0
            _finite(f"{where}.distribution.normal", mean, std)
            params = {"distribution": "normal", "mean": mean, "std": std}
        inputs.append(
            SampledInput(
                name=i.name, shape=tuple(i.shape), dtype=dtype, requires_grad=i.requires_grad, **params
            )
        )
    return SamplingSpec(inputs=tuple(inputs), count=msg.point_count or 1, seed=msg.seed % 2**64)


def _finite(field: str, *values: float) -> None:
    if not all(math.isfinite(v) and abs(v) <= 1e18 for v in values):
        raise InvalidRequestError(field, "parameters must be finite numbers of magnitude at most 1e18")


# ----------------------------------------------------------------------------- values


def _duration_fields(seconds: float) -> dict[str, int]:
    """``Duration.FromNanoseconds(round(seconds * 1e9))`` as keyword arguments, without its
    pure-Python detour."""
    nanos = round(seconds * 1e9)
    whole, part = divmod(nanos, 1_000_000_000)
    if whole < 0 and part > 0:  # a Duration's seconds and nanos share one sign
        whole, part = whole + 1, part - 1_000_000_000
    return {"seconds": whole, "nanos": part}


def encode_duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(**_duration_fields(seconds))


def _seconds(msg: duration_pb2.Duration) -> float:
    """``msg.ToNanoseconds() / 1e9``, the same float."""
    return (msg.seconds * 1_000_000_000 + msg.nanos) / 1e9


def encode_value(value: Any) -> pb.Value:
    """None, bool, int, float, str or a list/tuple of those -> Value."""
    return pb.Value(**_value_fields(value))


def _value_fields(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"bool_value": value}
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"integer {value} does not fit in int64")
        return {"int_value": value}
    if isinstance(value, float):
        return {"double_value": value}
    if isinstance(value, str):
        return {"string_value": value}
    if isinstance(value, list | tuple):
        return {"list_value": {"values": [_value_fields(v) for v in value]}}
    raise TypeError(f"cannot send a value of type {type(value).__name__}")


def decode_value(msg: pb.Value, depth: int = 0) -> Any:
    kind = msg.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "list_value":
        if depth >= 4:  # nesting has no use here; the bound keeps decoding flat and cheap
            raise InvalidRequestError("value", "lists nest deeper than 4 levels")
        return [decode_value(v, depth + 1) for v in msg.list_value.values]
    return getattr(msg, kind)


# ----------------------------------------------------------------------------- options

_ENUM_OPTIONS = {
    "mode": ("MODE_", pb.Mode),
    "kinks": ("KINKS_", pb.Kinks),
    "scheme": ("SCHEME_", pb.Scheme),
    "device": ("DEVICE_", pb.Device),
}
_SCALAR_OPTIONS = tuple(
    f.name for f in pb.Options.DESCRIPTOR.fields if f.name not in _ENUM_OPTIONS
)  # the optional scalars: presence means "set"
# Per enum option: wire number -> the engine's name for it ("MODE_FULL" -> "full").
_ENUM_NAMES: Mapping[str, Mapping[int, str]] = {
    name: {v.number: v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values}
    for name, (prefix, enum) in _ENUM_OPTIONS.items()
}
_ENUM_NUMBERS: Mapping[str, Mapping[str, int]] = {
    option: {name: number for number, name in names.items()} for option, names in _ENUM_NAMES.items()
}


def encode_options(options: Mapping[str, Any] | CheckOptions | None) -> pb.Options:
    """Engine options (a dict of the ones set, or a CheckOptions) -> Options; unknown names raise."""
    if options is None:
        return pb.Options()
    if isinstance(options, CheckOptions):
        options = options.model_dump(exclude_unset=True)
    msg = pb.Options()
    for name, value in options.items():
        if value is None:
            continue  # None means "engine default", which is what an unset field says
        numbers = _ENUM_NUMBERS.get(name)
        if numbers is not None:
            number = numbers.get(str(value).lower())
            if number is None:  # the enum wrapper says what is wrong
                prefix, enum = _ENUM_OPTIONS[name]
                number = enum.Value(prefix + str(value).upper())
            setattr(msg, name, number)
        elif name in _SCALAR_OPTIONS:
            setattr(msg, name, value)
        else:
            raise ValueError(f"unknown check option {name!r} (known: {', '.join(sorted(_option_names()))})")
    return msg


def decode_options(msg: pb.Options) -> dict[str, Any]:
    """Options -> {name: value} of the fields set (unset fields are left to the engine)."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():  # the fields set, scalars present, enums non-zero
        name = field.name
        names = _ENUM_NAMES.get(name)
        if names is None:
            out[name] = value
        elif value in names:
            out[name] = names[value]
        else:  # proto3 keeps unknown enum numbers
            raise InvalidRequestError(f"options.{name}", f"unknown value {value}")
    return out


def _option_names() -> list[str]:
    return [f.name for f in pb.Options.DESCRIPTOR.fields]


# ----------------------------------------------------------------------------- reports


# Report strings <-> the enums the request uses. Mode "taylor" (no Jacobian compared) travels unset.
_MODES = {"full": pb.MODE_FULL, "fast": pb.MODE_FAST}
_PARTS = {"": pb.COMPLEX_PART_UNSPECIFIED, "re": pb.COMPLEX_PART_REAL, "im": pb.COMPLEX_PART_IMAGINARY}
_PART_NAMES = {v: k for k, v in _PARTS.items()}


_DTYPE_BY_NAME: Mapping[str, int] = {_dtype_name(d): e for d, e in _DTYPE_ENUMS.items()}
_CHECK_ENUMS = {c: pb.CheckKind.Value("CHECK_KIND_" + c.name) for c in Check}
_STATUS_ENUMS = {s: pb.Status.Value("STATUS_" + s.name) for s in Status}
_CHECKS = {number: check for check, number in _CHECK_ENUMS.items()}
_STATUSES = {number: status for status, number in _STATUS_ENUMS.items()}
_SCHEME_ENUMS = {
    v.name.removeprefix("SCHEME_").lower(): v.number for v in pb.Scheme.DESCRIPTOR.values if v.number
}


def _dtype_enum(name: str) -> pb.Dtype.ValueType:
    if not name:
        return pb.DTYPE_UNSPECIFIED
    number = _DTYPE_BY_NAME.get(name)
    return pb.Dtype.ValueType(_DTYPE_ENUMS[dtype_from_name(name)] if number is None else number)


def _enum_name(option: str, number: int) -> str:
    """An enum number as the engine's name ("full" for MODE_FULL), by table: the enum wrapper's
    ``Name`` is Python code that a client's first call after a check would run cold."""
    name = _ENUM_NAMES[option].get(number)
    if name is None:
        raise ValueError(f"unknown {option} number {number}")
    return name


def _mode_name(mode: int, scheme: int) -> str:
    if mode == pb.MODE_UNSPECIFIED:
        return "taylor" if scheme == pb.SCHEME_TAYLOR else "full"
    return _enum_name("mode", mode)


def _pair_mode(m: pb.PairReport) -> str:
    if m.mode == pb.MODE_UNSPECIFIED and m.check == pb.CHECK_KIND_TAYLOR:
        return "taylor"
    return _mode_name(m.mode, pb.SCHEME_UNSPECIFIED)


def _report_mode(m: pb.Report) -> str:
    return _mode_name(m.mode, m.scheme)


def _element_fields(e: ElementError) -> dict[str, Any]:
    return {
        "output_index": e.output_index,
        "input_index": e.input_index,
        "output_part": _PARTS[e.output_part],
        "input_part": _PARTS[e.input_part],
        "analytic": e.analytic,
        "numeric": e.numeric,
        "error_bar": e.error_bar,
        "tolerance": e.tolerance,
        "kink": e.kink,
    }


def _decode_element(m: pb.ElementError) -> ElementError:
    return ElementError(
        output_index=list(m.output_index),
        input_index=list(m.input_index),
        output_part=_PART_NAMES.get(m.output_part, ""),
        input_part=_PART_NAMES.get(m.input_part, ""),
        analytic=m.analytic,
        numeric=m.numeric,
        error_bar=m.error_bar,
        tolerance=m.tolerance,
        kink=m.kink,
    )


def _pair_fields(p: PairReport) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "output": p.output,
        "input": p.input,
        "check": _CHECK_ENUMS[p.check],
        "status": _STATUS_ENUMS[p.status],
        "mode": _MODES.get(p.mode, pb.MODE_UNSPECIFIED),
        "output_shape": p.output_shape,
        "input_shape": p.input_shape,
        "dtype": _dtype_enum(p.dtype),
        "max_abs_error": p.max_abs_error,
        "max_rel_error": p.max_rel_error,
        "max_error_ratio": p.max_error_ratio,
        "checked_count": p.elements_checked,
        "failed_count": p.elements_failed,
        "kink_count": p.kinks,
        "message": p.message,
        "worst": [_element_fields(e) for e in p.worst],
    }
    # Optional lists: present (even when empty) exactly when the report has them.
    for name, values in (
        ("analytic", p.analytic),
        ("numeric", p.numeric),
        ("error_bars", p.error_bars),
        ("taylor_rates", p.taylor_rates),
    ):
        if values is not None:
            fields[name] = {"values": values}
    if p.nondeterminism is not None:
        fields["nondeterminism"] = p.nondeterminism
    if p.error_map is not None:
        fields["error_map"] = {"rows": [{"values": row} for row in p.error_map]}
    return fields


def _decode_pair(m: pb.PairReport) -> PairReport:
    def doubles(name: str) -> list[float] | None:
        return list(getattr(m, name).values) if m.HasField(name) else None  # type: ignore[arg-type]

    return PairReport(
        output=m.output,
        input=m.input,
        check=_CHECKS[m.check],
        status=_STATUSES[m.status],
        mode=_pair_mode(m),
        output_shape=list(m.output_shape),
        input_shape=list(m.input_shape),
        dtype=_dtype_name(DTYPES[m.dtype]) if m.dtype in DTYPES else "",
        max_abs_error=m.max_abs_error,
        max_rel_error=m.max_rel_error,
        max_error_ratio=m.max_error_ratio,
        elements_checked=m.checked_count,
        elements_failed=m.failed_count,
        kinks=m.kink_count,
        worst=[_decode_element(e) for e in m.worst],
        analytic=doubles("analytic"),
        numeric=doubles("numeric"),
        error_bars=doubles("error_bars"),
        nondeterminism=m.nondeterminism if m.HasField("nondeterminism") else None,
        taylor_rates=doubles("taylor_rates"),
        error_map=[list(r.values) for r in m.error_map.rows] if m.HasField("error_map") else None,
        message=m.message,
    )


def encode_report(r: Report, *, options: Mapping[str, Any] | None = None, **extra: Any) -> pb.Report:
    """A Report as a message. ``options``, when given, are written in place of the report's own;
    ``extra`` fields (e.g. ``point``, ``served_by``) in place of the report's."""
    return pb.Report(**report_fields(r, options=options, **extra))


def report_fields(r: Report, *, options: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A Report as the keyword arguments of ``pb.Report``: a whole response is then built by one
    constructor call, where upb does the work, instead of field by field from Python."""
    fields: dict[str, Any] = {
        "ok": r.ok,
        "pairs": [_pair_fields(p) for p in r.pairs],
        "dtypes": sorted({_dtype_enum(d) for d in r.dtype.split(",") if d}),
        "device": pb.DEVICE_CUDA if r.device.startswith("cuda") else pb.DEVICE_CPU,
        "device_name": r.device,
        "mode": _MODES.get(r.mode, pb.MODE_UNSPECIFIED),
        "scheme": _SCHEME_ENUMS[r.scheme],
        "order": r.order,
        "function": r.function,
        "notes": r.notes,
        "served_by": r.served_by,
        "timings": {phase.removesuffix("_s"): _duration_fields(s) for phase, s in r.timings.items()},
        "options": {
            name: _value_fields(_plain(value))
            for name, value in (r.options if options is None else options).items()
        },
    }
    if r.point is not None:
        fields["point"] = r.point
    if r.error is not None:
        fields["error"] = r.error
    fields.update(extra)
    return fields


def _plain(value: Any) -> Any:
    """Option values as plain data (enums by value; anything exotic by its text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    enum_value = getattr(value, "value", None)
    return enum_value if isinstance(enum_value, str | int | float) else str(value)


def decode_report(m: pb.Report) -> Report:
    return Report(
        ok=m.ok,
        pairs=[_decode_pair(p) for p in m.pairs],
        dtype=",".join(sorted(_dtype_name(DTYPES[d]) for d in m.dtypes if d in DTYPES)),
        device=m.device_name or _enum_name("device", m.device),
        mode=_report_mode(m),
        scheme=_enum_name("scheme", m.scheme) if m.scheme else "central",
        order=m.order,
        function=m.function,
        point=m.point if m.HasField("point") else None,
        error=m.error if m.HasField("error") else None,
        notes=list(m.notes),
        # Map fields by key: their items() is the pure-Python Mapping mixin.
        options={k: decode_value(m.options[k]) for k in m.options},
        timings={f"{phase}_s": _seconds(m.timings[phase]) for phase in m.timings},
        served_by=m.served_by,
    )


# ----------------------------------------------------------------------------- registered calls


def encode_arguments(arguments: Sequence[Any]) -> list[pb.CallArgument]:
    """Positional arguments: ``binding.Input`` (a tensor of the point, by name) or a constant."""
    from gradcheck_svc.binding import Input

    return [
        pb.CallArgument(input=a.name) if isinstance(a, Input) else pb.CallArgument(value=encode_value(a))
        for a in arguments
    ]


def decode_arguments(msgs: Sequence[pb.CallArgument], field: str = "arguments") -> list[Any]:
    from gradcheck_svc.binding import Input

    out: list[Any] = []
    for i, m in enumerate(msgs):
        kind = m.WhichOneof("kind")
        if kind == "input":
            out.append(Input(m.input))
        elif kind == "value":
            out.append(decode_value(m.value))
        else:
            raise InvalidRequestError(f"{field}[{i}]", "set either input or value")
    return out


def encode_module(init: Any, state: Mapping[str, torch.Tensor]) -> pb.ModuleState:
    """A module's constructor arguments (``binding.InitArgs``) and its parameters and buffers."""
    return pb.ModuleState(
        init_args=[encode_value(v) for v in init.args],
        init_kwargs={k: encode_value(v) for k, v in init.kwargs.items()},
        tensors=[pb.NamedTensor(name=n, tensor=encode_tensor(t)) for n, t in state.items()],
    )


def decode_module(
    msg: pb.ModuleState, *, max_elements: int, field: str = "module"
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(InitArgs, state) of a ModuleState; the tensors validated like any input."""
    from gradcheck_svc.binding import InitArgs

    init = InitArgs(
        *(decode_value(v) for v in msg.init_args), **{k: decode_value(v) for k, v in msg.init_kwargs.items()}
    )
    state: dict[str, torch.Tensor] = {}
    for i, named in enumerate(msg.tensors):
        if named.name in state:
            raise InvalidRequestError(f"{field}.tensors[{i}].name", f"{named.name!r} is given twice")
        where = f"{field}.tensors[{i}]"
        state[named.name] = decode_tensor(named.tensor, max_elements=max_elements, field=where)
    return init, state
