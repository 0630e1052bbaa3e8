"""Plugin tests: users' test files run through ``pytester``.

torch and gradcheck_svc are imported here, before any inner run, so in-process pytester runs find
them already loaded (pytester restores ``sys.modules`` after each run; a module loaded before the
snapshot stays, one loaded during a run would be re-imported by the next).
"""

from __future__ import annotations

import pytest
import torch  # noqa: F401  (see module docstring)

import gradcheck_svc  # noqa: F401

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _no_ambient_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GRADCHECK_SERVER from the developer's shell must not leak into the inner runs."""
    monkeypatch.delenv("GRADCHECK_SERVER", raising=False)
