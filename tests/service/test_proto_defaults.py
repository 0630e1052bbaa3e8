"""What a client generated from the .proto alone sends by default works as documented.

proto3 clients leave fields at 0 / empty / UNSPECIFIED unless told otherwise. Options left unset
(no message, an empty one, enums at their zero) must give the documented defaults, never zero
tolerances; options set explicitly to zero are taken as given and still give a verdict.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from gradcheck_svc.client import build_request
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

# A float32 function whose float32 backward differs from float64 differences by rounding only:
# zero tolerances would fail it, the defaults pass it.
X = torch.linspace(0.1, 3, 40, dtype=torch.float32)
EXPRESSION = "sum(sin(x) * tanh(x))"


def check(address: str, options: pb.Options | None, x: torch.Tensor = X) -> pb.Report:
    request = build_request(EXPRESSION, points=[{"x": x}])
    request.ClearField("options")
    if options is not None:
        request.options.CopyFrom(options)
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GradcheckServiceStub(channel).Check(request, timeout=60).reports[0]


@pytest.mark.parametrize(
    "options",
    [
        None,
        pb.Options(),
        pb.Options(
            mode=pb.MODE_UNSPECIFIED,
            kinks=pb.KINKS_UNSPECIFIED,
            scheme=pb.SCHEME_UNSPECIFIED,
            device=pb.DEVICE_UNSPECIFIED,
        ),
    ],
    ids=["absent", "empty", "enums-unspecified"],
)
def test_unset_options_mean_the_documented_defaults(address: str, options: pb.Options | None) -> None:
    report = check(address, options)
    explicit = check(
        address,
        pb.Options(mode=pb.MODE_AUTO, kinks=pb.KINKS_ALLOW, scheme=pb.SCHEME_CENTRAL, error_bars=4, seed=0),
    )
    assert report.ok and not report.error
    assert report.scheme == pb.SCHEME_CENTRAL and report.order == 1
    assert [p.max_error_ratio for p in report.pairs] == [p.max_error_ratio for p in explicit.pairs]
    assert set(report.options) <= {"eps", "reference"}  # only what the engine resolved itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explicit_zero_tolerances_are_taken_as_given(address: str, dtype: torch.dtype) -> None:
    report = check(address, pb.Options(atol=0, rtol=0, error_bars=0), X.to(dtype))
    assert not report.error, report.error  # a verdict, not a crash (was ZeroDivisionError)
    assert not report.ok and all(math.isinf(p.max_error_ratio) for p in report.pairs)
    assert report.options["atol"].double_value == 0 and report.options["error_bars"].double_value == 0
