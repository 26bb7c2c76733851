"""The HTTP/3 listener: a UDP port on all interfaces, the same number as the HTTPS port.

Unlike a TCP listener it cannot stop at once: every QUIC connection lives on the one socket.
Stopping sends GOAWAY everywhere, stops accepting handshakes, waits (at most ``deadline``)
until the requests in flight are answered and their connections closed, and only then closes
the port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError

from kamal_proxy.proxy.http3 import Http3Server

#: Matches the proxy's shutdown deadline, plus a moment for the last CONNECTION_CLOSE.
STOP_DEADLINE = 10.5


class Http3Listener(service.Service):
    def __init__(
        self,
        reactor: Any,
        port: int,
        server: Http3Server,
        on_listen_error: Callable[[CannotListenError], Exception],
        deadline: float = STOP_DEADLINE,
    ) -> None:
        self.reactor = reactor
        self.requested_port = port
        self.server = server
        self.on_listen_error = on_listen_error
        self.deadline = deadline
        self.port: Any = None

    @property
    def bound_port(self) -> int:
        return self.port.getHost().port

    def startService(self) -> None:
        super().startService()
        try:
            self.port = self.reactor.listenUDP(
                self.requested_port, self.server.endpoint, interface="::"
            )
        except CannotListenError as e:
            raise self.on_listen_error(e) from None

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        drained = self.server.drain()
        timer = self.reactor.callLater(self.deadline, drained.cancel)
        try:
            await drained
        except defer.CancelledError:
            self.server.close_all()
        finally:
            if timer.active():
                timer.cancel()
        port, self.port = self.port, None
        await defer.maybeDeferred(port.stopListening)
