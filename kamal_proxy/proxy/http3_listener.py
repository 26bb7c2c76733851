"""The HTTP/3 listener: a UDP socket on the HTTPS port's number, on all interfaces.

The socket is given, not bound here.  A single process gets it from its listening sockets
(``process/listening.py``), so that an upgrade can hand it over.  A worker gets it from the
main process, which binds one UDP socket per worker on the HTTPS port (``SO_REUSEPORT``,
before any privilege drop) and hands the same one to a worker's replacement, so the kernel's
choice of socket for a client never changes while the proxy runs (``proxy/http3.py`` explains
why that keeps QUIC connections on one worker).

Unlike a TCP listener it cannot stop at once: every QUIC connection lives on the one socket.
Stopping sends GOAWAY everywhere, stops accepting handshakes, waits (at most ``deadline``)
until the requests in flight are answered and their connections closed, and only then closes
the port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer

from kamal_proxy.proxy.http3 import Http3Server

#: Matches the proxy's shutdown deadline, plus a moment for the last CONNECTION_CLOSE.
STOP_DEADLINE = 10.5


class Http3Listener(service.Service):
    """HTTP/3 on the UDP socket ``fd``: the descriptor to adopt (closed once adopted), or a
    function that opens it, called in ``privilegedStartService`` (before a privilege drop)."""

    def __init__(
        self,
        reactor: Any,
        fd: int | Callable[[], int],
        server: Http3Server,
        deadline: float = STOP_DEADLINE,
    ) -> None:
        self.reactor = reactor
        self.fd = fd
        self.server = server
        self.deadline = deadline
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if callable(self.fd):
            self.fd = self.fd()

    def startService(self) -> None:
        super().startService()
        fd = self.fd() if callable(self.fd) else self.fd
        self.port = self.reactor.adoptDatagramPort(fd, socket.AF_INET6, self.server.endpoint)
        os.close(fd)

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
