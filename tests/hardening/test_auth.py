"""Bearer tokens as a raw gRPC client meets them: `serve --auth-tokens t1,t2` accepts each token (and
not the two joined), every refusal on every method carries ErrorInfo reason TOKEN_INVALID, and the
health service stays open."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from service_servers import ServeProcess

from gradcheck_svc.client import build_request
from gradcheck_svc.settings import Settings
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

REQUEST = build_request("x * x", points=[{"x": torch.tensor(2.0, dtype=torch.float64)}])


@pytest.fixture(scope="module")
def guarded() -> Iterator[str]:
    process = ServeProcess("--auth-tokens", "s3cret,other", "--isolation", "thread")
    try:
        yield process.address
    finally:
        process.stop()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status carries no google.rpc.Status details"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "gradcheck-svc"
            return str(info.reason)
    raise AssertionError("no ErrorInfo among the details")


def test_comma_separated_flag_gives_two_tokens(guarded: str) -> None:
    with grpc.insecure_channel(guarded) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        for token in ("s3cret", "other"):
            assert stub.Check(REQUEST, timeout=30, metadata=bearer(token)).reports[0].ok
        for token in ("s3cret,other", "s3cre", "s3cret,", "other s3cret"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(REQUEST, timeout=30, metadata=bearer(token))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert reason(info.value) == "TOKEN_INVALID"


def test_every_method_refuses_without_a_token_with_a_reason(guarded: str) -> None:
    with grpc.insecure_channel(guarded) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        calls = {
            "Check": lambda: stub.Check(REQUEST, timeout=30),
            "GetCapabilities": lambda: stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=30),
            "CheckWithProgress": lambda: list(
                stub.CheckWithProgress(pb.CheckWithProgressRequest(request=REQUEST), timeout=30)
            ),
            "CheckStream": lambda: list(
                stub.CheckStream(iter([pb.CheckStreamRequest(id="a", request=REQUEST)]), timeout=30)
            ),
            "CheckExternal": lambda: list(stub.CheckExternal(iter([]), timeout=30)),
            "reflection": lambda: list(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
                )
            ),
        }
        for name, attempt in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                attempt()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name  # type: ignore[attr-defined]
            assert reason(info.value) == "TOKEN_INVALID", name
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                timeout=30,
                metadata=bearer("other"),
            )
        )
        names = [s.name for s in listed[0].list_services_response.service]
        assert "gradcheck_svc.v1.GradcheckService" in names


@pytest.mark.parametrize(
    ("given", "tokens"),
    [(["a,b"], ["a", "b"]), (["a", "b,c"], ["a", "b", "c"]), ('["x,y"]', ["x,y"]), ("a, b", ["a", "b"])],
)
def test_flag_values_split_as_the_environment_does(given: object, tokens: list[str]) -> None:
    assert [t.get_secret_value() for t in Settings(auth_tokens=given).auth_tokens] == tokens


def test_a_stray_comma_in_a_flag_value_is_an_empty_token() -> None:
    with pytest.raises(ValueError, match="empty token"):
        Settings(auth_tokens=["good,"])
