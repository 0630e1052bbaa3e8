"""The client's function, seen by the engine as an ExternalSource answered over a gRPC stream.

Each call of the engine becomes one request on the stream (evaluate, vjp, jvp) and blocks until
the client's answer arrives, is validated (sequence, names, shapes, dtypes, finiteness) and
decoded. Whatever ends the exchange (a bad answer, no answer in time, the deadline, cancellation)
is recorded once and raised again on every later call, so the engine's own
fallbacks (another vmap path, a plain loop) cannot send more requests to a client that is done.
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from gradcheck_svc.codec import decode_tensor, encode_tensor
from gradcheck_svc.errors import CheckCancelledError, CheckError, InvalidRequestError
from gradcheck_svc.server.runner import Deadline
from gradcheck_svc.server.status import Rejection
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = ["NAME", "NAME_RULE", "ClientFailed", "ExchangeEnded", "StreamSource"]

# Seconds between looks at cancellation and the deadline while waiting. A draining server lets
# a running check finish within its grace period, as for every RPC; stopping cancels the rest.
_POLL = 0.05
_T = TypeVar("_T")
# Input and output names end up in reports and logs: short identifiers only.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
NAME_RULE = "names must be unique identifiers of at most 64 characters ([A-Za-z_][A-Za-z0-9_]*)"


class ExchangeEnded(CheckError):
    """Stops the engine at once (a CheckError is never retried on another path); ``cause`` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ClientFailed(Exception):
    """The client answered a request with ExternalFailure: its function could not be computed."""


@dataclass(frozen=True)
class _Slot:
    """An output or input of the client's function: name, shape (unbatched) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class StreamSource:
    """ExternalSource over a CheckExternal stream (see protos/.../gradcheck.proto)."""

    def __init__(
        self,
        *,
        inputs: Sequence[tuple[str, torch.Tensor]],
        checked: Sequence[bool],
        has_jvp: bool,
        max_batch: int,
        max_elements: int,
        reply_seconds: float,
        deadline: Deadline,
        cancelled: Callable[[], bool],
        send: Callable[[pb.CheckExternalResponse], None],
        answers: queue.Queue[pb.CheckExternalRequest | str | None],
        outputs_known: Callable[[int], None] = lambda elements: None,
    ) -> None:
        self._inputs = [_Slot(n, tuple(t.shape), t.dtype) for n, t in inputs]
        self._base = [t.detach() for _, t in inputs]
        self._checked = list(checked)
        self.has_jvp = has_jvp
        self._max_batch = max_batch
        self._max_elements = max_elements
        self._reply_seconds = reply_seconds
        self._deadline = deadline
        self._cancelled = cancelled
        self._send = send
        self._answers = answers
        # Told the elements of one evaluation's outputs once the first answer declares them (the
        # check's size is known only then); it may refuse the check by raising.
        self._outputs_known = outputs_known
        self._outputs: list[_Slot] | None = None
        self._sequence = 0
        self._lock = threading.Lock()  # one request in flight at a time
        self.ended: BaseException | None = None
        self.requests = 0

    # ------------------------------------------------------------------ ExternalSource
    @property
    def output_names(self) -> list[str]:
        if self._outputs is None:
            raise RuntimeError("outputs are known after the first evaluation")
        names = [o.name for o in self._outputs]
        return ["output"] if names == ["output"] else names

    def _evaluate(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        batch = inputs[0].shape[0]
        outs: list[list[torch.Tensor]] = []
        for start in range(0, batch, self._max_batch):
            part = [x[start : start + self._max_batch] for x in inputs]
            size = part[0].shape[0]
            msg = pb.CheckExternalResponse()
            msg.evaluate.batch_size = size
            msg.evaluate.inputs.extend(
                pb.NamedTensor(name=s.name, tensor=encode_tensor(x))
                for s, x in zip(self._inputs, part, strict=True)
            )
            answer = self._exchange(msg, msg.evaluate, "values")
            if self._outputs is None:
                self._outputs = self._learn_outputs(answer.values.outputs)
                self._outputs_known(sum(math.prod(o.shape) for o in self._outputs))
            outs.append(self._decode_all(answer.values.outputs, self._outputs, size, "values.outputs"))
        return [torch.cat([o[i] for o in outs]) for i in range(len(self._outputs or []))]

    def _vjp(
        self, inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], wanted: Sequence[bool]
    ) -> list[torch.Tensor | None]:
        self._at_base(inputs)
        outputs = self._outputs or []
        checked = [s for s, c in zip(self._inputs, self._checked, strict=True) if c]
        batch = cotangents[0].shape[0]
        parts: list[list[torch.Tensor]] = []
        for start in range(0, batch, self._max_batch):
            part = [c[start : start + self._max_batch] for c in cotangents]
            size = part[0].shape[0]
            msg = pb.CheckExternalResponse()
            msg.vjp.batch_size = size
            msg.vjp.cotangents.extend(
                pb.NamedTensor(name=s.name, tensor=encode_tensor(c.to(s.dtype)))
                for s, c in zip(outputs, part, strict=True)
            )
            answer = self._exchange(msg, msg.vjp, "products")
            parts.append(self._decode_all(answer.products.tensors, checked, size, "products.tensors"))
        grads = iter([torch.cat([p[i] for p in parts]) for i in range(len(checked))])
        by_input = [next(grads) if c else None for c in self._checked]
        return [g if w else None for g, w in zip(by_input, wanted, strict=True)]

    def _jvp(
        self, inputs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        self._at_base(inputs)
        outputs = self._outputs or []
        batch = next(t.shape[0] for t in tangents if t is not None)
        checked = [(s, t) for s, t, c in zip(self._inputs, tangents, self._checked, strict=True) if c]
        parts: list[list[torch.Tensor]] = []
        for start in range(0, batch, self._max_batch):
            size = min(self._max_batch, batch - start)
            msg = pb.CheckExternalResponse()
            msg.jvp.batch_size = size
            for s, t in checked:
                part = torch.zeros(size, *s.shape, dtype=s.dtype) if t is None else t[start : start + size]
                msg.jvp.tangents.add(name=s.name, tensor=encode_tensor(part.to(s.dtype)))
            answer = self._exchange(msg, msg.jvp, "products")
            parts.append(self._decode_all(answer.products.tensors, outputs, size, "products.tensors"))
        return [torch.cat([p[i] for p in parts]) for i in range(len(outputs))]

    def evaluate(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for given, slot in zip(inputs, self._inputs, strict=True):
            if given.dtype != slot.dtype:
                # Not sent: values computed in the client's dtype would pass for a more precise
                # reference. The engine may try other dtypes and fall back; nothing ends here.
                raise TypeError(
                    f"the client's function takes {slot.name!r} as {slot.dtype}, not {given.dtype}"
                )
        return self._ending(lambda: self._evaluate(inputs))

    def vjp(
        self, inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], wanted: Sequence[bool]
    ) -> list[torch.Tensor | None]:
        return self._ending(lambda: self._vjp(inputs, cotangents, wanted))

    def jvp(
        self, inputs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        return self._ending(lambda: self._jvp(inputs, tangents))

    # ------------------------------------------------------------------ the exchange
    def _ending(self, call: Callable[[], _T]) -> _T:
        """Run one engine call; the first failure ends the exchange for good."""
        with self._lock:
            if self.ended is not None:
                raise ExchangeEnded(self.ended)
            try:
                return call()
            except BaseException as exc:
                self.ended = exc
                raise ExchangeEnded(exc) from exc

    def _exchange(
        self, msg: pb.CheckExternalResponse, body: object, expected: str
    ) -> pb.CheckExternalRequest:
        """Send one request and wait for its answer."""
        self._sequence += 1
        body.sequence = self._sequence  # type: ignore[attr-defined]
        self.requests += 1
        self._send(msg)
        return self._check_answer(self._wait(), expected, msg.WhichOneof("kind"))

    def _wait(self) -> pb.CheckExternalRequest:
        give_up = min(time.monotonic() + self._reply_seconds, self._deadline.at)
        while True:
            if self._cancelled():
                raise CheckCancelledError("the client cancelled the check")
            now = time.monotonic()
            if now >= give_up:
                if self._deadline.passed():
                    raise self._deadline.rejection()
                raise Rejection(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the client did not answer request {self._sequence} within "
                    f"{self._reply_seconds:g} s (max_external_reply_duration)",
                )
            try:
                answer = self._answers.get(timeout=min(_POLL, give_up - now))
            except queue.Empty:
                continue
            if isinstance(answer, str):
                raise InvalidRequestError("stream", answer)
            if answer is None:
                raise InvalidRequestError(
                    "stream",
                    f"the client closed its side of the stream before answering request {self._sequence}",
                )
            return answer

    def _check_answer(
        self, answer: pb.CheckExternalRequest, expected: str, asked: str | None
    ) -> pb.CheckExternalRequest:
        kind = answer.WhichOneof("kind")
        if kind == "failure":
            raise ClientFailed(answer.failure.message[:500] or "the client reported a failure")
        if kind != expected:
            raise InvalidRequestError(
                "kind", f"request {self._sequence} ({asked}) is answered by `{expected}`, got `{kind}`"
            )
        sequence = getattr(answer, kind).sequence
        if sequence != self._sequence:
            raise InvalidRequestError(
                f"{kind}.sequence", f"is {sequence}; the request being answered is {self._sequence}"
            )
        return answer

    # ------------------------------------------------------------------ validation
    def _learn_outputs(self, named: Sequence[pb.NamedTensor]) -> list[_Slot]:
        if not named:
            raise InvalidRequestError("values.outputs", "needs at least one output")
        slots, seen = [], set()
        for k, item in enumerate(named):
            where = f"values.outputs[{k}]"
            if not NAME.match(item.name) or item.name in seen:
                raise InvalidRequestError(f"{where}.name", f"{item.name[:80]!r}: {NAME_RULE}")
            seen.add(item.name)
            shape = tuple(item.tensor.shape)
            dtype = decode_tensor(item.tensor, max_elements=self._max_elements, field=f"{where}.tensor").dtype
            if not (dtype.is_floating_point or dtype.is_complex):
                raise InvalidRequestError(f"{where}.tensor.dtype", "an output must be floating or complex")
            if not shape:
                raise InvalidRequestError(f"{where}.tensor.shape", "needs the leading batch dimension")
            slots.append(_Slot(item.name, shape[1:], dtype))
        return slots

    def _decode_all(
        self, named: Sequence[pb.NamedTensor], slots: Sequence[_Slot], batch: int, field: str
    ) -> list[torch.Tensor]:
        names = [n.name for n in named]
        if names != [s.name for s in slots]:
            raise InvalidRequestError(
                field,
                f"names {names} in request {self._sequence}; expected {[s.name for s in slots]}, in order",
            )
        out = []
        for k, (item, slot) in enumerate(zip(named, slots, strict=True)):
            where = f"{field}[{k}]"
            want = (batch, *slot.shape)
            if tuple(item.tensor.shape) != want:
                raise InvalidRequestError(
                    f"{where}.tensor.shape",
                    f"{slot.name!r} has shape {list(item.tensor.shape)} in request {self._sequence}; "
                    f"expected {list(want)} (batch of {batch}, then the shape of {slot.name!r})",
                )
            tensor = decode_tensor(item.tensor, max_elements=self._max_elements, field=f"{where}.tensor")
            if tensor.dtype != slot.dtype:
                raise InvalidRequestError(
                    f"{where}.tensor.dtype", f"{slot.name!r} is {tensor.dtype}; expected {slot.dtype}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidRequestError(
                    f"{where}.tensor.data",
                    f"{slot.name!r} has NaN or infinite values in request {self._sequence}: the function "
                    "and its derivatives must be finite near the checked point",
                )
            out.append(tensor)
        return out

    def _at_base(self, inputs: Sequence[torch.Tensor]) -> None:
        """Products are asked at the start point only: the protocol sends no point with them."""
        for given, base in zip(inputs, self._base, strict=True):
            if given.shape != base.shape or not torch.equal(given.detach().to(base.dtype), base):
                raise RuntimeError("external products are defined at the start point only")
