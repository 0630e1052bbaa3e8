"""Build, start and stop a gradcheck server (grpc examples' create_server / serve split).

    server, port = create_server(Settings(port=0))
    server.start()              # warms the engine up, then reports SERVING
    ...
    server.stop(grace=5)        # NOT_SERVING, refuse new calls, let in-flight ones finish

``serve()`` is what ``gradcheck-svc serve`` runs: it prints ``listening on HOST:PORT`` once ready
and, on SIGTERM or SIGINT, drains within ``grace_seconds`` and returns 0.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import gradcheck_svc as gc
from gradcheck_svc.engine.threads import use_threads
from gradcheck_svc.report import Report
from gradcheck_svc.server.auth import TokenAuthInterceptor
from gradcheck_svc.server.decoding import DecodeErrorInterceptor
from gradcheck_svc.server.fairness import ClientShareInterceptor
from gradcheck_svc.server.isolation import WorkerPool
from gradcheck_svc.server.service import GradcheckService
from gradcheck_svc.server.worker import warm_up_engine
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

__all__ = ["GradcheckServer", "create_server", "serve"]

log = logging.getLogger("gradcheck_svc.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradcheckService"].full_name
_ANSWER_SECONDS = 0.5  # of the drain's grace, left for cut-off checks to send their answer


class GradcheckServer:
    """A grpc.Server with the gradcheck, health and reflection services, and a graceful stop."""

    def __init__(
        self, grpc_server: grpc.Server, service: GradcheckService, health_servicer: health.HealthServicer
    ):
        self.grpc_server = grpc_server
        self.service = service
        self.health = health_servicer
        self._stopped = threading.Event()

    def start(self, *, warm_up: bool = True) -> None:
        self.grpc_server.start()
        if warm_up:
            warm_up_engine()
            if self.service.workers is not None:
                self.service.workers.warm_up()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: health says NOT_SERVING and new checks get UNAVAILABLE (so clients move
        to another replica) while in-flight checks have up to ``grace`` seconds to finish; then
        the gRPC server stops and cancels whatever is left."""
        if self._stopped.is_set():
            return
        self.health.enter_graceful_shutdown()
        self.service.start_draining()
        deadline = time.monotonic() + (grace or 0.0)
        # The last moments of the grace are kept for checks still running to answer UNAVAILABLE
        # (SERVER_DRAINING, retry elsewhere) themselves, rather than be cut off by gRPC.
        cut_off = deadline - min(_ANSWER_SECONDS, (grace or 0.0) / 4)
        while self.service.slots.in_flight and time.monotonic() < cut_off:
            time.sleep(0.02)
        if self.service.slots.in_flight:
            self.service.cut_off_running()
            while self.service.slots.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
        self.grpc_server.stop(max(0.0, deadline - time.monotonic())).wait()
        self.service.close()
        self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def create_server(
    settings: Settings | None = None,
    *,
    registry: FunctionRegistry | None = None,
    registry_factory: Callable[[], FunctionRegistry] | None = None,
    check_fn: Callable[..., Report] = gc.check,
) -> tuple[GradcheckServer, int]:
    """A configured, not yet started server and the port it is bound to (``port=0`` picks one).

    The registry comes from ``settings.functions`` unless given. Worker processes build their own
    from ``registry_factory`` (a picklable, module-level callable); a ``registry`` instance given
    without one cannot be rebuilt there, so its checks all run in threads.
    """
    settings = settings or Settings()
    if registry_factory is None and registry is None:
        registry_factory = functools.partial(
            FunctionRegistry.default, settings.functions, load_entry_points=settings.entry_points
        )
    if registry is None:
        assert registry_factory is not None
        registry = registry_factory()
    workers = None
    if registry_factory is not None and _needs_workers(settings):
        workers = WorkerPool(settings, registry_factory)
    message_limits = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    interceptors: list[Any] = []
    if settings.auth_tokens:
        interceptors.append(TokenAuthInterceptor([t.get_secret_value() for t in settings.auth_tokens]))
    interceptors.append(
        ClientShareInterceptor(
            settings.calls_per_client,
            by_token=bool(settings.auth_tokens),
            by_connection=settings.client_identity == "connection",
            body_seconds=settings.request_body_seconds,
        )
    )
    interceptors.append(DecodeErrorInterceptor())
    grpc_server = grpc.server(
        ThreadPoolExecutor(settings.threads, thread_name_prefix="gradcheck-rpc"),
        interceptors=interceptors,
        options=message_limits,
        # Calls beyond the worker threads are refused (RESOURCE_EXHAUSTED) rather than queued.
        maximum_concurrent_rpcs=settings.threads,
    )
    service = GradcheckService(settings, registry, check_fn=check_fn, workers=workers)
    pb_grpc.add_GradcheckServiceServicer_to_server(service, grpc_server)
    # Health answers from its own small pool, so probes get through while every worker is busy.
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=ThreadPoolExecutor(2, thread_name_prefix="health"),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if settings.reflection:
        names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, grpc_server)
    port = _bind(grpc_server, settings)
    return GradcheckServer(grpc_server, service, health_servicer), port


def _needs_workers(settings: Settings) -> bool:
    # Any check may be heavy (not light), so only isolation=thread runs without workers.
    return settings.isolation != "thread"


def _bind(grpc_server: grpc.Server, settings: Settings) -> int:
    address = f"{_host(settings.host)}:{settings.port}"
    try:
        if settings.tls:
            port = grpc_server.add_secure_port(address, _server_credentials(settings))
        else:
            port = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca)
    )


def serve(settings: Settings | None = None, *, exit_process: bool = True) -> int:
    """Run until SIGTERM/SIGINT, then drain and end the process with status 0 (within the grace
    period and half a second); with ``exit_process=False``, return 0 instead (for embedding).

    The process's torch thread count is set here (``settings.intra_op_threads``); a server built
    with ``create_server`` alone leaves its host process's count as it is (its workers set theirs)."""
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Before any handler thread or worker process runs a torch op: each keeps the count it first saw.
    use_threads(settings.intra_op_threads)
    server, port = create_server(settings)
    server.start()
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "serving on %s:%d (device=%s, max_concurrent_checks=%d, torch threads=%d, %d registered functions, "
        "worker processes=%s, tls=%s, auth=%s)",
        settings.host,
        port,
        settings.device,
        settings.max_concurrent_checks,
        torch.get_num_threads(),
        len(server.service.registry),
        server.service.workers is not None,
        settings.tls,
        bool(settings.auth_tokens),
    )
    print(f"listening on {_host(settings.host)}:{port}", flush=True)
    while not stop.wait(0.1):
        pass
    log.info(
        "%s received: draining %d in-flight checks (grace %.3g s)",
        received[0],
        server.service.slots.in_flight,
        settings.grace_seconds,
    )
    server.stop(settings.grace_seconds)
    log.info("stopped")
    if exit_process:
        _exit_now(server)
    return 0


def _exit_now(server: GradcheckServer, wait: float = 0.5) -> None:
    """End the process within ``wait`` seconds of the drain. A thread still inside user code or one
    long torch op, and the interpreter's own teardown (it joins every pool thread, unloads torch),
    would otherwise stretch the exit seconds past the grace period. Workers are already gone."""
    deadline = time.monotonic() + wait
    while server.service.slots.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    if server.service.slots.in_flight:
        log.warning(
            "%d checks still busy after the drain; exiting without them", server.service.slots.in_flight
        )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
