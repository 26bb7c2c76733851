"""Bodies moved kernel to kernel (proxy/splice.py), over real loopback TCP sockets.

The far ends are plain blocking sockets driven by threads, so the splice under test runs in the
reactor exactly as in the proxy: its own descriptors on duplicated file descriptors, the pipe as
the only buffer, and every file descriptor it opened closed again at the end.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial import unittest

from kamal_proxy.proxy import splice as splicing
from kamal_proxy.proxy.splice import Splice, SpliceError
from kamal_proxy.proxy.upstream import UpstreamAborted, UpstreamPool

MiB = 1 << 20
BLOCK = bytes(range(256)) * 256  # 64 KiB


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets: (ours, non-blocking; theirs, blocking)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.setblocking(False)
    return ours, theirs


class Handle:
    """What Splice needs of a transport: its file descriptor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def send(sock: socket.socket, size: int, close: bool = True) -> threading.Thread:
    def run() -> None:
        try:
            left = size
            while left:
                chunk = BLOCK[: min(left, len(BLOCK))]
                sock.sendall(chunk)
                left -= len(chunk)
        except OSError:
            pass
        if close:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def receive(sock: socket.socket, into: list[bytes], pause_every: int = 0) -> threading.Thread:
    def run() -> None:
        got = 0
        while True:
            try:
                data = sock.recv(256 << 10)
            except OSError:
                return
            if not data:
                return
            into.append(data)
            got += len(data)
            if pause_every and got % pause_every < len(data):
                threading.Event().wait(0.01)  # a slow client: the pipe fills, the source waits

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def expected(size: int) -> str:
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = BLOCK[: min(left, len(BLOCK))]
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


class SpliceTests(unittest.TestCase):
    def setUp(self) -> None:
        if not splicing.AVAILABLE:
            raise unittest.SkipTest("os.splice is Linux only")
        self.src, self.src_far = tcp_pair()
        self.dst, self.dst_far = tcp_pair()
        for sock in (self.src, self.src_far, self.dst, self.dst_far):
            self.addCleanup(sock.close)

    def splice(self, length: int) -> tuple[Splice, Deferred[Any]]:
        done: Deferred[Any] = Deferred()
        splice = Splice(reactor, Handle(self.src), Handle(self.dst), length, done.callback)
        splice.start()
        return splice, done

    @inlineCallbacks
    def test_moves_every_byte_to_a_slow_reader(self):
        size = 5 * MiB + 123
        received: list[bytes] = []
        send(self.src_far, size)
        reader = receive(self.dst_far, received, pause_every=MiB)
        splice, done = self.splice(size)
        result = yield done
        self.assertIsNone(result)
        self.assertEqual(splice.moved, size)
        self.dst.close()
        reader.join(10)
        self.assertEqual(hashlib.sha256(b"".join(received)).hexdigest(), expected(size))

    @inlineCallbacks
    def test_source_ends_early(self):
        send(self.src_far, 300 << 10)
        received: list[bytes] = []
        receive(self.dst_far, received)
        splice, done = self.splice(MiB)
        error = yield done
        self.assertIsInstance(error, SpliceError)
        self.assertEqual(error.side, "source")
        self.assertEqual(splice.moved, 300 << 10)

    @inlineCallbacks
    def test_destination_goes_away(self):
        send(self.src_far, 4 * MiB, close=False)
        self.dst_far.close()
        splice, done = self.splice(4 * MiB)
        error = yield done
        self.assertIsInstance(error, SpliceError)
        self.assertEqual(error.side, "destination")

    @inlineCallbacks
    def test_stop_releases_everything(self):
        send(self.src_far, 8 * MiB, close=False)  # nobody reads: the pipe fills, it waits
        calls: list[Any] = []
        splice = Splice(reactor, Handle(self.src), Handle(self.dst), 8 * MiB, calls.append)
        splice.start()
        yield deferLater(reactor, 0.05, lambda: None)
        during = open_fds()
        splice.stop()
        self.assertEqual(open_fds(), during - 4)  # the two duplicates and the pipe
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(calls, [])
        self.assertNotIn(splice._reader, reactor.getReaders())
        self.assertNotIn(splice._writer, reactor.getWriters())


class _Origin(Protocol):
    """Answers every request with ``factory.size`` bytes (Content-Length ``factory.length``)."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        factory = self.factory
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % factory.length)
        left = factory.size
        while left:
            chunk = BLOCK[: min(left, len(BLOCK))]
            self.transport.write(chunk)
            left -= len(chunk)
        if factory.size < factory.length:
            self.transport.loseConnection()


class SplicingSink:
    """A response sink that offers a client socket for the body, as the pipeline does."""

    def __init__(self, destination: socket.socket) -> None:
        self.destination = Handle(destination)
        self.head: bytes = b""
        self.streamed = 0
        self.spliced = 0

    def informational(self, status, headers):
        pass

    def response_started(self, status, reason, headers, length):
        self.length = length

    def response_data(self, data: bytes) -> None:
        self.streamed += len(data)

    def upgraded(self, tunnel):
        pass

    def splice_destination(self) -> Any:
        return self.destination

    def splice_done(self, moved: int) -> None:
        self.spliced += moved


class UpstreamSpliceTests(unittest.TestCase):
    """The upstream client hands a plain body to a splice, and takes the connection back."""

    def setUp(self) -> None:
        if not splicing.AVAILABLE:
            raise unittest.SkipTest("os.splice is Linux only")
        factory = Factory.forProtocol(_Origin)
        factory.noisy = False
        factory.size = factory.length = 2 * MiB
        factory.connections = []
        self.factory = factory
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.pool = UpstreamPool(reactor, "127.0.0.1", port.getHost().port)
        self.addCleanup(self.pool.close)
        self.dst, self.dst_far = tcp_pair()
        self.addCleanup(self.dst.close)
        self.addCleanup(self.dst_far.close)

    def forward(self, sink: SplicingSink):
        return self.pool.forward(b"GET", b"/", [(b"Host", b"h")], None, sink, timeout=5)

    @inlineCallbacks
    def test_body_spliced_and_connection_reused(self):
        received: list[bytes] = []
        reader = receive(self.dst_far, received)
        sink = SplicingSink(self.dst)
        yield self.forward(sink).done
        self.assertEqual(sink.streamed + sink.spliced, 2 * MiB)
        self.assertGreater(sink.spliced, MiB)
        self.assertEqual(self.pool.idle_count, 1)  # back in the pool, reading again
        again = SplicingSink(self.dst)
        yield self.forward(again).done  # and reused
        self.assertEqual(len(self.factory_connections()), 1)
        self.dst.close()
        reader.join(10)
        self.assertEqual(sum(map(len, received)), sink.spliced + again.spliced)

    def factory_connections(self) -> list[Any]:
        return self.factory.connections

    @inlineCallbacks
    def test_truncated_body_aborts(self):
        self.factory.size = MiB  # announces 2 MiB, sends one, closes
        receive(self.dst_far, [])
        sink = SplicingSink(self.dst)
        yield self.assertFailure(self.forward(sink).done, UpstreamAborted)
        self.assertEqual(self.pool.idle_count, 0)

    @inlineCallbacks
    def test_cancel_stops_the_splice(self):
        # Small socket buffers and nobody reading the far end: the splice has to wait.
        self.dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        self.dst_far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        sink = SplicingSink(self.dst)
        ex = self.forward(sink)
        yield deferLater(reactor, 0.1, lambda: None)
        before = open_fds()
        ex.cancel()
        yield self.assertFailure(ex.done, Exception)
        self.assertLess(open_fds(), before)  # the pipe and the duplicates are closed
        self.assertEqual(self.pool.idle_count, 0)


class _Keep(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self.transport)


class ChannelSpliceTests(unittest.TestCase):
    """A request body spliced from the client's socket to another TCP transport."""

    def setUp(self) -> None:
        if not splicing.AVAILABLE:
            raise unittest.SkipTest("os.splice is Linux only")
        from kamal_proxy.proxy.channel import make_site

        self.requests: list[Any] = []
        self.ends: list[Any] = []
        self.respond: Any = None

        class Handler:
            def handle(inner, request: Any) -> None:  # noqa: N805
                self.requests.append(request)
                if request.body is None:
                    return
                request.body.start(self.consumer, self.ends.append)
                request.body.splice_to(self.upstream, lambda: None)
                if self.respond is not None:
                    self.respond(request)

        self.consumer = self  # bytes the channel delivers in Python (those before the splice)
        self.written = 0
        site = make_site(Handler(), reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def write(self, data: bytes) -> None:
        self.written += len(data)

    @inlineCallbacks
    def upstream_pair(self):
        factory = Factory.forProtocol(_Keep)
        factory.noisy = False
        factory.made = Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        far = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(far.close)
        self.upstream = yield factory.made
        self.addCleanup(self.upstream.loseConnection)
        return far

    def client(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(sock.close)
        return sock

    @inlineCallbacks
    def wait_for(self, condition) -> Any:
        for _ in range(500):
            if condition():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("timed out")

    @inlineCallbacks
    def test_whole_body_spliced_then_the_connection_goes_on(self):
        far = yield self.upstream_pair()
        received: list[bytes] = []
        reader = receive(far, received)
        size = 3 * MiB
        client = self.client()
        client.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        sender = send(client, size, close=False)
        yield self.wait_for(lambda: self.ends and not sender.is_alive())
        self.assertEqual(self.ends, [None])
        self.requests[0].respond(200, [], b"ok")
        client.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        yield self.wait_for(lambda: len(self.requests) == 2)
        self.upstream.loseConnection()
        yield self.wait_for(lambda: not reader.is_alive())
        self.assertEqual(self.written + sum(map(len, received)), size)
        self.assertGreater(sum(map(len, received)), MiB)

    @inlineCallbacks
    def test_stopped_body_ends_the_splice_and_closes_after_the_answer(self):
        far = yield self.upstream_pair()
        receive(far, [])
        client = self.client()
        client.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (64 * MiB))
        send(client, 2 * MiB, close=False)
        yield self.wait_for(lambda: self.requests and self.requests[0].conn._splice)
        request = self.requests[0]
        request.body.stopProducing()
        self.assertIsNone(request.conn._splice)
        request.respond(413, [], b"too large")
        pieces: list[bytes] = []
        reader = receive(client, pieces)
        yield self.wait_for(lambda: not reader.is_alive())  # the proxy closed the connection
        answer = b"".join(pieces)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"Connection: close\r\n", answer)

    @inlineCallbacks
    def test_client_gone_mid_body(self):
        far = yield self.upstream_pair()
        receive(far, [])
        client = self.client()
        client.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (8 * MiB))
        send(client, MiB, close=False)
        yield self.wait_for(lambda: self.requests and self.requests[0].conn._splice)
        client.close()
        yield self.wait_for(lambda: self.ends)
        from kamal_proxy.proxy.channel import ClientGone

        self.assertIsInstance(self.ends[0], ClientGone)
