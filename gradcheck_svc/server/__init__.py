"""The gRPC adapter: request -> engine -> response, with health, reflection, limits and draining.

    from gradcheck_svc.server import create_server
    from gradcheck_svc.settings import Settings

    server, port = create_server(Settings(port=0))
    server.start()
    ...
    server.stop(grace=5)

Modules: ``app`` (build/start/stop, ``serve``), ``service`` (the servicer), ``plan`` (request
validation), ``runner`` (engine calls per point), ``status`` (errors -> codes), ``limiter``
(concurrency slots), ``auth`` (bearer tokens), ``isolation`` and ``worker`` (killable worker
processes for operator functions).
"""

from gradcheck_svc.server.app import GradcheckServer, create_server, serve

__all__ = ["GradcheckServer", "create_server", "serve"]
