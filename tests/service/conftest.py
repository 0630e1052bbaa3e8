"""Real servers on loopback port 0: in-process (fast, shared) and ``gradcheck-svc serve`` subprocesses.

The helpers live in ``service_servers`` (importable by worker processes and by tests/hardening);
they are re-exported here for ``from conftest import ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported once, before any server thread needs it)
from service_servers import (
    HERE,
    Running,
    ServeProcess,
    count_calls_in_this_process,
    make_registry,
    serve_command,
    start_server,
)

from gradcheck_svc.client import Client

__all__ = ["Running", "ServeProcess", "make_registry", "serve_command", "start_server"]

count_calls_in_this_process()


@pytest.fixture(scope="session")
def server() -> Iterator[Running]:
    """The shared server: default limits, replica name 'replica-a'."""
    running = start_server(replica_name="replica-a")
    yield running
    running.server.stop(grace=1)


@pytest.fixture(scope="session")
def address(server: Running) -> str:
    return server.address


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=60) as c:
        yield c


# Subprocess servers take seconds to import torch and warm up; those the selected tests need are
# started right after collection so they boot while the in-process tests run.
_SUBPROCESS_SERVERS: dict[str, Callable[[], ServeProcess]] = {
    "served": lambda: ServeProcess(env={"GRADCHECK_REPLICA_NAME": "replica-sub"}),
    "draining_server": lambda: ServeProcess(
        "--grace-seconds", "20", env={"GRADCHECK_REPLICA_NAME": "draining"}
    ),
}
_started: dict[str, ServeProcess] = {}


def _needs_subprocess(item: pytest.Item) -> bool:
    mine = HERE in Path(item.path).parents
    return mine and any(name in _SUBPROCESS_SERVERS for name in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wanted = {name for item in items if _needs_subprocess(item) for name in item.fixturenames}  # type: ignore[attr-defined]
    for name, make in _SUBPROCESS_SERVERS.items():
        if name in wanted and name not in _started:
            _started[name] = make()
    # Tests that use them run last, by which time the servers are up.
    items.sort(key=_needs_subprocess)


def _subprocess_server(name: str) -> Iterator[ServeProcess]:
    process = _started.pop(name, None) or _SUBPROCESS_SERVERS[name]()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def served() -> Iterator[ServeProcess]:
    """A ``gradcheck-svc serve`` subprocess shared by the CLI tests."""
    yield from _subprocess_server("served")


@pytest.fixture(scope="session")
def draining_server() -> Iterator[ServeProcess]:
    """A ``gradcheck-svc serve`` subprocess that the SIGTERM test stops."""
    yield from _subprocess_server("draining_server")


def pytest_sessionfinish() -> None:
    for process in _started.values():  # started but never used (e.g. deselected later)
        process.stop()
