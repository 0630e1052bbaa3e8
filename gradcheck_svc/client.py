"""Python client of the gradcheck service; returns the same ``gc.Report`` the engine does.

    from gradcheck_svc.client import Client
    with Client("127.0.0.1:50051") as c:
        report = c.check("sin(x / 2**1.5)", x=torch.tensor(100.0))
        reports = c.check_points("x**2", [{"x": t1}, {"x": t2}], options={"mode": "full"})
        report = c.check_registered("torch.nn.functional.softmax", x=t, params={"dim": -1})
        caps = c.capabilities()

Targets: one address, a ``dns:///name:port`` (gRPC's round_robin over every address the name
resolves to), or a list of addresses (one channel each, used in turn; a call that finds one
unavailable moves on to the next, which is safe because checks have no side effects).
``retry=True`` adds a gRPC retry policy (UNAVAILABLE, with backoff) to every channel. A server that
refuses a call because it is busy (RESOURCE_EXHAUSTED, ``SERVER_BUSY`` or ``CLIENT_BUSY``: it never
queues) says when to come back in ``RetryInfo``; the client waits that long and sends the call again,
for at most ``busy_wait`` seconds and within the call's timeout.
An unreachable server raises ``ServiceError(code="UNAVAILABLE")`` after ``connect_timeout``.

Security from the environment, so the CLI and the pytest plugin get it for free: a ``token`` left
unset is read from ``GRADCHECK_TOKEN`` (sent as ``authorization: Bearer``); TLS is used when
``tls_ca`` (or ``GRADCHECK_TLS_CA``) names a CA file, with a client certificate for mutual TLS from
``tls_cert`` / ``tls_key`` (``GRADCHECK_TLS_CERT`` / ``GRADCHECK_TLS_KEY``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pydantic import BaseModel

from gradcheck_svc.callables import CallableSource
from gradcheck_svc.codec import (
    DTYPES,
    decode_report,
    encode_arguments,
    encode_module,
    encode_options,
    encode_point,
    encode_sampling,
    encode_value,
)
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.external_client import answer_stream
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.report import Report
from gradcheck_svc.specs.sampling import SamplingSpec
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

__all__ = [
    "Capabilities",
    "CheckCall",
    "Client",
    "DeviceInfo",
    "Registered",
    "StreamResult",
    "tls_credentials",
]

Options = Mapping[str, Any] | CheckOptions | None
Point = Mapping[str, Any]
_SERVICE = "gradcheck_svc.v1.GradcheckService"


@dataclass(frozen=True)
class Registered:
    """A registered function by name, with its parameters (``Registered("torch.softmax", {"dim": 0})``).

    ``arguments``: the positional call, each a ``binding.Input`` (a tensor of the point) or a
    constant; ``init`` and ``state``: a registered module's constructor arguments (``InitArgs``)
    and its parameters and buffers. ``Registered.of(binding.portable(...))`` fills them.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    arguments: Sequence[Any] = ()
    init: Any = None
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, call: Any) -> Registered:
        """From a ``binding.Portable``: the point to send is ``call.tensors``."""
        return cls(call.name, call.params, call.arguments, call.init, call.state)


@dataclass(frozen=True)
class CheckCall:
    """One item of ``Client.check_stream``: a function and either points or a sampling spec."""

    function: str | Registered
    points: Sequence[Point] | None = None
    sampling: SamplingSpec | None = None
    options: Options = None
    id: str = ""


@dataclass(frozen=True)
class StreamResult:
    """The answer to one CheckCall: its reports, or the error that rejected it."""

    id: str
    reports: list[Report] | None
    error: ServiceError | None = None


class DeviceInfo(BaseModel):
    name: str
    available: bool
    description: str = ""


class Capabilities(BaseModel):
    """What a server offers (``Client.capabilities()``)."""

    server_version: str
    torch_version: str
    devices: list[DeviceInfo]
    cuda_available: bool
    default_device: str
    dtypes: list[str]
    expression_functions: list[str]
    registered_functions: list[str]
    limits: dict[str, int | float]
    served_by: str


# ----------------------------------------------------------------------------- channels


def _service_config(retry: bool | int) -> str:
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry:
        attempts = 4 if retry is True else max(2, min(int(retry), 5))  # gRPC caps attempts at 5
        config["methodConfig"] = [
            {
                "name": [{"service": _SERVICE}, {"service": "grpc.health.v1.Health"}],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


_FAILOVER_CODES = ("UNAVAILABLE", "CANCELLED")
# Refusals of a server that is busy right now (it never queues): worth the wait its RetryInfo asks.
_BUSY_REASONS = ("SERVER_BUSY", "CLIENT_BUSY")


class _Channel:
    """One gRPC channel, its stubs, and what we last learnt about reaching it.

    Reachability is learnt from calls, not from connectivity subscriptions: grpc's subscription
    poller races with ``Channel.close()`` and prints tracebacks (grpc issue 18995).
    """

    _FAILED_FOR = 2.0  # seconds a target that failed is tried last

    def __init__(
        self, target: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ):
        self.target = target
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.GradcheckServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._connected = False
        self._failed_at = -math.inf

    @property
    def failing(self) -> bool:
        return time.monotonic() - self._failed_at < self._FAILED_FOR

    def mark_failed(self) -> None:
        self._connected = False
        self._failed_at = time.monotonic()

    def ensure_ready(self, timeout: float) -> None:
        """Before the first call (and after a failure) probe the server with a short deadline, so an
        unreachable one raises UNAVAILABLE promptly instead of holding a long check's deadline."""
        if self._connected:
            return
        try:
            self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.mark_failed()
                raise ServiceError(
                    f"cannot reach the gradcheck server at {self.target} within {timeout:g} s",
                    code="UNAVAILABLE",
                ) from None
            # Anything else (e.g. a server without the health service) still proves it is reachable.
        self._connected = True

    def close(self) -> None:
        self.channel.close()


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files (arguments, else ``GRADCHECK_TLS_*``); None: plaintext."""
    ca = ca or os.environ.get("GRADCHECK_TLS_CA") or None
    cert = cert or os.environ.get("GRADCHECK_TLS_CERT") or None
    key = key or os.environ.get("GRADCHECK_TLS_KEY") or None
    if not (ca or cert):
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate (GRADCHECK_TLS_CERT) and key (GRADCHECK_TLS_KEY) go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def _service_error(exc: grpc.RpcError, target: str) -> ServiceError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    violations = []
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except Exception:  # a malformed status detail must not hide the error itself
        status = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [f"{v.field}: {v.description}" for v in bad.field_violations]
    message = details or (code.name if code else "RPC failed")
    extra = [v for v in violations if v not in message]
    if extra:
        message += " (" + "; ".join(extra) + ")"
    name = code.name if code else None
    reason, metadata = _error_info(status)
    error = ServiceError(
        f"{name or 'ERROR'} from {target}: {message}", code=name, reason=reason, metadata=metadata
    )
    error.retry_after = _retry_delay(status)
    return error


def _retry_delay(status: status_pb2.Status | None) -> float | None:
    """Seconds the server's google.rpc.RetryInfo asks the client to wait, if it sent one."""
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def _error_info(status: status_pb2.Status | None) -> tuple[str | None, dict[str, str]]:
    """The google.rpc.ErrorInfo reason and metadata of a status (AIP-193), if it carries one."""
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason or None, dict(info.metadata)
    return None, {}


# ----------------------------------------------------------------------------- the client


class Client:
    """A connection to one or more gradcheck servers. Thread-safe; use as a context manager."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 600.0,
        connect_timeout: float = 5.0,
        retry: bool | int = False,
        busy_wait: float = 120.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        targets = [target] if isinstance(target, str) else list(target)
        if not targets:
            raise ValueError("Client needs at least one target")
        if busy_wait < 0:
            raise ValueError(f"busy_wait must be >= 0 seconds, got {busy_wait}")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.busy_wait = busy_wait
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", _service_config(retry)),
            ("grpc.enable_retries", 1 if retry else 0),
        ]
        token = os.environ.get("GRADCHECK_TOKEN") if token is None else token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if credentials is None:
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        self._channels = [_Channel(t, options, credentials) for t in targets]
        self._turn = itertools.cycle(range(len(self._channels)))
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------- plumbing

    def _next(self) -> _Channel:
        return self._candidates()[0]

    def _candidates(self) -> list[_Channel]:
        """Every channel, starting with the next in turn; ones known to be failing go last."""
        if len(self._channels) == 1:
            return self._channels
        with self._lock:
            start = next(self._turn)
        order = self._channels[start:] + self._channels[:start]
        return sorted(order, key=lambda c: c.failing)  # stable: otherwise the rotation is kept

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        """``_call_once``, sent again after the wait a busy server asks for (its RetryInfo), for at
        most ``busy_wait`` seconds and never past ``timeout``."""
        started = time.monotonic()
        waits = 0
        while True:
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            try:
                return self._call_once(method, request, remaining)
            except ServiceError as exc:
                if exc.code != "RESOURCE_EXHAUSTED" or exc.reason not in _BUSY_REASONS:
                    raise
                # Jitter: clients refused together must not all come back together.
                delay = (exc.retry_after or 1.0) * random.uniform(1.0, 1.5) * min(2**waits, 8)
                waited = time.monotonic() - started
                if waited + delay > self.busy_wait or (timeout is not None and waited + delay >= timeout):
                    raise
                waits += 1
                time.sleep(delay)

    def _call_once(self, method: str, request: Any, timeout: float | None) -> Any:
        """Call ``method`` on the next channel; when that replica is unavailable or went away
        mid-call, try the other targets once each.

        A blocking unary call cannot be cancelled by its caller, so CANCELLED here comes from the
        server's side (a replica stopping with the call in flight): the check is stateless and
        safe to send again.
        """
        error: ServiceError | None = None
        for channel in self._candidates():
            try:
                channel.ensure_ready(self.connect_timeout)
                return getattr(channel.stub, method)(request, timeout=timeout, metadata=self._metadata)
            except ServiceError as exc:
                error = exc
            except grpc.RpcError as exc:
                error = _service_error(exc, channel.target)
            if error.code not in _FAILOVER_CODES:
                break
            channel.mark_failed()
        assert error is not None
        raise error

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _check(self, request: pb.CheckRequest, timeout: float | None) -> list[Report]:
        response = self._call("Check", request, self._timeout(timeout))
        return [decode_report(r) for r in response.reports]

    # ------------------------------------------------------------------------- checks

    def check(
        self, expression: str, /, *, options: Options = None, timeout: float | None = None, **inputs: Any
    ) -> Report:
        """Check an expression at one point given by name: ``c.check("x**2", x=torch.tensor(9.0))``."""
        if not inputs:
            raise TypeError(
                "check() needs the expression's inputs as keyword arguments, e.g. x=torch.tensor(9.0)"
            )
        return self.check_points(expression, [inputs], options=options, timeout=timeout)[0]

    def check_points(
        self,
        function: str | Registered,
        points: Sequence[Point],
        *,
        options: Options = None,
        timeout: float | None = None,
    ) -> list[Report]:
        """Check a function (expression text or ``Registered``) at several points; one Report each."""
        return self._check(build_request(function, points=points, options=options), timeout)

    def check_with_progress(
        self,
        function: str | Registered,
        points: Sequence[Point],
        progress: Callable[[int, int, int], None],
        *,
        options: Options = None,
        timeout: float | None = None,
    ) -> list[Report]:
        """``check_points``, calling ``progress(point, done, total)`` as the server reports columns done.

        A server without CheckWithProgress (an older one) answers the plain Check, with no progress."""
        request = build_request(function, points=points, options=options)
        channel = self._next()
        channel.ensure_ready(self.connect_timeout)
        try:
            for answer in channel.stub.CheckWithProgress(
                pb.CheckWithProgressRequest(request=request),
                timeout=self._timeout(timeout),
                metadata=self._metadata,
            ):
                if answer.HasField("progress"):
                    progress(answer.progress.point, answer.progress.done_count, answer.progress.total_count)
                elif answer.HasField("response"):
                    return [decode_report(r) for r in answer.response.reports]
        except grpc.RpcError as exc:
            error = _service_error(exc, channel.target)
            if error.code != "UNIMPLEMENTED":
                raise error from None
            return self._check(request, timeout)
        raise ServiceError(f"the stream from {channel.target} ended without an answer", code="UNKNOWN")

    def check_external(
        self,
        fn: Callable[..., Any],
        vjp: Callable[..., Any],
        inputs: Mapping[str, Any],
        *,
        jvp: Callable[..., Any] | None = None,
        vectorized: bool = False,
        name: str | None = None,
        max_batch_size: int = 0,
        options: Options = None,
        timeout: float | None = None,
    ) -> Report:
        """Check ``vjp``, a hand-written gradient of ``fn``, both evaluated here (CheckExternal).

        ``inputs`` name the point (NumPy arrays or torch tensors; a tensor with requires_grad
        selects the checked ones, as in ``check``). The server drives the check and asks for values
        of ``fn(*inputs)`` and products ``vjp(cotangent, *inputs)`` (see gradcheck_svc.callables);
        no torch autograd is involved and no code leaves this process.
        """
        names = list(inputs)
        tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in inputs.values()]
        source = CallableSource(fn, vjp, list(inputs.values()), jvp=jvp, vectorized=vectorized)
        start = pb.ExternalStart(
            function=name or str(getattr(fn, "__name__", "external")),
            point=encode_point(dict(zip(names, tensors, strict=True))),
            options=encode_options(options),
            has_jvp=jvp is not None,
            max_batch_size=max_batch_size,
        )
        channel = self._next()
        channel.ensure_ready(self.connect_timeout)
        stub, deadline, metadata = channel.stub, self._timeout(timeout), self._metadata
        try:
            return answer_stream(
                lambda requests: stub.CheckExternal(requests, timeout=deadline, metadata=metadata),
                start,
                source,
                tensors,
            )
        except grpc.RpcError as exc:
            raise _service_error(exc, channel.target) from None

    def check_registered(
        self,
        name: str,
        /,
        *inputs: Any,
        params: Mapping[str, Any] | None = None,
        options: Options = None,
        timeout: float | None = None,
        **named_inputs: Any,
    ) -> Report:
        """Check a registered function; tensors reach it positionally, in the order given, and so do
        plain constants among them (``c.check_registered("mypkg:softmax", x, -1)``)."""
        if not all(isinstance(t, torch.Tensor) for t in inputs):
            from gradcheck_svc.binding import portable_named

            if named_inputs:
                raise TypeError("check_registered() takes constants with positional tensors only")
            travelling = portable_named(name, inputs, params=params)
            if isinstance(travelling, str):
                raise TypeError(f"check_registered({name!r}): {travelling}")
            call = Registered.of(travelling)
            return self.check_points(call, [travelling.tensors], options=options, timeout=timeout)[0]
        point = {f"inputs[{i}]": t for i, t in enumerate(inputs)} | named_inputs
        if not point:
            raise TypeError("check_registered() needs at least one input tensor")
        return self.check_points(Registered(name, params or {}), [point], options=options, timeout=timeout)[0]

    def check_sampled(
        self,
        function: str | Registered,
        sampling: SamplingSpec,
        *,
        options: Options = None,
        timeout: float | None = None,
    ) -> list[Report]:
        """Check at points the server draws from ``sampling`` (see ``specs.sample_points``)."""
        return self._check(build_request(function, sampling=sampling, options=options), timeout)

    def check_stream(
        self, calls: Iterable[CheckCall], *, timeout: float | None = None
    ) -> Iterator[StreamResult]:
        """Send many checks over one stream; results arrive as each finishes (match them by ``id``)."""
        ids = iter(itertools.count())

        def requests() -> Iterator[pb.CheckStreamRequest]:
            for call in calls:
                request = build_request(
                    call.function, points=call.points, sampling=call.sampling, options=call.options
                )
                yield pb.CheckStreamRequest(id=call.id or str(next(ids)), request=request)

        channel = self._next()
        channel.ensure_ready(self.connect_timeout)
        try:
            for answer in channel.stub.CheckStream(
                requests(), timeout=self._timeout(timeout), metadata=self._metadata
            ):
                if answer.HasField("error"):
                    code = grpc.StatusCode(_code_tuple(answer.error.code))
                    message = f"{code.name} from {channel.target}: {answer.error.message}"
                    reason, metadata = _error_info(answer.error)
                    error = ServiceError(message, code=code.name, reason=reason, metadata=metadata)
                    yield StreamResult(answer.id, None, error)
                else:
                    yield StreamResult(answer.id, [decode_report(r) for r in answer.response.reports])
        except grpc.RpcError as exc:
            raise _service_error(exc, channel.target) from None

    # ------------------------------------------------------------------------- server info

    def capabilities(self, *, timeout: float | None = 30.0) -> Capabilities:
        m = self._call("GetCapabilities", pb.GetCapabilitiesRequest(), timeout)
        return Capabilities(
            server_version=m.server_version,
            torch_version=m.torch_version,
            devices=[
                DeviceInfo(name=d.name, available=d.available, description=d.description) for d in m.devices
            ],
            cuda_available=m.cuda_available,
            default_device=m.default_device,
            dtypes=[str(DTYPES[d]).removeprefix("torch.") for d in m.dtypes if d in DTYPES],
            expression_functions=list(m.expression_functions),
            registered_functions=list(m.registered_functions),
            limits=_limits(m.limits),
            served_by=m.served_by,
        )

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The health status name (``"SERVING"``, ``"NOT_SERVING"``, ...) of the next target."""
        channel = self._next()
        try:
            response = channel.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise _service_error(exc, channel.target) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _code_tuple(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return (int(code.value[0]), str(code.value[1]))
    return (2, "unknown")


def _limits(msg: pb.Limits) -> dict[str, int | float]:
    """Limits by name; durations as seconds (``max_check_duration`` -> ``max_check_seconds``)."""
    out: dict[str, int | float] = {}
    for descriptor, value in msg.ListFields():
        if descriptor.message_type is not None:  # google.protobuf.Duration
            out[descriptor.name.removesuffix("_duration") + "_seconds"] = value.ToNanoseconds() / 1e9
        else:
            out[descriptor.name] = value
    return out


def build_request(
    function: str | Registered,
    *,
    points: Sequence[Point] | None = None,
    sampling: SamplingSpec | None = None,
    options: Options = None,
) -> pb.CheckRequest:
    """The CheckRequest for a function and its points (exactly one of ``points`` / ``sampling``)."""
    if (points is None) == (sampling is None):
        raise TypeError("give either points or sampling")
    # Built in place, field by field: nested messages passed to a constructor are copied.
    request = pb.CheckRequest()
    if isinstance(function, Registered):
        registered = request.function.registered
        registered.name = function.name
        for k, v in function.params.items():
            registered.params[k].CopyFrom(encode_value(v))
        registered.arguments.extend(encode_arguments(function.arguments))
        if function.init is not None:
            registered.module.CopyFrom(encode_module(function.init, function.state))
    elif isinstance(function, str):
        request.function.expression = function
    else:
        raise TypeError(f"function must be an expression string or Registered, got {type(function).__name__}")
    if options is not None:
        request.options.CopyFrom(encode_options(options))
    if sampling is not None:
        request.sampling.CopyFrom(encode_sampling(sampling))
    else:
        assert points is not None
        tensors = [
            {n: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for n, v in p.items()}
            for p in points
        ]
        request.explicit_points.SetInParent()
        for point in tensors:
            encode_point(point, request.explicit_points.points.add())
    return request
