"""The local on-demand TLS check: an internal request through the service's pipeline (§16.4).

The request is a twisted.web request on an in-memory channel, rendered by an internal
pipeline (``ProbeResource``: no redirects, no request log line), so it meets client-IP
handling, the ACME stage, error pages, pause/stop, rollout, load balancing and proxying
exactly like a client request would.  It has no peer (hence no ``X-Forwarded-For``) and
arrives as plain HTTP (``X-Forwarded-Proto: http``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from kamal_proxy.proxy.resource import RoutingResource
from kamal_proxy.proxy.webrequest import StreamingRequest

__all__ = ["MAX_BODY", "PROBE_TIMEOUT", "ProbeRequest", "probe"]

PROBE_TIMEOUT = 2.0
MAX_BODY = 256
# A paused service ends the wait itself (max-pause); this only bounds a pathological one.
MAX_REARMS = 150


class _Transport:
    disconnecting = False

    def getPeer(self):
        return UNIXAddress(None)

    def getHost(self):
        return UNIXAddress(None)

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class _Channel:
    """Just enough of an HTTP channel for one request whose answer we keep in memory."""

    site = None

    def __init__(self, done: defer.Deferred) -> None:
        self.transport = _Transport()
        self.done = done

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return False

    def writeHeaders(self, version, code, reason, headers) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def requestDone(self, request: Any) -> None:
        if not self.done.called:
            self.done.callback((request.code, bytes(request.probe_body)))


class ProbeRequest(StreamingRequest):
    """Keeps the status and the first 256 bytes of the body instead of sending them."""

    def __init__(self, channel: Any) -> None:
        super().__init__(channel)
        self.content = None
        self.probe_body = bytearray()
        self.probe_exchange = None

    def write(self, data: bytes) -> None:
        if self.finished or self.gone:
            return
        self.startedWriting = 1
        room = MAX_BODY - len(self.probe_body)
        if room > 0 and data:
            self.probe_body += data[:room]


def probe(
    reactor: IReactorTime,
    resource: RoutingResource,
    host: str,
    path_and_query: str,
    timeout: float = PROBE_TIMEOUT,
) -> defer.Deferred:
    """GET ``path_and_query`` with ``Host: host``; fires with ``(status, body[:256])``.

    Proxying is bounded by ``timeout`` (a timeout gives 504); waiting for a paused service
    is not (it ends with the service's own max-pause 504).
    """
    done: defer.Deferred = defer.Deferred()
    request = ProbeRequest(_Channel(done))
    request.method = b"GET"
    request.uri = path_and_query.encode("utf-8")
    request.path = request.uri.split(b"?", 1)[0]
    request.clientproto = b"HTTP/1.1"
    request.requestHeaders = Headers({b"host": [host.encode("utf-8")]})

    def expire() -> None:
        if done.called:
            return
        exchange = request.probe_exchange
        waiting = exchange is not None and exchange.upstream is None and not exchange.finished
        if waiting and rearms[0] < MAX_REARMS:
            rearms[0] += 1
            timer[0] = reactor.callLater(timeout, expire)  # still paused: keep waiting
            return
        request.connectionLost(Failure(ConnectionLost("on-demand check timed out")))
        if not done.called:
            done.callback((504, b""))

    rearms = [0]
    timer = [reactor.callLater(timeout, expire)]

    def stop(result: Any) -> Any:
        if timer[0].active():
            timer[0].cancel()
        return result

    done.addBoth(stop)
    try:
        resource.render(request)
    except Exception:  # noqa: BLE001 - an internal error is a denial, not a crash
        if not done.called:
            done.callback((500, b""))
    return done
