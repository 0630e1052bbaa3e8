"""The limits tests/service does not already cover: finite-difference evaluations, tensors per
request, limits reported by GetCapabilities, and settings read from GRADCHECK_* variables."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from service_servers import Running, start_server

from gradcheck_svc.client import Client
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.settings import Settings
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64


@pytest.fixture(scope="module")
def tight() -> Iterator[Running]:
    running = start_server(
        replica_name="tight", max_evaluations=50, max_jacobian_entries=10_000, isolation="thread"
    )
    yield running
    running.server.stop(grace=0)


def test_finite_difference_evaluations_are_capped(tight: Running) -> None:
    with Client(tight.address, timeout=30) as c:
        with pytest.raises(ServiceError) as info:
            c.check("x * 2", x=torch.zeros(60, dtype=F64))  # 60 elements: more than 50 evaluations
        assert info.value.code == "RESOURCE_EXHAUSTED" and "evaluations" in str(info.value)
        with pytest.raises(ServiceError) as info:
            c.check("x * 2", x=torch.zeros(5, dtype=F64), options={"max_evaluations": 2})
        assert info.value.code == "RESOURCE_EXHAUSTED"  # a client may lower the cap
        assert c.check("x * 2", x=torch.zeros(5, dtype=F64)).ok


def test_capabilities_report_the_limits(tight: Running) -> None:
    with Client(tight.address) as c:
        limits = c.capabilities().limits
    assert limits["max_evaluations"] == 50 and limits["max_jacobian_entries"] == 10_000
    assert limits["max_concurrent_checks"] == Settings().max_concurrent_checks
    assert limits["max_request_tensors"] == Settings().max_request_tensors
    assert limits["max_request_bytes_in_flight"] == Settings().max_request_bytes_in_flight
    assert limits["max_calls_per_client"] == Settings().calls_per_client
    assert limits["max_check_bytes_in_flight"] == Settings().check_bytes_in_flight


def test_every_limit_is_a_gradcheck_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "MAX_MESSAGE_BYTES": 4096,
        "MAX_TENSOR_ELEMENTS": 10,
        "MAX_REQUEST_ELEMENTS": 20,
        "MAX_POINTS": 2,
        "MAX_JACOBIAN_ENTRIES": 30,
        "MAX_EVALUATIONS": 40,
        "MAX_CHECK_SECONDS": 1.5,
        "KILL_AFTER_SECONDS": 0.5,
        "MAX_CONCURRENT_CHECKS": 3,
        "MAX_CALLS_PER_CLIENT": 2,
        "MAX_REQUEST_TENSORS": 7,
        "MAX_REQUEST_BYTES_IN_FLIGHT": 5000,
        "MAX_CHECK_BYTES_IN_FLIGHT": 6 * 1024 * 1024,
    }
    for name, value in values.items():
        monkeypatch.setenv(f"GRADCHECK_{name}", str(value))
    monkeypatch.setenv("GRADCHECK_ISOLATION", "process")
    settings = Settings()
    for name, value in values.items():
        assert getattr(settings, name.lower()) == value
    assert settings.isolation == "process"


def test_a_million_scalars_are_refused_before_any_is_decoded(tight: Running) -> None:
    # Within max_request_elements, but each tensor costs its decoding: 100,000 scalars took 16 s
    # of a handler thread (4.6 s of planning alone) before the check's deadline even started.
    scalar = pb.Tensor(dtype=pb.DTYPE_FLOAT64, data=bytes(8))
    point = pb.Point(tensors=[pb.NamedTensor(name=f"t{i}", tensor=scalar) for i in range(100_000)])
    requests = {
        "explicit_points.points": pb.CheckRequest(
            function=pb.FunctionSpec(registered=pb.RegisteredFunction(name="torch.sin")),
            explicit_points=pb.ExplicitPoints(points=[point]),
        ),
        "sampling": pb.CheckRequest(
            function=pb.FunctionSpec(expression=" + ".join(f"x{k}" for k in range(20))),
            sampling=pb.SamplingSpec(
                inputs=[pb.SampledInput(name=f"x{k}") for k in range(20)], point_count=1000
            ),
        ),
    }
    with grpc.insecure_channel(tight.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        for field, request in requests.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(request, timeout=5)
            error = info.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, field  # type: ignore[attr-defined]
            assert "max_request_tensors" in error.details() and field in error.details()  # type: ignore[attr-defined]
