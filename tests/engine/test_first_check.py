"""The first check in a process imports only what it uses; the memory meter still works beside
torch.compile."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import gradcheck_svc as gc
from gradcheck_svc.engine.guard import CheckGuard, peak_bytes

_FIRST_CHECK = """
import json, sys, torch
import gradcheck_svc as gc
report = gc.check(lambda x: x**2, torch.tensor(9.0, dtype=torch.float64))
heavy = ("torch._dynamo", "grpc", "google.protobuf", "matplotlib", "gradcheck_svc.server")
print(json.dumps(dict(ok=report.ok, loaded=sorted(m for m in sys.modules if m.startswith(heavy)))))
"""


def test_a_first_check_imports_neither_dynamo_nor_the_service():
    out = subprocess.run([sys.executable, "-c", _FIRST_CHECK], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"ok": True, "loaded": []}


def test_the_meter_and_guard_run_compiled_code_once_dynamo_is_loaded():
    compiled = torch.compile(lambda x: torch.sin(x) * 2, backend="eager")
    x = torch.randn(5, dtype=torch.float64)
    expected = torch.sin(x) * 2
    assert torch.equal(compiled(x), expected)  # imports torch._dynamo
    assert "torch._dynamo" in sys.modules
    value, peak = peak_bytes(lambda: compiled(x))
    assert torch.equal(value, expected)
    assert peak >= x.numel() * x.element_size()
    with CheckGuard(max_bytes=2**30):
        assert torch.equal(compiled(x), expected)
    report = gc.check(compiled, x)
    assert report.ok
