"""A valid request whose answer would exceed max_message_bytes still gets an answer: whole
Jacobians are left out (noted on each report) and the verdicts kept; an answer too large even so is
RESOURCE_EXHAUSTED with the limit named. Inside a CheckStream it is that item's answer, and the
stream goes on (gRPC alone would end the stream with a bare status)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from service_servers import Running, start_server

from gradcheck_svc.client import build_request
from gradcheck_svc.server.response_size import NOTE
from gradcheck_svc.server.status import reason_of
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
LIMIT = 256 * 1024
# 64 x 64 Jacobians, sent whole: about 110 kB of report per point.
BULKY = build_request(
    "sin(x) * x", points=[{"x": torch.linspace(-1, 1, 64, dtype=F64)}] * 8, options={"mode": "full"}
)
SEED = build_request("x * x", points=[{"x": torch.tensor(9.0, dtype=F64)}])
MANY_SEEDS = build_request("x * x", points=[{"x": torch.tensor(9.0, dtype=F64)}] * 200)


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    running = start_server(replica_name="sizes", isolation="thread", max_message_bytes=LIMIT)
    yield running
    running.server.stop(grace=0)


def test_whole_jacobians_give_way_and_the_verdicts_stay(running: Running) -> None:
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        small = stub.Check(SEED, timeout=60)
        assert small.reports[0].pairs[0].HasField("analytic")  # small answers keep them
        answer = stub.Check(BULKY, timeout=120)
        assert answer.ByteSize() <= LIMIT
        assert len(answer.reports) == 8 and all(r.ok for r in answer.reports)
        for report in answer.reports:
            assert NOTE in report.notes
            assert not any(p.HasField("analytic") or p.HasField("numeric") for p in report.pairs)
            assert all(p.checked_count == 64 * 64 for p in report.pairs)


def test_too_large_even_so_is_one_items_answer_and_the_stream_goes_on() -> None:
    # 200 reports of a scalar check take some 40 kB, with nothing left to leave out.
    running = start_server(replica_name="tiny-messages", isolation="thread", max_message_bytes=16 * 1024)
    try:
        check_both(running)
    finally:
        running.server.stop(grace=0)


def check_both(running: Running) -> None:
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        with pytest.raises(grpc.RpcError) as too_large:
            stub.Check(MANY_SEEDS, timeout=120)
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "max_message_bytes" in too_large.value.details()  # type: ignore[attr-defined]
        items = [
            pb.CheckStreamRequest(id="many", request=MANY_SEEDS),
            pb.CheckStreamRequest(id="seed", request=SEED),
        ]
        answers = {a.id: a for a in stub.CheckStream(iter(items), timeout=120)}
        assert set(answers) == {"many", "seed"}
        assert answers["many"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert reason_of(answers["many"].error) == "LIMIT_EXCEEDED"
        assert answers["seed"].response.reports[0].ok
