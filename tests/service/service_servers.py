"""Real servers on loopback for tests: in-process (``start_server``) and ``gradcheck-svc serve``
subprocesses (``ServeProcess``). Plain helpers, no pytest: worker processes of a test server import
this module to rebuild its registry (``make_registry`` is the server's registry factory)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import service_test_ops
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradcheck_svc.server import GradcheckServer, create_server
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry

HERE = Path(__file__).resolve().parent


def count_calls_in_this_process() -> None:
    """Make ``service_test_ops.calls`` count into a file of this process, which the worker processes
    of its servers inherit (each pytest-xdist worker gets its own file)."""
    path = Path(tempfile.gettempdir()) / f"gradcheck-test-calls-{os.getpid()}"
    os.environ[service_test_ops.CALLS_ENV] = str(path)
    service_test_ops.reset()


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
    server, port = create_server(Settings(**(defaults | settings)), registry_factory=make_registry)
    server.start(warm_up=False)
    if server.service.workers is not None:
        # The workers' fork server imports torch (seconds): start it now, off the test's clock.
        threading.Thread(target=server.service.workers.warm_up, daemon=True).start()
    return Running(server, f"127.0.0.1:{port}")


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


def refusal(error: grpc.RpcError) -> tuple[str, list[str], bool]:
    """A refusal's ErrorInfo reason, QuotaFailure subjects, and whether RetryInfo came along."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, subjects, retry = "", [], False
    for detail in status.details:
        info, quota = error_details_pb2.ErrorInfo(), error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(quota):
            subjects += [v.subject for v in quota.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = True
    return reason, subjects, retry
