"""The client-facing HTTP/1.1 channel (SPEC §4.3): strict parsing, streaming bodies, upgrades."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kamal_proxy.proxy.channel import (
    BODY_BUFFER_LIMIT,
    ClientGone,
    MalformedBody,
    make_site,
)
from kamal_proxy.proxy.webrequest import StreamingRequest
from tests.strategies import header_names, header_values


class Handler(Resource):
    """Records requests; ``respond`` decides what each gets (default: 200 'ok' at once)."""

    isLeaf = True

    def __init__(self, respond: Callable[[StreamingRequest], Any] | None = None) -> None:
        super().__init__()
        self.requests: list[StreamingRequest] = []
        self.respond = respond or (lambda request: b"ok")

    def render(self, request: StreamingRequest) -> Any:
        self.requests.append(request)
        return self.respond(request)


class Sink:
    """A body consumer that can push back."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    @property
    def body(self) -> bytes:
        return b"".join(self.data)


def connect(resource: Resource) -> tuple[Any, StringTransport, Clock]:
    clock = Clock()
    site = make_site(resource, clock)
    peer = IPv4Address("TCP", "192.0.2.1", 1234)
    proto = site.buildProtocol(peer)
    proto.callLater = clock.callLater
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 80))
    proto.makeConnection(transport)
    return proto, transport, clock


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, list[bytes]], bytes]]:
    """Split a byte stream into (status, headers, body) responses (CL, chunked or to EOF)."""
    responses = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, head
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if 100 <= status < 200:
            responses.append((status, headers, b""))
            continue
        if b"content-length" in headers:
            n = int(headers[b"content-length"][0])
            body, data = data[:n], data[n:]
        elif headers.get(b"transfer-encoding") == [b"chunked"]:
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    _, _, data = data.partition(b"\r\n")
                    break
                body += data[:size]
                data = data[size + 2 :]
        else:
            body, data = data, b""
        responses.append((status, headers, body))
    return responses


GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


class RejectedRequestTests(unittest.TestCase):
    """SPEC §4.3 table: these never reach the resource and close the connection."""

    def assertRejected(self, raw: bytes, status: int) -> bytes:
        handler = Handler()
        proto, transport, _ = connect(handler)
        proto.dataReceived(raw)
        responses = parse_responses(transport.value())
        self.assertEqual(len(responses), 1, transport.value())
        code, headers, body = responses[0]
        self.assertEqual(code, status)
        self.assertEqual(headers[b"content-type"], [b"text/plain; charset=utf-8"])
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(handler.requests, [])
        self.assertTrue(transport.disconnecting)
        # Nothing more is parsed on a rejected connection.
        proto.dataReceived(GET)
        self.assertEqual(handler.requests, [])
        return body

    def test_malformed_request_line(self) -> None:
        self.assertRejected(b"GARBAGE\r\n\r\n", 400)

    def test_request_line_with_extra_parts(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1 x\r\nHost: a\r\n\r\n", 400)

    def test_missing_host(self) -> None:
        body = self.assertRejected(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400)
        self.assertIn(b"missing required Host header", body)

    def test_two_hosts(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)

    def test_invalid_host_chars(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400)

    def test_whitespace_before_colon(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo : a\r\n\r\n", 400)

    def test_header_without_colon(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo\r\n\r\n", 400)

    def test_obs_fold(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400)

    def test_nul_in_value(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\x00b\r\n\r\n", 400)

    def test_control_char_in_value(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\x01b\r\n\r\n", 400)

    def test_bare_cr_in_value(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\rb\r\n\r\n", 400)

    def test_conflicting_content_length(self) -> None:
        raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
        self.assertRejected(raw, 400)

    def test_negative_content_length(self) -> None:
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400)

    def test_non_numeric_content_length(self) -> None:
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400)

    def test_content_length_list(self) -> None:
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400)

    def test_unsupported_transfer_encoding(self) -> None:
        raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"
        body = self.assertRejected(raw, 501)
        self.assertEqual(body, b"Unsupported transfer encoding")

    def test_two_transfer_encodings(self) -> None:
        raw = (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.assertRejected(raw, 501)

    def test_headers_too_large(self) -> None:
        raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * ((1 << 20) + 4096) + b"\r\n\r\n"
        self.assertRejected(raw, 431)

    def test_headers_too_large_incomplete(self) -> None:
        raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * ((1 << 20) + 8192)
        self.assertRejected(raw, 431)

    def test_request_line_too_large(self) -> None:
        self.assertRejected(b"GET /" + b"a" * ((1 << 20) + 8192), 431)

    def test_just_under_the_limit_is_served(self) -> None:
        handler = Handler()
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n")
        proto.dataReceived(b"\r\n")
        self.assertEqual(len(handler.requests), 1)

    def test_http_9_9(self) -> None:
        self.assertRejected(b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505)

    def test_http_2_as_text(self) -> None:
        self.assertRejected(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505)

    def test_malformed_version(self) -> None:
        self.assertRejected(b"GET / HTTP/1\r\nHost: a\r\n\r\n", 400)

    def test_invalid_method(self) -> None:
        self.assertRejected(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400)

    def test_relative_target(self) -> None:
        self.assertRejected(b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400)

    def test_bad_percent_escape(self) -> None:
        self.assertRejected(b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400)

    def test_unknown_expectation(self) -> None:
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\n\r\n", 417)

    def test_tls_client_hello(self) -> None:
        self.assertRejected(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400)

    def test_garbage_line_before_head_complete(self) -> None:
        self.assertRejected(b"\x00\x01\x02garbage\r\nmore", 400)

    def test_close_in_the_middle_of_headers(self) -> None:
        handler = Handler()
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n")
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(handler.requests, [])
        self.assertEqual(transport.value(), b"")


class RequestParsingTests(unittest.TestCase):
    def test_simple_get(self) -> None:
        handler = Handler()
        proto, transport, _ = connect(handler)
        proto.dataReceived(
            b"GET /a%20b/c?x=1&y HTTP/1.1\r\nHost: Example.COM:8080\r\nX-A: 1\r\nx-a:  2 \r\n\r\n"
        )
        [request] = handler.requests
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.uri, b"/a%20b/c?x=1&y")
        self.assertEqual(request.path, b"/a%20b/c")
        self.assertEqual(request.clientproto, b"HTTP/1.1")
        self.assertEqual(request.requestHeaders.getRawHeaders(b"host"), [b"Example.COM:8080"])
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-a"), [b"1", b"2"])
        self.assertEqual(request.args, {b"x": [b"1"], b"y": [b""]})
        self.assertIs(request.body_producer.length, 0)
        self.assertEqual(request.getClientAddress().host, "192.0.2.1")
        self.assertFalse(request.isSecure())
        [(status, headers, body)] = parse_responses(transport.value())
        self.assertEqual((status, body), (200, b"ok"))
        self.assertNotIn(b"server", headers)
        self.assertIn(b"date", headers)
        self.assertFalse(transport.disconnecting)

    def test_empty_host(self) -> None:
        handler = Handler()
        proto, _, _ = connect(handler)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
        self.assertEqual(handler.requests[0].requestHeaders.getRawHeaders(b"host"), [b""])

    def test_http10_without_host(self) -> None:
        handler = Handler(lambda request: request.getHeader(b"host") or b"none")
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"GET /x HTTP/1.0\r\n\r\n")
        self.assertEqual(handler.requests[0].clientproto, b"HTTP/1.0")
        self.assertTrue(transport.value().startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertTrue(transport.value().endswith(b"\r\n\r\nnone"))
        self.assertTrue(transport.disconnecting)

    def test_absolute_form(self) -> None:
        handler = Handler()
        proto, _, _ = connect(handler)
        proto.dataReceived(b"GET http://h.example/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
        [request] = handler.requests
        self.assertEqual(request.requestHeaders.getRawHeaders(b"host"), [b"h.example"])
        self.assertEqual(request.path, b"/p")
        self.assertEqual(request.uri, b"/p?q=1")

    def test_absolute_form_without_path(self) -> None:
        handler = Handler()
        proto, _, _ = connect(handler)
        proto.dataReceived(b"GET http://user@h.example:81 HTTP/1.1\r\nHost: other\r\n\r\n")
        [request] = handler.requests
        self.assertEqual(request.requestHeaders.getRawHeaders(b"host"), [b"h.example:81"])
        self.assertEqual(request.uri, b"/")

    def test_bare_lf_heads(self) -> None:
        handler = Handler()
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"GET /a HTTP/1.1\nHost: a\n\nGET /b HTTP/1.1\r\nHost: b\n\r\n")
        self.assertEqual([r.path for r in handler.requests], [b"/a", b"/b"])

    def test_leading_blank_lines(self) -> None:
        handler = Handler()
        proto, _, _ = connect(handler)
        proto.dataReceived(b"\r\n\r\n" + GET)
        self.assertEqual(len(handler.requests), 1)

    def test_pragma_no_cache(self) -> None:
        handler = Handler()
        proto, _, _ = connect(handler)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nPragma: no-cache\r\n\r\n")
        headers = handler.requests[0].requestHeaders
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])

    def test_head_split_across_reads(self) -> None:
        handler = Handler()
        proto, transport, _ = connect(handler)
        for i in range(len(GET)):
            proto.dataReceived(GET[i : i + 1])
        self.assertEqual(len(handler.requests), 1)
        self.assertEqual(parse_responses(transport.value())[0][0], 200)

    def test_cookies_parsed_lazily(self) -> None:
        handler = Handler()
        proto, _, _ = connect(handler)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1; kamal-writer=x\r\n\r\n")
        self.assertEqual(handler.requests[0].getCookie(b"kamal-writer"), b"x")


class PersistenceTests(unittest.TestCase):
    def test_pipelined_requests_answered_in_order(self) -> None:
        handler = Handler(lambda request: request.path)
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(21)))
        responses = parse_responses(transport.value())
        self.assertEqual(len(responses), 21)
        self.assertEqual([r[2] for r in responses], [b"/%d" % i for i in range(21)])
        self.assertTrue(all(r[0] == 200 for r in responses))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_pipelined_async_responses_wait_their_turn(self) -> None:
        handler = Handler(lambda request: NOT_DONE_YET)
        proto, transport, _ = connect(handler)
        proto.dataReceived(GET + GET + GET)
        self.assertEqual(len(handler.requests), 1)
        handler.requests[0].write(b"first")
        handler.requests[0].finish()
        self.assertEqual(len(handler.requests), 2)
        handler.requests[1].finish()
        handler.requests[2].write(b"third")
        handler.requests[2].finish()
        self.assertEqual(
            [r[2] for r in parse_responses(transport.value())], [b"first", b"", b"third"]
        )

    def test_pipelined_bytes_pause_reading(self) -> None:
        handler = Handler(lambda request: NOT_DONE_YET)
        proto, transport, _ = connect(handler)
        proto.dataReceived(GET * 1000)
        self.assertEqual(transport.producerState, "paused")
        while transport.producerState == "paused":
            handler.requests[-1].finish()
        self.assertLess(len(handler.requests), 1000)
        while len(handler.requests) < 1000:
            handler.requests[-1].finish()
        self.assertEqual(len(parse_responses(transport.value())), 999)

    def test_connection_close(self) -> None:
        handler = Handler()
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n" + GET)
        [(status, headers, _)] = parse_responses(transport.value())
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(handler.requests), 1)

    def test_chunked_response_without_length(self) -> None:
        def respond(request: StreamingRequest) -> Any:
            request.write(b"abc")
            request.write(b"def")
            request.finish()
            return NOT_DONE_YET

        proto, transport, _ = connect(Handler(respond))
        proto.dataReceived(GET + GET)
        responses = parse_responses(transport.value())
        self.assertEqual([r[2] for r in responses], [b"abcdef", b"abcdef"])
        self.assertEqual(responses[0][1][b"transfer-encoding"], [b"chunked"])

    def test_no_content_type_added(self) -> None:
        def respond(request: StreamingRequest) -> Any:
            request.write(b"x")
            request.finish()
            return NOT_DONE_YET

        proto, transport, _ = connect(Handler(respond))
        proto.dataReceived(GET)
        self.assertNotIn(b"content-type", parse_responses(transport.value())[0][1])


class BodyTests(unittest.TestCase):
    def test_content_length_body_streams(self) -> None:
        sink = Sink()
        done: list[Any] = []

        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(sink).addCallback(done.append)
            return NOT_DONE_YET

        handler = Handler(respond)
        proto, _, _ = connect(handler)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        self.assertEqual(handler.requests[0].body_producer.length, 10)
        self.assertEqual(sink.body, b"hello")
        self.assertEqual(done, [])
        proto.dataReceived(b"world" + GET)
        self.assertEqual(sink.body, b"helloworld")
        self.assertEqual(done, [None])
        self.assertEqual(len(handler.requests), 1)  # next request waits for this response
        handler.requests[0].finish()
        self.assertEqual(len(handler.requests), 2)

    def test_body_before_start_is_buffered(self) -> None:
        handler = Handler(lambda request: NOT_DONE_YET)
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
        proto.dataReceived(b"lo")
        sink = Sink()
        done: list[Any] = []
        handler.requests[0].body_producer.startProducing(sink).addCallback(done.append)
        self.assertEqual((sink.body, done), (b"hello", [None]))

    def test_large_unstarted_body_pauses_transport(self) -> None:
        handler = Handler(lambda request: NOT_DONE_YET)
        proto, transport, _ = connect(handler)
        size = 10 * BODY_BUFFER_LIMIT
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        proto.dataReceived(b"x" * (BODY_BUFFER_LIMIT + 1))
        self.assertEqual(transport.producerState, "paused")
        sink = Sink()
        handler.requests[0].body_producer.startProducing(sink)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(sink.body), BODY_BUFFER_LIMIT + 1)

    def test_chunked_upload_with_flow_control(self) -> None:
        sink = Sink()
        done: list[Any] = []

        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(sink).addCallback(done.append)
            return NOT_DONE_YET

        handler = Handler(respond)
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        producer = handler.requests[0].body_producer
        self.assertIs(producer.length, UNKNOWN_LENGTH)
        chunk = b"y" * 1000
        total = 0
        for _ in range(200):
            proto.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            total += len(chunk)
        self.assertEqual(len(sink.body), total)
        # The consumer pushes back: the client socket is paused, the body is held briefly.
        producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        proto.dataReceived(b"5;ext=1\r\nabcde\r\n")
        self.assertEqual(len(sink.body), total)
        producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(sink.body[-5:], b"abcde")
        proto.dataReceived(b"0\r\nX-Trailer: 1\r\n\r\n")
        self.assertEqual(done, [None])

    def test_content_length_and_chunked(self) -> None:
        sink = Sink()

        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(sink)
            return NOT_DONE_YET

        handler = Handler(respond)
        proto, _, _ = connect(handler)
        proto.dataReceived(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        [request] = handler.requests
        self.assertIsNone(request.requestHeaders.getRawHeaders(b"content-length"))
        self.assertEqual(request.requestHeaders.getRawHeaders(b"transfer-encoding"), [b"chunked"])
        self.assertIs(request.body_producer.length, UNKNOWN_LENGTH)
        self.assertEqual(sink.body, b"hello")

    def test_http10_transfer_encoding_ignored(self) -> None:
        handler = Handler(lambda request: NOT_DONE_YET)
        proto, _, _ = connect(handler)
        proto.dataReceived(
            b"POST / HTTP/1.0\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabc"
        )
        self.assertEqual(handler.requests[0].body_producer.length, 3)

    def test_malformed_chunked_body(self) -> None:
        failures: list[Failure] = []

        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(Sink()).addErrback(failures.append)
            return NOT_DONE_YET

        handler = Handler(respond)
        proto, transport, _ = connect(handler)
        proto.dataReceived(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + GET
        )
        [failure] = failures
        failure.trap(MalformedBody)
        request = handler.requests[0]
        request.setResponseCode(400)
        request.finish()
        self.assertEqual(len(handler.requests), 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(parse_responses(transport.value())[0][1][b"connection"], [b"close"])

    def test_bad_chunk_terminator(self) -> None:
        failures: list[Failure] = []

        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(Sink()).addErrback(failures.append)
            return NOT_DONE_YET

        proto, _, _ = connect(Handler(respond))
        proto.dataReceived(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n"
        )
        failures[0].trap(MalformedBody)

    def test_unused_body_is_discarded_keeping_the_connection(self) -> None:
        handler = Handler(lambda request: b"not found")
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nab")
        proto.dataReceived(b"cdef" + GET)
        proto.dataReceived(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n" + GET
        )
        self.assertEqual(len(parse_responses(transport.value())), 4)
        self.assertFalse(transport.disconnecting)

    def test_large_unused_body_closes(self) -> None:
        handler = Handler(lambda request: b"no")
        proto, transport, _ = connect(handler)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n")
        [(_, headers, _)] = parse_responses(transport.value())
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(transport.disconnecting)

    def test_stopped_body_closes_after_response(self) -> None:
        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(Sink())
            request.body_producer.stopProducing()
            request.setResponseCode(413)
            return b"too large"

        proto, transport, _ = connect(Handler(respond))
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        [(status, headers, _)] = parse_responses(transport.value())
        self.assertEqual((status, headers[b"connection"]), (413, [b"close"]))
        self.assertTrue(transport.disconnecting)

    def test_expect_continue_sent_when_body_consumed(self) -> None:
        handler = Handler(lambda request: NOT_DONE_YET)
        proto, transport, _ = connect(handler)
        proto.dataReceived(
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"")
        sink = Sink()
        handler.requests[0].body_producer.startProducing(sink)
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        proto.dataReceived(b"abc")
        self.assertEqual(sink.body, b"abc")

    def test_expect_continue_unconsumed_closes(self) -> None:
        handler = Handler(lambda request: b"nope")
        proto, transport, _ = connect(handler)
        proto.dataReceived(
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
        )
        [(status, headers, _)] = parse_responses(transport.value())
        self.assertEqual((status, headers[b"connection"]), (200, [b"close"]))
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTrue(transport.disconnecting)


class DisconnectTests(unittest.TestCase):
    def test_client_gone_while_waiting(self) -> None:
        handler = Handler(lambda request: NOT_DONE_YET)
        proto, _, _ = connect(handler)
        proto.dataReceived(GET)
        failures: list[Failure] = []
        handler.requests[0].notifyFinish().addErrback(failures.append)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(failures), 1)
        # Late writes and finish from the proxy are harmless.
        handler.requests[0].write(b"late")
        handler.requests[0].finish()

    def test_client_gone_during_body(self) -> None:
        failures: list[Failure] = []

        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(Sink()).addErrback(failures.append)
            return NOT_DONE_YET

        proto, _, _ = connect(Handler(respond))
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        proto.connectionLost(Failure(ConnectionLost()))
        failures[0].trap(ClientGone)


class Tunnel(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class UpgradeTests(unittest.TestCase):
    def test_take_over_transport(self) -> None:
        tunnel = Tunnel()
        finished: list[Any] = []

        def respond(request: StreamingRequest) -> Any:
            request.setResponseCode(101)
            request.responseHeaders.setRawHeaders(b"upgrade", [b"websocket"])
            request.responseHeaders.setRawHeaders(b"connection", [b"Upgrade"])
            request.notifyFinish().addCallback(finished.append)
            request.take_over_transport(tunnel, write_head=True)
            return NOT_DONE_YET

        handler = Handler(respond)
        proto, transport, _ = connect(handler)
        proto.dataReceived(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"\x81\x05early"
        )
        head = transport.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertNotIn(b"chunked", head.lower())
        self.assertIs(tunnel.transport, transport)
        self.assertEqual(tunnel.received, b"\x81\x05early")
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(tunnel.received, b"\x81\x05earlyGET / HTTP/1.1\r\n\r\n")
        self.assertEqual(len(handler.requests), 1)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(tunnel.lost), 1)
        handler.requests[0].finish()
        self.assertEqual(finished, [None])

    def test_take_over_after_head_written_by_caller(self) -> None:
        tunnel = Tunnel()

        def respond(request: StreamingRequest) -> Any:
            transport = request.channel.transport
            transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
            tunnel.makeConnection(transport)
            request.take_over_transport(tunnel)
            return NOT_DONE_YET

        proto, transport, _ = connect(Handler(respond))
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\n\r\nabc")
        self.assertEqual(
            transport.value(), b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"
        )
        self.assertEqual(tunnel.received, b"abc")
        transport.unregisterProducer()  # the channel leaves its producer slot to the tunnel


class ProducerTests(unittest.TestCase):
    def test_response_producer_paused_by_client(self) -> None:
        class Producer:
            paused = 0
            resumed = 0

            def pauseProducing(self) -> None:
                self.paused += 1

            def resumeProducing(self) -> None:
                self.resumed += 1

            def stopProducing(self) -> None:
                pass

        producer = Producer()

        def respond(request: StreamingRequest) -> Any:
            request.registerProducer(producer, True)
            return NOT_DONE_YET

        handler = Handler(respond)
        proto, _, _ = connect(handler)
        proto.dataReceived(GET)
        proto._channel.pauseProducing()
        proto._channel.resumeProducing()
        self.assertEqual((producer.paused, producer.resumed), (1, 1))
        handler.requests[0].unregisterProducer()
        handler.requests[0].finish()


class PropertyTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(header_names, header_values), max_size=15))
    def test_headers_round_trip(self, headers: list[tuple[str, bytes]]) -> None:
        headers = [
            (n, v)
            for n, v in headers
            if n.lower()
            not in {
                "host",
                "content-length",
                "transfer-encoding",
                "expect",
                "connection",
                "pragma",
                "cache-control",
            }
        ]
        handler = Handler()
        proto, transport, _ = connect(handler)
        raw = (
            b"GET / HTTP/1.1\r\nHost: h\r\n"
            + b"".join(b"%s: %s\r\n" % (n.encode(), v) for n, v in headers)
            + b"\r\n"
        )
        proto.dataReceived(raw)
        [request] = handler.requests
        expected: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            expected.setdefault(name.lower().encode(), []).append(value)
        for name, values in expected.items():
            self.assertEqual(request.requestHeaders.getRawHeaders(name), values)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=200), max_size=6))
    def test_garbage_never_raises(self, pieces: list[bytes]) -> None:
        handler = Handler()
        proto, transport, _ = connect(handler)
        for piece in pieces:
            proto.dataReceived(piece)
        proto.connectionLost(Failure(ConnectionLost()))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.binary(min_size=1, max_size=50), max_size=8),
        st.integers(min_value=1, max_value=13),
    )
    def test_chunked_body_any_split(self, chunks: list[bytes], step: int) -> None:
        sink = Sink()
        done: list[Any] = []

        def respond(request: StreamingRequest) -> Any:
            request.body_producer.startProducing(sink).addCallback(done.append)
            return NOT_DONE_YET

        proto, _, _ = connect(Handler(respond))
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        for i in range(0, len(raw), step):
            proto.dataReceived(raw[i : i + step])
        self.assertEqual(sink.body, b"".join(chunks))
        self.assertEqual(done, [None])


class LoopbackTests(unittest.TestCase):
    """Over real TCP on 127.0.0.1: the rejection reaches the client before the close."""

    def test_oversized_head_over_tcp(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        site = make_site(Handler(), reactor)
        server_lost: Deferred[None] = Deferred()
        build = site.buildProtocol

        def build_protocol(addr: Any) -> Any:
            proto = build(addr)
            channel = proto._channel
            lost = channel.connectionLost

            def connection_lost(reason: Failure) -> None:
                lost(reason)
                server_lost.callback(None)

            channel.connectionLost = connection_lost
            return proto

        site.buildProtocol = build_protocol  # type: ignore[method-assign]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        class Client(Protocol):
            def __init__(self) -> None:
                self.data = b""
                self.done: Deferred[bytes] = Deferred()

            def connectionMade(self) -> None:
                self.transport.write(
                    GET + b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (2 << 20) + b"\r\n\r\n"
                )

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: Failure) -> None:
                self.done.callback(self.data)

        client = Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        d = connectProtocol(endpoint, client).addCallback(lambda _: client.done)

        def check(data: bytes) -> Deferred[None]:
            statuses = [r[0] for r in parse_responses(data)]
            self.assertEqual(statuses, [200, 431])
            return server_lost

        return d.addCallback(check)


class ShutdownTests(unittest.TestCase):
    """``close_idle``: what a graceful stop does to open connections (SPEC §4.2)."""

    def test_idle_closes_now_busy_closes_after_its_response(self):
        from twisted.web.server import NOT_DONE_YET

        held: list[StreamingRequest] = []

        def respond(request):
            if request.path == b"/slow":
                held.append(request)
                return NOT_DONE_YET
            return b"ok"

        clock = Clock()
        site = make_site(Handler(respond), clock)
        transports = []
        for _ in range(2):
            peer = IPv4Address("TCP", "192.0.2.1", 1234)
            proto = site.buildProtocol(peer)
            transport = StringTransport(peerAddress=peer)
            proto.makeConnection(transport)
            transports.append((proto, transport))
        (idle, idle_t), (busy, busy_t) = transports
        idle.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        busy.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(parse_responses(idle_t.value())[0][0], 200)

        site.close_idle()
        self.assertTrue(idle_t.disconnecting)
        self.assertFalse(busy_t.disconnecting)

        held[0].write(b"done")
        held[0].finish()
        status, headers, body = parse_responses(busy_t.value())[0]
        self.assertEqual((status, body), (200, b"done"))
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(busy_t.disconnecting)
