"""The HTTP/3 adapter into the pipeline, and Alt-Svc on the HTTPS listener's requests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.trial import unittest
from twisted.web import resource, server

from kamal_proxy.proxy.alt_svc import alt_svc_request, alt_svc_value
from kamal_proxy.proxy.http3 import RequestAborted
from kamal_proxy.proxy.http3_bridge import Http3Bridge
from kamal_proxy.proxy.webrequest import StreamingRequest


class FakeStream:
    """An ``H3Request`` as the bridge sees it, recording the response."""

    def __init__(self, headers: list[tuple[bytes, bytes]], authority: bytes = b"app.test"):
        self.method = b"POST"
        self.scheme = b"https"
        self.authority = authority
        self.path = b"/a%20b/c?x=1"
        self.headers = headers
        self.peer = ("::ffff:10.0.0.1", 5555)
        self.body = object()
        self.on_gone = None
        self.status: int | None = None
        self.fields: list[tuple[bytes, bytes]] = []
        self.data_written = b""
        self.ended = False
        self.aborted = False
        self.producer: Any = None

    def start(self, status, headers):
        self.status, self.fields = status, headers

    def data(self, data):
        self.data_written += data

    def end(self):
        self.ended = True

    def abort(self):
        self.aborted = True

    def register_producer(self, producer):
        self.producer = producer

    def unregister_producer(self):
        self.producer = None


class Recorder(resource.Resource):
    isLeaf = True

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer
        self.requests: list[Any] = []

    def render(self, request):
        self.requests.append(request)
        self.answer(request)
        return server.NOT_DONE_YET


def reply(request) -> None:
    request.setResponseCode(201)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain"])
    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    request.responseHeaders.setRawHeaders(b"Transfer-Encoding", [b"chunked"])
    request.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1")
    request.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2")
    request.write(b"hello")
    request.finish()


class BridgeTests(unittest.TestCase):
    def test_request_as_the_pipeline_sees_it(self):
        stream = FakeStream(
            [
                (b"cookie", b"a=1"),
                (b"cookie", b"b=2"),
                (b"host", b"ignored.test"),
                (b"x-custom", b"v"),
            ]
        )
        recorder = Recorder(lambda request: None)
        Http3Bridge(recorder, 8443)(stream)
        (request,) = recorder.requests
        self.assertEqual(
            (request.method, request.uri, request.path, request.clientproto),
            (b"POST", b"/a%20b/c?x=1", b"/a%20b/c", b"HTTP/3.0"),
        )
        headers = request.requestHeaders
        self.assertEqual(headers.getRawHeaders(b"host"), [b"app.test"])
        self.assertEqual(headers.getRawHeaders(b"cookie"), [b"a=1; b=2"])
        self.assertEqual(headers.getRawHeaders(b"x-custom"), [b"v"])
        self.assertIs(request.body_producer, stream.body)
        self.assertTrue(request.isSecure())
        peer = request.getClientAddress()
        self.assertEqual((peer.host, peer.port), ("::ffff:10.0.0.1", 5555))
        # No Alt-Svc on HTTP/3 responses.
        reply(request)
        self.assertNotIn(b"alt-svc", dict(stream.fields))

    def test_host_header_when_there_is_no_authority(self):
        stream = FakeStream([(b"host", b"h.test")], authority=b"")
        recorder = Recorder(lambda request: None)
        Http3Bridge(recorder, 8443)(stream)
        self.assertEqual(recorder.requests[0].requestHeaders.getRawHeaders(b"host"), [b"h.test"])

    def test_response_fields_are_http3_shaped(self):
        stream = FakeStream([])
        Http3Bridge(Recorder(reply), 8443)(stream)
        self.assertEqual(stream.status, 201)
        names = [name for name, _ in stream.fields]
        self.assertEqual(names, [name.lower() for name in names])
        self.assertNotIn(b"connection", names)
        self.assertNotIn(b"transfer-encoding", names)
        self.assertIn(b"date", names)
        self.assertEqual([v for n, v in stream.fields if n == b"set-cookie"], [b"a=1", b"b=2"])
        self.assertEqual((stream.data_written, stream.ended), (b"hello", True))

    def test_client_gone_reaches_notify_finish_and_abort_resets_the_stream(self):
        stream = FakeStream([])
        recorder = Recorder(lambda request: None)
        Http3Bridge(recorder, 8443)(stream)
        request = recorder.requests[0]
        finished = request.notifyFinish()
        stream.on_gone(RequestAborted("gone"))
        self.failureResultOf(finished)
        other = FakeStream([])
        Http3Bridge(recorder, 8443)(other)
        recorder.requests[1].channel.transport.abortConnection()
        self.assertTrue(other.aborted)


class FakeChannel:
    """Just enough of an HTTP/1.1 channel for a ``StreamingRequest``'s response."""

    transport = None
    site = None

    def __init__(self) -> None:
        self.headers: Any = None

    def getPeer(self):
        return None

    def getHost(self):
        return None

    def isSecure(self) -> bool:
        return True

    def writeHeaders(self, version, code, reason, headers) -> None:
        self.headers = headers

    def write(self, data) -> None:
        pass

    def writeSequence(self, data) -> None:
        pass

    def requestDone(self, request) -> None:
        pass


class AltSvcTests(unittest.TestCase):
    def test_value(self):
        self.assertEqual(alt_svc_value(8443), b'h3=":8443"; ma=2592000')

    def test_set_before_processing_and_after_headers_were_cleared(self):
        cls = alt_svc_request(443)
        self.assertTrue(issubclass(cls, StreamingRequest))
        channel = FakeChannel()
        seen: list[Any] = []
        channel.site = SimpleNamespace(
            resource=Recorder(lambda r: seen.append(r.responseHeaders.getRawHeaders(b"alt-svc")))
        )
        request = cls(channel)
        request.method, request.uri, request.clientproto = b"GET", b"/", b"HTTP/1.1"
        request.path = b"/"
        request.process()
        # The pipeline sees it from the start (an upgrade's 101 head is built from these).
        self.assertEqual(seen, [[alt_svc_value(443)]])
        # An error page starts from empty headers, as the pipeline's ``fail`` does.
        for name in list(dict(request.responseHeaders.getAllRawHeaders())):
            request.responseHeaders.removeHeader(name)
        request.setHeader(b"content-length", b"0")
        request.finish()
        self.assertEqual(channel.headers.getRawHeaders(b"alt-svc"), [alt_svc_value(443)])

    def test_plain_requests_do_not_get_it(self):
        channel = FakeChannel()
        request = StreamingRequest(channel)
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.setHeader(b"content-length", b"0")
        request.finish()
        self.assertIsNone(channel.headers.getRawHeaders(b"alt-svc"))
