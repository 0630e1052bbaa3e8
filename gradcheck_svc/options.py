"""Options of a check, validated in one place and shared by library, service and plugin."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradcheck_svc.errors import InvalidOptionError

__all__ = [
    "EXPECTATIONS",
    "CallArguments",
    "CheckOptions",
    "call_arguments",
    "explicit_options",
    "resolve_options",
]

# What the caller expects of the gradients: "match" (the default) or "mismatch", for gradients
# that are deliberately not the true derivative (straight-through estimators, gradient reversal).
EXPECTATIONS = ("match", "mismatch")


class CheckOptions(BaseModel):
    """Keyword options of ``check`` / ``assert_grads``. ``None`` means "derive it"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    atol: float | None = Field(None, ge=0, description="absolute tolerance floor; None: from dtype")
    rtol: float | None = Field(None, ge=0, description="relative tolerance; None: from dtype")
    eps: float | None = Field(
        None, gt=0, description="finite-difference step relative to max(|x|, 1); None: from dtype"
    )
    error_bars: float = Field(
        4.0, ge=0, description="how many error bars of the numeric estimate are tolerated"
    )
    mode: Literal["auto", "full", "fast"] = "auto"
    kinks: Literal["allow", "fail"] = "allow"
    nondet_tol: float = Field(0.0, ge=0, description="accepted difference between two backward runs")
    seed: int = 0
    order: Literal[1, 2] = 1
    forward_ad: bool = False
    scheme: Literal["central", "taylor"] = "central"
    device: Literal["auto", "cpu", "cuda"] | None = None
    compare_devices: bool = False
    upcast: bool = Field(False, description="check in float64 whatever dtype the inputs have")
    fast_threshold: int = Field(
        4_000_000, ge=1, description="mode='auto' uses fast mode above this many Jacobian entries"
    )
    projections: int = Field(1, ge=1, le=64, description="random projections per pair in fast mode")
    chunk_size: int | None = Field(
        None, ge=1, description="input columns perturbed per batched call; None: sized to memory"
    )
    max_worst: int = Field(5, ge=1, le=100, description="worst elements listed per pair")
    check_nondeterminism: bool = True
    max_jacobian_entries: int | None = Field(
        None, ge=1, description="refuse checks whose Jacobian has more entries (service limit)"
    )
    max_evaluations: int | None = Field(
        None, ge=1, description="refuse checks needing more function evaluations (service limit)"
    )


_DEFAULTS = CheckOptions()  # frozen: every check without options shares it
# Options validated before, by their values (and types: True is not 1 here); frozen, so shared.
_SEEN: dict[tuple[tuple[str, type, Any], ...], CheckOptions] = {}
_SEEN_MAX = 64
_SEEN_LOCK = threading.Lock()


def _validated(overrides: dict[str, Any]) -> CheckOptions:
    """``CheckOptions(**overrides)``, validated once per distinct set of plain values: a test
    suite or a service checks many functions with the same few options."""
    if not overrides:
        return _DEFAULTS
    try:
        key = tuple(sorted((k, type(v), v) for k, v in overrides.items()))
        hash(key)
    except TypeError:  # an unhashable value (a list): validate it every time
        return CheckOptions(**overrides)
    options = _SEEN.get(key)
    if options is None:
        options = CheckOptions(**overrides)
        with _SEEN_LOCK:  # the oldest set makes room: a long run of new seeds must not fill it for good
            if len(_SEEN) >= _SEEN_MAX:
                del _SEEN[next(iter(_SEEN))]
            _SEEN[key] = options
    return options


@functools.lru_cache(maxsize=_SEEN_MAX)
def _explicit(options: CheckOptions) -> tuple[tuple[str, Any], ...]:
    return tuple(options.model_dump(exclude_defaults=True).items())


def explicit_options(options: CheckOptions) -> dict[str, Any]:
    """The options that differ from their defaults, as a new dict (the report lists them)."""
    if not options.model_fields_set:  # nothing set, nothing but defaults
        return {}
    try:
        return dict(_explicit(options))
    except TypeError:  # an unhashable value: no cache
        return options.model_dump(exclude_defaults=True)


def resolve_options(base: CheckOptions | None = None, /, **overrides: Any) -> CheckOptions:
    """Validate keyword options into a ``CheckOptions``; unknown names raise InvalidOptionError."""
    if "params" in overrides:
        raise InvalidOptionError(
            "params= is for a registered function named by a string; a callable's keyword "
            "arguments go in fn_kwargs={...}"
        )
    try:
        if base is None:
            return _validated(overrides)
        return (
            base.model_copy(update={})
            if not overrides
            else CheckOptions(**{**base.model_dump(exclude_unset=True), **overrides})
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidOptionError(f"invalid check option(s): {problems}") from None


@dataclass(frozen=True)
class CallArguments:
    """The keyword arguments of ``check`` that are not options: what to call and how to judge it."""

    fn_kwargs: dict[str, Any]
    input_names: tuple[str, ...] | None
    # Names or paths of the inputs / parameters to check (an int is a positional input);
    # None: the default selection (inputs that require grad, else all, plus a module's parameters).
    wrt: tuple[str | int, ...] | None
    expect: Literal["match", "mismatch"]
    deadline: float | None
    cancelled: Callable[[], bool] | None


def _names(value: object, what: str, allow_int: bool) -> tuple[Any, ...]:
    items = [value] if isinstance(value, (str, int)) else value
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise InvalidOptionError(f"{what} must be a name or a list of names, got {type(value).__name__}")
    names = []
    for item in items:
        position = allow_int and isinstance(item, int) and not isinstance(item, bool)
        if position or (isinstance(item, str) and item):
            names.append(item)
        else:
            raise InvalidOptionError(f"{what} holds {item!r}: expected a non-empty string")
    return tuple(names)


def call_arguments(
    *,
    fn_kwargs: object = None,
    input_names: object = None,
    wrt: object = None,
    expect: object = "match",
    deadline: object = None,
    cancelled: object = None,
) -> CallArguments:
    """Validate ``check``'s non-option keywords up front, so misuse never surfaces deep in the engine."""
    if fn_kwargs is None:
        fn_kwargs = {}
    if not isinstance(fn_kwargs, Mapping) or not all(isinstance(k, str) for k in fn_kwargs):
        raise InvalidOptionError(
            f"fn_kwargs must be a mapping of keyword names to values, got {type(fn_kwargs).__name__}"
        )
    names = None if input_names is None else _names(input_names, "input_names", allow_int=False)
    if names is not None and len(set(names)) != len(names):
        raise InvalidOptionError(f"input_names has duplicates: {list(names)}")
    if expect not in EXPECTATIONS:
        raise InvalidOptionError(f"expect={expect!r}: expected one of {', '.join(map(repr, EXPECTATIONS))}")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
        raise InvalidOptionError(f"deadline must be a time.monotonic() value, got {type(deadline).__name__}")
    if cancelled is not None and not callable(cancelled):
        raise InvalidOptionError(f"cancelled must be callable, got {type(cancelled).__name__}")
    return CallArguments(
        fn_kwargs=dict(fn_kwargs),
        input_names=names,
        wrt=None if wrt is None else _names(wrt, "wrt", allow_int=True),
        expect=expect,  # type: ignore[arg-type]
        deadline=None if deadline is None else float(deadline),
        cancelled=cancelled,
    )
