"""pytest hooks and the ``assert_grads`` fixture (entry point ``pytest11: gradcheck``).

Thin on purpose: the logic lives in plain modules (settings, dispatch, summary). Loading this module
imports neither torch nor grpc; both load with the first check that needs them.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_gradcheck.checker import AssertGrads, PluginState
from pytest_gradcheck.settings import add_options, read_defaults
from pytest_gradcheck.summary import summary_lines

__all__ = ["assert_grads"]

STATE = pytest.StashKey[PluginState]()
_WORKER_KEY = "pytest_gradcheck.records"  # in xdist's workeroutput


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gradcheck(**options): options for assert_grads in this test "
        "(engine options such as atol, rtol, mode, kinks, device; remote='prefer'|'require'|'never')",
    )
    config.stash[STATE] = PluginState(read_defaults(config))


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """With -v, and a terminal of our own (not an xdist worker), long checks show progress."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and config.get_verbosity() >= 1 and not _is_worker(config):
        from pytest_gradcheck.progress import terminal_progress

        config.stash[STATE].progress = terminal_progress(reporter)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close()


def pytest_report_header(config: pytest.Config) -> str | None:
    defaults = config.stash[STATE].defaults
    if defaults.server is None or defaults.remote == "never":
        return None
    return f"gradcheck: server {defaults.server} (remote={defaults.remote})"


@pytest.fixture
def assert_grads(request: pytest.FixtureRequest) -> AssertGrads:
    """Check gradients: ``assert_grads(fn, *inputs, **options)`` returns the Report or raises
    ``gradcheck_svc.GradientMismatch`` with the readable report."""
    return AssertGrads(request.config.stash[STATE], request.node)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if _is_worker(session.config):  # hand this worker's records to the controller
        workeroutput: dict[str, Any] = session.config.workeroutput  # type: ignore[attr-defined]
        workeroutput[_WORKER_KEY] = session.config.stash[STATE].tally.dump()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: collect the records of a finished worker."""
    output = getattr(node, "workeroutput", None) or {}
    node.config.stash[STATE].tally.load(output.get(_WORKER_KEY, ()))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = summary_lines(config.stash[STATE].tally.records, verbose=config.get_verbosity() >= 1)
    if not lines or _is_worker(config):
        return
    terminalreporter.write_sep("=", "gradcheck")
    for line in lines:
        terminalreporter.write_line(line)
