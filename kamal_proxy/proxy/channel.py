"""The client-facing HTTP server: a lean HTTP/1.1 connection, and HTTP/2 through ALPN.

``HTTP1Channel`` is a plain ``Protocol``: bytes in, the codec of :mod:`.http1` parses each
request head in one pass (answering broken requests with the Go original's statuses before
anything else sees them), and the pipeline gets an :class:`HTTP1Request` at once, before the
body; the body then streams through ``request.body`` (an ``IBodyProducer``) with flow control
back to the client's socket.  Responses go out as bytes too: the head is held until the first
body bytes (or the end) so that both leave in one send.  No twisted.web ``Request``,
``Headers``, Deferred or timer is made per request.

HTTP/2 stays on Twisted's own stack (``H2Connection`` under a twisted.web ``Site``, imported
when a client first negotiates ``h2``); its requests reach the same pipeline through
:mod:`.webrequest`.  A ``Site`` whose resource is not the pipeline (any twisted.web resource)
is served through the same adapter, so the channel can be exercised on its own.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Server
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.proxy.descriptors import budget, listening_port, socket_number
from kamal_proxy.proxy.http1 import (
    MAX_HEAD_BYTES,
    REASONS,
    ChunkedDecoder,
    HeadError,
    MalformedBody,
    RequestHead,
    check_request_start,
    error_response,
    find_head_end,
    parse_request_head,
    response_status_line,
    too_many_lines,
)
from kamal_proxy.proxy.sockets import idle, send_now, send_parts
from kamal_proxy.proxy.splice import AVAILABLE as SPLICE_AVAILABLE
from kamal_proxy.proxy.splice import MIN_SPLICE, Splice, SpliceError

__all__ = [
    "ClientGone",
    "HTTP1Channel",
    "HTTP1Request",
    "MalformedBody",
    "ProxySite",
    "RequestBody",
    "UNKNOWN_LENGTH",
    "host_and_port",
    "http_date",
    "make_site",
]


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


# Go: maxPostHandlerReadBytes, what is read of an unconsumed body to keep the connection.
DISCARD_BUDGET = 256 << 10
# Body bytes held before startProducing (or while the consumer is paused) before pausing reads.
BODY_BUFFER_LIMIT = 64 << 10
# Pipelined bytes held while a response is pending before pausing reads (Twisted's figure).
PIPELINE_BUFFER_LIMIT = 16 << 10
# Go's closeWriteAndWait: how long a half-closed connection lingers before it is closed.
LINGER_SECONDS = 0.5
# Bytes read per wake-up while a large request body streams (Twisted reads 64 KiB): a quarter
# of the wake-ups, allocations and sends per MiB uploaded (measured: a third less CPU per GiB).
BODY_READ_SIZE = 256 << 10

# Reasons to stop reading from the client socket (a bit each; read again when all clear).
_P_BODY = 1  # body buffer full or the body consumer paused us
_P_PIPE = 2  # pipelined bytes piled up behind a pending response
_P_WRITE = 4  # client does not read its responses
_P_SPLICE = 8  # a response body goes to the socket by splice (proxy/splice.py)

_CONNECTION_DONE = Failure(ConnectionDone())
_READ_SIZE = FileDescriptor.bufferSize  # Twisted's read size (64 KiB)
# Statuses whose responses never have a body (framing headers are not added for them).
_NO_BODY = frozenset((204, 304))

_DAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS = (b"", b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun")
_MONTHS += (b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
_date_cache: list[Any] = [0, b""]


def host_and_port(address: Any) -> tuple[str, str]:
    """A client's address as the request log and ``X-Forwarded-For`` give it: an IPv4-mapped
    IPv6 host as the IPv4 one, the port as text (``""`` when there is none)."""
    host = getattr(address, "host", None) or ""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    port = getattr(address, "port", None)
    return host, "" if port is None else str(port)


def http_date(seconds: float | None = None) -> bytes:
    """An HTTP date (``Mon, 02 Jan 2006 15:04:05 GMT``); the current one is made once a second."""
    now = int(time.time() if seconds is None else seconds)
    if seconds is None and now == _date_cache[0]:
        return _date_cache[1]
    t = time.gmtime(now)
    value = b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday],
        t.tm_mday,
        _MONTHS[t.tm_mon],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )
    if seconds is None:
        _date_cache[0] = now
        _date_cache[1] = value
    return value


def _head_lines(parts: list[bytes], headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")


# --------------------------------------------------------------------------------------------
# Request bodies


@implementer(IBodyProducer)
class RequestBody:
    """The streaming body of an HTTP/1.x request, fed by the channel as bytes arrive.

    Bytes that arrive before ``startProducing`` (or while the consumer is paused) are held
    in a small buffer; past ``BODY_BUFFER_LIMIT`` the client's socket is paused, so an upload
    of any size streams with flat memory.  ``start(consumer, on_end)`` is the same without a
    Deferred: ``on_end(None)`` when complete, ``on_end(error)`` when it cannot complete.
    """

    __slots__ = (
        "length",
        "_channel",
        "_consumer",
        "_on_end",
        "_d",
        "_buf",
        "_buffered",
        "_done",
        "_error",
        "_paused",
        "_stopped",
    )

    def __init__(self, channel: HTTP1Channel, length: Any) -> None:
        self.length = length
        self._channel: HTTP1Channel | None = channel
        self._consumer: Any = None
        self._on_end: Callable[[Exception | None], object] | None = None
        self._d: Deferred[None] | None = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: Exception | None = None
        self._paused = False
        self._stopped = False

    # IBodyProducer

    def startProducing(self, consumer: Any) -> Deferred[None]:
        if self._consumer is not None or self._stopped:
            raise RuntimeError("request body can be produced only once")
        if self._error is not None and not self._buf:
            self._consumer = consumer
            return fail(self._error)
        d: Deferred[None] = Deferred()
        self._d = d
        self.start(consumer, None)
        return d

    def start(self, consumer: Any, on_end: Callable[[Exception | None], object] | None) -> None:
        """Start writing to ``consumer``; ``on_end`` as in the class docstring."""
        if self._consumer is not None or self._stopped:
            raise RuntimeError("request body can be produced only once")
        self._consumer = consumer
        self._on_end = on_end
        channel = self._channel
        if channel is not None and not self._done:
            channel._body_started()
        self._flush()

    def pauseProducing(self) -> None:
        if self._paused or self._stopped:
            return
        self._paused = True
        channel = self._channel
        if channel is not None and not self._done:
            channel._pause(_P_BODY)

    def resumeProducing(self) -> None:
        if not self._paused or self._stopped:
            return
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        """Discard the rest of the body; the ``startProducing`` Deferred never fires."""
        if self._stopped:
            return
        self._stopped = True
        self._consumer = None
        self._d = None
        self._on_end = None
        self._buf = []
        self._buffered = 0
        channel = self._channel
        self._channel = None
        if channel is not None and not self._done:
            channel._body_stopped()

    def splice_to(self, transport: Any, started: Callable[[], object]) -> None:
        """Offer to move the rest of the body to ``transport`` (the upstream's TCP transport,
        nothing queued) kernel to kernel (``proxy/splice.py``); ``started()`` is called if
        and when bytes go that way.  The body still ends through ``start``'s ``on_end``."""
        channel = self._channel
        if channel is not None and not self._done and not self._stopped:
            channel._offer_splice(transport, started)

    # Fed by the channel

    def _deliver(self, data: bytes) -> None:
        if self._stopped:
            return
        consumer = self._consumer
        if consumer is not None and not self._paused and not self._buf:
            consumer.write(data)
            return
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_BUFFER_LIMIT and self._channel is not None:
            self._channel._pause(_P_BODY)

    def _finish(self) -> None:
        self._done = True
        self._channel = None
        if self._consumer is not None and not self._buf:
            self._end(None)

    def _fail(self, error: Exception) -> None:
        """The body cannot complete: the client left or sent a malformed chunked body."""
        if self._done or self._stopped:
            return
        self._done = True
        self._channel = None
        self._error = error
        self._buf = []
        self._buffered = 0
        if self._consumer is not None:
            self._end(error)

    def _abandon(self) -> None:
        """The response is complete before the body: stop feeding the consumer quietly."""
        self._stopped = True
        self._channel = None
        self._consumer = None
        self._d = None
        self._on_end = None
        self._buf = []

    def _end(self, error: Exception | None) -> None:
        # The consumer (the upstream exchange) holds this body: drop it, no cycle is left.
        self._consumer = None
        self._stopped = True
        d, self._d = self._d, None
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(error)
        if d is not None:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)

    def _flush(self) -> None:
        consumer = self._consumer
        buf = self._buf
        while buf and not self._paused and not self._stopped:
            chunk = buf.pop(0)
            self._buffered -= len(chunk)
            consumer.write(chunk)
        if self._stopped or self._paused or buf:
            return
        if self._done:
            self._end(self._error)
        elif self._channel is not None:
            self._channel._resume(_P_BODY)


# --------------------------------------------------------------------------------------------
# Requests


class HTTP1Request(RequestHead):
    """One HTTP/1.x request as the pipeline sees it (see ``resource.ProxyExchange``).

    The parsed head (:class:`~.http1.RequestHead`) plus the response side: ``respond`` for a
    whole response at once, or ``start_response``, ``write`` and ``finish``; ``abort`` drops
    the connection.  Framing (``Content-Length``, chunked, ``Connection: close``) is added
    here.  ``exchange.client_gone()`` is called when the client leaves before the end.
    """

    __slots__ = (
        "conn",
        "exchange",
        "body",
        "started",
        "finished",
        "_chunked",
        "_no_body",
    )

    def __init__(self, conn: HTTP1Channel) -> None:
        self.conn = conn
        self.exchange: Any = None
        self.body: RequestBody | None = None
        self.started = False
        self.finished = False
        self._chunked = False
        self._no_body = False

    @property
    def secure(self) -> bool:
        return self.conn.is_secure()

    def client_address(self) -> tuple[str, str]:
        """(IP, port) of the peer; IPv4 peers of the dual-stack listener lose ``::ffff:``."""
        return self.conn.peer_address()

    # -- the response ----------------------------------------------------------------------

    def respond(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        reason: bytes | None = None,
        close: bool = False,
    ) -> None:
        """The whole response in one send: status, ``headers`` (no framing), ``Date``,
        ``Content-Length`` and ``body`` (none for HEAD); ``close`` ends the connection after."""
        if self.started or self.finished:
            return
        conn = self.conn
        if close:
            conn._persistent = False
        parts = [response_status_line(self.http11, status, reason)]
        _head_lines(parts, headers)
        if conn.site.alt_svc is not None:
            parts += (b"Alt-Svc: ", conn.site.alt_svc, b"\r\n")
        parts += (b"Date: ", http_date(), b"\r\nContent-Length: %d\r\n" % len(body))
        self.started = True
        conn._head_written()
        if not conn._persistent and self.http11:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if body and self.method != b"HEAD":
            parts.append(body)
        conn._send(b"".join(parts))
        self.finish()

    def start_response(
        self,
        status: int,
        reason: bytes | None,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        """The head of a streamed response; held until the first ``write`` or ``finish``.

        ``headers`` carry no framing: ``length`` gives ``Content-Length``, else HTTP/1.1
        clients get chunked and HTTP/1.0 clients a close-delimited body.
        """
        if self.started or self.finished:
            return
        conn = self.conn
        parts = [response_status_line(self.http11, status, reason)]
        _head_lines(parts, headers)
        if conn.site.alt_svc is not None:
            parts += (b"Alt-Svc: ", conn.site.alt_svc, b"\r\n")
        no_body = self.method == b"HEAD" or status in _NO_BODY or status < 200
        self._no_body = no_body
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif not no_body:
            if self.http11:
                self._chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                conn._persistent = False
        self.started = True
        conn._head_written()
        if not conn._persistent and self.http11:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        conn._pending_head = b"".join(parts)

    def write(self, data: bytes) -> None:
        if self.finished or not data or self._no_body:
            return
        conn = self.conn
        if conn._req is not self:
            return
        head = conn._pending_head
        if self._chunked:
            parts = [b"%x\r\n" % len(data), data, b"\r\n"]
            if head is not None:
                conn._pending_head = None
                parts.insert(0, head)
            conn._send_parts(parts)
        elif head is not None:
            conn._pending_head = None
            conn._send_parts([head, data])
        else:
            conn._send(data)

    def finish(self) -> None:
        """End the response (the next pipelined request may start)."""
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if conn._req is not self:
            return
        head = conn._pending_head
        if self._chunked:
            conn._pending_head = None
            conn._send(head + b"0\r\n\r\n" if head is not None else b"0\r\n\r\n")
        elif head is not None:
            conn._pending_head = None
            conn._send(head)
        conn._response_done(self)

    def abort(self) -> None:
        """Drop the client connection (a response that cannot be completed)."""
        self.finished = True
        transport = self.conn.transport
        if transport is not None:
            transport.abortConnection()

    def informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A 1xx interim response (e.g. 103 Early Hints) before the final one."""
        if self.started or self.finished or not self.http11 or self.conn._req is not self:
            return
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Informational"))]
        _head_lines(parts, headers)
        parts.append(b"\r\n")
        self.conn.transport.write(b"".join(parts))

    def switch_protocols(self, headers: list[tuple[bytes, bytes]], tunnel: Any) -> bool:
        """Write the ``101`` head and hand the connection to ``tunnel`` (``Tunnel.attach``)."""
        conn = self.conn
        if self.started or conn._req is not self or conn._dead:
            return False
        self.started = True
        parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        _head_lines(parts, headers)
        if conn.site.alt_svc is not None:
            parts += (b"Alt-Svc: ", conn.site.alt_svc, b"\r\n")
        parts.append(b"\r\n")
        transport = conn.transport
        transport.writeSequence(parts)
        conn._take_over(tunnel.attach(transport))
        return True

    def splice_destination(self) -> Any:
        """The client's TCP transport for a body spliced into it (see ``proxy/splice.py``):
        the head is sent first, nothing may be queued or written until ``end_splice``.  None
        when the body must go through ``write`` (TLS, chunked, HEAD, queued bytes)."""
        conn = self.conn
        transport = conn.transport
        if (
            conn._req is not self
            or conn._dead
            or self._chunked
            or self._no_body
            or type(transport) is not Server
        ):
            return None
        head = conn._pending_head
        if head is not None:
            conn._pending_head = None
            conn._send(head)
        if not idle(transport):
            return None
        return transport

    def register_producer(self, producer: Any) -> None:
        """``producer`` (pause/resume) feeds the response body: paused while the client does
        not read."""
        conn = self.conn
        if conn._req is not self or conn._dead:
            producer.stopProducing()
            return
        conn._response_producer = producer
        if conn._waiting_for_transport:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        conn = self.conn
        if conn._req is self:
            conn._response_producer = None


# --------------------------------------------------------------------------------------------
# The channel


class HTTP1Channel(Protocol):
    """A strict HTTP/1.1 server connection (SPEC §4.3) handing requests over at end of head.

    One request is handled at a time (pipelined requests wait, in order); the request body is
    decoded here and pushed into the request's ``RequestBody``.
    """

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        self.handler = site.handler
        self.callLater = site.reactor.callLater
        self._pending_head: bytes | None = None
        self._buf = b""
        self._scan_from = 0
        self._counted = 0
        self._newlines = 0
        self._line_checked = False
        self._req: HTTP1Request | None = None
        self._persistent = True
        self._looping = False
        self._dead = False  # input is ignored from now on
        self._paused = 0
        self._waiting_for_transport = False
        self._response_producer: Any = None
        # Body being read for the current (or just answered) request.
        self._in_body = False
        self._remaining = 0
        self._chunked: ChunkedDecoder | None = None
        self._body: RequestBody | None = None
        self._discard_left = -1  # >= 0: discarding an unconsumed body with this budget
        self._expect_continue = False
        self._upgrade: IProtocol | None = None
        self._splice: Splice | None = None  # the request body, kernel to kernel
        self._splice_offer: tuple[Any, Callable[[], object]] | None = None
        self._linger: Any = None
        self._peer: tuple[str, str] | None = None
        self._secure: bool | None = None
        self._budgeted = False  # counted in the descriptor budget
        self._starved = False  # over it: the first request is answered 503

    @property
    def _channel(self) -> HTTP1Channel:
        """This connection's HTTP/1 channel (itself; a TLS connection's selector has one)."""
        return self

    # -- connection lifecycle --------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        # The transport tells us (pauseProducing) when the client stops reading.
        transport.registerProducer(self, True)
        self.site.connections.add(self)
        self._budgeted = True
        number = socket_number(transport)
        port = listening_port(transport)
        if not budget.admit(number):
            self._starved = True
            budget.hold(port, self.callLater)
        elif budget.crowded(number, getattr(port, "numberAccepts", 0)):
            # Served, but a next batch of clients would run out: they wait in the backlog.
            budget.hold(port, self.callLater)

    def _release(self) -> None:
        if self._budgeted:
            self._budgeted = False
            budget.release()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._dead = True
        self.site.connections.discard(self)
        self._release()
        self._stop_splice()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        upgrade = self._upgrade
        if upgrade is not None:
            upgrade.connectionLost(reason)
            return
        req = self._req
        self._req = None
        if req is not None and not req.finished:
            req.finished = True
            exchange = req.exchange
            if exchange is not None:
                exchange.client_gone()
        body = self._body
        self._body = None
        if body is not None:
            body._fail(ClientGone("client disconnected"))

    def detach(self) -> None:
        """The connection is handed to another protocol (ALPN chose HTTP/2)."""
        self._dead = True
        self.site.connections.discard(self)
        self._release()
        self.transport.unregisterProducer()

    def peer_address(self) -> tuple[str, str]:
        peer = self._peer
        if peer is None:
            peer = self._peer = host_and_port(self.transport.getPeer())
        return peer

    def is_secure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = ISSLTransport(self.transport, None) is not None
        return secure

    # -- reading ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        upgrade = self._upgrade
        if upgrade is not None:
            upgrade.dataReceived(data)
            return
        if self._dead:
            return
        if self._buf:
            self._buf += data
        else:
            self._buf = data
        if not self._looping:
            self._loop()

    def _loop(self) -> None:
        """Consume ``_buf``: body bytes, then the next request head once the previous
        response is done.  Re-entrant calls (a response finishing synchronously) return."""
        self._looping = True
        try:
            while self._buf and not self._dead and self._upgrade is None:
                if self._in_body:
                    self._read_body()
                elif self._req is not None:
                    if len(self._buf) > PIPELINE_BUFFER_LIMIT:
                        self._pause(_P_PIPE)
                    break
                elif not self._read_head():
                    break
        except HeadError as refused:
            self._reject(refused.status, refused.detail)
        finally:
            self._looping = False

    def _read_head(self) -> bool:
        """Parse one request head from ``_buf`` and hand it over. False: need more bytes."""
        buf = self._buf
        if buf[0] == 13 or buf[0] == 10:  # blank lines between requests (Go: after a POST)
            buf = self._buf = buf.lstrip(b"\r\n")
            self._scan_from = self._counted = self._newlines = 0
            if not buf:
                return False
        found = find_head_end(buf, self._scan_from)
        if found is None:
            size = len(buf)
            if size > MAX_HEAD_BYTES:
                raise HeadError(431)
            # Counted as it arrives, so a flood of short header lines is refused at once.
            self._newlines += buf.count(b"\n", self._counted)
            self._counted = size
            if too_many_lines(self._newlines):
                raise HeadError(431, "too many header lines")
            self._scan_from = size - 2 if size > 2 else 0
            if not self._line_checked:
                check_request_start(buf)
                self._line_checked = 10 in buf  # the request line is complete and valid
            return False
        end, after = found
        if after > MAX_HEAD_BYTES:
            raise HeadError(431)
        self._buf = buf[after:] if after < len(buf) else b""
        self._scan_from = self._counted = self._newlines = 0
        self._line_checked = False
        req = parse_request_head(buf[:end], HTTP1Request(self))
        self._start(req)
        return True

    def _start(self, req: HTTP1Request) -> None:
        if self._starved:
            # Near the open-files limit: no upstream connection for this client (descriptors).
            self._reject(503, "")
            return
        self._persistent = req.keep_alive
        self._req = req
        length = req.length
        if length:
            if length < 0 or length > BODY_BUFFER_LIMIT:
                self._read_size(BODY_READ_SIZE)
            body = RequestBody(self, UNKNOWN_LENGTH if length < 0 else length)
            req.body = body
            self._body = body
            self._in_body = True
            self._discard_left = -1
            if length < 0:
                self._chunked = ChunkedDecoder(strict=True)
            else:
                self._remaining = length
            self._expect_continue = req.expect_continue
        if req.asterisk and req.method == b"OPTIONS":
            # Go's net/http answers `OPTIONS *` itself, before any handler (no Alt-Svc).
            req.started = req.finished = True
            self._head_written()
            close = b"Connection: close\r\n" if not self._persistent and req.http11 else b""
            self._send(
                b"%s 200 OK\r\nContent-Length: 0\r\nDate: %s\r\n%s\r\n"
                % (b"HTTP/1.1" if req.http11 else b"HTTP/1.0", http_date(), close)
            )
            self._response_done(req)
            return
        self.handler(req)

    def _read_body(self) -> None:
        data = self._buf
        self._buf = b""
        decoder = self._chunked
        if decoder is None:
            remaining = self._remaining
            if len(data) > remaining:
                self._buf = data[remaining:]
                data = data[:remaining]
            remaining -= len(data)
            self._remaining = remaining
            self._sink(data)
            if not remaining:
                self._body_complete()
            elif self._splice_offer is not None and not self._buf:
                self._start_splice()
            return
        out: list[bytes] = []
        try:
            rest = decoder.feed(data, out)
        except MalformedBody as error:
            for chunk in out:
                self._sink(chunk)
            self._body_malformed(error)
            return
        for chunk in out:
            self._sink(chunk)
            if self._dead:
                return
        if rest is not None:
            self._buf = rest
            self._body_complete()

    def _sink(self, data: bytes) -> None:
        if self._discard_left >= 0:
            self._discard_left -= len(data)
            if self._discard_left < 0:
                self._close_softly()
            return
        body = self._body
        if body is not None:
            body._deliver(data)

    # -- request bodies kernel to kernel ---------------------------------------------------

    def _offer_splice(self, transport: Any, started: Callable[[], object]) -> None:
        if (
            self._in_body
            and self._chunked is None
            and self._discard_left < 0
            and self._remaining >= MIN_SPLICE
            and type(self.transport) is Server
            and SPLICE_AVAILABLE
        ):
            self._splice_offer = (transport, started)
            if not self._buf and not self._looping:
                self._start_splice()

    def _start_splice(self) -> None:
        """Once the bytes already read are delivered, splice the rest of the body upstream."""
        body = self._body
        offer = self._splice_offer
        if offer is None or body is None or body._buf or body._paused or self._dead:
            return
        destination, started = offer
        if self._remaining < MIN_SPLICE or not idle(destination):
            return
        self._splice_offer = None
        self._pause(_P_SPLICE)
        reactor = self.site.reactor
        self._splice = Splice(reactor, self.transport, destination, self._remaining, self._spliced)
        started()
        self._splice.start()

    def _spliced(self, error: BaseException | None) -> None:
        splice, self._splice = self._splice, None
        if splice is None:
            return
        self._remaining = splice.remaining
        self._resume(_P_SPLICE)
        if error is None:
            self._body_complete()
            return
        body = self._body
        if isinstance(error, SpliceError) and error.side == "source":
            if body is not None:
                self._body = None
                body._fail(ClientGone(f"client: {error}"))
            self.transport.abortConnection()
        else:  # writing upstream failed: the exchange fails (502), this connection closes
            self._persistent = False
            if body is not None:
                self._body = None
                body._fail(ConnectionError(f"writing the request body upstream: {error}"))

    def _stop_splice(self) -> None:
        """The body is no longer wanted (or the connection is gone): stop moving it; what
        the client still has to send is ``_remaining``."""
        self._splice_offer = None
        splice, self._splice = self._splice, None
        if splice is not None:
            splice.stop()
            self._remaining = splice.remaining
            self._resume(_P_SPLICE)

    def _read_size(self, size: int) -> None:
        """Bytes per read of the client's socket (a TCP transport's ``bufferSize``)."""
        transport = self.transport
        if ITCPTransport.providedBy(transport) and transport.bufferSize != size:
            transport.bufferSize = size

    def _body_complete(self) -> None:
        self._in_body = False
        self._chunked = None
        self._read_size(_READ_SIZE)
        self._resume(_P_BODY)
        body = self._body
        self._body = None
        discarding = self._discard_left >= 0
        self._discard_left = -1
        if body is not None:
            body._finish()
        if discarding and self._req is None:
            self._next_request()

    def _body_malformed(self, error: MalformedBody) -> None:
        """Nothing after a broken chunked body can be parsed: answer, then close."""
        self._in_body = False
        self._chunked = None
        self._read_size(_READ_SIZE)
        self._persistent = False
        self._dead = True
        self._buf = b""
        self._resume(_P_BODY)
        body = self._body
        self._body = None
        discarding = self._discard_left >= 0
        self._discard_left = -1
        if body is not None:
            body._fail(error)
        if discarding and self._req is None:
            self._close_softly()

    # -- writing ---------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        send_now(self.transport, data)

    def _send_parts(self, parts: list[bytes]) -> None:
        send_parts(self.transport, parts)

    def _head_written(self) -> None:
        """The response starts: decide whether the connection survives an unread body
        (Go: close when a 100-continue was never sent or much body remains)."""
        if self._in_body and self._req is not None:
            body = self._body
            started = body is not None and body._consumer is not None
            if self._expect_continue and not started:
                self._persistent = False
            elif not started and self._chunked is None and self._remaining > DISCARD_BUDGET:
                self._persistent = False

    def _response_done(self, req: HTTP1Request) -> None:
        if req is not self._req:
            return
        self._req = None
        self._response_producer = None
        if self._in_body:
            self._stop_splice()
            body = self._body
            self._body = None
            if body is not None:
                body._abandon()
            if not self._persistent:
                self._close_softly()
                return
            if self._chunked is None and self._remaining > DISCARD_BUDGET:
                self._close_softly()
                return
            if self._discard_left < 0:
                self._discard_left = DISCARD_BUDGET
            self._resume(_P_BODY)
            return
        self._next_request()

    def _next_request(self) -> None:
        if self._linger is not None or self._upgrade is not None:
            return
        if self._dead:  # e.g. after a malformed chunked body: unread input may follow
            self._close_softly()
            return
        if not self._persistent:
            self._close()
            return
        if self._waiting_for_transport:
            self._pause(_P_WRITE)
        if self._paused & _P_PIPE:
            self._resume(_P_PIPE)
        if self._buf and not self._looping:
            self._loop()

    # -- flow control ----------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused:
            self.transport.pauseProducing()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._dead:
                self.transport.resumeProducing()

    def _body_started(self) -> None:
        if self._expect_continue:
            self._expect_continue = False
            req = self._req
            if req is not None and not req.started:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body_stopped(self) -> None:
        """The consumer gave up on the body: like Go after an early ``Body.Close``, leave the
        rest unread and close the connection after the response."""
        self._stop_splice()
        self._persistent = False
        self._body = None
        self._pause(_P_BODY)

    # IPushProducer, registered with the transport: the client's socket buffer is full.

    def pauseProducing(self) -> None:
        self._waiting_for_transport = True
        producer = self._response_producer
        if producer is not None:
            producer.pauseProducing()
        if self._req is None:
            self._pause(_P_WRITE)

    def resumeProducing(self) -> None:
        self._waiting_for_transport = False
        producer = self._response_producer
        if producer is not None:
            producer.resumeProducing()
        self._resume(_P_WRITE)

    def stopProducing(self) -> None:
        pass

    # -- closing ---------------------------------------------------------------------------

    def _reject(self, status: int, detail: str) -> None:
        """A request the parser refuses never reaches the pipeline (SPEC §4.3)."""
        self._persistent = False
        self.transport.write(error_response(status, detail))
        self._close_softly()

    def _close(self) -> None:
        self._persistent = False
        self._dead = True
        self._buf = b""
        # A TLS transport closes only once its producer is gone (TLSMemoryBIOProtocol waits
        # for unregisterProducer); TCP closes either way.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def close_when_idle(self) -> None:
        """Shutdown: close now between requests, else right after the current response."""
        self._persistent = False
        if self._req is None and self._upgrade is None and not self._dead:
            self._close()

    def _close_softly(self) -> None:
        """Close without losing the response to a TCP reset caused by unread input: like Go's
        closeWriteAndWait, half-close, keep reading (and dropping) briefly, then close."""
        if self._linger is not None:
            return
        self._persistent = False
        self._dead = True
        self._buf = b""
        transport = self.transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None or not ITCPTransport.providedBy(transport):
            transport.loseConnection()
            return
        transport.unregisterProducer()
        half_close()
        self._paused = 0
        transport.resumeProducing()
        self._linger = self.callLater(LINGER_SECONDS, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger = None
        self.transport.loseConnection()

    # -- upgrades --------------------------------------------------------------------------

    def _take_over(self, protocol: IProtocol) -> None:
        """Hand the raw connection to ``protocol`` (after a ``101``): bytes already read
        after the request head first, later ones and ``connectionLost`` as they come."""
        self._upgrade = protocol
        self._dead = True
        self.site.connections.discard(self)
        if self._in_body:
            self._in_body = False
            body = self._body
            self._body = None
            if body is not None:
                body._abandon()
        rest = self._buf
        self._buf = b""
        if self._paused:
            self._paused = 0
            self.transport.resumeProducing()
        if getattr(protocol, "transport", None) is None:
            protocol.makeConnection(self.transport)
        if rest:
            protocol.dataReceived(rest)


# --------------------------------------------------------------------------------------------
# Site


class _ProtocolSelector(Protocol):
    """A TLS connection: HTTP/1.x through ``HTTP1Channel``, or Twisted's HTTP/2 when ALPN
    selected ``h2`` (decided at the first bytes, when the handshake is done)."""

    def __init__(self, site: ProxySite, channel: HTTP1Channel, addr: Any) -> None:
        self.site = site
        self._channel = channel
        self._addr = addr

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._channel.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        transport = self.transport
        protocol = getattr(transport, "negotiatedProtocol", None)
        if protocol == b"h2":
            self._channel.detach()
            h2 = self.site.h2_protocol(self._addr)
            self._channel = h2
            h2.makeConnection(transport)
        # Decided once per connection: later bytes go straight to the chosen protocol.
        self.dataReceived = self._channel.dataReceived  # type: ignore[method-assign]
        self.connectionLost = self._channel.connectionLost  # type: ignore[method-assign]
        self._channel.dataReceived(data)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._channel.connectionLost(reason)


class ProxySite(Factory):
    """The factory of the HTTP and HTTPS listeners.

    ``resource`` is the pipeline (``resource.RoutingResource``: its ``handle`` takes every
    HTTP/1 request; its ``render`` the HTTP/2 ones), or any twisted.web resource, rendered
    through :mod:`.webrequest`.  No access log, no idle timeout (as the Go original).
    """

    noisy = False

    def __init__(self, resource: Any, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.resource = resource
        self.reactor = reactor
        handle = getattr(resource, "handle", None)
        if handle is None:
            from kamal_proxy.proxy.webrequest import ResourceHandler

            handle = ResourceHandler(resource)
        self.handler: Callable[[HTTP1Request], object] = handle
        self.secure = bool(getattr(resource, "secure", False))
        self.connections: set[HTTP1Channel] = set()
        #: The ``Alt-Svc`` value of every response (the TCP HTTPS listener with --http3).
        self.alt_svc: bytes | None = None
        self._web_site: Any = None
        self._request_factory: Any = None

    def startFactory(self) -> None:
        """The listener opens: what exists now (modules, routing state) lives as long as the
        process, so the cyclic GC need not scan it again (gc.freeze; a full collection
        otherwise walks some 60,000 start-up objects, a 15 ms pause).  The open-files limit
        is read again too (it was raised at start): clients are admitted against it."""
        gc.freeze()
        budget.refresh()

    def buildProtocol(self, addr: Any) -> Protocol:
        channel = HTTP1Channel(self)
        if self.secure:
            return _ProtocolSelector(self, channel, addr)
        return channel

    def advertise_http3(self, port: int) -> None:
        """``--http3``: every response of this TCP listener says ``Alt-Svc: h3`` (SPEC P1),
        HTTP/1.1 through the channel, HTTP/2 through its twisted.web request class."""
        from kamal_proxy.proxy.alt_svc import alt_svc_request, alt_svc_value

        self.alt_svc = alt_svc_value(port)
        self._request_factory = alt_svc_request(port)

    def h2_protocol(self, addr: Any) -> Protocol:
        """Twisted's HTTP/2 connection for ``addr`` (twisted.web is imported on first use)."""
        site = self._web_site
        if site is None:
            from kamal_proxy.proxy.webrequest import web_site

            site = web_site(self.resource, self.reactor, self._request_factory)
            self._web_site = site
        return site.buildProtocol(addr)

    def close_idle(self) -> None:
        """Shutdown: close HTTP/1.x connections between requests now, and the others right
        after their current response (Go's ``Server.Shutdown``).  HTTP/2 connections are
        left to finish their streams."""
        for channel in list(self.connections):
            channel.close_when_idle()


def make_site(resource: Any, reactor: Any = None) -> ProxySite:
    """The factory for the HTTP and HTTPS listeners: ``resource`` serves every request."""
    return ProxySite(resource, reactor=reactor)
