"""Options of a check, validated in one place and shared by library, service and plugin."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradcheck_svc.errors import InvalidOptionError

__all__ = ["CheckOptions", "resolve_options"]


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


def resolve_options(base: CheckOptions | None = None, /, **overrides: Any) -> CheckOptions:
    """Validate keyword options into a ``CheckOptions``; unknown names raise InvalidOptionError."""
    try:
        if base is None:
            return CheckOptions(**overrides)
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
