"""``gradcheck-svc``: serve | check | health | capabilities.

    gradcheck-svc serve --port 0                         # prints "listening on 127.0.0.1:PORT"
    gradcheck-svc check --expr "sin(x / 2**1.5)" --at x=100                  # in-process
    gradcheck-svc check --target HOST:PORT --expr "u**2 + v**3 + u*v" --at u=2 --at v=4 --json
    gradcheck-svc health --target HOST:PORT                                  # exit 0 iff SERVING

``--at NAME=VALUE`` binds one input (a number or a JSON list); repeating a name starts the next
point (the k-th value of every name forms point k). Exit status of ``check``: 0 all ok,
1 gradient mismatch, 2 usage error, server error, or a point where the function could not run.
The client commands read GRADCHECK_TARGET (or GRADCHECK_SERVER), GRADCHECK_TOKEN and
GRADCHECK_TLS_CA (GRADCHECK_TLS_CERT / _KEY for mutual TLS) when the flags are absent;
``serve`` reads every GRADCHECK_* setting (see gradcheck_svc.settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: health probes start without torch or the client
    from gradcheck_svc.client import Client
    from gradcheck_svc.report import Report
    from gradcheck_svc.specs import SamplingSpec

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2

__all__ = ["main"]


# ----------------------------------------------------------------------------- parser


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; only flags given override the environment and the defaults."""
    from gradcheck_svc.settings import Settings

    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name, "help": info.description}
        annotation = info.annotation
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list or (
            origin is typing.Annotated and typing.get_origin(typing.get_args(annotation)[0]) is list
        ):
            kwargs.update(nargs="+", metavar=name.upper().removesuffix("S"))
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation in (int, float):
            kwargs["type"] = annotation
        elif isinstance(annotation, types.UnionType):
            kwargs["type"] = str
        parser.add_argument(flag, **kwargs)


def _env_target() -> str | None:
    return os.environ.get("GRADCHECK_TARGET") or os.environ.get("GRADCHECK_SERVER") or None


def _client_flags(parser: argparse.ArgumentParser, *, target_required: bool) -> None:
    parser.add_argument(
        "--target",
        default=_env_target(),
        required=target_required and not _env_target(),
        help="server address HOST:PORT, dns:///NAME:PORT, or several comma-separated "
        "(env GRADCHECK_TARGET, or GRADCHECK_SERVER as the plugin reads it)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for the answer")
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to wait for a connection")
    parser.add_argument(
        "--token", default=os.environ.get("GRADCHECK_TOKEN"), help="bearer token (env GRADCHECK_TOKEN)"
    )
    parser.add_argument(
        "--tls-ca", default=None, metavar="PEM", help="connect with TLS trusting this CA (GRADCHECK_TLS_CA)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcheck-svc", description="Check gradients against finite differences."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the gRPC server", description="Run the gRPC server until SIGTERM."
    )
    _settings_flags(serve)

    check = sub.add_parser("check", help="check a function (locally, or on a server with --target)")
    what = check.add_mutually_exclusive_group(required=True)
    what.add_argument("--expr", help='expression, e.g. "sin(x / 2**1.5)"')
    what.add_argument("--function", help='registered function, e.g. "torch.sin"')
    check.add_argument(
        "--param", action="append", default=[], metavar="NAME=JSON", help="registered function parameter"
    )
    check.add_argument(
        "--at", action="append", default=[], metavar="NAME=VALUE", help="an input value (see above)"
    )
    check.add_argument(
        "--sample", action="append", default=[], metavar="NAME=SHAPE", help="sample an input: x=3,4"
    )
    check.add_argument("--count", type=int, default=1, help="points to sample")
    check.add_argument("--seed", type=int, default=0, help="seed of the sampled points")
    check.add_argument("--dtype", default="float64", help="dtype of the inputs (default float64)")
    check.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None, help="where to run the check"
    )
    check.add_argument(
        "--option", action="append", default=[], metavar="NAME=JSON", help="engine option, e.g. mode=full"
    )
    check.add_argument(
        "--functions", nargs="+", default=[], metavar="MODULE", help="local only: expose these modules"
    )
    check.add_argument("--json", action="store_true", help="print the reports as a JSON list")
    _client_flags(check, target_required=False)

    health = sub.add_parser("health", help="exit 0 iff the server is SERVING")
    health.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    _client_flags(health, target_required=True)

    caps = sub.add_parser("capabilities", help="print what a server offers")
    caps.add_argument("--json", action="store_true", help="print JSON")
    _client_flags(caps, target_required=True)
    return parser


# ----------------------------------------------------------------------------- commands


class UsageError(Exception):
    pass


def _json_value(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if what == "option" or what == "param":
            return text  # bare words: mode=full, approximate=tanh
        raise UsageError(f"cannot read {text!r} as a number or JSON list") from None


def _pairs(items: Sequence[str], what: str) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--{what} expects NAME=VALUE, got {item!r}")
        out.append((name.strip(), _json_value(value.strip(), what)))
    return out


def _points(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from gradcheck_svc.codec import dtype_from_name

    dtype = dtype_from_name(args.dtype)
    points: list[dict[str, Any]] = []
    for name, value in _pairs(args.at, "at"):
        k = next((i for i, p in enumerate(points) if name not in p), len(points))
        if k == len(points):
            points.append({})
        points[k][name] = torch.tensor(value, dtype=dtype)
    if points and any(p.keys() != points[0].keys() for p in points):
        raise UsageError(
            "every point needs a value for every input (repeat each --at NAME the same number of times)"
        )
    return points


def _sampling(args: argparse.Namespace) -> SamplingSpec:
    from gradcheck_svc.codec import dtype_from_name
    from gradcheck_svc.specs import SampledInput, SamplingSpec

    inputs = []
    for item in args.sample:
        name, _, shape_text = item.partition("=")
        try:
            shape = tuple(int(d) for d in shape_text.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise UsageError(
                f"--sample expects NAME=SHAPE like x=3,4 (or x= for a scalar), got {item!r}"
            ) from None
        if any(d < 0 for d in shape):
            raise UsageError(f"--sample {item!r}: a dimension cannot be negative")
        inputs.append(SampledInput(name=name.strip(), shape=shape, dtype=dtype_from_name(args.dtype)))
    if args.count < 1:
        raise UsageError(f"--count must be at least 1, got {args.count}")
    return SamplingSpec(inputs=tuple(inputs), count=args.count, seed=args.seed)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(_pairs(args.option, "option"))
    if args.device:
        options["device"] = args.device
    return options


def _client(args: argparse.Namespace) -> Client:
    from gradcheck_svc.client import Client

    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    return Client(
        targets if len(targets) > 1 else targets[0],
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        tls_ca=args.tls_ca,  # None: GRADCHECK_TLS_CA, as for every Client
        token=args.token,
    )


def _check_remote(args: argparse.Namespace, points: list[dict[str, Any]]) -> list[Report]:
    from gradcheck_svc.client import Registered

    function: Any = (
        args.expr if args.expr is not None else Registered(args.function, dict(_pairs(args.param, "param")))
    )
    from gradcheck_svc.progress_bar import ProgressBar

    with _client(args) as client:
        if args.sample:
            return client.check_sampled(function, _sampling(args), options=_options(args))
        label = args.expr if args.expr is not None else args.function
        bar = ProgressBar(label)
        try:  # the server streams how far each point got; the bar shows it after two seconds
            return client.check_with_progress(
                function, points, lambda _point, done, total: bar(done, total), options=_options(args)
            )
        finally:
            bar.close()


def _check_local(args: argparse.Namespace, points: list[dict[str, Any]]) -> list[Report]:
    from gradcheck_svc.binding import bind_expression, bind_registered
    from gradcheck_svc.progress_bar import ProgressBar
    from gradcheck_svc.specs import FunctionRegistry, parse_expression, sample_points

    if args.sample:
        points = sample_points(_sampling(args))
    options = _options(args)
    registry = FunctionRegistry.default(args.functions) if args.function is not None else None
    params = dict(_pairs(args.param, "param"))
    if args.expr is not None:
        order = list(parse_expression(args.expr).variables)
        for i, p in enumerate(points):
            if set(p) != set(order):
                raise UsageError(f"point {i} binds {sorted(p)}; the expression's variables are {order}")
    reports = []
    for i, p in enumerate(points):
        if registry is None:
            call = bind_expression(args.expr, [p])
        else:
            call = bind_registered(args.function, [p], registry, params=params)
        bar = ProgressBar(call.label + (f" point {i}" if len(points) > 1 else ""))
        try:
            report = call.check(progress=bar, **options)
        finally:
            bar.close()
        reports.append(report.model_copy(update={"point": i}) if len(points) > 1 else report)
    return reports


def cmd_check(args: argparse.Namespace) -> int:
    if bool(args.at) == bool(args.sample):
        raise UsageError("give the inputs with --at NAME=VALUE, or sample them with --sample NAME=SHAPE")
    points = _points(args) if args.at else []
    reports = _check_remote(args, points) if args.target else _check_local(args, points)
    if args.json:
        print("[" + ",\n".join(r.model_dump_json() for r in reports) + "]")
    else:
        print("\n\n".join(str(r) for r in reports))
    if any(r.error for r in reports):
        return EXIT_ERROR
    return EXIT_OK if all(r.ok for r in reports) else EXIT_MISMATCH


def cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check on the first target; needs neither torch nor the client (probes run often)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target.split(",")[0].strip()
    ca = args.tls_ca or os.environ.get("GRADCHECK_TLS_CA")
    if ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout or args.connect_timeout,
            )
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "ERROR"
            print(f"gradcheck-svc health: {code} from {target}", file=sys.stderr)
            return EXIT_ERROR
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return EXIT_OK if status == "SERVING" else 1


def cmd_capabilities(args: argparse.Namespace) -> int:
    with _client(args) as client:
        caps = client.capabilities(timeout=args.timeout or 30.0)
    if args.json:
        print(caps.model_dump_json(indent=2))
        return EXIT_OK
    print(f"server {caps.server_version} (torch {caps.torch_version}) served by {caps.served_by}")
    print("devices: " + ", ".join(f"{d.name}{'' if d.available else ' (unavailable)'}" for d in caps.devices))
    print(f"default device: {caps.default_device}")
    print("dtypes: " + ", ".join(caps.dtypes))
    print("expression functions: " + ", ".join(caps.expression_functions))
    print(f"registered functions ({len(caps.registered_functions)}): " + ", ".join(caps.registered_functions))
    print("limits: " + ", ".join(f"{k}={v}" for k, v in caps.limits.items()))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gradcheck_svc.server import serve
    from gradcheck_svc.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise UsageError(
            "invalid setting: "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    return serve(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gradcheck_svc.errors import GradcheckError

    command = {"serve": cmd_serve, "check": cmd_check, "health": cmd_health, "capabilities": cmd_capabilities}
    try:
        return command[args.command](args)
    except (UsageError, GradcheckError, ValueError, TypeError, OSError) as exc:
        print(f"gradcheck-svc {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug of ours, still said in one line rather than a traceback
        print(f"gradcheck-svc {args.command}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
