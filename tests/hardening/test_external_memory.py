"""CheckExternal holds check memory as Check does: max_check_bytes per check, and a share of
max_check_bytes_in_flight for a check that is not small everywhere.

Each client here speaks the raw protocol through the generated stub, so it can hold a check open
(answer nothing until told), end it each way a hostile client can (cancel, deadline, a bad answer,
a dropped connection), or declare huge outputs in its first answer. The server's own budget
(``service.check_bytes.used``) is read to show the memory comes back on every path.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from service_servers import Running, refusal, start_server

from gradcheck_svc.codec import decode_tensor, encode_point, encode_tensor
from gradcheck_svc.settings import MiB
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
HEAVY_X = torch.linspace(0.1, 2.0, 5000, dtype=F64)  # more inputs than a light check may have
SMALL_X = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
# A heavy Check shares the same budget.
HEAVY_CHECK = pb.CheckRequest(
    function=pb.FunctionSpec(expression="x * x"),
    explicit_points=pb.ExplicitPoints(points=[encode_point({"x": HEAVY_X})]),
)

Answer = Callable[[pb.CheckExternalResponse], pb.CheckExternalRequest]


def start(x: torch.Tensor, **fields: object) -> pb.CheckExternalRequest:
    return pb.CheckExternalRequest(
        start=pb.ExternalStart(function="hostile", point=encode_point({"x": x}), **fields)
    )


def sine_at(x0: torch.Tensor) -> Answer:
    """A correct client of sin(x) at ``x0``: values for evaluate, cos(x0) * c for vjp."""

    def answer(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        if request.WhichOneof("kind") == "evaluate":
            x = decode_tensor(request.evaluate.inputs[0].tensor, max_elements=10**8)
            values = pb.ExternalValues(sequence=request.evaluate.sequence)
            values.outputs.add(name="output", tensor=encode_tensor(torch.sin(x)))
            return pb.CheckExternalRequest(values=values)
        c = decode_tensor(request.vjp.cotangents[0].tensor, max_elements=10**8)
        products = pb.ExternalProducts(sequence=request.vjp.sequence)
        products.tensors.add(name="x", tensor=encode_tensor(c * torch.cos(x0)))
        return pb.CheckExternalRequest(products=products)

    return answer


def outputs_of(elements: int) -> Answer:
    """A client whose function has ``elements`` outputs (zeros), known to the server from its first answer."""

    def answer(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        values = pb.ExternalValues(sequence=request.evaluate.sequence)
        zeros = torch.zeros(request.evaluate.batch_size, elements, dtype=F64)
        values.outputs.add(name="output", tensor=encode_tensor(zeros))
        return pb.CheckExternalRequest(values=values)

    return answer


class RawExternal:
    """One CheckExternal call on raw stubs, answered by ``answer`` only once ``go`` is set."""

    def __init__(
        self, channel: grpc.Channel, first: pb.CheckExternalRequest, answer: Answer, timeout: float = 60
    ) -> None:
        self.outgoing: queue.Queue[pb.CheckExternalRequest | None] = queue.Queue()
        self.outgoing.put(first)
        self.answer = answer
        self.asked = threading.Event()  # the server sent its first request
        self.go = threading.Event()
        self.error: grpc.RpcError | None = None
        self.kinds: list[str] = []
        stub = pb_grpc.GradcheckServiceStub(channel)
        self.call = stub.CheckExternal(iter(self.outgoing.get, None), timeout=timeout)
        self._thread = threading.Thread(target=self._drive, daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        try:
            for response in self.call:
                self.kinds.append(response.WhichOneof("kind"))
                if self.kinds[-1] == "report":
                    return
                self.asked.set()
                self.go.wait()
                self.outgoing.put(self.answer(response))
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.outgoing.put(None)

    def result(self, timeout: float = 60) -> grpc.RpcError | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive()
        return self.error


def wait_until(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there in time"
        time.sleep(0.02)


@pytest.fixture
def server() -> Iterator[Running]:
    running = start_server(
        replica_name="external-memory",
        isolation="thread",
        max_concurrent_checks=4,
        max_check_bytes=64 * MiB,
        max_check_bytes_in_flight=100 * MiB,  # room for one 64 MiB check, not two
    )
    yield running
    running.server.stop(grace=0)


def test_a_heavy_external_check_holds_check_memory_and_others_are_refused(server: Running) -> None:
    service = server.server.service
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        holder = RawExternal(channel, start(HEAVY_X), sine_at(HEAVY_X))
        assert holder.asked.wait(20)
        assert service.check_bytes.used == 64 * MiB

        # A second heavy external check: refused at once, as Check refuses, with RetryInfo.
        second = RawExternal(channel, start(HEAVY_X), sine_at(HEAVY_X))
        error = second.result()
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refusal(error) == ("SERVER_BUSY", ["max_check_bytes_in_flight"], True)
        assert second.kinds == []  # refused before the server asked it anything

        # Small inputs but outputs beyond a light check's: refused once the first answer says so.
        wide = RawExternal(channel, start(SMALL_X), outputs_of(70_000))
        wide.go.set()
        error = wide.result()
        assert error is not None and refusal(error) == ("SERVER_BUSY", ["max_check_bytes_in_flight"], True)

        # Few inputs and outputs, but a Jacobian of 2,000,000 entries: not small either.
        dense_x = torch.linspace(0.1, 2.0, 1000, dtype=F64)
        dense = RawExternal(channel, start(dense_x), outputs_of(2000))
        dense.go.set()
        error = dense.result()
        assert error is not None and refusal(error) == ("SERVER_BUSY", ["max_check_bytes_in_flight"], True)

        # A heavy Check shares the budget; small external checks hold none of it and run.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(HEAVY_CHECK, timeout=60)
        assert refusal(refused.value)[0] == "SERVER_BUSY"
        small = RawExternal(channel, start(SMALL_X), sine_at(SMALL_X))
        small.go.set()
        assert small.result() is None and small.kinds[-1] == "report"

        # The holder finishes its check; the memory comes back and a heavy check runs again.
        holder.go.set()
        assert holder.result(120) is None and holder.kinds[-1] == "report"
        wait_until(lambda: service.check_bytes.used == 0)
        assert stub.Check(HEAVY_CHECK, timeout=60).reports[0].ok
    wait_until(lambda: service.check_bytes.used == 0 and service.slots.in_flight == 0)


def _cancel(call: RawExternal, channel: grpc.Channel) -> None:
    call.call.cancel()


def _bad_answer(call: RawExternal, channel: grpc.Channel) -> None:
    call.answer = outputs_of(7)  # the wrong shape: the server ends the check INVALID_ARGUMENT
    call.go.set()


def _close_connection(call: RawExternal, channel: grpc.Channel) -> None:
    channel.close()


@pytest.mark.parametrize(
    "end",
    [_cancel, _bad_answer, _close_connection, None],
    ids=["cancelled", "bad-answer", "connection-closed", "client-deadline"],
)
def test_check_memory_comes_back_however_the_external_check_ends(
    server: Running, end: Callable[[RawExternal, grpc.Channel], None] | None
) -> None:
    service = server.server.service
    channel = grpc.insecure_channel(server.address)
    try:
        call = RawExternal(channel, start(HEAVY_X), sine_at(HEAVY_X), timeout=60 if end else 1.5)
        assert call.asked.wait(20)
        assert service.check_bytes.used == 64 * MiB and service.slots.in_flight == 1
        if end is not None:
            end(call, channel)
        wait_until(lambda: service.check_bytes.used == 0 and service.slots.in_flight == 0)
        call.go.set()
        error = call.result()
        assert error is not None  # nothing of these ends in a report
    finally:
        channel.close()
    with grpc.insecure_channel(server.address) as channel:  # and the next heavy check runs
        assert pb_grpc.GradcheckServiceStub(channel).Check(HEAVY_CHECK, timeout=60).reports[0].ok


def test_an_external_check_is_held_to_max_check_bytes() -> None:
    """Answers are tensors the server decodes and computes with: a client whose outputs pass the
    per-check budget is stopped there (LIMIT_EXCEEDED), not allowed to grow the server."""
    running = start_server(
        replica_name="external-budget",
        isolation="thread",
        max_check_bytes=4 * MiB,
        max_check_bytes_in_flight=64 * MiB,
    )
    service = running.server.service
    try:
        with grpc.insecure_channel(running.address) as channel:
            call = RawExternal(channel, start(SMALL_X), outputs_of(1_000_000))  # 8 MB per evaluation
            call.go.set()
            error = call.result()
            assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refusal(error)[:2] == ("LIMIT_EXCEEDED", ["max_check_bytes"])
            small = RawExternal(channel, start(SMALL_X), sine_at(SMALL_X))
            small.go.set()
            assert small.result() is None and small.kinds[-1] == "report"
        wait_until(lambda: service.check_bytes.used == 0 and service.slots.in_flight == 0)
    finally:
        running.server.stop(grace=0)
