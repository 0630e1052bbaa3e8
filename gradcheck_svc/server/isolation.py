"""Worker processes for checks the server cannot trust to return: killed when they overrun.

Python cannot stop a thread, so a registered function that loops forever would keep its thread,
and its concurrency slot, for good. Checks of operator functions therefore run in worker
processes (forked from a fork server that has torch imported, so a new worker is ready in tens of
milliseconds plus the operator modules' import). The server thread waits on the worker's pipe;
when the check's deadline plus ``kill_after_seconds`` passes, or the client cancels, the worker is
SIGKILLed and discarded, the slot is released, and a replacement is started in the background so
the next check finds one ready. Idle workers are reused.

Nothing outlives the server, whatever kills it: the fork server and every worker ask Linux for
SIGKILL when their parent dies (PR_SET_PDEATHSIG). That signal follows the parent *thread*, so the
fork server is always started from one thread that lives as long as the process (``_FORK_KEEPER``),
never from a request thread that may end.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.forkserver
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import grpc
from google.rpc import status_pb2

from gradcheck_svc.errors import CheckCancelledError
from gradcheck_svc.server.runner import Deadline, PointProgress
from gradcheck_svc.server.status import Rejection, rejection_from_status
from gradcheck_svc.server.worker import PROGRESS, READY, RESPONSE, STATUS, worker_main
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = ["WorkerPool"]

log = logging.getLogger("gradcheck_svc.server")
_POLL = 0.05  # seconds between looks at cancellation and the deadline while a worker runs


class _ForkServerKeeper:
    """Starts (and restarts) the fork server from one long-lived daemon thread; see the module doc."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[threading.Event, list[BaseException]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="gradcheck-forkserver", daemon=True)
                self._thread.start()
        done, errors = threading.Event(), list[BaseException]()
        self._requests.put((done, errors))
        done.wait()
        if errors:
            raise errors[0]

    def _serve(self) -> None:
        while True:
            done, errors = self._requests.get()
            try:
                multiprocessing.forkserver.ensure_running()
            except BaseException as exc:  # reported to the caller, the keeper carries on
                errors.append(exc)
            done.set()


_FORK_KEEPER = _ForkServerKeeper()


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False  # it has sent READY (its registry is built)

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready and self.conn.poll(timeout):
            self.ready = self.conn.recv_bytes() == READY
        return self.ready

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """Worker processes, grown on demand (at most one per concurrency slot), reused when idle."""

    def __init__(self, settings: Settings, registry_factory: Callable[[], FunctionRegistry]) -> None:
        self._settings = settings
        self._factory = registry_factory
        self._context = multiprocessing.get_context("forkserver")
        # The fork server imports these once; every worker forked from it starts warm.
        self._context.set_forkserver_preload(["gradcheck_svc.server.forkserver_preload"])
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # notified when a worker turns idle
        self._closed = False
        self.busy = 0
        self.started = 0
        self.killed = 0

    def warm_up(self, timeout: float = 60.0) -> None:
        """Start the fork server and one idle worker now, not on the first client's time."""
        if self.idle == 0:
            self._replenish(timeout)

    def _replenish(self, timeout: float = 60.0) -> None:
        """Start a worker and, once it is ready, keep it idle (runs in the background after a kill)."""
        try:
            worker = self._spawn()
        except Exception:  # the pool is closing, or processes cannot be started: the next check will say
            log.warning("could not start a replacement worker process", exc_info=True)
            return
        try:
            ready = worker.wait_ready(timeout)
        except (EOFError, OSError):
            ready = False
        with self._cond:
            keep = ready and not self._closed
            if keep:
                self._idle.append(worker)
                self._cond.notify()
        if not keep:
            worker.kill()

    def _start_replacement(self) -> None:
        threading.Thread(target=self._replenish, name="gradcheck-worker-start", daemon=True).start()

    def run(
        self,
        request: bytes,
        *,
        deadline: Deadline,
        cancelled: Callable[[], bool],
        check_id: str,
        served_by: str,
        progress: PointProgress | None = None,
    ) -> pb.CheckResponse:
        """Run one CheckRequest in a worker; kill the worker if it overruns or the client cancels."""
        worker = self._take(deadline, cancelled)
        healthy = False
        try:
            header = {
                "check_id": check_id,
                "served_by": served_by,
                "remaining": deadline.at - time.monotonic(),
                "client_binds": deadline.client_binds,
                "progress": progress is not None,
            }
            worker.conn.send_bytes(json.dumps(header).encode())
            worker.conn.send_bytes(request)
            answer = self._wait(worker, deadline, cancelled, check_id, progress)
            healthy = True
        except (EOFError, OSError):
            worker.process.join(timeout=1)
            code = worker.process.exitcode
            raise Rejection(
                grpc.StatusCode.INTERNAL,
                f"the worker process running check {check_id} died (exit code {code}); "
                "the function crashed it",
            ) from None
        finally:
            self._give_back(worker, healthy)
        kind, payload = answer[:1], answer[1:]
        if kind == RESPONSE:
            return pb.CheckResponse.FromString(payload)
        assert kind == STATUS, kind
        raise rejection_from_status(status_pb2.Status.FromString(payload))

    def _wait(
        self,
        worker: _Worker,
        deadline: Deadline,
        cancelled: Callable[[], bool],
        check_id: str,
        progress: PointProgress | None = None,
    ) -> bytes:
        kill_at = deadline.at + self._settings.kill_after_seconds
        while True:
            while not worker.conn.poll(_POLL):
                if cancelled():
                    raise CheckCancelledError("the client cancelled the check")
                if time.monotonic() >= kill_at:
                    pid = worker.process.pid
                    log.warning("check %s overran its deadline; killing worker pid %s", check_id, pid)
                    rejection = deadline.rejection()
                    rejection.message += "; the function did not return, and its worker process was killed"
                    raise rejection
                if not worker.process.is_alive():
                    raise EOFError
            message = worker.conn.recv_bytes()
            if message[:1] == PROGRESS:  # (point, done, total) while the check runs
                if progress is not None:
                    progress(*json.loads(message[1:]))
                continue
            if message != READY:  # a fresh worker says READY before it answers
                return message

    def _take(self, deadline: Deadline, cancelled: Callable[[], bool]) -> _Worker:
        """An idle, ready worker; when there is none, one is started and waited for, but never
        past the check's deadline or its cancellation (starting may take seconds on a cold box)."""
        with self._cond:
            if self._closed:
                raise Rejection(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            self.busy += 1
        try:
            started = False
            while True:
                with self._cond:
                    while self._idle:
                        worker = self._idle.pop()
                        if worker.process.is_alive():
                            return worker
                        worker.kill()
                    if not started:  # our own replacement, so concurrent waiters never starve
                        self._start_replacement()
                        started = True
                    self._cond.wait(_POLL)
                if self._closed:
                    raise Rejection(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                if cancelled():
                    raise CheckCancelledError("the client cancelled the check")
                if deadline.passed():
                    raise deadline.rejection()
        except BaseException:
            with self._cond:
                self.busy -= 1
            raise

    def _give_back(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._cond:
            self.busy -= 1
            closed = self._closed
            if not healthy:
                self.killed += 1
            elif not closed:
                worker.ready = True
                self._idle.append(worker)
                self._cond.notify()
        if healthy and closed:
            worker.kill()
        elif not healthy and not closed:
            self._start_replacement()  # so the next check finds one ready

    def _spawn(self) -> _Worker:
        _FORK_KEEPER.ensure_running()
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(child, self._settings, self._factory),
            name="gradcheck-worker",
            daemon=True,
        )
        process.start()
        child.close()
        with self._lock:
            self.started += 1
        return _Worker(process, parent)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        """Kill idle workers; busy ones are killed as their checks end (or are cancelled)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()
