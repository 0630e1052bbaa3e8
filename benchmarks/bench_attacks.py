"""The attacks of the hardening work, against a real ``gradcheck-svc serve``: status, peak RSS, seconds.

    python benchmarks/bench_attacks.py                      # this checkout's server
    python benchmarks/bench_attacks.py --skip-huge          # leave out the multi-GB attacks
    python benchmarks/bench_attacks.py --server-python /other/venv/bin/python   # another build

Each attack is one raw gRPC request (not the project's client). The server's peak resident memory
(VmHWM from /proc, reset before each attack) and the call's wall time are printed side by side.
Linux only. The server runs with ``--max-check-seconds 5`` and, where it knows the flag, the
default per-check memory budget.

Then the floods (``--no-floods`` leaves them out, ``--floods-only`` runs nothing else): several
hostile clients at once, each on its own connection with its own bearer token, sending the largest
request the server accepts again and again for ``--flood-seconds``: Check calls beyond each
client's share, CheckStreams of such items, and CheckExternal calls with dense Jacobians. Each flood
gets a fresh server with the default limits (32 checks, 40 handler threads, 64 MiB messages), a 5 s
check cap and ``--max-check-bytes-in-flight 4 GiB``; its peak is the resident memory of the server
and its worker processes together, against the bound SECURITY.md documents, and a well-behaved
client's seed check every 0.2 s says whether the server kept serving (its latency).

    python benchmarks/bench_attacks.py --floods-only --flood-seconds 20
    python benchmarks/bench_attacks.py --floods-only --server-path /tmp/old-tree   # another checkout
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
from floods import Flood, TreeMemory, check_flood, external_flood, largest_check, stream_flood

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


def _serve(args: argparse.Namespace, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    command = [args.server_python, "-m", "gradcheck_svc.cli", "serve", "--port", "0", "--device", "cpu"]
    full_env = dict(os.environ, **(env or {}))
    if args.server_path:  # another checkout's code, first on the server's path
        full_env["PYTHONPATH"] = os.pathsep.join([args.server_path, full_env.get("PYTHONPATH", "")])
    command += ["--no-entry-points", "--max-check-seconds", "5", *flags]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=full_env
    )


def _address(server: subprocess.Popen[str]) -> str:
    assert server.stdout is not None
    return server.stdout.readline().removeprefix("listening on ").strip()


def single_attacks(args: argparse.Namespace) -> None:
    server = _serve(args, "--max-concurrent-checks", "1")
    try:
        address = _address(server)
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


CHECK_BYTES_IN_FLIGHT = 4 * GiB


def floods(args: argparse.Namespace) -> None:
    clients = args.flood_clients
    tokens = [f"hostile-{k}" for k in range(clients)] + ["well-behaved"]
    capabilities = None
    biggest: pb.CheckRequest | None = None
    print(
        f"\nfloods: {clients} hostile clients x {args.flood_seconds:g} s each; peak = server + workers; "
        f"ceiling {args.ceiling_gib:g} GiB (the server is killed past it)"
    )
    print(f"{'flood':46} {'peak':>9} {'server':>9} {'bound':>9}  {'seed checks meanwhile':38} hostile calls")
    rows = [
        ("Check, largest request, 25 at once each", "check"),
        ("CheckStream, largest items, 10 streams each", "stream"),
        ("CheckExternal, sin of 2000 inputs, 10 each", "external"),
    ]
    for name, kind in rows:
        server = _serve(
            args,
            "--max-check-bytes-in-flight",
            str(CHECK_BYTES_IN_FLIGHT),
            env={"GRADCHECK_AUTH_TOKENS": ",".join(tokens)},
        )
        try:
            address = _address(server)
            if capabilities is None or biggest is None:
                with grpc.insecure_channel(address) as channel:
                    stub = pb_grpc.GradcheckServiceStub(channel)
                    metadata = (("authorization", "Bearer well-behaved"),)
                    capabilities = stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=metadata).limits
                biggest = largest_check(capabilities.max_message_bytes, capabilities.max_tensor_elements)
            time.sleep(1.0)  # the workers' fork server is up
            with TreeMemory(server.pid, int(args.ceiling_gib * GiB)) as memory:
                baseline = memory.now()
                if kind == "check":
                    hostile = check_flood(biggest.SerializeToString(), 25)
                elif kind == "stream":
                    hostile = stream_flood(biggest, 10)
                else:
                    hostile = external_flood(2000, 10)
                result = Flood(address, tokens, args.flood_seconds).run(hostile)
            threads = capabilities.max_concurrent_checks + 8
            # SECURITY.md's bound: the requests being checked, the checks' memory, and gRPC's own
            # receive buffer and parsed message of every call it has accepted.
            bound = (
                baseline
                + capabilities.max_request_bytes_in_flight
                + capabilities.max_check_bytes_in_flight
                + threads * 2 * capabilities.max_message_bytes
            )
            high = f"{memory.peak / GiB:.2f} GiB" + (" KILLED" if memory.killed else "")
            calls = ", ".join(f"{status} {n}" for status, n in result.statuses.most_common(4))
            own = f"{memory.root_peak / GiB:.2f} GiB"
            print(
                f"{name:46} {high:>9} {own:>9} {bound / GiB:6.2f} GiB  {result.seed_summary():38} {calls}",
                flush=True,
            )
        finally:
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server-python", default=sys.executable)
    parser.add_argument("--server-path", default="", help="a checkout whose gradcheck_svc the server runs")
    parser.add_argument(
        "--skip-huge", action="store_true", help="leave out x=2000 (9 GiB on an unguarded server)"
    )
    parser.add_argument("--no-floods", action="store_true")
    parser.add_argument("--floods-only", action="store_true")
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--flood-clients", type=int, default=2)
    parser.add_argument("--ceiling-gib", type=float, default=8.0, help="kill a flooded server past this")
    args = parser.parse_args()
    if not args.floods_only:
        single_attacks(args)
    if not args.no_floods:
        floods(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
