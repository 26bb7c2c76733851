"""The request pipeline: every request's stages, in the order of SPEC §5.

``RoutingResource`` is one listener's pipeline; ``ProxyExchange`` is one request on its way
through it.  The stages are plain method calls in one visible place (``run``, then
``_select_target`` and ``_proxy``); a stage that fails a request picks an error page instead of
writing.  The exchange is also the upstream response's sink and the target's view of an
in-flight request (for draining).

A request arrives as an :class:`~.channel.HTTP1Request` (``handle``, the HTTP/1 data plane)
or as a twisted.web request (``render``: HTTP/2, HTTP/3, the on-demand TLS probe), which
:class:`~.webrequest.WebRequest` presents through the same interface:

* read: ``method``, ``uri``, ``path``, ``version``, ``headers`` (canonical name -> values),
  ``host``, ``secure``, ``body`` (an ``IBodyProducer``, None without a body),
  ``client_address()``;
* write: ``respond(status, headers, body)`` (a whole response), or ``start_response``,
  ``write`` and ``finish``; ``abort()``; ``informational``; ``switch_protocols`` (upgrades);
  ``register_producer``/``unregister_producer`` (flow control of the response body);
* the request calls ``exchange.client_gone()`` when its client leaves early.

Headers are edited as bytes; the upstream request head is built once, as bytes.  Two clock
reads per request: one at the start (``X-Request-Start``, the duration's start, the target
timeout) and one at the end (the log line's time and the duration).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, unquote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from kamal_proxy.observe.events import debug, info, warn
from kamal_proxy.observe.events import error as log_error
from kamal_proxy.observe.log import log_request_line
from kamal_proxy.proxy import pages
from kamal_proxy.proxy.buffer import BufferingSink, TooLarge, buffer_request_body
from kamal_proxy.proxy.channel import ClientGone, http_date
from kamal_proxy.proxy.cookies import scope_set_cookie
from kamal_proxy.proxy.http1 import MalformedBody, canonical_name, connection_tokens
from kamal_proxy.proxy.request_id import new_request_id
from kamal_proxy.proxy.upstream import (
    UpstreamAborted,
    UpstreamError,
    UpstreamTimeout,
    request_framing,
)
from kamal_proxy.routing.pause import PauseState, Released
from kamal_proxy.routing.rollout import (
    ROLLOUT_COOKIE,
    WRITER_COOKIE,
    in_rollout_group,
    request_cookie,
)
from kamal_proxy.routing.table import host_without_port

__all__ = ["ConnectionTracker", "ProbeResource", "ProxyExchange", "RoutingResource"]

# Request headers never copied upstream as received (SPEC §9.2): hop-by-hop, forwarding
# (re-added below), our own target header, and the framing the upstream client writes.
DROPPED = frozenset(
    {
        b"Connection",
        b"Proxy-Connection",
        b"Keep-Alive",
        b"Proxy-Authenticate",
        b"Proxy-Authorization",
        b"Te",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"Forwarded",
        b"X-Forwarded-For",
        b"X-Forwarded-Host",
        b"X-Forwarded-Proto",
        b"X-Kamal-Target",
        b"Host",
        b"Content-Length",
    }
)
READ_METHODS = frozenset({b"GET", b"HEAD"})
ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
SMALL_BODY = 64 * 1024
HTML = b"text/html; charset=utf-8"
NOT_DONE_YET = 1  # twisted.web.server.NOT_DONE_YET, without importing twisted.web.server

# Response header name as received -> (canonical name, what the relay does with it).
_RELAY = 0
_SKIP = 1  # not a valid name, or Content-Length (the writer frames the body)
_DATE = 2
_CONTENT_TYPE = 3
_SET_COOKIE = 4
_AFFINITY = 5
_SPECIAL = {
    b"Content-Length": _SKIP,
    b"Date": _DATE,
    b"Content-Type": _CONTENT_TYPE,
    b"Set-Cookie": _SET_COOKIE,
    b"X-Writer-Affinity": _AFFINITY,
}
_RESPONSE_NAMES: dict[bytes, tuple[bytes, int]] = {}


def _response_name(name: bytes) -> tuple[bytes, int]:
    canon = canonical_name(name)
    entry = (name, _SKIP) if canon is None else (canon, _SPECIAL.get(canon, _RELAY))
    if len(_RESPONSE_NAMES) < 4096:
        _RESPONSE_NAMES[name] = entry
    return entry


class ConnectionTracker:
    """Requests in flight on the public listeners, so shutdown can wait for them."""

    def __init__(self) -> None:
        self.active: set[Any] = set()
        self._waiters: list[defer.Deferred] = []

    def add(self, exchange: Any) -> None:
        self.active.add(exchange)

    def remove(self, exchange: Any) -> None:
        self.active.discard(exchange)
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
        for exchange in list(self.active):
            exchange.request.abort()


def _is_websocket(headers: dict[bytes, list[bytes]]) -> bool:
    upgrade = headers.get(b"Upgrade")
    if not upgrade or upgrade[0].lower() != b"websocket":
        return False
    connection = headers.get(b"Connection")
    return bool(connection) and any(b"upgrade" in c.lower() for c in connection)


class RoutingResource:
    """One listener's pipeline (``port``, ``secure``), shared by its connections.

    ``internal`` pipelines (the on-demand TLS probe, :class:`ProbeResource`) never redirect
    and write no request log line.
    """

    isLeaf = True  # a twisted.web Site (HTTP/2) renders it for every path
    internal = False

    def __init__(self, reactor: Any, router: Any, *, port: int, secure: bool, metrics=None):
        self.reactor = reactor
        self.router = router
        self.port = port
        self.secure = secure
        self.scheme = "https" if secure else "http"
        self.proto_value = b"https" if secure else b"http"
        self.tracker = ConnectionTracker()
        self.metrics = metrics

    def handle(self, request: Any) -> ProxyExchange:
        """Take one request through the pipeline (the HTTP/1 channel calls this)."""
        exchange = ProxyExchange(self, request)
        exchange.run()
        return exchange

    def render(self, web_request: Any) -> int:
        """A twisted.web request (HTTP/2, HTTP/3, probes): the same pipeline."""
        from kamal_proxy.proxy.webrequest import WebRequest

        self.handle(WebRequest(web_request))
        return NOT_DONE_YET

    def getChildWithDefault(self, path: bytes, request: Any) -> RoutingResource:
        return self  # pragma: no cover - isLeaf


class ProbeResource(RoutingResource):
    """The pipeline of internal requests (SPEC §16.4): no redirects, no request log."""

    internal = True

    def render(self, web_request: Any) -> int:
        from kamal_proxy.proxy.webrequest import WebRequest

        web_request.probe_exchange = self.handle(WebRequest(web_request))
        return NOT_DONE_YET


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
        "affinity_ms",
        "pending",
        "req_buffer",
        "resp_buffer",
        "gauge",
        "excluded",
        "cookie_prefix",
        "resp_content_type",
        "resp_headers",
        "resp_length",
        "head_101",
    )

    def __init__(self, res: RoutingResource, request: Any) -> None:
        self.res = res
        self.request = request
        self.started = 0
        self.status = 200
        self.service: Any = None
        self.target: Any = None
        self.upstream: Any = None
        self.is_upgraded = False
        self.tunnel: Any = None
        self.finished = False
        self.response_bytes = 0
        self.affinity_ms = 0
        self.pending: defer.Deferred | None = None
        self.req_buffer: Any = None
        self.resp_buffer: BufferingSink | None = None
        self.gauge: Any = None
        self.excluded = False
        self.cookie_prefix: str | None = None
        self.resp_content_type = b""
        self.resp_headers: list[tuple[bytes, bytes]] | None = None
        self.resp_length: int | None = None
        self.head_101: list[tuple[bytes, bytes]] = []

    # -- P2..P16: the pipeline ----------------------------------------------

    def run(self) -> None:
        request = self.request
        headers = request.headers
        res = self.res
        request.exchange = self
        res.tracker.add(self)
        now = self.started = time.time_ns()

        # P2 request start, P3 request id
        start = headers.get(b"X-Request-Start")
        if not start or not start[0]:
            headers[b"X-Request-Start"] = [b"t=%d" % (now // 1_000_000)]
        rid = headers.get(b"X-Request-Id")
        if not rid or not rid[0]:
            rid = headers[b"X-Request-Id"] = [new_request_id()]
        self.request_id = rid[0]

        self.host = host = request.host.decode("utf-8", "surrogateescape")
        self.path = path = unquote(request.path.decode("latin-1"), errors="surrogateescape")
        xff = headers.get(b"X-Forwarded-For")
        self.remote_addr = xff[0] if xff else None

        # P6 routing
        match = res.router.lookup(host, path)
        if match is None:
            self.fail(404)
            return
        service = self.service = match.service
        prefix = match.prefix if service.options.strip_prefix and match.prefix != "/" else None

        # P7 service entry: metrics scope
        metrics = res.metrics
        if metrics is not None:
            routed = (path[len(prefix) :] or "/") if prefix else path
            if routed in service.exclude_metrics_paths:
                self.excluded = True
            else:
                self.gauge = metrics.inflight(service.name)
                self.gauge.inc()

        # P8 client IP header
        if service.client_ip_header:
            value = headers.get(canonical_name(service.client_ip_header) or b"")
            if value and value[0]:
                headers[b"X-Forwarded-For"] = [value[0]]
                self.remote_addr = value[0]

        # P9 ACME HTTP-01 challenges, answered before any redirect or pause
        certificates = service.certificates
        if certificates is not None and path.startswith(ACME_CHALLENGE_PREFIX):
            answer = certificates.http01_response(host, path)
            if answer is not None:
                self.service = None  # logged with service "" (SPEC §17.2)
                self._answer(*answer)
                return

        # P12 TLS mismatch, P13 redirects
        options = service.options
        if res.secure and not options.tls_enabled:
            self.fail(503)
            return
        if not res.internal and self._redirect(options):
            return

        # P14 pause/stop
        pause = service.pause
        if pause.state:
            routed = (path[len(prefix) :] or "/") if prefix else path
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
        headers = []
        if content_type is not None:
            headers.append((b"Content-Type", content_type))
            self.resp_content_type = content_type
        self.status = status
        self.response_bytes = self.resp_length = len(body)
        self.request.respond(status, headers, body)
        self._end()

    def _select_target(self, prefix: str | None) -> None:
        # P15/P16 target selection
        request = self.request
        headers = request.headers
        service = self.service
        lb = service.active
        cookies = headers.get(b"Cookie")
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

    def _redirect(self, options: Any) -> bool:
        res = self.res
        host = host_without_port(self.host)
        want_https = options.tls_enabled and options.tls_redirect and not res.secure
        canonical = options.canonical_host
        want_host = canonical if canonical and canonical != host else host
        if not want_https and want_host == host:
            return False
        scheme = "https" if (want_https or res.secure) else "http"
        request = self.request
        uri = request.uri
        if uri.startswith(b"http://") or uri.startswith(b"https://"):
            uri = b"/" + uri.split(b"/", 3)[3] if uri.count(b"/") >= 3 else b"/"
        location = f"{scheme}://{want_host}{uri.decode('latin-1')}"
        headers = [(b"Location", location.encode("utf-8"))]
        body = b""
        if request.method in READ_METHODS:
            headers.append((b"Content-Type", HTML))
            self.resp_content_type = HTML
            if request.method == b"GET":
                body = b'<a href="%s">Moved Permanently</a>.\n\n' % _escape_url(location).encode(
                    "utf-8"
                )
        headers.append((b"Connection", b"close"))
        self.status = 301
        self.response_bytes = self.resp_length = len(body)
        request.respond(301, headers, body, close=True)
        self._end()
        return True

    # -- P18..P22: forwarding -----------------------------------------------

    def _proxy(self, stripped_prefix: str | None) -> None:
        request = self.request
        target = self.target
        service = self.service
        res = self.res
        topts = service.target_options
        headers_in = request.headers

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

        method = request.method
        host = request.host
        parts = [method, b" ", path, b" HTTP/1.1\r\nHost: ", host or target.address.encode()]
        parts.append(b"\r\n")
        connection = headers_in.get(b"Connection")
        tokens = connection_tokens(connection) if connection else None
        for name, values in headers_in.items():
            if name in DROPPED or (tokens and name.lower() in tokens):
                continue
            for value in values:
                parts += (name, b": ", value, b"\r\n")

        te = headers_in.get(b"Te")
        if te and any(b"trailers" in v.lower() for v in te):
            parts.append(b"Te: trailers\r\n")
        upgrade = None
        if tokens and b"upgrade" in tokens:
            upgrades = headers_in.get(b"Upgrade")
            if upgrades:
                upgrade = upgrades[0]
                parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")

        # Forwarding headers (SPEC §9.2)
        client_ip = request.client_address()[0]
        forward = topts.forward_headers
        if client_ip:
            xff_in = headers_in.get(b"X-Forwarded-For")
            parts.append(b"X-Forwarded-For: ")
            if forward and xff_in:
                parts += (b", ".join(xff_in), b", ")
            parts += (client_ip.encode("ascii"), b"\r\n")
        xfh = headers_in.get(b"X-Forwarded-Host") if forward else None
        parts += (b"X-Forwarded-Host: ", xfh[0] if xfh and xfh[0] else host, b"\r\n")
        xfp = headers_in.get(b"X-Forwarded-Proto") if forward else None
        parts += (b"X-Forwarded-Proto: ", xfp[0] if xfp and xfp[0] else res.proto_value, b"\r\n")
        existing = headers_in.get(b"X-Kamal-Target") if forward else None
        parts.append(b"X-Kamal-Target: ")
        if existing:
            parts += (b", ".join(existing), b", ")
        parts += (target.address.encode("utf-8"), b"\r\n")

        body = request.body
        target.start_request(self)
        if topts.buffer_requests and body is not None:
            # P20: the whole body first, counted as in flight on the target (SPEC §10.2).
            pending = buffer_request_body(
                body, topts.max_memory_buffer_size, topts.max_request_body_size
            )
            self.pending = pending
            pending.addCallbacks(
                self._request_buffered,
                self._request_buffer_failed,
                callbackArgs=(parts, upgrade, body.length is UNKNOWN_LENGTH),
            )
            return
        self._forward(parts, upgrade, body)

    def _request_buffered(self, buffer: Any, parts: list[bytes], upgrade: Any, chunked: bool):
        self.pending = None
        self.req_buffer = buffer
        if self.finished:
            buffer.close()
            return
        self._forward(parts, upgrade, buffer.as_producer(unknown_length=chunked))

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
            self.client_gone()
        else:
            log_error("Error buffering request", path=self.path, error=str(exc))
            self.fail(500)

    def _forward(self, parts: list[bytes], upgrade: bytes | None, body: Any) -> None:
        """P21/P22: send upstream, relaying through a response buffer when asked to."""
        topts = self.service.target_options
        sink: Any = self
        if topts.buffer_responses:
            sink = BufferingSink(
                self,
                topts.max_memory_buffer_size,
                topts.max_response_body_size,
                on_too_large=self._response_too_large,
                reactor=self.res.reactor,
            )
            self.resp_buffer = sink
        method = self.request.method
        framing, chunked = request_framing(method, body)
        if framing is None:
            body = None
        else:
            parts.append(framing)
        parts.append(b"\r\n")
        target = self.target
        self.upstream = target.pool.forward_head(
            method,
            b"".join(parts),
            body,
            chunked,
            sink,
            timeout=target.response_timeout,
            upgrade=upgrade,
            now=self.started / 1e9,
            on_done=self._upstream_finished,
        )
        if self.resp_buffer is not None:
            self.resp_buffer.exchange = self.upstream

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
            self.request.informational(status, self._relayed_headers(headers)[0])

    def _relayed_headers(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], bool, bytes | None]:
        """Upstream headers as the client gets them: canonical names, cookies scoped, no
        bare CR; with whether a ``Date`` came and the ``X-Writer-Affinity`` value."""
        out: list[tuple[bytes, bytes]] = []
        names = _RESPONSE_NAMES
        scope = self.cookie_prefix
        has_date = False
        opt_out = None
        for name, value in headers:
            entry = names.get(name)
            if entry is None:
                entry = _response_name(name)
            canon, code = entry
            if code:
                if code == _SKIP:
                    continue
                if code == _DATE:
                    has_date = True
                elif code == _CONTENT_TYPE:
                    if not self.resp_content_type:
                        self.resp_content_type = value
                elif code == _SET_COOKIE:
                    if scope is not None:
                        value = scope_set_cookie(value, scope, host_without_port(self.host))
                elif self.affinity_ms:  # _AFFINITY: consumed by the writer-affinity stage
                    if opt_out is None:
                        opt_out = value
                    continue
            if 13 in value:
                value = value.replace(b"\r", b" ")
            out.append((canon, value))
        return out, has_date, opt_out

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        if self.finished:
            return
        self.status = status
        if status == 101:
            self.head_101 = headers
            return
        out, has_date, opt_out = self._relayed_headers(headers)
        if self.affinity_ms and opt_out != b"false":
            out.append(self._writer_affinity_cookie())
        if not has_date:
            out.append((b"Date", http_date()))
        if self.service is not None and self.service.log_response_headers:
            self.resp_headers = out
            self.resp_length = length
        request = self.request
        request.start_response(status, reason or None, out, length)
        # Flow control for bodies that could outgrow the socket buffers; a small body with a
        # known length is written at once and needs none (most responses: a cheaper path).
        producer = self.resp_buffer or self.upstream
        if producer is not None and (
            length is None or length > SMALL_BODY or self.resp_buffer is not None
        ):
            request.register_producer(producer)

    def _writer_affinity_cookie(self) -> tuple[bytes, bytes]:
        """SPEC §8.3: after a write, reads stick to the writer for a while."""
        expires_ms = time.time_ns() // 1_000_000 + self.affinity_ms
        return (
            b"Set-Cookie",
            b"kamal-writer=%d; Path=/; Expires=%s; HttpOnly"
            % (expires_ms, http_date(expires_ms // 1000 + 1)),
        )

    def response_data(self, data: bytes) -> None:
        if self.finished:
            return
        self.response_bytes += len(data)
        self.request.write(data)

    def splice_destination(self) -> Any:
        """The client's transport, when the rest of the body may go kernel to kernel
        (``proxy/splice.py``): relayed as is, nothing buffered.  Its reading is paused."""
        if self.finished or self.resp_buffer is not None:
            return None
        offer = getattr(self.request, "splice_destination", None)
        return offer() if offer is not None else None

    def splice_done(self, moved: int) -> None:
        self.response_bytes += moved

    def upgraded(self, tunnel: Any) -> None:
        self.is_upgraded = True
        self.tunnel = tunnel
        # A graceful stop does not wait for tunnels (SPEC §4.2): they end with the process.
        self.res.tracker.remove(self)
        self.status = 101
        if not self.request.switch_protocols(self.head_101, tunnel):
            tunnel.close()
        tunnel.done.addBoth(self._tunnel_closed)

    def _tunnel_closed(self, _result: object) -> None:
        self._end()

    # -- endings ----------------------------------------------------------------

    def _upstream_finished(self, error: BaseException | None) -> None:
        if error is None:
            self._upstream_done()
        else:
            self._upstream_failed(error)

    def _upstream_done(self) -> None:
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
        request.unregister_producer()
        request.finish()
        self._end()

    def _relay_failed(self, failure: Failure) -> None:
        if self.finished or isinstance(failure.value, (TooLarge, defer.CancelledError)):
            return
        log_error("Error sending response", path=self.path, error=str(failure.value))
        self.fail(500)

    def _upstream_failed(self, exc: BaseException) -> None:
        if self.finished:
            return
        self.request.unregister_producer()
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
            self.client_gone()
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

    def client_gone(self) -> None:
        """The client left before the response was complete: 499 (SPEC §9.7)."""
        if self.finished:
            return
        self.status = 499
        if self.pending is not None:
            self.pending.cancel()
        if self.upstream is not None:
            self.upstream.cancel()
        self._end()

    def _abort_client(self) -> None:
        self.request.abort()
        self._end()

    def fail(self, status: int, message: str | None = None) -> None:
        """Answer with an error page, unless the response has already started."""
        if self.finished:
            return
        request = self.request
        if request.started:
            self._abort_client()
            return
        self.status = status
        custom = self.service.error_pages if self.service is not None and status != 404 else None
        body = pages.render_page(status, message, custom)
        self.resp_content_type = HTML
        self.resp_headers = None
        self.response_bytes = self.resp_length = len(body)
        request.respond(status, [(b"Content-Type", HTML)], body)
        self._end()

    def _end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.res.tracker.remove(self)
        # The request holds its exchange and the exchange the request: break the cycle, so
        # refcounting frees both at once (the cyclic GC would cost ~10 µs per request).
        self.request.exchange = None
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
        if not self.res.internal:
            self._log()

    def _log(self) -> None:
        now = time.time_ns()
        request = self.request
        h = request.headers
        service = self.service
        target = self.target
        client_addr, client_port = request.client_address()
        body = request.body
        req_len = 0 if body is None else body.length
        if req_len is UNKNOWN_LENGTH:
            req_len = -1
        uri = request.uri
        q = uri.find(b"?")
        service_name = service.name if service is not None else ""
        duration = now - self.started
        extra: list[tuple[str, str]] | None = None
        if target is not None and service is not None:
            if service.log_request_headers or service.log_response_headers:
                extra = self._logged_headers(service)
        remote = self.remote_addr
        ctype = h.get(b"Content-Type")
        agent = h.get(b"User-Agent")
        log_request_line(
            now,
            (
                self.host,
                self.res.port,
                self.path,
                self.request_id.decode("latin-1"),
                self.status,
                service_name,
                target.address if target is not None else "",
                duration if duration > 0 else 0,
                request.method.decode("latin-1"),
                req_len,
                ctype[0].decode("latin-1") if ctype else "",
                self.response_bytes,
                self.resp_content_type.decode("latin-1"),
                client_addr,
                client_port,
                remote.decode("latin-1") if remote is not None else client_addr,
                agent[0].decode("latin-1") if agent else "",
                request.version.decode("latin-1"),
                self.res.scheme,
                uri[q + 1 :].decode("latin-1") if q >= 0 else "",
            ),
            extra,
        )
        metrics = self.res.metrics
        if metrics is not None and not self.excluded:
            metrics.observe(service_name, request.method, self.status, duration / 1e9)

    def _logged_headers(self, service: Any) -> list[tuple[str, str]]:
        """The ``req_*``/``resp_*`` keys of ``--log-request-header``/``--log-response-header``."""
        h = self.request.headers
        extra = []
        for name in service.log_request_headers:
            values = h.get(canonical_name(name.encode("latin-1")) or b"", ())
            value = ",".join(v.decode("latin-1") for v in values)
            extra.append(("req_" + name.lower().replace("-", "_"), value))
        sent = self.resp_headers or ()
        for name in service.log_response_headers:
            canon = canonical_name(name.encode("latin-1"))
            if canon == b"Content-Type" and not sent and self.resp_content_type:
                value = self.resp_content_type.decode("latin-1")
            elif canon == b"Content-Length":
                value = "" if self.resp_length is None else str(self.resp_length)
            else:
                value = ",".join(v.decode("latin-1") for n, v in sent if n == canon)
            extra.append(("resp_" + name.lower().replace("-", "_"), value))
        return extra


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
