"""A worker's HTTP/3 listener: the UDP socket comes from the main process.

The main process binds one UDP socket per worker on the HTTPS port (``SO_REUSEPORT``, before
any privilege drop) and hands the same one to a worker's replacement, so the kernel's choice
of socket for a client never changes while the proxy runs (``proxy/http3.py`` explains why
that keeps QUIC connections on one worker).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application import service

from kamal_proxy.proxy.http3_listener import Http3Listener


class AdoptedHttp3Listener(Http3Listener):
    """``Http3Listener`` on an inherited UDP socket instead of one it binds; stopping is the
    listener's own (GOAWAY, answer what was received, then close)."""

    def __init__(self, reactor: Any, fd: int, port: int, server: Any) -> None:
        super().__init__(reactor, port, server, on_listen_error=lambda e: e)
        self.fd = fd

    def startService(self) -> None:
        service.Service.startService(self)  # not the parent's: it would bind a socket of its own
        self.port = self.reactor.adoptDatagramPort(self.fd, socket.AF_INET6, self.server.endpoint)
        os.close(self.fd)
