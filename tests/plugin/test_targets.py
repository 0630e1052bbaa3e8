"""What ``fn`` is, and whether a server could run it (no server needed)."""

from __future__ import annotations

import functools

import plugin_sample_ops
import pytest
import torch
import torch.nn.functional as F

from gradcheck_svc.errors import SpecError
from pytest_gradcheck.targets import Target, bind_names, classify, registered_name, why_not_remote

REGISTERED = {
    "torch.sin",
    "torch.nn.functional.softplus",
    "plugin_sample_ops:scaled_sine",
    "plugin_sample_ops:BadCube",
}


def test_classify_strings() -> None:
    assert classify("u**2 + v", REGISTERED) == Target("expression", "u**2 + v", text="u**2 + v")
    assert classify("torch.sin", REGISTERED) == Target("registered", "torch.sin", text="torch.sin")
    # Name-shaped but unknown here: the registry (or server) gives the verdict, with its own message.
    assert classify("mypkg.ops:gelu", REGISTERED).kind == "registered"
    with pytest.raises(SpecError):
        classify("x +* 2", REGISTERED)
    with pytest.raises(TypeError, match="needs a callable, an expression string or a registered name"):
        classify(3.0)


def test_labels() -> None:
    assert classify(torch.sin).label == "torch.sin"
    assert classify(plugin_sample_ops.scaled_sine).label == "scaled_sine"
    assert classify(plugin_sample_ops.BadCube.apply).label == "BadCube"


def test_why_not_remote() -> None:
    def closure(x: torch.Tensor) -> torch.Tensor:
        return x

    assert why_not_remote(lambda x: x) == "lambda"
    assert why_not_remote(closure) == "closure (defined inside a function)"
    assert (
        why_not_remote(functools.partial(torch.sum, dim=0)) == "callable object, not a module-level function"
    )
    assert why_not_remote(plugin_sample_ops.scaled_sine) == ""
    assert why_not_remote(torch.sin) == ""


def test_registered_name() -> None:
    assert registered_name(plugin_sample_ops.scaled_sine, REGISTERED) == "plugin_sample_ops:scaled_sine"
    assert registered_name(plugin_sample_ops.BadCube.apply, REGISTERED) == "plugin_sample_ops:BadCube"
    assert registered_name(torch.sin, REGISTERED) == "torch.sin"
    assert registered_name(F.softplus, REGISTERED) == "torch.nn.functional.softplus"  # lives in torch._C._nn
    assert registered_name(torch.cos, REGISTERED) is None
    assert registered_name(F.softplus, {"torch.softplus"}) is None  # same short name, different object


def test_bind_names() -> None:
    u, v = torch.tensor(1.0), torch.tensor(2.0)
    assert list(bind_names(["u", "v"], [u, v], "e")) == ["u", "v"]
    by_name = bind_names(["u", "v"], [{"v": v, "u": u}], "e")
    assert list(by_name) == ["u", "v"] and by_name["u"] is u  # the expression's order, not the dict's
    with pytest.raises(TypeError, match=r"e takes 2 input\(s\) \(u, v\), got 1"):
        bind_names(["u", "v"], [u], "e")
