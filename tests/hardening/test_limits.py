"""The limits tests/service does not already cover: finite-difference evaluations, limits reported by
GetCapabilities, and settings read from GRADCHECK_* variables."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from service_servers import Running, start_server

from gradcheck_svc.client import Client
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.settings import Settings

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
    }
    for name, value in values.items():
        monkeypatch.setenv(f"GRADCHECK_{name}", str(value))
    monkeypatch.setenv("GRADCHECK_ISOLATION", "process")
    settings = Settings()
    for name, value in values.items():
        assert getattr(settings, name.lower()) == value
    assert settings.isolation == "process"
