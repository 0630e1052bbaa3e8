"""Hardening tests reuse the service tests' servers and operator functions (tests/service)."""

from __future__ import annotations

import sys
from pathlib import Path

SERVICE_TESTS = Path(__file__).resolve().parent.parent / "service"
if str(SERVICE_TESTS) not in sys.path:
    sys.path.insert(0, str(SERVICE_TESTS))

import service_servers  # noqa: E402

service_servers.count_calls_in_this_process()
