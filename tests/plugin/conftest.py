"""Plugin tests: users' test files run through ``pytester``.

torch and gradcheck_svc are imported here, before any inner run, so in-process pytester runs find
them already loaded (pytester restores ``sys.modules`` after each run; a module loaded before the
snapshot stays, one loaded during a run would be re-imported by the next).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# torch._dynamo registers operator libraries, which may happen once per process only: load it
# before any inner run (some checks load it) rather than let one run load it and the next reload it.
import torch._dynamo  # noqa: F401

import gradcheck_svc  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    # pytester, loaded from here rather than by ``pytest_plugins``: pytest refuses ``pytest_plugins``
    # in a conftest below the rootdir when the whole suite runs from the root. A no-op when
    # ``-p pytester`` already loaded it.
    config.pluginmanager.import_plugin("pytester")


@pytest.fixture(autouse=True)
def _no_ambient_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GRADCHECK_SERVER from the developer's shell must not leak into the inner runs."""
    monkeypatch.delenv("GRADCHECK_SERVER", raising=False)


@pytest.fixture(scope="session")
def server_address() -> Iterator[str]:
    """A real gradcheck server on a free loopback port, with ``plugin_sample_ops`` registered."""
    import plugin_sample_ops

    from gradcheck_svc.server import create_server
    from gradcheck_svc.settings import Settings
    from gradcheck_svc.specs import FunctionRegistry

    registry = FunctionRegistry.default(load_entry_points=False)
    registry.add_module(plugin_sample_ops)
    server, port = create_server(
        Settings(host="127.0.0.1", port=0, replica_name="test-replica"), registry=registry
    )
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=1)
