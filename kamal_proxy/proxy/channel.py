"""The client-facing HTTP server: a strict, lean HTTP/1.1 channel plus HTTP/2 via ALPN.

Stock ``twisted.web`` renders a request only after its whole body has arrived (buffered in
``request.content``) and is lenient in ways a proxy cannot afford (request smuggling, SPEC §4.3).
``ProxyChannel`` parses each request head in one pass, answers broken requests with the Go
original's statuses before anything else sees them, and starts rendering as soon as the head is
complete; the body is then streamed through ``request.body_producer`` (an ``IBodyProducer``)
with flow control back to the client's socket.

HTTP/2 is Twisted's own ``H2Connection``: there the body has fully arrived before ``render``,
and ``body_producer`` replays ``request.content``, so the resource code is the same for both.
"""

from __future__ import annotations

import re
import time
import weakref
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IPushProducer, ISSLTransport, ITCPTransport
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.proxy.sockets import write_now

__all__ = [
    "ClientGone",
    "MalformedBody",
    "ProxyChannel",
    "ProxySite",
    "RequestBody",
    "StreamingRequest",
    "UNKNOWN_LENGTH",
    "make_site",
]


class MalformedBody(Exception):
    """The chunked request body is malformed (the pipeline answers 400, SPEC §4.3)."""


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


# Go: http.DefaultMaxHeaderBytes plus the 4 KiB slack of its bufio limit.
MAX_HEAD_BYTES = (1 << 20) + 4096
# Go: maxPostHandlerReadBytes, what is read of an unconsumed body to keep the connection.
DISCARD_BUDGET = 256 << 10
# Body bytes held before startProducing (or while the consumer is paused) before pausing reads.
BODY_BUFFER_LIMIT = 64 << 10
# Pipelined bytes held while a response is pending before pausing reads (Twisted's figure).
PIPELINE_BUFFER_LIMIT = 16 << 10
# Go's closeWriteAndWait: how long a half-closed connection lingers before it is closed.
LINGER_SECONDS = 0.5
MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 64 << 10

# Reasons to stop reading from the client socket (a bit each; read again when all clear).
_P_BODY = 1  # body buffer full or the body consumer paused us
_P_PIPE = 2  # pipelined bytes piled up behind a pending response
_P_WRITE = 4  # client does not read its responses

_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# httpguts.ValidHostHeader's byte set.
_HOST_BYTES = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!$%&'()*+,-.:;=[]_~"
# CTL bytes other than HTAB (httpguts.ValidHeaderFieldValue, url's invalid control characters).
_CTL_BYTES = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
_HEX_BYTES = b"0123456789abcdefABCDEF"

_VERSION_SHAPE = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*\Z")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")

_CONNECTION_DONE = Failure(ConnectionDone())
_TOKEN_START = frozenset(_TOKEN_BYTES)
_canonical_cache = _nameEncoder._canonicalHeaderCache
_canonical = _nameEncoder.encode

_REASONS = {
    400: b"Bad Request",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    505: b"HTTP Version Not Supported",
}


class _Reject(Exception):
    """A request the parser refuses: answered with a plain-text status, then the close."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        self.detail = detail


def _error_response(status: int, detail: str) -> bytes:
    """Go's shape: plain text, ``Connection: close``, body = status and reason (+ detail)."""
    reason = _REASONS.get(status) or http.RESPONSES.get(status, b"Error")
    if status == 501:
        body = b"Unsupported transfer encoding"
    elif status == 417:
        body = b""
    else:
        body = b"%d %s" % (status, reason)
        if detail:
            body += b": " + detail.encode("ascii", "replace")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (status, reason, len(body), body)
    )


_date_cache: list[Any] = [0, b""]


def _http_date() -> bytes:
    """The ``Date`` header value, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[1] = http.datetimeToString(now)
        _date_cache[0] = now
    return _date_cache[1]


def _has_token(values: list[bytes], token: bytes) -> bool:
    for value in values:
        for part in value.lower().split(b","):
            if part.strip(b" \t") == token:
                return True
    return False


# --------------------------------------------------------------------------------------------
# Request bodies


@implementer(IBodyProducer)
class _EmptyBody:
    """The body of a request without one: costs nothing until someone asks for it."""

    length = 0

    def startProducing(self, consumer: Any) -> Deferred[None]:
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


EMPTY_BODY = _EmptyBody()


@implementer(IBodyProducer)
class RequestBody:
    """The streaming body of an HTTP/1.x request, fed by the channel as bytes arrive.

    Bytes that arrive before ``startProducing`` (or while the consumer is paused) are held
    in a small buffer; past ``BODY_BUFFER_LIMIT`` the client's socket is paused, so an upload
    of any size streams with flat memory.
    """

    __slots__ = (
        "length",
        "_channel",
        "_consumer",
        "_d",
        "_buf",
        "_buffered",
        "_done",
        "_error",
        "_paused",
        "_stopped",
    )

    def __init__(self, channel: ProxyChannel, length: Any) -> None:
        self.length = length
        self._channel: ProxyChannel | None = channel
        self._consumer: Any = None
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
        self._consumer = consumer
        d: Deferred[None] = Deferred()
        self._d = d
        channel = self._channel
        if channel is not None and not self._done:
            channel._body_started()
        self._flush()
        return d

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
        self._buf = []
        self._buffered = 0
        channel = self._channel
        self._channel = None
        if channel is not None and not self._done:
            channel._body_stopped()

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
        if self._d is not None and not self._buf:
            d, self._d = self._d, None
            d.callback(None)

    def _fail(self, error: Exception) -> None:
        """The body cannot complete: the client left or sent a malformed chunked body."""
        if self._done or self._stopped:
            return
        self._done = True
        self._channel = None
        self._error = error
        self._buf = []
        self._buffered = 0
        if self._d is not None:
            d, self._d = self._d, None
            d.errback(error)

    def _abandon(self) -> None:
        """The response is complete before the body: stop feeding the consumer quietly."""
        self._stopped = True
        self._channel = None
        self._consumer = None
        self._d = None
        self._buf = []

    def _flush(self) -> None:
        consumer = self._consumer
        buf = self._buf
        while buf and not self._paused and not self._stopped:
            chunk = buf.pop(0)
            self._buffered -= len(chunk)
            consumer.write(chunk)
        if self._stopped or self._paused:
            return
        if buf:
            return
        if self._done:
            d, self._d = self._d, None
            if d is not None:
                if self._error is not None:
                    d.errback(self._error)
                else:
                    d.callback(None)
        elif self._channel is not None:
            self._channel._resume(_P_BODY)


@implementer(IBodyProducer)
class ContentBody:
    """An HTTP/2 request body: it already sits in ``request.content``, replay it."""

    CHUNK = 64 << 10

    def __init__(self, content: Any, length: Any) -> None:
        self.length = length
        self._content = content
        self._consumer: Any = None
        self._d: Deferred[None] | None = None
        self._paused = False
        self._stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._d = Deferred()
        d = self._d
        self._pump()
        return d

    def _pump(self) -> None:
        while not self._paused and not self._stopped and self._d is not None:
            data = self._content.read(self.CHUNK)
            if not data:
                d, self._d = self._d, None
                d.callback(None)
                return
            self._consumer.write(data)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stopped = True
        self._d = None


class _ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder; trailers are read and dropped."""

    __slots__ = ("state", "remaining", "partial", "trailer")

    SIZE, DATA, CR, LF, TRAILER, DONE = range(6)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.remaining = 0
        self.partial = b""
        self.trailer = 0

    def decode(self, data: bytes, out: list[bytes]) -> bytes | None:
        """Append body bytes to ``out``; return the bytes after the body once it is complete
        (``None`` while more is needed). Raises ``MalformedBody``."""
        pos = 0
        end = len(data)
        while pos < end:
            state = self.state
            if state == 1:  # DATA
                take = end - pos
                if take > self.remaining:
                    take = self.remaining
                out.append(data if (pos == 0 and take == end) else data[pos : pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = 2
            elif state == 2:  # CR after data
                if data[pos] != 13:
                    raise MalformedBody("malformed chunked encoding")
                pos += 1
                self.state = 3
            elif state == 3:  # LF after data
                if data[pos] != 10:
                    raise MalformedBody("malformed chunked encoding")
                pos += 1
                self.state = 0
            else:  # SIZE or TRAILER: line based
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.partial += data[pos:]
                    if len(self.partial) > MAX_CHUNK_LINE:
                        raise MalformedBody("chunk line too long")
                    return None
                line = data[pos:nl]
                if self.partial:
                    line = self.partial + line
                    self.partial = b""
                pos = nl + 1
                if len(line) > MAX_CHUNK_LINE:
                    raise MalformedBody("chunk line too long")
                line = line.rstrip(b" \t\r")
                if state == 0:
                    size_text = line.split(b";", 1)[0].rstrip(b" \t")
                    if (
                        not size_text
                        or len(size_text) > 16
                        or size_text.translate(None, _HEX_BYTES)
                    ):
                        raise MalformedBody("invalid byte in chunk length")
                    size = int(size_text, 16)
                    if size:
                        self.remaining = size
                        self.state = 1
                    else:
                        self.state = 4
                else:  # TRAILER
                    if not line:
                        self.state = 5
                        return data[pos:]
                    self.trailer += len(line)
                    if self.trailer > MAX_TRAILER_BYTES or b":" not in line:
                        raise MalformedBody("malformed trailer")
        return None


# --------------------------------------------------------------------------------------------
# Requests


class StreamingRequest(server.Request):
    """A ``server.Request`` rendered as soon as its head is parsed (HTTP/1.x).

    Extra API: ``body_producer`` (``IBodyProducer``), ``take_over_transport(protocol)`` for
    upgrades and ``write_informational(code, headers)`` for 1xx responses.
    """

    defaultContentType = None
    body_producer: Any = EMPTY_BODY
    _upgraded = False
    _expect_continue = False
    _args: dict[bytes, list[bytes]] | None = None
    _cookies: dict[bytes, bytes] | None = None

    def __init__(self, channel: Any, queued: object = None, **kwargs: Any) -> None:
        # Lean version of http.Request/server.Request.__init__: this runs for every request.
        self.notifications = []
        self.channel = channel
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = False
        self._adapterCache = {}
        self._secure = channel.isSecure()

    # Lazily computed legacy attributes (most requests never look at them).

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        if self._args is None:
            _, _, query = self.uri.partition(b"?")
            self._args = parse_qs(query, 1) if query else {}
        return self._args

    @args.setter
    def args(self, value: dict[bytes, list[bytes]]) -> None:
        self._args = value

    @property
    def received_cookies(self) -> dict[bytes, bytes]:
        if self._cookies is None:
            self._cookies = {}
            for text in self.requestHeaders.getRawHeaders(b"Cookie", ()):
                for cookie in text.split(b";"):
                    key, sep, value = cookie.lstrip().partition(b"=")
                    if sep:
                        self._cookies[key] = value
        return self._cookies

    @received_cookies.setter
    def received_cookies(self, value: dict[bytes, bytes]) -> None:
        self._cookies = value

    def parseCookies(self) -> None:
        """Cookies are parsed lazily by ``received_cookies``."""

    def isSecure(self) -> bool:
        # Cached at creation: the lead logs the scheme after ``finish`` dropped ``channel``.
        return bool(self._forceSSL or self._secure)

    # HTTP/2 (and any legacy caller): the whole body is already in ``self.content``.

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        content = self.content
        size = 0
        if content is not None:
            size = content.tell()
            content.seek(0, 0)
        self.method = command
        self.uri = path
        self.clientproto = b"HTTP/2.0" if version == b"HTTP/2" else version
        self.path = path.split(b"?", 1)[0]
        declared = self.requestHeaders.getRawHeaders(b"Content-Length")
        if declared and declared[0].isdigit():
            length: Any = int(declared[0])
        else:
            length = UNKNOWN_LENGTH if size else 0
        if size:
            self.body_producer = ContentBody(content, length)
        self.process()

    def process(self) -> None:
        site = self.site = self.channel.site
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        try:
            root = site.resource
            resrc = root if root.isLeaf else site.getResourceFor(self)
            self.render(resrc)
        except BaseException:
            self.processingFailed(Failure())

    write = http.Request.write

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._disconnected or self.channel is None:
            producer.stopProducing()
            return
        http.Request.registerProducer(self, producer, streaming)

    def unregisterProducer(self) -> None:
        if self.channel is None:
            self.producer = None
            return
        http.Request.unregisterProducer(self)

    def finish(self) -> None:
        """Finish the response; quietly does nothing once the client is gone (unlike Twisted)."""
        if self.finished or self._disconnected:
            return
        if self._upgraded:
            self.finished = 1
            notifications, self.notifications = self.notifications, []
            for d in notifications:
                d.callback(None)
            return
        if not self.startedWriting:
            self.write(b"")
        if self.chunked:
            self.channel.write(b"0\r\n\r\n")
        self.finished = 1
        self._cleanup()

    def take_over_transport(self, protocol: IProtocol, write_head: bool = False) -> None:
        """Hand the raw client connection to ``protocol`` (after an upstream ``101``).

        The caller has written the ``101`` head to ``request.channel.transport`` already, or
        passes ``write_head=True`` to have it written from ``code``/``responseHeaders`` (no
        body framing). HTTP parsing stops; ``protocol.makeConnection(transport)`` is called
        unless ``protocol.transport`` is already set; bytes received after the request head
        are delivered to ``protocol.dataReceived`` at once, later ones and ``connectionLost``
        as they come. The channel stays registered as the transport's producer: a protocol
        that registers its own must ``transport.unregisterProducer()`` first. ``finish()``
        then only fires the ``notifyFinish`` Deferreds (call it when the tunnel closes).
        """
        channel = self.channel
        if channel is None or self._disconnected:
            raise RuntimeError("client connection already gone")
        take_over = getattr(channel, "_take_over", None)
        if take_over is None:
            raise RuntimeError("connection upgrades need HTTP/1.1")
        if write_head and not self.startedWriting:
            channel.writeHeaders(
                self.clientproto, b"%d" % self.code, self.code_message, self.responseHeaders
            )
            channel._flush_head()
        self.startedWriting = 1
        self._upgraded = True
        take_over(self, protocol)

    def write_informational(self, code: int, headers: Headers | None = None) -> None:
        """Send a 1xx interim response (e.g. 103 Early Hints) before the final one."""
        if self.startedWriting or self.channel is None or self._disconnected:
            return
        if self.clientproto != b"HTTP/1.1":
            return
        write_info = getattr(self.channel, "writeInformational", None)
        if write_info is not None:
            write_info(code, headers or Headers())


# --------------------------------------------------------------------------------------------
# The channel


class ProxyChannel(http.HTTPChannel):
    """A strict HTTP/1.1 server connection (SPEC §4.3) rendering at end of headers.

    One request is handled at a time (pipelined requests wait, in order); the request body is
    parsed here and pushed into the request's ``RequestBody``.
    """

    timeOut = None

    def __init__(self) -> None:
        self._pending_head: bytes | None = None
        self._buf = b""
        self._scan_from = 0
        self._req: StreamingRequest | None = None
        self._persistent = True
        self._looping = False
        self._dead = False  # input is ignored from now on
        self._paused = 0
        self._waitingForTransport = False
        self._requestProducer = None
        self._requestProducerStreaming = None
        # Body being read for the current (or just answered) request.
        self._in_body = False
        self._remaining = 0
        self._chunked: _ChunkedDecoder | None = None
        self._body: RequestBody | None = None
        self._discard_left = -1  # >= 0: discarding an unconsumed body with this budget
        self._expect_continue = False
        self._upgrade: IProtocol | None = None
        self._linger: Any = None
        self._peer: Any = None
        self._host: Any = None
        self._secure: bool | None = None

    # Connection lifecycle

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        self._networkProducer = IPushProducer(transport, http._NoPushProducer())
        self._networkProducer.registerProducer(self, True)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._dead = True
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
            req.connectionLost(reason)
        body = self._body
        self._body = None
        if body is not None:
            body._fail(ClientGone("client disconnected"))

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = self.transport.getHost()
        return host

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = ISSLTransport(self.transport, None) is not None
        return secure

    # Reading

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
        response is done. Re-entrant calls (a resource finishing synchronously) just return."""
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
        except _Reject as reject:
            self._reject(reject.status, reject.detail)
        finally:
            self._looping = False

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
            return
        out: list[bytes] = []
        try:
            rest = decoder.decode(data, out)
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

    def _body_complete(self) -> None:
        self._in_body = False
        self._chunked = None
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

    def _read_head(self) -> bool:
        """Parse one request head from ``_buf`` and render it. False: need more bytes."""
        buf = self._buf
        if buf[0] in (13, 10):  # tolerate blank lines between requests (Go: after a POST)
            buf = self._buf = buf.lstrip(b"\r\n")
            self._scan_from = 0
            if not buf:
                return False
        end = buf.find(b"\r\n\r\n", self._scan_from)
        lines: list[bytes] | None = None
        if end >= 0:
            head = buf[:end]
            lines = head.split(b"\r\n")
            rest_at = end + 4
            if head.count(b"\n") != len(lines) - 1:
                lines = None  # a bare LF somewhere: let the slow path find the real end
            elif len(head.translate(None, _CTL_BYTES)) != len(head) - 2 * (len(lines) - 1):
                raise _Reject(400, "invalid header value")
        if lines is None:
            found = self._slow_head(buf)
            if found is None:
                if len(buf) > MAX_HEAD_BYTES:
                    raise _Reject(431)
                self._scan_from = max(0, len(buf) - 3)
                self._precheck(buf)
                return False
            lines, rest_at = found
        if rest_at > MAX_HEAD_BYTES:
            raise _Reject(431)
        self._buf = buf[rest_at:]
        self._scan_from = 0
        self._start_request(lines)
        return True

    def _slow_head(self, buf: bytes) -> tuple[list[bytes], int] | None:
        """Heads using bare LF line ends (tolerated like Go's textproto)."""
        if b"\n\n" not in buf and b"\n\r\n" not in buf:
            return None
        match = _HEAD_END.search(buf)
        if match is None:  # pragma: no cover - the checks above guarantee a match
            return None
        lines = _LINE_END.split(buf[: match.start()])
        for line in lines:
            if len(line.translate(None, _CTL_BYTES)) != len(line):
                raise _Reject(400, "invalid header value")
        return lines, match.end()

    def _precheck(self, buf: bytes) -> None:
        """Reject binary garbage (e.g. a TLS ClientHello) without waiting for a full head."""
        if buf[0] not in _TOKEN_START:
            raise _Reject(400, "malformed HTTP request")
        nl = buf.find(b"\n")
        if nl >= 0:
            _parse_request_line(buf[:nl].rstrip(b"\r"))

    def _start_request(self, lines: list[bytes]) -> None:
        method, target, version = _parse_request_line(lines[0])
        raw: dict[bytes, list[bytes]] = {}
        cache_get = _canonical_cache.get
        for i in range(1, len(lines)):
            name, sep, value = lines[i].partition(b":")
            if not sep:
                raise _Reject(400, "malformed MIME header line")
            canon = cache_get(name)
            if canon is None:
                try:
                    canon = _canonical(name)
                except InvalidHeaderName:
                    raise _Reject(400, "invalid header name") from None
            value = value.strip(b" \t")
            values = raw.get(canon)
            if values is None:
                raw[canon] = [value]
            else:
                values.append(value)

        # Host (SPEC §4.3): required for HTTP/1.1, exactly one, valid bytes.
        hosts = raw.get(b"Host")
        if hosts is None:
            if version == b"HTTP/1.1" and method != b"CONNECT":
                raise _Reject(400, "missing required Host header")
        else:
            if len(hosts) > 1:
                raise _Reject(400, "too many Host headers")
            if hosts[0].translate(None, _HOST_BYTES):
                raise _Reject(400, "malformed Host header")

        # Framing: chunked wins over Content-Length, which is then dropped.
        length: Any = 0
        chunked = False
        lengths = raw.get(b"Content-Length")
        if lengths is not None and len(lengths) > 1:
            if any(v != lengths[0] for v in lengths):
                raise _Reject(400, "multiple Content-Length headers")
            lengths = raw[b"Content-Length"] = [lengths[0]]
        encodings = raw.pop(b"Transfer-Encoding", None)
        if encodings is not None and version == b"HTTP/1.1":
            if len(encodings) != 1 or encodings[0].lower() != b"chunked":
                raise _Reject(501)
            chunked = True
            length = UNKNOWN_LENGTH
            raw[b"Transfer-Encoding"] = [b"chunked"]  # informative; it is hop-by-hop
            raw.pop(b"Content-Length", None)
        elif lengths is not None:
            text = lengths[0]
            if not text:
                del raw[b"Content-Length"]
            elif not text.isdigit() or len(text) > 19 or int(text) >= 1 << 63:
                raise _Reject(400, "bad Content-Length")
            else:
                length = int(text)

        # Go: 100-continue only for HTTP/1.1 with a body; any other expectation fails.
        expect = raw.get(b"Expect")
        expect_continue = False
        if expect is not None:
            if _has_token(expect[:1], b"100-continue"):
                expect_continue = version == b"HTTP/1.1" and bool(length)
            elif expect[0]:
                raise _Reject(417)

        persistent = version == b"HTTP/1.1"
        connection = raw.get(b"Connection")
        if persistent and connection is not None and _has_token(connection, b"close"):
            persistent = False
        self._persistent = persistent

        pragma = raw.get(b"Pragma")
        if pragma is not None and pragma[0] == b"no-cache" and b"Cache-Control" not in raw:
            raw[b"Cache-Control"] = [b"no-cache"]

        # Request target: origin-form, absolute-form (its host wins), '*', CONNECT authority.
        if target[0] == 47:  # "/"
            uri = target
            q = target.find(b"?")
            path = target if q < 0 else target[:q]
        else:
            uri, path, authority = _parse_target(method, target)
            raw[b"Host"] = [authority]
        if 37 in path and _BAD_PERCENT.search(path):  # "%"
            raise _Reject(400, "invalid URL escape")

        req = self.requestFactory(self)
        req.requestHeaders._rawHeaders = raw
        req.method = method
        req.uri = uri
        req.path = path
        req.clientproto = version
        self._req = req
        if length:
            body = RequestBody(self, length)
            req.body_producer = body
            self._body = body
            self._in_body = True
            self._discard_left = -1
            if chunked:
                self._chunked = _ChunkedDecoder()
            else:
                self._remaining = length
            self._expect_continue = expect_continue
            req._expect_continue = expect_continue
        req.process()

    # Writing

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        raw = headers._rawHeaders
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in raw.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        if b"Date" not in raw:
            parts += (b"Date: ", _http_date(), b"\r\n")
        if self._req is not None and self._in_body:
            self._before_early_response()
        if not self._persistent and version == b"HTTP/1.1":
            connection = raw.get(b"Connection")
            if connection is None or not _has_token(connection, b"close"):
                parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        # Held until the first body write or the end of the response, so that head and body
        # leave in one send (see kamal_proxy.proxy.sockets).
        self._pending_head = b"".join(parts)

    def write(self, data: bytes) -> None:
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            data = head + data
        write_now(self.transport, data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            write_now(self.transport, head + b"".join(iovec))
        else:
            write_now(self.transport, b"".join(iovec))

    def _flush_head(self) -> None:
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            write_now(self.transport, head)

    def _before_early_response(self) -> None:
        """The response starts before the body was read: decide whether the connection can
        survive (Go: close when a 100-continue was never sent or much body remains)."""
        body = self._body
        started = body is not None and body._consumer is not None
        if self._expect_continue and not started:
            self._persistent = False
        elif not started and self._chunked is None and self._remaining > DISCARD_BUDGET:
            self._persistent = False

    def writeInformational(self, code: int, headers: Headers) -> None:
        reason = http.RESPONSES.get(code, b"Informational")
        parts = [b"HTTP/1.1 %d %s\r\n" % (code, reason)]
        for name, values in headers._rawHeaders.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))

    def requestDone(self, request: Any) -> None:
        self._flush_head()
        if request is not self._req:
            return
        self._req = None
        if self._in_body:
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
        if self._waitingForTransport:
            self._pause(_P_WRITE)
        self._resume(_P_PIPE)
        if self._buf and not self._looping:
            self._loop()

    # Flow control

    def _pause(self, reason: int) -> None:
        if not self._paused:
            self._networkProducer.pauseProducing()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._dead:
                self._networkProducer.resumeProducing()

    def _body_started(self) -> None:
        if self._expect_continue:
            self._expect_continue = False
            req = self._req
            if req is not None and not req.startedWriting:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body_stopped(self) -> None:
        """The consumer gave up on the body: like Go after an early ``Body.Close``, leave the
        rest unread and close the connection after the response."""
        self._persistent = False
        self._body = None
        self._pause(_P_BODY)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if self._waitingForTransport and streaming:
            producer.pauseProducing()

    def pauseProducing(self) -> None:
        """The client's socket is full (it is not reading our responses)."""
        self._waitingForTransport = True
        if self._requestProducer is not None:
            self._requestProducer.pauseProducing()
        if self._req is None:
            self._pause(_P_WRITE)

    def resumeProducing(self) -> None:
        self._waitingForTransport = False
        if self._requestProducer is not None:
            self._requestProducer.resumeProducing()
        self._resume(_P_WRITE)

    # Closing

    def _reject(self, status: int, detail: str) -> None:
        """A request the parser refuses never reaches the resource (SPEC §4.3)."""
        self._persistent = False
        self.transport.write(_error_response(status, detail))
        self._close_softly()

    def _close(self) -> None:
        self._persistent = False
        self._dead = True
        self._buf = b""
        self.loseConnection()

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
            self.loseConnection()
            return
        self._networkProducer.unregisterProducer()
        half_close()
        self._paused = 0
        transport.resumeProducing()
        self._linger = self.callLater(LINGER_SECONDS, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger = None
        self.transport.loseConnection()

    # Upgrades

    def _take_over(self, request: StreamingRequest, protocol: IProtocol) -> None:
        self._upgrade = protocol
        self._dead = True
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


def _parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _Reject(400, "malformed HTTP request")
    method, target, version = parts
    if not method or method.translate(None, _TOKEN_BYTES):
        raise _Reject(400, "invalid method")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if _VERSION_SHAPE.match(version):
            raise _Reject(505, "unsupported protocol version")
        raise _Reject(400, "malformed HTTP version")
    if not target:
        raise _Reject(400, "invalid URI for request")
    return method, target, version


def _parse_target(method: bytes, target: bytes) -> tuple[bytes, bytes, bytes]:
    """(uri, path, host) for a target that is not origin-form."""
    if target == b"*":
        return target, target, b""
    scheme, sep, rest = target.partition(b"://")
    if sep and _SCHEME.match(scheme):
        rest, qsep, query = rest.partition(b"?")
        slash = rest.find(b"/")
        if slash < 0:
            authority, path = rest, b"/"
        else:
            authority, path = rest[:slash], rest[slash:]
        host = authority.rpartition(b"@")[2]
        if host.translate(None, _HOST_BYTES):
            raise _Reject(400, "invalid host in request URI")
        return (path + b"?" + query if qsep else path), path, host
    if method == b"CONNECT" and b"/" not in target and b"?" not in target:
        if target.translate(None, _HOST_BYTES):
            raise _Reject(400, "invalid host in request URI")
        return target, b"", target
    raise _Reject(400, "invalid URI for request")


# --------------------------------------------------------------------------------------------
# Site


class _ChannelSelector(http._GenericHTTPChannelProtocol):
    """HTTP/1.x through ``ProxyChannel``, or ``H2Connection`` when ALPN selected ``h2``."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._negotiatedProtocol == b"http/1.1":
            # Decided once per connection: later bytes go straight to the channel (which
            # handles upgrades itself, so this binding stays right).
            self.dataReceived = self._channel.dataReceived  # type: ignore[method-assign]


def _build_channel(factory: Any) -> _ChannelSelector:
    return _ChannelSelector(ProxyChannel())


class ProxySite(server.Site):
    """A ``Site`` for the proxy: streaming requests, no access log, no idle timeout."""

    protocol = _build_channel  # type: ignore[assignment]
    requestFactory = StreamingRequest

    def __init__(self, resource: Any, reactor: Any = None) -> None:
        super().__init__(resource, timeout=None, reactor=reactor, parsePOSTFormSubmission=False)
        self._connections: weakref.WeakSet[_ChannelSelector] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self._connections.add(protocol)
        return protocol

    def close_idle(self) -> None:
        """Shutdown: close HTTP/1.x connections between requests now, and the others right
        after their current response (Go's ``Server.Shutdown``).  HTTP/2 connections are
        left to finish their streams."""
        for protocol in list(self._connections):
            channel = protocol._channel
            if not isinstance(channel, ProxyChannel) or channel._dead:
                continue
            channel._persistent = False
            if channel._req is None and channel._upgrade is None:
                channel._close()

    def log(self, request: Any) -> None:
        """The proxy writes its own JSON request log (SPEC §17.2)."""

    def startFactory(self) -> None:
        """No access log file and no log-time ticker."""

    def stopFactory(self) -> None:
        pass


def make_site(resource: Any, reactor: Any = None) -> ProxySite:
    """The ``Site`` for the HTTP and HTTPS listeners: ``resource`` renders every request."""
    return ProxySite(resource, reactor=reactor)
