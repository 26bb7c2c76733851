"""The routing resource: every request's pipeline, in the order of SPEC §5.

Like Twisted's ``ReverseProxyResource`` it forwards the request and relays the answer, but it
chooses the upstream per request from the Router, reuses pooled keep-alive connections, and
streams bodies both ways with producer/consumer flow control.  The stages are plain method calls
in one visible place (``render`` then ``_proxy``); a stage that fails a request picks an error
page instead of writing.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, unquote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder
from twisted.web.iweb import UNKNOWN_LENGTH

from kamal_proxy.observe.events import debug, info, warn
from kamal_proxy.observe.events import error as log_error
from kamal_proxy.observe.log import log_request_in_order
from kamal_proxy.proxy import pages
from kamal_proxy.proxy.buffer import BufferingSink, TooLarge, buffer_request_body
from kamal_proxy.proxy.channel import ClientGone, MalformedBody
from kamal_proxy.proxy.cookies import scope_set_cookie
from kamal_proxy.proxy.request_id import new_request_id
from kamal_proxy.proxy.upstream import UpstreamAborted, UpstreamError, UpstreamTimeout
from kamal_proxy.routing.pause import PauseState, Released
from kamal_proxy.routing.rollout import (
    ROLLOUT_COOKIE,
    WRITER_COOKIE,
    in_rollout_group,
    request_cookie,
)
from kamal_proxy.routing.table import host_without_port

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
FORWARDING = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"}
)
DROPPED = HOP_BY_HOP | FORWARDING | {b"x-kamal-target", b"host", b"content-length"}
READ_METHODS = frozenset({b"GET", b"HEAD"})
ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
SMALL_BODY = 64 * 1024
_canonical = _nameEncoder.encode


class ConnectionTracker:
    """Requests in flight on the public listeners, so shutdown can wait for them."""

    def __init__(self) -> None:
        self.active: set[Any] = set()
        self._waiters: list[defer.Deferred] = []

    def add(self, request: Any) -> None:
        self.active.add(request)

    def remove(self, request: Any) -> None:
        self.active.discard(request)
        if not self.active and self._waiters:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def wait_idle(self) -> defer.Deferred:
        if not self.active:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

    def abort_all(self) -> None:
        for request in list(self.active):
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()


def _is_websocket(headers) -> bool:
    upgrade = headers.getRawHeaders(b"upgrade")
    if not upgrade or upgrade[0].lower() != b"websocket":
        return False
    connection = headers.getRawHeaders(b"connection")
    return bool(connection) and any(b"upgrade" in c.lower() for c in connection)


class RoutingResource(resource.Resource):
    isLeaf = True

    def __init__(self, reactor, router, *, port: int, secure: bool, metrics=None) -> None:
        super().__init__()
        self.reactor = reactor
        self.router = router
        self.port = port
        self.secure = secure
        self.scheme = "https" if secure else "http"
        self.proto_value = b"https" if secure else b"http"
        self.tracker = ConnectionTracker()
        self.metrics = metrics

    def getChild(self, path, request):  # pragma: no cover - isLeaf
        return self

    def render(self, request: server.Request):
        exchange = ProxyExchange(self, request)
        exchange.run()
        return server.NOT_DONE_YET


class ProxyExchange:
    """One client request on its way through the pipeline; also the upstream's response sink
    and the target's view of an in-flight request (for draining)."""

    __slots__ = (
        "res",
        "request",
        "started",
        "status",
        "service",
        "target",
        "upstream",
        "is_upgraded",
        "tunnel",
        "finished",
        "host",
        "path",
        "response_bytes",
        "request_id",
        "remote_addr",
        "log_extra",
        "affinity_ms",
        "pending",
        "req_buffer",
        "resp_buffer",
        "gauge",
        "excluded",
        "cookie_prefix",
    )

    def __init__(self, res: RoutingResource, request: server.Request) -> None:
        self.res = res
        self.request = request
        self.started = time.monotonic_ns()
        self.status = 200
        self.service = None
        self.target = None
        self.upstream = None
        self.is_upgraded = False
        self.tunnel = None
        self.finished = False
        self.response_bytes = 0
        self.log_extra: dict[str, str] | None = None
        self.affinity_ms = 0
        self.pending: defer.Deferred | None = None
        self.req_buffer = None
        self.resp_buffer: BufferingSink | None = None
        self.gauge = None
        self.excluded = False
        self.cookie_prefix: str | None = None

    # -- P2..P16: the pipeline ----------------------------------------------

    def run(self) -> None:
        request = self.request
        headers = request.requestHeaders
        res = self.res
        res.tracker.add(request)
        request.notifyFinish().addErrback(self._client_gone)

        # P2 request start, P3 request id
        start = headers.getRawHeaders(b"x-request-start")
        if not start or not start[0]:
            headers.setRawHeaders(b"x-request-start", [b"t=%d" % (time.time_ns() // 1_000_000)])
        rid = headers.getRawHeaders(b"x-request-id")
        if not rid or not rid[0]:
            rid = [new_request_id()]
            headers.setRawHeaders(b"x-request-id", rid)
        self.request_id = rid[0]

        host_values = headers.getRawHeaders(b"host")
        self.host = host_values[0].decode("utf-8", "surrogateescape") if host_values else ""
        self.path = unquote(request.path.decode("latin-1"), errors="surrogateescape")
        xff = headers.getRawHeaders(b"x-forwarded-for")
        self.remote_addr = xff[0].decode("latin-1") if xff else None

        # P6 routing
        match = res.router.lookup(self.host, self.path)
        if match is None:
            self.fail(404)
            return
        service = match.service
        self.service = service
        prefix = match.prefix if service.options.strip_prefix and match.prefix != "/" else None

        # P7 service entry: metrics scope
        metrics = res.metrics
        if metrics is not None:
            routed = (self.path[len(prefix) :] or "/") if prefix else self.path
            if routed in service.exclude_metrics_paths:
                self.excluded = True
            else:
                self.gauge = metrics.inflight(service.name)
                self.gauge.inc()

        # P8 client IP header
        if service.client_ip_header:
            value = headers.getRawHeaders(service.client_ip_header)
            if value and value[0]:
                headers.setRawHeaders(b"x-forwarded-for", [value[0]])
                self.remote_addr = value[0].decode("latin-1")

        # P9 ACME HTTP-01 challenges, answered before any redirect or pause
        certificates = service.certificates
        if certificates is not None and self.path.startswith(ACME_CHALLENGE_PREFIX):
            answer = certificates.http01_response(self.host, self.path)
            if answer is not None:
                self.service = None  # logged with service "" (SPEC §17.2)
                self._answer(*answer)
                return

        # P12 TLS mismatch, P13 redirects
        options = service.options
        if res.secure and not options.tls_enabled:
            self.fail(503)
            return
        if self._redirect(options):
            return

        # P14 pause/stop
        pause = service.pause
        if pause.state:
            routed = self.path[len(prefix) :] or "/" if prefix else self.path
            if request.method in READ_METHODS and routed == service.health_check_path:
                self._answer(200)
            elif pause.state == PauseState.STOPPED:
                self.fail(503, pause.stop_message)
            else:
                pause.wait(res.reactor).addCallback(self._released, prefix)
            return
        self._select_target(prefix)

    def _released(self, how: Released, prefix: str | None) -> None:
        if self.finished:
            return
        if how is Released.RUNNING:
            self._select_target(prefix)
        elif how is Released.STOPPED:
            self.fail(503, self.service.pause.stop_message)
        else:
            warn(
                "Rejecting request due to expired pause", service=self.service.name, path=self.path
            )
            self.fail(504)

    def _answer(self, status: int, content_type: bytes | None = None, body: bytes = b"") -> None:
        """A response of the proxy's own (challenge answers, health pass-through)."""
        request = self.request
        request.setResponseCode(status)
        if content_type is not None:
            request.responseHeaders.setRawHeaders(b"content-type", [content_type])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.status = status
        if body:
            request.write(body)
            self.response_bytes = len(body)
        self._finish()

    def _select_target(self, prefix: str | None) -> None:
        # P15/P16 target selection
        request = self.request
        headers = request.requestHeaders
        service = self.service
        lb = service.active
        cookies = headers.getRawHeaders(b"cookie")
        if service.rollout_split is not None and service.rollout is not None:
            if in_rollout_group(request_cookie(cookies, ROLLOUT_COOKIE), service.rollout_split):
                debug("Using rollout for request", service=service.name, path=self.path)
                lb = service.rollout
        if lb is None:
            self.fail(503)
            return
        is_read = request.method in READ_METHODS and (
            lb.read_targets_accept_websockets or not _is_websocket(headers)
        )
        if lb.readers and lb.writer_affinity_timeout > 0:
            if not is_read:
                self.affinity_ms = lb.writer_affinity_timeout // 1_000_000
            elif _valid_writer_cookie(request_cookie(cookies, WRITER_COOKIE)):
                is_read = False
        target = lb.choose(is_read)
        if target is None or target.draining:
            self.fail(503)
            return
        self.target = target
        if prefix is not None and service.target_options.scope_cookie_paths:
            self.cookie_prefix = prefix
        self._proxy(prefix)

    def _redirect(self, options) -> bool:
        res = self.res
        host = host_without_port(self.host)
        want_https = options.tls_enabled and options.tls_redirect and not res.secure
        canonical = options.canonical_host
        want_host = canonical if canonical and canonical != host else host
        if not want_https and want_host == host:
            return False
        scheme = "https" if (want_https or res.secure) else "http"
        uri = self.request.uri
        if uri.startswith(b"http://") or uri.startswith(b"https://"):
            uri = b"/" + uri.split(b"/", 3)[3] if uri.count(b"/") >= 3 else b"/"
        location = f"{scheme}://{want_host}{uri.decode('latin-1')}"
        request = self.request
        request.setResponseCode(301)
        request.responseHeaders.setRawHeaders(b"location", [location.encode("utf-8")])
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        body = b""
        if request.method in READ_METHODS:
            request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
            if request.method == b"GET":
                body = b'<a href="%s">Moved Permanently</a>.\n\n' % _escape_url(location).encode(
                    "utf-8"
                )
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.status = 301
        if body:
            request.write(body)
            self.response_bytes = len(body)
        self._finish()
        return True

    # -- P18..P22: forwarding -----------------------------------------------

    def _proxy(self, stripped_prefix: str | None) -> None:
        request = self.request
        target = self.target
        service = self.service
        res = self.res
        topts = service.target_options
        headers_in = request.requestHeaders

        # Path: raw unless a prefix was stripped (then re-encoded from the decoded form).
        if stripped_prefix is None:
            path = request.path
        else:
            rest = self.path[len(stripped_prefix) :] or "/"
            if not rest.startswith("/"):
                rest = "/" + rest
            path = quote(rest, safe="/:@!$&'()*+,;=-._~", errors="surrogateescape").encode(
                "latin-1"
            )
        uri = request.uri
        q = uri.find(b"?")
        if q >= 0:
            path = path + uri[q:]

        connection_tokens: set[bytes] = set()
        for value in headers_in.getRawHeaders(b"connection", ()):
            for token in value.split(b","):
                connection_tokens.add(token.strip().lower())

        out: list[tuple[bytes, bytes]] = []
        host_values = headers_in.getRawHeaders(b"host")
        out.append(
            (b"Host", host_values[0] if host_values and host_values[0] else target.address.encode())
        )
        for name, values in headers_in.getAllRawHeaders():
            lname = name.lower()
            if lname in DROPPED or lname in connection_tokens:
                continue
            for v in values:
                out.append((name, v))

        te = headers_in.getRawHeaders(b"te")
        if te and any(b"trailers" in v.lower() for v in te):
            out.append((b"Te", b"trailers"))
        upgrade = headers_in.getRawHeaders(b"upgrade") if b"upgrade" in connection_tokens else None
        if upgrade:
            out.append((b"Connection", b"Upgrade"))
            out.append((b"Upgrade", upgrade[0]))

        # Forwarding headers (SPEC §9.2)
        client_ip = _client_ip(request)
        forward = topts.forward_headers
        xff_in = headers_in.getRawHeaders(b"x-forwarded-for")
        if client_ip is not None:
            if forward and xff_in:
                out.append((b"X-Forwarded-For", b", ".join(xff_in) + b", " + client_ip))
            else:
                out.append((b"X-Forwarded-For", client_ip))
        xfh = headers_in.getRawHeaders(b"x-forwarded-host") if forward else None
        if xfh and xfh[0]:
            out.append((b"X-Forwarded-Host", xfh[0]))
        else:
            out.append((b"X-Forwarded-Host", host_values[0] if host_values else b""))
        xfp = headers_in.getRawHeaders(b"x-forwarded-proto") if forward else None
        out.append((b"X-Forwarded-Proto", xfp[0] if xfp and xfp[0] else res.proto_value))
        kamal_target = target.address.encode("utf-8")
        existing = headers_in.getRawHeaders(b"x-kamal-target") if forward else None
        if existing:
            kamal_target = b", ".join(existing) + b", " + kamal_target
        out.append((b"X-Kamal-Target", kamal_target))

        body = getattr(request, "body_producer", None)
        if body is not None and body.length == 0:
            body = None

        target.start_request(self)
        if topts.buffer_requests and body is not None:
            # P20: the whole body first, counted as in flight on the target (SPEC §10.2).
            chunked = body.length is UNKNOWN_LENGTH
            pending = buffer_request_body(
                body, topts.max_memory_buffer_size, topts.max_request_body_size
            )
            self.pending = pending
            pending.addCallbacks(
                self._request_buffered,
                self._request_buffer_failed,
                callbackArgs=(path, out, chunked),
            )
            return
        self._forward(path, out, body)

    def _request_buffered(self, buffer, path, headers, chunked) -> None:
        self.pending = None
        self.req_buffer = buffer
        if self.finished:
            buffer.close()
            return
        self._forward(path, headers, buffer.as_producer(unknown_length=chunked))

    def _request_buffer_failed(self, failure: Failure) -> None:
        self.pending = None
        exc = failure.value
        if self.finished or isinstance(exc, defer.CancelledError):
            return
        if isinstance(exc, TooLarge):
            self.fail(413)
        elif isinstance(exc, MalformedBody):
            info("Malformed chunked request", path=self.path, error=str(exc))
            self.fail(400)
        elif isinstance(exc, ClientGone):
            self._client_gone(failure)
        else:
            log_error("Error buffering request", path=self.path, error=str(exc))
            self.fail(500)

    def _forward(self, path: bytes, headers: list[tuple[bytes, bytes]], body) -> None:
        """P21/P22: send upstream, relaying through a response buffer when asked to."""
        topts = self.service.target_options
        sink = self
        if topts.buffer_responses:
            sink = BufferingSink(
                self,
                topts.max_memory_buffer_size,
                topts.max_response_body_size,
                on_too_large=self._response_too_large,
                reactor=self.res.reactor,
            )
            self.resp_buffer = sink
        target = self.target
        self.upstream = target.pool.forward(
            self.request.method, path, headers, body, sink, timeout=target.response_timeout
        )
        if self.resp_buffer is not None:
            self.resp_buffer.exchange = self.upstream
        self.upstream.done.addCallbacks(self._upstream_done, self._upstream_failed)

    def _response_too_large(self) -> None:
        info("Response exceeded max response limit", path=self.path)
        if self.upstream is not None:
            self.upstream.cancel()
        self.fail(500)

    # -- ResponseSink ---------------------------------------------------------

    def informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        # 100 Continue is between us and each side (the channel sends the client its own
        # when the body is first read), as in Go; other 1xx (103 Early Hints) are relayed.
        if status != 100 and not self.finished:
            h = Headers()
            for k, v in headers:
                h.addRawHeader(k, v)
            self.request.write_informational(status, h)

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        request = self.request
        if self.finished:
            return
        self.status = status
        request.setResponseCode(status, reason or None)
        rh = request.responseHeaders
        # Straight into the Headers' dict: names canonicalised (cached) as Twisted does;
        # the parser split the lines, so only a bare CR could still hide in a value.
        raw = rh._rawHeaders
        scope = self.cookie_prefix
        for k, v in headers:
            try:
                name = _canonical(k)
            except InvalidHeaderName:
                continue
            if 13 in v:
                v = v.replace(b"\r", b" ")
            if scope is not None and name == b"Set-Cookie":
                v = scope_set_cookie(v, scope, host_without_port(self.host))
            values = raw.get(name)
            if values is None:
                raw[name] = [v]
            else:
                values.append(v)
        if self.affinity_ms:
            self._writer_affinity(rh)
        if status == 101:
            return
        # Flow control for bodies that could outgrow the socket buffers; a small body with a
        # known length is written at once and needs none (most responses: a cheaper path).
        producer = self.resp_buffer or self.upstream
        if producer is not None and (
            length is None or length > SMALL_BODY or self.resp_buffer is not None
        ):
            request.registerProducer(producer, True)

    def _writer_affinity(self, rh) -> None:
        """SPEC §8.3: after a write, reads stick to the writer for a while."""
        opt_out = rh.getRawHeaders(b"x-writer-affinity")
        rh.removeHeader(b"x-writer-affinity")
        if opt_out and opt_out[0] == b"false":
            return
        expires_ms = time.time_ns() // 1_000_000 + self.affinity_ms
        rh.addRawHeader(
            b"set-cookie",
            b"kamal-writer=%d; Path=/; Expires=%s; HttpOnly"
            % (expires_ms, datetimeToString(expires_ms // 1000 + 1)),
        )

    def response_data(self, data: bytes) -> None:
        if self.finished:
            return
        self.response_bytes += len(data)
        self.request.write(data)

    def upgraded(self, tunnel) -> None:
        request = self.request
        self.is_upgraded = True
        self.tunnel = tunnel
        # A graceful stop does not wait for tunnels (SPEC §4.2): they end with the process.
        self.res.tracker.remove(request)
        self.status = 101
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        lines += [
            b"%s: %s\r\n" % (k, v)
            for k, vs in request.responseHeaders.getAllRawHeaders()
            for v in vs
        ]
        lines.append(b"\r\n")
        transport = request.channel.transport
        transport.writeSequence(lines)
        protocol = tunnel.attach(transport)
        request.take_over_transport(protocol)
        tunnel.done.addBoth(self._tunnel_closed)

    def _tunnel_closed(self, _result: object) -> None:
        self._end(log=True)

    # -- endings ----------------------------------------------------------------

    def _upstream_done(self, _result: object) -> None:
        if self.is_upgraded or self.finished:
            return
        if self.resp_buffer is not None and not self.resp_buffer.bypassed:
            self.resp_buffer.finish().addCallbacks(self._relayed, self._relay_failed)
            return
        self._relayed(None)

    def _relayed(self, _result: object) -> None:
        if self.finished:
            return
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        self._finish()

    def _relay_failed(self, failure: Failure) -> None:
        if self.finished or isinstance(failure.value, (TooLarge, defer.CancelledError)):
            return
        log_error("Error sending response", path=self.path, error=str(failure.value))
        self.fail(500)

    def _upstream_failed(self, failure: Failure) -> None:
        if self.finished:
            return
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        exc = failure.value
        if isinstance(exc, defer.CancelledError):
            return  # the canceller already answered (drain) or the client left
        if isinstance(exc, UpstreamAborted) or (self.upstream and self.upstream.response_started):
            self.status = self.status or 502
            self._abort_client()
            return
        if isinstance(exc, UpstreamTimeout):
            self.fail(504)
        elif isinstance(exc, MalformedBody):
            info("Malformed request", target=self.target.address, path=self.path, error=str(exc))
            self.fail(400)
        elif isinstance(exc, ClientGone):
            self._client_gone(failure)
        else:
            log_error(
                "Error while proxying",
                target=self.target.address if self.target else "",
                path=self.path,
                error=str(exc) if isinstance(exc, UpstreamError) else repr(exc),
            )
            self.fail(502)

    def cancel_for_drain(self) -> None:
        """Called by the target's drain (SPEC §13.2)."""
        if self.finished:
            return
        if self.is_upgraded:
            if self.tunnel is not None:
                self.tunnel.close()
            return
        info("Request cancelled due to draining", target=self.target.address, path=self.path)
        started = self.upstream is not None and self.upstream.response_started
        if self.pending is not None:
            self.pending.cancel()
        if self.upstream is not None:
            self.upstream.cancel()
        if started:
            self._abort_client()
        else:
            self.fail(504)

    def _client_gone(self, failure: Failure | None) -> None:
        if self.finished:
            return
        self.status = 499
        if self.pending is not None:
            self.pending.cancel()
        if self.upstream is not None:
            self.upstream.cancel()
        self._end(log=True)

    def _abort_client(self) -> None:
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()
        self._end(log=True)

    def fail(self, status: int, message: str | None = None) -> None:
        """Answer with an error page, unless the response has already started."""
        if self.finished:
            return
        request = self.request
        if request.startedWriting:
            self._abort_client()
            return
        self.status = status
        custom = self.service.error_pages if self.service is not None and status != 404 else None
        body = pages.render_page(status, message, custom)
        request.setResponseCode(status)
        rh = request.responseHeaders
        for name in list(dict(rh.getAllRawHeaders())):
            rh.removeHeader(name)
        rh.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
        rh.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        self.response_bytes = len(body)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        request = self.request
        if not request._disconnected:
            request.finish()
        self._end(log=True)

    def _end(self, log: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self.res.tracker.remove(self.request)
        if self.pending is not None:
            self.pending.cancel()
        if self.req_buffer is not None:
            self.req_buffer.close()
        if self.resp_buffer is not None:
            self.resp_buffer.close()
        if self.target is not None:
            self.target.end_request(self)
        if self.gauge is not None:
            self.gauge.dec()
        if log:
            self._log()

    def _log(self) -> None:
        request = self.request
        h = request.requestHeaders
        client_addr, client_port = _peer(request)
        body = getattr(request, "body_producer", None)
        req_len = 0 if body is None else body.length
        if req_len is UNKNOWN_LENGTH:
            req_len = -1
        uri = request.uri
        q = uri.find(b"?")
        service = self.service
        target = self.target
        fields: dict[str, Any] = {
            "host": self.host,
            "port": self.res.port,
            "path": self.path,
            "request_id": self.request_id.decode("latin-1"),
            "status": self.status,
            "service": service.name if service is not None else "",
            "target": target.address if target is not None else "",
            "duration": time.monotonic_ns() - self.started,
            "method": request.method.decode("latin-1"),
            "req_content_length": req_len,
            "req_content_type": _first(h, b"content-type"),
            "resp_content_length": self.response_bytes,
            "resp_content_type": _first(request.responseHeaders, b"content-type"),
            "client_addr": client_addr,
            "client_port": client_port,
            "remote_addr": self.remote_addr or client_addr,
            "user_agent": _first(h, b"user-agent"),
            "proto": request.clientproto.decode("latin-1"),
            "scheme": self.res.scheme,
            "query": uri[q + 1 :].decode("latin-1") if q >= 0 else "",
        }
        if target is not None and service is not None:
            # Configured names are str; bytes lookups keep the values bytes (Twisted returns
            # str values for str names).
            for name in service.log_request_headers:
                fields["req_" + name.lower().replace("-", "_")] = ",".join(
                    v.decode("latin-1") for v in h.getRawHeaders(name.encode("latin-1"), ())
                )
            for name in service.log_response_headers:
                fields["resp_" + name.lower().replace("-", "_")] = ",".join(
                    v.decode("latin-1")
                    for v in request.responseHeaders.getRawHeaders(name.encode("latin-1"), ())
                )
        log_request_in_order(fields)
        metrics = self.res.metrics
        if metrics is not None and not self.excluded:
            metrics.observe(
                fields["service"], request.method, self.status, fields["duration"] / 1e9
            )


_URL_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"})


def _escape_url(url: str) -> str:
    """Go's ``http.Redirect`` escaping of the link in its body."""
    return url.translate(_URL_ESCAPES)


def _valid_writer_cookie(value: bytes | None) -> bool:
    if not value:
        return False
    try:
        expires = int(value)
    except ValueError:
        return False
    return -(1 << 63) <= expires < (1 << 63) and time.time_ns() // 1_000_000 < expires


def _first(headers, name: bytes) -> str:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else ""


def _peer(request) -> tuple[str, str]:
    """The client's IP and port; IPv4 peers of the dual-stack listener lose their ``::ffff:``."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", None) or ""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    port = getattr(peer, "port", None)
    return host, "" if port is None else str(port)


def _client_ip(request) -> bytes | None:
    host = _peer(request)[0]
    return host.encode("ascii") if host else None
