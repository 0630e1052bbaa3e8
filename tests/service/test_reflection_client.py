"""examples/reflection_client.py against a real server, with gradcheck_svc made unimportable: every
type it uses (google/rpc and google/protobuf ones included) comes from server reflection."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_servers import Running, start_server

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "reflection_client.py"
# Block the project's package (and with it the generated code) before the script runs.
RUN_BLIND = (
    "import runpy, sys; sys.modules['gradcheck_svc'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    running = start_server(replica_name="reflected")
    yield running
    running.server.stop(grace=1)


def test_reflection_only_client(server: Running) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_BLIND, str(SCRIPT), server.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "gradcheck_svc.v1.GradcheckService" in out and "google.rpc.BadRequest" in out
    assert "float64 x**2: d/dx = 18 ok=True" in out and "float32 x**2: d/dx = 18 ok=True" in out
    assert "float64 u*v + u**2 + v**3: d/du = 8, d/dv = 50 ok=True" in out
    assert "rejected: INVALID_ARGUMENT; BadRequest fields: ['function.expression']" in out
    assert "external cube: ok=True" in out and "all outcomes as expected" in out
