"""An HTTP/3 listener on a UDP socket it is given rather than one it binds.

A single process gets it from its listening sockets (``process/listening.py``), so that an
upgrade can hand it over.  A worker gets it from the main process, which binds one UDP socket
per worker on the HTTPS port (``SO_REUSEPORT``, before any privilege drop) and hands the same
one to a worker's replacement, so the kernel's choice of socket for a client never changes
while the proxy runs (``proxy/http3.py`` explains why that keeps QUIC connections on one
worker).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.application import service

from kamal_proxy.proxy.http3_listener import Http3Listener


class AdoptedHttp3Listener(Http3Listener):
    """``Http3Listener`` on a UDP socket it is given instead of one it binds; stopping is the
    listener's own (GOAWAY, answer what was received, then close).

    ``fd`` is the descriptor to adopt (it is closed after), or a function that opens it (in
    ``privilegedStartService``, before a privilege drop: the single process's socket from
    ``process/listening.py``, which an upgrade hands over)."""

    def __init__(self, reactor: Any, fd: int | Callable[[], int], port: int, server: Any) -> None:
        super().__init__(reactor, port, server, on_listen_error=lambda e: e)
        self.fd = fd

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        if callable(self.fd):
            self.fd = self.fd()

    def startService(self) -> None:
        service.Service.startService(self)  # not the parent's: it would bind a socket of its own
        fd = self.fd() if callable(self.fd) else self.fd
        self.port = self.reactor.adoptDatagramPort(fd, socket.AF_INET6, self.server.endpoint)
        os.close(fd)
