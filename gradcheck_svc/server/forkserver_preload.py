"""Imported once by the worker processes' fork server: the engine is imported and run on a tiny
check there, so every worker forked from it starts warm (tens of milliseconds, not a second)."""

from gradcheck_svc.server.worker import warm_up_engine

warm_up_engine()
