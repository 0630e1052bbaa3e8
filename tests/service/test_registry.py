"""Registered functions: the built-in allowlist, operator modules and entry points."""

from __future__ import annotations

import types
from importlib.metadata import EntryPoint

import pytest
import service_test_ops
import torch

from gradcheck_svc.errors import SpecError, UnknownFunctionError
from gradcheck_svc.specs import FunctionRegistry
from gradcheck_svc.specs import registry as registry_module


@pytest.fixture(scope="module")
def registry() -> FunctionRegistry:
    return FunctionRegistry.default(load_entry_points=False)


def test_builtins_by_public_name(registry: FunctionRegistry) -> None:
    for name in [
        "torch.sin",
        "torch.nn.functional.gelu",
        "torch.linalg.solve",
        "torch.nn.functional.softmax",
        "torch.nn.functional.conv2d",
    ]:
        assert name in registry
    x = torch.randn(5, dtype=torch.float64)
    assert torch.equal(registry.bind("torch.sin")(x), torch.sin(x))
    assert torch.equal(registry.bind("torch.nn.functional.softmax", {"dim": -1})(x), torch.softmax(x, -1))
    gelu = registry.bind("torch.nn.functional.gelu", {"approximate": "tanh"})
    assert torch.equal(gelu(x), torch.nn.functional.gelu(x, approximate="tanh"))
    a, b = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3), torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(registry.bind("torch.linalg.solve")(a, b), torch.linalg.solve(a, b))


def test_bound_function_carries_the_registered_name(registry: FunctionRegistry) -> None:
    assert registry.bind("torch.nn.functional.softmax", {"dim": 0}).__name__ == "torch.nn.functional.softmax"


def test_layer_norm_takes_tensors_first(registry: FunctionRegistry) -> None:
    x, w, b = torch.randn(2, 4), torch.randn(4), torch.randn(4)
    got = registry.bind("torch.nn.functional.layer_norm", {"normalized_shape": [4]})(x, w, b)
    assert torch.allclose(got, torch.nn.functional.layer_norm(x, (4,), w, b))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("torch.nn.functional.softmax", {"dim": 1.5}, "must be an integer"),
        ("torch.nn.functional.softmax", {"dims": 0}, "has no parameter 'dims'"),
        ("torch.nn.functional.gelu", {"approximate": "os.system"}, "must be one of"),
        ("torch.nn.functional.elu", {"alpha": float("nan")}, "finite"),
        ("torch.nn.functional.elu", {"alpha": float("inf")}, "finite"),
        ("torch.nn.functional.conv1d", {"stride": list(range(100))}, "more than 64 items"),
        ("torch.sin", {"out": 1}, "has no parameter 'out'"),
    ],
)
def test_bad_params(registry: FunctionRegistry, name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        registry.bind(name, params)


def test_unknown_names_are_looked_up_never_imported(registry: FunctionRegistry) -> None:
    for name in ["os.system", "torch.load", "builtins:eval", "service_test_ops:slow_square", "torch", ""]:
        with pytest.raises(UnknownFunctionError):
            registry.get(name)


def test_operator_module_is_exposed_as_module_colon_name() -> None:
    registry = FunctionRegistry.default(["service_test_ops"], load_entry_points=False)
    assert "service_test_ops:slow_square" in registry
    assert "service_test_ops:BadBackward" in registry  # an autograd.Function, through .apply
    assert "service_test_ops:reset" in registry
    fn = registry.bind("service_test_ops:slow_square", {"delay": 0})
    assert fn(torch.tensor(3.0)).item() == 9
    with pytest.raises(SpecError, match="has no parameter 'speed'"):
        registry.bind("service_test_ops:slow_square", {"speed": 1})


def test_module_without_all_exposes_its_own_public_functions() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x

    def borrowed(x: torch.Tensor) -> torch.Tensor:
        return x

    module = types.ModuleType("opsmod")
    f.__module__ = "opsmod"
    module.f, module._hidden, module.borrowed, module.torch = f, f, borrowed, torch  # type: ignore[attr-defined]
    registry = FunctionRegistry()
    assert registry.add_module(module) == ["opsmod:f"]


def test_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    points = [
        EntryPoint("ops", "service_test_ops", "gradcheck_svc.functions"),
        EntryPoint("one", "torch.nn.functional:silu", "gradcheck_svc.functions"),
    ]
    monkeypatch.setattr(
        registry_module, "entry_points", lambda group: points if group == "gradcheck_svc.functions" else []
    )
    registry = FunctionRegistry.default()
    assert "service_test_ops:raises_when_negative" in registry
    assert "torch.nn.functional:silu" in registry
    assert service_test_ops.slow_square.__name__ == "slow_square"


def test_names_are_sorted_and_unique(registry: FunctionRegistry) -> None:
    names = registry.names()
    assert names == sorted(set(names))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("torch.sin", torch.sin)
