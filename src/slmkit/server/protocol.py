"""uvicorn's HTTP/1.1 protocol with a header timeout. uvicorn times out idle keep-alive
connections only after a response, and any byte received cancels that timer, so a client that
opens a connection and sends its request line or headers slowly (or never finishes them) holds a
descriptor for as long as it likes; a thousand such clients hold a thousand. Here every
connection must complete its request's headers within `header_timeout` seconds of connecting (or
of its previous response), else it is closed."""
from __future__ import annotations

from typing import Any

DEFAULT_HEADER_TIMEOUT_S = 10.0


def http_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT_S) -> type:
    """The protocol class for uvicorn.Config(http=...)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request in flight
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete: it is the app's now
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # first: a pipelined request handled below disarms it again
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_options(header_timeout: float = DEFAULT_HEADER_TIMEOUT_S) -> dict[str, Any]:
    """uvicorn.Config / uvicorn.run keywords for slm serve's connection limits."""
    return {"http": http_protocol(header_timeout), "timeout_keep_alive": 5}
