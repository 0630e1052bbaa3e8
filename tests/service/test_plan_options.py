"""A request's options are decoded and validated once per distinct option set, and every plan still
gets options of its own; refusals and oversized option messages are never kept."""

from __future__ import annotations

import pytest
import torch

from gradcheck_svc.client import build_request
from gradcheck_svc.errors import InvalidRequestError
from gradcheck_svc.server import plan
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry
from gradcheck_svc.v1 import gradcheck_pb2 as pb

SETTINGS = Settings(port=0, device="cpu", max_evaluations=5000)
REGISTRY = FunctionRegistry.default(SETTINGS.functions)


def _request(**options: object):
    return build_request("x**2", points=[{"x": torch.tensor(9.0)}], options=options)


def _with_unknown_field(request: pb.CheckRequest, size: int) -> pb.CheckRequest:
    """The request with an Options field this server does not know, ``size`` bytes long."""
    tag = (999 << 3) | 2  # field 999, length-delimited
    unknown = bytearray()
    for value in (tag, size):
        while value > 0x7F:
            unknown.append(value & 0x7F | 0x80)
            value >>= 7
        unknown.append(value)
    request.options.MergeFromString(bytes(unknown) + b"a" * size)
    return request


def test_each_plan_gets_its_own_options() -> None:
    first = plan.plan_check(_request(eps=1e-4), SETTINGS, REGISTRY)
    first.options["eps"] = 123.0  # a later request must not see this
    second = plan.plan_check(_request(eps=1e-4), SETTINGS, REGISTRY)
    assert second.options["eps"] == 1e-4
    assert second.options["max_evaluations"] == 5000  # the server's limit applies
    assert second.options["device"] == "cpu"
    assert second.client_options == {"eps"}


def test_a_refused_option_set_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match=r"options\.eps"):
            plan.plan_check(_request(eps=float("nan")), SETTINGS, REGISTRY)


def test_a_long_options_message_plans_alike_and_is_not_kept() -> None:
    before = plan._options_on_wire.cache_info().currsize
    padded = plan.plan_check(_with_unknown_field(_request(rtol=0.01), 4096), SETTINGS, REGISTRY)
    assert plan._options_on_wire.cache_info().currsize == before
    plain = plan.plan_check(_request(rtol=0.01), SETTINGS, REGISTRY)
    assert padded.options == plain.options
    assert padded.client_options == plain.client_options == {"rtol"}
