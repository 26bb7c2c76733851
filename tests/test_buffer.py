"""Tests for kamal_proxy.proxy.buffer (SPEC §10; scenarios 74, 92-95 at the unit level)."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.proxy import buffer as buf
from kamal_proxy.proxy.buffer import (
    Buffer,
    BufferingSink,
    TooLarge,
    buffer_request_body,
    is_streaming_response,
)
from kamal_proxy.proxy.channel import ClientGone, MalformedBody
from kamal_proxy.proxy.upstream import UpstreamPool

HELLO = b"Hello, World!"


class Consumer:
    """Collects what a producer writes; optionally pauses it after every write."""

    def __init__(self, pause_each: bool = False) -> None:
        self.chunks: list[bytes] = []
        self.pause_each = pause_each
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))
        if self.pause_each and self.producer is not None:
            self.producer.pauseProducing()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def read_back(buffer: Buffer, clock: Clock | None = None) -> bytes:
    """Replay a buffer through its producer, driving the clock between turns."""
    clock = clock or Clock()
    producer = buffer.as_producer(reactor=clock)
    consumer = Consumer()
    results: list = []
    producer.startProducing(consumer).addBoth(results.append)
    for _ in range(100_000):
        if results:
            break
        clock.advance(0)
    assert results == [None], results
    return consumer.data


@implementer(IBodyProducer)
class FakeBody:
    """A client request body the test feeds by hand, recording flow control calls."""

    def __init__(self, length=UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer = None
        self.d: Deferred | None = None
        self.stopped = False
        self.paused = False

    def startProducing(self, consumer):
        self.consumer = consumer
        self.d = Deferred()
        return self.d

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            if self.stopped:
                return
            self.consumer.write(chunk)

    def finish(self) -> None:
        self.d.callback(None)

    def fail(self, exc: Exception) -> None:
        self.d.errback(exc)


class Sink:
    """A ResponseSink that records the order of everything it is told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def informational(self, status, headers):
        self.events.append(("info", status))

    def response_started(self, status, reason, headers, length):
        self.events.append(("start", status, reason, headers, length))

    def response_data(self, data):
        self.events.append(("data", bytes(data)))

    def upgraded(self, tunnel):
        self.events.append(("upgraded", tunnel))

    @property
    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    @property
    def started(self) -> tuple | None:
        starts = [e for e in self.events if e[0] == "start"]
        return starts[0] if starts else None


class Exchange:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    def cancel(self):
        self.calls.append("cancel")


class TempDirMixin:
    """Points the system temp dir at a private directory so spill files can be listed."""

    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.patch(tempfile, "tempdir", self.tmp)
        self.logs: list[tuple[str, str, dict]] = []

        def observe(event):
            if "kp_msg" in event:
                self.logs.append((event["kp_level"], event["kp_msg"], dict(event["kp_attrs"])))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def spills(self) -> list[str]:
        return sorted(os.listdir(self.tmp))


class BufferTests(TempDirMixin, unittest.TestCase):
    def test_scenario_92_limits_and_memory(self) -> None:
        for limit, memory in ((0, 0), (0, 5), (2048, 1024), (2048, 5)):
            b = Buffer(memory, limit)
            b.write(HELLO)
            self.assertEqual(b.size, len(HELLO))
            self.assertEqual(read_back(b), HELLO, (limit, memory))
            b.close()
        b = Buffer(5, 8)
        e = self.assertRaises(TooLarge, b.write, HELLO)
        self.assertEqual(str(e), "maximum size exceeded")
        self.assertEqual(b.size, 0)
        b.close()
        self.assertEqual(self.spills(), [])

    def test_empty(self) -> None:
        b = Buffer(0, 0)
        b.write(b"")
        self.assertEqual(b.size, 0)
        self.assertEqual(read_back(b), b"")
        self.assertEqual(b.as_producer().length, 0)
        self.assertEqual(self.spills(), [])
        b.close()

    def test_limit_boundary(self) -> None:
        b = Buffer(4, 8)
        b.write(b"12345")
        b.write(b"678")  # exactly the limit
        self.assertRaises(TooLarge, b.write, b"9")
        self.assertEqual(b.getvalue(), b"12345678")
        b.close()

    def test_spill_file_appears_past_memory_and_is_removed(self) -> None:
        b = Buffer(5, 0)
        b.write(b"hello")
        self.assertEqual(self.spills(), [])
        self.assertIsNone(b.spill_path)
        b.write(b" world")
        [name] = self.spills()
        self.assertTrue(name.startswith("proxy-buffer-"))
        self.assertEqual(b.spill_path, os.path.join(self.tmp, name))
        self.assertEqual(b.memory_size, 5)
        with open(b.spill_path, "rb") as f:
            self.assertEqual(f.read(), b" world")
        self.assertEqual(read_back(b), b"hello world")
        path = b.spill_path
        b.close()
        b.close()  # idempotent
        self.assertEqual(self.spills(), [])
        self.assertEqual(
            [(lvl, msg, attrs) for lvl, msg, attrs in self.logs if msg.startswith("Buffer:")],
            [
                ("DEBUG", "Buffer: spilling to disk", {"file": path}),
                ("DEBUG", "Buffer: removing spill", {"file": path}),
            ],
        )

    def test_memory_zero_goes_to_disk(self) -> None:
        b = Buffer(0, 0)
        b.write(b"x")
        self.assertEqual(len(self.spills()), 1)
        self.assertEqual(b.memory_size, 0)
        self.assertEqual(read_back(b), b"x")
        b.close()
        self.assertEqual(self.spills(), [])

    def test_large_write_is_sliced(self) -> None:
        sizes: list[int] = []
        b = Buffer(0, 0)
        b.write(b"a")  # create the spill
        real = b._file.write

        def write(data):
            sizes.append(len(data))
            return real(data)

        b._file.write = write
        b.write(b"z" * (buf.CHUNK * 3 + 7))
        self.assertEqual(sizes, [buf.CHUNK] * 3 + [7])
        self.assertEqual(b.size, buf.CHUNK * 3 + 8)
        b.close()

    def test_producer_pause_resume_and_turn_budget(self) -> None:
        data = os.urandom(buf.TURN_BUDGET * 2 + 1000)
        b = Buffer(1000, 0)
        b.write(data)
        clock = Clock()
        producer = b.as_producer(reactor=clock)
        self.assertEqual(producer.length, len(data))
        consumer = Consumer(pause_each=True)
        consumer.producer = producer
        results: list = []
        producer.startProducing(consumer).addBoth(results.append)
        self.assertEqual(len(consumer.chunks), 1)  # paused after the first write
        clock.advance(0)
        self.assertEqual(len(consumer.chunks), 1)  # nothing moves while paused
        while not results:
            before = len(consumer.chunks)
            producer.resumeProducing()
            self.assertEqual(len(consumer.chunks), before + 1)
        self.assertEqual(results, [None])
        self.assertEqual(consumer.data, data)
        self.assertTrue(all(len(c) <= buf.CHUNK for c in consumer.chunks))
        b.close()

    def test_producer_yields_between_turns(self) -> None:
        data = b"q" * (buf.TURN_BUDGET * 2 + 5)
        b = Buffer(0, 0)
        b.write(data)
        clock = Clock()
        consumer = Consumer()
        results: list = []
        b.as_producer(reactor=clock).startProducing(consumer).addBoth(results.append)
        self.assertEqual(len(consumer.data), buf.TURN_BUDGET)
        self.assertEqual(results, [])
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(results, [None])
        self.assertEqual(consumer.data, data)
        b.close()

    def test_producer_stop_never_fires(self) -> None:
        b = Buffer(0, 0)
        b.write(b"x" * (buf.TURN_BUDGET + 1))
        clock = Clock()
        producer = b.as_producer(reactor=clock)
        results: list = []
        producer.startProducing(Consumer()).addBoth(results.append)
        producer.stopProducing()
        clock.advance(0)
        self.assertEqual(results, [])
        self.assertEqual(clock.getDelayedCalls(), [])
        b.close()

    def test_unknown_length_producer(self) -> None:
        b = Buffer(10, 0)
        b.write(b"abc")
        self.assertIs(b.as_producer(unknown_length=True).length, UNKNOWN_LENGTH)
        b.close()

    def test_write_after_close_fails(self) -> None:
        b = Buffer(1, 0)
        b.write(b"ab")
        b.close()
        self.assertRaises(ValueError, b.write, b"c")
        self.assertEqual(self.spills(), [])

    @settings(max_examples=60, deadline=None)
    @given(
        chunks=st.lists(st.binary(max_size=3000), max_size=12),
        memory=st.integers(min_value=0, max_value=6000),
    )
    def test_readback_intact(self, chunks: list[bytes], memory: int) -> None:
        b = Buffer(memory, 0)
        try:
            for c in chunks:
                b.write(c)
            expected = b"".join(chunks)
            self.assertEqual(b.size, len(expected))
            self.assertEqual(b.memory_size, min(memory, len(expected)))
            self.assertEqual(read_back(b), expected)
            self.assertEqual(b.getvalue(), expected)
        finally:
            b.close()
        self.assertEqual(self.spills(), [])

    @settings(max_examples=60, deadline=None)
    @given(
        chunks=st.lists(st.binary(max_size=40), max_size=8),
        memory=st.integers(min_value=0, max_value=60),
        limit=st.integers(min_value=1, max_value=120),
    )
    def test_limit_is_total_size(self, chunks: list[bytes], memory: int, limit: int) -> None:
        b = Buffer(memory, limit)
        accepted = b""
        try:
            for c in chunks:
                try:
                    b.write(c)
                    accepted += c
                except TooLarge:
                    self.assertGreater(len(accepted) + len(c), limit)
            self.assertLessEqual(b.size, limit)
            self.assertEqual(b.getvalue(), accepted)
        finally:
            b.close()
        self.assertEqual(self.spills(), [])


class RequestBodyTests(TempDirMixin, unittest.TestCase):
    def test_buffers_whole_body(self) -> None:
        body = FakeBody()
        d = buffer_request_body(body, 4, 8)
        results: list = []
        d.addBoth(results.append)
        body.send(b"hel", b"lo")
        self.assertEqual(results, [])
        body.finish()
        [b] = results
        self.assertIsInstance(b, Buffer)
        self.assertEqual(b.getvalue(), b"hello")
        self.assertEqual(len(self.spills()), 1)  # 5 bytes > memory 4
        b.close()
        self.assertEqual(self.spills(), [])
        self.assertFalse(body.stopped)

    def test_scenario_95_too_large_stops_and_cleans_up(self) -> None:
        body = FakeBody()
        d = buffer_request_body(body, 4, 8)
        body.send(b"x" * 7)
        self.assertEqual(len(self.spills()), 1)
        body.send(b"y" * 28)  # 35 bytes in all
        self.failureResultOf(d, TooLarge)
        self.assertTrue(body.stopped)
        self.assertEqual(self.spills(), [])
        body.finish()  # a late finish does nothing

    def test_declared_length_over_limit_fails_at_once(self) -> None:
        body = FakeBody(length=1001)
        d = buffer_request_body(body, 64, 1000)
        self.failureResultOf(d, TooLarge)
        self.assertTrue(body.stopped)
        self.assertIsNone(body.consumer)

    def test_declared_length_at_limit_is_read(self) -> None:
        body = FakeBody(length=1000)
        d = buffer_request_body(body, 64, 1000)
        body.send(b"a" * 1000)
        body.finish()
        b = self.successResultOf(d)
        self.assertEqual(b.size, 1000)
        b.close()

    def test_empty_declared_body(self) -> None:
        body = FakeBody(length=0)
        b = self.successResultOf(buffer_request_body(body, 4, 8))
        self.assertEqual(b.size, 0)
        self.assertIsNone(body.consumer)

    def test_no_limit(self) -> None:
        body = FakeBody()
        d = buffer_request_body(body, 10, 0)
        body.send(b"z" * 100_000)
        body.finish()
        b = self.successResultOf(d)
        self.assertEqual(read_back(b), b"z" * 100_000)
        b.close()

    def test_malformed_body(self) -> None:
        body = FakeBody()
        d = buffer_request_body(body, 1, 0)
        body.send(b"abc")
        self.assertEqual(len(self.spills()), 1)
        body.fail(MalformedBody("invalid byte in chunk length"))
        f = self.failureResultOf(d, MalformedBody)
        self.assertEqual(str(f.value), "invalid byte in chunk length")
        self.assertEqual(self.spills(), [])

    def test_other_error(self) -> None:
        body = FakeBody()
        d = buffer_request_body(body, 1, 0)
        body.send(b"abc")
        body.fail(ClientGone())
        self.failureResultOf(d, ClientGone)
        self.assertEqual(self.spills(), [])

    def test_disk_error_is_other_error(self) -> None:
        def broken(*args, **kwargs):
            raise OSError(28, "No space left on device")

        self.patch(tempfile, "NamedTemporaryFile", broken)
        body = FakeBody()
        d = buffer_request_body(body, 1, 0)
        body.send(b"abc")
        f = self.failureResultOf(d, OSError)
        self.assertNotIsInstance(f.value, TooLarge)
        self.assertTrue(body.stopped)

    def test_start_producing_raising(self) -> None:
        body = FakeBody()

        def boom(consumer):
            raise RuntimeError("request body can be produced only once")

        body.startProducing = boom
        self.failureResultOf(buffer_request_body(body, 1, 0), RuntimeError)

    def test_cancel_stops_and_cleans_up(self) -> None:
        body = FakeBody()
        d = buffer_request_body(body, 1, 0)
        body.send(b"abc")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(body.stopped)
        self.assertEqual(self.spills(), [])

    def test_replayed_body_retains_framing(self) -> None:
        body = FakeBody(length=5)
        d = buffer_request_body(body, 4, 8)
        body.send(b"hello")
        body.finish()
        b = self.successResultOf(d)
        self.assertEqual(b.as_producer().length, 5)
        self.assertIs(b.as_producer(unknown_length=True).length, UNKNOWN_LENGTH)
        b.close()


def _start(sink, status=200, headers=None, length=None):
    sink.response_started(status, b"OK", headers or [], length)


class BufferingSinkTests(TempDirMixin, unittest.TestCase):
    def make(self, memory=1024, limit=0, **kwargs) -> tuple[BufferingSink, Sink]:
        inner = Sink()
        return BufferingSink(inner, memory, limit, reactor=Clock(), **kwargs), inner

    def test_scenario_93_redirect_held_until_finish(self) -> None:
        bs, inner = self.make()
        headers = [(b"Location", b"http://example.com/next"), (b"Content-Type", b"text/html")]
        bs.response_started(302, b"Found", headers, None)
        body = b'<a href="http://example.com/next">Found</a>.\n'
        bs.response_data(body)
        bs.pauseProducing()  # a flush while buffering reaches nobody
        bs.resumeProducing()
        self.assertEqual(inner.events, [])
        self.successResultOf(bs.finish())
        self.assertEqual(inner.started, ("start", 302, b"Found", headers, len(body)))
        self.assertIn(b"http://example.com/next", inner.body)

    def test_delivers_spilled_body_in_order(self) -> None:
        bs, inner = self.make(memory=4, limit=0)
        _start(bs)
        data = os.urandom(200_000)
        for i in range(0, len(data), 1000):
            bs.response_data(data[i : i + 1000])
        self.assertEqual(len(self.spills()), 1)
        self.assertEqual(inner.events, [])
        d = bs.finish()
        clock = bs._reactor
        while not d.called:
            clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(inner.events[0][0], "start")
        self.assertEqual(inner.body, data)
        self.assertEqual(self.spills(), [])

    def test_delivery_honours_pause(self) -> None:
        bs, inner = self.make(memory=10, limit=0)
        _start(bs)
        bs.response_data(b"x" * (buf.CHUNK * 2))
        bs.pauseProducing()
        d = bs.finish()
        self.assertEqual(inner.body, b"")  # paused before delivery began: only the head
        self.assertEqual(inner.events[0][0], "start")
        bs.resumeProducing()
        self.successResultOf(d)
        self.assertEqual(inner.body, b"x" * (buf.CHUNK * 2))

    def test_scenario_94_bypass(self) -> None:
        streaming = (
            [(b"Content-Type", b"text/event-stream")],
            [(b"content-type", b"text/event-stream; charset=utf-8")],
            [(b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"chunked")],
        )
        for headers in streaming:
            bs, inner = self.make(memory=1, limit=2)
            bs.exchange = ex = Exchange()
            _start(bs, headers=headers)
            bs.response_data(b"test data")  # beyond the limit: bypass is not limited
            self.assertEqual(inner.started[3], headers)
            self.assertEqual(inner.body, b"test data", headers)
            self.assertTrue(bs.bypassed)
            bs.pauseProducing()
            bs.resumeProducing()
            self.assertEqual(ex.calls, ["pause", "resume"])
            self.successResultOf(bs.finish())
            self.assertEqual(inner.body, b"test data")
        self.assertEqual(self.spills(), [])
        buffered = (
            [(b"Content-Type", b"text/plain"), (b"Content-Length", b"9")],
            [(b"Content-Type", b"application/json"), (b"Content-Length", b"9")],
        )
        for headers in buffered:
            bs, inner = self.make()
            bs.exchange = ex = Exchange()
            _start(bs, headers=headers, length=9)
            bs.response_data(b"test data")
            bs.pauseProducing()  # ignored while buffering
            self.assertEqual(inner.events, [])
            self.assertEqual(ex.calls, [])
            bs.resumeProducing()
            self.successResultOf(bs.finish())
            self.assertEqual(inner.body, b"test data")

    def test_is_streaming_response(self) -> None:
        self.assertTrue(is_streaming_response([(b"Content-Type", b"text/event-stream;x")]))
        self.assertFalse(is_streaming_response([(b"Content-Type", b"Text/Event-Stream")]))
        self.assertFalse(is_streaming_response([(b"Content-Type", b"text/event-stream ;x")]))
        self.assertFalse(is_streaming_response([(b"Transfer-Encoding", b"gzip, chunked")]))
        self.assertFalse(is_streaming_response([]))
        # Only the first Content-Type counts, as Go's Header().Get.
        self.assertFalse(
            is_streaming_response(
                [(b"Content-Type", b"text/plain"), (b"Content-Type", b"text/event-stream")]
            )
        )

    def test_too_large(self) -> None:
        calls: list[str] = []
        bs, inner = self.make(memory=10, limit=10, on_too_large=lambda: calls.append("too"))
        _start(bs, headers=[(b"X-Secret", b"1")])
        bs.response_data(b"x" * 8)
        bs.response_data(b"x" * 2)  # exactly the limit
        self.assertEqual(calls, [])
        bs.response_data(b"x" * 16)  # 26 bytes: scenario 74
        bs.response_data(b"more")
        self.assertEqual(calls, ["too"])
        f = self.failureResultOf(bs.finish(), TooLarge)
        self.assertEqual(str(f.value), "maximum size exceeded")
        self.assertEqual(inner.events, [])

    def test_too_large_removes_spill(self) -> None:
        bs, inner = self.make(memory=4, limit=8)
        _start(bs)
        bs.response_data(b"ok")
        bs.response_data(b"123456")
        self.assertEqual(len(self.spills()), 1)
        bs.response_data(b"y" * 28)  # 36 bytes: scenario 95
        self.assertEqual(self.spills(), [])
        self.failureResultOf(bs.finish(), TooLarge)
        bs.close()
        self.assertEqual(inner.events, [])

    def test_scenario_95_small_response(self) -> None:
        bs, inner = self.make(memory=4, limit=8)
        _start(bs)
        bs.response_data(b"ok")
        self.successResultOf(bs.finish())
        self.assertEqual(inner.body, b"ok")

    def test_disk_error_calls_on_error(self) -> None:
        def broken(*args, **kwargs):
            raise OSError(28, "No space left on device")

        self.patch(tempfile, "NamedTemporaryFile", broken)
        errors: list[Exception] = []
        bs, inner = self.make(memory=1, limit=0, on_error=errors.append)
        _start(bs)
        bs.response_data(b"abc")
        self.assertEqual(len(errors), 1)
        self.assertIsInstance(errors[0], OSError)
        self.failureResultOf(bs.finish(), OSError)
        self.assertEqual(inner.events, [])

    def test_close_discards(self) -> None:
        bs, inner = self.make(memory=1, limit=0)
        _start(bs)
        bs.response_data(b"abc")
        self.assertEqual(len(self.spills()), 1)
        bs.close()
        bs.close()
        self.assertEqual(self.spills(), [])
        self.assertEqual(inner.events, [])

    def test_close_during_delivery(self) -> None:
        bs, inner = self.make(memory=0, limit=0)
        _start(bs)
        bs.response_data(b"q" * (buf.TURN_BUDGET * 2))
        d = bs.finish()
        self.assertFalse(d.called)
        bs.close()
        self.assertEqual(self.spills(), [])
        bs._reactor.advance(0)
        self.assertFalse(d.called)  # stopped: never fires (IBodyProducer semantics)

    def test_informational_and_upgrade_pass_through(self) -> None:
        bs, inner = self.make(memory=1, limit=2)
        bs.informational(103, [(b"Link", b"</style.css>; rel=preload")])
        self.assertEqual(inner.events, [("info", 103)])
        headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
        bs.response_started(101, b"Switching Protocols", headers, None)
        tunnel = object()
        bs.upgraded(tunnel)
        self.assertEqual(
            inner.events[1:],
            [("start", 101, b"Switching Protocols", headers, None), ("upgraded", tunnel)],
        )
        self.successResultOf(bs.finish())
        self.assertEqual(len(inner.events), 3)

    def test_finish_without_response(self) -> None:
        bs, inner = self.make()
        self.failureResultOf(bs.finish(), RuntimeError)
        self.assertEqual(inner.events, [])

    def test_stop_producing_in_bypass_cancels_exchange(self) -> None:
        bs, inner = self.make()
        bs.exchange = ex = Exchange()
        _start(bs, headers=[(b"Content-Type", b"text/event-stream")])
        bs.stopProducing()
        self.assertEqual(ex.calls, ["cancel"])


class EchoServer(Protocol):
    """Answers each request with its body echoed back (``Content-Length`` framing)."""

    def connectionMade(self) -> None:
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        lines = head.split(b"\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines[1:])}
        if headers.get(b"transfer-encoding") == b"chunked":
            if not rest.endswith(b"0\r\n\r\n"):
                return
            body, pos = b"", 0
            while True:
                i = rest.index(b"\r\n", pos)
                size = int(rest[pos:i], 16)
                if not size:
                    break
                body += rest[i + 2 : i + 2 + size]
                pos = i + 2 + size + 2
        else:
            body = rest[: int(headers.get(b"content-length", b"0"))]
            if len(body) < int(headers.get(b"content-length", b"0")):
                return
        self.buf = b""
        reply = body * self.factory.repeat
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply))
        for i in range(0, len(reply), 1000):
            self.transport.write(reply[i : i + 1000])


class UpstreamRoundTripTests(TempDirMixin, unittest.TestCase):
    """Both halves wired to the real upstream client over loopback, as the pipeline will."""

    def setUp(self) -> None:
        super().setUp()
        factory = Factory.forProtocol(EchoServer)
        factory.repeat = 1
        self.factory = factory
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.pool = UpstreamPool(reactor, "127.0.0.1", port.getHost().port)
        self.addCleanup(self.pool.close)

    @inlineCallbacks
    def test_buffered_request_and_response(self):
        body = FakeBody()
        d = buffer_request_body(body, 64 << 10, 0)
        data = os.urandom(300_000)
        for i in range(0, len(data), 16384):
            body.send(data[i : i + 16384])
        body.finish()
        request_buffer = yield d
        self.assertEqual(len(self.spills()), 1)
        inner = Sink()
        bs = BufferingSink(inner, 64 << 10, 0)
        bs.exchange = self.pool.forward(
            b"POST",
            b"/",
            [(b"Host", b"x")],
            request_buffer.as_producer(unknown_length=True),
            bs,
            timeout=5,
        )
        yield bs.exchange.done
        self.assertEqual(inner.events, [])
        yield bs.finish()
        request_buffer.close()
        self.assertEqual(inner.started[1], 200)
        self.assertEqual(inner.body, data)
        self.assertEqual(self.spills(), [])

    @inlineCallbacks
    def test_too_large_cancels_upstream(self):
        self.factory.repeat = 1000
        inner = Sink()
        calls: list[str] = []

        def too_large():
            calls.append("too large")
            bs.exchange.cancel()

        bs = BufferingSink(inner, 10, 1000, on_too_large=too_large)
        bs.exchange = self.pool.forward(
            b"POST", b"/", [(b"Host", b"x")], _Bytes(b"hello"), bs, timeout=5
        )
        yield self.assertFailure(bs.exchange.done, CancelledError)
        self.assertEqual(calls, ["too large"])
        self.failureResultOf(bs.finish(), TooLarge)
        self.assertEqual(inner.events, [])
        self.assertEqual(self.spills(), [])


@implementer(IBodyProducer)
class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass
