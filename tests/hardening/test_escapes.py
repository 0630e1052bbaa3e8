"""A named corpus of escape and exhaustion attempts, sent whole to a real server: each is refused
with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and a message that names the problem.

tests/service/test_expression.py holds the parser-level corpus; this one crosses the wire."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
import torch
from service_servers import Running, start_server

from gradcheck_svc.client import Registered, build_request
from gradcheck_svc.codec import encode_value
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

X = torch.tensor(2.0, dtype=torch.float64)
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def expr(text: str) -> pb.CheckRequest:
    return build_request(text, points=[{"x": X}])


def tensor(shape: list[int], data: bytes = b"", dtype: int = pb.DTYPE_FLOAT64) -> pb.CheckRequest:
    return pb.CheckRequest(
        function=pb.FunctionSpec(expression="x * 2"),
        explicit_points=pb.ExplicitPoints(
            points=[
                pb.Point(
                    tensors=[pb.NamedTensor(name="x", tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))]
                )
            ]
        ),
    )


def registered(name: str, **params: object) -> pb.CheckRequest:
    request = build_request(Registered(name), points=[{"x": X}])
    for key, value in params.items():
        request.function.registered.params[key].CopyFrom(encode_value(value))
    return request


def with_options(**options: float) -> pb.CheckRequest:
    request = expr("x * 2")
    for key, value in options.items():
        setattr(request.options, key, value)
    return request


def sampled(**normal: float) -> pb.CheckRequest:
    return pb.CheckRequest(
        function=pb.FunctionSpec(expression="x * 2"),
        sampling=pb.SamplingSpec(
            inputs=[
                pb.SampledInput(name="x", shape=[2], distribution=pb.Distribution(normal=pb.Normal(**normal)))
            ]
        ),
    )


CORPUS: dict[str, tuple[pb.CheckRequest, grpc.StatusCode, str]] = {
    "dunder attribute": (expr("x.__class__.__mro__"), INVALID, "attribute access"),
    "dunder name": (expr("__builtins__ + x"), INVALID, "not allowed"),
    "__import__": (expr("__import__('os').system('true') + x"), INVALID, "plain function names"),
    "__import__ call": (expr("__import__('os') + x"), INVALID, "unknown function '__import__'"),
    "getattr": (expr("getattr(x, 'grad')"), INVALID, "unknown function 'getattr'"),
    "lambda": (expr("(lambda: x)()"), INVALID, "plain function names"),
    "bare lambda": (expr("lambda: x"), INVALID, "lambda"),
    "comprehension": (expr("sum([x for _ in range(9)])"), INVALID, "comprehension"),
    "generator": (expr("sum(x for _ in x)"), INVALID, "generator"),
    "walrus": (expr("(y := x) * y"), INVALID, "walrus"),
    "f-string": (expr("f'{x}'"), INVALID, "f-string"),
    "string": (expr("'os' + x"), INVALID, "constant 'os'"),
    "power tower": (expr("10**10**10 * x"), INVALID, "exponent"),
    "huge exponent": (expr("x ** 1000000"), INVALID, "exponent"),
    "deep nesting": (expr("sin(" * 200 + "x" + ")" * 200), INVALID, "nests deeper"),
    "deep parentheses": (expr("(" * 1000 + "x" + ")" * 1000), INVALID, "expression"),
    "too long": (expr("x" + "+x" * 5000), INVALID, "longer than"),
    "null byte": (expr("x\x00"), INVALID, "expression"),
    "1e12 elements": (tensor([10**6, 10**6]), EXHAUSTED, "max_tensor_elements"),
    "int64 overflow": (tensor([2**62, 2**62, 2**62]), EXHAUSTED, "max_tensor_elements"),
    "huge dim beside zero": (tensor([0, 2**62]), EXHAUSTED, "dimension"),
    "negative dim": (tensor([-1]), INVALID, "negative"),
    "too many dims": (tensor([1] * 64, b"\0" * 8), INVALID, "dimensions"),
    "short data": (tensor([4], b"\0" * 31), INVALID, "needs 32"),
    "long data": (tensor([], b"\0" * 9), INVALID, "needs 8"),
    "unknown dtype": (tensor([], b"\0" * 8, dtype=99), INVALID, "dtype"),
    "NaN parameter": (registered("torch.nn.functional.elu", alpha=math.nan), INVALID, "finite"),
    "Inf parameter": (registered("torch.nn.functional.elu", alpha=math.inf), INVALID, "finite"),
    "code as parameter": (registered("torch.nn.functional.softmax", dim="__import__('os')"), INVALID, "dim"),
    "unknown parameter": (registered("torch.sin", __class__=1), INVALID, "no parameter"),
    "NaN tolerance": (with_options(atol=math.nan), INVALID, "atol"),
    "Inf tolerance": (with_options(rtol=math.inf), INVALID, "options.rtol: must be a finite number"),
    "NaN step": (with_options(eps=math.nan), INVALID, "eps"),
    "NaN sampling": (sampled(mean=math.nan), INVALID, "finite"),
    "Inf sampling": (sampled(std=math.inf), INVALID, "finite"),
}


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.GradcheckServiceStub]:
    running: Running = start_server(replica_name="escapes", max_tensor_elements=100_000, isolation="thread")
    with grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.GradcheckServiceStub(channel)
    running.server.stop(grace=0)


@pytest.mark.parametrize(("request_", "code", "fragment"), list(CORPUS.values()), ids=list(CORPUS))
def test_escape_attempt_is_refused(
    stub: pb_grpc.GradcheckServiceStub, request_: pb.CheckRequest, code: grpc.StatusCode, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(request_, timeout=20)
    assert info.value.code() == code, info.value.details()  # type: ignore[attr-defined]
    assert fragment in info.value.details()  # type: ignore[attr-defined]
