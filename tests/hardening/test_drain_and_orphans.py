"""Drain is exact, idle streams let go, and nothing outlives a killed server.

- After SIGTERM no new work starts on any RPC, open CheckStreams included; every item still
  queued is answered UNAVAILABLE; the process exits within the grace period plus a second.
- A check still running when the grace runs out answers UNAVAILABLE (SERVER_DRAINING) itself.
- A CheckStream with nothing running and nothing arriving is closed after stream_idle_seconds.
- SIGKILL of the server takes its fork server and its workers (even a spinning one) with it.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_status import rpc_status
from service_servers import ServeProcess

from gradcheck_svc.client import Registered, build_request
from gradcheck_svc.server.status import reason_of
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
GRACE = 2.0


def slow(seconds_per_eval: float, n: int = 10) -> pb.CheckRequest:
    return build_request(
        Registered("service_test_ops:slow_square", {"delay": seconds_per_eval}),
        points=[{"x": torch.linspace(1, 2, n, dtype=F64)}],
        options={"chunk_size": 1},
    )


def quick() -> pb.CheckRequest:
    return build_request("x * x", points=[{"x": torch.tensor(9.0, dtype=F64)}])


class Stream:
    """A raw CheckStream whose items are sent one by one, from the test."""

    def __init__(self, stub: pb_grpc.GradcheckServiceStub, timeout: float = 60) -> None:
        self._items: queue.Queue[pb.CheckStreamRequest | None] = queue.Queue()
        self.answers: queue.Queue[pb.CheckStreamResponse | grpc.RpcError] = queue.Queue()
        self._call = stub.CheckStream(self._requests(), timeout=timeout)
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[pb.CheckStreamRequest]:
        while (item := self._items.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for answer in self._call:
                self.answers.put(answer)
        except grpc.RpcError as exc:
            self.answers.put(exc)

    def send(self, item_id: str, request: pb.CheckRequest) -> None:
        self._items.put(pb.CheckStreamRequest(id=item_id, request=request))

    def next(self, timeout: float = 30) -> pb.CheckStreamResponse | grpc.RpcError:
        return self.answers.get(timeout=timeout)

    def close(self) -> None:
        self._items.put(None)


def serve(*args: str) -> ServeProcess:
    process = ServeProcess("--grace-seconds", str(GRACE), "--isolation", "thread", *args)
    _ = process.address
    return process


def test_no_new_work_on_an_open_stream_after_sigterm() -> None:
    process = serve("--max-concurrent-checks", "2")
    try:
        with grpc.insecure_channel(process.address) as channel:
            stream = Stream(pb_grpc.GradcheckServiceStub(channel))
            stream.send("before", quick())
            first = stream.next()
            assert isinstance(first, pb.CheckStreamResponse) and first.response.reports[0].ok
            stream.send("running", slow(0.1))
            time.sleep(0.5)
            process.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            stream.send("after", quick())  # must not run
            answers = {}
            while len(answers) < 2:
                answer = stream.next()
                if isinstance(answer, grpc.RpcError):
                    break
                answers[answer.id] = answer
            stream.close()
        assert answers["after"].HasField("error")
        assert answers["after"].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        started = time.monotonic()
        assert process.proc.wait(timeout=GRACE + 5) == 0
        assert time.monotonic() - started < GRACE + 1
    finally:
        process.stop()


def test_queued_stream_items_are_answered_and_the_server_exits() -> None:
    # One slot: a slow item on stream A holds it; stream B's item waits in the queue.
    process = serve("--max-concurrent-checks", "1")
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.GradcheckServiceStub(channel)
            a, b = Stream(stub), Stream(stub)
            a.send("slow", slow(1.0))
            time.sleep(0.5)
            b.send("queued", quick())
            time.sleep(0.5)
            signalled = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            answer = b.next(timeout=GRACE + 5)
            if isinstance(answer, pb.CheckStreamResponse):
                assert answer.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            else:
                assert answer.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            a.close()
            b.close()
            assert process.proc.wait(timeout=GRACE + 5) is not None
            assert time.monotonic() - signalled < GRACE + 1
    finally:
        process.stop()


def test_idle_streams_do_not_lock_other_clients_out() -> None:
    # 2 checks + 8 spare threads: 12 idle streams would hold every handler thread.
    process = serve("--max-concurrent-checks", "2", "--stream-idle-seconds", "1")
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.GradcheckServiceStub(channel)
            streams = [Stream(stub) for _ in range(12)]
            time.sleep(2.5)
            reply = stub.Check(quick(), timeout=10)
            assert reply.reports[0].ok
            closed = [s.next(timeout=10) for s in streams]
            assert all(isinstance(c, grpc.RpcError) for c in closed)
            assert {c.code() for c in closed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # type: ignore[union-attr]
            for s in streams:
                s.close()
    finally:
        process.stop()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_of_the_server_takes_its_workers_along() -> None:
    process = ServeProcess("--isolation", "process", "--max-check-seconds", "60")
    spinning = build_request(
        Registered("service_test_ops:never_returns"), points=[{"x": torch.tensor(2.0, dtype=F64)}]
    )
    orphans: list[int] = []
    try:
        with grpc.insecure_channel(process.address) as channel:
            call = pb_grpc.GradcheckServiceStub(channel).Check.future(spinning, timeout=60)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the fork server and the spinning worker under it
                descendants = [(c, _children(c)) for c in _children(process.proc.pid)]
                orphans = [p for c, grand in descendants if grand for p in (c, *grand)]
                if orphans:
                    break
                time.sleep(0.2)
            assert orphans, "no worker process started"
            process.proc.send_signal(signal.SIGKILL)
            process.proc.wait(10)
            call.cancel()
        deadline = time.monotonic() + 5
        while any(_running(p) for p in orphans) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in orphans if _running(p)]
        assert not survivors, f"processes outlived the server: {survivors}"
    finally:
        for p in orphans:
            if _running(p):
                os.kill(p, signal.SIGKILL)
        process.stop()


@pytest.mark.parametrize("isolation", ["thread", "auto"])
def test_checks_cut_off_by_the_drain_answer_unavailable_with_a_reason(isolation: str) -> None:
    # In a thread (stopped at its next op) or in a worker (killed): each RPC kind answers
    # UNAVAILABLE / SERVER_DRAINING itself, not gRPC's bare "Cancelling all calls".
    process = ServeProcess("--grace-seconds", str(GRACE), "--isolation", isolation)
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.GradcheckServiceStub(channel)
            assert stub.Check(quick(), timeout=60).reports[0].ok
            endless = slow(0.1, n=200)
            unary = stub.Check.future(endless, timeout=60)
            progress = stub.CheckWithProgress(pb.CheckWithProgressRequest(request=endless), timeout=60)
            stream = Stream(stub)
            stream.send("a", endless)
            time.sleep(1.0)
            sent = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as unary_error:
                unary.result()
            with pytest.raises(grpc.RpcError) as progress_error:
                list(progress)
            item = stream.next()
            assert isinstance(item, pb.CheckStreamResponse)
            assert item.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "grace_seconds" in item.error.message
            for error in (unary_error.value, progress_error.value):
                assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                status = rpc_status.from_call(error)  # type: ignore[arg-type]
                assert status is not None
                assert [reason_of(status)] == ["SERVER_DRAINING"]
                assert "retry it elsewhere" in status.message
            stream.close()
            process.proc.wait(GRACE + 5)
            assert time.monotonic() - sent < GRACE + 1.5
    finally:
        process.stop()
