"""The session's connection to a gradcheck-svc server: opened on first use, probed once.

grpc (through ``gradcheck_svc.client``) is imported only here and only when a check first needs the
server. An unreachable server is remembered, so every later check fails at once with the same
message instead of waiting for its own connect timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradcheck_svc.client import Client

__all__ = ["RemoteServer", "ServerUnreachable"]

# Status codes meaning "no server answered", as opposed to "the server refused this check". A deadline
# counts only for the probe: a long check may legitimately run out of time on a live server.
_PROBE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
_CALL_CODES = frozenset({"UNAVAILABLE"})


class ServerUnreachable(Exception):
    """The configured server did not answer; ``str()`` is the message shown to the user."""


class RemoteServer:
    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Client | None = None
        self._registered: frozenset[str] | None = None
        self._down: str | None = None

    def _fail(self, exc: BaseException) -> ServerUnreachable:
        self._down = (
            f"gradcheck server {self.address} is unreachable: {exc}\n"
            "start it, fix --gradcheck-server / gradcheck_server / $GRADCHECK_SERVER, "
            "or run locally with --gradcheck-remote=never"
        )
        return ServerUnreachable(self._down)

    def client(self) -> Client:
        """The connected client; raises ServerUnreachable (promptly, and every time after the first)."""
        if self._down is not None:  # said in full once; later checks get the short form at once
            raise ServerUnreachable(f"gradcheck server {self.address} is unreachable (see the first failure)")
        if self._client is None:
            from gradcheck_svc.client import Client
            from gradcheck_svc.errors import ServiceError

            client = Client(self.address)
            try:
                caps = client.capabilities()  # the probe: fails fast when nobody listens
            except ServiceError as exc:
                client.close()
                if exc.code in _PROBE_CODES:
                    raise self._fail(exc) from None
                raise
            self._registered = frozenset(caps.registered_functions)
            self._client = client
        return self._client

    @property
    def registered(self) -> frozenset[str]:
        """Names of the functions the server registered (connects on first use)."""
        self.client()
        assert self._registered is not None
        return self._registered

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``Client.<method>``, turning transport failures into ServerUnreachable."""
        from gradcheck_svc.errors import ServiceError

        try:
            return getattr(self.client(), method)(*args, **kwargs)
        except ServiceError as exc:
            if exc.code in _CALL_CODES:
                raise self._fail(exc) from None
            raise

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
