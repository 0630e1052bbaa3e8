"""CheckExternal: the client evaluates its own function and gradient, the service judges.

Real servers on loopback. The well-behaved client is ``Client.check_external`` with NumPy or torch
callables; misbehaving clients speak the raw protocol through the generated stub, so each kind of
bad answer (wrong shape, NaN, late, never, half-closed) is produced exactly.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_status import rpc_status
from service_servers import Running, start_server

import gradcheck_svc as gc
from gradcheck_svc.callables import CallableSource
from gradcheck_svc.client import Client
from gradcheck_svc.codec import decode_tensor, encode_point, encode_tensor
from gradcheck_svc.engine.external import external_function
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.server.status import reason_of
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

RNG = np.random.default_rng(7)
X = RNG.normal(size=(3, 4))
W = RNG.normal(size=(4, 2))


def layer(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.tanh(x @ w)


def layer_vjp(c: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = c * (1.0 - np.tanh(x @ w) ** 2)
    return d @ w.T, x.T @ d


def layer_vjp_bug(c: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gx, gw = layer_vjp(c, x, w)
    gw = gw.copy()
    gw[1, 0] *= 1.01  # one weight's gradient 1 % off
    return gx, gw


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    running = start_server(replica_name="ext", max_concurrent_checks=1, external_reply_seconds=1.5)
    yield running
    running.server.stop(grace=1)


@pytest.fixture
def client(server: Running) -> Iterator[Client]:
    with Client(server.address, timeout=60) as c:
        yield c


def _comparable(report: gc.Report) -> dict[str, object]:
    data = report.model_dump(mode="json", exclude={"timings", "served_by", "point", "function"})
    return json.loads(json.dumps(data))


# ----------------------------------------------------------------------------- well-behaved clients


def test_numpy_gradient_right_and_wrong(client: Client) -> None:
    good = client.check_external(layer, layer_vjp, {"x": X, "w": W})
    assert good.ok and good.served_by == "ext" and good.function == "layer"
    assert {p.input for p in good.pairs} == {"x", "w"}
    assert all(p.elements_checked == 6 * p.input_shape[0] * p.input_shape[1] for p in good.pairs)

    bad = client.check_external(layer, layer_vjp_bug, {"x": X, "w": W})
    assert not bad.ok
    failing = bad.failures
    assert [(p.output, p.input) for p in failing] == [("output", "w")]
    # Every wrong element is d output[i, 0] / d w[1, 0], and nothing else is blamed.
    assert failing[0].worst and all(
        e.input_index == [1, 0] and e.output_index[1] == 0 for e in failing[0].worst
    )
    assert failing[0].elements_failed == 3
    assert "output[" in str(bad) and "w[1, 0]" in str(bad)


def test_same_report_as_in_process(client: Client) -> None:
    remote = client.check_external(layer, layer_vjp_bug, {"x": X, "w": W})
    source = CallableSource(layer, layer_vjp_bug, [X, W])
    local = gc.check(
        external_function(source, "layer"), torch.from_numpy(X), torch.from_numpy(W), input_names=["x", "w"]
    )
    assert _comparable(remote) == _comparable(local)


def test_torch_callables_vectorized_with_dict_outputs_and_selected_input(client: Client) -> None:
    calls: list[int] = []

    def fn(x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(x.shape[0])  # every input has the batch dimension, scale too: (B,)
        return {"sin": torch.sin(x) * scale.unsqueeze(-1), "sq": (x**2).sum(-1)}

    def vjp(c: dict[str, torch.Tensor], x: torch.Tensor, scale: torch.Tensor):
        return c["sin"] * torch.cos(x) * scale + 2 * x * c["sq"].unsqueeze(-1), None

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64)  # not checked: x alone sets requires_grad
    report = client.check_external(fn, vjp, {"x": x, "scale": scale}, vectorized=True, max_batch_size=4)
    assert report.ok, str(report)
    assert {(p.output, p.input) for p in report.pairs} == {("output['sin']", "x"), ("output['sq']", "x")}
    assert calls[0] == 1 and max(calls) == 4  # batched, and never above the client's limit


def test_fast_mode_and_jvp(client: Client) -> None:
    def jvp(t: tuple[np.ndarray, np.ndarray], x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (1.0 - np.tanh(x @ w) ** 2) * (t[0] @ w + x @ t[1])

    fast = client.check_external(layer, layer_vjp_bug, {"x": X, "w": W}, options={"mode": "fast"})
    assert not fast.ok and fast.failures[0].input == "w"
    forward = client.check_external(layer, layer_vjp, {"x": X, "w": W}, jvp=jvp, options={"forward_ad": True})
    assert forward.ok and {p.check.value for p in forward.pairs} >= {"forward", "forward_vs_reverse"}


def test_function_that_raises_is_reported_not_an_rpc_error(client: Client) -> None:
    def broken(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        raise ZeroDivisionError("my kernel crashed")

    report = client.check_external(broken, layer_vjp, {"x": X, "w": W})
    assert not report.ok and "ZeroDivisionError: my kernel crashed" in (report.error or "")


def test_unsupported_options_are_refused(client: Client) -> None:
    with pytest.raises(ServiceError, match=r"INVALID_ARGUMENT.*order"):
        client.check_external(layer, layer_vjp, {"x": X, "w": W}, options={"order": 2})
    with pytest.raises(ServiceError, match=r"INVALID_ARGUMENT.*finite"):
        client.check_external(layer, layer_vjp_bug, {"x": X, "w": W}, options={"atol": float("inf")})
    with pytest.raises(ServiceError, match=r"INVALID_ARGUMENT.*has_jvp"):
        client.check_external(layer, layer_vjp, {"x": X, "w": W}, options={"forward_ad": True})


# ----------------------------------------------------------------------------- misbehaving clients


def _start(**fields: object) -> pb.CheckExternalRequest:
    start = pb.ExternalStart(
        function="raw", point=encode_point({"x": torch.tensor([0.5, -1.0, 2.0])}), **fields
    )
    return pb.CheckExternalRequest(start=start)


def _values(
    request: pb.CheckExternalResponse, fn: Callable[[torch.Tensor], torch.Tensor]
) -> pb.CheckExternalRequest:
    x = decode_tensor(request.evaluate.inputs[0].tensor, max_elements=10**6)
    values = pb.ExternalValues(sequence=request.evaluate.sequence)
    values.outputs.add(name="output", tensor=encode_tensor(fn(x)))
    return pb.CheckExternalRequest(values=values)


def _raw(
    address: str,
    answer: Callable[[pb.CheckExternalResponse], pb.CheckExternalRequest | None],
    timeout: float = 30,
    first: pb.CheckExternalRequest | None = None,
) -> tuple[grpc.RpcError | None, list[str]]:
    """Drive CheckExternal by hand: ``answer`` returns the reply to each request, None to go silent,
    or raises StopIteration to half-close. Returns the error (None on success) and the kinds seen."""
    outgoing: queue.Queue[pb.CheckExternalRequest | None] = queue.Queue()
    outgoing.put(first or _start())

    def requests() -> Iterator[pb.CheckExternalRequest]:
        while (m := outgoing.get()) is not None:
            yield m

    seen: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        try:
            for response in stub.CheckExternal(requests(), timeout=timeout):
                seen.append(response.WhichOneof("kind"))
                if seen[-1] == "report":
                    return None, seen
                try:
                    reply = answer(response)
                except StopIteration:
                    outgoing.put(None)
                    continue
                if reply is not None:
                    outgoing.put(reply)
        except grpc.RpcError as exc:
            return exc, seen
        finally:
            outgoing.put(None)
    return None, seen


def _violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields = []
    from google.rpc import error_details_pb2

    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def _slot_is_free(client: Client) -> None:
    """The server has one slot: a good check right after proves the bad one gave it back."""
    assert client.check_external(layer, layer_vjp, {"x": X, "w": W}).ok


def _sine(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
    if request.WhichOneof("kind") == "evaluate":
        return _values(request, torch.sin)
    cot = decode_tensor(request.vjp.cotangents[0].tensor, max_elements=10**6)
    products = pb.ExternalProducts(sequence=request.vjp.sequence)
    products.tensors.add(name="x", tensor=encode_tensor(cot * torch.cos(torch.tensor([0.5, -1.0, 2.0]))))
    return pb.CheckExternalRequest(products=products)


def test_raw_protocol_client_gets_a_report(server: Running) -> None:
    error, seen = _raw(server.address, _sine)
    assert error is None and seen[-1] == "report" and "evaluate" in seen and "vjp" in seen


def test_wrong_shape(server: Running, client: Client) -> None:
    error, _ = _raw(
        server.address,
        lambda r: _values(r, lambda x: torch.sin(x)[..., :2]) if r.evaluate.batch_size > 1 else _sine(r),
    )
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected [" in error.details() and "values.outputs[0].tensor.shape" in _violations(error)
    _slot_is_free(client)


def test_nan_answer(server: Running, client: Client) -> None:
    def nan_gradient(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        reply = _sine(request)
        if reply.WhichOneof("kind") == "products":
            grad = decode_tensor(reply.products.tensors[0].tensor, max_elements=10**6)
            grad[..., 1] = float("nan")
            reply.products.tensors[0].tensor.CopyFrom(encode_tensor(grad))
        return reply

    error, _ = _raw(server.address, nan_gradient)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in error.details() and "products.tensors[0].tensor.data" in _violations(error)
    _slot_is_free(client)


def test_late_and_silent_clients(server: Running, client: Client) -> None:
    def late(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        if request.WhichOneof("kind") == "vjp":
            time.sleep(2.5)  # longer than the server's external_reply_seconds (1.5)
        return _sine(request)

    for behaviour in (late, lambda r: None):
        started = time.monotonic()
        error, _ = _raw(server.address, behaviour)
        assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert "did not answer request" in error.details() and time.monotonic() - started < 20
        _slot_is_free(client)


def test_half_close_and_protocol_errors(server: Running, client: Client) -> None:
    def half_close(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        raise StopIteration

    error, _ = _raw(server.address, half_close)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "closed its side" in error.details()

    def wrong_sequence(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        reply = _sine(request)
        reply.values.sequence += 5
        return reply

    error, _ = _raw(server.address, wrong_sequence)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "values.sequence" in _violations(error)

    error, seen = _raw(server.address, _sine, first=pb.CheckExternalRequest(values=pb.ExternalValues()))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT and seen == []
    _slot_is_free(client)


def test_flood_silence_before_start_and_bad_names(server: Running, client: Client) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        # Twenty unsolicited messages right after start: the server stops reading and says why.
        flood = [pb.CheckExternalRequest(values=pb.ExternalValues(sequence=k)) for k in range(20)]
        with pytest.raises(grpc.RpcError) as info:
            list(stub.CheckExternal(iter([_start(), *flood]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]

        # A stream that never sends `start` holds nothing for longer than the reply timeout.
        silent: queue.Queue[pb.CheckExternalRequest | None] = queue.Queue()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.CheckExternal(iter(silent.get, None), timeout=30))
        silent.put(None)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert "no `start`" in info.value.details()  # type: ignore[attr-defined]
        assert time.monotonic() - started < 15

    bad_name = pb.CheckExternalRequest(start=pb.ExternalStart(point=encode_point({"x y": torch.ones(2)})))
    error, _ = _raw(server.address, _sine, first=bad_name)
    assert error is not None and "start.point.tensors[0].name" in _violations(error)
    _slot_is_free(client)


def test_limits_apply(client: Client) -> None:
    with pytest.raises(ServiceError, match="RESOURCE_EXHAUSTED"):
        client.check_external(layer, layer_vjp, {"x": X, "w": W}, options={"max_jacobian_entries": 10})
    _slot_is_free(client)


def test_client_deadline_and_cancellation(server: Running, client: Client) -> None:
    error, _ = _raw(server.address, lambda r: None, timeout=0.7)
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _slot_is_free(client)

    # Cancel from the client's side while the server waits for an answer.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        outgoing: queue.Queue[pb.CheckExternalRequest | None] = queue.Queue()
        outgoing.put(_start())
        call = stub.CheckExternal(iter(outgoing.get, None), timeout=30)
        assert next(call).WhichOneof("kind") == "evaluate"
        call.cancel()
        outgoing.put(None)
    deadline = time.monotonic() + 10
    while server.server.service.slots.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.server.service.slots.in_flight == 0
    _slot_is_free(client)


def test_busy_server_refuses_a_second_check(server: Running, client: Client) -> None:
    holding = threading.Event()

    def slow(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        holding.set()
        time.sleep(0.5)
        return _sine(request)

    worker = threading.Thread(target=_raw, args=(server.address, slow))
    worker.start()
    assert holding.wait(10)
    with pytest.raises(ServiceError, match="RESOURCE_EXHAUSTED") as busy:
        client.check_external(layer, layer_vjp, {"x": X, "w": W})
    assert busy.value.reason == "SERVER_BUSY"  # as Check says it, so one retry rule serves both
    worker.join()
    _slot_is_free(client)


def test_drain_finishes_the_running_check_and_refuses_new_ones() -> None:
    running = start_server(replica_name="draining", external_reply_seconds=5)
    answered = threading.Event()
    result: list[object] = []

    def slow(request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        answered.set()
        time.sleep(0.05)
        return _sine(request)

    worker = threading.Thread(target=lambda: result.append(_raw(running.address, slow)))
    worker.start()
    assert answered.wait(10)
    stopper = threading.Thread(target=running.server.stop, kwargs={"grace": 20})
    stopper.start()
    while not running.server.service.draining.is_set():
        time.sleep(0.01)
    late, _ = _raw(running.address, _sine)
    worker.join()
    stopper.join()
    assert late is not None and late.code() == grpc.StatusCode.UNAVAILABLE
    late_status = rpc_status.from_call(late)  # type: ignore[arg-type]
    assert late_status is not None and reason_of(late_status) == "SERVER_DRAINING"
    error, seen = result[0]  # type: ignore[misc]
    assert error is None and seen[-1] == "report"


def test_float32_function_is_checked_in_float32(client: Client) -> None:
    x = np.array([0.3, -0.8, 0.5, 1.1, -0.2, 0.05], dtype=np.float32)

    def scaled_tanh(x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32  # the server never sends other dtypes than the client's
        return np.tanh(x) * np.float32(3)

    def vjp(c: np.ndarray, x: np.ndarray) -> np.ndarray:
        return c * 3 * (1 - np.tanh(x) ** 2)

    def vjp_bug(c: np.ndarray, x: np.ndarray) -> np.ndarray:
        g = vjp(c, x).copy()
        g[..., 2] *= 1.03  # float32 finite differences resolve a few per mille, not less
        return g

    good = client.check_external(scaled_tanh, vjp, {"x": x})
    assert good.ok and good.dtype == "float32", str(good)
    bad = client.check_external(scaled_tanh, vjp_bug, {"x": x})
    assert [e.location(p.output, p.input) for p in bad.failures for e in p.worst] == ["output[2] / x[2]"]
    with pytest.raises(ServiceError, match="upcast"):
        client.check_external(scaled_tanh, vjp, {"x": x}, options={"upcast": True})


def test_nondeterministic_gradient_is_flagged(client: Client) -> None:
    noise = np.random.default_rng(3)

    def jittery_vjp(c: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gx, gw = layer_vjp(c, x, w)
        return gx + 1e-9 * noise.normal(size=gx.shape), gw  # a race in a hand-written reduction

    report = client.check_external(layer, jittery_vjp, {"x": X, "w": W})
    statuses = {p.input: p.status.value for p in report.pairs}
    assert not report.ok and statuses == {"x": "nondeterministic", "w": "pass"}, str(report)
