"""The attacks of the hardening work, against a real ``gradcheck-svc serve``: status, peak RSS, seconds.

    python benchmarks/bench_attacks.py                      # this checkout's server
    python benchmarks/bench_attacks.py --skip-huge          # leave out the multi-GB attacks
    python benchmarks/bench_attacks.py --server-python /other/venv/bin/python   # another build

Each attack is one raw gRPC request (not the project's client). The server's peak resident memory
(VmHWM from /proc, reset before each attack) and the call's wall time are printed side by side.
Linux only. The server runs with ``--max-check-seconds 5`` and, where it knows the flag, the
default per-check memory budget.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch

from gradcheck_svc.client import Registered, build_request
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
GiB = 2**30


def peak(pid: int, field: str = "VmHWM") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(f"{field}:"))


def _many_scalars(count: int) -> pb.CheckRequest:
    scalar = pb.Tensor(dtype=pb.DTYPE_FLOAT64, data=bytes(8))
    point = pb.Point(tensors=[pb.NamedTensor(name=f"t{i}", tensor=scalar) for i in range(count)])
    return pb.CheckRequest(
        function=pb.FunctionSpec(registered=pb.RegisteredFunction(name="torch.sin")),
        explicit_points=pb.ExplicitPoints(points=[point]),
    )


def attacks(skip_huge: bool) -> list[tuple[str, pb.CheckRequest, float | None]]:
    def expr(text: str, **t: torch.Tensor) -> pb.CheckRequest:
        return build_request(text, points=[t])

    one = torch.ones(1, 1, 1, dtype=F64)
    found: list[tuple[str, pb.CheckRequest, float | None, bool]] = [
        ("sum(outer(x,x)) x=600", expr("sum(outer(x, x))", x=torch.randn(600, dtype=F64)), None, True),
        ("sum(outer(x,x)) x=2000", expr("sum(outer(x, x))", x=torch.randn(2000, dtype=F64)), None, True),
        (
            "conv1d padding=5e6",
            build_request(
                Registered("torch.nn.functional.conv1d", {"padding": 5_000_000}),
                points=[{"input": one, "weight": one}],
            ),
            None,
            False,
        ),
        (
            "outer [500000]x[40]",
            build_request(
                Registered("torch.outer"),
                points=[{"input": torch.ones(500_000, dtype=F64), "vec2": torch.ones(40, dtype=F64)}],
            ),
            None,
            False,
        ),
        (
            "svdvals(outer) x=300, cap 5 s",
            expr("sum(svdvals(outer(x, x)))", x=torch.randn(300, dtype=F64)),
            None,
            False,
        ),
        (
            "same, 0.5 s client deadline",
            expr("sum(svdvals(outer(x, x)))", x=torch.randn(300, dtype=F64)),
            0.5,
            False,
        ),
        ("pinv 2000x2000, cap 5 s", expr("sum(pinv(a))", a=torch.randn(2000, 2000, dtype=F64)), None, False),
        ("100,000 scalar tensors", _many_scalars(100_000), None, False),
    ]
    return [(n, r, d) for n, r, d, huge in found if not (huge and skip_huge and "2000" in n)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server-python", default=sys.executable)
    parser.add_argument(
        "--skip-huge", action="store_true", help="leave out x=2000 (9 GiB on an unguarded server)"
    )
    args = parser.parse_args()
    command = [args.server_python, "-m", "gradcheck_svc.cli", "serve", "--port", "0", "--device", "cpu"]
    command += ["--no-entry-points", "--max-check-seconds", "5", "--max-concurrent-checks", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        address = server.stdout.readline().removeprefix("listening on ").strip()
        print(f"{'attack':34} {'status':20} {'RSS before':>10} {'peak RSS':>12} {'seconds':>8}")
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GradcheckServiceStub(channel)
            for name, request, deadline in attacks(args.skip_huge):
                time.sleep(0.3)
                Path(f"/proc/{server.pid}/clear_refs").write_text("5")
                before = peak(server.pid, "VmRSS")
                started = time.monotonic()
                try:
                    stub.Check(request, timeout=deadline or 300)
                    status = "OK"
                except grpc.RpcError as exc:
                    status = exc.code().name  # type: ignore[attr-defined]
                seconds = time.monotonic() - started
                # With a client deadline, the time that counts is how long the server stays busy.
                if deadline is not None:
                    while True:
                        try:
                            stub.Check(
                                build_request("x * x", points=[{"x": torch.tensor(2.0, dtype=F64)}]),
                                timeout=60,
                            )
                            break
                        except grpc.RpcError:
                            time.sleep(0.05)
                    seconds = time.monotonic() - started
                high = peak(server.pid) / GiB
                print(
                    f"{name:34} {status:20} {before / GiB:6.2f} GiB {high:8.2f} GiB {seconds:8.1f}",
                    flush=True,
                )
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
