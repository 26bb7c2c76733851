"""ClientHello parsing, SNI selection (SPEC §16.1) and the peeking HTTPS protocol."""

from __future__ import annotations

import ssl
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from kamal_proxy.observe import log as logmod
from kamal_proxy.routing.table import RoutingTable
from kamal_proxy.service_options import ServiceOptions
from kamal_proxy.tls.certificates import StaticCertificate
from kamal_proxy.tls.sni import (
    NEED_MORE,
    CertificateSelector,
    ClientHello,
    PeekingFactory,
    https_options,
    parse_client_hello,
)
from tests.integration.pebble import cert_pem, key_pem, make_ca, make_leaf


def build_hello(name: str | None, alpn: list[bytes], record_size: int = 16384) -> bytes:
    """A minimal TLS 1.2-style ClientHello, split into records of ``record_size`` bytes."""
    exts = b""
    if name is not None:
        n = name.encode()
        entry = b"\x00" + struct.pack("!H", len(n)) + n
        sni = struct.pack("!H", len(entry)) + entry
        exts += struct.pack("!HH", 0, len(sni)) + sni
    if alpn:
        protos = b"".join(bytes([len(p)]) + p for p in alpn)
        body = struct.pack("!H", len(protos)) + protos
        exts += struct.pack("!HH", 16, len(body)) + body
    exts += struct.pack("!HH", 23, 0)  # extended master secret, empty
    hello = (
        b"\x03\x03"
        + b"\x11" * 32
        + b"\x00"
        + struct.pack("!H", 2)
        + b"\x13\x01"
        + b"\x01\x00"
        + struct.pack("!H", len(exts))
        + exts
    )
    handshake = b"\x01" + len(hello).to_bytes(3, "big") + hello
    out = b""
    for i in range(0, len(handshake), record_size):
        chunk = handshake[i : i + record_size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
names = st.lists(labels, min_size=1, max_size=5).map(".".join)
protocols = st.lists(st.binary(min_size=1, max_size=20), max_size=4)


class ClientHelloTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.none(), names), protocols, st.integers(8, 400))
    def test_round_trip_and_prefixes(self, name, alpn, record_size):
        data = build_hello(name, alpn, record_size)
        self.assertEqual(parse_client_hello(data), ClientHello(name, tuple(alpn)))
        # Any proper prefix needs more bytes; trailing bytes are ignored.
        for cut in (0, 1, 4, 5, len(data) // 2, len(data) - 1):
            self.assertIs(parse_client_hello(data[:cut]), NEED_MORE)
        self.assertEqual(parse_client_hello(data + b"junk").server_name, name)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_garbage_never_raises(self, data):
        result = parse_client_hello(data)
        self.assertTrue(result is NEED_MORE or result is None or isinstance(result, ClientHello))

    def test_not_tls(self):
        self.assertIsNone(parse_client_hello(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))

    def test_real_client_hello(self):
        """What Python's ssl (OpenSSL) sends, TLS 1.3 key shares and all."""
        context = ssl.create_default_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = context.wrap_bio(incoming, outgoing, server_hostname="app.example.com")
        with self.assertRaises(ssl.SSLWantReadError):
            client.do_handshake()
        hello = parse_client_hello(outgoing.read())
        self.assertEqual(hello, ClientHello("app.example.com", (b"h2", b"http/1.1")))


# -- selection ---------------------------------------------------------------------------------


class FakeService:
    def __init__(self, name, options, certificates=None):
        self.name = name
        self.options = options
        self.certificates = certificates


class FakeRouter:
    def __init__(self, services, default=""):
        self.services = {s.name: s for s in services}
        self.table = RoutingTable.build(services, default)


def static_pair(tmp, name):
    ca_key, ca = make_ca("Acme Co test CA")
    key, leaf = make_leaf(ca_key, ca, [name])
    cert_path, key_path = f"{tmp}/{name}.crt", f"{tmp}/{name}.key"
    open(cert_path, "wb").write(cert_pem(leaf))
    open(key_path, "wb").write(key_pem(key))
    return StaticCertificate(cert_path, key_path), ca


class _FakeTLSProtocol:
    class factory:
        wrappedFactory = None


def handshake(server_ctx: SSL.Context, server_name: bytes | None, alpn=(b"h2", b"http/1.1")):
    """A full in-memory handshake; the server's certificate CN, or the SSL.Error."""
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client = SSL.Connection(client_ctx)
    client.set_connect_state()
    if server_name:
        client.set_tlsext_host_name(server_name)
    client.set_alpn_protos(list(alpn))
    server = SSL.Connection(server_ctx)
    server.set_app_data(_FakeTLSProtocol())  # what Twisted's ALPN callback looks at
    server.set_accept_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None, None
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
    cert = client.get_peer_certificate()
    if cert is None:
        return None, None
    return cert.get_subject().CN, client.get_alpn_proto_negotiated()


class SelectionTests(unittest.TestCase):
    def setUp(self):
        tmp = self.mktemp()
        __import__("os").makedirs(tmp)
        self.records = []
        self.patch(logmod, "emit", lambda level, msg, **a: self.records.append((level, msg, a)))
        self.a, _ = static_pair(tmp, "a.example.com")
        self.b, _ = static_pair(tmp, "b.example.com")
        services = [
            FakeService("a", ServiceOptions(hosts=["a.example.com"], tls_enabled=True), self.a),
            FakeService("b", ServiceOptions(hosts=["b.example.com"], tls_enabled=True), self.b),
            FakeService("plain", ServiceOptions(hosts=["plain.example.com"])),
        ]
        self.router = FakeRouter(services)
        self.selector = CertificateSelector(self.router)
        self.context = https_options(self.selector).getContext()

    def test_sni_selects_certificate_and_alpn(self):
        self.assertEqual(handshake(self.context, b"a.example.com"), ("a.example.com", b"h2"))
        self.assertEqual(handshake(self.context, b"b.example.com"), ("b.example.com", b"h2"))
        self.assertEqual(
            handshake(self.context, b"b.example.com", alpn=(b"http/1.1",)),
            ("b.example.com", b"http/1.1"),
        )

    def test_no_sni_uses_default_host(self):
        self.assertEqual(self.router.table.default_tls_host, "a.example.com")
        self.assertEqual(handshake(self.context, None)[0], "a.example.com")
        self.assertIn(
            ("WARN", "No server name; using default TLS hostname", {"host": "a.example.com"}),
            self.records,
        )

    def test_failures(self):
        self.assertEqual(handshake(self.context, b"unknown.example.com"), (None, None))
        self.assertEqual(handshake(self.context, b"plain.example.com"), (None, None))
        msgs = [m for _, m, _ in self.records]
        self.assertIn("ACME: Unable to get certificate (unknown server name)", msgs)
        self.assertIn("ACME: Unable to get certificate (service does not support TLS)", msgs)

    def test_no_sni_without_default_fails(self):
        self.router.table = RoutingTable.build([], "")
        self.assertEqual(handshake(self.context, None), (None, None))
        self.assertIn(
            ("DEBUG", "ACME: Unable to get certificate (no server name)", {}), self.records
        )


# -- peeking -----------------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class FakeTLSFactory:
    """Stands in for TLSMemoryBIOFactory: records what reaches the TLS layer."""

    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        p = Recorder()
        self.built.append(p)
        return p


class FakeSelector:
    def __init__(self):
        self.asked = []
        self.pending: dict[str, defer.Deferred] = {}

    def prepare(self, name):
        self.asked.append(name)
        return self.pending.get(name)


class PeekingTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.selector = FakeSelector()
        self.factory = PeekingFactory(self.reactor, Factory(), self.selector, wait=5)
        self.factory.tls_factory = FakeTLSFactory()

    def connect(self):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, self.factory.tls_factory.built[-1]

    def test_ready_name_goes_straight_to_tls_with_all_bytes(self):
        hello = build_hello("ready.example.com", [b"h2"], record_size=50)
        protocol, tls = self.connect()
        protocol.dataReceived(hello[:30])
        self.assertIsNone(tls.transport)
        protocol.dataReceived(hello[30:] + b"more")
        self.assertEqual(tls.received, hello + b"more")
        self.assertEqual(self.selector.asked, ["ready.example.com"])
        protocol.dataReceived(b"later")
        self.assertEqual(tls.received, hello + b"morelater")

    def test_waits_for_certificate_then_replays(self):
        ready = self.selector.pending["slow.example.com"] = defer.Deferred()
        hello = build_hello("slow.example.com", [])
        protocol, tls = self.connect()
        protocol.dataReceived(hello)
        self.assertEqual(tls.received, b"")
        ready.callback(None)
        self.assertEqual(tls.received, hello)

    def test_wait_is_bounded(self):
        ready = self.selector.pending["slow.example.com"] = defer.Deferred()
        hello = build_hello("slow.example.com", [])
        protocol, tls = self.connect()
        protocol.dataReceived(hello)
        self.reactor.advance(5)
        self.assertTrue(ready.called)
        self.assertEqual(tls.received, hello)  # TLS goes ahead (and fails without a cert)

    def test_client_gone_while_waiting(self):
        ready = self.selector.pending["slow.example.com"] = defer.Deferred()
        protocol, tls = self.connect()
        protocol.dataReceived(build_hello("slow.example.com", []))
        protocol.connectionLost(None)
        self.assertTrue(ready.called)
        self.assertIsNone(tls.transport)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
