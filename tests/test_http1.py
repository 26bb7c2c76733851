"""The HTTP/1 codec (proxy/http1.py) and the lean request API of the channel (SPEC §4.3, §9).

Round trips and splits are property tests: however a request or a chunked body is cut into
reads, the same request, body and rest come out; the smuggling vectors of SPEC §4.3 are refused
or framed one way only.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from kamal_proxy.proxy.channel import HTTP1Request, make_site
from kamal_proxy.proxy.http1 import (
    MAX_HEADER_LINES,
    BadResponse,
    ChunkedDecoder,
    HeadError,
    MalformedBody,
    canonical_name,
    find_head_end,
    parse_request_head,
    parse_response_head,
    split_response_headers,
)
from tests.strategies import header_names, header_values


def parse(raw: bytes):
    found = find_head_end(raw)
    assert found is not None, raw
    return parse_request_head(raw[: found[0]])


def refused(raw: bytes) -> int:
    try:
        parse(raw)
    except HeadError as e:
        return e.status
    return 0


_SPECIAL = {"host", "content-length", "transfer-encoding", "expect", "connection", "pragma"}


class NameTests(unittest.TestCase):
    def test_go_canonical_form(self) -> None:
        for raw, canon in (
            (b"x-foo", b"X-Foo"),
            (b"CONTENT-TYPE", b"Content-Type"),
            (b"etag", b"Etag"),
            (b"x-request-id", b"X-Request-Id"),
            (b"sec-websocket-key", b"Sec-Websocket-Key"),
            (b"a--b", b"A--B"),
        ):
            self.assertEqual(canonical_name(raw), canon)

    def test_invalid_names(self) -> None:
        for raw in (b"", b"X Foo", b"X-Foo ", b"X(Foo)", b"\x00", b" X"):
            self.assertIsNone(canonical_name(raw))


class RequestHeadTests(unittest.TestCase):
    def test_fields(self) -> None:
        req = parse(
            b"POST /a%20b?x=1 HTTP/1.1\r\nhost: h.example:80\r\nX-A: 1\r\nx-a:  2 \r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        self.assertEqual((req.method, req.uri, req.path), (b"POST", b"/a%20b?x=1", b"/a%20b"))
        self.assertEqual((req.version, req.http11, req.host), (b"HTTP/1.1", True, b"h.example:80"))
        self.assertEqual(req.headers[b"X-A"], [b"1", b"2"])
        self.assertEqual((req.length, req.keep_alive), (5, True))

    def test_head_end_forms(self) -> None:
        for raw, end, after in (
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", 23, 27),
            (b"GET / HTTP/1.1\nHost: a\n\nrest", 22, 24),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 23, 26),
            (b"GET / HTTP/1.1\nHost: a\n\nbody\r\n\r\n", 22, 24),
        ):
            self.assertEqual(find_head_end(raw), (end, after), raw)
        self.assertIsNone(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"))

    def test_http_1_2_is_served_as_1_1(self) -> None:
        req = parse(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n")
        self.assertEqual((req.version, req.http11, req.keep_alive), (b"HTTP/1.2", True, True))

    def test_versions_refused(self) -> None:
        for version, status in (
            (b"HTTP/2.0", 505),
            (b"HTTP/9.9", 505),
            (b"HTTP/0.9", 505),
            (b"HTTP/1", 400),
            (b"http/1.1", 400),
            (b"HTTP/1.10", 400),
        ):
            self.assertEqual(refused(b"GET / " + version + b"\r\nHost: a\r\n\r\n"), status)

    def test_options_asterisk(self) -> None:
        req = parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(req.asterisk)
        self.assertEqual(req.host, b"a")

    def test_header_line_limit_counts_host(self) -> None:
        lines = [b"X-%d: v" % i for i in range(MAX_HEADER_LINES - 1)]
        ok = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"\r\n".join(lines) + b"\r\n\r\n"
        self.assertEqual(len(parse(ok).headers), MAX_HEADER_LINES)
        too_many = ok[:-2] + b"X-Last: v\r\n\r\n"
        self.assertEqual(refused(too_many), 431)

    def test_smuggling_vectors(self) -> None:
        """SPEC §4.3: one framing only, or a refusal."""
        post = b"POST / HTTP/1.1\r\nHost: a\r\n"
        for extra, status in (
            (b"Transfer-Encoding: gzip, chunked\r\n", 501),
            (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 501),
            (b"Transfer-Encoding: identity\r\n", 501),
            (b"Transfer-Encoding: chunked, gzip\r\n", 501),
            (b"Content-Length: 5, 5\r\n", 400),
            (b"Content-Length: +5\r\n", 400),
            (b"Content-Length: -1\r\n", 400),
            (b"Content-Length: 0x5\r\n", 400),
            (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
            (b"Content-Length: 99999999999999999999\r\n", 400),
            (b"Transfer-Encoding : chunked\r\n", 400),
            (b" Transfer-Encoding: chunked\r\n", 400),
            (b"X-A: b\r\n Transfer-Encoding: chunked\r\n", 400),
            (b"X-A: a\rTransfer-Encoding: chunked\r\n", 400),
            (b"X-A: a\x00b\r\n", 400),
            (b"Host: b\r\n", 400),
            (b"Expect: teapot\r\n", 417),
        ):
            self.assertEqual(refused(post + extra + b"\r\n"), status, extra)

    def test_chunked_wins_and_content_length_is_dropped(self) -> None:
        req = parse(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: Chunked\r\n\r\n"
        )
        self.assertEqual(req.length, -1)
        self.assertNotIn(b"Content-Length", req.headers)
        self.assertEqual(req.headers[b"Transfer-Encoding"], [b"chunked"])

    def test_identical_lengths_collapse(self) -> None:
        req = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual((req.length, req.headers[b"Content-Length"]), (5, [b"5"]))

    def test_http10_transfer_encoding_is_ignored(self) -> None:
        req = parse(b"POST / HTTP/1.0\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual((req.length, req.keep_alive), (3, False))

    def test_absolute_form_host_wins(self) -> None:
        req = parse(b"GET http://b.example/p?q HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertEqual((req.host, req.uri, req.path), (b"b.example", b"/p?q", b"/p"))
        self.assertEqual(req.headers[b"Host"], [b"b.example"])

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from([b"GET", b"POST", b"PURGE", b"M-SEARCH"]),
        st.lists(st.text(alphabet="abcxyz019-._~!$&'()*+,;=:@", max_size=8), max_size=4),
        st.lists(st.tuples(header_names, header_values), max_size=15),
    )
    def test_round_trip(self, method: bytes, segments: list[str], headers) -> None:
        headers = [(n, v) for n, v in headers if n.lower() not in _SPECIAL]
        path = ("/" + "/".join(segments)).encode()
        raw = b"%s %s HTTP/1.1\r\nHost: h\r\n" % (method, path)
        raw += b"".join(b"%s: %s\r\n" % (n.encode(), v) for n, v in headers) + b"\r\n"
        req = parse(raw)
        self.assertEqual((req.method, req.path, req.uri), (method, path, path))
        expected: dict[bytes, list[bytes]] = {b"Host": [b"h"]}
        for name, value in headers:
            expected.setdefault(canonical_name(name.encode()), []).append(value)
        self.assertEqual(req.headers, expected)


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return body + b"0\r\n" + trailer + b"\r\n"


class ChunkedTests(unittest.TestCase):
    def decode(self, wire: bytes, strict: bool = True) -> tuple[bytes, bytes | None]:
        out: list[bytes] = []
        rest = ChunkedDecoder(strict).feed(wire, out)
        return b"".join(out), rest

    def test_body_and_rest(self) -> None:
        wire = chunked([b"hello", b" world"], b"X-T: 1\r\n") + b"NEXT"
        self.assertEqual(self.decode(wire), (b"hello world", b"NEXT"))

    def test_malformed(self) -> None:
        for wire in (
            b"zz\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\rX",
            b"12345678901234567\r\n",
            b" 5\r\nhello\r\n",
            b"0\r\nno colon here\r\n\r\n",
            b"1" * 5000,
        ):
            self.assertRaises(MalformedBody, ChunkedDecoder(True).feed, wire, [])

    def test_response_trailers_are_not_checked(self) -> None:
        self.assertEqual(self.decode(b"0\r\nno colon\r\n\r\n", strict=False), (b"", b""))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.binary(max_size=10))
    def test_split_at_every_byte(self, pieces: list[bytes], after: bytes) -> None:
        wire = chunked(pieces, b"X-T: 1\r\n") + after
        for cut in range(len(wire) + 1):
            decoder = ChunkedDecoder(True)
            out: list[bytes] = []
            rest = decoder.feed(wire[:cut], out)
            if rest is None:
                rest = decoder.feed(wire[cut:], out)
            elif cut < len(wire):
                rest += wire[cut:]
            self.assertEqual((b"".join(out), rest), (b"".join(pieces), after), cut)


class ResponseHeadTests(unittest.TestCase):
    def test_tolerant_forms(self) -> None:
        v11, status, reason, headers = parse_response_head(
            b"HTTP/1.1 201 Created\nX-A: 1\r\n  folded\nContent-Length: 2"
        )
        self.assertEqual((v11, status, reason), (True, 201, b"Created"))
        self.assertEqual(headers, [(b"X-A", b"1 folded"), (b"Content-Length", b"2")])

    def test_errors(self) -> None:
        for head in (b"HTTP/1.1 2000 OK", b"SSH-2.0", b"HTTP/1.1 200 OK\r\nBad Header: x"):
            self.assertRaises(BadResponse, parse_response_head, head)

    def test_hop_by_hop_split(self) -> None:
        headers, cl, te, tokens = split_response_headers(
            [
                (b"Content-Length", b"2"),
                (b"Connection", b"keep-alive, X-Private"),
                (b"X-Private", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Trailer", b"X-Sum"),
            ]
        )
        self.assertEqual(headers, [(b"Content-Length", b"2"), (b"Trailer", b"X-Sum")])
        self.assertEqual((cl, te, tokens), ([b"2"], [], {b"keep-alive", b"x-private"}))


# --------------------------------------------------------------------------------------------
# The channel's lean request API


class Recorder:
    """A pipeline stand-in: records requests; ``respond`` decides what each gets."""

    def __init__(self, respond=None) -> None:
        self.requests: list[HTTP1Request] = []
        self.respond = respond

    def handle(self, request: HTTP1Request) -> None:
        self.requests.append(request)
        if self.respond is not None:
            self.respond(request)


def connect(recorder: Recorder) -> tuple[Any, StringTransport]:
    site = make_site(recorder, Clock())
    peer = IPv4Address("TCP", "192.0.2.1", 1234)
    proto = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


class LeanRequestTests(unittest.TestCase):
    def test_respond_is_one_write_with_framing(self) -> None:
        proto, transport = connect(Recorder(lambda r: r.respond(200, [(b"X-A", b"1")], b"ok")))
        proto.dataReceived(GET)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nDate: "))
        self.assertIn(b"\r\nContent-Length: 2", head)
        self.assertEqual(body, b"ok")
        self.assertFalse(transport.disconnecting)

    def test_streamed_chunked_and_head_held_until_body(self) -> None:
        recorder = Recorder(lambda r: r.start_response(200, None, [], None))
        proto, transport = connect(recorder)
        proto.dataReceived(GET)
        self.assertEqual(transport.value(), b"")  # the head waits for the first bytes
        request = recorder.requests[0]
        request.write(b"abc")
        request.finish()
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )

    def test_http10_gets_close_delimited(self) -> None:
        recorder = Recorder(lambda r: r.start_response(200, None, [], None))
        proto, transport = connect(recorder)
        proto.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        recorder.requests[0].write(b"abc")
        recorder.requests[0].finish()
        self.assertEqual(transport.value(), b"HTTP/1.0 200 OK\r\n\r\nabc")
        self.assertTrue(transport.disconnecting)

    def test_head_response_has_length_and_no_body(self) -> None:
        def respond(r: HTTP1Request) -> None:
            r.start_response(200, None, [], 10)
            r.write(b"0123456789")
            r.finish()

        proto, transport = connect(Recorder(respond))
        proto.dataReceived(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")

    def test_close_after_response(self) -> None:
        def respond(r: HTTP1Request) -> None:
            r.respond(301, [(b"Location", b"/x")], b"", close=True)

        proto, transport = connect(Recorder(respond))
        proto.dataReceived(GET + GET)
        self.assertEqual(transport.value().count(b"HTTP/1.1 301"), 1)
        self.assertIn(b"Connection: close\r\n", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_options_asterisk_answered_by_the_server(self) -> None:
        recorder = Recorder()
        proto, transport = connect(recorder)
        proto.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(recorder.requests, [])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Content-Length: 0\r\n", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_http_1_2_served(self) -> None:
        recorder = Recorder(lambda r: r.respond(200, [], b"ok"))
        proto, transport = connect(recorder)
        proto.dataReceived(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n")
        self.assertEqual(recorder.requests[0].version, b"HTTP/1.2")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_many_short_headers_refused_on_first_read(self) -> None:
        """150,000 short headers: 431 from the first 64 KiB, the rest is never kept."""
        recorder = Recorder()
        proto, transport = connect(recorder)
        first = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"a: b\r\n" * 10_000
        proto.dataReceived(first[: 64 << 10])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertEqual(proto._buf, b"")
        proto.dataReceived(b"a: b\r\n" * 10_000)
        self.assertEqual(proto._buf, b"")
        self.assertEqual(recorder.requests, [])

    def test_client_address_and_gone(self) -> None:
        class Exchange:
            gone = 0

            def client_gone(self) -> None:
                self.gone += 1

        exchange = Exchange()

        def keep(r: HTTP1Request) -> None:
            r.exchange = exchange

        recorder = Recorder(keep)
        proto, _ = connect(recorder)
        proto.dataReceived(GET)
        self.assertEqual(recorder.requests[0].client_address(), ("192.0.2.1", "1234"))
        proto.connectionLost()
        self.assertEqual(exchange.gone, 1)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=30), max_size=4))
    def test_split_at_every_byte(self, pieces: list[bytes]) -> None:
        """A chunked request and a pipelined one, cut anywhere: the same two requests."""
        wire = (
            b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(pieces)
            + b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n"
        )

        class Sink:
            def __init__(self) -> None:
                self.data = b""

            def write(self, data: bytes) -> None:
                self.data += data

        for cut in range(1, len(wire)):
            sinks: list[Sink] = []

            def respond(r: HTTP1Request, sinks: list[Sink] = sinks) -> None:
                if r.body is not None:
                    sink = Sink()
                    sinks.append(sink)
                    r.body.start(sink, lambda error, r=r: r.respond(200, [], b"ok"))
                else:
                    r.respond(200, [], b"ok")

            recorder = Recorder(respond)
            proto, transport = connect(recorder)
            proto.dataReceived(wire[:cut])
            proto.dataReceived(wire[cut:])
            self.assertEqual([r.path for r in recorder.requests], [b"/a", b"/b"], cut)
            self.assertEqual(sinks[0].data, b"".join(pieces), cut)
            self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2, cut)


_raw_header = st.tuples(
    st.sampled_from(
        [b"Content-Length", b"connection", b"Keep-Alive", b"X-A", b"Set-Cookie", b"TE", b"x-b"]
    ),
    st.sampled_from([b"1", b"close", b"keep-alive, X-A", b"", b"a=b"]),
)


class ResponseParseEquivalenceTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(_raw_header, max_size=10))
    def test_one_pass_equals_two(self, headers: list[tuple[bytes, bytes]]) -> None:
        from kamal_proxy.proxy.http1 import parse_response

        head = b"HTTP/1.1 200 OK" + b"".join(b"\r\n%s: %s" % h for h in headers)
        v11, status, reason, raw = parse_response_head(head)
        self.assertEqual(parse_response(head), (v11, status, reason, *split_response_headers(raw)))
