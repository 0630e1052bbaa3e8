"""Concurrent hostile clients for bench_attacks.py: floods of the largest requests a server accepts.

Every hostile client speaks raw gRPC (no project client): its own connection and bearer token, its
requests serialized once and sent as bytes, as many calls at once as its share allows, again and
again until the flood's time is up. Meanwhile a well-behaved client (its own connection and token)
sends a seed check every 0.2 s, and a sampler reads the memory of the server and its worker
processes together (psutil's proportional set sizes, every 50 ms), killing the server past a
ceiling so that a flood on a shared machine cannot take the machine down with it.
"""

from __future__ import annotations

import contextlib
import queue
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import psutil
import torch
from grpc_status import rpc_status

from gradcheck_svc.client import build_request
from gradcheck_svc.codec import decode_tensor, encode_point, encode_tensor
from gradcheck_svc.server.status import reason_of
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

__all__ = [
    "Flood",
    "FloodResult",
    "TreeMemory",
    "check_flood",
    "external_flood",
    "largest_check",
    "stream_flood",
]

F64 = torch.float64
_SERVICE = "/gradcheck_svc.v1.GradcheckService/"
SEED = build_request("x**2", points=[{"x": torch.tensor(9.0, dtype=F64)}]).SerializeToString()


def largest_check(max_message_bytes: int, max_tensor_elements: int) -> pb.CheckRequest:
    """``sum(x * y)`` with x and y as large as one message (and one tensor) allows: a heavy check."""
    room = (max_message_bytes - 4096) // 8  # float64 elements, less the message's own fields
    each = min(max_tensor_elements, room // 2)
    x = torch.linspace(-1, 1, each, dtype=F64)
    return build_request("sum(x * y)", points=[{"x": x, "y": x.flip(0)}])


class TreeMemory:
    """Peak memory (PSS) of a process and its descendants, sampled; kills them past ``ceiling``."""

    def __init__(self, pid: int, ceiling: int) -> None:
        self.root = psutil.Process(pid)
        self.ceiling = ceiling
        self.peak = 0
        self.root_peak = 0  # the server process alone: gRPC's buffers and the parsed requests
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        return sum(self._each())

    def _each(self) -> list[int]:
        sizes = []
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker that just ended
                # Proportional set size: the pages workers share with the fork server count once.
                sizes.append(proc.memory_full_info().pss)
        return sizes

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                sizes = self._each()
            except psutil.Error:
                return
            used = sum(sizes)
            self.peak = max(self.peak, used)
            self.root_peak = max(self.root_peak, sizes[0] if sizes else 0)
            if used > self.ceiling and not self.killed:
                self.killed = True
                for proc in [*self.root.children(recursive=True), self.root]:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()

    def __enter__(self) -> TreeMemory:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class FloodResult:
    statuses: Counter[str] = field(default_factory=Counter)
    seeds: list[tuple[str, float]] = field(default_factory=list)  # (status, seconds)

    def seed_summary(self) -> str:
        ok = [s for status, s in self.seeds if status == "OK"]
        failed = Counter(status for status, _ in self.seeds if status != "OK")
        why = "".join(f", {status} {n}" for status, n in failed.most_common(2))
        if not ok:
            return f"0/{len(self.seeds)} ok{why}"
        p50, high = statistics.median(ok) * 1000, max(ok) * 1000
        return f"{len(ok)}/{len(self.seeds)} ok, p50 {p50:.0f} ms, max {high:.0f} ms{why}"


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _status(error: grpc.RpcError) -> str:
    code = error.code().name  # type: ignore[attr-defined]
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        status = None
    reason = reason_of(status) if status is not None else ""
    return f"{code}/{reason}" if reason else code


def _item_status(status: object) -> str:
    code = grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == status.code))  # type: ignore[attr-defined]
    reason = reason_of(status)  # type: ignore[arg-type]
    return f"{code.name}/{reason}" if reason else code.name


def _seed_client(address: str, token: str, stop: threading.Event, result: FloodResult) -> None:
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(_SERVICE + "Check")
        while not stop.is_set():
            started = time.monotonic()
            try:
                check(SEED, timeout=30, metadata=_metadata(token))
                status = "OK"
            except grpc.RpcError as exc:
                status = _status(exc)
            result.seeds.append((status, time.monotonic() - started))
            stop.wait(0.2)


Hostile = Callable[[grpc.Channel, str, threading.Event, FloodResult, threading.Lock], None]


@dataclass
class Flood:
    """``clients`` hostile clients (one connection and token each) for ``seconds``, and a seed client."""

    address: str
    tokens: list[str]  # one per hostile client, then the seed client's
    seconds: float

    def run(self, hostile: Hostile) -> FloodResult:
        result, lock, stop = FloodResult(), threading.Lock(), threading.Event()
        channels = [grpc.insecure_channel(self.address) for _ in self.tokens[:-1]]
        threads = [
            threading.Thread(target=hostile, args=(channel, token, stop, result, lock), daemon=True)
            for channel, token in zip(channels, self.tokens, strict=False)
        ]
        threads.append(
            threading.Thread(
                target=_seed_client, args=(self.address, self.tokens[-1], stop, result), daemon=True
            )
        )
        for thread in threads:
            thread.start()
        time.sleep(self.seconds)
        stop.set()
        for thread in threads:
            thread.join(90)
        for channel in channels:
            channel.close()
        return result


def check_flood(request: bytes, at_once: int) -> Hostile:
    """Each client keeps ``at_once`` Check calls of ``request`` in flight (its share, or more)."""

    def hostile(
        channel: grpc.Channel, token: str, stop: threading.Event, result: FloodResult, lock: threading.Lock
    ) -> None:
        check = channel.unary_unary(_SERVICE + "Check")
        while not stop.is_set():
            calls = [check.future(request, timeout=60, metadata=_metadata(token)) for _ in range(at_once)]
            for call in calls:
                try:
                    call.result()
                    status = "OK"
                except grpc.RpcError as exc:
                    status = _status(exc)
                with lock:
                    result.statuses[status] += 1

    return hostile


def stream_flood(request: pb.CheckRequest, streams: int) -> Hostile:
    """Each client opens ``streams`` CheckStreams and sends ``request`` as items, as fast as the
    server reads them, until the time is up; then it reads what is still owed and closes."""
    item = pb.CheckStreamRequest(id="x", request=request).SerializeToString()

    def one_stream(
        channel: grpc.Channel, token: str, stop: threading.Event, result: FloodResult, lock: threading.Lock
    ) -> None:
        call = channel.stream_stream(_SERVICE + "CheckStream")

        def items() -> Iterator[bytes]:
            while not stop.is_set():
                yield item

        answers = call(items(), timeout=120, metadata=_metadata(token))
        try:
            for raw in answers:
                answer = pb.CheckStreamResponse.FromString(raw)
                status = "OK" if answer.HasField("response") else _item_status(answer.error)
                with lock:
                    result.statuses[status] += 1
        except grpc.RpcError as exc:
            with lock:
                result.statuses["stream " + _status(exc)] += 1

    def hostile(
        channel: grpc.Channel, token: str, stop: threading.Event, result: FloodResult, lock: threading.Lock
    ) -> None:
        threads = [
            threading.Thread(target=one_stream, args=(channel, token, stop, result, lock), daemon=True)
            for _ in range(streams)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return hostile


def external_flood(elements: int, at_once: int) -> Hostile:
    """Each client keeps ``at_once`` CheckExternal calls running: sin of ``elements`` inputs (a
    dense Jacobian of ``elements`` squared), answered correctly and at once, again and again."""
    x0 = torch.linspace(0.1, 2.0, elements, dtype=F64)
    start = pb.CheckExternalRequest(start=pb.ExternalStart(function="flood", point=encode_point({"x": x0})))

    def answer(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        if request.WhichOneof("kind") == "evaluate":
            x = decode_tensor(request.evaluate.inputs[0].tensor, max_elements=10**9)
            values = pb.ExternalValues(sequence=request.evaluate.sequence)
            values.outputs.add(name="output", tensor=encode_tensor(torch.sin(x)))
            return pb.CheckExternalRequest(values=values)
        c = decode_tensor(request.vjp.cotangents[0].tensor, max_elements=10**9)
        products = pb.ExternalProducts(sequence=request.vjp.sequence)
        products.tensors.add(name="x", tensor=encode_tensor(c * torch.cos(x0)))
        return pb.CheckExternalRequest(products=products)

    def one_call(stub: pb_grpc.GradcheckServiceStub, token: str) -> str:
        outgoing: queue.Queue[pb.CheckExternalRequest | None] = queue.Queue()
        outgoing.put(start)
        try:
            for response in stub.CheckExternal(
                iter(outgoing.get, None), timeout=60, metadata=_metadata(token)
            ):
                if response.WhichOneof("kind") == "report":
                    return "OK"
                outgoing.put(answer(response))
        except grpc.RpcError as exc:
            return _status(exc)
        finally:
            outgoing.put(None)
        return "ended without a report"

    def caller(
        channel: grpc.Channel, token: str, stop: threading.Event, result: FloodResult, lock: threading.Lock
    ) -> None:
        stub = pb_grpc.GradcheckServiceStub(channel)
        while not stop.is_set():
            status = one_call(stub, token)
            with lock:
                result.statuses[status] += 1
            if status.startswith("RESOURCE_EXHAUSTED"):
                stop.wait(0.2)  # a refused client comes back at once, but not in a busy loop

    def hostile(
        channel: grpc.Channel, token: str, stop: threading.Event, result: FloodResult, lock: threading.Lock
    ) -> None:
        threads = [
            threading.Thread(target=caller, args=(channel, token, stop, result, lock), daemon=True)
            for _ in range(at_once)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return hostile
