"""CheckWithProgress: progress while a check runs (in a thread and in a worker process), then the answer."""

from __future__ import annotations

import grpc
import pytest
import torch

import gradcheck_svc.server.service as service
from gradcheck_svc.client import Client, Registered
from gradcheck_svc.errors import ServiceError


@pytest.fixture(autouse=True)
def _every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "_PROGRESS_EVERY", 0.0)  # every chunk, so small checks show steps


@pytest.mark.parametrize(
    "function",
    # Dense Jacobians, checked column chunk by column chunk. In a thread; in a worker process.
    ["sin(x * sum(x))", Registered("service_test_ops:slow_square", {"delay": 0.0})],
    ids=["expression", "operator-function"],
)
def test_progress_then_the_answer(client: Client, function: object) -> None:
    seen: list[tuple[int, int, int]] = []
    x = torch.linspace(-1, 1, 40, dtype=torch.float64)
    reports = client.check_with_progress(
        function,  # type: ignore[arg-type]
        [{"x": x}, {"x": x + 1}],
        lambda *step: seen.append(step),
        options={"mode": "full", "chunk_size": 16},
    )
    assert [r.ok for r in reports] == [True, True]
    assert seen == [(0, 16, 40), (0, 32, 40), (0, 40, 40), (1, 16, 40), (1, 32, 40), (1, 40, 40)]
    plain = client.check_points(function, [{"x": x}], options={"mode": "full", "chunk_size": 16})  # type: ignore[arg-type]
    assert plain[0].pairs[0].analytic == reports[0].pairs[0].analytic


def test_errors_end_the_stream_with_a_status(client: Client) -> None:
    with pytest.raises(ServiceError, match=r"function\.expression") as caught:
        client.check_with_progress("sin(", [{"x": torch.ones(2)}], lambda *step: None)
    assert caught.value.code == "INVALID_ARGUMENT"


def test_a_server_without_the_rpc_answers_the_plain_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcheck_svc.server import create_server
    from gradcheck_svc.settings import Settings

    def unimplemented(self, request, context):  # type: ignore[no-untyped-def]
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    # An older server: its handlers are bound when it is created, so patch first.
    monkeypatch.setattr(service.GradcheckService, "CheckWithProgress", unimplemented)
    server, port = create_server(Settings(host="127.0.0.1", port=0, device="cpu"))
    server.start()
    seen: list[tuple[int, int, int]] = []
    try:
        with Client(f"127.0.0.1:{port}") as old:
            reports = old.check_with_progress("x * x", [{"x": torch.tensor(9.0)}], lambda *s: seen.append(s))
    finally:
        server.stop(grace=1)
    assert reports[0].pairs[0].analytic == [18.0] and seen == []
