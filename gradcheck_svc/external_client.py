"""The client's side of CheckExternal: answer the server's requests from a local ExternalSource.

The server drives; this loop only decodes each request, calls the source (the user's callables)
and sends the answer back. When a callable raises, the server is told with ExternalFailure (its
Report then carries the message), so a user's bug never looks like a transport error.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gradcheck_svc.codec import decode_report, decode_tensor, encode_tensor
from gradcheck_svc.engine.evaluate import describe
from gradcheck_svc.engine.external import ExternalSource, checked_inputs
from gradcheck_svc.report import Report
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = ["answer_stream"]

_NO_LIMIT = 2**62  # the client trusts its own server's tensors; sizes were bounded server-side


def _tensors(named: Sequence[pb.NamedTensor]) -> list[torch.Tensor]:
    return [decode_tensor(n.tensor, max_elements=_NO_LIMIT, field=n.name) for n in named]


def _named(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=n, tensor=encode_tensor(t)) for n, t in zip(names, tensors, strict=True)]


class _Answerer:
    def __init__(self, source: ExternalSource, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> None:
        self.source = source
        self.names = list(names)
        self.inputs = [t.detach() for t in inputs]
        self.checked = checked_inputs(inputs)

    def answer(self, request: pb.CheckExternalResponse) -> pb.CheckExternalRequest:
        kind = request.WhichOneof("kind")
        if kind is None:  # an empty message: nothing to answer
            raise ValueError("unexpected message None from the server")
        body = getattr(request, kind)
        try:
            if kind == "evaluate":
                outputs = self.source.evaluate(_tensors(body.inputs))
                values = pb.ExternalValues(sequence=body.sequence)
                values.outputs.extend(_named(self.source.output_names, outputs))
                return pb.CheckExternalRequest(values=values)
            if kind == "vjp":
                grads = self.source.vjp(self.inputs, _tensors(body.cotangents), self.checked)
                products = pb.ExternalProducts(sequence=body.sequence)
                kept = [(n, g) for n, g, c in zip(self.names, grads, self.checked, strict=True) if c]
                products.tensors.extend(_named([n for n, _ in kept], [g for _, g in kept]))  # type: ignore[misc]
                return pb.CheckExternalRequest(products=products)
            if kind == "jvp":
                given = iter(_tensors(body.tangents))
                tangents = [next(given) if c else None for c in self.checked]
                outputs = self.source.jvp(self.inputs, tangents)
                products = pb.ExternalProducts(sequence=body.sequence)
                products.tensors.extend(_named(self.source.output_names, outputs))
                return pb.CheckExternalRequest(products=products)
        except Exception as exc:  # the user's callable: the server reports it in the Report
            failure = pb.ExternalFailure(sequence=body.sequence, message=describe(exc))
            return pb.CheckExternalRequest(failure=failure)
        raise ValueError(f"unexpected message {kind!r} from the server")


def answer_stream(
    call: Any, start: pb.ExternalStart, source: ExternalSource, inputs: Sequence[torch.Tensor]
) -> Report:
    """Run one CheckExternal exchange; ``call(requests)`` opens the stream and returns its responses."""
    answerer = _Answerer(source, [t.name for t in start.point.tensors], inputs)
    outgoing: queue.Queue[pb.CheckExternalRequest | None] = queue.Queue()
    outgoing.put(pb.CheckExternalRequest(start=start))

    def requests() -> Iterator[pb.CheckExternalRequest]:
        while (message := outgoing.get()) is not None:
            yield message

    responses = call(requests())
    try:
        for response in responses:
            if response.WhichOneof("kind") == "report":
                return decode_report(response.report)
            outgoing.put(answerer.answer(response))
        raise RuntimeError("the server ended CheckExternal without a report")
    finally:
        outgoing.put(None)
        responses.cancel()
