"""A response that would not fit in one gRPC message is made to fit, or refused with a reason.

gRPC refuses to send a message above ``max_message_bytes`` with a bare RESOURCE_EXHAUSTED (no
details) and, inside a CheckStream, ends the whole stream, losing the other items' answers. Whole
Jacobians are the bulk of a large response (up to 4096 entries, three times, per pair and point),
and they are optional in the protocol; so they are left out first, with a note on every report
that lost them, and only a response still too large is refused (LIMIT_EXCEEDED, max_message_bytes).
"""

from __future__ import annotations

import grpc

from gradcheck_svc.server.status import Rejection
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = ["fit_response"]

_FRAMING = 4096  # room for a CheckStream / CheckWithProgress wrapper around the response
NOTE = "whole Jacobians left out: the response would exceed the server's max_message_bytes"


def fit_response(response: pb.CheckResponse, max_bytes: int) -> pb.CheckResponse:
    limit = max_bytes - min(_FRAMING, max_bytes // 8)
    if response.ByteSize() <= limit:
        return response
    for report in response.reports:
        stripped = False
        for pair in report.pairs:
            bulky = (
                pair.HasField("analytic")
                or pair.HasField("numeric")
                or pair.HasField("error_bars")
                or pair.HasField("error_map")
            )
            stripped = stripped or bulky
            pair.ClearField("analytic")
            pair.ClearField("numeric")
            pair.ClearField("error_bars")
            pair.ClearField("error_map")
        if stripped:
            report.notes.append(NOTE)
    size = response.ByteSize()
    if size > limit:
        raise Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the response would have {size} bytes, more than max_message_bytes={max_bytes} allows even "
            "without whole Jacobians: ask for fewer points or a smaller max_worst",
            limit=("max_message_bytes", str(max_bytes)),
        )
    return response
