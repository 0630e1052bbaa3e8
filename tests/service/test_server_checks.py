"""Checks through a real server: the same Report as in-process, points, streams, load, discovery."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from service_servers import Running, start_server

import gradcheck_svc as gc
from gradcheck_svc.client import CheckCall, Client, Registered
from gradcheck_svc.specs import SampledInput, SamplingSpec, compile_expression, sample_points

FLOATS = [torch.float32, torch.float64]


def in_process(expression: str, *inputs: torch.Tensor, **options: Any) -> gc.Report:
    fn = compile_expression(expression)
    return gc.check(fn, *inputs, input_names=list(fn.variables), **options)


def figures(report: gc.Report) -> str:
    """Verdict and every figure; what legitimately differs between runs and hosts is left out."""
    data = report.model_dump(mode="json", exclude={"timings", "served_by", "point"})
    return json.dumps(data, sort_keys=True)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_seed_square(client: Client, dtype: torch.dtype) -> None:
    report = client.check("x**2", x=torch.tensor(9.0, dtype=dtype))
    assert report.ok and report.pairs[0].analytic == [18.0]
    assert report.pairs[0].numeric is not None and report.pairs[0].numeric[0] == pytest.approx(18, rel=1e-3)
    assert report.dtype == str(dtype).removeprefix("torch.")
    assert report.served_by == "replica-a" and report.point == 0 and report.function == "x**2"
    assert figures(report) == figures(in_process("x**2", torch.tensor(9.0, dtype=dtype)))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_seed_sine(client: Client, dtype: torch.dtype) -> None:
    x = torch.tensor(100.0, dtype=dtype)
    report = client.check("sin(x / 2**1.5)", x=x)
    assert report.ok
    assert report.pairs[0].analytic is not None and report.pairs[0].analytic[0] == pytest.approx(
        -0.2469, abs=1e-4
    )
    assert figures(report) == figures(in_process("sin(x / 2**1.5)", x))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_seed_two_inputs(client: Client, dtype: torch.dtype) -> None:
    u, v = torch.tensor(2.0, dtype=dtype), torch.tensor(4.0, dtype=dtype)
    report = client.check("u**2 + v**3 + u*v", u=u, v=v)
    assert report.ok
    by_input = {p.input: p for p in report.pairs}
    assert by_input["u"].analytic == [8.0] and by_input["v"].analytic == [50.0]
    assert figures(report) == figures(in_process("u**2 + v**3 + u*v", u, v))
    # Inputs may come in any order; the expression's variables decide.
    assert figures(client.check("u**2 + v**3 + u*v", v=v, u=u)) == figures(report)


def test_options_reach_the_engine_and_the_report(client: Client) -> None:
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    options = {"mode": "fast", "seed": 3, "max_worst": 2, "atol": 1e-7}
    report = client.check("tanh(x) * x", x=x, options=options)
    local = in_process("tanh(x) * x", x, **options)
    assert report.mode == "fast" and report.options == local.options
    assert figures(report) == figures(local)
    full = client.check("tanh(x) * x", x=x, options=gc.CheckOptions(mode="full", order=2))
    assert full.mode == "full" and full.order == 2


def test_several_points(client: Client) -> None:
    points = [{"x": torch.tensor(float(v), dtype=torch.float64)} for v in (1, 2, 3)]
    reports = client.check_points("x**3", points)
    assert [r.point for r in reports] == [0, 1, 2]
    assert [r.pairs[0].analytic for r in reports] == [[3.0], [12.0], [27.0]]


def test_sampled_points_are_the_documented_ones(client: Client) -> None:
    spec = SamplingSpec(
        inputs=(SampledInput("x", (3,)), SampledInput("w", (3,), distribution="uniform")), count=2, seed=5
    )
    reports = client.check_sampled("sum(x * w)", spec)
    assert len(reports) == 2 and all(r.ok for r in reports)
    for report, point in zip(reports, sample_points(spec), strict=True):
        assert figures(report) == figures(in_process("sum(x * w)", point["x"], point["w"]))


def test_registered_function_with_params(client: Client) -> None:
    x = torch.randn(4, dtype=torch.float64)
    report = client.check_registered("torch.nn.functional.softmax", x=x, params={"dim": -1})
    assert report.ok and report.function == "torch.nn.functional.softmax"
    assert report.pairs[0].input == "x" and report.pairs[0].elements_checked == 16
    a = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    solved = client.check_registered("torch.linalg.solve", a, torch.randn(3, dtype=torch.float64))
    assert solved.ok and {p.input for p in solved.pairs} == {"inputs[0]", "inputs[1]"}


def test_planted_gradient_bug_is_reported_with_figures(client: Client) -> None:
    report = client.check_registered("service_test_ops:BadBackward", x=torch.tensor(2.0, dtype=torch.float64))
    assert not report.ok and report.error is None
    pair = report.pairs[0]
    assert pair.status == gc.Status.FAIL and pair.analytic == [6.0]  # 3x instead of 2x
    assert pair.worst and pair.worst[0].numeric == pytest.approx(4.0)


def test_function_raising_at_one_point_is_that_points_error(client: Client) -> None:
    points = [{"x": torch.tensor(v, dtype=torch.float64)} for v in (4.0, -1.0, 9.0)]
    reports = client.check_points(Registered("service_test_ops:raises_when_negative"), points)
    assert [r.ok for r in reports] == [True, False, True]
    assert reports[1].error is not None and "negative input" in reports[1].error
    assert reports[1].point == 1 and reports[1].served_by == "replica-a"
    assert client.check("x**2", x=torch.tensor(9.0)).ok  # the server is unharmed


def test_non_tensor_output_is_that_points_error(client: Client) -> None:
    report = client.check_registered("service_test_ops:returns_text", x=torch.tensor(1.0))
    assert not report.ok and report.error and "str" in report.error


def test_nan_at_a_point_is_reported_not_raised(client: Client) -> None:
    report = client.check("log(x)", x=torch.tensor(-1.0, dtype=torch.float64))
    assert not report.ok and report.pairs[0].status == gc.Status.NONFINITE
    assert report.pairs[0].numeric is not None and math.isnan(report.pairs[0].numeric[0])


def test_stream_answers_every_item(client: Client) -> None:
    calls = [
        CheckCall("x**2", points=[{"x": torch.tensor(float(i), dtype=torch.float64)}], id=f"sq{i}")
        for i in range(6)
    ]
    calls.append(CheckCall("x.__class__", points=[{"x": torch.tensor(1.0)}], id="bad"))
    calls.append(CheckCall(Registered("no.such:fn"), points=[{"x": torch.tensor(1.0)}], id="missing"))
    calls.append(
        CheckCall("x**2", sampling=SamplingSpec(inputs=(SampledInput("x", (2,)),), count=2), id="sampled")
    )
    results = {r.id: r for r in client.check_stream(calls)}
    assert set(results) == {c.id for c in calls}
    for i in range(6):
        reports = results[f"sq{i}"].reports
        assert reports is not None and reports[0].pairs[0].analytic == [2.0 * i]
    assert results["bad"].error is not None and results["bad"].error.code == "INVALID_ARGUMENT"
    assert results["missing"].error is not None and results["missing"].error.code == "NOT_FOUND"
    assert len(results["sampled"].reports or []) == 2


def test_sixteen_concurrent_clients_all_correct(address: str) -> None:
    def one(k: int) -> list[float]:
        with Client(address) as c:
            out = []
            for j in range(3):
                x = torch.tensor(float(k * 3 + j), dtype=torch.float64)
                report = c.check("x**2 + 3*x", x=x)
                assert report.ok
                out.append(report.pairs[0].analytic[0])  # type: ignore[index]
            return out

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [[2.0 * (k * 3 + j) + 3 for j in range(3)] for k in range(16)]


def test_capabilities(client: Client) -> None:
    caps = client.capabilities()
    assert caps.server_version == gc.__version__ and caps.torch_version == torch.__version__
    assert caps.devices[0].name == "cpu" and caps.cuda_available == torch.cuda.is_available()
    assert (
        "torch.sin" in caps.registered_functions
        and "service_test_ops:slow_square" in caps.registered_functions
    )
    assert "sin" in caps.expression_functions and "float32" in caps.dtypes
    assert caps.limits["max_concurrent_checks"] == 32 and caps.served_by == "replica-a"


def test_health(address: str, client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("gradcheck_svc.v1.GradcheckService") == "SERVING"
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_client_lists_and_calls_the_service(address: str) -> None:
    """A generic client, knowing nothing but the address, discovers the schema and runs a check."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "gradcheck_svc.v1.GradcheckService" in services and "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("gradcheck_svc.v1.GradcheckService").methods_by_name["Check"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class()
        request.function.expression = "x**2"
        tensor = request.explicit_points.points.add().tensors.add()
        tensor.name = "x"
        tensor.tensor.dtype = (
            pool.FindEnumTypeByName("gradcheck_svc.v1.Dtype").values_by_name["DTYPE_FLOAT64"].number
        )
        tensor.tensor.data = torch.tensor(9.0, dtype=torch.float64).numpy().tobytes()
        call = channel.unary_unary(
            "/gradcheck_svc.v1.GradcheckService/Check",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response = call(request, timeout=30)
    assert response.reports[0].ok and list(response.reports[0].pairs[0].analytic.values) == [18.0]


@pytest.fixture(scope="module")
def replica_b() -> Running:
    running = start_server(replica_name="replica-b")
    yield running  # type: ignore[misc]
    running.server.stop(grace=1)


def test_round_robin_over_several_targets(address: str, replica_b: Running) -> None:
    with Client([address, replica_b.address]) as c:
        served = [c.check("x**2", x=torch.tensor(3.0)).served_by for _ in range(4)]
    assert served == ["replica-a", "replica-b", "replica-a", "replica-b"]


def test_unavailable_target_is_skipped(address: str) -> None:
    with Client(["127.0.0.1:1", address], connect_timeout=1) as c:
        assert all(c.check("x**2", x=torch.tensor(3.0)).ok for _ in range(3))


def test_dns_target_with_round_robin_policy(address: str) -> None:
    with Client(f"dns:///{address}", retry=True) as c:
        assert c.check("x**2", x=torch.tensor(3.0)).ok


def test_light_checks_never_wait_for_a_worker_process() -> None:
    """Under isolation=auto the seed checks (sized up front, small everywhere) run in the handler
    thread: with the worker pool closed they still pass, while a check too large to be light,
    which must go to a worker, is refused."""
    running = start_server(isolation="auto")
    try:
        assert running.server.service.workers is not None
        running.server.service.workers.close()
        with Client(running.address, timeout=60) as c:
            assert c.check("x**2", x=torch.tensor(9.0)).pairs[0].analytic == [18.0]
            assert c.check("sin(x / 2**1.5)", x=torch.tensor(100.0)).ok
            u, v = torch.tensor(2.0), torch.tensor(4.0)
            assert c.check("u*v + u**2 + v**3", u=u, v=v).ok
            with pytest.raises(gc.ServiceError) as refused:
                c.check("x * 2", x=torch.linspace(-1, 1, 5000))  # over LIGHT_INPUTS
            assert refused.value.code == "UNAVAILABLE"
    finally:
        running.server.stop(grace=0)
