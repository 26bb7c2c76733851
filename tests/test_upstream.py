"""Tests for kamal_proxy.proxy.upstream: real loopback upstreams plus fake-clock unit tests."""

from __future__ import annotations

import hashlib
from io import BytesIO

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error, reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.proxy import upstream as up
from kamal_proxy.proxy.upstream import (
    UpstreamAborted,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)


class _TimersOn:
    """The real reactor for sockets, ``clock`` for timers."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def __getattr__(self, name):
        return getattr(reactor, name)

    def callLater(self, *args, **kwargs):
        return self._clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self._clock.seconds()


class Sink:
    """A ResponseSink that records everything."""

    def __init__(self) -> None:
        self.info: list[tuple[int, list]] = []
        self.status: int | None = None
        self.reason: bytes | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunks: list[bytes] = []
        self.tunnel: up.Tunnel | None = None
        self.received = 0

    def informational(self, status, headers):
        self.info.append((status, headers))

    def response_started(self, status, reason, headers, length):
        self.status, self.reason, self.headers, self.length = status, reason, headers, length

    def response_data(self, data):
        self.chunks.append(data)
        self.received += len(data)

    def upgraded(self, tunnel):
        self.tunnel = tunnel

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class Request:
    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]):
        self.method, self.target, self.headers = method, target, headers
        self.body = b""
        self.chunked = False

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


class ServerProtocol(Protocol):
    """A small HTTP/1.1 server; the factory's handler writes the responses."""

    def connectionMade(self) -> None:
        self.buf = b""
        self.req: Request | None = None
        self.remaining = 0
        self.tunnel = False
        self.lost = Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        self.buf += data
        while True:
            if self.req is None:
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                lines = self.buf[:i].split(b"\r\n")
                self.buf = self.buf[i + 4 :]
                method, target, _ = lines[0].split(b" ")
                headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
                self.req = req = Request(method, target, headers)
                req.chunked = req.header(b"transfer-encoding") == b"chunked"
                self.remaining = int(req.header(b"content-length") or 0)
                self.factory.heads.append(req)
                if self.factory.on_head is not None and self.factory.on_head(self, req):
                    return
            req = self.req
            if req.chunked:
                while True:
                    i = self.buf.find(b"\r\n")
                    if i < 0:
                        return
                    size = int(self.buf[:i], 16)
                    if len(self.buf) < i + 2 + size + 2:
                        return
                    req.body += self.buf[i + 2 : i + 2 + size]
                    self.buf = self.buf[i + 2 + size + 2 :]
                    if size == 0:
                        break
            else:
                take = self.buf[: self.remaining]
                req.body += take
                self.buf = self.buf[len(take) :]
                self.remaining -= len(take)
                if self.remaining:
                    return
            self.req = None
            self.factory.requests.append(req)
            self.factory.handler(self, req)
            if self.tunnel:
                if self.buf:
                    self.transport.write(self.buf)
                return

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class ServerFactory(Factory):
    protocol = ServerProtocol
    noisy = False

    def __init__(self, handler, on_head=None) -> None:
        self.handler = handler
        self.on_head = on_head
        self.connections: list[ServerProtocol] = []
        self.requests: list[Request] = []
        self.heads: list[Request] = []


def respond(body: bytes = b"ok", status: bytes = b"200 OK", extra: bytes = b""):
    def handler(proto: ServerProtocol, req: Request) -> None:
        payload = req.body if body is None else body
        proto.transport.write(
            b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(payload), extra, payload)
        )

    return handler


@implementer(IBodyProducer)
class StreamBody:
    """An IBodyProducer fed by the test, like the lead's client-body producer."""

    def __init__(self, length=UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer = None
        self.finished: Deferred = Deferred()
        self.stopped = False
        self.paused = 0

    def startProducing(self, consumer):
        self.consumer = consumer
        return self.finished

    def send(self, data: bytes) -> None:
        self.consumer.write(data)

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        pass

    def stopProducing(self):
        self.stopped = True


class MalformedBody(Exception):
    pass


class LoopbackTests(unittest.TestCase):
    """Against real upstream servers on 127.0.0.1 ephemeral ports."""

    def serve(
        self, handler, on_head=None, host="127.0.0.1", timers: Clock | None = None
    ) -> tuple[ServerFactory, UpstreamPool]:
        """A server running ``handler`` and a pool for it (its timers on ``timers`` if given)."""
        factory = ServerFactory(handler, on_head)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        pool_reactor = reactor if timers is None else _TimersOn(timers)
        pool = UpstreamPool(pool_reactor, host, port.getHost().port)
        self.addCleanup(self._shutdown, factory, port, pool)
        return factory, pool

    @inlineCallbacks
    def _shutdown(self, factory, port, pool):
        pool.close()
        yield port.stopListening()
        for conn in factory.connections:
            conn.transport.abortConnection()
        yield DeferredList([c.lost for c in factory.connections])
        for _ in range(200):  # let the client ends of the aborted connections go
            busy = [
                s
                for s in reactor.getReaders() + reactor.getWriters()
                if isinstance(getattr(s, "protocol", None), up._Connection)
            ]
            if not busy:
                break
            yield deferLater(reactor, 0.005, lambda: None)

    def get(self, pool, target=b"/", method=b"GET", headers=None, body=None, timeout=None):
        sink = Sink()
        ex = pool.forward(
            method, target, headers or [(b"Host", b"app.test")], body, sink, timeout=timeout
        )
        return ex, sink

    @inlineCallbacks
    def test_keepalive_reuses_one_connection(self):
        factory, pool = self.serve(respond(b"hello", extra=b"X-App: 1\r\n"))
        for i in range(5):
            ex, sink = self.get(pool, b"/r%d?a=b;c&d=%%x" % i)
            yield ex.done
            self.assertEqual((sink.status, sink.reason, sink.body), (200, b"OK", b"hello"))
            self.assertEqual(sink.length, 5)
            self.assertEqual(sink.header(b"x-app"), [b"1"])
            self.assertTrue(ex.response_started)
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual([r.target for r in factory.requests][1], b"/r1?a=b;c&d=%x")
        self.assertEqual(pool.idle_count, 1)

    @inlineCallbacks
    def test_request_head_is_exact(self):
        factory, pool = self.serve(respond())
        headers = [(b"Host", b"www.example.com:8443"), (b"X-Forwarded-For", b"1.2.3.4")]
        ex, sink = self.get(pool, b"/echo/a%2Fb%20c?e=%20+", b"DELETE", headers)
        yield ex.done
        req = factory.requests[0]
        self.assertEqual((req.method, req.target), (b"DELETE", b"/echo/a%2Fb%20c?e=%20+"))
        self.assertEqual(req.headers, headers)  # no User-Agent or anything else added

    @inlineCallbacks
    def test_post_without_body_sends_content_length_zero(self):
        factory, pool = self.serve(respond())
        ex, _ = self.get(pool, method=b"POST", body=FileBodyProducer(BytesIO(b"")))
        yield ex.done
        self.assertEqual(factory.requests[0].header(b"content-length"), b"0")
        ex, _ = self.get(pool, method=b"GET")
        yield ex.done
        self.assertIsNone(factory.requests[1].header(b"content-length"))

    @inlineCallbacks
    def test_stray_framing_headers_are_replaced(self):
        factory, pool = self.serve(respond(None))
        headers = [(b"Host", b"h"), (b"Content-Length", b"99"), (b"Transfer-Encoding", b"x")]
        ex, sink = self.get(
            pool, method=b"PUT", headers=headers, body=FileBodyProducer(BytesIO(b"abc"))
        )
        yield ex.done
        req = factory.requests[0]
        self.assertEqual(req.headers, [(b"Host", b"h"), (b"Content-Length", b"3")])
        self.assertEqual(sink.body, b"abc")

    @inlineCallbacks
    def test_large_upload_streams_intact(self):
        data = bytes(range(256)) * (10 * 4096)  # 10 MiB
        factory, pool = self.serve(
            lambda p, r: respond(hashlib.sha256(r.body).hexdigest().encode())(p, r)
        )
        ex, sink = self.get(pool, method=b"POST", body=FileBodyProducer(BytesIO(data)))
        yield ex.done
        self.assertEqual(sink.body, hashlib.sha256(data).hexdigest().encode())
        self.assertEqual(factory.requests[0].header(b"content-length"), b"10485760")

    @inlineCallbacks
    def test_chunked_upload_is_forwarded_chunked(self):
        factory, pool = self.serve(respond(None))
        body = StreamBody()
        ex, sink = self.get(pool, method=b"POST", body=body)
        yield deferLater(reactor, 0.01, lambda: None)
        body.send(b"hello ")
        yield deferLater(reactor, 0.01, lambda: None)
        body.send(b"world")
        body.finished.callback(None)
        yield ex.done
        req = factory.requests[0]
        self.assertTrue(req.chunked)
        self.assertEqual((req.body, sink.body), (b"hello world", b"hello world"))

    @inlineCallbacks
    def test_body_failure_aborts_and_propagates(self):
        factory, pool = self.serve(respond())
        body = StreamBody()
        ex, sink = self.get(pool, method=b"POST", body=body)
        yield deferLater(reactor, 0.01, lambda: None)
        body.send(b"partial")
        body.finished.errback(MalformedBody("invalid chunk length"))
        yield self.assertFailure(ex.done, MalformedBody)
        yield factory.connections[0].lost
        self.assertEqual(factory.requests, [])
        self.assertEqual(pool.idle_count, 0)

    @inlineCallbacks
    def test_one_shot_upstream_serves_many_requests(self):
        def one_shot(proto, req):
            respond(b"once")(proto, req)
            proto.transport.loseConnection()

        factory, pool = self.serve(one_shot)
        for _ in range(20):
            ex, sink = self.get(pool)
            yield ex.done
            self.assertEqual((sink.status, sink.body), (200, b"once"))
        # Also back to back, without giving the FIN time to arrive.
        results = []
        for _ in range(10):
            ex, sink = self.get(pool, method=b"POST")
            yield ex.done
            results.append(sink.body)
        self.assertEqual(results, [b"once"] * 10)

    @inlineCallbacks
    def test_connection_close_upstream(self):
        def close(proto, req):
            respond(b"bye", extra=b"Connection: close\r\n")(proto, req)
            proto.transport.loseConnection()

        factory, pool = self.serve(close)
        for _ in range(5):
            ex, sink = self.get(pool)
            yield ex.done
            self.assertEqual(sink.body, b"bye")
            self.assertEqual(sink.header(b"connection"), [])
        self.assertEqual(len(factory.connections), 5)
        self.assertEqual(pool.idle_count, 0)

    @inlineCallbacks
    def test_http10_without_keepalive_is_not_reused(self):
        def h10(proto, req):
            ka = req.target == b"/ka"
            proto.transport.write(
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n%s\r\nok"
                % (b"Connection: keep-alive\r\n" if ka else b"")
            )

        factory, pool = self.serve(h10)
        for target in (b"/", b"/", b"/ka", b"/ka"):
            ex, sink = self.get(pool, target)
            yield ex.done
            self.assertEqual(sink.body, b"ok")
        self.assertEqual(len(factory.connections), 3)

    @inlineCallbacks
    def test_idle_close_is_detected(self):
        factory, pool = self.serve(respond())
        ex, _ = self.get(pool)
        yield ex.done
        self.assertEqual(pool.idle_count, 1)
        factory.connections[0].transport.loseConnection()
        yield factory.connections[0].lost
        for _ in range(100):
            if pool.idle_count == 0:
                break
            yield deferLater(reactor, 0.005, lambda: None)
        self.assertEqual(pool.idle_count, 0)
        ex, sink = self.get(pool)
        yield ex.done
        self.assertEqual(sink.status, 200)

    @inlineCallbacks
    def test_close_delimited_body(self):
        def handler(proto, req):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall ")
            proto.transport.write(b"of it")
            proto.transport.loseConnection()

        factory, pool = self.serve(handler)
        ex, sink = self.get(pool)
        yield ex.done
        self.assertEqual((sink.body, sink.length), (b"all of it", None))
        self.assertEqual(pool.idle_count, 0)

    @inlineCallbacks
    def test_chunked_response_drops_trailers_keeps_announcement(self):
        def handler(proto, req):
            proto.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n"
                b"Connection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\n"
                b"Content-Length: 999\r\n\r\n"
                b"5;ext=1\r\nhello\r\n1\r\n \r\n"
            )
            proto.transport.write(b"5\r\nworld\r\n0\r\nX-Sum: 42\r\n\r\n")

        factory, pool = self.serve(handler)
        for _ in range(2):
            ex, sink = self.get(pool)
            yield ex.done
            self.assertEqual(sink.body, b"hello world")
            self.assertEqual(sink.length, None)
            names = [n.lower() for n, _ in sink.headers]
            self.assertEqual(names, [b"trailer"])
        self.assertEqual(len(factory.connections), 1)

    @inlineCallbacks
    def test_chunked_response_streams_progressively(self):
        servers = []

        def handler(proto, req):
            proto.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n"
            )
            servers.append(proto)

        factory, pool = self.serve(handler)
        ex, sink = self.get(pool)
        for _ in range(2000):
            if sink.chunks:
                break
            yield deferLater(reactor, 0.005, lambda: None)
        # The first chunk is relayed while the server still holds back the second.
        self.assertEqual(sink.body, b"one")
        self.assertFalse(ex.done.called)
        servers[0].transport.write(b"3\r\ntwo\r\n0\r\n\r\n")
        yield ex.done
        self.assertEqual(sink.chunks, [b"one", b"two"])

    @inlineCallbacks
    def test_malformed_chunk_after_start_aborts(self):
        def handler(proto, req):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")

        factory, pool = self.serve(handler)
        ex, sink = self.get(pool)
        yield self.assertFailure(ex.done, UpstreamAborted)
        self.assertEqual(sink.status, 200)

    @inlineCallbacks
    def test_informational_responses_are_relayed(self):
        def handler(proto, req):
            proto.transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            reactor.callLater(
                0.01,
                proto.transport.write,
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
            )

        factory, pool = self.serve(handler)
        ex, sink = self.get(pool)
        yield ex.done
        self.assertEqual(sink.info, [(103, [(b"Link", b"</a.css>")]), (100, [])])
        self.assertEqual((sink.status, sink.body), (200, b"x"))

    @inlineCallbacks
    def test_head_204_304_have_no_body(self):
        def handler(proto, req):
            if req.method == b"HEAD":
                proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")
            elif req.target == b"/204":
                proto.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                proto.transport.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")

        factory, pool = self.serve(handler)
        for method, target, status, length in (
            (b"HEAD", b"/", 200, 1),
            (b"GET", b"/204", 204, None),
            (b"GET", b"/304", 304, 10),
        ):
            ex, sink = self.get(pool, target, method)
            yield ex.done
            self.assertEqual((sink.status, sink.length, sink.body), (status, length, b""))
            self.assertEqual(
                sink.header(b"content-length"), [] if length is None else [b"%d" % length]
            )
        self.assertEqual(len(factory.connections), 1)

    @inlineCallbacks
    def test_bad_status_line_is_502(self):
        factory, pool = self.serve(lambda p, r: p.transport.write(b"garbage\r\n"))
        ex, sink = self.get(pool)
        failure = yield self.assertFailure(ex.done, UpstreamError)
        self.assertIn("malformed HTTP response", str(failure))
        self.assertFalse(ex.response_started)
        self.assertIsNone(sink.status)

    @inlineCallbacks
    def test_close_without_answer_is_502(self):
        factory, pool = self.serve(lambda p, r: p.transport.loseConnection())
        for _ in range(3):
            ex, _ = self.get(pool)
            failure = yield self.assertFailure(ex.done, UpstreamError)
            self.assertNotIsInstance(failure, UpstreamTimeout)
            self.assertEqual(str(failure), "EOF")

    @inlineCallbacks
    def test_early_close_mid_body_aborts(self):
        def handler(proto, req):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n1234567")
            proto.transport.loseConnection()

        factory, pool = self.serve(handler)
        ex, sink = self.get(pool)
        yield self.assertFailure(ex.done, UpstreamAborted)
        self.assertEqual((sink.status, sink.body, sink.length), (200, b"1234567", 1000))
        self.assertEqual(pool.idle_count, 0)

    @inlineCallbacks
    def test_connection_refused_is_502(self):
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        pool = UpstreamPool(reactor, "127.0.0.1", number)
        ex, _ = self.get(pool)
        failure = yield self.assertFailure(ex.done, UpstreamError)
        self.assertEqual(str(failure), f"dial tcp 127.0.0.1:{number}: connect: connection refused")

    @inlineCallbacks
    def test_localhost_name_is_resolved(self):
        factory, pool = self.serve(respond(b"named"), host="localhost")
        ex, sink = self.get(pool)
        yield ex.done
        self.assertEqual(sink.body, b"named")

    @inlineCallbacks
    def test_target_timeout(self):
        factory, pool = self.serve(lambda p, r: None)
        ex, sink = self.get(pool, timeout=0.05)
        failure = yield self.assertFailure(ex.done, UpstreamTimeout)
        self.assertEqual(str(failure), "net/http: timeout awaiting response headers")
        yield factory.connections[0].lost

    @inlineCallbacks
    def test_timeout_does_not_cover_body(self):
        # Real sockets, the timer on a fake clock: the rest of the body comes after the timeout
        # has expired however slowly the head got here.
        servers = []

        def handler(proto, req):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            servers.append(proto)

        clock = Clock()
        factory, pool = self.serve(handler, timers=clock)
        ex, sink = self.get(pool, timeout=0.05)
        for _ in range(1000):
            if sink.body == b"ab":
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(sink.body, b"ab", "the head and the first bytes never arrived")
        clock.advance(1)
        self.assertFalse(ex.done.called, "the timeout cut the body")
        servers[0].transport.write(b"cd")
        yield ex.done
        self.assertEqual(sink.body, b"abcd")

    @inlineCallbacks
    def test_early_response_before_body_is_relayed(self):
        def on_head(proto, req):
            proto.transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n"
                b"Connection: close\r\n\r\nbig"
            )
            proto.transport.loseConnection()
            return True

        factory, pool = self.serve(respond(), on_head)
        body = StreamBody(length=1 << 20)
        ex, sink = self.get(pool, method=b"POST", body=body)
        yield deferLater(reactor, 0.01, lambda: None)
        body.send(b"x" * 1000)
        yield ex.done
        self.assertEqual((sink.status, sink.body), (413, b"big"))
        self.assertTrue(body.stopped)

    @inlineCallbacks
    def test_cancel_aborts_upstream(self):
        factory, pool = self.serve(lambda p, r: None)
        ex, _ = self.get(pool)
        while not factory.heads:
            yield deferLater(reactor, 0.005, lambda: None)
        ex.cancel()
        yield self.assertFailure(ex.done, CancelledError)
        yield factory.connections[0].lost
        self.assertEqual(pool.idle_count, 0)
        ex.cancel()  # idempotent

    @inlineCallbacks
    def test_large_body_with_slow_consumer_pauses_upstream(self):
        size = 20 * 1024 * 1024
        block = bytes(range(256)) * 256  # 64 KiB
        paused = []

        @implementer(IBodyProducer)
        class Streamer:
            def __init__(self, transport):
                self.transport = transport
                self.sent = 0
                self.paused = False
                self.stopped = False

            def pauseProducing(self):
                self.paused = True
                paused.append(self.sent)

            def resumeProducing(self):
                self.paused = False
                reactor.callLater(0, self.pump)

            def stopProducing(self):
                self.stopped = True

            def pump(self):
                while not self.paused and not self.stopped and self.sent < size:
                    self.transport.write(block)
                    self.sent += len(block)
                if self.sent >= size:
                    self.transport.unregisterProducer()

        def handler(proto, req):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            streamer = Streamer(proto.transport)
            proto.transport.registerProducer(streamer, True)
            streamer.pump()

        factory, pool = self.serve(handler)
        sink = Sink()
        digest = hashlib.sha256()
        ex = None
        resumes = []

        class SlowSink(Sink):
            def response_data(self, data):
                digest.update(data)
                self.received += len(data)
                if self.received // (1 << 20) != (self.received - len(data)) // (1 << 20):
                    ex.pause()  # a slow client: pause at every MiB for a moment
                    resumes.append(reactor.callLater(0.02, ex.resume))

        sink = SlowSink()
        ex = pool.forward(b"GET", b"/big", [(b"Host", b"h")], None, sink, timeout=5)
        yield ex.done
        for call in resumes:
            if call.active():
                call.cancel()
        self.assertEqual(sink.received, size)
        expected = hashlib.sha256()
        for _ in range(size // len(block)):
            expected.update(block)
        self.assertEqual(digest.hexdigest(), expected.hexdigest())
        self.assertTrue(paused, "the upstream never felt back-pressure")
        self.assertEqual(sink.length, size)
        self.assertEqual(pool.idle_count, 1)

    @inlineCallbacks
    def test_upgrade_tunnel_relays_both_ways(self):
        def handler(proto, req):
            proto.tunnel = True
            proto.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\nhello-first"
            )

        factory, pool = self.serve(handler)
        headers = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        ex, sink = self.get(pool, b"/ws", headers=headers)
        yield ex.done
        self.assertEqual(sink.status, 101)
        self.assertIn((b"Upgrade", b"websocket"), sink.headers)
        self.assertIn((b"Connection", b"Upgrade"), sink.headers)
        tunnel = sink.tunnel
        self.assertIsNotNone(tunnel)
        yield deferLater(reactor, 0.02, lambda: None)
        client = StringTransport()
        proto = tunnel.attach(client)
        self.assertEqual(client.value(), b"hello-first")
        client.clear()
        message = b"m" * (1 << 20)
        proto.dataReceived(message)
        while len(client.value()) < len(message):
            yield deferLater(reactor, 0.005, lambda: None)
        self.assertEqual(client.value(), message)
        self.assertFalse(tunnel.done.called)
        tunnel.close()
        self.assertTrue(tunnel.done.called)
        self.assertTrue(client.disconnecting)
        yield factory.connections[0].lost

    @inlineCallbacks
    def test_upgrade_client_close_closes_upstream(self):
        def handler(proto, req):
            proto.tunnel = True
            proto.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )

        factory, pool = self.serve(handler)
        headers = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        ex, sink = self.get(pool, headers=headers)
        yield ex.done
        client = StringTransport()
        proto = sink.tunnel.attach(client)
        proto.connectionLost(Failure(error.ConnectionDone()))
        yield factory.connections[0].lost
        self.assertTrue(sink.tunnel.done.called)

    @inlineCallbacks
    def test_unrequested_switch_is_502(self):
        factory, pool = self.serve(
            lambda p, r: p.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"
            )
        )
        ex, sink = self.get(pool)
        yield self.assertFailure(ex.done, UpstreamError)
        self.assertIsNone(sink.tunnel)


class FakeResolver:
    def __init__(self, addresses):
        self.addresses = addresses

    def resolveHostName(self, receiver, host, portNumber=0, **kw):
        from twisted.internet.address import IPv4Address

        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()


class FakeClockTests(unittest.TestCase):
    """Timeout, retry and flow-control logic against MemoryReactorClock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, "10.0.0.1", 3000)

    def connect(self, index=-1) -> tuple[up._Connection, StringTransport]:
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        conn = factory.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport

    def forward(self, method=b"GET", body=None, timeout=None) -> tuple[up.Exchange, Sink]:
        sink = Sink()
        ex = self.pool.forward(method, b"/", [(b"Host", b"h")], body, sink, timeout=timeout)
        return ex, sink

    def test_timeout_starts_after_request_written(self):
        body = StreamBody()
        ex, sink = self.forward(b"POST", body, timeout=0.5)
        conn, transport = self.connect()
        self.reactor.advance(10)
        self.assertFalse(ex.done.called)
        body.send(b"abc")
        body.finished.callback(None)
        self.assertTrue(transport.value().endswith(b"3\r\nabc\r\n0\r\n\r\n"))
        self.reactor.advance(0.49)
        self.assertFalse(ex.done.called)
        self.reactor.advance(0.02)
        self.failureResultOf(ex.done, UpstreamTimeout)
        self.assertTrue(transport.disconnecting)

    def test_headers_stop_the_timer(self):
        ex, sink = self.forward(timeout=0.5)
        conn, transport = self.connect()
        self.reactor.advance(0.4)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\na")
        self.reactor.advance(5)
        self.assertFalse(ex.done.called)
        conn.dataReceived(b"b")
        self.successResultOf(ex.done)
        self.assertEqual(sink.body, b"ab")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_timeout_when_zero(self):
        ex, _ = self.forward(timeout=0)
        self.connect()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connect_timeout_is_504(self):
        ex, _ = self.forward()
        _, _, factory, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual(timeout, 30.0)
        factory.clientConnectionFailed(None, Failure(error.TimeoutError()))
        f = self.failureResultOf(ex.done, UpstreamTimeout)
        self.assertEqual(str(f.value), "dial tcp 10.0.0.1:3000: i/o timeout")

    def test_names_are_tried_in_turn(self):
        self.reactor.nameResolver = FakeResolver(["10.0.0.7", "10.0.0.8"])
        self.pool = UpstreamPool(self.reactor, "web-1", 3000)
        ex, _ = self.forward()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.7", 3000))
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(self.reactor.tcpClients[1][:2], ("10.0.0.8", 3000))
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        f = self.failureResultOf(ex.done, UpstreamError)
        self.assertEqual(str(f.value), "dial tcp 10.0.0.8:3000: connect: connection refused")

    def test_unknown_name_is_502(self):
        self.reactor.nameResolver = FakeResolver([])
        self.pool = UpstreamPool(self.reactor, "nope", 3000)
        ex, _ = self.forward()
        f = self.failureResultOf(ex.done, UpstreamError)
        self.assertEqual(str(f.value), "dial tcp: lookup nope: no such host")

    def complete(self, conn, body=b"ok"):
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def test_reused_connection_dying_before_answer_is_retried(self):
        ex, _ = self.forward()
        conn, transport = self.connect()
        self.complete(conn)
        self.successResultOf(ex.done)
        self.assertEqual(self.pool.idle_count, 1)
        ex, sink = self.forward()
        self.assertEqual(len(self.reactor.tcpClients), 1)  # reused
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2)  # retried on a fresh connection
        conn2, transport2 = self.connect()
        self.assertTrue(transport2.value().startswith(b"GET / HTTP/1.1\r\n"))
        self.complete(conn2, b"retried")
        self.successResultOf(ex.done)
        self.assertEqual(sink.body, b"retried")

    def test_retry_happens_only_once(self):
        ex, _ = self.forward()
        conn, _ = self.connect()
        self.complete(conn)
        ex2, _ = self.forward()
        conn.connectionLost(Failure(error.ConnectionLost()))
        conn2, _ = self.connect()
        conn2.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(ex2.done, UpstreamError)

    def test_retry_keeps_unsent_idempotent_body(self):
        ex, _ = self.forward()
        conn, _ = self.connect()
        self.complete(conn)
        body = StreamBody()
        ex, sink = self.forward(b"PUT", body)
        conn.connectionLost(Failure(error.ConnectionDone()))
        body.send(b"late")  # produced while reconnecting
        conn2, transport2 = self.connect()
        body.finished.callback(None)
        self.assertTrue(transport2.value().endswith(b"\r\n\r\n4\r\nlate\r\n0\r\n\r\n"))
        self.complete(conn2)
        self.successResultOf(ex.done)

    def test_no_retry_after_body_bytes_or_for_fresh_connections(self):
        ex, _ = self.forward()
        conn, _ = self.connect()
        self.complete(conn)
        body = StreamBody()
        ex, _ = self.forward(b"PUT", body)
        body.send(b"sent")
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(ex.done, UpstreamError)
        self.assertTrue(body.stopped)
        ex, _ = self.forward()
        conn, _ = self.connect()
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(ex.done, UpstreamError)

    def test_no_retry_of_post_with_body(self):
        ex, _ = self.forward()
        conn, _ = self.connect()
        self.complete(conn)
        clients = len(self.reactor.tcpClients)
        ex, _ = self.forward(b"POST", StreamBody())
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(ex.done, UpstreamError)
        self.assertEqual(len(self.reactor.tcpClients), clients)

    def test_pause_resume_reach_the_transport(self):
        ex, sink = self.forward()
        ex.pause()  # before the connection exists
        conn, transport = self.connect()
        self.assertEqual(transport.producerState, "paused")
        ex.resume()
        self.assertEqual(transport.producerState, "producing")
        ex.pause()
        self.complete(conn)
        self.assertEqual(transport.producerState, "producing")  # idle connections must read
        self.assertEqual(self.pool.idle_count, 1)

    def test_request_body_flow_control(self):
        body = StreamBody(length=10)
        ex, _ = self.forward(b"POST", body)
        conn, transport = self.connect()
        self.assertIsNotNone(transport.producer)
        transport.producer.pauseProducing()
        self.assertEqual(body.paused, 1)
        body.send(b"0123456789")
        body.finished.callback(None)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.value().endswith(b"Content-Length: 10\r\n\r\n0123456789"))

    def test_cancel_while_connecting(self):
        ex, _ = self.forward()
        ex.cancel()
        self.failureResultOf(ex.done, CancelledError)
        connector = self.reactor.connectors[0]
        self.assertTrue(connector.stoppedConnecting)

    def test_unsolicited_data_on_idle_connection_drops_it(self):
        ex, _ = self.forward()
        conn, transport = self.connect()
        self.complete(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(self.pool.idle_count, 0)
        self.assertTrue(transport.disconnected)

    def test_extra_bytes_after_response_prevent_reuse(self):
        ex, _ = self.forward()
        conn, transport = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA")
        self.successResultOf(ex.done)
        self.assertEqual(self.pool.idle_count, 0)
        self.assertTrue(transport.disconnecting)

    def test_byte_at_a_time_parsing(self):
        ex, sink = self.forward()
        conn, _ = self.connect()
        response = (
            b"HTTP/1.1 103 Early Hints\r\nLink: <x>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nX-A: 1\r\n  continued\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nT: x\r\n\r\n"
        )
        for i in range(len(response)):
            conn.dataReceived(response[i : i + 1])
        self.successResultOf(ex.done)
        self.assertEqual(sink.info, [(103, [(b"Link", b"<x>")])])
        self.assertEqual((sink.status, sink.reason, sink.body), (201, b"Created", b"wikipedia"))
        self.assertEqual(sink.headers, [(b"X-A", b"1 continued")])
        self.assertEqual(self.pool.idle_count, 1)

    def test_bare_lf_and_mixed_heads(self):
        for response, headers, body in (
            (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", [(b"Content-Length", b"2")], b"ok"),
            (
                b"HTTP/1.1 200 OK\nContent-Length: 6\n\nab\r\n\r\n",
                [(b"Content-Length", b"6")],
                b"ab\r\n\r\n",
            ),
            (
                b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok",
                [(b"X-A", b"1"), (b"Content-Length", b"2")],
                b"ok",
            ),
        ):
            self.pool = UpstreamPool(self.reactor, "10.0.0.1", 3000)
            ex, sink = self.forward()
            conn, _ = self.connect()
            conn.dataReceived(response)
            self.successResultOf(ex.done)
            self.assertEqual((sink.headers, sink.body), (headers, body))

    def test_bad_responses_are_502(self):
        for response, message in (
            (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed HTTP status code"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "bad Content"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer"),
            (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", "malformed MIME header"),
            (b"SSH-2.0-OpenSSH", "malformed HTTP response"),
        ):
            ex, sink = self.forward()
            conn, transport = self.connect()
            conn.dataReceived(response)
            f = self.failureResultOf(ex.done, UpstreamError)
            self.assertIn(message, str(f.value))
            self.assertTrue(transport.disconnected)

    def test_max_idle(self):
        self.pool = UpstreamPool(self.reactor, "10.0.0.1", 3000, max_idle=2)
        exchanges = [self.forward()[0] for _ in range(3)]
        conns = [self.connect(i) for i in range(3)]
        for conn, _ in conns:
            self.complete(conn)
        self.assertEqual(self.pool.idle_count, 2)
        self.assertTrue(conns[2][1].disconnecting)
        for ex in exchanges:
            self.successResultOf(ex.done)
        self.pool.close()
        self.assertEqual(self.pool.idle_count, 0)
        self.assertTrue(conns[0][1].disconnecting)

    def test_upgrade_buffers_until_attach(self):
        headers = [(b"Host", b"h"), (b"Upgrade", b"websocket")]
        sink = Sink()
        ex = self.pool.forward(b"GET", b"/ws", headers, None, sink, timeout=1)
        conn, transport = self.connect()
        conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\n\r\nab")
        conn.dataReceived(b"cd")
        self.successResultOf(ex.done)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        client = StringTransport()
        proto = sink.tunnel.attach(client)
        self.assertEqual(client.value(), b"abcd")
        proto.dataReceived(b"up")
        self.assertTrue(transport.value().endswith(b"up"))
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(client.disconnecting)
        self.successResultOf(sink.tunnel.done)


class ParserProperties(unittest.TestCase):
    """However the bytes are split, the same response comes out and the connection is reused."""

    @settings(max_examples=150, deadline=None)
    @given(
        body=st.binary(max_size=300),
        chunk_sizes=st.lists(st.integers(1, 50), max_size=10),
        cuts=st.lists(st.integers(0, 600), max_size=8),
        chunked=st.booleans(),
    )
    def test_any_split(self, body, chunk_sizes, cuts, chunked):
        if chunked:
            encoded, rest, sizes = b"", body, chunk_sizes or [len(body) or 1]
            while rest:
                size = sizes[len(encoded) % len(sizes)]
                encoded += b"%x;x=y\r\n%s\r\n" % (min(size, len(rest)), rest[:size])
                rest = rest[size:]
            wire = (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + encoded
                + b"0\r\nX-T: 1\r\n\r\n"
            )
        else:
            wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        clock = MemoryReactorClock()
        pool = UpstreamPool(clock, "10.0.0.1", 3000)
        sink = Sink()
        ex = pool.forward(b"GET", b"/", [(b"Host", b"h")], None, sink, timeout=None)
        conn = clock.tcpClients[0][2].buildProtocol(None)
        conn.makeConnection(StringTransport())
        points = sorted({c for c in cuts if 0 < c < len(wire)})
        for a, b in zip([0] + points, points + [len(wire)], strict=True):
            conn.dataReceived(wire[a:b])
        self.successResultOf(ex.done)
        self.assertEqual(sink.body, body)
        self.assertEqual(pool.idle_count, 1)
