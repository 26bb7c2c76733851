"""Pooled, keep-alive HTTP/1.1 client that forwards one request to one target.

This is the proxy's hot path, so it is a small hand-written protocol rather than
``twisted.web.client.Agent``: one ``Protocol`` per upstream TCP connection, a response
parser that handles the status line and headers in one pass once ``\\r\\n\\r\\n`` has
arrived, direct method calls into the caller's sink instead of Deferred chains, and
producer/consumer flow control in both directions (SPEC §9.1, §9.4, §9.5; DESIGN §4).

Connections are kept per target in a LIFO idle stack and reused only after a complete
response with keep-alive semantics. Go's transport detects idle connections the upstream
closed and retries a request once on a fresh connection when a *reused* connection dies
before any response byte; both are emulated here so one-shot upstreams (a response, then
FIN) never cause a 502 (SPEC §21.3).
"""

from __future__ import annotations

import re
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IResolutionReceiver
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.proxy.sockets import write_now

__all__ = [
    "Exchange",
    "ResponseSink",
    "Tunnel",
    "UpstreamAborted",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamTimeout",
]


class UpstreamError(Exception):
    """The target could not produce a response (mapped to 502)."""


class UpstreamTimeout(UpstreamError):
    """The target (or the OS connect) timed out before response headers (mapped to 504)."""


class UpstreamAborted(Exception):
    """The response had started when the target failed; the client connection must be aborted."""


class ResponseSink(TypingProtocol):
    """What the routing resource implements to receive one upstream response."""

    def informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None: ...

    def response_data(self, data: bytes) -> None: ...

    def upgraded(self, tunnel: Tunnel) -> None: ...


# Response headers that are consumed here and never relayed (SPEC §9.2/§9.4); `Trailer` is kept.
_CONTENT_LENGTH = 1
_TRANSFER_ENCODING = 2
_CONNECTION = 3
_HOP = 4
_RESPONSE_SPECIAL = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"proxy-connection": _HOP,
    b"keep-alive": _HOP,
    b"proxy-authenticate": _HOP,
    b"proxy-authorization": _HOP,
    b"te": _HOP,
    b"upgrade": _HOP,
}
# Connection tokens that never name a relayed header (and Content-Length must survive).
_NOT_HEADER_TOKENS = frozenset((b"keep-alive", b"close", b"content-length", b""))
_NO_TOKENS: frozenset[bytes] = frozenset()
# Framing of the upstream request is ours alone: a stray copy from the caller would smuggle.
_REQUEST_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
# Request header name as given -> whether it is framing (cached like _NAME_CODES below).
_FRAMING_NAMES: dict[bytes, bool] = {}


def _is_framing(name: bytes) -> bool:
    drop = name.lower() in _REQUEST_FRAMING
    if len(_FRAMING_NAMES) < 2048:
        _FRAMING_NAMES[name] = drop
    return drop


_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
# Go sends `Content-Length: 0` for these methods when there is no body.
_ZERO_LENGTH_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_MAX_HEAD = 1 << 20
_MAX_LINE = 4096

# Connection states.
_IDLE = 0
_HEAD = 1
_BODY_LENGTH = 2
_BODY_CHUNKED = 3
_BODY_CLOSE = 4
_TUNNEL = 5
_DEAD = 6
# Chunked decoder states.
_C_SIZE = 0
_C_DATA = 1
_C_CRLF = 2
_C_TRAILER = 3


class _BadResponse(Exception):
    pass


_Head = tuple[bool, int, bytes, list[tuple[bytes, bytes]]]


def _parse_status(line: bytes) -> tuple[bool, int, bytes]:
    version = line[:9]
    if version == b"HTTP/1.1 ":
        v11 = True
    elif version == b"HTTP/1.0 ":
        v11 = False
    else:
        raise _BadResponse(f"malformed HTTP response {line[:64]!r}")
    code = line[9:12]
    if not code.isdigit() or code[0] == 48 or line[12:13] not in (b" ", b""):
        raise _BadResponse(f"malformed HTTP status code {line[9:25]!r}")
    return v11, int(code), line[13:]


def _parse_head(head: bytes) -> _Head | None:
    """Parse a CRLF status line and header block (without the final empty line).

    Returns (is_http_1_1, status, reason, headers), or None when the block also has bare
    LF line ends (then the caller takes the tolerant path, as Go accepts those).
    """
    lines = head.split(b"\r\n")
    if len(lines) != head.count(b"\n") + 1:
        return None
    v11, status, reason = _parse_status(lines[0])
    del lines[0]
    headers: list[tuple[bytes, bytes]] = []
    append = headers.append
    for line in lines:
        name, sep, value = line.partition(b":")
        # `32 in name` (an int) is several times faster than `b" " in name`.
        if not sep or 32 in name or 9 in name or not name:
            return v11, status, reason, _parse_header_lines(lines)
        append((name, value.strip(b" \t")))
    return v11, status, reason, headers


def _parse_head_tolerant(head: bytes) -> _Head:
    """The same for a block with LF or mixed line ends."""
    lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    v11, status, reason = _parse_status(lines[0])
    return v11, status, reason, _parse_header_lines(lines[1:])


def _parse_header_lines(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The careful path: obsolete line folding, and the errors Go reports."""
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        if not line:
            continue
        if line[0] in (32, 9):
            if not headers:
                raise _BadResponse(f"malformed MIME header initial line {line[:64]!r}")
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t\r"))
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or 32 in name or 9 in name:
            raise _BadResponse(f"malformed MIME header line {line[:64]!r}")
        headers.append((name, value.strip(b" \t\r")))
    return headers


def _tokens(values: list[bytes]) -> set[bytes]:
    return {t.strip().lower() for v in values for t in v.split(b",")}


class _Connection(Protocol):
    """One upstream TCP connection: writes requests, parses responses, relays tunnels."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.exchange: Exchange | None = None
        self.sink: Any = None
        self.state = _DEAD
        self.buf = b""
        self.remaining = 0
        self.cstate = _C_SIZE
        self.keepalive = False
        self.no_body = False  # the current request is HEAD
        self.seen = False  # any response byte arrived for the current exchange
        self.reused = False
        self.lost = False
        self.idle_since = 0.0
        self.tunnel: Tunnel | None = None
        self.on_made: Any = None

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        made, self.on_made = self.on_made, None
        if made is not None:
            made(self)

    # -- receiving ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        st = self.state
        if st == _BODY_LENGTH:
            n = len(data)
            rem = self.remaining
            if n < rem:
                self.remaining = rem - n
                self.sink.response_data(data)
                return
            self.remaining = 0
            if n > rem:
                # Bytes after the response on a non-pipelined connection: never reuse it.
                self.keepalive = False
                data = data[:rem]
            if data:
                self.sink.response_data(data)
            ex = self.exchange
            if ex is not None:
                ex._response_complete(self, self.keepalive)
        elif st == _HEAD:
            self._head_received(data)
        elif st == _BODY_CHUNKED:
            self._chunked_received(data)
        elif st == _BODY_CLOSE:
            self.sink.response_data(data)
        elif st == _TUNNEL:
            self.tunnel._from_upstream(data)  # type: ignore[union-attr]
        elif st == _IDLE:
            # Go: "Unsolicited response received on idle HTTP channel".
            self.state = _DEAD
            self.pool._drop(self)
            self.transport.abortConnection()

    def _head_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        self.seen = True
        ex = self.exchange
        assert ex is not None
        while True:
            end = buf.find(b"\r\n\r\n")
            try:
                head = _parse_head(buf[:end]) if end >= 0 else None
                if head is not None:
                    end += 4
                else:
                    blank = _BLANK_LINE.search(buf)
                    if blank is None:
                        self.buf = buf
                        if not b"HTTP/".startswith(buf[:5]):
                            raise _BadResponse(f"malformed HTTP response {buf[:64]!r}")
                        if len(buf) > _MAX_HEAD:
                            raise _BadResponse("server response headers exceeded 1048576 bytes")
                        return
                    head = _parse_head_tolerant(buf[: blank.start()])
                    end = blank.end()
            except _BadResponse as e:
                self.buf = b""
                ex._protocol_error(self, str(e))
                return
            v11, status, reason, raw = head
            buf = buf[end:]
            if status < 200 and status != 101:
                ex._informational(status, _filter_headers(raw)[0])
                if self.exchange is not ex:
                    return
                if not buf:
                    self.buf = b""
                    return
                continue
            break
        self.buf = b""
        if status == 101:
            ex._switching(self, reason, raw, buf)
            return
        headers, cl_values, te_values, tokens = _filter_headers(raw)
        self.keepalive = (b"close" not in tokens) if v11 else (b"keep-alive" in tokens)
        length: int | None = None
        if cl_values:
            first = cl_values[0]
            if not first.isdigit() or (len(cl_values) > 1 and any(v != first for v in cl_values)):
                ex._protocol_error(self, f"bad Content-Length {first[:32]!r}")
                return
            length = int(first)
        chunked = False
        if te_values:
            if len(te_values) != 1 or te_values[0].lower() != b"chunked":
                ex._protocol_error(self, f"unsupported transfer encoding {te_values!r}")
                return
            chunked = True
            if length is not None:  # chunked wins; the length is meaningless (RFC 9112 §6.3)
                length = None
                headers = [h for h in headers if h[0].lower() != b"content-length"]
        ex._response_head(status, reason, headers, length)
        if self.exchange is not ex:
            return
        if self.no_body or status == 204 or status == 304:
            ex._response_complete(self, self.keepalive and not buf)
            return
        if chunked:
            self.state = _BODY_CHUNKED
            self.cstate = _C_SIZE
            if buf:
                self._chunked_received(buf)
        elif length is not None:
            self.state = _BODY_LENGTH
            self.remaining = length
            if length == 0:
                ex._response_complete(self, self.keepalive and not buf)
            elif buf:
                self.dataReceived(buf)
        else:
            self.state = _BODY_CLOSE
            self.keepalive = False
            if buf:
                self.sink.response_data(buf)

    def _chunked_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        n = len(buf)
        sink = self.sink
        while pos < n:
            cs = self.cstate
            if cs == _C_DATA:
                rem = self.remaining
                avail = n - pos
                if avail <= rem:
                    piece = buf[pos:] if pos else buf
                    pos = n
                    rem -= avail
                else:
                    piece = buf[pos : pos + rem]
                    pos += rem
                    rem = 0
                self.remaining = rem
                if rem == 0:
                    self.cstate = _C_CRLF
                sink.response_data(piece)
                if self.exchange is None:
                    return
            elif cs == _C_CRLF:
                if n - pos < 2:
                    self.buf = buf[pos:]
                    if self.buf != b"\r":
                        self._chunk_error("malformed chunked encoding")
                    return
                if buf[pos : pos + 2] != b"\r\n":
                    self._chunk_error("malformed chunked encoding")
                    return
                pos += 2
                self.cstate = _C_SIZE
            else:
                i = buf.find(b"\n", pos)
                if i < 0:
                    if n - pos > _MAX_LINE:
                        self._chunk_error("chunked line too long")
                    else:
                        self.buf = buf[pos:]
                    return
                line = buf[pos:i]
                pos = i + 1
                if cs == _C_SIZE:
                    size = line.split(b";", 1)[0].strip(b" \t\r")
                    if _HEX.fullmatch(size) is None:
                        self._chunk_error(f"invalid chunk length {size[:32]!r}")
                        return
                    size_n = int(size, 16)
                    if size_n:
                        self.remaining = size_n
                        self.cstate = _C_DATA
                    else:
                        self.cstate = _C_TRAILER
                elif line == b"" or line == b"\r":
                    # End of the chunked body; trailers (if any) were dropped like Go does.
                    ex = self.exchange
                    if ex is not None:
                        ex._response_complete(self, self.keepalive and pos == n)
                    return

    def _chunk_error(self, message: str) -> None:
        ex = self.exchange
        if ex is not None:
            ex._protocol_error(self, message)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self.lost = True
        st = self.state
        self.state = _DEAD
        if st == _IDLE:
            self.pool._drop(self)
            return
        ex = self.exchange
        if ex is not None:
            ex._connection_lost(self, st, reason)
        elif st == _TUNNEL:
            self.tunnel._upstream_lost()  # type: ignore[union-attr]


# Header name as received -> its code (0: relay). Upstreams repeat the same few names, so
# this saves a lower() per header; bounded so a hostile upstream cannot grow it for ever.
_NAME_CODES: dict[bytes, int] = {}


def _name_code(name: bytes) -> int:
    code = _RESPONSE_SPECIAL.get(name.lower(), 0)
    if len(_NAME_CODES) < 2048:
        _NAME_CODES[name] = code
    return code


def _filter_headers(
    raw: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], list[bytes], list[bytes], frozenset[bytes] | set[bytes]]:
    """Split framing/hop-by-hop headers off.

    Returns (relayed headers, Content-Length values, Transfer-Encoding values, the
    lower-cased Connection tokens).
    """
    headers: list[tuple[bytes, bytes]] = []
    cl: list[bytes] = []
    te: list[bytes] = []
    conn: list[bytes] = []
    codes = _NAME_CODES
    for h in raw:
        code = codes.get(h[0])
        if code is None:
            code = _name_code(h[0])
        if not code:
            headers.append(h)
        elif code == _CONTENT_LENGTH:
            if not cl:
                headers.append(h)
            cl.append(h[1])
        elif code == _TRANSFER_ENCODING:
            te.append(h[1])
        elif code == _CONNECTION:
            conn.append(h[1])
    if not conn:
        return headers, cl, te, _NO_TOKENS
    tokens = _tokens(conn)
    named = tokens - _NOT_HEADER_TOKENS
    if named and any(h[0].lower() in named for h in headers):
        headers = [h for h in headers if h[0].lower() not in named]
    return headers, cl, te, tokens


class _BodyFlow:
    """Registered on the upstream transport for the request body.

    The indirection lets a dying transport (whose ``connectionLost`` calls
    ``stopProducing``) leave the caller's body producer alone, so a retry can keep it.
    """

    __slots__ = ("body", "paused")

    def __init__(self, body: IBodyProducer) -> None:
        self.body = body
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.body.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.body.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer, IConsumer)
class Exchange:
    """One request in flight to a target.

    It is the push producer of the client-side response (register it with the twisted.web
    ``Request``) and the consumer the request body producer writes into.
    """

    __slots__ = (
        "done",
        "response_started",
        "_pool",
        "_method",
        "_head",
        "_headers",
        "_body",
        "_chunked",
        "_sink",
        "_timeout",
        "_conn",
        "_dialer",
        "_timer",
        "_paused",
        "_finished",
        "_retried",
        "_flow",
        "_body_done",
        "_body_written",
        "_pending",
        "_tunnel",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        method: bytes,
        head: bytes,
        headers: list[tuple[bytes, bytes]],
        body: IBodyProducer | None,
        chunked: bool,
        sink: ResponseSink,
        timeout: float | None,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self.response_started = False
        self._pool = pool
        self._method = method
        self._head = head
        self._headers = headers
        self._body = body
        self._chunked = chunked
        self._sink = sink
        self._timeout = timeout
        self._conn: _Connection | None = None
        self._dialer: _Dialer | None = None
        self._timer: Any = None
        self._paused = False
        self._finished = False
        self._retried = False
        self._flow: _BodyFlow | None = None
        self._body_done = False
        self._body_written = False  # any body byte reached an upstream transport
        self._pending: list[bytes] | None = None  # body bytes produced while reconnecting
        self._tunnel: Tunnel | None = None

    # -- public -----------------------------------------------------------------------

    def pause(self) -> None:
        self._paused = True
        conn = self._conn
        if conn is not None:
            conn.transport.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None:
            conn.transport.resumeProducing()

    pauseProducing = pause
    resumeProducing = resume

    def cancel(self) -> None:
        """Abort the upstream request (client gone, drain); ``done`` fails with CancelledError.

        After an upgrade, closes the tunnel instead.
        """
        if self._finished:
            if self._tunnel is not None:
                self._tunnel.close()
            return
        self._fail(Failure(CancelledError()))

    stopProducing = cancel

    # -- IConsumer (request body) -----------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data or self._finished:
            return
        conn = self._conn
        if conn is None:
            if self._pending is None:
                self._pending = []
            self._pending.append(data)
            return
        self._body_written = True
        if self._chunked:
            conn.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            conn.transport.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    # -- driving a connection ---------------------------------------------------------

    def _attach(self, conn: _Connection, reused: bool) -> None:
        self._conn = conn
        self._dialer = None
        conn.exchange = self
        conn.sink = self._sink
        conn.state = _HEAD
        conn.buf = b""
        conn.seen = False
        conn.no_body = self._method == b"HEAD"
        conn.reused = reused
        t = conn.transport
        if self._paused:
            t.pauseProducing()
        body = self._body
        if body is None:
            write_now(t, self._head)
            self._request_written()
            return
        flow = self._flow
        if flow is None:
            write_now(t, self._head)
            self._flow = flow = _BodyFlow(body)
            t.registerProducer(flow, True)
            body.startProducing(self).addCallbacks(self._body_finished, self._body_failed)
            return
        # A retry: the producer is already running; bytes it made meanwhile are pending.
        pending, self._pending = self._pending, None
        if pending:
            self._body_written = True
            if self._chunked:
                t.writeSequence([self._head] + [b"%x\r\n%s\r\n" % (len(p), p) for p in pending])
            else:
                t.writeSequence([self._head] + pending)
        else:
            t.write(self._head)
        if self._body_done:
            self._body_finished(None)
            return
        t.registerProducer(flow, True)
        flow.resumeProducing()

    def _body_finished(self, _: object) -> None:
        self._body_done = True
        conn = self._conn
        if self._finished or conn is None:
            return
        t = conn.transport
        if self._chunked:
            t.write(b"0\r\n\r\n")
        t.unregisterProducer()
        self._request_written()

    def _body_failed(self, f: Failure) -> None:
        self._body_done = True
        if not self._finished:
            self._fail(f)

    def _request_written(self) -> None:
        timeout = self._timeout
        if timeout and not self.response_started:
            self._timer = self._pool._reactor.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(Failure(UpstreamTimeout("net/http: timeout awaiting response headers")))

    # -- events from the connection ---------------------------------------------------

    def _informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._sink.informational(status, headers)

    def _response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        self.response_started = True
        self._sink.response_started(status, reason, headers, length)

    def _response_complete(self, conn: _Connection, reusable: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self._conn = None
        conn.exchange = None
        conn.sink = None
        t = conn.transport
        if self._body is not None and not self._body_done:
            # The upstream answered before reading the whole body (e.g. an early 413).
            reusable = False
            t.unregisterProducer()
            self._stop_body()
        if reusable:
            if self._paused:
                t.resumeProducing()
            self._pool._release(conn)
        else:
            conn.state = _DEAD
            t.loseConnection()
        self.done.callback(None)

    def _switching(self, conn: _Connection, reason: bytes, raw: list, rest: bytes) -> None:
        """A 101: hand the raw connection over to a Tunnel (SPEC §8.4)."""
        wanted = b", ".join(v for n, v in self._headers if n.lower() == b"upgrade")
        offered = b", ".join(v for n, v in raw if n.lower() == b"upgrade")
        if not wanted or wanted.lower() != offered.lower():
            self._protocol_error(
                conn,
                f"backend tried to switch protocol {offered.decode('latin-1')!r} "
                f"when {wanted.decode('latin-1')!r} was requested",
            )
            return
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        self._finished = True
        self._conn = None
        conn.exchange = None
        conn.sink = None
        conn.state = _TUNNEL
        if self._body is not None and not self._body_done:
            conn.transport.unregisterProducer()
            self._stop_body()
        if self._paused:
            conn.transport.resumeProducing()
        self._tunnel = tunnel = Tunnel(conn, rest)
        conn.tunnel = tunnel
        self.response_started = True
        self._sink.response_started(101, reason, raw, None)
        self._sink.upgraded(tunnel)
        self.done.callback(None)

    def _protocol_error(self, conn: _Connection, message: str) -> None:
        if self.response_started:
            self._fail(Failure(UpstreamAborted(message)))
        else:
            self._fail(Failure(UpstreamError(message)))

    def _connection_lost(self, conn: _Connection, state: int, reason: Failure) -> None:
        if state == _BODY_CLOSE and reason.check(error.ConnectionDone):
            self._response_complete(conn, False)
            return
        clean = reason.check(error.ConnectionDone) is not None
        if self.response_started:
            self._fail(Failure(UpstreamAborted("unexpected EOF" if clean else _describe(reason))))
            return
        if (
            conn.reused
            and not conn.seen
            and not self._retried
            and not self._body_written
            and (self._body is None or self._method in _IDEMPOTENT)
        ):
            self._retry(conn)
            return
        if conn.seen:
            message = "net/http: HTTP/1.x transport connection broken: unexpected EOF"
        else:
            message = "EOF" if clean else _describe(reason)
        self._fail(Failure(UpstreamError(message)))

    def _retry(self, conn: _Connection) -> None:
        """Go's transparent retry: a reused connection died before answering."""
        self._retried = True
        self._conn = None
        conn.exchange = None
        conn.sink = None
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        flow = self._flow
        if flow is not None and not self._body_done:
            flow.pauseProducing()
        self._pool._connect(self)

    def _connect_failed(self, exc: Exception) -> None:
        self._dialer = None
        if not self._finished:
            self._fail(Failure(exc))

    def _stop_body(self) -> None:
        self._body_done = True
        try:
            self._body.stopProducing()  # type: ignore[union-attr]
        except Exception:
            pass

    def _fail(self, f: Failure) -> None:
        if self._finished:
            return
        self._finished = True
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.exchange = None
            conn.sink = None
            conn.state = _DEAD
            if not conn.lost:
                conn.transport.abortConnection()
        dialer = self._dialer
        if dialer is not None:
            self._dialer = None
            dialer.cancel()
        if self._body is not None and self._flow is not None and not self._body_done:
            self._stop_body()
        self.done.errback(f)


def _describe(reason: Failure) -> str:
    if reason.check(error.ConnectionDone):
        return "EOF"
    if reason.check(error.ConnectionLost):
        return "read: connection reset by peer"
    return reason.getErrorMessage()


class _TunnelSide:
    """Producer registered on one side's transport that pauses the other side's reading."""

    __slots__ = ("source",)

    def __init__(self, source: Any) -> None:
        self.source = source

    def pauseProducing(self) -> None:
        self.source.pauseProducing()

    def resumeProducing(self) -> None:
        self.source.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _TunnelClient(Protocol):
    """The client half of a tunnel: the caller feeds it the client connection's events."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        self._tunnel._from_client(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self._tunnel._client_lost()


class Tunnel:
    """Raw byte relay between the upstream and the client after a 101 (SPEC §8.4, §13.2).

    Upstream bytes that arrive before ``attach`` (including those right after the 101 head)
    are buffered, with the upstream paused past 1 MiB.
    """

    def __init__(self, conn: _Connection, initial: bytes) -> None:
        self.done: Deferred[None] = Deferred()
        self._conn = conn
        self._upstream = conn.transport
        self._client: Any = None
        self._buffer: list[bytes] = [initial] if initial else []
        self._buffered = len(initial)
        self._upstream_closed = False
        self._closed = False
        self._aborted = False

    def attach(self, client_transport: Any) -> Protocol:
        """Start relaying to ``client_transport``; wire the returned protocol to its events.

        Any producer registered on the client transport (e.g. the HTTP channel) is replaced.
        """
        self._client = client_transport
        proto = _TunnelClient(self)
        proto.transport = client_transport
        if self._aborted:
            client_transport.abortConnection()
            return proto
        try:
            client_transport.unregisterProducer()
        except Exception:
            pass
        client_transport.registerProducer(_TunnelSide(self._upstream), True)
        if self._buffer:
            client_transport.writeSequence(self._buffer)
            self._buffer = []
        if self._upstream_closed:
            client_transport.unregisterProducer()
            client_transport.loseConnection()
            return proto
        self._upstream.registerProducer(_TunnelSide(client_transport), True)
        self._upstream.resumeProducing()
        client_transport.resumeProducing()
        return proto

    def close(self) -> None:
        """Close both sides at once (the target is draining)."""
        self._aborted = True
        self._finish()
        self._upstream.abortConnection()
        if self._client is not None:
            self._client.abortConnection()

    def _from_upstream(self, data: bytes) -> None:
        client = self._client
        if client is not None:
            client.write(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > 1 << 20:
            self._upstream.pauseProducing()

    def _from_client(self, data: bytes) -> None:
        if not self._upstream_closed:
            self._upstream.write(data)

    def _upstream_lost(self) -> None:
        self._upstream_closed = True
        client = self._client
        if client is not None and not self._closed:
            client.unregisterProducer()
            client.loseConnection()
        self._finish()

    def _client_lost(self) -> None:
        if not self._upstream_closed:
            self._upstream.unregisterProducer()
            self._upstream.loseConnection()
        self._finish()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self.done.callback(None)


@implementer(IResolutionReceiver)
class _Dialer(ClientFactory):
    """Resolves the target (unless it is an IP literal) and connects, address after address."""

    noisy = False

    def __init__(self, pool: UpstreamPool, exchange: Exchange) -> None:
        self.pool = pool
        self.exchange: Exchange | None = exchange
        self.addresses: list[str] = []
        self.connector: Any = None
        self.cancelled = False
        self.last_address = ""

    def start(self) -> None:
        pool = self.pool
        if pool._literal:
            self._dial(pool._host)
        else:
            pool._reactor.nameResolver.resolveHostName(self, pool._host, portNumber=pool._port)

    # IResolutionReceiver
    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if self.cancelled:
            return
        if not self.addresses:
            self._failed(UpstreamError(f"dial tcp: lookup {self.pool._host}: no such host"))
            return
        self._dial(self.addresses.pop(0))

    def _dial(self, host: str) -> None:
        pool = self.pool
        self.last_address = f"[{host}]:{pool._port}" if ":" in host else f"{host}:{pool._port}"
        self.connector = pool._reactor.connectTCP(
            host, pool._port, self, timeout=pool._connect_timeout
        )

    def buildProtocol(self, addr: Any) -> _Connection:
        conn = _Connection(self.pool)
        conn.factory = self
        conn.on_made = self._made
        return conn

    def _made(self, conn: _Connection) -> None:
        self.connector = None
        ex, self.exchange = self.exchange, None
        if ex is None or ex._finished or self.cancelled:
            self.pool._release(conn)  # a fresh connection is still worth keeping
        else:
            ex._attach(conn, False)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connector = None
        if self.cancelled or self.exchange is None:
            return
        if self.addresses:
            self._dial(self.addresses.pop(0))
            return
        where = f"dial tcp {self.last_address}"
        if reason.check(error.TimeoutError, error.TCPTimedOutError):
            exc: Exception = UpstreamTimeout(f"{where}: i/o timeout")
        elif reason.check(error.ConnectionRefusedError):
            exc = UpstreamError(f"{where}: connect: connection refused")
        else:
            exc = UpstreamError(f"{where}: {reason.getErrorMessage()}")
        self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex._connect_failed(exc)

    def cancel(self) -> None:
        self.cancelled = True
        self.exchange = None
        connector = self.connector
        if connector is not None:
            self.connector = None
            try:
                connector.stopConnecting()
            except error.NotConnectingError:
                pass


class UpstreamPool:
    """Keep-alive connections to one target (``host:port``), reused LIFO."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        *,
        max_idle: int = 100,
        connect_timeout: float = 30.0,
        idle_timeout: float = 90.0,
    ) -> None:
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        self._reactor = reactor
        self._host = host
        self._port = port
        self._literal = isIPAddress(host) or isIPv6Address(host)
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def forward(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: IBodyProducer | None,
        sink: ResponseSink,
        *,
        timeout: float | None,
    ) -> Exchange:
        """Send one request; the response goes to ``sink``. See the module docstring."""
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        framing = _FRAMING_NAMES
        for name, value in headers:
            drop = framing.get(name)
            if drop is None:
                drop = _is_framing(name)
            if drop:
                continue
            parts += (name, b": ", value, b"\r\n")
        chunked = False
        if body is not None and body.length == 0:
            body = None
        if body is None:
            if method in _ZERO_LENGTH_METHODS:
                parts.append(b"Content-Length: 0\r\n")
        elif body.length is UNKNOWN_LENGTH:
            chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n" % body.length)
        parts.append(b"\r\n")
        ex = Exchange(self, method, b"".join(parts), headers, body, chunked, sink, timeout)
        idle = self._idle
        while idle:
            conn = idle.pop()
            t = conn.transport
            if t.connected and not t.disconnecting:
                ex._attach(conn, True)
                return ex
            conn.state = _DEAD
        self._connect(ex)
        return ex

    def close(self) -> None:
        """Close the idle connections; busy ones close when their exchange ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.state = _DEAD
            conn.transport.loseConnection()

    # -- internals --------------------------------------------------------------------

    def _connect(self, ex: Exchange) -> None:
        if self._closed:
            ex._connect_failed(UpstreamError("upstream pool closed"))
            return
        dialer = _Dialer(self, ex)
        ex._dialer = dialer
        dialer.start()

    def _release(self, conn: _Connection) -> None:
        idle = self._idle
        if self._closed or len(idle) >= self._max_idle or conn.lost:
            conn.state = _DEAD
            conn.transport.loseConnection()
            return
        conn.state = _IDLE
        now = self._reactor.seconds()
        conn.idle_since = now
        if idle and idle[0].idle_since < now - self._idle_timeout:
            old = idle.pop(0)
            old.state = _DEAD
            old.transport.loseConnection()
        idle.append(conn)

    def _drop(self, conn: _Connection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
