"""Every pytest run in the environment loads the plugin, so loading it must not pull in torch or grpc."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "grpc", "gradcheck_svc")


def _imported(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    # importtime lines: "import time: self [us] | cumulative | <indent>module"
    return {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("module", ["pytest_gradcheck", "pytest_gradcheck.plugin"])
def test_import_is_light(module: str) -> None:
    modules = _imported(f"import {module}")
    assert module in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == []


def test_a_run_without_checks_loads_neither_torch_nor_grpc(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import sys

        def pytest_unconfigure(config):
            loaded = sorted(m for m in ("torch", "grpc", "gradcheck_svc.engine") if m in sys.modules)
            print("HEAVY:", loaded)
        """
    )
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["HEAVY: []"])
