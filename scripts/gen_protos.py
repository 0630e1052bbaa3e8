"""Regenerate gradcheck_svc/v1/ from protos/ (messages, gRPC stubs and typed .pyi stubs).

    .venv/bin/python scripts/gen_protos.py            # rewrite gradcheck_svc/v1/
    .venv/bin/python scripts/gen_protos.py --out DIR  # write the package into DIR/gradcheck_svc/v1/

The proto path mirrors the Python package (protos/gradcheck_svc/v1/ -> gradcheck_svc.v1), so
protoc's absolute imports (``from gradcheck_svc.v1 import gradcheck_pb2``) are already right;
``fix_imports`` only rewrites the bare ``import gradcheck_pb2`` style some plugins emit.
tests/service/test_generated_code.py regenerates into a temporary directory and fails when the
committed code is stale.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "gradcheck_svc/v1"
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))

INIT = '''"""Generated protobuf and gRPC code for gradcheck_svc.v1 (from protos/; never edit by hand).

Regenerate with ``python scripts/gen_protos.py``. Reach these modules through
gradcheck_svc.codec, gradcheck_svc.server and gradcheck_svc.client.
"""
'''


def _include_dirs() -> list[str]:
    """protos/ (with the vendored google/rpc/*.proto) and protoc's own well-known types.

    Only gradcheck_svc/v1 is generated: the google.rpc Python modules come from
    googleapis-common-protos, built from the same .proto files.
    """
    well_known = str(resources.files("grpc_tools") / "_proto")
    return [str(PROTO_ROOT), well_known]


def _plugins() -> list[str]:
    """mypy-protobuf's plugins live next to this interpreter, which need not be on PATH."""
    flags = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        path = Path(sys.executable).parent / name
        found = str(path) if path.exists() else shutil.which(name)
        if found is None:
            raise SystemExit(f"{name} not found: install mypy-protobuf")
        flags.append(f"--plugin={name}={found}")
    return flags


def fix_imports(text: str) -> str:
    """Make sibling imports absolute within gradcheck_svc.v1 (a no-op for protoc's usual output)."""
    sibling = re.compile(r"^import (\w+_pb2(?:_grpc)?) as ", flags=re.M)
    return sibling.sub(r"from gradcheck_svc.v1 import \1 as ", text)


def generate(out_root: Path) -> list[Path]:
    """Run protoc and the mypy plugins; write the package under ``out_root``; return the files."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            *(f"-I{d}" for d in _include_dirs()),
            *_plugins(),
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        target = out_root / PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / PACKAGE).iterdir()):
            dest = target / src.name
            dest.write_text(fix_imports(src.read_text()))
            written.append(dest)
        init = target / "__init__.py"
        init.write_text(INIT)
        written.append(init)
        return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write gradcheck_svc/v1/ under")
    args = parser.parse_args(argv)
    if args.out.resolve() == ROOT:
        # Start clean so a removed .proto leaves no orphan modules behind.
        shutil.rmtree(ROOT / PACKAGE, ignore_errors=True)
    for path in generate(args.out):
        print(path.relative_to(args.out) if path.is_relative_to(args.out) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
