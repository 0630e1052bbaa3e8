"""Imported once by the worker processes' fork server: the engine is imported and run on a tiny
check there, so every worker forked from it starts warm (tens of milliseconds, not a second).

The fork server also asks for SIGKILL when the server dies (its workers do the same when it dies),
so a SIGKILLed server leaves no process behind.
"""

from gradcheck_svc.server.worker import die_with_parent, warm_up_engine

die_with_parent()
warm_up_engine()
