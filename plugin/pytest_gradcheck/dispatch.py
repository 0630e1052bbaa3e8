"""Where a check runs (in-process or on the server) and running it there.

Binding (function + arguments -> call) is ``gradcheck_svc.binding``'s; this module only decides
where the call runs. Frames that can raise set ``__tracebackhide__``, so a failure points at the
user's ``assert_grads`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gradcheck.remote import RemoteServer
from pytest_gradcheck.settings import Resolved
from pytest_gradcheck.summary import LOCAL

if TYPE_CHECKING:
    from gradcheck_svc.binding import Portable
    from gradcheck_svc.report import Report

__all__ = ["Outcome", "label_for", "run"]

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Outcome:
    report: Report
    where: str  # LOCAL or the server address
    fallback: str = ""  # why a check meant for the server ran locally
    label: str = ""


def _remote(server: RemoteServer | None, resolved: Resolved) -> RemoteServer | None:
    return server if server is not None and resolved.remote != "never" else None


def label_for(fn: Any) -> str:
    """The label of a check before it is bound (for the summary when binding itself fails)."""
    from gradcheck_svc.binding import label_of

    return fn.strip() if isinstance(fn, str) else label_of(fn) if callable(fn) else repr(fn)


def _check_keywords(fn: Any, resolved: Resolved) -> None:
    """params= names a registered function's parameters; a callable's keywords go in fn_kwargs=."""
    __tracebackhide__ = True
    if not isinstance(fn, str) and resolved.params is not None:
        raise TypeError(
            "params= is for a registered function named by a string; "
            "a callable's keyword arguments go in fn_kwargs={...}"
        )
    if isinstance(fn, str) and "fn_kwargs" in resolved.arguments:
        raise TypeError("fn_kwargs is for callables: a registered function takes params={...}")


def _constants(fn: Any, resolved: Resolved) -> dict[str, Any] | None:
    """The call's constant keyword arguments: params of a name, fn_kwargs of a callable."""
    return resolved.params if isinstance(fn, str) else resolved.arguments.get("fn_kwargs")


def _check_arguments(resolved: Resolved) -> dict[str, Any]:
    """check()'s own keywords besides the function's (wrt, expect), when given."""
    return {k: v for k, v in resolved.arguments.items() if k != "fn_kwargs"}


def _local(fn: Any, inputs: Sequence[Any], resolved: Resolved, progress: ProgressFn | None) -> Outcome:
    __tracebackhide__ = True
    from gradcheck_svc.binding import bind

    call = bind(fn, inputs, names=resolved.input_names, kwargs=_constants(fn, resolved))
    report = call.check(progress=progress, **_check_arguments(resolved), **resolved.options)
    return Outcome(report, LOCAL, label=call.label)


def _refuse(remote: RemoteServer, label: str, why: str) -> None:
    __tracebackhide__ = True
    pytest.fail(
        f"gradcheck: {label} cannot run on server {remote.address} ({why}) "
        "and remote='require' forbids running it locally"
    )


def _fallback(
    remote: RemoteServer,
    fn: Any,
    inputs: Sequence[Any],
    resolved: Resolved,
    progress: ProgressFn | None,
    why: str,
) -> Outcome:
    __tracebackhide__ = True
    label = label_for(fn)
    if resolved.remote == "require":
        _refuse(remote, label, why)
    outcome = _local(fn, inputs, resolved, progress)
    outcome.report.notes.append(f"ran locally: server {remote.address} cannot run it ({why})")
    return Outcome(outcome.report, LOCAL, fallback=why, label=outcome.label)


def _on_server(
    remote: RemoteServer,
    function: Any,
    point: dict[str, Any],
    resolved: Resolved,
    progress: ProgressFn | None,
) -> Report:
    """One point checked on the server, streaming its progress when someone listens; an
    expected mismatch (expect=) is judged here, on the server's report."""
    __tracebackhide__ = True
    from gradcheck_svc.engine.expectation import apply_expectation

    if progress is None:
        report = remote.call("check_points", function, [point], options=resolved.options)[0]
    else:
        report = remote.call(
            "check_with_progress",
            function,
            [point],
            lambda _point, done, total: progress(done, total),
            options=resolved.options,
        )[0]
    return apply_expectation(report, resolved.arguments.get("expect", "match"))


def _send(
    remote: RemoteServer, travelling: Portable, label: str, resolved: Resolved, progress: ProgressFn | None
) -> Outcome:
    """Send a registered call as it travels; the report names it as the server registered it."""
    __tracebackhide__ = True
    from gradcheck_svc.client import Registered

    report = _on_server(remote, Registered.of(travelling), travelling.tensors, resolved, progress)
    return Outcome(report, remote.address, label=label)


def run(
    fn: Any,
    inputs: Sequence[Any],
    resolved: Resolved,
    server: RemoteServer | None,
    progress: ProgressFn | None = None,
) -> Outcome:
    """Run the check where the policy says; what the server cannot run falls back or fails."""
    __tracebackhide__ = True
    _check_keywords(fn, resolved)
    remote = _remote(server, resolved)
    if remote is None:
        return _local(fn, inputs, resolved, progress)
    if "wrt" in resolved.arguments:  # the server checks every input
        return _fallback(remote, fn, inputs, resolved, progress, "wrt= is applied in-process")
    from gradcheck_svc.binding import (
        Call,
        bind_callable,
        is_registered_name,
        portable,
        portable_named,
        why_not_remote,
    )

    if isinstance(fn, str):
        text = fn.strip()
        if not is_registered_name(text, remote.registered):  # an expression: it travels as text
            from gradcheck_svc.binding import BindingError, bind_names
            from gradcheck_svc.specs import parse_expression

            if resolved.input_names is not None:
                raise BindingError(
                    "input_names is for callables: an expression's inputs are named by its variables"
                )
            names = list(parse_expression(text).variables)
            named = bind_names(names, inputs, f"expression {text!r}")
            report = _on_server(remote, text, named, resolved, progress)
            return Outcome(report, remote.address, label=text)
        if text not in remote.registered:
            return _fallback(remote, fn, inputs, resolved, progress, "not registered on the server")
        travelling = portable_named(text, inputs, names=resolved.input_names, params=resolved.params)
        label = text
    else:
        kwargs = resolved.arguments.get("fn_kwargs")
        call: Call = bind_callable(fn, inputs, names=resolved.input_names, kwargs=kwargs)
        never = why_not_remote(fn)  # decided here, without asking an unreachable server
        travelling = never or portable(call, remote.registered)
        label = call.label
    if isinstance(travelling, str):
        return _fallback(remote, fn, inputs, resolved, progress, travelling)
    return _send(remote, travelling, label, resolved, progress)
