"""A CheckStream client that sends items and never reads the answers cannot make the server pile
them up: an answer not yet sent holds its place in the stream's window, so the server stops
reading items. (Before, 4,000 items of 100 kB answers took 400 MB and kept growing with more.)"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from service_servers import Running, start_server

from gradcheck_svc.client import build_request
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
WINDOW = 2
ITEMS = 40
# Whole 64 x 64 Jacobians: about 100 kB per answer, more than a connection's flow-control window.
BULKY = build_request(
    "sin(x) * x", points=[{"x": torch.linspace(-1, 1, 64, dtype=F64)}], options={"mode": "full"}
)


@pytest.fixture
def running() -> Iterator[Running]:
    running = start_server(replica_name="backpressure", isolation="thread", stream_window=WINDOW)
    yield running
    running.server.stop(grace=0)


def test_unread_answers_stop_the_reading(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gradcheck_svc.server")

    def checks_run() -> int:
        return sum(1 for r in caplog.records if r.getMessage().startswith("check id="))

    items = (pb.CheckStreamRequest(id=str(k), request=BULKY) for k in range(ITEMS))
    # Without BDP probing the connection's flow-control window stays at its initial 64 kB, so the
    # client's transport takes about one unread answer, not megabytes of them.
    with grpc.insecure_channel(running.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        answers = pb_grpc.GradcheckServiceStub(channel).CheckStream(items, timeout=120)
        first = next(answers)  # one answer read, then none for a while
        time.sleep(3)
        ran = checks_run()
        # The window's items, the answers the connection holds in flight, and no more.
        assert ran <= WINDOW + 4, f"{ran} of {ITEMS} items checked with their answers unread"
        rest = list(answers)
    assert sorted(int(a.id) for a in [first, *rest]) == list(range(ITEMS))
    assert all(a.response.reports[0].ok for a in [first, *rest])
    assert threading.active_count() < 200  # nothing left spinning per item
