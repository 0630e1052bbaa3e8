"""Constant parameters a client may pass: keyword arguments of expression calls and registered functions.

A ``ParamKind`` checks and normalises one value; values are plain data (numbers, short keywords,
flat lists of ints), never code. Every value is validated before any function sees it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradcheck_svc.errors import SpecError

__all__ = [
    "ANY",
    "BOOL",
    "FLOAT",
    "INT",
    "INTS",
    "MAX_LIST_LENGTH",
    "MAX_STRING_LENGTH",
    "OPT_FLOAT",
    "ParamKind",
    "check_scalar_value",
    "choice",
    "validate_params",
]

MAX_STRING_LENGTH = 64
MAX_LIST_LENGTH = 64
MAX_MAGNITUDE = 1e18  # larger constants are never needed for gradient checks and overflow int64


@dataclass(frozen=True)
class ParamKind:
    """What one parameter accepts; ``check`` returns the normalised value or raises SpecError."""

    description: str
    check: Callable[[str, Any], Any]


def _number(name: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"parameter {name!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise SpecError(f"parameter {name!r} must be finite and at most {MAX_MAGNITUDE:g} in magnitude")
    return value


def _int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON-ish clients send 2.0 for 2
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"parameter {name!r} must be an integer, got {type(value).__name__}")
    return int(_number(name, value))


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"parameter {name!r} must be true or false, got {type(value).__name__}")
    return value


def _ints(name: str, value: Any) -> int | tuple[int, ...]:
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST_LENGTH:
            raise SpecError(f"parameter {name!r} has more than {MAX_LIST_LENGTH} items")
        return tuple(_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    return _int(name, value)


def _opt_float(name: str, value: Any) -> float | int | None:
    return None if value is None else _number(name, value)


def check_scalar_value(name: str, value: Any) -> Any:
    """Accept any plain scalar, short string or flat list of scalars (operator functions' params)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return _number(name, value)
    if isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            raise SpecError(f"parameter {name!r} is longer than {MAX_STRING_LENGTH} characters")
        return value
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST_LENGTH:
            raise SpecError(f"parameter {name!r} has more than {MAX_LIST_LENGTH} items")
        items = []
        for i, v in enumerate(value):
            if isinstance(v, list | tuple):
                raise SpecError(f"parameter {name!r} must be a flat list")
            items.append(check_scalar_value(f"{name}[{i}]", v))
        return items
    raise SpecError(f"parameter {name!r} has unsupported type {type(value).__name__}")


def choice(*allowed: str) -> ParamKind:
    """A keyword from a fixed set, e.g. gelu's approximate="tanh"."""

    def check(name: str, value: Any) -> str:
        if value not in allowed:
            raise SpecError(f"parameter {name!r} must be one of {', '.join(map(repr, allowed))}")
        return str(value)

    return ParamKind("one of " + ", ".join(map(repr, allowed)), check)


INT = ParamKind("integer", _int)
FLOAT = ParamKind("number", _number)
OPT_FLOAT = ParamKind("number or null", _opt_float)
BOOL = ParamKind("boolean", _bool)
INTS = ParamKind("integer or list of integers", _ints)
ANY = ParamKind("scalar, short string or flat list", check_scalar_value)


def validate_params(owner: str, params: Mapping[str, Any], kinds: Mapping[str, ParamKind]) -> dict[str, Any]:
    """Check every parameter against its kind; unknown names raise SpecError listing the known ones."""
    out = {}
    for name, value in params.items():
        kind = kinds.get(name)
        if kind is None:
            known = ", ".join(sorted(kinds)) or "none"
            raise SpecError(f"{owner} has no parameter {name!r} (accepted: {known})")
        out[name] = kind.check(name, value)
    return out
