"""Health checks: one ``LoopingCall`` per target that GETs the health path (SPEC §12.1).

A check that is still running when the next tick comes is not doubled up: the tick is dropped,
which is what a fixed-rate Go ticker with a blocking receiver does.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent, HTTPConnectionPool, ProxyAgent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from kamal_proxy.observe.events import info
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


def health_agent(reactor, url: str):
    """A non-persistent Agent, or a ProxyAgent when the environment names an HTTP proxy;
    quiet, so that twistd's log gets no "Starting factory" line per check."""
    proxy = proxy_for(url)
    pool = HTTPConnectionPool(reactor, persistent=False)
    if proxy is None:
        return Agent.usingEndpointFactory(reactor, _QuietEndpoints(reactor), pool=pool)
    endpoint = _QuietEndpoint(HostnameEndpoint(reactor, proxy[0], proxy[1]))
    return ProxyAgent(endpoint, reactor, pool=pool)


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """Connects with the given factory made quiet (``noisy = False``)."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory):
        factory.noisy = False
        return self._endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _QuietEndpoints:
    """The endpoints Agent would use for ``http://`` URLs, made quiet."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri):  # noqa: N802 - Twisted's interface
        return _QuietEndpoint(HostnameEndpoint(self._reactor, uri.host, uri.port))


class HealthCheck:
    """Checks one target on a fixed schedule and reports each result to ``report(ok)``."""

    #: Why the check just reported failed (None when it passed), for a deploy's progress.
    last_error: str | None = None

    def __init__(
        self,
        reactor: IReactorTime,
        address: str,
        config: HealthCheckConfig,
        report: Callable[[bool], None],
        agent: Agent | None = None,
    ) -> None:
        self._reactor = reactor
        self.url = health_check_url(address, config)
        self._host = config.host.encode("utf-8") if config.host else None
        self._interval = config.interval / 1e9
        self._timeout = config.timeout / 1e9
        self._report = report
        self._agent = agent or health_agent(reactor, self.url)
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
                self.last_error = result
            else:
                self.last_error = getattr(result, "getErrorMessage", lambda: str(result))()
            self._report(result is None)

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
        headers = Headers({b"User-Agent": [USER_AGENT]})
        if self._host is not None:
            headers.setRawHeaders(b"Host", [self._host])
        response = await self._agent.request(b"GET", url.encode("utf-8"), headers)
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
