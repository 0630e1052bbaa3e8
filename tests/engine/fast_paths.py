"""Fast mode with one of its paths on and off: the two reports, for tests that hold them equal."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.engine import fast, fast_batched


def reports_with_and_without(
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType,
    runner: str,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[Any, ...],
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The fast-mode report with ``module``'s path (``fast.<runner>``) on and with it off
    (``module.ENABLED``), and whether the first check took it on every call (two when it
    retried a kink) and the second never. The adaptive third node is off for both: the other
    paths do not take it (test_fast_adaptive holds its verdicts)."""
    monkeypatch.setattr(fast_batched, "ADAPTIVE", False)
    answered: list[bool] = []
    original = getattr(module, runner)

    def recording(ctx: Any) -> Any:
        found = original(ctx)
        answered.append(found is not None)
        return found

    monkeypatch.setattr(fast, runner, recording)
    on = gc.check(fn, *inputs, mode="fast", **options).model_dump()
    first, answered[:] = list(answered), []
    monkeypatch.setattr(module, "ENABLED", False)
    off = gc.check(fn, *inputs, mode="fast", **options).model_dump()
    monkeypatch.setattr(module, "ENABLED", True)
    on.pop("timings")
    off.pop("timings")
    return on, off, bool(first) and all(first) and not any(answered)
