"""The object behind the ``assert_grads`` fixture: merge options, run, record, raise on mismatch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gradcheck import dispatch
from pytest_gradcheck.remote import RemoteServer, ServerUnreachable
from pytest_gradcheck.settings import Defaults, resolve
from pytest_gradcheck.summary import LOCAL, CheckRecord, Tally

if TYPE_CHECKING:
    from gradcheck_svc.report import Report

__all__ = ["AssertGrads", "PluginState"]


@dataclass
class PluginState:
    """Per-session state, kept in ``config.stash``."""

    defaults: Defaults
    tally: Tally = field(default_factory=Tally)
    server: RemoteServer | None = None
    # Makes a ``progress(done, total)`` callback for one check (nodeid, label); None: no progress shown.
    progress: Callable[[str, str], Callable[[int, int], None]] | None = None

    def __post_init__(self) -> None:
        if self.defaults.server is not None:
            self.server = RemoteServer(self.defaults.server)  # connects on first use only

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class AssertGrads:
    """``assert_grads(fn, *inputs, **options)``: check the gradients of ``fn`` at ``inputs``.

    ``fn`` is a callable, an expression string (inputs positional in the order the variables first
    appear, or one dict keyed by variable name) or a registered function name (``"pkg.mod:fn"``
    resolves without a server too). ``inputs`` are the positional arguments in call order: tensors
    and plain constants such as ``dim``. ``options`` are the engine's (atol, rtol, mode, kinks,
    device, ...) plus ``remote=`` ("prefer" | "require" | "never"), ``params=`` (or ``fn_kwargs=``:
    constant keyword arguments of ``fn``) and ``input_names=``. Returns the ``gradcheck_svc.Report``;
    raises ``gradcheck_svc.GradientMismatch`` (an AssertionError) with the readable report on a mismatch.
    """

    def __init__(self, state: PluginState, item: pytest.Item) -> None:
        self._state = state
        self._item = item

    def __repr__(self) -> str:  # shown among the test's arguments in a failure
        server = self._state.server
        return f"<assert_grads fixture, {'server ' + server.address if server else 'local'}>"

    def __call__(self, fn: Any, /, *inputs: Any, **options: Any) -> Report:
        __tracebackhide__ = True
        import gradcheck_svc as gc  # torch loads with the first check, not with the plugin

        resolved = resolve(
            self._state.defaults,
            [(m.args, m.kwargs) for m in self._item.iter_markers("gradcheck")],
            options,
            gc.CheckOptions.model_fields,
        )
        server = self._state.server
        started = time.perf_counter()
        label = dispatch.label_for(fn)
        unreachable = ""
        progress = self._state.progress(self._item.nodeid, label) if self._state.progress else None
        try:
            outcome = dispatch.run(fn, inputs, resolved, server, progress)
            label = outcome.label or label
        except ServerUnreachable as exc:
            assert server is not None
            unreachable = str(exc)
            self._record(label, server.address, started, ok=False, error=unreachable, unreachable=True)
        except (Exception, pytest.fail.Exception) as exc:  # recorded as "could not run", then re-raised
            where = server.address if server is not None and resolved.remote != "never" else LOCAL
            self._record(label, where, started, ok=False, error=f"{type(exc).__name__}: {exc}")
            if isinstance(exc, gc.GradcheckError):
                # The engine's own error says what went wrong: shown at the user's line, not in
                # the engine's frames (fn's exception stays attached as the cause).
                raise exc.with_traceback(None)  # noqa: B904  # the same exception, re-raised
            raise
        if unreachable:  # outside the except block: no "during handling" chain in the output
            pytest.fail(unreachable, pytrace=False)
        report = outcome.report
        self._record(
            label,
            outcome.where,
            started,
            ok=report.ok,
            kinks=report.kinks,
            fallback=outcome.fallback,
            expected_mismatch=report.expected_mismatch,
        )
        if not report.ok:
            raise gc.GradientMismatch(report)
        return report

    def _record(self, label: str, where: str, started: float, **fields: Any) -> None:
        seconds = time.perf_counter() - started
        warmup = not self._state.tally.records  # this process's first check also loads torch and the engine
        record = CheckRecord(self._item.nodeid, label, where, seconds=seconds, warmup=warmup, **fields)
        self._state.tally.add(record)
