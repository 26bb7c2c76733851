"""Assemble the server: one ``MultiService`` for ``kamal-proxy run`` and ``twistd kamal-proxy``.

Start order is the SPEC's (§4.1): restore state, metrics, HTTP and HTTPS listeners, control
socket, then ``Server started``.  On stop every part stops at once: the listeners and the
socket close while idle connections are closed and requests in flight get up to 10 seconds.
"""

from __future__ import annotations

# First of all: Twisted's TCP and AMP modules then load without pyOpenSSL (kamal_proxy.tls.lazy).
import kamal_proxy.tls.lazy  # noqa: F401

# isort: split

import errno
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

SHUTDOWN_DEADLINE = 10.0
FLUSH_GRACE = 0.1


class StartupError(Exception):
    """Printed as ``Error: <message>`` by ``run``; the process exits 1."""


class RestoreState(appservice.Service):
    """Restores the routing state before any listener opens."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def startService(self) -> None:
        super().startService()
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
        old_umask = os.umask(0o177)
        try:
            self.port = self.reactor.listenUNIX(self.path, factory, mode=0o600, wantPID=False)
        except neterror.CannotListenError as e:
            raise StartupError(f"listen unix {self.path}: bind: {_reason(e)}") from None
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
    """A TCP listener on all interfaces whose stop waits for requests in flight (SPEC §4.2)."""

    def __init__(self, reactor, port: int, factory) -> None:
        self.reactor = reactor
        self.requested_port = port
        self.factory = factory
        self.port = None

    @property
    def bound_port(self) -> int:
        return self.port.getHost().port

    def startService(self) -> None:
        super().startService()
        try:
            # TLS, when wanted, is inside the factory (it reads the ClientHello first).
            self.port = self.reactor.listenTCP(
                self.requested_port, self.factory, backlog=1024, interface="::"
            )
        except neterror.CannotListenError as e:
            raise StartupError(f"listen tcp :{self.requested_port}: bind: {_reason(e)}") from None

    def stopService(self):
        super().stopService()
        if self.port is None:
            return None
        return defer.maybeDeferred(self.port.stopListening)


class GracefulShutdown(appservice.Service):
    """Lets requests in flight finish for up to 10 seconds, then closes what is left."""

    def __init__(self, reactor, tracker, sites) -> None:
        self.reactor = reactor
        self.tracker = tracker
        self.sites = sites

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
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

    def __init__(self, reactor, http: Listener, https: Listener) -> None:
        self.reactor = reactor
        self.http = http
        self.https = https

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._announce)

    def _announce(self) -> None:
        if self.running:
            info("Server started", http=self.http.bound_port, https=self.https.bound_port)


class ProxyService(appservice.MultiService):
    """The whole server; ``Server stopped`` once every part has stopped."""

    def stopService(self):
        return defer.maybeDeferred(super().stopService).addBoth(lambda _: info("Server stopped"))


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


def make_service(options: RunOptions, reactor=None) -> appservice.MultiService:
    raise_open_files_limit()
    if reactor is None:
        from twisted.internet import reactor
    from kamal_proxy.proxy.channel import make_site
    from kamal_proxy.proxy.resource import RoutingResource
    from kamal_proxy.tls.certificates import TLS

    state_path = options.state_path or paths.state_path()
    router = Router(reactor, state_path, service_setup=lambda s: setup_service(s, tls))
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

    RestoreState(router).setServiceParent(top)
    # After the restore (certificates of restored services are known), before the listeners.
    tls.acme.setServiceParent(top)

    metrics = None
    if options.metrics_port:
        from kamal_proxy.observe.metrics import Metrics, MetricsService

        metrics = Metrics()
        MetricsService(reactor, options.metrics_port, metrics).setServiceParent(top)
    else:
        debug("Metrics server disabled")

    http_resource = RoutingResource(
        reactor, router, port=options.http_port, secure=False, metrics=metrics
    )
    https_resource = RoutingResource(
        reactor, router, port=options.https_port, secure=True, metrics=metrics
    )
    tracker = http_resource.tracker
    https_resource.tracker = tracker
    http_site = make_site(http_resource, reactor)
    https_site = make_site(https_resource, reactor)
    # On stop, every service stops at once: the listeners close while this one closes idle
    # connections and waits for the requests in flight.
    GracefulShutdown(reactor, tracker, [http_site, https_site]).setServiceParent(top)

    http = Listener(reactor, options.http_port, http_site)
    https = Listener(reactor, options.https_port, tls.server_factory(https_site))
    http.setServiceParent(top)
    https.setServiceParent(top)
    if options.http3:
        _add_http3(top, reactor, options.https_port, tls, https_site, https_resource)
    ControlSocket(reactor, paths.socket_path(), router).setServiceParent(top)
    Announce(reactor, http, https).setServiceParent(top)
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
        lambda e: StartupError(f"listen udp :{port}: bind: {_reason(e)}"),
    ).setServiceParent(top)


def run_server(options: RunOptions) -> int:
    """``kamal-proxy run``: start, serve until SIGTERM/SIGINT, return the exit code."""
    from twisted.internet import reactor

    from kamal_proxy.observe.log import start_logging

    log = start_logging(debug=options.debug)
    log.batch_flushes(reactor.callLater)
    try:
        top = make_service(options, reactor)
        top.startService()
    except StartupError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    log.flush()
    return 0


def _reason(e: neterror.CannotListenError) -> str:
    err = e.socketError
    code = getattr(err, "errno", None) or (err.args[0] if getattr(err, "args", None) else None)
    if isinstance(code, int):
        return os.strerror(code).lower() if code != errno.EADDRINUSE else "address already in use"
    return str(err)


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
