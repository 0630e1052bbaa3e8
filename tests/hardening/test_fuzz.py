"""Hypothesis against the parser, the tensor decoder and whole requests on a real server.

Budgets are bounded (max_examples, deadline) so the module runs in well under a minute on two cores.
Every rejection must be a SpecError / InvalidRequestError / LimitExceededError locally, and on the
wire one of the documented codes with a message; nothing may crash, hang or allocate past a limit.
"""

from __future__ import annotations

import ast
import contextlib
import math
from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_servers import Running, start_server

from gradcheck_svc import codec
from gradcheck_svc.client import Client
from gradcheck_svc.errors import InvalidRequestError, LimitExceededError, SpecError
from gradcheck_svc.specs import EXPRESSION_FUNCTIONS, parse_expression
from gradcheck_svc.specs.expression import DEFAULT_LIMITS
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

LIMIT = 4096
# What a rejection may be: the request is wrong, too big, names nothing, or wants a missing device.
REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}

# ----------------------------------------------------------------------------- strategies

_TOKENS = [
    "x", "y", "w", "pi", "_x", "__class__", "__import__", "getattr", "lambda", "for", "in", ":=", "if",
    "else", "and", "not", "import", "os", "f'", "'", '"', "{", "}", "[", "]", "(", ")", ",", ".", ":",
    ";", "=", "==", "+", "-", "*", "/", "**", "@", "%", "//", "~", "<<", "0", "1", "2.5", "1e308",
    "10", "9" * 30, "1j", "...", "dim=", "dim=-1", "approximate='tanh'", "\\", "\n", " ", "\x00",
    *sorted(EXPRESSION_FUNCTIONS)[:40],
]  # fmt: skip
token_soup = st.lists(st.sampled_from(_TOKENS), max_size=40).map(" ".join)


@st.composite
def well_formed(draw: st.DrawFn, depth: int = 0) -> str:
    """Mostly valid expressions, to reach the builder and the size checks, not only the syntax error."""
    if depth > 4 or draw(st.booleans()):
        return draw(st.sampled_from(["x", "y", "2", "0.5", "pi", "-x", "x[0]", "x[..., 1:]"]))
    kind = draw(st.sampled_from(["binop", "call", "pow"]))
    left = draw(well_formed(depth + 1))
    if kind == "binop":
        return f"({left} {draw(st.sampled_from(['+', '-', '*', '/', '@']))} {draw(well_formed(depth + 1))})"
    if kind == "pow":
        return f"({left}) ** {draw(st.integers(-100, 100))}"
    name = draw(st.sampled_from(sorted(EXPRESSION_FUNCTIONS)))
    return f"{name}({left})"


expressions = st.one_of(st.text(max_size=200), token_soup, well_formed())


def tensors_msgs() -> st.SearchStrategy[pb.Tensor]:
    huge = st.sampled_from([10**6, 10**12, 2**31, 2**62, 2**63 - 1])
    dims = st.one_of(st.integers(-3, 6), huge)
    return st.builds(
        pb.Tensor,
        dtype=st.one_of(st.sampled_from(list(codec.DTYPES)), st.integers(0, 40)),
        shape=st.lists(dims, max_size=6),
        data=st.one_of(st.binary(max_size=64), st.sampled_from([b"\0" * 8, b"\0" * 16, b"\0" * 48])),
        requires_grad=st.booleans(),
    )


# ----------------------------------------------------------------------------- parser and decoder


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions)
def test_parser_accepts_or_rejects_with_a_reason(text: str) -> None:
    try:
        expression = parse_expression(text)
    except SpecError as exc:
        assert str(exc)
        return
    # Parsing is bounded whatever the text: what is accepted is no longer, no larger and no deeper
    # than the limits the parser and the evaluator's cost rest on (a text past them is refused,
    # see test_parser_refuses_what_exceeds_its_limits).
    assert len(text) <= DEFAULT_LIMITS.max_length
    nodes, depth = syntax_size(text)
    assert nodes <= DEFAULT_LIMITS.max_nodes and depth <= DEFAULT_LIMITS.max_depth
    # Accepted: sizing it on the meta device is bounded too (torch's shape complaints, even its
    # AssertionErrors, are the server's "size unknown"; the check itself then reports the error).
    inputs = {v: torch.empty(3, 3, device="meta") for v in expression.variables}
    with contextlib.suppress(Exception):
        assert expression.largest_intermediate(inputs) <= 9 ** (len(text) + 1)


def syntax_size(text: str) -> tuple[int, int]:
    """Python AST nodes and nesting depth of an expression's text."""
    stack, nodes, deepest = [(ast.parse(text.strip(), mode="eval"), 1)], 0, 0
    while stack:
        node, depth = stack.pop()
        nodes, deepest = nodes + 1, max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return nodes, deepest


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("(" * 60 + "x" + " + 1)" * 60, "nests deeper"),  # deep nesting, within the length limit
        ("-" * 1500 + "x", "nests deeper"),
        ("sin(" * 60 + "x" + ")" * 60, "nests deeper"),
        (" + ".join(["x"] * 300), "nests deeper"),  # a long chain is a deep tree
        ("max(" + ", ".join(["x"] * 450) + ")", "syntax nodes"),  # flat but large
        ("x" + " + x" * 600, "longer than"),  # past the length limit: refused before Python parses it
        ("x" * (DEFAULT_LIMITS.max_length + 1), "longer than"),
    ],
)
def test_parser_refuses_what_exceeds_its_limits(text: str, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        parse_expression(text)


@settings(max_examples=400, deadline=500)
@given(tensors_msgs())
def test_decoder_returns_a_bounded_tensor_or_says_why(msg: pb.Tensor) -> None:
    try:
        tensor = codec.decode_tensor(msg, max_elements=LIMIT, field="t")
    except (InvalidRequestError, LimitExceededError) as exc:
        assert str(exc).startswith("t")  # names the field
        return
    assert tensor.numel() <= LIMIT
    assert tensor.numel() * tensor.element_size() == len(msg.data)


# ----------------------------------------------------------------------------- whole requests


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Running]:
    running = start_server(
        replica_name="fuzzed",
        max_tensor_elements=LIMIT,
        max_request_elements=4 * LIMIT,
        max_points=4,
        max_jacobian_entries=20_000,
        max_evaluations=20_000,
        max_check_seconds=5.0,
        isolation="thread",
    )
    yield running
    running.server.stop(grace=0)


@pytest.fixture(scope="module")
def stub(fuzzed: Running) -> Iterator[pb_grpc.GradcheckServiceStub]:
    with grpc.insecure_channel(fuzzed.address) as channel:
        yield pb_grpc.GradcheckServiceStub(channel)


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-6, -1.0, math.nan])
options = st.builds(
    pb.Options,
    atol=floats,
    rtol=floats,
    eps=floats,
    mode=st.integers(0, 5),
    kinks=st.integers(0, 4),
    order=st.integers(0, 2**32 - 1),
    seed=st.integers(-(2**63), 2**63 - 1),
    chunk_size=st.integers(-2, 10**9),
    device=st.integers(0, 4),
    max_jacobian_entries=st.integers(-5, 2**62),
    fast_threshold=st.integers(-5, 2**40),
)
values = st.recursive(
    st.one_of(
        st.builds(pb.Value, double_value=floats),
        st.builds(pb.Value, int_value=st.integers(-(2**63), 2**63 - 1)),
        st.builds(pb.Value, string_value=st.text(max_size=80)),
        st.builds(pb.Value, bool_value=st.booleans()),
    ),
    lambda inner: st.builds(pb.Value, list_value=st.builds(pb.ValueList, values=st.lists(inner, max_size=4))),
    max_leaves=12,
)
functions = st.one_of(
    st.builds(pb.FunctionSpec, expression=expressions),
    st.builds(
        pb.FunctionSpec,
        registered=st.builds(
            pb.RegisteredFunction,
            name=st.sampled_from(["torch.sin", "torch.nn.functional.softmax", "os.system", "", "x" * 300])
            | st.text(max_size=40),
            params=st.dictionaries(st.sampled_from(["dim", "alpha", "__class__", "x"]), values, max_size=3),
        ),
    ),
)
names = st.sampled_from(["x", "y", "w", "inputs[0]", "", "__x", "x" * 100, "a b"])
points = st.builds(
    pb.ExplicitPoints,
    points=st.lists(
        st.builds(
            pb.Point,
            tensors=st.lists(st.builds(pb.NamedTensor, name=names, tensor=tensors_msgs()), max_size=3),
        ),
        max_size=5,
    ),
)
sampling = st.builds(
    pb.SamplingSpec,
    inputs=st.lists(
        st.builds(
            pb.SampledInput,
            name=names,
            shape=st.lists(st.integers(-2, 10**7), max_size=4),
            dtype=st.integers(0, 20),
            distribution=st.builds(pb.Distribution, normal=st.builds(pb.Normal, mean=floats, std=floats)),
        ),
        max_size=3,
    ),
    point_count=st.integers(-2, 2**32),
    seed=st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def requests(draw: st.DrawFn) -> pb.CheckRequest:
    request = pb.CheckRequest(function=draw(functions), options=draw(options))
    if draw(st.booleans()):
        request.explicit_points.CopyFrom(draw(points))
    else:
        request.sampling.CopyFrom(draw(sampling))
    return request


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_random_requests_get_an_answer_or_a_documented_rejection(
    stub: pb_grpc.GradcheckServiceStub, request: pb.CheckRequest
) -> None:
    try:
        response = stub.Check(request, timeout=20)  # a hang shows up as DEADLINE_EXCEEDED
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
        assert code in REJECTIONS, (code, details)
        assert details and len(details) > 10, (code, details)
        return
    assert response.reports


def test_the_server_is_fine_after_the_fuzzing(fuzzed: Running) -> None:
    with Client(fuzzed.address, timeout=30) as c:
        assert c.health() == "SERVING"
        assert c.check("x**2", x=torch.tensor(9.0, dtype=torch.float64)).ok
    assert fuzzed.server.service.slots.in_flight == 0
