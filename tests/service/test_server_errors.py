"""Every way a request can fail, and the status code and details the client gets for it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import service_test_ops
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from service_servers import Running, make_registry, start_server

from gradcheck_svc.client import Client, Registered, build_request
from gradcheck_svc.codec import encode_point
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.server import create_server
from gradcheck_svc.settings import Settings
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.GradcheckServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GradcheckServiceStub(channel)


def rejected(
    stub: pb_grpc.GradcheckServiceStub, request: pb.CheckRequest
) -> tuple[grpc.StatusCode, str, list]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(request, timeout=30)
    error = info.value
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    violations = []
    infos = []
    for detail in status.details if status else ():
        bad, info_ = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
        if detail.Unpack(bad):
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Unpack(info_):
            infos.append(info_)
    assert len(infos) == 1 and infos[0].domain == "gradcheck-svc" and infos[0].reason  # AIP-193
    return error.code(), error.details(), violations  # type: ignore[attr-defined]


def expression_request(text: str, **tensors: torch.Tensor) -> pb.CheckRequest:
    return build_request(text, points=[tensors])


def x64(value: float = 1.0) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


# ----------------------------------------------------------------------------- INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        (
            expression_request("x.__class__", x=x64()),
            "function.expression",
            "attribute access is not allowed",
        ),
        (
            expression_request("__import__('os')", x=x64()),
            "function.expression",
            "unknown function '__import__'",
        ),
        (expression_request("10**10**10 * x", x=x64()), "function.expression", "exponent"),
        (expression_request("2 * 3", x=x64()), "function.expression", "has no variables"),
        (
            pb.CheckRequest(explicit_points=pb.ExplicitPoints(points=[encode_point({"x": x64()})])),
            "function",
            "set",
        ),
        (pb.CheckRequest(function=pb.FunctionSpec(expression="x")), "points", "explicit_points or sampling"),
        (
            pb.CheckRequest(function=pb.FunctionSpec(expression="x"), explicit_points=pb.ExplicitPoints()),
            "explicit_points.points",
            "at least one",
        ),
        (expression_request("u * v", u=x64()), "explicit_points.points[0]", "no value for the variable(s) v"),
        (
            expression_request("u * 2", u=x64(), w=x64()),
            "explicit_points.points[0].tensors[1].name",
            "'w' is not a variable",
        ),
    ],
    ids=[
        "attribute",
        "import",
        "power-tower",
        "no-variables",
        "no-function",
        "no-points",
        "empty",
        "missing",
        "extra",
    ],
)
def test_invalid_requests_name_the_field(
    stub: pb_grpc.GradcheckServiceStub, request_: pb.CheckRequest, field: str, message: str
) -> None:
    code, details, violations = rejected(stub, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert violations and violations[0][0] == field and message in violations[0][1]
    assert message in details


def tensor_request(tensor: pb.Tensor, name: str = "x") -> pb.CheckRequest:
    return pb.CheckRequest(
        function=pb.FunctionSpec(expression="x * 2"),
        explicit_points=pb.ExplicitPoints(
            points=[pb.Point(tensors=[pb.NamedTensor(name=name, tensor=tensor)])]
        ),
    )


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        (pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[3], data=b"\0" * 23), "tensor.data"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[], data=b"\0" * 8), "tensor.dtype"),
        (pb.Tensor(dtype=77, shape=[], data=b"\0" * 8), "tensor.dtype"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[-2], data=b""), "tensor.shape[0]"),
    ],
    ids=["byte-length", "unset-dtype", "unknown-dtype", "negative-dim"],
)
def test_malformed_tensors(stub: pb_grpc.GradcheckServiceStub, tensor: pb.Tensor, field: str) -> None:
    code, _, violations = rejected(stub, tensor_request(tensor))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert violations[0][0] == f"explicit_points.points[0].tensors[0].{field}"


def test_duplicate_and_invalid_names(stub: pb_grpc.GradcheckServiceStub) -> None:
    x = encode_point({"x": x64()}).tensors[0]
    request = pb.CheckRequest(
        function=pb.FunctionSpec(expression="x * 2"),
        explicit_points=pb.ExplicitPoints(points=[pb.Point(tensors=[x, x])]),
    )
    code, details, _ = rejected(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "given twice" in details
    code, details, _ = rejected(stub, tensor_request(x.tensor, name="x; rm -rf /"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid input name" in details


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (pb.Options(atol=-1.0), "options.atol"),
        (pb.Options(mode=99), "options.mode"),
        (pb.Options(order=3), "options.order"),
    ],
    ids=["negative-atol", "unknown-mode", "order-3"],
)
def test_invalid_options(stub: pb_grpc.GradcheckServiceStub, options: pb.Options, field: str) -> None:
    request = expression_request("x * 2", x=x64())
    request.options.CopyFrom(options)
    code, _, violations = rejected(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == field


def test_nothing_to_differentiate(client: Client) -> None:
    with pytest.raises(ServiceError) as info:
        client.check("x * 2", x=torch.tensor(3))
    assert info.value.code == "INVALID_ARGUMENT" and "nothing to differentiate" in str(info.value)


def test_registered_params_are_validated(client: Client) -> None:
    with pytest.raises(ServiceError) as info:
        client.check_registered("torch.nn.functional.softmax", x=x64(), params={"dim": "os.system"})
    assert info.value.code == "INVALID_ARGUMENT" and "function.registered.params" in str(info.value)
    with pytest.raises(ServiceError, match="finite") as info:
        client.check_registered("torch.nn.functional.elu", x=x64(), params={"alpha": float("nan")})


def test_unknown_registered_function_is_not_found(client: Client) -> None:
    for name in ["os.system", "torch.load", "no.such:function"]:
        with pytest.raises(ServiceError) as info:
            client.check_registered(name, x=x64())
        assert info.value.code == "NOT_FOUND" and name in str(info.value)


def test_client_errors_carry_the_field_details(client: Client) -> None:
    with pytest.raises(ServiceError) as info:
        client.check("u * v", u=x64())
    assert info.value.code == "INVALID_ARGUMENT"
    assert "explicit_points.points[0]" in str(info.value) and "v" in str(info.value)


# ----------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def limited() -> Iterator[Running]:
    running = start_server(
        replica_name="limited",
        max_concurrent_checks=1,
        max_tensor_elements=1000,
        max_request_elements=2000,
        max_points=4,
        max_jacobian_entries=5000,
        max_evaluations=5000,
        max_message_bytes=64 * 1024,
        max_check_seconds=2.0,
    )
    yield running
    running.server.stop(grace=0)


@pytest.fixture
def limited_client(limited: Running) -> Iterator[Client]:
    # busy_wait=0: these tests see the server's refusals, which the client otherwise waits out
    with Client(limited.address, timeout=30, busy_wait=0) as c:
        yield c


def exhausted(call: object) -> str:
    with pytest.raises(ServiceError) as info:
        call()  # type: ignore[operator]
    assert info.value.code == "RESOURCE_EXHAUSTED", str(info.value)
    return str(info.value)


def test_size_limits(limited_client: Client) -> None:
    c = limited_client
    assert "max_tensor_elements" in exhausted(lambda: c.check("x * 2", x=torch.zeros(1001, dtype=F64)))
    assert "max_points" in exhausted(lambda: c.check_points("x * 2", [{"x": x64()}] * 5))
    many = {
        "a": torch.zeros(900, dtype=F64),
        "b": torch.zeros(900, dtype=F64),
        "c": torch.zeros(900, dtype=F64),
    }
    assert "max_request_elements" in exhausted(lambda: c.check("a + b + c", **many))
    assert "tensor of 10000 elements" in exhausted(
        lambda: c.check("sum(outer(x, x))", x=torch.zeros(100, dtype=F64))
    )
    assert "Jacobian entries" in exhausted(lambda: c.check("x * 2", x=torch.zeros(100, dtype=F64)))
    assert c.check("x * 2", x=torch.zeros(10, dtype=F64)).ok  # and the server still works


def test_message_size_limit(limited: Running) -> None:
    with Client(limited.address, connect_timeout=5) as c:
        exhausted(lambda: c.check("x * 2", x=torch.zeros(20_000, dtype=F64)))


def test_client_may_only_lower_the_limits(client: Client) -> None:
    assert "Jacobian entries" in exhausted(
        lambda: client.check("x * 2", x=torch.zeros(20, dtype=F64), options={"max_jacobian_entries": 10})
    )


def slow_request(delay: float = 0.1, n: int = 60) -> pb.CheckRequest:
    """A check that runs for many seconds unless stopped: one slow evaluation per FD chunk."""
    options = {"chunk_size": 1, "mode": "full"}
    return build_request(
        Registered("service_test_ops:slow_square", {"delay": delay}),
        points=[{"x": torch.linspace(1, 2, n, dtype=F64)}],
        options=options,
    )


def calls_stop_growing(within: float = 2.0) -> bool:
    """True once slow_square is no longer being called (the server stopped the work)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = service_test_ops.calls["slow_square"]
        time.sleep(0.35)
        if service_test_ops.calls["slow_square"] == before:
            return True
    return False


def test_per_check_time_cap(limited: Running) -> None:
    with grpc.insecure_channel(limited.address) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GradcheckServiceStub(channel).Check(slow_request(), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "max_check_seconds" in info.value.details()  # type: ignore[attr-defined]
    assert 2 <= time.monotonic() - started < 6
    assert calls_stop_growing()


def test_busy_server_rejects_instead_of_queueing(limited: Running, limited_client: Client) -> None:
    with grpc.insecure_channel(limited.address) as channel:
        running = pb_grpc.GradcheckServiceStub(channel).Check.future(slow_request(), timeout=30)
        deadline = time.monotonic() + 10
        while limited.server.service.slots.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "server busy" in exhausted(lambda: limited_client.check("x * 2", x=x64()))
        running.cancel()
    deadline = time.monotonic() + 5
    while limited.server.service.slots.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert limited_client.check("x * 2", x=x64()).ok


# ----------------------------------------------------------------------------- device, deadline, cancel


def test_cuda_on_a_server_without_it(client: Client) -> None:
    if torch.cuda.is_available():
        assert client.check("x * 2", x=x64(), options={"device": "cuda"}).device.startswith("cuda")
        return
    with pytest.raises(ServiceError) as info:
        client.check("x * 2", x=x64(), options={"device": "cuda"})
    assert info.value.code == "FAILED_PRECONDITION" and "no CUDA device" in str(info.value)
    assert client.check("x * 2", x=x64(), options={"device": "auto"}).device == "cpu"


def test_client_deadline_is_honoured_and_frees_the_server(server: Running, address: str) -> None:
    service_test_ops.reset()
    with Client(address) as c:
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            c.check_registered("service_test_ops:slow_square", x=torch.linspace(1, 2, 200, dtype=F64),
                               params={"delay": 0.1}, options={"chunk_size": 1}, timeout=1.0)  # fmt: skip
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 3
    assert calls_stop_growing()
    deadline = time.monotonic() + 5
    while server.server.service.slots.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.server.service.slots.in_flight == 0


def test_client_cancellation_stops_the_work(server: Running, address: str) -> None:
    service_test_ops.reset()
    with grpc.insecure_channel(address) as channel:
        future = pb_grpc.GradcheckServiceStub(channel).Check.future(slow_request(), timeout=60)
        while service_test_ops.calls["slow_square"] < 2:
            time.sleep(0.02)
        future.cancel()
    assert calls_stop_growing()
    deadline = time.monotonic() + 5
    while server.server.service.slots.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.server.service.slots.in_flight == 0


def test_unreachable_server_fails_promptly() -> None:
    started = time.monotonic()
    with Client("127.0.0.1:1", connect_timeout=2) as c, pytest.raises(ServiceError) as info:
        c.check("x * 2", x=x64())
    assert info.value.code == "UNAVAILABLE" and time.monotonic() - started < 3
    with Client("127.0.0.1:1", connect_timeout=2) as c, pytest.raises(ServiceError):
        c.capabilities()


# ----------------------------------------------------------------------------- tokens


def test_bearer_tokens() -> None:
    running = start_server(replica_name="guarded", auth_tokens="s3cret,other")
    try:
        for token in (None, "wrong"):
            with Client(running.address, token=token) as c, pytest.raises(ServiceError) as info:
                c.check("x * 2", x=x64())
            assert info.value.code == "UNAUTHENTICATED"
        with Client(running.address, token="s3cret") as c:
            assert c.check("x * 2", x=x64()).ok
            assert c.capabilities().served_by == "guarded"
        with Client(running.address) as c:
            assert c.health() == "SERVING"  # probes need no token
    finally:
        running.server.stop(grace=0)


def test_server_survives_a_burst_of_bad_requests(client: Client, stub: pb_grpc.GradcheckServiceStub) -> None:
    def bad(i: int) -> None:
        with contextlib.suppress(grpc.RpcError):
            stub.Check(
                tensor_request(pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[i + 1], data=b"\0")), timeout=10
            )

    threads = [threading.Thread(target=bad, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.check("x**2", x=torch.tensor(9.0)).ok


# ----------------------------------------------------------------------------- INTERNAL


def test_an_internal_error_is_answered_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def broken_engine(*args: object, **kwargs: object) -> object:
        return None  # not a Report: encoding it fails inside the server

    server, port = create_server(
        Settings(host="127.0.0.1", port=0, entry_points=False, device="cpu"),
        registry=make_registry(),
        check_fn=broken_engine,
    )
    server.start(warm_up=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, caplog.at_level("ERROR"):
            stub = pb_grpc.GradcheckServiceStub(channel)
            ids = []
            for _ in range(2):  # the server keeps answering
                code, message, _ = rejected(stub, expression_request("x**2", x=x64(9)))
                assert code == grpc.StatusCode.INTERNAL and "internal error in check " in message
                ids.append(message.split("internal error in check ")[1].split(":")[0])
        logged = [r for r in caplog.records if "internal error" in r.getMessage()]
        assert len(logged) == 2 and len(set(ids)) == 2
        for check_id, record in zip(ids, logged, strict=True):
            assert check_id in record.getMessage() and record.exc_info  # once each, with its traceback
    finally:
        server.stop(grace=None)
