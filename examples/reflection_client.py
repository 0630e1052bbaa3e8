"""A client that knows nothing but the server's address: everything comes from server reflection.

    python examples/reflection_client.py 127.0.0.1:50051

Uses only grpcio, grpcio-reflection and protobuf (no gradcheck_svc, no generated code). It resolves
every message and enum the service's file and its imports define (google/rpc and google/protobuf
types included), runs the three seed examples in float64 and float32, decodes the
google.rpc.BadRequest of a rejected request with reflected types, and checks a function it
evaluates itself through CheckExternal. Exit status 0 when every outcome is the expected one.
"""

from __future__ import annotations

import queue
import struct
import sys
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "gradcheck_svc.v1.GradcheckService"
FORMATS = {"DTYPE_FLOAT64": "d", "DTYPE_FLOAT32": "f"}


class Reflected:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def message(self, name: str) -> Any:
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(name))

    def enum(self, enum: str, value: str) -> int:
        return self.pool.FindEnumTypeByName(enum).values_by_name[value].number

    def every_type(self) -> tuple[list[str], list[str]]:
        """Full names of every message and enum in the service's file and all it imports."""
        messages: list[str] = []
        enums: list[str] = []
        todo = [self.pool.FindFileContainingSymbol(SERVICE)]
        seen: set[str] = set()
        while todo:
            file = todo.pop()
            if file.name in seen:
                continue
            seen.add(file.name)
            todo += file.dependencies
            stack = list(file.message_types_by_name.values())
            enums += [e.full_name for e in file.enum_types_by_name.values()]
            while stack:
                msg = stack.pop()
                messages.append(msg.full_name)
                message_factory.GetMessageClass(msg)  # every field's type must resolve
                stack += msg.nested_types
                enums += [e.full_name for e in msg.enum_types]
        return sorted(messages), sorted(enums)

    def unary(self, method: str, request: Any) -> Any:
        out = self.pool.FindServiceByName(SERVICE).methods_by_name[method].output_type
        call = self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=message_factory.GetMessageClass(out).FromString,
        )
        return call(request, timeout=60)


def tensor(r: Reflected, dtype: str, values: list[float], shape: list[int]) -> Any:
    t = r.message("gradcheck_svc.v1.Tensor")()
    t.dtype = r.enum("gradcheck_svc.v1.Dtype", dtype)
    t.shape.extend(shape)
    t.data = struct.pack("<" + FORMATS[dtype] * len(values), *values)  # little-endian, row-major
    return t


def floats(r: Reflected, t: Any) -> list[float]:
    name = r.pool.FindEnumTypeByName("gradcheck_svc.v1.Dtype").values_by_number[t.dtype].name
    fmt = FORMATS[name]
    return list(struct.unpack("<" + fmt * (len(t.data) // struct.calcsize(fmt)), t.data))


def seeds(r: Reflected) -> bool:
    good = True
    cases = [
        ("x**2", {"x": 9.0}, {"x": 18.0}),
        ("sin(x / 2**1.5)", {"x": 100.0}, {"x": -0.2469}),
        ("u*v + u**2 + v**3", {"u": 2.0, "v": 4.0}, {"u": 8.0, "v": 50.0}),
    ]
    for dtype, tol in (("DTYPE_FLOAT64", 5e-5), ("DTYPE_FLOAT32", 5e-4)):
        for expression, inputs, expect in cases:
            request = r.message("gradcheck_svc.v1.CheckRequest")()
            request.function.expression = expression
            point = request.explicit_points.points.add()
            for name, value in inputs.items():
                point.tensors.add(name=name, tensor=tensor(r, dtype, [value], []))
            report = r.unary("Check", request).reports[0]
            grads = {p.input: p.analytic.values[0] for p in report.pairs}
            right = all(abs(grads[k] - v) <= tol * max(1.0, abs(v)) for k, v in expect.items())
            good &= report.ok and right
            shown = ", ".join(f"d/d{k} = {v:.6g}" for k, v in sorted(grads.items()))
            print(f"{dtype[6:].lower()} {expression}: {shown} ok={report.ok}")
    return good


def bad_request_details(r: Reflected) -> bool:
    request = r.message("gradcheck_svc.v1.CheckRequest")()
    request.function.expression = "x**"
    request.explicit_points.points.add().tensors.add(name="x", tensor=tensor(r, "DTYPE_FLOAT64", [1.0], []))
    try:
        r.unary("Check", request)
    except grpc.RpcError as exc:
        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        status = r.message("google.rpc.Status").FromString(trailers["grpc-status-details-bin"])
        fields = []
        for detail in status.details:
            kind = detail.type_url.rsplit("/", 1)[-1]
            decoded = r.message(kind).FromString(detail.value)
            if kind == "google.rpc.BadRequest":
                fields += [v.field for v in decoded.field_violations]
        print(f"rejected: {exc.code().name}; BadRequest fields: {fields}")  # type: ignore[attr-defined]
        return exc.code() == grpc.StatusCode.INVALID_ARGUMENT and bool(fields)  # type: ignore[attr-defined]
    return False


def external(r: Reflected) -> bool:
    """f(x) = x^3 elementwise, with the gradient 3x^2 computed here."""
    import math

    x0 = [0.5, -1.25, 2.0]
    out_type = r.pool.FindServiceByName(SERVICE).methods_by_name["CheckExternal"].output_type
    call = r.channel.stream_stream(
        f"/{SERVICE}/CheckExternal",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(out_type).FromString,
    )
    Request = r.message("gradcheck_svc.v1.CheckExternalRequest")
    outgoing: queue.Queue[Any] = queue.Queue()
    start = Request()
    start.start.function = "cube"
    start.start.point.tensors.add(name="x", tensor=tensor(r, "DTYPE_FLOAT64", x0, [3]))
    outgoing.put(start)

    def requests() -> Iterator[Any]:
        while (m := outgoing.get()) is not None:
            yield m

    try:
        for message in call(requests(), timeout=60):
            kind = message.WhichOneof("kind")
            if kind == "report":
                report = message.report
                checked = [(p.input, p.checked_count) for p in report.pairs]
                print(f"external cube: ok={report.ok}, checked elements: {checked}")
                return report.ok and math.isfinite(report.pairs[0].max_abs_error)
            answer = Request()
            if kind == "evaluate":
                xs = floats(r, message.evaluate.inputs[0].tensor)
                answer.values.sequence = message.evaluate.sequence
                shape = list(message.evaluate.inputs[0].tensor.shape)
                answer.values.outputs.add(
                    name="output", tensor=tensor(r, "DTYPE_FLOAT64", [v**3 for v in xs], shape)
                )
            else:
                cot = floats(r, message.vjp.cotangents[0].tensor)
                grads = [c * 3 * x0[i % 3] ** 2 for i, c in enumerate(cot)]
                answer.products.sequence = message.vjp.sequence
                shape = list(message.vjp.cotangents[0].tensor.shape)
                answer.products.tensors.add(name="x", tensor=tensor(r, "DTYPE_FLOAT64", grads, shape))
            outgoing.put(answer)
    finally:
        outgoing.put(None)
    return False


def main(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        r = Reflected(channel)
        services = r.database.get_services()
        messages, enums = r.every_type()
        print(f"services: {', '.join(sorted(services))}")
        print(
            f"resolved {len(messages)} messages and {len(enums)} enums, e.g. "
            + ", ".join(
                n
                for n in ("google.rpc.BadRequest", "google.rpc.Status", "google.protobuf.Duration")
                if n in messages
            )
        )
        needed = {
            "google.rpc.BadRequest",
            "google.rpc.ErrorInfo",
            "google.protobuf.Duration",
            "gradcheck_svc.v1.Report",
        }
        good = SERVICE in services and needed <= set(messages)
        good &= seeds(r)
        good &= bad_request_details(r)
        good &= external(r)
    print("reflection client: all outcomes as expected" if good else "reflection client: UNEXPECTED OUTCOME")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
