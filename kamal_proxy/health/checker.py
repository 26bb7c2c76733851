"""Health checks: one ``LoopingCall`` per target that GETs the health path (SPEC §12.1).

A check that is still running when the next tick comes is not doubled up: the tick is dropped,
which is what a fixed-rate Go ticker with a blocking receiver does.

The GET goes through the proxy's own HTTP/1.1 client (``kamal_proxy.proxy.upstream``, one
connection per check): ``twisted.web.client`` would load pyOpenSSL, cryptography and h2 into
every proxy that checks a target (13 MiB), for a plain-HTTP request.  An ``agent`` (Twisted's
``IAgent``) can still be given instead, as tests do.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.http_headers import Headers

from kamal_proxy.observe.events import info
from kamal_proxy.proxy.upstream import UpstreamPool
from kamal_proxy.service_options import HealthCheckConfig

USER_AGENT = b"kamal-proxy"
MAX_REDIRECTS = 10


def health_check_url(address: str, config: HealthCheckConfig) -> str:
    """``http://<host>:<port><path>`` with the path joined and escaped as Go's url package does."""
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, ""
    if config.port > 0:
        port = str(config.port)
    authority = f"{host}:{port}" if port else host
    return f"http://{authority}{_join_path(config.path)}"


def _join_path(path: str) -> str:
    cleaned = posixpath.normpath("/" + path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    # Go keeps a path that is already validly encoded as given (``!``, ``(``, ``%20`` ...)
    # and otherwise escapes its decoded form.
    if _BAD_ESCAPE.search(cleaned):
        return quote(cleaned, safe=_PATH_SAFE)
    if _VALID_ENCODED.match(cleaned):
        return cleaned
    return quote(unquote_to_bytes(cleaned), safe=_PATH_SAFE)


_PATH_SAFE = "/$&+,:;=@~"
_VALID_ENCODED = re.compile(r"[-A-Za-z0-9._~!$&'()*+,;=:@\[\]%/]*\Z")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class HealthCheckFailed(Exception):
    pass


def proxy_for(url: str, environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The HTTP proxy Go's default client would use for ``url`` (``HTTP_PROXY``/``NO_PROXY``,
    either case; never for ``localhost`` or loopback addresses), as ``(host, port)``."""
    env = os.environ if environ is None else environ
    proxy = env.get("HTTP_PROXY") or env.get("http_proxy")
    if not proxy:
        return None
    host = urlsplit(url).hostname or ""
    if host == "localhost" or _is_loopback(host):
        return None
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return None
        entry = entry.split(":")[0].lstrip(".").lstrip("*").lstrip(".")
        if host.lower() == entry or host.lower().endswith("." + entry):
            return None
    parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or 80


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Status:
    """The response sink of a check: the status and ``Location``; the body is dropped."""

    __slots__ = ("status", "location")

    def __init__(self) -> None:
        self.status = 0
        self.location: str | None = None

    def informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: Any
    ) -> None:
        self.status = status
        for name, value in headers:
            if len(name) == 8 and name.lower() == b"location":
                self.location = value.decode("latin-1")
                break

    def response_data(self, data: bytes) -> None:
        pass

    def upgraded(self, tunnel: Any) -> None:
        tunnel.close()


def http_get(reactor, url: str, host: bytes | None) -> defer.Deferred[tuple[int, str | None]]:
    """GET ``url`` on a new connection (through the environment's HTTP proxy, if any, as Go's
    default client does): ``(status, Location)``; cancelling it closes the connection."""
    parts = urlsplit(url)
    proxy = proxy_for(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if proxy is None:
        address, target = (parts.hostname or "", parts.port or 80), path
    else:
        address, target = proxy, f"http://{parts.netloc}{path}"
    pool = UpstreamPool(reactor, address[0], address[1], max_idle=0)
    headers = [(b"Host", host or parts.netloc.encode("utf-8")), (b"User-Agent", USER_AGENT)]
    sink = _Status()

    def cancel(_: defer.Deferred) -> None:
        exchange.cancel()

    result: defer.Deferred[tuple[int, str | None]] = defer.Deferred(cancel)

    def done(failure: BaseException | None) -> None:
        if result.called:
            return
        if failure is None:
            result.callback((sink.status, sink.location))
        else:
            result.errback(failure)

    exchange = pool.forward(
        b"GET", target.encode("utf-8"), headers, None, sink, timeout=None, on_done=done
    )
    return result


class HealthCheck:
    """Checks one target on a fixed schedule and reports each result to
    ``report(ok, reason)``: why it failed (None when it passed), for a deploy's progress."""

    def __init__(
        self,
        reactor: IReactorTime,
        address: str,
        config: HealthCheckConfig,
        report: Callable[[bool, str | None], None],
        agent: Any = None,
        connector: Any = None,
    ) -> None:
        self._reactor = reactor
        #: What connects to the target (``reactor`` unless given: tests time on a fake clock).
        self._connector = reactor if connector is None else connector
        self.url = health_check_url(address, config)
        self._host = config.host.encode("utf-8") if config.host else None
        self._interval = config.interval / 1e9
        self._timeout = config.timeout / 1e9
        self._report = report
        self._agent = agent
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._running: defer.Deferred | None = None
        self._closed = False

    def start(self) -> None:
        if self._interval <= 0:
            raise ValueError("health check interval must be positive")
        self._loop.start(self._interval, now=True)

    def close(self) -> None:
        """Stop checking; an in-flight check is cancelled and its result ignored."""
        self._closed = True
        if self._loop.running:
            self._loop.stop()
        if self._running is not None:
            self._running.cancel()

    def _tick(self) -> None:
        # Returning nothing keeps LoopingCall on its fixed schedule; a check still running
        # when a tick arrives makes that tick a no-op.
        if self._running is not None or self._closed:
            return
        d = defer.ensureDeferred(self.check())
        self._running = d

        def finished(result: object) -> None:
            self._running = None
            if self._closed:
                return
            if result is None or isinstance(result, str):
                reason = result
            else:
                reason = getattr(result, "getErrorMessage", lambda: str(result))()
            self._report(result is None, reason)

        d.addBoth(finished)

    async def check(self) -> None | str:
        """One check; returns None on success, or the error text (also logged) on failure."""
        d = defer.ensureDeferred(self._check_once())
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._reactor.callLater(max(self._timeout, 0), expire)
        try:
            await d
        except defer.CancelledError:
            if self._closed:
                return "cancelled"
            return self._failed("request timed out")
        except HealthCheckFailed as e:
            return self._failed(str(e))
        except Exception as e:  # noqa: BLE001 - every failure is just "unhealthy"
            # Agent turns a cancelled request into ResponseNeverReceived([CancelledError]).
            if self._closed:
                return "cancelled"
            if timed_out:
                return self._failed("request timed out")
            return self._failed(_error_text(e))
        finally:
            if timer.active():
                timer.cancel()
        return None

    def _failed(self, text: str) -> str:
        info("Healthcheck failed", url=self.url, error=text)
        return text

    async def _check_once(self) -> None:
        url = self.url
        # Like Go's client: at most 10 requests, so the 10th redirect is an error.
        for _ in range(MAX_REDIRECTS):
            status, location = await self._get(url)
            if 200 <= status < 300:
                return
            if status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            raise HealthCheckFailed(f"unexpected status ({status})")
        raise HealthCheckFailed("stopped after 10 redirects")

    async def _get(self, url: str) -> tuple[int, str | None]:
        if self._agent is None:
            return await http_get(self._connector, url, self._host)
        return await agent_get(self._agent, url, self._host)


async def agent_get(agent: Any, url: str, host: bytes | None) -> tuple[int, str | None]:
    """``http_get`` through a Twisted ``IAgent``: ``(status, Location)``."""
    from twisted.web.client import readBody

    headers = Headers({b"User-Agent": [USER_AGENT]})
    if host is not None:
        headers.setRawHeaders(b"Host", [host])
    response = await agent.request(b"GET", url.encode("utf-8"), headers)
    try:
        await readBody(response)
    except defer.CancelledError:
        raise  # the check timed out or was closed: do not go on to a redirect
    except Exception:  # noqa: BLE001 - a truncated body still tells us the status
        pass
    location = response.headers.getRawHeaders(b"location", [None])[0]
    return response.code, location.decode("latin-1") if location else None


def _error_text(e: Exception) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.DNSLookupError):
        return f"lookup failed: {e}"
    if isinstance(e, (error.TimeoutError, defer.TimeoutError)):
        return "request timed out"
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    return str(e) or e.__class__.__name__
