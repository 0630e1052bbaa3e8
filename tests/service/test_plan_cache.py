"""Repeated small expression requests reuse their plan: byte for byte the same request only, each
caller with containers of its own, bounded, per server, and never for what must be planned anew."""

from __future__ import annotations

import pytest
import torch
from service_servers import start_server

from gradcheck_svc.client import Client, Registered, build_request
from gradcheck_svc.errors import InvalidRequestError, LimitExceededError
from gradcheck_svc.server.plan import plan_check
from gradcheck_svc.server.plan_cache import PlanCache
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry, SampledInput, SamplingSpec

SETTINGS = Settings(port=0, device="cpu", max_evaluations=5000)
REGISTRY = FunctionRegistry.default(SETTINGS.functions)


def _request(expression: str = "x**2", x: float = 9.0, **options: object):
    return build_request(expression, points=[{"x": torch.tensor(x)}], options=options)


def test_a_repeat_gets_the_same_plan_with_containers_of_its_own() -> None:
    cache = PlanCache(SETTINGS, REGISTRY)
    first = cache.plan(_request(eps=1e-4))
    first.options["eps"] = 123.0  # what one check does to its plan, the next must not see
    first.points[0].tensors.append(torch.tensor(1.0))
    second = cache.plan(_request(eps=1e-4))
    assert cache.entries() == 1
    assert second.options == plan_check(_request(eps=1e-4), SETTINGS, REGISTRY).options
    assert second.options["eps"] == 1e-4 and second.client_options == {"eps"}
    assert len(second.points[0].tensors) == 1 and second.points[0].tensors[0].item() == 9.0


def test_a_tensor_that_requires_grad_is_a_leaf_of_each_checks_own() -> None:
    cache = PlanCache(SETTINGS, REGISTRY)
    request = build_request("x**2", points=[{"x": torch.tensor(3.0, requires_grad=True)}])
    first, second = (cache.plan(request).points[0].tensors[0] for _ in range(2))
    assert first.requires_grad and second.requires_grad and first is not second
    (first**2).backward()  # what a check might do with its input
    assert first.grad is not None and second.grad is None and second.item() == 3.0
    assert cache.entries() == 1


def test_other_options_points_or_functions_are_other_plans() -> None:
    cache = PlanCache(SETTINGS, REGISTRY)
    plans = [
        cache.plan(_request(eps=1e-4)),
        cache.plan(_request(eps=1e-3)),
        cache.plan(_request()),
        cache.plan(_request(x=2.0, eps=1e-4)),
        cache.plan(_request("x**3", eps=1e-4)),
    ]
    assert cache.entries() == 5
    assert [p.options.get("eps") for p in plans] == [1e-4, 1e-3, None, 1e-4, 1e-4]
    assert [p.client_options for p in plans] == [{"eps"}, {"eps"}, frozenset(), {"eps"}, {"eps"}]
    assert [p.points[0].tensors[0].item() for p in plans] == [9.0, 9.0, 9.0, 2.0, 9.0]
    assert [p.label for p in plans] == ["x**2"] * 4 + ["x**3"]


def test_each_server_plans_with_its_own_settings() -> None:
    strict = Settings(port=0, device="cpu", max_evaluations=100)
    mine, theirs = PlanCache(SETTINGS, REGISTRY), PlanCache(strict, REGISTRY)
    assert mine.plan(_request()).options["max_evaluations"] == 5000
    assert theirs.plan(_request()).options["max_evaluations"] == 100
    assert mine.plan(_request()).options["max_evaluations"] == 5000


def test_the_cache_is_bounded() -> None:
    cache = PlanCache(SETTINGS, REGISTRY, max_entries=4)
    for k in range(10):
        assert cache.plan(_request(x=float(k))).points[0].tensors[0].item() == float(k)
    assert cache.entries() == 4


def test_the_log_tag_is_not_part_of_the_plan() -> None:
    cache = PlanCache(SETTINGS, REGISTRY)
    tagged = [_request(), _request(), _request()]
    tagged[0].log_tag, tagged[1].log_tag = "job-1", "job-2"
    assert len({cache.plan(r).label for r in tagged}) == 1
    assert cache.entries() == 1
    assert tagged[0].log_tag == "job-1"  # the caller's request is left as it was


def test_refusals_are_refused_every_time_and_never_kept() -> None:
    cache = PlanCache(Settings(port=0, device="cpu", max_tensor_elements=4), REGISTRY)
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match=r"options\.eps"):
            cache.plan(_request(eps=float("nan")))
        with pytest.raises(LimitExceededError):
            cache.plan(build_request("x", points=[{"x": torch.zeros(5)}]))
    assert cache.entries() == 0


def test_what_is_planned_anew_is_not_kept() -> None:
    cache = PlanCache(SETTINGS, REGISTRY, max_request_bytes=256)
    sampled = build_request(
        "x**2", sampling=SamplingSpec(inputs=[SampledInput(name="x", shape=(3,))], count=2, seed=1)
    )
    registered = build_request(Registered("torch.sin"), points=[{"inputs[0]": torch.tensor(1.0)}])
    large = build_request("x**2", points=[{"x": torch.zeros(100)}])
    for request in (sampled, registered, large):
        assert cache.plan(request).points
    assert cache.entries() == 0
    assert cache.plan(_request()).points and cache.entries() == 1


def test_repeats_through_a_server_keep_each_clients_options() -> None:
    running = start_server()
    try:
        with Client(running.address, timeout=60) as client:
            x = torch.tensor(100.0, dtype=torch.float64)
            for _ in range(2):
                fast = client.check("sin(x / 2**1.5)", x=x, options={"mode": "fast", "seed": 3})
                full = client.check("sin(x / 2**1.5)", x=x, options={"mode": "full"})
                plain = client.check("sin(x / 2**1.5)", x=x)
                assert (fast.mode, fast.options["mode"], fast.options["seed"]) == ("fast", "fast", 3)
                assert full.mode == "full" and "seed" not in full.options
                assert "mode" not in plain.options and plain.ok and full.ok and fast.ok
            assert running.server.service.plans.entries() == 3
    finally:
        running.server.stop(grace=1)
