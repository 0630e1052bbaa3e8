"""The Node.js example (examples/node) against a real server: seeds as expressions, its own
JavaScript function with a hand-written gradient through CheckExternal (correct and planted bug),
and refusals whose google.rpc details it decodes from the vendored protos.

Needs ``node`` (20+) and the example's packages: ``.ci/run`` installs them with ``npm ci``; when
they are missing here the test installs them the same way, and fails loudly if it cannot.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_servers import Running, start_server

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


@pytest.fixture(scope="module")
def node_example() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "the Node.js example needs node 20+ and npm on PATH"
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run([npm, "ci"], cwd=EXAMPLE, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed in {EXAMPLE}:\n{done.stdout}\n{done.stderr}"
    return EXAMPLE


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    running = start_server(replica_name="node-target")
    yield running
    running.server.stop(grace=1)


def test_node_client_seeds_and_its_own_gradient(node_example: Path, server: Running) -> None:
    done = subprocess.run(
        ["node", "client.js", server.address], cwd=node_example, capture_output=True, text=True, timeout=120
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert 'seed x**2 at {"x":9}: d/dx = 18 ok=true' in out
    assert "d/dx = -0.246875 ok=true" in out
    assert "d/du = 8, d/dv = 50 ok=true" in out
    correct, buggy = out.split("js_layer: ")[1].split("js_layer_planted_bug: ")
    assert correct.startswith("ok=true") and "STATUS_FAIL" not in correct
    assert buggy.startswith("ok=false")
    assert "d output / d W: STATUS_FAIL (1/12 failed)" in buggy
    assert "output[1] / W[1, 2]: analytic" in buggy
    # Refusals read as a program in another language reads them: code, ErrorInfo reason, and the
    # BadRequest field or QuotaFailure limit, from the grpc-status-details-bin trailer.
    assert "refused unknown registered function: NOT_FOUND FUNCTION_NOT_FOUND" in out
    data_field = "explicit_points.points[0].tensors[0].tensor.data"
    assert f"refused data shorter than its shape: INVALID_ARGUMENT REQUEST_INVALID ({data_field})" in out
    assert "refused dtype left unset: INVALID_ARGUMENT REQUEST_INVALID" in out
    assert "reaches for Python: INVALID_ARGUMENT EXPRESSION_INVALID (function.expression)" in out
    assert "beyond the server's limit: RESOURCE_EXHAUSTED LIMIT_EXCEEDED (max_tensor_elements)" in out
    assert "UNEXPECTED" not in out
    assert "node client: all outcomes as expected" in out


def test_proto_passes_buf_lint(node_example: Path) -> None:
    buf = node_example / "node_modules" / ".bin" / "buf"
    done = subprocess.run(
        [str(buf), "lint", "protos"], cwd=node_example.parents[1], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
