"""The seed check through the service, next to the same check in-process and a bare gRPC echo.

    .venv/bin/python benchmarks/bench_service.py [--iterations 1000] [--seconds 5] [--clients 8]

Three ways to get the same answer for d/dx sin(x / 2**1.5) at x = 100 (float32):

- in-process  ``gc.check`` on the compiled expression, in this process;
- service     ``Client.check`` against a ``gradcheck-svc`` server in a subprocess;
- echo        a handler in that same server process, called on the service client's own channel,
              that answers the CheckRequest with the CheckResponse of a real check: the same
              messages both ways, no work. It is registered and (de)serialized as the service's
              own methods are (a registered method, protobuf parsing and serializing at both
              ends), so it is the floor any gRPC service with these messages pays on this machine.
- engine only another handler there that runs the in-process check itself (the same ``gc.check``
              call on the same tensor) and answers as the echo does: no decoding, planning or
              encoding. Its overhead over in-process is the floor of a service that checks in
              another process (the round trip, with the caches a check leaves behind and the
              scheduling of two processes); the service's p50 over it is the service's own work
              (the request decoded and planned, the report encoded, the client's request and
              Report built).

``--timeline`` adds a second interleaved pass that splits each remote way with timestamps taken in
both processes on the same monotonic clock: the client's own work before sending (the service's
request built) and after receipt (its Report decoded), the trip there (from the call until the
handler starts: serializing, sending, the server's threads waking), the handler, the trip back
(from the handler's end until the call returns: the response sent, the waiting client woken), and
inside the service's handler the engine's own call. The server records them from wrappers around
its handlers (bench-only, in this process only) and hands them over at the end.

The servers log as a default server does (INFO: one line per check); ``--log-level WARNING``
measures them without the line, as this benchmark did before.

Latency: one client, calls interleaved (the three in a shuffled order each round, so neither drift
nor a fixed neighbour favours one), after a warm-up; p50, p90 and p99. Throughput: ``--clients``
threads of this process calling as fast as they can for ``--seconds`` (each with its own channel).
CPU: for each way in turn, ``--cpu-calls`` calls with the CPU time they cost this thread and the
server process (psutil), which a busy machine disturbs far less than wall time. Goals from the
issue: service p50 overhead over in-process within one echo round trip; service throughput at
least half the echo's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import torch

import gradcheck_svc as gc
from gradcheck_svc.client import Client, build_request
from gradcheck_svc.codec import decode_report
from gradcheck_svc.specs import compile_expression
from gradcheck_svc.v1 import gradcheck_pb2 as pb

EXPRESSION = "sin(x / 2**1.5)"
ECHO_SERVICE = "bench.Echo"
ECHO, SET_REPLY = f"/{ECHO_SERVICE}/Echo", f"/{ECHO_SERVICE}/SetReply"
ENGINE_ONLY = f"/{ECHO_SERVICE}/EngineOnly"
MARKS = f"/{ECHO_SERVICE}/Marks"


# ----------------------------------------------------------------------------- the server side


def serve(device: str, log_level: str, timeline: bool = False) -> None:
    """Run a gradcheck server with the echo handler; print the port; stop when stdin closes.
    Its log is set up as ``gradcheck-svc serve`` sets it up, at ``log_level``, its lines written to
    the null device (a real server's go to a file or a collector). With ``timeline``, each
    handler (and the engine's call inside the service) records when it starts and ends, for the
    Marks method to hand over."""
    import logging

    from gradcheck_svc.server import create_server
    from gradcheck_svc.server.service import GradcheckService
    from gradcheck_svc.settings import Settings

    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",  # as gradcheck-svc serve's
        stream=open(os.devnull, "w"),  # noqa: SIM115  # the server's whole life
    )
    reply = [pb.CheckResponse()]
    marks: dict[str, list[tuple[int, int]]] = {}

    def marked(way: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if not timeline:
            return fn
        spans = marks.setdefault(way, [])

        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((started, time.monotonic_ns()))

        return run

    def hand_over(request: bytes, context: grpc.ServicerContext) -> bytes:
        taken = {way: spans[:] for way, spans in marks.items()}
        for spans in marks.values():
            spans.clear()
        return json.dumps(taken).encode()

    # The service's own handler, wrapped before the server registers it (this process only).
    GradcheckService.Check = marked("service", GradcheckService.Check)  # type: ignore[method-assign]

    def set_reply(request: pb.CheckResponse, context: grpc.ServicerContext) -> pb.CheckResponse:
        reply[0] = request
        return pb.CheckResponse()

    def echo(request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        return reply[0]

    fn, x = compile_expression(EXPRESSION), torch.tensor(100.0)

    def engine_only(request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        gc.check(fn, x, input_names=["x"], device=device)  # the in-process call, in this process
        return reply[0]

    server, port = create_server(
        Settings(port=0, device=device, max_concurrent_checks=64, log_level=log_level),
        check_fn=marked("service engine", gc.check),
    )
    # Registered like the service's own methods (the generated code registers them), so neither
    # way pays the generic-handler lookup the other does not.
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            marked("echo", echo),
            request_deserializer=pb.CheckRequest.FromString,
            response_serializer=pb.CheckResponse.SerializeToString,
        ),
        "EngineOnly": grpc.unary_unary_rpc_method_handler(
            marked("engine only", engine_only),
            request_deserializer=pb.CheckRequest.FromString,
            response_serializer=pb.CheckResponse.SerializeToString,
        ),
        "SetReply": grpc.unary_unary_rpc_method_handler(
            set_reply,
            request_deserializer=pb.CheckResponse.FromString,
            response_serializer=pb.CheckResponse.SerializeToString,
        ),
        "Marks": grpc.unary_unary_rpc_method_handler(hand_over),  # raw bytes both ways
    }
    server.grpc_server.add_registered_method_handlers(ECHO_SERVICE, handlers)
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # the parent closes our stdin when it is done
    server.stop(grace=1)


# ----------------------------------------------------------------------------- the client side


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), cuts[89], cuts[98]


def latency(calls: dict[str, Callable[[], object]], iterations: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    shuffle = random.Random(0).shuffle
    for _ in range(iterations):
        shuffle(order)
        for name, call in order:
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


# A remote call for the timeline: returns when it sent (the gRPC call began) and when the answer
# came back (the call returned), monotonic nanoseconds; what it does before and after is its own.
TimedCall = Callable[[], tuple[int, int]]


def timeline(
    remote: dict[str, TimedCall], local: Callable[[], object], iterations: int, marks: Callable[[], dict]
) -> dict[str, dict[str, float]]:
    """p50 of each stage of each remote way (microseconds), from ``iterations`` interleaved calls
    of every way (and of ``local``, the in-process check, whose p50 is "total" of "in-process").
    ``marks()`` returns and clears the server's spans: {way: [(start, end), ...]} in call order,
    and "service engine" for the engine's call inside the service's handler."""
    calls: dict[str, Callable[[], object]] = {**remote, "in-process": local}
    rows: dict[str, list[tuple[int, ...]]] = {name: [] for name in calls}
    order = list(calls.items())
    shuffle = random.Random(2).shuffle
    marks()  # what the server recorded before: not ours
    for _ in range(iterations):
        shuffle(order)
        for name, call in order:
            started = time.monotonic_ns()
            if name in remote:
                sent, received = remote[name]()
            else:
                call()
                sent = received = started
            rows[name].append((started, sent, received, time.monotonic_ns()))
    spans = marks()
    p50 = lambda values: statistics.median(values) / 1e3  # noqa: E731
    stages = {"in-process": {"total": p50([r[3] - r[0] for r in rows["in-process"]])}}
    for name in remote:
        handled = spans[name]
        assert len(handled) == len(rows[name]), (name, len(handled), len(rows[name]))
        pairs = list(zip(rows[name], handled, strict=True))
        stages[name] = {
            "total": p50([c[3] - c[0] for c, _ in pairs]),
            "client before": p50([c[1] - c[0] for c, _ in pairs]),
            "trip there": p50([h[0] - c[1] for c, h in pairs]),
            "handler": p50([h[1] - h[0] for _, h in pairs]),
            "trip back": p50([c[2] - h[1] for c, h in pairs]),
            "client after": p50([c[3] - c[2] for c, _ in pairs]),
        }
    engine = spans.get("service engine", [])
    if "service" in stages and engine:
        stages["service"]["engine in handler"] = p50([end - start for start, end in engine])
    return stages


def print_timeline(stages: dict[str, dict[str, float]]) -> None:
    columns = ("total", "client before", "trip there", "handler", "trip back", "client after")
    print(f"{'timeline, p50 us':<16}" + "".join(f"{c:>15}" for c in columns) + f"{'engine in handler':>19}")
    for name, stage in stages.items():
        cells = "".join(f"{stage[c]:>15.0f}" if c in stage else f"{'':>15}" for c in columns)
        engine = stage.get("engine in handler")
        print(f"{name:<16}{cells}" + (f"{engine:>19.0f}" if engine is not None else ""))
    inside = stages.get("engine only", {}).get("handler")
    if inside is not None:
        local, echo = stages["in-process"]["total"], stages["echo"]
        print(
            f"the check in a handler of the server {inside:.0f} us against {local:.0f} us in-process; "
            f"engine only's trips {stages['engine only']['trip there']:.0f} + "
            f"{stages['engine only']['trip back']:.0f} us against the echo's "
            f"{echo['trip there']:.0f} + {echo['trip back']:.0f} us"
        )


def throughput(make_call: Callable[[], Callable[[], object]], clients: int, seconds: float) -> float:
    """Completed calls per second with ``clients`` threads, each with its own call (and channel)."""
    counts = [0] * clients
    start_barrier = threading.Barrier(clients + 1)
    stop = threading.Event()

    def worker(k: int) -> None:
        call = make_call()
        call()  # warm this thread's channel
        start_barrier.wait()
        while not stop.is_set():
            call()
            counts[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start_barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def cpu_per_call(
    calls: dict[str, Callable[[], object]], server: psutil.Process, count: int, block: int = 25
) -> dict[str, tuple[float, float]]:
    """(this thread's, the server process's) CPU seconds per call of each way: blocks of ``block``
    calls, the ways in a shuffled order each round, so a busier spell of the machine hits all alike
    (the server's CPU clock ticks in hundredths of a second: a block spans several ticks)."""
    used = {name: [0.0, 0.0] for name in calls}
    order = list(calls.items())
    shuffle = random.Random(1).shuffle
    for _ in range(max(1, count // block)):
        shuffle(order)
        for name, call in order:
            call()  # this way's first call after another's, not counted
            own, theirs = time.thread_time(), sum(server.cpu_times()[:2])
            for _ in range(block):
                call()
            used[name][0] += time.thread_time() - own
            used[name][1] += sum(server.cpu_times()[:2]) - theirs
    calls_made = max(1, count // block) * block
    return {name: (own / calls_made, theirs / calls_made) for name, (own, theirs) in used.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000, help="latency samples per mode")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the check runs (both ways)"
    )
    parser.add_argument("--cpu-calls", type=int, default=500, help="calls per way for CPU time")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="a source tree holding another gradcheck_svc package (e.g. `git archive` of an older "
        "commit): a second server runs from it, and its service, echo and engine-only handler join "
        "the latency interleaving, so both servers are compared in one run (the client is this tree's)",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="also split each remote way into the client's own work, the trips there and back and the "
        "handler (a second interleaved pass of --iterations calls, this tree's server only)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="the servers' log level (INFO, a server's default, writes a line per check; WARNING none)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.device, args.log_level, args.timeline)
        return 0

    servers = [start_server(args.device, args.log_level, timeline=args.timeline)]
    try:
        if args.baseline_tree is not None:
            servers.append(start_server(args.device, args.log_level, args.baseline_tree.resolve()))
        targets = [target for _, target in servers]
        return run(args, targets[0], psutil.Process(servers[0][0].pid), *targets[1:])
    finally:
        for process, _ in servers:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(30)


def start_server(
    device: str, log_level: str, tree: Path | None = None, *, timeline: bool = False
) -> tuple[subprocess.Popen[str], str]:
    """A server subprocess (its gradcheck_svc from ``tree`` when given) and its address; with
    ``timeline``, its handlers record their spans."""
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, __file__, "--serve", "--device", device, "--log-level", log_level]
    process = subprocess.Popen(
        [*command, *(["--timeline"] if timeline else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    return process, f"127.0.0.1:{int(process.stdout.readline())}"


def timed_ways(
    args: argparse.Namespace, target: str, request: pb.CheckRequest, x: torch.Tensor, fn: Callable[..., Any]
) -> dict[str, dict[str, float]]:
    """The timeline of the three remote ways, on one client's channel (see ``timeline``)."""
    client = Client(target)
    channel = client._channels[0].channel

    def unary(method: str) -> TimedCall:
        call = channel.unary_unary(
            method,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
            _registered_method=True,
        )

        def timed() -> tuple[int, int]:
            sent = time.monotonic_ns()
            call(request, timeout=600)
            return sent, time.monotonic_ns()

        return timed

    def service() -> tuple[int, int]:  # Client.check's steps, with the moments it sends and receives
        built = build_request(EXPRESSION, points=[{"x": x}], options={"device": args.device})
        sent = time.monotonic_ns()
        response = client._call("Check", built, client.timeout)
        received = time.monotonic_ns()
        [decode_report(r) for r in response.reports]
        return sent, received

    def marks() -> dict[str, list[tuple[int, int]]]:
        return json.loads(channel.unary_unary(MARKS)(b"", timeout=10))

    remote = {"echo": unary(ECHO), "engine only": unary(ENGINE_ONLY), "service": service}
    local = lambda: gc.check(fn, x, input_names=["x"], device=args.device)  # noqa: E731
    timeline(remote, local, 100, marks)  # warm-up
    try:
        return timeline(remote, local, args.iterations, marks)
    finally:
        client.close()


def run(args: argparse.Namespace, target: str, server: psutil.Process, baseline: str | None = None) -> int:
    x = torch.tensor(100.0)
    fn = compile_expression(EXPRESSION)
    request = build_request(EXPRESSION, points=[{"x": x}], options={"device": args.device})
    request_bytes = request.SerializeToString()

    def in_process() -> Callable[[], object]:
        return lambda: gc.check(fn, x, input_names=["x"], device=args.device)

    clients: list[Client] = []  # the latest service client: the echo for latency shares its channel

    def service(address: str = target) -> Callable[[], object]:
        client = Client(address)
        clients.append(client)
        return lambda: client.check(EXPRESSION, x=x, options={"device": args.device})

    def echo(channel: grpc.Channel | None = None, method: str = ECHO) -> Callable[[], object]:
        # As the generated stub builds its methods: serializers both ways, a registered method.
        call = (channel or grpc.insecure_channel(target)).unary_unary(
            method,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
            _registered_method=True,
        )
        return lambda: call(request, timeout=600)  # the Client's default deadline

    # Each echo answers with a real response of its own server to this very request.
    responses = []
    for address in (target, baseline) if baseline else (target,):
        with grpc.insecure_channel(address) as channel:
            check = channel.unary_unary("/gradcheck_svc.v1.GradcheckService/Check")
            responses.append(check(request_bytes, timeout=60))
            channel.unary_unary(SET_REPLY)(responses[-1], timeout=10)
    response = responses[0]
    report = service()()
    assert isinstance(report, gc.Report) and report.ok and report.device.startswith(args.device), report

    makers = {"in-process": in_process, "service": service, "echo": echo}
    calls = {"in-process": in_process(), "service": service()}
    calls["echo"] = echo(clients[-1]._channels[0].channel)
    calls["engine only"] = echo(clients[-1]._channels[0].channel, ENGINE_ONLY)  # latency only
    if baseline:  # latency only: the baseline server's service and echo, interleaved with the rest
        calls["baseline service"] = service(baseline)
        calls["baseline echo"] = echo(clients[-1]._channels[0].channel)
        calls["baseline engine only"] = echo(clients[-1]._channels[0].channel, ENGINE_ONLY)
    latency(calls, 100)  # warm-up
    times = latency(calls, args.iterations)
    baseline_ways = ("baseline service", "baseline echo", "baseline engine only")
    compared = {name: times.pop(name) for name in baseline_ways if name in times}
    engine_only = statistics.median(times.pop("engine only")) * 1e3
    calls = {name: call for name, call in calls.items() if name in makers}
    cpu = cpu_per_call(calls, server, args.cpu_calls)
    rates = {name: throughput(make, args.clients, args.seconds) for name, make in makers.items()}
    stages = timed_ways(args, target, request, x, fn) if args.timeline else None

    stats = {name: percentiles(samples) for name, samples in times.items()}
    figures = {
        name: {
            "p50_ms": stats[name][0] * 1e3,
            "p90_ms": stats[name][1] * 1e3,
            "p99_ms": stats[name][2] * 1e3,
            "throughput_per_s": rates[name],
            "client_cpu_ms": cpu[name][0] * 1e3,
            "server_cpu_ms": cpu[name][1] * 1e3,
        }
        for name in makers
    }
    overhead = figures["service"]["p50_ms"] - figures["in-process"]["p50_ms"]
    echo_p50 = figures["echo"]["p50_ms"]
    ratio = figures["service"]["throughput_per_s"] / figures["echo"]["throughput_per_s"]
    sizes = f"request {len(request_bytes)} B, response {len(response)} B"
    print(f"seed check d/dx {EXPRESSION} at x=100 (float32, checked on {args.device}); {sizes}")
    machine = f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}"
    load = f"{args.iterations} latency samples, {args.clients} clients x {args.seconds:g} s for throughput"
    print(f"{machine}, {load}")
    print()
    print(
        f"{'':<12} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'checks/s':>10} "
        f"{'CPU ms: client':>15} {'server':>7}"
    )
    for name, f in figures.items():
        print(
            f"{name:<12} {f['p50_ms']:>9.3f} {f['p90_ms']:>9.3f} {f['p99_ms']:>9.3f} "
            f"{f['throughput_per_s']:>10.1f} {f['client_cpu_ms']:>15.3f} {f['server_cpu_ms']:>7.3f}"
        )
    print()
    trips = overhead / echo_p50
    print(
        f"service p50 overhead over in-process: {overhead:.3f} ms = {trips:.2f} echo round trips (goal <= 1)"
    )
    floor = engine_only - figures["in-process"]["p50_ms"]
    print(
        f"  of which the floor (engine only, p50 {engine_only:.3f} ms, over in-process): {floor:.3f} ms = "
        f"{floor / echo_p50:.2f} echo round trips; the service's own work (service over engine only): "
        f"{figures['service']['p50_ms'] - engine_only:.3f} ms"
    )
    overhead90 = figures["service"]["p90_ms"] - figures["in-process"]["p90_ms"]
    print(f"service p90 overhead over in-process: {overhead90:.3f} ms = "
          f"{overhead90 / figures['echo']['p90_ms']:.2f} echo p90 round trips")  # fmt: skip
    cpu_total = {name: f["client_cpu_ms"] + f["server_cpu_ms"] for name, f in figures.items()}
    cpu_overhead = cpu_total["service"] - cpu_total["in-process"]
    print(
        f"service CPU overhead over in-process: {cpu_overhead:.3f} ms = "
        f"{cpu_overhead / cpu_total['echo']:.2f} echo calls' CPU (client and server together)"
    )
    print(f"service throughput / echo throughput: {ratio:.2f} (goal >= 0.5)")
    in_ratio = figures["service"]["throughput_per_s"] / figures["in-process"]["throughput_per_s"]
    print(f"service throughput / in-process throughput: {in_ratio:.2f}")
    if compared:
        base = {name: statistics.median(samples) * 1e3 for name, samples in compared.items()}
        base_overhead = base["baseline service"] - figures["in-process"]["p50_ms"]
        print()
        print(f"baseline server ({args.baseline_tree}), in the same latency interleaving:")
        print(f"{'baseline service':<18} p50 {base['baseline service']:.3f} ms")
        print(f"{'baseline echo':<18} p50 {base['baseline echo']:.3f} ms")
        print(f"{'baseline engine only':<18} p50 {base['baseline engine only']:.3f} ms")
        print(
            f"baseline p50 overhead over in-process: {base_overhead:.3f} ms = "
            f"{base_overhead / base['baseline echo']:.2f} of its echo round trips; this tree's: "
            f"{overhead:.3f} ms = {trips:.2f}"
        )
        # Two server processes differ by a tenth of a millisecond or more in the same engine call
        # (where each lands on the machine): each server's service over its own engine-only
        # handler cancels that out, and is the figure to compare the two servers' own work by.
        own = figures["service"]["p50_ms"] - engine_only
        base_own = base["baseline service"] - base["baseline engine only"]
        print(
            f"own work (service over its server's engine only): this tree's {own:.3f} ms, "
            f"the baseline's {base_own:.3f} ms"
        )
    if stages is not None:
        print()
        print_timeline(stages)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": figures, "overhead_echo_round_trips": overhead / echo_p50,
                                         "engine_only_p50_ms": engine_only,
                                         "throughput_vs_echo": ratio}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
