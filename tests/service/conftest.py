"""Real servers on loopback port 0: in-process (fast, shared) and ``gradcheck-svc serve`` subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import service_test_ops
import torch  # noqa: F401  (imported once, before any server thread needs it)

from gradcheck_svc.client import Client
from gradcheck_svc.server import GradcheckServer, create_server
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry

HERE = Path(__file__).resolve().parent


def make_registry() -> FunctionRegistry:
    registry = FunctionRegistry.default(load_entry_points=False)
    registry.add_module(service_test_ops)
    return registry


@dataclass
class Running:
    server: GradcheckServer
    address: str


def start_server(**settings: object) -> Running:
    # device="cpu": reports are compared with in-process ones, which stay where the inputs are.
    defaults: dict[str, object] = {"host": "127.0.0.1", "port": 0, "entry_points": False, "device": "cpu"}
    server, port = create_server(Settings(**(defaults | settings)), registry=make_registry())
    server.start(warm_up=False)
    return Running(server, f"127.0.0.1:{port}")


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


# ----------------------------------------------------------------------------- subprocess servers


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "gradcheck-svc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gradcheck_svc.cli"]


class ServeProcess:
    """``gradcheck-svc serve --port 0`` in a subprocess; ``address`` once it printed 'listening on'."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [
                *serve_command(),
                "serve",
                "--port",
                "0",
                "--device",
                "cpu",  # reports are compared with in-process ones
                "--functions",
                "service_test_ops",
                "--no-entry-points",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env | (env or {}),
        )
        self.stderr_lines: list[str] = []
        self._stderr = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr.start()
        self._address: str | None = None

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def address(self) -> str:
        if self._address is None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # blocks until the server is ready (or died)
            if not line.startswith("listening on "):
                self.proc.kill()
                raise RuntimeError(f"server did not start: {line!r}\n{''.join(self.stderr_lines)}")
            self._address = line.removeprefix("listening on ").strip()
        return self._address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        time.sleep(0.1)  # let the stderr reader catch up
        return "".join(self.stderr_lines)


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
