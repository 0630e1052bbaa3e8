"""Where a check runs (in-process or on the server) and running it there.

Frames that can raise set ``__tracebackhide__``, so a failure points at the user's ``assert_grads`` line.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gradcheck.remote import RemoteServer
from pytest_gradcheck.settings import Resolved
from pytest_gradcheck.summary import LOCAL
from pytest_gradcheck.targets import (
    Target,
    bind_names,
    classify,
    registered_name,
    renamed,
    why_not_remote,
)

if TYPE_CHECKING:
    from gradcheck_svc.report import Report
    from gradcheck_svc.specs import FunctionRegistry

__all__ = ["Outcome", "run", "target_for"]


@dataclass(frozen=True)
class Outcome:
    report: Report
    where: str  # LOCAL or the server address
    fallback: str = ""  # why a check meant for the server ran locally


def _remote(server: RemoteServer | None, resolved: Resolved) -> RemoteServer | None:
    return server if server is not None and resolved.remote != "never" else None


def target_for(fn: Any, server: RemoteServer | None, resolved: Resolved) -> Target:
    """Classify ``fn``; a string is looked up in the server's registry when one is used."""
    __tracebackhide__ = True
    remote = _remote(server, resolved)
    if isinstance(fn, str) and remote is not None:
        return classify(fn, remote.registered)
    if isinstance(fn, str):
        return classify(fn, _local_registry())
    return classify(fn)


@functools.cache
def _local_registry() -> FunctionRegistry:
    """The registry a server started here would have: built-ins plus installed entry points."""
    from gradcheck_svc.specs import FunctionRegistry

    return FunctionRegistry.default()


def _split(inputs: Sequence[Any], names: list[str] | None) -> tuple[Sequence[Any], dict[str, Any]]:
    """A registered function takes tensors positionally, or named: by ``input_names`` or as one
    dict whose keys name them (the names label the report; the order is the call's)."""
    __tracebackhide__ = True
    if names is not None:
        return (), bind_names(names, inputs, f"input_names={names!r}")
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        return (), dict(inputs[0])
    return inputs, {}


def _no_names(target: Target, resolved: Resolved) -> None:
    __tracebackhide__ = True
    if resolved.input_names is not None and target.kind == "expression":
        raise TypeError("input_names is for callables: an expression's inputs are named by its variables")
    if target.kind == "callable" and resolved.params is not None:
        raise TypeError(
            "params= is for a registered function named by a string; "
            "a callable's keyword arguments go in fn_kwargs={...}"
        )
    if target.kind != "callable" and "fn_kwargs" in resolved.arguments:
        raise TypeError("fn_kwargs is for callables: a registered function takes params={...}")


def _local(target: Target, inputs: Sequence[Any], resolved: Resolved) -> Report:
    __tracebackhide__ = True
    import gradcheck_svc as gc

    if target.kind == "callable":
        names = {} if resolved.input_names is None else {"input_names": resolved.input_names}
        report = gc.check(target.fn, *inputs, **names, **resolved.arguments, **resolved.options)
        if renamed(target.fn):
            report = report.model_copy(update={"function": target.label})
        return report
    if target.kind == "expression":
        from gradcheck_svc.specs import compile_expression

        expression = compile_expression(target.text)  # callable with inputs in variable order
        names = list(expression.variables)
        named = bind_names(names, inputs, f"expression {target.text!r}")
        report = gc.check(
            expression, *named.values(), input_names=names, **resolved.arguments, **resolved.options
        )
    else:
        fn = _local_registry().bind(target.text, resolved.params)
        positional, named = _split(inputs, resolved.input_names)
        if named:
            report = gc.check(
                fn, *named.values(), input_names=list(named), **resolved.arguments, **resolved.options
            )
        else:
            report = gc.check(fn, *positional, **resolved.arguments, **resolved.options)
    return report.model_copy(update={"function": target.text})


def _on_server(server: RemoteServer, target: Target, inputs: Sequence[Any], resolved: Resolved) -> Report:
    __tracebackhide__ = True
    from gradcheck_svc.engine.expectation import apply_expectation

    report = _server_report(server, target, inputs, resolved)
    return apply_expectation(report, resolved.arguments.get("expect", "match"))


def _server_report(server: RemoteServer, target: Target, inputs: Sequence[Any], resolved: Resolved) -> Report:
    __tracebackhide__ = True
    options = resolved.options
    if target.kind == "expression":
        from gradcheck_svc.specs import parse_expression

        names = list(parse_expression(target.text).variables)
        named = bind_names(names, inputs, f"expression {target.text!r}")
        return server.call("check", target.text, options=options, **named)
    positional, named = _split(inputs, resolved.input_names)
    params = resolved.params or {}
    return server.call("check_registered", target.text, *positional, params=params, options=options, **named)


def _not_sendable(inputs: Sequence[Any]) -> str:
    """Why these inputs cannot travel to a server ("" when they can): only plain tensors do."""
    import torch

    if all(isinstance(x, torch.Tensor) for x in inputs):
        return ""
    return "inputs other than plain tensors"


def run(target: Target, inputs: Sequence[Any], resolved: Resolved, server: RemoteServer | None) -> Outcome:
    """Run the check where the policy says; a callable the server cannot run falls back or fails."""
    __tracebackhide__ = True
    _no_names(target, resolved)
    remote = _remote(server, resolved)
    if remote is None:
        return Outcome(_local(target, inputs, resolved), LOCAL)
    if "wrt" in resolved.arguments:  # the server checks every input
        why = "wrt= is applied in-process"
        if resolved.remote == "require":
            pytest.fail(f"gradcheck: {target.label}: {why} and remote='require' forbids running it locally")
        report = _local(target, inputs, resolved)
        report.notes.append(f"ran locally: {why}")
        return Outcome(report, LOCAL, fallback=why)
    if target.kind == "callable":
        assert target.fn is not None
        why = why_not_remote(target.fn) or _not_sendable(inputs)
        name = None if why else registered_name(target.fn, remote.registered)
        if name is None:
            why = why or "not registered on the server"
            if resolved.remote == "require":
                pytest.fail(
                    f"gradcheck: {target.label} cannot run on server {remote.address} ({why}) "
                    "and remote='require' forbids running it locally"
                )
            report = _local(target, inputs, resolved)
            report.notes.append(f"ran locally: server {remote.address} cannot run it ({why})")
            return Outcome(report, LOCAL, fallback=why)
        target = Target("registered", target.label, fn=target.fn, text=name)
    return Outcome(_on_server(remote, target, inputs, resolved), remote.address)
