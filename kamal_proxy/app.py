"""Assemble the server: one ``MultiService`` for ``kamal-proxy run`` and ``twistd kamal-proxy``.

Start order is the SPEC's (§4.1): restore state, metrics, HTTP and HTTPS listeners, control
socket, then ``Server started``.  The ports are opened in ``privilegedStartService``, before
twistd's ``-u``/``-g`` drop privileges; everything else (the data directory first) starts as
the user who runs the server.  On stop every part stops at once: the listeners and the socket
close while idle connections are closed and requests in flight get up to 10 seconds.

With ``--workers 1`` this process serves the traffic itself.  With more, it is the main
process of DESIGN §1: it holds the ports without accepting on them, and worker processes
(``kamal_proxy.process``) adopt them and serve from a copy of its routing state.
"""

from __future__ import annotations

# First of all: Twisted's TCP and AMP modules then load without pyOpenSSL (kamal_proxy.tls.lazy).
import kamal_proxy.tls.lazy  # noqa: F401

# isort: split

import os
import socket
import sys

from twisted.application import service as appservice
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from kamal_proxy import options as paths
from kamal_proxy.control.server import ControlProtocol
from kamal_proxy.limits import raise_open_files_limit
from kamal_proxy.observe.events import debug, error, info, warn
from kamal_proxy.options import RunOptions
from kamal_proxy.routing.router import Router, RouterError
from kamal_proxy.startup import StartupError, bind_reason

SHUTDOWN_DEADLINE = 10.0
FLUSH_GRACE = 0.1


class RestoreState(appservice.Service):
    """Restores the routing state before any listener accepts.

    The state file's location is settled here, not when the service is built, so that the
    data directory is created by the user the server runs as (after twistd's ``-u``/``-g``).
    """

    def __init__(self, router: Router, state_path: str | None = None) -> None:
        self.router = router
        self.state_path = state_path

    def startService(self) -> None:
        super().startService()
        if self.router.state_path is None:
            self.router.state_path = self.state_path or paths.state_path()
        self.router.restore()


class ControlSocket(appservice.Service):
    """The AMP control socket: mode 0600, never stolen from a live server."""

    def __init__(self, reactor, path: str, router: Router) -> None:
        self.reactor = reactor
        self.path = path
        self.router = router
        self.port = None

    def startService(self) -> None:
        super().startService()
        if _socket_is_live(self.path):
            raise StartupError(
                f"listen unix {self.path}: another kamal-proxy is already running on this socket"
            )
        try:
            os.unlink(self.path)
        except OSError:
            pass
        factory = Factory.forProtocol(lambda: ControlProtocol(self.router, self.router))
        factory.noisy = False  # no "Starting factory" line in twistd's log
        old_umask = os.umask(0o177)
        try:
            self.port = self.reactor.listenUNIX(self.path, factory, mode=0o600, wantPID=False)
        except neterror.CannotListenError as e:
            raise StartupError(f"listen unix {self.path}: bind: {bind_reason(e)}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    def stopService(self):
        super().stopService()
        d = defer.maybeDeferred(self.port.stopListening) if self.port else defer.succeed(None)

        def unlink(_):
            try:
                os.unlink(self.path)
            except OSError:
                pass

        return d.addBoth(unlink)


class Listener(appservice.Service):
    """A TCP listener on all interfaces whose stop waits for requests in flight (SPEC §4.2).

    It listens in ``privilegedStartService`` (before a privilege drop), or at start when
    nobody called that.
    """

    def __init__(self, reactor, port: int, factory) -> None:
        self.reactor = reactor
        self.requested_port = port
        self.factory = factory
        self.port = None

    @property
    def bound_port(self) -> int:
        return self.port.getHost().port

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        try:
            # TLS, when wanted, is inside the factory (it reads the ClientHello first).
            self.port = self.reactor.listenTCP(
                self.requested_port, self.factory, backlog=1024, interface="::"
            )
        except neterror.CannotListenError as e:
            raise StartupError(
                f"listen tcp :{self.requested_port}: bind: {bind_reason(e)}"
            ) from None

    def stopService(self):
        super().stopService()
        if self.port is None:
            return None
        return defer.maybeDeferred(self.port.stopListening)


class ListeningSocket(appservice.Service):
    """A listening TCP socket on all interfaces that this process holds but never accepts on:
    the workers adopt it.  Opened in ``privilegedStartService`` (before a privilege drop)."""

    def __init__(self, port: int, family: int = socket.AF_INET6) -> None:
        self.requested_port = port
        self.family = family
        self.socket: socket.socket | None = None

    @property
    def bound_port(self) -> int:
        return self.socket.getsockname()[1]

    def fileno(self) -> int:
        return self.socket.fileno()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open()

    def startService(self) -> None:
        super().startService()
        if self.socket is None:
            self._open()

    def _open(self) -> None:
        # What listenTCP(port, interface="::", backlog=1024) does, without reading from it.
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::" if self.family == socket.AF_INET6 else "", self.requested_port))
            s.listen(1024)
        except OSError as e:
            s.close()
            reason = bind_reason(neterror.CannotListenError("", self.requested_port, e))
            raise StartupError(f"listen tcp :{self.requested_port}: bind: {reason}") from None
        s.setblocking(False)
        self.socket = s

    def stopService(self):
        super().stopService()
        # The workers hold their own copies; the port closes when the last one closes it.
        if self.socket is not None:
            self.socket.close()
            self.socket = None


class DatagramSockets(appservice.Service):
    """``count`` UDP sockets on one port (``SO_REUSEPORT``), one per worker, for HTTP/3; opened
    in ``privilegedStartService`` and held by this process for the workers' lifetimes."""

    def __init__(self, port: int, count: int) -> None:
        self.requested_port = port
        self.count = count
        self.sockets: list[socket.socket] = []

    def fileno(self, index: int) -> int:
        return self.sockets[index].fileno()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open()

    def startService(self) -> None:
        super().startService()
        if not self.sockets:
            self._open()

    def _open(self) -> None:
        from kamal_proxy.proxy.http3 import bind_udp

        try:
            for _ in range(self.count):
                self.sockets.append(bind_udp(self.requested_port, reuse_port=True))
        except OSError as e:
            for s in self.sockets:
                s.close()
            self.sockets = []
            reason = bind_reason(neterror.CannotListenError("", self.requested_port, e))
            raise StartupError(f"listen udp :{self.requested_port}: bind: {reason}") from None

    def stopService(self):
        super().stopService()
        for s in self.sockets:
            s.close()
        self.sockets = []


class GracefulShutdown(appservice.Service):
    """Lets requests in flight finish for up to 10 seconds, then closes what is left."""

    def __init__(self, reactor, tracker, sites) -> None:
        self.reactor = reactor
        self.tracker = tracker
        self.sites = sites

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self.drain())

    async def drain(self) -> None:
        for site in self.sites:
            site.close_idle()
        finished = self.tracker.wait_idle()
        timer = self.reactor.callLater(SHUTDOWN_DEADLINE, finished.cancel)
        try:
            await finished
        except defer.CancelledError:
            warn("Closing active connections")
            self.tracker.abort_all()
        finally:
            if timer.active():
                timer.cancel()
        # The reactor drops connections without flushing them once shutdown proceeds:
        # give the last responses a moment to leave the socket buffers.
        await deferLater(self.reactor, FLUSH_GRACE, lambda: None)


class Announce(appservice.Service):
    """Logs ``Server started`` once the reactor runs.

    Process managers and tests take that line as "ready", and may send SIGTERM at once: the
    reactor installs its signal handlers as it starts running, so announcing any earlier would
    leave a window in which SIGTERM kills the process instead of stopping it gracefully.
    """

    def __init__(self, reactor, http, https, ready=None) -> None:
        self.reactor = reactor
        self.http = http
        self.https = https
        # With workers: a callable giving a Deferred that fires once they all serve.
        self.ready = ready

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._when_ready)

    def _when_ready(self) -> None:
        if self.ready is None:
            self._announce()
        else:
            self.ready().addCallback(lambda _: self._announce())

    def _announce(self) -> None:
        if self.running:
            info("Server started", http=self.http.bound_port, https=self.https.bound_port)


class ProxyService(appservice.MultiService):
    """The whole server; ``Server stopped`` once every part has stopped."""

    def stopService(self):
        return defer.maybeDeferred(super().stopService).addBoth(lambda _: info("Server stopped"))


def upstream_pool(reactor, host: str, port: int):
    """A target's keep-alive connection pool: the proxy's, given to routing (which lies below
    the proxy and does not import it)."""
    from kamal_proxy.proxy.upstream import UpstreamPool

    return UpstreamPool(reactor, host, port)


def health_check(reactor, address: str, config, report):
    """A target's health check (``health.checker``), given to routing like the pool; it
    reports ``(ok, reason)`` so that a deploy can show why its targets are not healthy yet."""
    from kamal_proxy.health.checker import HealthCheck

    check = HealthCheck(reactor, address, config, lambda ok: report(ok, check.last_error))
    return check


def setup_service(service, tls=None) -> None:
    """Per-service extras built at deploy and restore; a failure refuses the deploy."""
    from kamal_proxy.proxy.pages import ErrorPages, PagesError
    from kamal_proxy.tls.certificates import CertificateError

    path = service.options.error_page_path
    if path:
        try:
            service.error_pages = ErrorPages.load(path)
        except PagesError as e:
            error(
                "Unable to parse custom error pages", service=service.name, path=path, error=str(e)
            )
            raise RouterError("unable to load error pages") from None
    if tls is not None:
        try:
            tls.setup(service)
        except CertificateError as e:
            raise RouterError(str(e)) from None


class DataPlane:
    """The HTTP and HTTPS sites over one routing state: the Router in a single process, a
    worker's copy of it otherwise.  The request pipeline cannot tell which."""

    def __init__(self, reactor, router, tls, http_port: int, https_port: int, metrics) -> None:
        from kamal_proxy.proxy.channel import make_site
        from kamal_proxy.proxy.resource import RoutingResource

        http_resource = RoutingResource(
            reactor, router, port=http_port, secure=False, metrics=metrics
        )
        https_resource = RoutingResource(
            reactor, router, port=https_port, secure=True, metrics=metrics
        )
        self.tracker = http_resource.tracker
        https_resource.tracker = self.tracker
        self.https_resource = https_resource
        self.http_site = make_site(http_resource, reactor)
        self.https_site = make_site(https_resource, reactor)
        # TLS, when wanted, is inside the factory (it reads the ClientHello first).
        self.https_factory = tls.server_factory(self.https_site)
        self.sites = [self.http_site, self.https_site]


def make_service(options: RunOptions, reactor=None) -> appservice.MultiService:
    raise_open_files_limit()
    if reactor is None:
        from twisted.internet import reactor
    from kamal_proxy.tls.certificates import TLS

    # The state file's place is settled at start (RestoreState), as the user we run as.
    router = Router(
        reactor,
        None,
        upstream_pool,
        service_setup=lambda s: setup_service(s, tls),
        health_check_factory=health_check,
    )
    tls = TLS(
        reactor,
        router,
        options.acme_directory,
        options.acme_ca_bundle,
        http_port=options.http_port,
    )
    top = ProxyService()
    top.router = router
    top.tls = tls

    RestoreState(router, options.state_path).setServiceParent(top)
    # After the restore (certificates of restored services are known), before the listeners.
    tls.acme.setServiceParent(top)
    if options.workers < 1:  # 0 (or less) asks for the default: one per usable CPU
        options.workers = paths.default_workers()
    if options.workers > 1:
        return _main_process(options, reactor, top)

    metrics = None
    if options.metrics_port:
        from kamal_proxy.observe.metrics import Metrics, MetricsService

        metrics = Metrics()
        MetricsService(reactor, options.metrics_port, metrics).setServiceParent(top)
    else:
        debug("Metrics server disabled")

    plane = DataPlane(reactor, router, tls, options.http_port, options.https_port, metrics)
    # On stop, every service stops at once: the listeners close while this one closes idle
    # connections and waits for the requests in flight.
    GracefulShutdown(reactor, plane.tracker, plane.sites).setServiceParent(top)

    http = Listener(reactor, options.http_port, plane.http_site)
    https = Listener(reactor, options.https_port, plane.https_factory)
    http.setServiceParent(top)
    https.setServiceParent(top)
    if options.http3:
        _add_http3(top, reactor, options.https_port, tls, plane.https_site, plane.https_resource)
    ControlSocket(reactor, paths.socket_path(), router).setServiceParent(top)
    Announce(reactor, http, https).setServiceParent(top)
    return top


def _main_process(options: RunOptions, reactor, top: ProxyService) -> ProxyService:
    """The main process of ``--workers N``: ports, state, health, ACME, control, metrics;
    the workers serve."""
    from kamal_proxy.process.supervisor import WorkerPool

    http = ListeningSocket(options.http_port)
    https = ListeningSocket(options.https_port)
    # HTTP/3: one UDP socket per worker on the HTTPS port, kept here so that a replaced
    # worker gets the same one (and no other worker's connections move).
    udp = DatagramSockets(options.https_port, options.workers) if options.http3 else None
    pool = WorkerPool(reactor, options, top.router, top.tls, http, https, udp=udp)
    top.workers = pool
    if options.metrics_port:
        from kamal_proxy.observe.metrics import Metrics, MetricsService

        MetricsService(
            reactor, options.metrics_port, Metrics(), gather=pool.collect_metrics
        ).setServiceParent(top)
    else:
        debug("Metrics server disabled")
    http.setServiceParent(top)
    https.setServiceParent(top)
    if udp is not None:
        udp.setServiceParent(top)
    pool.setServiceParent(top)
    ControlSocket(reactor, paths.socket_path(), top.router).setServiceParent(top)
    Announce(reactor, http, https, ready=pool.when_serving).setServiceParent(top)
    return top


def _add_http3(top, reactor, port: int, tls, https_site, https_resource) -> None:
    """``--http3``: UDP on the HTTPS port, same certificates and pipeline; Alt-Svc on TCP."""
    from kamal_proxy.proxy.http3 import Http3Server
    from kamal_proxy.proxy.http3_bridge import Http3Bridge
    from kamal_proxy.proxy.http3_listener import Http3Listener

    https_site.advertise_http3(port)
    server = Http3Server(reactor, tls.selector(), Http3Bridge(https_resource, port))
    Http3Listener(
        reactor,
        port,
        server,
        lambda e: StartupError(f"listen udp :{port}: bind: {bind_reason(e)}"),
    ).setServiceParent(top)


def run_server(options: RunOptions) -> int:
    """``kamal-proxy run``: start, serve until SIGTERM/SIGINT, return the exit code."""
    from twisted.internet import reactor

    from kamal_proxy.observe.log import start_logging

    log = start_logging(debug=options.debug)
    log.batch_flushes(reactor.callLater)
    try:
        top = make_service(options, reactor)
        top.privilegedStartService()
        top.startService()
    except StartupError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    log.flush()
    return 0


def _socket_is_live(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True
