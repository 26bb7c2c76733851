"""QUIC transport and HTTP/3 session units: an aioquic client talks to the endpoint in memory.

No sockets and no real time: datagrams are handed across by the test, the server's timers
run on ``task.Clock``, and the client is driven with the same clock.  These pin what
``kamal_proxy.proxy.quic`` relies on in aioquic (receive credit, send buffers, the Initial
packet layout), so an aioquic upgrade that changes them fails here.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from aioquic.h3.connection import ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.trial import unittest
from zope.interface import implementer

from kamal_proxy.proxy import quic as quic_module
from kamal_proxy.proxy.http3 import SEND_HIGH_WATER, H3Request, Http3Server
from kamal_proxy.tls.store import KeyAndChain
from tests.integration.pebble import make_ca, make_leaf

CLIENT = ("::ffff:127.0.0.1", 40000)
_CA_KEY, _CA = make_ca("Unit CA")
_KEY, _LEAF = make_leaf(_CA_KEY, _CA, ["unit.test"])
ENTRY = KeyAndChain(_KEY, (_LEAF,))


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


class Certificates:
    """A certificate source whose ``prepare`` can be made to wait."""

    def __init__(self, entry: KeyAndChain | None = ENTRY) -> None:
        self.entry = entry
        self.waiting: defer.Deferred | None = None
        self.names: list[str | None] = []

    def prepare(self, name: str | None) -> defer.Deferred | None:
        self.names.append(name)
        return self.waiting

    def key_and_chain(self, name: str | None) -> KeyAndChain | None:
        return self.entry


class Harness:
    """One server (endpoint + HTTP/3 sessions) and one aioquic client, pumped by hand."""

    def __init__(self, handler=None, certificates: Certificates | None = None) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.certificates = certificates or Certificates()
        self.requests: list[H3Request] = []
        self.server = Http3Server(self.clock, self.certificates, handler or self.requests.append)
        self.endpoint = self.server.endpoint
        self.transport = FakeTransport()
        self.endpoint.transport = self.transport
        configuration = QuicConfiguration(
            is_client=True, alpn_protocols=["h3"], server_name="unit.test"
        )
        configuration.verify_mode = ssl.CERT_NONE
        self.client = QuicConnection(configuration=configuration)
        self.h3: H3Connection | None = None
        self.responses: dict[int, dict] = {}
        self.terminated: events.ConnectionTerminated | None = None
        self.goaway_data = b""

    def connect(self) -> None:
        self.client.connect(CLIENT, now=self.clock.seconds())
        self.pump()

    def pump(self, rounds: int = 200) -> None:
        """Hand datagrams both ways and run due timers until nothing moves (bounded)."""
        idle = 0
        for _ in range(rounds):
            moved = False
            timer = self.client.get_timer()
            if timer is not None and timer <= self.clock.seconds():
                self.client.handle_timer(now=self.clock.seconds())
                self._client_events()
            for data, _ in self.client.datagrams_to_send(now=self.clock.seconds()):
                self.endpoint.datagramReceived(data, CLIENT)
                moved = True
            # aioquic paces its packets: a millisecond per round lets both sides send.
            self.clock.advance(0.001)
            sent, self.transport.sent = self.transport.sent, []
            for data, _ in sent:
                self.client.receive_datagram(data, CLIENT, now=self.clock.seconds())
                moved = True
            self._client_events()
            idle = 0 if moved else idle + 1
            if idle > 30:  # nothing moved for 30 ms of (fake) time: settled
                return

    def run_for(self, seconds: float) -> None:
        """Let (fake) time pass in small steps, e.g. the client's closing period."""
        for _ in range(int(seconds / 0.05)):
            self.clock.advance(0.05)
            self.pump(rounds=5)

    def _client_events(self) -> None:
        while (event := self.client.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self.h3 = H3Connection(self.client)
            elif isinstance(event, events.ConnectionTerminated):
                self.terminated = event
            elif isinstance(event, events.StreamReset):
                self.responses.setdefault(event.stream_id, {})["reset"] = event.error_code
            if isinstance(event, events.StreamDataReceived) and event.stream_id == 3:
                self.goaway_data += event.data
            if self.h3 is None:
                continue
            for h3_event in self.h3.handle_event(event):
                response = self.responses.setdefault(h3_event.stream_id, {"body": b""})
                response.setdefault("body", b"")
                if isinstance(h3_event, HeadersReceived):
                    response["headers"] = h3_event.headers
                elif isinstance(h3_event, DataReceived):
                    response["body"] += h3_event.data
                if getattr(h3_event, "stream_ended", False):
                    response["ended"] = True

    def request(self, path: str = "/", body: bytes = b"", method: str = "GET") -> int:
        assert self.h3 is not None
        stream_id = self.client.get_next_available_stream_id()
        self.h3.send_headers(
            stream_id,
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", b"unit.test"),
                (b":path", path.encode()),
            ],
            end_stream=not body,
        )
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self.pump()
        return stream_id

    def session(self):
        (session,) = self.server.sessions
        return session


def answer(request: H3Request, body: bytes = b"ok") -> None:
    request.start(200, [(b"content-type", b"text/plain")])
    request.data(body)
    request.end()


class EndpointRoutingTests(unittest.TestCase):
    def test_garbage_is_dropped_without_a_reply_or_state(self):
        h = Harness()
        for size in (0, 1, 5, 21, 100, 1199, 1200, 1500):
            for _ in range(5):
                h.endpoint.datagramReceived(os.urandom(size), CLIENT)
        # Long headers that parse but are not a usable Initial: random body, truncated.
        h.endpoint.datagramReceived(b"\xc0\x00\x00\x00\x01\x08" + os.urandom(1300), CLIENT)
        h.endpoint.datagramReceived(b"\xc0\x00\x00\x00\x01\x08" + os.urandom(8), CLIENT)
        h.clock.advance(0)
        self.assertEqual(h.transport.sent, [])
        self.assertEqual((h.endpoint.sessions, h.endpoint.pending), ({}, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_unknown_version_gets_version_negotiation_only_when_large(self):
        h = Harness()
        packet = b"\xc0\x0a\x0a\x0a\x0a\x08" + b"D" * 8 + b"\x08" + b"S" * 8
        h.endpoint.datagramReceived(packet + b"\x00" * 50, CLIENT)
        self.assertEqual(h.transport.sent, [])
        h.endpoint.datagramReceived(packet + b"\x00" * 1200, CLIENT)
        ((reply, addr),) = h.transport.sent
        self.assertEqual((reply[1:5], addr), (b"\x00\x00\x00\x00", CLIENT))

    def test_handshake_by_server_name_and_a_request(self):
        h = Harness()
        h.connect()
        self.assertIsNotNone(h.h3)
        self.assertEqual(h.certificates.names, ["unit.test"])
        session = h.session()
        # Routed by every connection ID the server issued, plus the client's original one.
        self.assertGreater(len([s for s in h.endpoint.sessions.values() if s is session]), 2)
        stream_id = h.request("/hello?x=1")
        (request,) = h.requests
        self.assertEqual(
            (request.method, request.path, request.authority, request.peer),
            (b"GET", b"/hello?x=1", b"unit.test", ("127.0.0.1", 40000)),
        )
        answer(request)
        h.pump()
        self.assertEqual(h.responses[stream_id]["body"], b"ok")
        self.assertIn((b":status", b"200"), h.responses[stream_id]["headers"])

    def test_one_timer_per_connection_and_idle_close(self):
        h = Harness()
        h.connect()
        session = h.session()
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.request("/")
        answer(h.requests[0])
        h.pump()
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        # Idle past the timeout: the connection goes, with every routing entry.
        for _ in range(100):
            h.clock.advance(1)
        self.assertTrue(session.closed)
        self.assertEqual((h.endpoint.sessions, h.server.sessions), ({}, set()))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_unknown_name_is_refused_at_once(self):
        h = Harness(certificates=Certificates(entry=None))
        h.connect()
        h.run_for(1)
        self.assertIsNotNone(h.terminated)
        self.assertEqual(h.terminated.error_code, 0x100 + quic_module.ALERT_UNRECOGNIZED_NAME)
        self.assertEqual(h.endpoint.sessions, {})

    def test_client_hello_over_several_datagrams(self):
        # Many ALPN offers make the ClientHello span Initial datagrams (as post-quantum key
        # shares do for browsers): the server name is read once all the pieces are in.
        h = Harness()
        h.client._configuration.alpn_protocols = ["h3"] + [
            f"x-{i:03}" + "p" * 200 for i in range(20)
        ]
        h.client.connect(CLIENT, now=h.clock.seconds())
        datagrams = h.client.datagrams_to_send(now=h.clock.seconds())
        self.assertGreater(len(datagrams), 1)
        h.endpoint.datagramReceived(datagrams[0][0], CLIENT)
        self.assertEqual((len(h.endpoint.pending), h.endpoint.sessions), (1, {}))
        for data, _ in datagrams[1:]:
            h.endpoint.datagramReceived(data, CLIENT)
        h.pump()
        self.assertIsNotNone(h.h3)
        self.assertEqual(h.certificates.names, ["unit.test"])

    def test_an_incomplete_client_hello_is_forgotten(self):
        h = Harness()
        h.client._configuration.alpn_protocols = ["h3"] + [
            f"x-{i:03}" + "p" * 200 for i in range(20)
        ]
        h.client.connect(CLIENT, now=h.clock.seconds())
        first = h.client.datagrams_to_send(now=h.clock.seconds())[0][0]
        h.endpoint.datagramReceived(first, CLIENT)
        self.assertEqual(len(h.endpoint.pending), 1)
        h.clock.advance(quic_module.PEEK_TIMEOUT)
        self.assertEqual((h.endpoint.pending, h.clock.getDelayedCalls()), ({}, []))

    def test_handshake_waits_for_the_certificate_without_blocking(self):
        certificates = Certificates()
        certificates.waiting = defer.Deferred()
        h = Harness(certificates=certificates)
        h.connect()
        self.assertIsNone(h.h3)
        self.assertEqual(h.endpoint.sessions, {})
        self.assertEqual(len(h.endpoint.pending), 1)
        # The client retransmits meanwhile; the copies are kept (bounded), not answered.
        h.clock.advance(1)
        h.client.handle_timer(now=h.clock.seconds())
        h.pump()
        certificates.waiting.callback(None)
        certificates.waiting = None
        h.pump()
        self.assertIsNotNone(h.h3)
        self.assertEqual(h.endpoint.pending, {})

    def test_handshake_wait_is_bounded(self):
        certificates = Certificates(entry=None)
        certificates.waiting = defer.Deferred()
        h = Harness(certificates=certificates)
        h.connect()
        h.clock.advance(quic_module.HANDSHAKE_WAIT)
        h.pump()
        self.assertEqual(h.endpoint.pending, {})
        h.run_for(1)
        self.assertIsNotNone(h.terminated)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class Consumer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class FlowControlTests(unittest.TestCase):
    def test_request_body_held_in_memory_is_bounded_by_the_window(self):
        h = Harness()
        h.connect()
        body = os.urandom(6 * quic_module.STREAM_WINDOW)
        stream_id = h.request("/upload", body=body, method="POST")
        h.pump()
        (request,) = h.requests
        session = h.session()
        held = session.quic.held(stream_id)
        # Nobody consumes yet: the client may send a window, not the whole body.
        self.assertGreater(held, 0)
        self.assertLessEqual(held, quic_module.STREAM_WINDOW)
        consumer = Consumer()
        finished = request.body.startProducing(consumer)
        request.body.pauseProducing()
        for _ in range(50):
            h.pump()
            request.body.resumeProducing()
            request.body.pauseProducing()
            self.assertLessEqual(session.quic.held(stream_id), quic_module.STREAM_WINDOW)
        request.body.resumeProducing()
        h.pump()
        self.assertEqual(bytes(consumer.data), body)
        self.assertIsNone(self.successResultOf(finished))

    def test_response_producer_paused_while_unacknowledged_data_piles_up(self):
        h = Harness()
        h.connect()
        h.request("/big")
        (request,) = h.requests
        producer = Producer()
        request.register_producer(producer)
        request.start(200, [])
        chunk = b"x" * (64 << 10)
        for _ in range(SEND_HIGH_WATER // len(chunk) + 2):
            request.data(chunk)
        self.assertEqual(producer.paused, 1)
        h.pump()  # the client reads and acknowledges
        h.clock.advance(0.1)
        h.pump()
        self.assertEqual(producer.resumed, 1)

    def test_response_end_before_the_body_stops_the_upload(self):
        h = Harness()
        h.connect()
        stream_id = h.request("/", body=os.urandom(3 * quic_module.STREAM_WINDOW), method="POST")
        (request,) = h.requests
        request.start(413, [])
        request.end()
        h.pump()
        self.assertEqual(h.session().quic.held(stream_id), 0)
        self.assertTrue(h.responses[stream_id].get("ended"))
        self.assertEqual(h.session().requests, {})


class GoawayTests(unittest.TestCase):
    def test_drain_answers_the_request_in_flight_then_closes(self):
        h = Harness()
        h.connect()
        first = h.request("/slow")
        drained = h.server.drain()
        h.pump()
        self.assertNoResult(drained)
        self.assertTrue(h.goaway_data)  # the GOAWAY frame on the control stream
        # A request the server did not see before GOAWAY is refused, to be retried elsewhere.
        late = h.request("/late")
        self.assertEqual(h.responses[late].get("reset"), ErrorCode.H3_REQUEST_REJECTED)
        self.assertEqual(len(h.requests), 1)
        answer(h.requests[0])
        h.pump()
        self.assertEqual(h.responses[first]["body"], b"ok")
        self.assertIsNone(self.successResultOf(drained))
        h.run_for(1)
        self.assertEqual(h.terminated.error_code, ErrorCode.H3_NO_ERROR)
        # No new connections while draining.
        other = Harness()
        other.endpoint = h.endpoint
        other.transport = h.transport
        other.connect()
        self.assertIsNone(other.h3)

    def test_client_reset_tells_the_handler(self):
        h = Harness()
        h.connect()
        stream_id = h.client.get_next_available_stream_id()
        h.h3.send_headers(
            stream_id,
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"u"),
                (b":path", b"/"),
            ],
        )
        h.h3.send_data(stream_id, b"partial", end_stream=False)
        h.pump()
        (request,) = h.requests
        gone: list[Exception] = []
        request.on_gone = gone.append
        h.client.reset_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
        h.pump()
        self.assertEqual(len(gone), 1)
        self.assertEqual(h.session().requests, {})


class BindUdpTests(unittest.TestCase):
    def test_one_socket_per_worker_with_reuse_port(self):
        from kamal_proxy.process.listening import bind_udp

        first = bind_udp(0, reuse_port=True)
        self.addCleanup(first.close)
        port = first.getsockname()[1]
        second = bind_udp(port, reuse_port=True)
        self.addCleanup(second.close)
        self.assertEqual(second.getsockname()[1], port)
        with self.assertRaises(OSError):
            bind_udp(port).close()
