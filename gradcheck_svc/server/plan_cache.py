"""Plans of repeated small expression requests, kept so that a repeat skips decoding and validation.

Test suites and CI jobs send the same expression at the same points with the same options over and
over. For an expression with explicit points, the plan is a function of the request's bytes and the
server's settings alone: planning runs no client code and reads nothing else (the expression
functions are built in, the registry is not involved). So an identical request, byte for byte,
gets the plan the first one got, and the server skips the parse, the tensor decoding and the
checks of names, shapes and options, which on a server whose caches the last check emptied cost
several times their warm time.

Only what cannot vary is shared: the key holds every field of the request but ``log_tag`` (which
only goes to the log), so a request with other options, points or function is another entry; a
request that is refused is refused every time (refusals raise and are never kept); each caller gets
its own ``options`` dict and ``points`` list, and the point tensors, which the engine only reads (it
checks clones of them), are shared. The cache is one per service (its settings are part of every
plan), bounded in entries and in the size of a request it keeps.
"""

from __future__ import annotations

import functools

from gradcheck_svc.server.plan import CheckPlan, plan_check
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import FunctionRegistry
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = ["MAX_KEPT_REQUEST_BYTES", "PlanCache"]

# Seed-sized requests (a few scalars or a small vector) fit many times over; bigger ones are planned
# each time, where the check itself dwarfs planning anyway.
MAX_KEPT_REQUEST_BYTES = 2048


class PlanCache:
    """``plan(request)``: ``plan_check`` for this server, remembered for small expression requests."""

    def __init__(
        self,
        settings: Settings,
        registry: FunctionRegistry,
        *,
        max_entries: int = 512,
        max_request_bytes: int = MAX_KEPT_REQUEST_BYTES,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.max_request_bytes = max_request_bytes
        # lru_cache: bounded, thread-safe, and a hit costs one lookup in C.
        self._planned = functools.lru_cache(maxsize=max_entries)(self._plan_bytes)

    def plan(self, request: pb.CheckRequest) -> CheckPlan:
        if request.function.WhichOneof("kind") != "expression" or not request.HasField("explicit_points"):
            return plan_check(request, self.settings, self.registry)  # sampled points are drawn anew
        if request.log_tag:  # the tag goes to the log only: the same check under any tag is one entry
            untagged = pb.CheckRequest()
            untagged.CopyFrom(request)
            untagged.ClearField("log_tag")
            request = untagged
        key = request.SerializeToString(deterministic=True)
        if len(key) > self.max_request_bytes:
            return plan_check(request, self.settings, self.registry)
        return self._planned(key).own_copy()

    def _plan_bytes(self, key: bytes) -> CheckPlan:
        return plan_check(pb.CheckRequest.FromString(key), self.settings, self.registry)

    def entries(self) -> int:
        """How many plans are kept now."""
        return self._planned.cache_info().currsize
