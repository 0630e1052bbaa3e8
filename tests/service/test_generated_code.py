"""gradcheck_svc/v1/ must be exactly what scripts/gen_protos.py makes of protos/ (never edited by hand)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from gradcheck_svc.v1 import gradcheck_pb2

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "gradcheck_svc" / "v1"


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    _gen_protos().generate(out)
    return out / "gradcheck_svc" / "v1"


def test_generated_code_is_up_to_date(regenerated: Path) -> None:
    fresh = {p.name: p.read_text() for p in regenerated.iterdir() if p.is_file()}
    committed = {
        p.name: p.read_text() for p in COMMITTED.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
    }
    assert sorted(fresh) == sorted(committed), "run: python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}; run: python scripts/gen_protos.py"


def test_descriptor_matches_the_proto(regenerated: Path) -> None:
    """Independent of generator versions: the loaded descriptor equals a fresh one from protos/."""
    text = (regenerated / "gradcheck_pb2.py").read_text()
    start = text.index("AddSerializedFile(b") + len("AddSerializedFile(")
    end = text.index(")\n", start)
    fresh = ast.literal_eval(text[start:end])  # the bytes literal protoc wrote
    assert fresh == gradcheck_pb2.DESCRIPTOR.serialized_pb


def test_generated_imports_are_package_absolute() -> None:
    grpc_module = (COMMITTED / "gradcheck_pb2_grpc.py").read_text()
    assert "from gradcheck_svc.v1 import gradcheck_pb2" in grpc_module
    assert "\nimport gradcheck_pb2" not in grpc_module


def test_fix_imports_rewrites_bare_sibling_imports() -> None:
    fixed = _gen_protos().fix_imports("import gradcheck_pb2 as g\nimport grpc\n")
    assert fixed == "from gradcheck_svc.v1 import gradcheck_pb2 as g\nimport grpc\n"


def test_every_proto_field_is_documented() -> None:
    lines = (ROOT / "protos" / "gradcheck_svc" / "v1" / "gradcheck.proto").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_field = (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("//", "option", "syntax"))
        )
        is_decl = stripped.startswith(("message ", "enum ", "service ", "rpc ", "oneof "))
        if (is_field or is_decl) and not lines[i - 1].strip().startswith("//"):
            undocumented.append(f"{i + 1}: {stripped}")
    assert not undocumented
