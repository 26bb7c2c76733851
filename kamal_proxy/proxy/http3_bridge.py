"""HTTP/3 requests into the proxy pipeline: the thin adapter between two narrow interfaces.

On one side :class:`~kamal_proxy.proxy.http3.H3Request` (method, path, authority, header
bytes, body producer, response sink); on the other the pipeline as it stands: a
``RoutingResource`` rendering a twisted.web ``StreamingRequest`` whose ``channel`` receives
``writeHeaders``/``write``/``requestDone``, exactly as Twisted's ``H2Stream`` is the channel
of an HTTP/2 request.  The request says ``HTTP/3.0`` (request log ``proto``), arrives over
TLS (the HTTPS resource: port, ``https`` scheme, P12), and streams its body through
``request.body_producer`` with QUIC flow control.

What this assumes of the pipeline: it reads ``method``, ``uri``, ``path``, ``clientproto``,
``requestHeaders``, ``body_producer``, ``getClientAddress()``; writes through
``setResponseCode``/``responseHeaders``/``write``/``finish`` and ``registerProducer``; learns
of a client that left through ``notifyFinish`` (``connectionLost``); and aborts with
``request.channel.transport.abortConnection()`` (here a stream reset, never the connection).
HTTP/3 has no upgrades (``101``) and no ``100 Continue`` relay.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from kamal_proxy.proxy.channel import http_date
from kamal_proxy.proxy.http3 import H3Request, RequestAborted
from kamal_proxy.proxy.webrequest import StreamingRequest

#: Fields HTTP/3 forbids in a message (RFC 9114 §4.2); the pipeline may set some of them.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
PROTO = b"HTTP/3.0"


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address("UDP", host, port)
    return IPv4Address("UDP", host, port)


class StreamChannel:
    """The twisted.web channel of one HTTP/3 request (the role ``H2Stream`` plays for h2)."""

    site = None
    factory = None
    disconnecting = False

    def __init__(self, stream: H3Request, host: Any) -> None:
        self.stream = stream
        self.peer = _address(*stream.peer)
        self.host = host
        # Its own transport too: aborting the "connection" resets this request's stream only.
        self.transport = self

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        return self.host

    def isSecure(self) -> bool:
        return True

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        fields: list[tuple[bytes, bytes]] = []
        has_date = False
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower in CONNECTION_SPECIFIC:
                continue
            if lower == b"date":
                has_date = True
            for value in values:
                fields.append((lower, value))
        if not has_date:
            fields.append((b"date", http_date()))
        self.stream.start(int(code), fields)

    def write(self, data: bytes) -> None:
        self.stream.data(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.stream.data(b"".join(iovec))

    def requestDone(self, request: Any) -> None:
        self.stream.end()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.stream.register_producer(producer)

    def unregisterProducer(self) -> None:
        self.stream.unregister_producer()

    def abortConnection(self) -> None:
        self.stream.abort()

    loseConnection = abortConnection


class Http3Bridge:
    """The HTTP/3 server's handler: each request rendered by the HTTPS routing resource."""

    def __init__(self, resource: Any, port: int) -> None:
        self.resource = resource
        self.host = IPv6Address("UDP", "::", port)

    def __call__(self, stream: H3Request) -> None:
        request = StreamingRequest(StreamChannel(stream, self.host))
        request.method = stream.method
        request.uri = stream.path
        request.path = stream.path.split(b"?", 1)[0]
        request.clientproto = PROTO
        request.requestHeaders = _request_headers(stream)
        request.body_producer = stream.body

        def gone(error: RequestAborted) -> None:
            if not request.finished:
                request.connectionLost(Failure(ConnectionLost(str(error))))

        stream.on_gone = gone
        self.resource.render(request)


def _request_headers(stream: H3Request) -> Headers:
    """Twisted headers for the pipeline: ``Host`` from ``:authority``, cookies in one field
    (HTTP/3 may split them, HTTP/1.1 upstreams expect one line, RFC 9114 §4.2.1)."""
    headers = Headers()
    cookies: list[bytes] = []
    host = stream.authority
    for name, value in stream.headers:
        if name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            if not host:
                host = value
        else:
            headers.addRawHeader(name, value)
    if host:
        headers.setRawHeaders(b"host", [host])
    if cookies:
        headers.setRawHeaders(b"cookie", [b"; ".join(cookies)])
    return headers
