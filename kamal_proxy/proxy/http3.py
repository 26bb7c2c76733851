"""HTTP/3 (``--http3``): aioquic's ``H3Connection`` on :mod:`kamal_proxy.proxy.quic`.

The HTTP side of QUIC, behind one narrow interface so that the proxy pipeline needs only a
thin adapter (:mod:`kamal_proxy.proxy.http3_bridge`):

* :class:`H3Request` is one request: ``method``, ``scheme``, ``authority``, ``path``,
  ``headers`` (bytes pairs, lowercase names), ``peer``, a ``body`` (an ``IBodyProducer``
  fed from the stream with QUIC flow control), and the response sink ``start(status,
  headers)``, ``data(bytes)``, ``end()``, ``abort()``, ``register_producer``.
  ``on_gone`` is called once if the client goes away first (stream reset, STOP_SENDING,
  connection lost).
* :class:`Http3Server` is the listener's protocol: a :class:`~kamal_proxy.proxy.quic.
  QuicEndpoint` whose sessions speak HTTP/3 and hand every request to a handler.
  :meth:`Http3Server.drain` is the graceful stop: GOAWAY to every connection, each closed
  once its requests are answered; later requests on them are refused with
  ``H3_REQUEST_REJECTED``, which tells the client it may retry them elsewhere.

Flow control, both ways: request body bytes count against the stream's receive window until
the consumer (the upstream connection) takes them, so a slow upstream slows the client
down; response bytes buffered in QUIC above :data:`SEND_HIGH_WATER` pause the producer (the
upstream response), which resumes below :data:`SEND_LOW_WATER` as acknowledgements arrive.

Several worker processes.  QUIC has no accept(): every datagram of every connection arrives on
the one UDP port.  With one socket per worker bound with ``SO_REUSEPORT`` (the main process
binds them: ``kamal_proxy.process.listening.bind_udp``), Linux picks the socket by a hash of
the 4-tuple, so all datagrams of a connection reach the same worker as long as the client's
address and port stay the same and the set of sockets does not change.  A datagram that reaches
a worker without the connection is dropped (no stateless reset), so the client times out and
reconnects.  That is what connection migration (a new client address, e.g. NAT rebinding or
Wi-Fi to mobile) then does: within one worker it works, aioquic validates the new path; across
workers the connection is lost and the client opens a new one, which browsers do transparently
(and they fall back to HTTP/2 over TCP meanwhile).  A worker that is replaced changes the hash
for the others' connections too, with the same result.  Steering by connection ID (an eBPF
``SO_ATTACH_REUSEPORT_EBPF`` program) would keep them; it is left out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.proxy.quic import (
    CertificateSource,
    FlowControlledConnection,
    QuicEndpoint,
    QuicSession,
)

#: Response bytes buffered in QUIC (unsent or unacknowledged) above which the producer pauses.
SEND_HIGH_WATER = 1 << 20
#: ... and below which it resumes.
SEND_LOW_WATER = 256 << 10

_log = Logger()

Handler = Callable[["H3Request"], None]


class RequestAborted(Exception):
    """The client reset the request stream or the connection ended."""


# -- the request ---------------------------------------------------------------------------


@implementer(IBodyProducer)
class H3RequestBody:
    """A request body as it arrives on the stream, with QUIC flow control.

    Bytes not yet given to the consumer are held against the stream's receive window (see
    ``FlowControlledConnection``): the client can send at most a window ahead of the
    consumer.  ``stopProducing`` discards the rest and asks the client to stop sending; the
    ``startProducing`` Deferred then never fires (as for the HTTP/1 body).
    """

    def __init__(self, request: H3Request, length: Any) -> None:
        self.length = length
        self._request: H3Request | None = request
        self._consumer: Any = None
        self._d: defer.Deferred[None] | None = None
        self._buf: deque[bytes] = deque()
        self._done = False
        self._error: Exception | None = None
        self._paused = False
        self._stopped = False

    @property
    def complete(self) -> bool:
        """Every byte of the body arrived (or it failed): nothing more to read."""
        return self._done

    # IBodyProducer

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        if self._consumer is not None or self._stopped:
            raise RuntimeError("request body can be produced only once")
        self._consumer = consumer
        if self._error is not None:
            return defer.fail(self._error)
        d: defer.Deferred[None] = defer.Deferred()
        self._d = d
        self._flush()
        return d

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            self._flush()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._consumer = None
        self._d = None
        request = self._request
        self._request = None
        self._buf.clear()
        if request is not None:
            request._body_stopped(self._done)

    # fed by the session

    def _feed(self, data: bytes) -> None:
        request = self._request
        if self._stopped or self._done or request is None or not data:
            return
        consumer = self._consumer
        if consumer is not None and not self._paused and not self._buf:
            consumer.write(data)
            return
        request._hold(len(data))
        self._buf.append(data)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._flush()

    def _fail(self, error: Exception) -> None:
        if self._done or self._stopped:
            return
        self._done = True
        self._error = error
        self._drop()
        if self._d is not None:
            d, self._d = self._d, None
            d.errback(error)

    def _drop(self) -> None:
        request = self._request
        if self._buf and request is not None:
            request._release(sum(len(b) for b in self._buf))
        self._buf.clear()

    def _flush(self) -> None:
        buf = self._buf
        consumer = self._consumer
        if consumer is None or self._stopped:
            return
        released = 0
        while buf and not self._paused and not self._stopped:
            chunk = buf.popleft()
            released += len(chunk)
            consumer.write(chunk)
        request = self._request
        if released and request is not None:
            request._release(released)
        if self._done and not buf and not self._stopped and self._d is not None:
            d, self._d = self._d, None
            d.callback(None)


class H3Request:
    """One HTTP/3 request and its response sink (see the module docstring)."""

    def __init__(
        self,
        session: Http3Session,
        stream_id: int,
        method: bytes,
        scheme: bytes,
        authority: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        length: Any,
    ) -> None:
        self.session = session
        self.stream_id = stream_id
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.headers = headers
        self.peer: tuple[str, int] = _split_addr(session.peer)
        self.body = H3RequestBody(self, length)
        #: called once with a RequestAborted when the client goes away before the end
        self.on_gone: Callable[[RequestAborted], None] | None = None
        self.started = False
        self.ended = False
        self.gone = False
        self._producer: IPushProducer | None = None
        self._producer_paused = False

    # -- the response sink

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the response head (names lowercase, no connection-specific fields)."""
        if self.ended or self.gone or self.started:
            return
        self.started = True
        self._send(self.session.send_headers, [(b":status", b"%d" % status), *headers])

    def data(self, data: bytes) -> None:
        if self.ended or self.gone or not data:
            return
        session = self.session
        if not self._send(session.send_data, data, False):
            return
        if (
            self._producer is not None
            and not self._producer_paused
            and session.quic.send_buffered(self.stream_id) > SEND_HIGH_WATER
        ):
            self._producer_paused = True
            session.paused.add(self)
            self._producer.pauseProducing()

    def end(self) -> None:
        """The response is complete."""
        if self.ended or self.gone:
            return
        self.ended = True
        self._send(self.session.send_data, b"", True)
        self.session.request_ended(self)

    def abort(self) -> None:
        """Reset the stream (the response cannot be completed)."""
        if self.ended or self.gone:
            return
        self.ended = True
        self.session.reset(self.stream_id, ErrorCode.H3_INTERNAL_ERROR)
        self.session.request_ended(self)

    def register_producer(self, producer: IPushProducer) -> None:
        """``producer`` is paused while too much of the response waits in QUIC."""
        self._producer = producer
        self._producer_paused = False

    def unregister_producer(self) -> None:
        self._producer = None
        self.session.paused.discard(self)

    def _send(self, send: Callable[..., None], *args: Any) -> bool:
        """Write to the stream; a stream the client already reset makes the request gone
        (told on the next reactor turn, not inside the caller's write)."""
        try:
            send(self.stream_id, *args)
            return True
        except Exception:  # noqa: BLE001 - e.g. reset by STOP_SENDING in the same batch
            self.ended = True
            self.session.request_ended(self)
            self.session.reactor.callLater(0, self._client_gone)
            return False

    # -- for the session and the body

    def _maybe_resume(self) -> bool:
        """Resume the producer if the send buffer drained; True when it did (or is gone)."""
        producer = self._producer
        if producer is None or self.gone or self.ended:
            return True
        if self.session.quic.send_buffered(self.stream_id) < SEND_LOW_WATER:
            self._producer_paused = False
            producer.resumeProducing()
            return True
        return False

    def _client_gone(self) -> None:
        if self.gone or (self.ended and self.on_gone is None):
            self.gone = True
            self.body._fail(RequestAborted("stream reset"))
            return
        self.gone = True
        on_gone, self.on_gone = self.on_gone, None
        error = RequestAborted("client went away")
        # The pipeline learns first, so a failing body read finds the request already over.
        if on_gone is not None:
            on_gone(error)
        self.body._fail(error)

    def _hold(self, size: int) -> None:
        self.session.quic.hold(self.stream_id, size)

    def _release(self, size: int) -> None:
        self.session.quic.release(self.stream_id, size)
        self.session.flush_soon()  # the new credit goes out

    def _body_stopped(self, complete: bool) -> None:
        self.session.quic.forget(self.stream_id)
        if not complete and not self.gone:
            self.session.stop_reading(self.stream_id)
        self.session.flush_soon()


def _split_addr(addr: Any) -> tuple[str, int]:
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


# -- the connection --------------------------------------------------------------------------


class Http3Session(QuicSession):
    """One QUIC connection speaking HTTP/3."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        quic: FlowControlledConnection,
        server: Http3Server,
    ) -> None:
        super().__init__(endpoint, quic)
        self.server = server
        self.h3: H3Connection | None = None
        self.requests: dict[int, H3Request] = {}
        self.paused: set[H3Request] = set()
        #: streams whose response ended but is not all acknowledged yet (a graceful close waits)
        self.unacknowledged: set[int] = set()
        self.next_stream_id = 0  # lowest request stream id not seen yet
        self.goaway_id: int | None = None

    # -- QUIC events

    def quic_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.h3 = H3Connection(self.quic)
            if self.server.draining:
                self.goaway()
            return
        h3 = self.h3
        if h3 is None:
            return
        if isinstance(event, (events.StreamReset, events.StopSendingReceived)):
            request = self.requests.get(event.stream_id)
            if request is not None:
                if isinstance(event, events.StopSendingReceived) or not request.body.complete:
                    request._client_gone()
                    self._forget(request)
        for h3_event in h3.handle_event(event):
            if isinstance(h3_event, DataReceived):
                request = self.requests.get(h3_event.stream_id)
                if request is not None:
                    request.body._feed(h3_event.data)
                    if h3_event.stream_ended:
                        request.body._finish()
            elif isinstance(h3_event, HeadersReceived):
                self._headers(h3_event)

    def _headers(self, event: HeadersReceived) -> None:
        stream_id = event.stream_id
        request = self.requests.get(stream_id)
        if request is not None:  # trailers: dropped, as over HTTP/1 and HTTP/2
            if event.stream_ended:
                request.body._finish()
            return
        if stream_id % 4 != 0:
            return  # not a client-initiated bidirectional (request) stream
        if self.goaway_id is not None and stream_id >= self.goaway_id:
            self.reset(stream_id, ErrorCode.H3_REQUEST_REJECTED)
            self.stop_reading(stream_id, ErrorCode.H3_REQUEST_REJECTED)
            return
        self.next_stream_id = max(self.next_stream_id, stream_id + 4)
        pseudo: dict[bytes, bytes] = {}
        headers: list[tuple[bytes, bytes]] = []
        length: Any = UNKNOWN_LENGTH
        for name, value in event.headers:
            if name[:1] == b":":
                pseudo[name] = value
            else:
                headers.append((name, value))
                if name == b"content-length" and value.isdigit():
                    length = int(value)
        if event.stream_ended:
            length = 0
        request = H3Request(
            self,
            stream_id,
            pseudo.get(b":method", b"GET"),
            pseudo.get(b":scheme", b"https"),
            pseudo.get(b":authority", b""),
            pseudo.get(b":path", b"/"),
            headers,
            length,
        )
        self.requests[stream_id] = request
        if event.stream_ended:
            request.body._finish()
        try:
            self.server.handler(request)
        except Exception:  # noqa: BLE001 - one request's failure, not the connection's
            _log.failure("HTTP/3: error handling a request")
            request.abort()

    # -- sending, for H3Request

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        assert self.h3 is not None
        self.h3.send_headers(stream_id, headers)
        self.flush_soon()

    def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        assert self.h3 is not None
        self.h3.send_data(stream_id, data, end)
        self.flush_soon()

    def reset(self, stream_id: int, code: int) -> None:
        try:
            self.quic.reset_stream(stream_id, code)
        except Exception:  # noqa: BLE001 - already reset or finished
            pass
        self.flush_soon()

    def stop_reading(self, stream_id: int, code: int = ErrorCode.H3_NO_ERROR) -> None:
        """Ask the client to stop sending the request body (STOP_SENDING)."""
        try:
            self.quic.stop_stream(stream_id, code)
        except Exception:  # noqa: BLE001 - the stream's receiving side is already over
            pass
        self.flush_soon()

    def request_ended(self, request: H3Request) -> None:
        """The response ended (or was reset): read no more of an unfinished body."""
        if not request.body.complete:
            request.body.stopProducing()  # and STOP_SENDING to the client
        self._forget(request)

    def _forget(self, request: H3Request) -> None:
        if self.requests.get(request.stream_id) is request:
            del self.requests[request.stream_id]
        self.paused.discard(request)
        self.quic.forget(request.stream_id)
        self.unacknowledged.add(request.stream_id)

    def after_transmit(self) -> None:
        if self.paused:
            for request in list(self.paused):
                if request._maybe_resume():
                    self.paused.discard(request)
        if self.unacknowledged:
            send_buffered = self.quic.send_buffered
            self.unacknowledged = {s for s in self.unacknowledged if send_buffered(s)}
        if self.goaway_id is not None and not self.requests and not self.unacknowledged:
            # Closing discards what QUIC has not delivered yet: only once all is acknowledged.
            self.close_now(ErrorCode.H3_NO_ERROR)

    # -- stopping

    def goaway(self) -> None:
        """Announce the end (GOAWAY), then close once the requests seen so far are answered."""
        if self.closed or self.goaway_id is not None:
            return
        h3 = self.h3
        if h3 is None:  # still in the handshake: nothing to finish
            self.close_now(ErrorCode.H3_NO_ERROR)
            return
        self.goaway_id = self.next_stream_id
        control = h3._local_control_stream_id
        self.quic.send_stream_data(
            control, encode_frame(FrameType.GOAWAY, encode_uint_var(self.goaway_id))
        )
        self.flush_soon()  # then closes in after_transmit once nothing is left to deliver

    def connection_lost(self) -> None:
        requests = list(self.requests.values())
        self.requests.clear()
        self.paused.clear()
        for request in requests:
            request._client_gone()
        self.server.session_closed(self)


# -- the server ------------------------------------------------------------------------------


class Http3Server:
    """The HTTP/3 listener's protocol and its graceful stop."""

    def __init__(
        self,
        reactor: IReactorTime,
        certificates: CertificateSource,
        handler: Handler,
    ) -> None:
        self.reactor = reactor
        self.handler = handler
        self.sessions: set[Http3Session] = set()
        self.draining = False
        self._idle: list[defer.Deferred[None]] = []
        self.endpoint = QuicEndpoint(reactor, certificates, self._session)

    def _session(self, endpoint: QuicEndpoint, quic: FlowControlledConnection) -> Http3Session:
        session = Http3Session(endpoint, quic, self)
        self.sessions.add(session)
        return session

    def session_closed(self, session: Http3Session) -> None:
        self.sessions.discard(session)
        if not self.sessions and self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def drain(self) -> defer.Deferred[None]:
        """GOAWAY everywhere; fires once every connection has closed."""
        self.draining = True
        self.endpoint.stop_accepting()
        for session in list(self.sessions):
            session.goaway()
        if not self.sessions:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def close_all(self) -> None:
        """Close every connection now (after the stop deadline)."""
        for session in list(self.sessions):
            session.close_now(ErrorCode.H3_NO_ERROR)
