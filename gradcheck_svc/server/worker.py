"""The child side of a worker process: receive a request, run it, send back the answer.

Only bytes cross the pipe: a small JSON header and the CheckRequest's protobuf encoding in, and
``b"R" + CheckResponse`` or ``b"E" + google.rpc.Status`` out. Client data is never pickled; the
only pickled objects are the server's own settings and registry factory, at process start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

import gradcheck_svc as gc
from gradcheck_svc.engine.threads import use_threads
from gradcheck_svc.server.plan import plan_check
from gradcheck_svc.server.runner import Deadline, execute
from gradcheck_svc.server.status import failure_for
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry, compile_expression
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = ["PROGRESS", "READY", "RESPONSE", "STATUS", "die_with_parent", "warm_up_engine", "worker_main"]

READY, RESPONSE, STATUS, PROGRESS = b"ready", b"R", b"E", b"P"
_PR_SET_PDEATHSIG = 1
log = logging.getLogger("gradcheck_svc.server")


def worker_main(
    conn: Connection, settings: Settings, registry_factory: Callable[[], FunctionRegistry]
) -> None:
    """Serve checks from ``conn`` until it closes."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server; it decides
    use_threads(settings.intra_op_threads)  # the fork server's count is torch's default
    registry = registry_factory()
    conn.send_bytes(READY)
    while True:
        try:
            header = json.loads(conn.recv_bytes())
            body = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server closed the pipe (or died)

        def progress(point: int, done: int, total: int) -> None:
            conn.send_bytes(PROGRESS + json.dumps([point, done, total]).encode())

        conn.send_bytes(
            answer(header, body, settings, registry, progress if header.get("progress") else None)
        )


def answer(
    header: dict[str, Any],
    body: bytes,
    settings: Settings,
    registry: FunctionRegistry,
    progress: Callable[[int, int, int], None] | None = None,
) -> bytes:
    check_id = str(header.get("check_id", ""))
    try:
        request = pb.CheckRequest.FromString(body)
        plan = plan_check(request, settings, registry)
        deadline = Deadline(
            at=time.monotonic() + float(header["remaining"]),
            client_binds=bool(header["client_binds"]),
            cap_seconds=settings.max_check_seconds,
        )
        response = execute(
            plan,
            deadline=deadline,
            cancelled=lambda: False,
            served_by=str(header["served_by"]),
            check_id=check_id,
            max_bytes=settings.max_check_bytes,
            progress=progress,
        )
        return bytes(RESPONSE + response.SerializeToString())
    except Exception as exc:
        return bytes(STATUS + failure_for(exc, check_id).to_status().SerializeToString())


def warm_up_engine() -> None:
    """Run one tiny check so the first client does not pay for torch's and the engine's lazy imports."""
    started = time.perf_counter()
    square = compile_expression("x * x")
    square.largest_intermediate({"x": torch.zeros(2)})  # the meta device's first use is slow too
    gc.check(square, torch.tensor(3.0, dtype=torch.float64))
    log.debug("engine warm-up took %.2f s", time.perf_counter() - started)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (the fork server's parent is the server, a
    worker's is the fork server), so a process stuck in operator code never outlives the server."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
