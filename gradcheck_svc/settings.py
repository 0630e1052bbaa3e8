"""Server configuration: defaults < ``GRADCHECK_*`` environment variables < command-line flags.

    GRADCHECK_PORT=50051 GRADCHECK_FUNCTIONS=mypkg.ops,other.ops gradcheck-svc serve --device cpu

List settings take a comma-separated string (or a JSON list) from the environment. Every field
becomes a ``serve`` flag (``max_concurrent_checks`` -> ``--max-concurrent-checks``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "usable_cores"]

MiB = 1024 * 1024


def _split(value: Any) -> Any:
    """A comma-separated string (the environment), a JSON list, or a list whose strings may hold
    commas themselves (``serve --auth-tokens t1,t2`` arrives as ``["t1,t2"]``): one flat list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [part for item in value for part in (_split(item) if isinstance(item, str) else [item])]
    return value


def _secret(value: Any) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the port on this machine."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container's cpuset, ``taskset``), and no
    more than a cgroup v2 CPU quota allows (``docker run --cpus 2``), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def usable_memory() -> int:
    """Bytes of memory this process may use: the machine's, and no more than a cgroup v2 limit
    (``docker run --memory 8g``) allows."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Cores' worth of CPU time the cgroup v2 quota grants (``"200000 100000"`` -> 2); None: no quota."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else -(-int(quota) // int(period))
    except (OSError, ValueError):
        return None


class Settings(BaseSettings):
    """Everything ``gradcheck-svc serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="GRADCHECK_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 / [::] to listen on every interface")
    port: int = Field(50051, ge=0, le=65535, description="port to bind; 0 picks a free one")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="device when a request leaves it unset"
    )
    worker_threads: int = Field(
        0, ge=0, description="gRPC handler threads; 0: max_concurrent_checks + 8 (room for health probes)"
    )
    max_concurrent_checks: int = Field(
        32, ge=1, description="checks running at once; more get RESOURCE_EXHAUSTED, never a queue"
    )
    stream_window: int = Field(4, ge=1, description="checks of one CheckStream running at once")
    max_calls_per_client: int = Field(
        0,
        ge=0,
        description="calls of one client running at once (a client is its bearer token, else as "
        "client_identity says); more get RESOURCE_EXHAUSTED (CLIENT_BUSY); 0: half the handler threads "
        "(worker_threads), so one client never holds every thread nor, by default, every check slot",
    )
    client_identity: Literal["address", "connection"] = Field(
        "address",
        description="who a client is when the server has no tokens: its IP address (one process "
        "opening many connections is one client), or each connection (behind a proxy, where every "
        "client shares the proxy's address; there, tokens tell clients apart best)",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="torch's intra-op threads in the server and in each worker process; 0: the usable "
        "cores divided by max_concurrent_checks, at least 1 (so 1 unless checks are few and cores many)",
    )
    max_message_bytes: int = Field(64 * MiB, ge=1024, description="largest request or response message")
    max_request_bytes_in_flight: int = Field(
        256 * MiB,
        ge=0,
        description="bytes of the requests being checked at once, server-wide (requests under 64 KiB "
        "are not counted); more get RESOURCE_EXHAUSTED (SERVER_BUSY); one request alone always fits",
    )
    max_tensor_elements: int = Field(
        4_000_000, ge=1, description="largest tensor (inputs and expression intermediates), in elements"
    )
    max_request_elements: int = Field(
        16_000_000, ge=1, description="largest total of input elements per request"
    )
    max_points: int = Field(1024, ge=1, description="most evaluation points per request")
    max_request_tensors: int = Field(
        16_384, ge=1, description="most tensors per request (points x inputs, module state included)"
    )
    max_jacobian_entries: int = Field(100_000_000, ge=1, description="largest Jacobian the engine may check")
    max_evaluations: int = Field(1_000_000, ge=1, description="most finite-difference evaluations per check")
    max_check_seconds: float = Field(120.0, gt=0, description="wall-clock cap of one request")
    max_check_bytes: int = Field(
        1024 * MiB,
        ge=MiB,
        description="memory cap of one check: live bytes of the tensors it creates, counted at every op",
    )
    max_check_bytes_in_flight: int = Field(
        0,
        ge=0,
        description="memory of all checks at once, server-wide: each check not sized up front as small "
        "holds max_check_bytes of it while it runs; one that does not fit gets RESOURCE_EXHAUSTED "
        "(SERVER_BUSY, with RetryInfo); 0: half the memory of the machine or of its cgroup",
    )
    request_body_seconds: float = Field(
        30.0,
        gt=0,
        description="longest wait for the request message of a Check or CheckWithProgress call once it has "
        "begun; a call whose body is still missing then is cancelled, so calls that never send their "
        "body cannot hold the handler threads",
    )
    stream_idle_seconds: float = Field(
        60.0, gt=0, description="a CheckStream with no item running or arriving for this long is closed"
    )
    isolation: Literal["auto", "process", "thread"] = Field(
        "auto",
        description="where checks run: auto (operator functions and checks not sized up front as light in "
        "killable worker processes, light expressions and built-ins in threads), process (everything in "
        "workers) or thread (nothing in workers)",
    )
    kill_after_seconds: float = Field(
        2.0, gt=0, description="a worker process still busy this long after its check's deadline is killed"
    )
    max_external_batch: int = Field(
        256, ge=1, description="most points, cotangents or tangents per request of CheckExternal"
    )
    external_reply_seconds: float = Field(
        30.0, gt=0, description="longest wait for each answer of a CheckExternal client"
    )
    max_expression_length: int = Field(
        2000, ge=1, le=100_000, description="longest expression, in characters"
    )
    functions: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="modules whose public functions clients may check (mypkg.ops)"
    )
    entry_points: bool = Field(True, description="also expose the 'gradcheck_svc.functions' entry points")
    replica_name: str = Field("", description="name reported in Report.served_by; empty: the hostname")
    grace_seconds: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight checks may finish")
    reflection: bool = Field(True, description="serve gRPC server reflection")
    log_level: str = Field("INFO", description="logging level of the server")
    # Transport security and authentication (issue 7). Paths are PEM files.
    tls_cert_file: str = Field("", description="server certificate (PEM); with tls_key_file enables TLS")
    tls_key_file: str = Field("", description="server private key (PEM)")
    tls_client_ca_file: str = Field("", description="CA (PEM) whose client certificates are required (mTLS)")
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="bearer tokens accepted (comma-separated); empty: no authentication"
    )
    insecure: bool = Field(
        False, description="allow listening on a non-loopback address without TLS and without tokens"
    )

    _split_lists = field_validator("functions", "auth_tokens", mode="before")(_split)

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _no_empty_token(cls, value: Any) -> Any:
        # "--auth-tokens ''" (or a stray comma) must not turn authentication into a formality.
        items = _split(value)
        if isinstance(value, str) and not value.strip().startswith("["):
            items = value.split(",")  # unfiltered: "a," has an empty second token
        elif isinstance(value, list | tuple):  # flag values: "--auth-tokens a," likewise
            items = [
                part for item in value for part in (item.split(",") if isinstance(item, str) else [item])
            ]
        # The default empty list means "no authentication"; an empty string given means a mistake.
        empty = isinstance(items, list) and (not items or any(not _secret(t).strip() for t in items))
        if empty and (items or isinstance(value, str)):
            raise ValueError("auth_tokens: an empty token is not a token")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _not_exposed_unprotected(self) -> Settings:
        if not (is_loopback(self.host) or self.tls or self.auth_tokens or self.insecure):
            raise ValueError(
                f"host {self.host!r} is reachable from other machines, and there is neither TLS nor a token: "
                "set tls_cert_file/tls_key_file or auth_tokens, or pass --insecure to serve it unprotected"
            )
        return self

    @property
    def threads(self) -> int:
        return self.worker_threads or self.max_concurrent_checks + 8

    @property
    def calls_per_client(self) -> int:
        return self.max_calls_per_client or max(1, self.threads // 2)

    @property
    def intra_op_threads(self) -> int:
        """torch's thread count for every check: ``torch_threads``, or with 0 a share of the cores
        that keeps ``max_concurrent_checks`` checks from asking for more threads than there are cores."""
        return self.torch_threads or max(1, usable_cores() // self.max_concurrent_checks)

    @property
    def check_bytes_in_flight(self) -> int:
        return self.max_check_bytes_in_flight or usable_memory() // 2

    @property
    def served_by(self) -> str:
        return self.replica_name or socket.gethostname()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)
