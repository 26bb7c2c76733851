"""Send small writes at once instead of on the next reactor turn.

Twisted queues every ``transport.write`` until the reactor's next turn: two ``epoll_ctl``
calls and a wake-up per response.  When nothing is queued before the data, sending it at once
is safe and keeps the order; this is the single biggest saving per request on both sides of
the proxy.  It reads private attributes of Twisted's TCP transports, so it applies only to
those exact types and falls back to ``write`` for anything else (TLS, tests' fakes), on a
partial send and on errors (the normal path then reports them).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Client, Server

_DIRECT = (Client, Server)


def write_now(t: Any, data: bytes) -> None:
    if (
        type(t) in _DIRECT
        and not t._tempDataLen
        and t.offset == len(t.dataBuffer)
        and t.connected
        and not t.disconnecting
        and not t._writeDisconnected
    ):
        try:
            sent = t.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    t.write(data)
