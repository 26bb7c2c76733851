"""Pooled, keep-alive HTTP/1.1 client that forwards one request to one target.

This is the proxy's hot path, so it is a small protocol rather than
``twisted.web.client.Agent``: one ``Protocol`` per upstream TCP connection, the response head
parsed by the shared codec (:mod:`.http1`) once its blank line has arrived, direct method calls
into the caller's sink instead of Deferred chains, and producer/consumer flow control in both
directions (SPEC §9.1, §9.4, §9.5; DESIGN §4).

Connections are kept per target in a LIFO idle stack and reused only after a complete
response with keep-alive semantics. Go's transport detects idle connections the upstream
closed and retries a request once on a fresh connection when a *reused* connection dies
before any response byte; both are emulated here so one-shot upstreams (a response, then
FIN) never cause a 502 (SPEC §21.3).

The target timeout (headers must arrive within it once the request is written) costs no timer
per request: each pool keeps its waiting exchanges in arrival order with their deadlines and
arms one timer for the earliest.  An exchange reports its end through ``on_done`` (a direct
call); the ``done`` Deferred exists only for callers that ask for it.
"""

from __future__ import annotations

from collections.abc import Callable
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

from kamal_proxy.proxy.http1 import (
    MAX_RESPONSE_HEAD_BYTES,
    BadResponse,
    ChunkedDecoder,
    MalformedBody,
    find_head_end,
    parse_response,
    parse_response_head,
)
from kamal_proxy.proxy.sockets import idle, send_now
from kamal_proxy.proxy.splice import AVAILABLE as SPLICE_AVAILABLE
from kamal_proxy.proxy.splice import MIN_SPLICE, Splice, SpliceError

__all__ = [
    "Exchange",
    "ResponseSink",
    "Tunnel",
    "UpstreamAborted",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamTimeout",
    "request_framing",
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


# Framing of the upstream request is ours alone: a stray copy from the caller would smuggle.
_REQUEST_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
# Request header name as given -> whether it is framing (bounded cache).
_FRAMING_NAMES: dict[bytes, bool] = {}


def _is_framing(name: bytes) -> bool:
    drop = name.lower() in _REQUEST_FRAMING
    if len(_FRAMING_NAMES) < 2048:
        _FRAMING_NAMES[name] = drop
    return drop


_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
# Go sends `Content-Length: 0` for these methods when there is no body.
_ZERO_LENGTH_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_ZERO_LENGTH = b"Content-Length: 0\r\n"


def request_framing(method: bytes, body: IBodyProducer | None) -> tuple[bytes | None, bool]:
    """The framing header line of an upstream request and whether the body goes chunked.

    ``(None, False)``: no body is sent (none, or an empty one) and no framing line either;
    ``Content-Length: 0`` for POST/PUT/PATCH without a body, as Go does.
    """
    if body is None or body.length == 0:
        return (_ZERO_LENGTH if method in _ZERO_LENGTH_METHODS else None), False
    if body.length is UNKNOWN_LENGTH:
        return _CHUNKED, True
    return b"Content-Length: %d\r\n" % body.length, False


# Connection states.
_IDLE = 0
_HEAD = 1
_BODY_LENGTH = 2
_BODY_CHUNKED = 3
_BODY_CLOSE = 4
_TUNNEL = 5
_DEAD = 6
_SPLICE = 7  # the body goes kernel to kernel (proxy/splice.py)


class _Connection(Protocol):
    """One upstream TCP connection: writes requests, parses responses, relays tunnels."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.exchange: Exchange | None = None
        self.sink: Any = None
        self.state = _DEAD
        self.buf = b""
        self.scan = 0
        self.remaining = 0
        self.decoder: ChunkedDecoder | None = None
        self.keepalive = False
        self.no_body = False  # the current request is HEAD
        self.seen = False  # any response byte arrived for the current exchange
        self.reused = False
        self.lost = False
        self.idle_since = 0.0
        self.tunnel: Tunnel | None = None
        self.splice: Splice | None = None
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
            try:
                found = find_head_end(buf, self.scan)
                if found is None:
                    self.buf = buf
                    self.scan = len(buf) - 2 if len(buf) > 2 else 0
                    if not b"HTTP/".startswith(buf[:5]):
                        raise BadResponse(f"malformed HTTP response {buf[:64]!r}")
                    if len(buf) > MAX_RESPONSE_HEAD_BYTES:
                        raise BadResponse("server response headers exceeded 1048576 bytes")
                    return
                end, after = found
                head = buf[:end]
                v11, status, reason, headers, cl_values, te_values, tokens = parse_response(head)
            except BadResponse as e:
                self.buf = b""
                self.scan = 0
                ex._protocol_error(self, str(e))
                return
            self.scan = 0
            buf = buf[after:]
            if status < 200 and status != 101:
                ex._informational(status, headers)
                if self.exchange is not ex:
                    return
                if not buf:
                    self.buf = b""
                    return
                continue
            break
        self.buf = b""
        if status == 101:  # relayed with its hop-by-hop headers (Connection, Upgrade)
            ex._switching(self, reason, parse_response_head(head)[3], buf)
            return
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
            self.decoder = ChunkedDecoder(strict=False)
            if buf:
                self._chunked_received(buf)
        elif length is not None:
            self.state = _BODY_LENGTH
            self.remaining = length
            if length == 0:
                ex._response_complete(self, self.keepalive and not buf)
                return
            if buf:
                self.dataReceived(buf)
            if self.state == _BODY_LENGTH and self.remaining >= MIN_SPLICE and SPLICE_AVAILABLE:
                self._try_splice(ex)
        else:
            self.state = _BODY_CLOSE
            self.keepalive = False
            if buf:
                self.sink.response_data(buf)

    def _try_splice(self, ex: Exchange) -> None:
        """Move the rest of a plain body kernel to kernel when the sink can take it so (its
        ``splice_destination()`` gives the client's TCP transport, paused)."""
        offer = getattr(self.sink, "splice_destination", None)
        t = self.transport
        if offer is None or self.exchange is not ex or not idle(t):
            return
        destination = offer()
        if destination is None:
            return
        t.pauseProducing()
        self.state = _SPLICE
        self.splice = Splice(self.pool._reactor, t, destination, self.remaining, self._spliced)
        self.splice.start()

    def _spliced(self, error: BaseException | None) -> None:
        splice, self.splice = self.splice, None
        sink = self.sink
        if sink is not None and splice is not None:
            sink.splice_done(splice.moved)
        ex = self.exchange
        if ex is None:
            return
        if error is None:
            self.state = _BODY_LENGTH
            self.remaining = 0
            self.transport.resumeProducing()
            ex._response_complete(self, self.keepalive)
        elif isinstance(error, SpliceError) and error.side == "destination":
            ex._fail(UpstreamAborted(f"client: {error}"))
        else:
            ex._protocol_error(self, str(error))

    def _chunked_received(self, data: bytes) -> None:
        ex = self.exchange
        decoder = self.decoder
        if ex is None or decoder is None:
            return
        out: list[bytes] = []
        try:
            rest = decoder.feed(data, out)
        except MalformedBody as e:
            self._deliver(ex, out)
            if self.exchange is ex:
                ex._protocol_error(self, str(e))
            return
        if not self._deliver(ex, out):
            return
        if rest is not None:
            # End of the chunked body; trailers (if any) were dropped like Go does.
            self.decoder = None
            ex._response_complete(self, self.keepalive and not rest)

    def _deliver(self, ex: Exchange, pieces: list[bytes]) -> bool:
        sink = self.sink
        for piece in pieces:
            sink.response_data(piece)
            if self.exchange is not ex:
                return False
        return True

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


_PENDING = object()


@implementer(IPushProducer, IConsumer)
class Exchange:
    """One request in flight to a target.

    It is the push producer of the client-side response (register it with the client
    request) and the consumer the request body producer writes into.  Its end is reported
    to ``on_done(None)`` or ``on_done(exception)``, and through the ``done`` Deferred for
    callers that ask for one.
    """

    __slots__ = (
        "response_started",
        "_pool",
        "_method",
        "_head",
        "_upgrade",
        "_body",
        "_chunked",
        "_sink",
        "_timeout",
        "_now",
        "_conn",
        "_dialer",
        "_paused",
        "_finished",
        "_retried",
        "_flow",
        "_body_done",
        "_body_written",
        "_pending",
        "_tunnel",
        "_on_done",
        "_done",
        "_result",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        method: bytes,
        head: bytes,
        upgrade: bytes | None,
        body: IBodyProducer | None,
        chunked: bool,
        sink: ResponseSink,
        timeout: float | None,
        now: float | None = None,
        on_done: Callable[[BaseException | None], object] | None = None,
    ) -> None:
        self.response_started = False
        self._pool = pool
        self._method = method
        self._head = head
        self._upgrade = upgrade
        self._body = body
        self._chunked = chunked
        self._sink = sink
        self._timeout = timeout
        self._now = now
        self._conn: _Connection | None = None
        self._dialer: _Dialer | None = None
        self._paused = False
        self._finished = False
        self._retried = False
        self._flow: _BodyFlow | None = None
        self._body_done = False
        self._body_written = False  # any body byte reached an upstream transport
        self._pending: list[bytes] | None = None  # body bytes produced while reconnecting
        self._tunnel: Tunnel | None = None
        self._on_done = on_done
        self._done: Deferred[None] | None = None
        self._result: Any = _PENDING

    # -- public -----------------------------------------------------------------------

    @property
    def done(self) -> Deferred[None]:
        """Fires when the response is complete (or the upgrade done); fails with the error."""
        d = self._done
        if d is None:
            d = self._done = Deferred()
            result = self._result
            if result is not _PENDING:
                if result is None:
                    d.callback(None)
                else:
                    d.errback(result)
        return d

    def _complete(self, result: BaseException | None) -> None:
        self._result = result
        # The sink (the pipeline's exchange) holds this exchange: let refcounting free both.
        self._sink = None
        on_done = self._on_done
        if on_done is not None:
            self._on_done = None
            on_done(result)
        d = self._done
        if d is not None:
            if result is None:
                d.callback(None)
            else:
                d.errback(result)

    def pause(self) -> None:
        self._paused = True
        conn = self._conn
        if conn is not None and conn.splice is None:
            conn.transport.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None and conn.splice is None:
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
        self._fail(CancelledError())

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
            send_now(conn.transport, data)

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
        conn.scan = 0
        conn.seen = False
        conn.no_body = self._method == b"HEAD"
        conn.reused = reused
        t = conn.transport
        if self._paused:
            t.pauseProducing()
        body = self._body
        if body is None:
            send_now(t, self._head)
            self._request_written()
            return
        flow = self._flow
        if flow is None:
            send_now(t, self._head)
            self._flow = flow = _BodyFlow(body)
            t.registerProducer(flow, True)
            start = getattr(body, "start", None)
            if start is not None:  # the channel's RequestBody: a direct call, no Deferred
                start(self, self._body_ended)
                if not self._chunked and self._conn is conn and not self._body_done:
                    body.splice_to(t, self._spliced)  # the rest kernel to kernel, if it can
            else:
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

    def _spliced(self) -> None:
        self._body_written = True  # bytes reached the upstream: never retried

    def _body_ended(self, error: BaseException | None) -> None:
        if error is None:
            self._body_finished(None)
        else:
            self._body_failed(Failure(error))

    def _body_finished(self, _: object) -> None:
        self._body_done = True
        conn = self._conn
        if self._finished or conn is None:
            return
        t = conn.transport
        if self._chunked:
            t.write(b"0\r\n\r\n")
        t.unregisterProducer()
        self._now = None  # the body took its time: the timeout starts now
        self._request_written()

    def _body_failed(self, f: Failure) -> None:
        self._body_done = True
        if not self._finished:
            self._fail(f.value)

    def _request_written(self) -> None:
        timeout = self._timeout
        if timeout and not self.response_started:
            pool = self._pool
            now = self._now
            if now is None:
                now = pool._reactor.seconds()
            pool._wait_for_head(self, now + timeout)

    def _timed_out(self) -> None:
        self._fail(UpstreamTimeout("net/http: timeout awaiting response headers"))

    # -- events from the connection ---------------------------------------------------

    def _informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._sink.informational(status, headers)

    def _response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        if self._timeout:
            self._pool._head_arrived(self)
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
            self._pool._release(conn, self._now)
        else:
            conn.state = _DEAD
            t.loseConnection()
        self._complete(None)

    def _switching(self, conn: _Connection, reason: bytes, raw: list, rest: bytes) -> None:
        """A 101: hand the raw connection over to a Tunnel (SPEC §8.4)."""
        wanted = self._upgrade or b""
        offered = b", ".join(v for n, v in raw if n.lower() == b"upgrade")
        if not wanted or wanted.lower() != offered.lower():
            self._protocol_error(
                conn,
                f"backend tried to switch protocol {offered.decode('latin-1')!r} "
                f"when {wanted.decode('latin-1')!r} was requested",
            )
            return
        if self._timeout:
            self._pool._head_arrived(self)
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
        self._complete(None)

    def _protocol_error(self, conn: _Connection, message: str) -> None:
        if self.response_started:
            self._fail(UpstreamAborted(message))
        else:
            self._fail(UpstreamError(message))

    def _connection_lost(self, conn: _Connection, state: int, reason: Failure) -> None:
        if state == _BODY_CLOSE and reason.check(error.ConnectionDone):
            self._response_complete(conn, False)
            return
        clean = reason.check(error.ConnectionDone) is not None
        if self.response_started:
            self._fail(UpstreamAborted("unexpected EOF" if clean else _describe(reason)))
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
        self._fail(UpstreamError(message))

    def _retry(self, conn: _Connection) -> None:
        """Go's transparent retry: a reused connection died before answering."""
        self._retried = True
        self._conn = None
        conn.exchange = None
        conn.sink = None
        if self._timeout:
            self._pool._head_arrived(self)
        self._now = None
        flow = self._flow
        if flow is not None and not self._body_done:
            flow.pauseProducing()
        self._pool._connect(self)

    def _connect_failed(self, exc: Exception) -> None:
        self._dialer = None
        if not self._finished:
            self._fail(exc)

    def _stop_body(self) -> None:
        self._body_done = True
        try:
            self._body.stopProducing()  # type: ignore[union-attr]
        except Exception:
            pass

    def _fail(self, exc: BaseException) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timeout:
            self._pool._head_arrived(self)
        conn = self._conn
        if conn is not None:
            self._conn = None
            splice, conn.splice = conn.splice, None
            if splice is not None:
                splice.stop()
                if conn.sink is not None:
                    conn.sink.splice_done(splice.moved)
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
        self._complete(exc)


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
        # Exchanges waiting for response headers -> deadline (insertion order), one timer.
        self._waiting: dict[Exchange, float] = {}
        self._timer: Any = None
        self._timer_at = 0.0

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
        on_done: Callable[[BaseException | None], object] | None = None,
    ) -> Exchange:
        """Send one request; the response goes to ``sink``. See the module docstring."""
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        framing = _FRAMING_NAMES
        upgrade: list[bytes] = []
        for name, value in headers:
            drop = framing.get(name)
            if drop is None:
                drop = _is_framing(name)
            if drop:
                continue
            if len(name) == 7 and name.lower() == b"upgrade":
                upgrade.append(value)
            parts += (name, b": ", value, b"\r\n")
        line, chunked = request_framing(method, body)
        if line is None:
            body = None
        else:
            parts.append(line)
        parts.append(b"\r\n")
        return self.forward_head(
            method,
            b"".join(parts),
            body,
            chunked,
            sink,
            timeout=timeout,
            upgrade=b", ".join(upgrade) or None,
            on_done=on_done,
        )

    def forward_head(
        self,
        method: bytes,
        head: bytes,
        body: IBodyProducer | None,
        chunked: bool,
        sink: ResponseSink,
        *,
        timeout: float | None,
        upgrade: bytes | None = None,
        now: float | None = None,
        on_done: Callable[[BaseException | None], object] | None = None,
    ) -> Exchange:
        """Send a request whose head is already bytes, framing included (see
        :func:`request_framing`); ``upgrade`` is the ``Upgrade`` value asked for, if any;
        ``now`` (the reactor's clock, when the caller has just read it) saves a read."""
        ex = Exchange(self, method, head, upgrade, body, chunked, sink, timeout, now, on_done)
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

    # -- target timeouts ----------------------------------------------------------------

    def _wait_for_head(self, ex: Exchange, deadline: float) -> None:
        self._waiting[ex] = deadline
        timer = self._timer
        if timer is None:
            self._arm(deadline)
        elif deadline < self._timer_at:
            timer.cancel()
            self._arm(deadline)

    def _head_arrived(self, ex: Exchange) -> None:
        waiting = self._waiting
        if waiting.pop(ex, None) is not None and not waiting:
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()

    def _arm(self, deadline: float) -> None:
        reactor = self._reactor
        self._timer_at = deadline
        self._timer = reactor.callLater(max(0.0, deadline - reactor.seconds()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        expired = [ex for ex, deadline in self._waiting.items() if deadline <= now]
        for ex in expired:
            self._waiting.pop(ex, None)
        for ex in expired:
            ex._timed_out()
        if self._waiting and self._timer is None:
            self._arm(min(self._waiting.values()))

    # -- connections --------------------------------------------------------------------

    def _connect(self, ex: Exchange) -> None:
        if self._closed:
            ex._connect_failed(UpstreamError("upstream pool closed"))
            return
        dialer = _Dialer(self, ex)
        ex._dialer = dialer
        dialer.start()

    def _release(self, conn: _Connection, now: float | None = None) -> None:
        idle = self._idle
        if self._closed or len(idle) >= self._max_idle or conn.lost:
            conn.state = _DEAD
            conn.transport.loseConnection()
            return
        conn.state = _IDLE
        if now is None:
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
