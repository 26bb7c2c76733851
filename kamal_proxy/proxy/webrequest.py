"""twisted.web requests on either side of the pipeline: HTTP/2, HTTP/3, probes, resources.

The HTTP/1 data plane never imports this module.  It is loaded when a request arrives as a
twisted.web ``Request`` instead of an :class:`~.channel.HTTP1Request`:

* **HTTP/2** is Twisted's ``H2Connection`` under a twisted.web ``Site`` (:func:`web_site`),
  whose requests are :class:`StreamingRequest`; the HTTP/3 bridge and the on-demand TLS
  probe make the same kind of request.  ``RoutingResource.render`` wraps each in a
  :class:`WebRequest`, the pipeline's view of a request, so one pipeline serves them all.
* **Any other twisted.web resource** given to ``make_site`` (a test's, for instance) gets
  its HTTP/1 requests as :class:`StreamingRequest` through :class:`ResourceHandler`, which
  makes the HTTP/1 connection look like a twisted.web channel.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.proxy.channel import HTTP1Request, host_and_port, http_date
from kamal_proxy.proxy.http1 import canonical_name

__all__ = [
    "EMPTY_BODY",
    "ContentBody",
    "ResourceHandler",
    "StreamingRequest",
    "WebRequest",
    "web_site",
]


@implementer(IBodyProducer)
class _EmptyBody:
    """The body of a request without one: costs nothing until someone asks for it."""

    length = 0

    def startProducing(self, consumer: Any) -> Deferred[None]:
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


EMPTY_BODY = _EmptyBody()


@implementer(IBodyProducer)
class ContentBody:
    """An HTTP/2 request body: it already sits in ``request.content``, replay it."""

    CHUNK = 64 << 10

    def __init__(self, content: Any, length: Any) -> None:
        self.length = length
        self._content = content
        self._consumer: Any = None
        self._d: Deferred[None] | None = None
        self._paused = False
        self._stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._d = Deferred()
        d = self._d
        self._pump()
        return d

    def _pump(self) -> None:
        while not self._paused and not self._stopped and self._d is not None:
            data = self._content.read(self.CHUNK)
            if not data:
                d, self._d = self._d, None
                d.callback(None)
                return
            self._consumer.write(data)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stopped = True
        self._d = None


# --------------------------------------------------------------------------------------------
# twisted.web requests


class StreamingRequest(server.Request):
    """A ``server.Request`` rendered as soon as its head is known.

    Extra API: ``body_producer`` (``IBodyProducer``), ``take_over_transport(protocol)`` for
    upgrades and ``write_informational(code, headers)`` for 1xx responses.
    """

    defaultContentType = None
    body_producer: Any = EMPTY_BODY
    #: True once the client connection is gone (``connectionLost``).
    gone = False
    _upgraded = False
    _args: dict[bytes, list[bytes]] | None = None
    _cookies: dict[bytes, bytes] | None = None

    def __init__(self, channel: Any, queued: object = None, **kwargs: Any) -> None:
        server.Request.__init__(self, channel, queued=False, parsePOSTFormSubmission=False)
        self._cookies = None  # parsed when first asked for (received_cookies)

    # Lazily computed legacy attributes (most requests never look at them).

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        if self._args is None:
            _, _, query = self.uri.partition(b"?")
            self._args = parse_qs(query, 1) if query else {}
        return self._args

    @args.setter
    def args(self, value: dict[bytes, list[bytes]]) -> None:
        self._args = value

    @property
    def received_cookies(self) -> dict[bytes, bytes]:
        if self._cookies is None:
            self._cookies = {}
            for text in self.requestHeaders.getRawHeaders(b"Cookie", ()):
                for cookie in text.split(b";"):
                    key, sep, value = cookie.lstrip().partition(b"=")
                    if sep:
                        self._cookies[key] = value
        return self._cookies

    @received_cookies.setter
    def received_cookies(self, value: dict[bytes, bytes]) -> None:
        self._cookies = value

    def parseCookies(self) -> None:
        """Cookies are parsed lazily by ``received_cookies``."""

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        http.Request.connectionLost(self, reason)

    # HTTP/2 (and any legacy caller): the whole body is already in ``self.content``.

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        content = self.content
        size = 0
        if content is not None:
            size = content.tell()
            content.seek(0, 0)
        self.method = command
        self.uri = path
        self.clientproto = b"HTTP/2.0" if version == b"HTTP/2" else version
        self.path = path.split(b"?", 1)[0]
        declared = self.requestHeaders.getRawHeaders(b"Content-Length")
        if declared and declared[0].isdigit():
            length: Any = int(declared[0])
        else:
            length = UNKNOWN_LENGTH if size else 0
        if size:
            self.body_producer = ContentBody(content, length)
        self.process()

    def process(self) -> None:
        site = self.site = self.channel.site
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        try:
            root = site.resource
            resrc = root if root.isLeaf else site.getResourceFor(self)
            self.render(resrc)
        except BaseException:
            self.processingFailed(Failure())

    write = http.Request.write

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.gone or self.channel is None:
            producer.stopProducing()
            return
        http.Request.registerProducer(self, producer, streaming)

    def unregisterProducer(self) -> None:
        if self.channel is None:
            self.producer = None
            return
        http.Request.unregisterProducer(self)

    def finish(self) -> None:
        """Finish the response; quietly does nothing once the client is gone (unlike Twisted)."""
        if self.finished or self.gone:
            return
        if self._upgraded:
            self.finished = 1
            notifications, self.notifications = self.notifications, []
            for d in notifications:
                d.callback(None)
            return
        http.Request.finish(self)

    def take_over_transport(self, protocol: IProtocol, write_head: bool = False) -> None:
        """Hand the raw client connection to ``protocol`` (after an upstream ``101``).

        The caller has written the ``101`` head to ``request.channel.transport`` already, or
        passes ``write_head=True`` to have it written from ``code``/``responseHeaders`` (no
        body framing).  HTTP parsing stops; ``protocol.makeConnection(transport)`` is called
        unless ``protocol.transport`` is already set; bytes received after the request head
        are delivered to ``protocol.dataReceived`` at once, later ones and ``connectionLost``
        as they come.  ``finish()`` then only fires the ``notifyFinish`` Deferreds.
        """
        channel = self.channel
        if channel is None or self.gone:
            raise RuntimeError("client connection already gone")
        take_over = getattr(channel, "_take_over", None)
        if take_over is None:
            raise RuntimeError("connection upgrades need HTTP/1.1")
        if write_head and not self.startedWriting:
            channel.writeHeaders(
                self.clientproto, b"%d" % self.code, self.code_message, self.responseHeaders
            )
            channel._flush_head()
        self.startedWriting = 1
        self._upgraded = True
        take_over(self, protocol)

    def write_informational(self, code: int, headers: Headers | None = None) -> None:
        """Send a 1xx interim response (e.g. 103 Early Hints) before the final one."""
        if self.startedWriting or self.channel is None or self.gone:
            return
        if self.clientproto != b"HTTP/1.1":
            return
        write_info = getattr(self.channel, "writeInformational", None)
        if write_info is not None:
            write_info(code, headers or Headers())


class _WebSite(server.Site):
    """The twisted.web ``Site`` behind HTTP/2: streaming requests, no log, no timeout."""

    requestFactory = StreamingRequest

    def log(self, request: Any) -> None:
        """The proxy writes its own request log (SPEC §17.2)."""

    def startFactory(self) -> None:
        """No access log file and no log-time ticker."""

    def stopFactory(self) -> None:
        pass


def web_site(root: Any, reactor: Any, request_factory: Any = None) -> server.Site:
    """A twisted.web ``Site`` for ``root`` (its ``buildProtocol`` negotiates HTTP/2);
    ``request_factory`` replaces :class:`StreamingRequest` (a subclass of it)."""
    site = _WebSite(root, timeout=None, reactor=reactor, parsePOSTFormSubmission=False)
    if request_factory is not None:
        site.requestFactory = request_factory
    return site


# --------------------------------------------------------------------------------------------
# The pipeline's view of a twisted.web request (HTTP/2, HTTP/3, probes)


class WebRequest:
    """A twisted.web request through the interface of :class:`~.channel.HTTP1Request`."""

    __slots__ = (
        "web",
        "method",
        "uri",
        "path",
        "version",
        "http11",
        "headers",
        "host",
        "body",
        "exchange",
        "started",
        "finished",
        "secure",
    )

    def __init__(self, web: Any) -> None:
        self.web = web
        self.method = web.method
        self.uri = web.uri
        self.path = web.path
        self.version = web.clientproto
        self.http11 = True
        headers: dict[bytes, list[bytes]] = {}
        for name, values in web.requestHeaders.getAllRawHeaders():
            canon = canonical_name(name) or name
            existing = headers.get(canon)
            if existing is None:
                headers[canon] = list(values)
            else:
                existing.extend(values)
        self.headers = headers
        hosts = headers.get(b"Host")
        self.host = hosts[0] if hosts else b""
        body = getattr(web, "body_producer", None)
        self.body = None if body is None or body.length == 0 else body
        self.exchange: Any = None
        self.started = False
        self.finished = False
        self.secure = bool(web.isSecure())
        web.notifyFinish().addErrback(self._gone)

    def client_address(self) -> tuple[str, str]:
        return host_and_port(self.web.getClientAddress())

    def _gone(self, _: Failure) -> None:
        if not self.finished:
            self.finished = True
            exchange = self.exchange
            if exchange is not None:
                exchange.client_gone()

    def _head(self, status: int, reason: bytes | None, headers: list[tuple[bytes, bytes]]) -> Any:
        web = self.web
        web.setResponseCode(status, reason)
        raw = web.responseHeaders
        for name, value in headers:
            raw.addRawHeader(name, value)
        self.started = True
        return raw

    def respond(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        reason: bytes | None = None,
        close: bool = False,
    ) -> None:
        if self.started or self.finished or getattr(self.web, "gone", False):
            return
        raw = self._head(status, reason, headers)
        raw.setRawHeaders(b"Date", [http_date()])
        raw.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        if body and self.method != b"HEAD":
            self.web.write(body)
        self.finish()

    def start_response(
        self,
        status: int,
        reason: bytes | None,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        if self.started or self.finished:
            return
        raw = self._head(status, reason, headers)
        if length is not None:
            raw.setRawHeaders(b"Content-Length", [b"%d" % length])

    def write(self, data: bytes) -> None:
        web = self.web
        if not self.finished and not getattr(web, "gone", False):
            web.write(data)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        web = self.web
        if web.producer is not None:
            web.unregisterProducer()
        if not getattr(web, "gone", False):
            web.finish()

    def abort(self) -> None:
        """Reset this request's stream (HTTP/2, HTTP/3) or drop its connection."""
        self.finished = True
        channel = self.web.channel
        if channel is None:
            return
        transport = getattr(channel, "transport", None) or channel
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()

    def informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        write_info = getattr(self.web, "write_informational", None)
        if write_info is not None and not self.started:
            raw = Headers()
            for name, value in headers:
                raw.addRawHeader(name, value)
            write_info(status, raw)

    def switch_protocols(self, headers: list[tuple[bytes, bytes]], tunnel: Any) -> bool:
        """Upgrades are HTTP/1.1 only."""
        return False

    def register_producer(self, producer: Any) -> None:
        self.web.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if self.web.producer is not None:
            self.web.unregisterProducer()


# --------------------------------------------------------------------------------------------
# Any twisted.web resource behind an HTTP/1 connection


class _FacadeSite:
    def __init__(self, root: Any) -> None:
        self.resource = root

    def getResourceFor(self, request: Any) -> Any:
        request.site = self
        request.sitepath = request.prepath[:]
        return resource.getChildForRequest(self.resource, request)


class _Facade:
    """An HTTP/1 request's connection as a twisted.web channel (``StreamingRequest.channel``)."""

    def __init__(self, req: HTTP1Request, site: _FacadeSite) -> None:
        self.req = req
        self.conn = req.conn
        self.transport = req.conn.transport
        self.site = site
        self.web: StreamingRequest | None = None

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return self.req.secure

    def client_gone(self) -> None:
        web = self.web
        if web is not None and not web.finished:
            web.connectionLost(Failure(ConnectionDone("client disconnected")))

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        conn = self.conn
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        names = set()
        for name, values in headers.getAllRawHeaders():
            names.add(name.lower())
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        if b"date" not in names:
            parts += (b"Date: ", http_date(), b"\r\n")
        self.req.started = True
        conn._head_written()
        if not conn._persistent and version == b"HTTP/1.1" and b"connection" not in names:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        conn._pending_head = b"".join(parts)

    def write(self, data: bytes) -> None:
        conn = self.conn
        head = conn._pending_head
        if head is not None:
            conn._pending_head = None
            conn._send_parts([head, data])
        else:
            conn._send(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def _flush_head(self) -> None:
        conn = self.conn
        head = conn._pending_head
        if head is not None:
            conn._pending_head = None
            conn._send(head)

    def requestDone(self, request: Any) -> None:
        self._flush_head()
        self.req.finished = True
        self.conn._response_done(self.req)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        conn = self.conn
        conn._response_producer = producer
        if conn._waiting_for_transport and streaming:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.conn._response_producer = None

    def writeInformational(self, code: int, headers: Headers) -> None:
        self.req.informational(
            code, [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
        )

    def _take_over(self, request: Any, protocol: IProtocol) -> None:
        self.req.started = True
        self.conn._take_over(protocol)

    def loseConnection(self) -> None:
        self.transport.loseConnection()


class ResourceHandler:
    """Serves HTTP/1 requests with any twisted.web resource (as a ``Site`` would)."""

    def __init__(self, root: Any) -> None:
        self.site = _FacadeSite(root)

    def __call__(self, req: HTTP1Request) -> None:
        facade = _Facade(req, self.site)
        web = StreamingRequest(facade)
        facade.web = web
        req.exchange = facade
        web.method = req.method
        web.uri = req.uri
        web.path = req.path
        web.clientproto = req.version
        web.requestHeaders = Headers(req.headers)
        if req.body is not None:
            web.body_producer = req.body
        web.process()
