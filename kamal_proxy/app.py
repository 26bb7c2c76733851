"""Assemble the server: one ``MultiService`` for ``kamal-proxy run`` and ``twistd kamal-proxy``.

Start order is the SPEC's (§4.1): restore state, metrics, HTTP and HTTPS listeners, control
socket, then ``Server started``.  The ports are opened in ``privilegedStartService``, before
twistd's ``-u``/``-g`` drop privileges; everything else (the data directory first) starts as
the user who runs the server.  On stop every part stops at once: the listeners and the socket
close while idle connections are closed and requests in flight get up to 10 seconds.

With ``--workers 1`` this process serves the traffic itself.  With more, it is the main
process of DESIGN §1: it holds the ports without accepting on them, and worker processes
(``kamal_proxy.process``) adopt them and serve from a copy of its routing state.

Every listening socket is opened once by ``process/listening.py`` and served through a
duplicate (``adoptStreamPort``), so that ``kamal-proxy upgrade`` (``process/upgrade.py``) can
hand them all to a new main process; a process started for that (``process/handover.py``)
finds them there instead of binding.
"""

from __future__ import annotations

# First of all: Twisted's TCP and AMP modules then load without pyOpenSSL (kamal_proxy.tls.lazy).
import kamal_proxy.tls.lazy  # noqa: F401

# isort: split

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service as appservice
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from kamal_proxy import options as paths
from kamal_proxy.control.server import ControlProtocol
from kamal_proxy.limits import raise_open_files_limit
from kamal_proxy.observe.events import debug, error, info, warn
from kamal_proxy.options import RunOptions
from kamal_proxy.process import notify
from kamal_proxy.process.listening import BindError, ListeningSockets, adopt_unix_port
from kamal_proxy.routing.router import Router, RouterError
from kamal_proxy.startup import StartupError

SHUTDOWN_DEADLINE = 10.0
FLUSH_GRACE = 0.1
#: After the listeners close: time for the first request of a connection accepted in their
#: last moment to be read, so that it is served instead of closed as an idle connection.
ACCEPT_GRACE = 0.05
#: At the end of an upgrade's drain, how long clients get to close their side of a tunnel.
CLOSE_GRACE = 2.0
#: An upgrade waits for control connections; one that sent no command this long is idle.
IDLE_CONTROL_GRACE = 1.0


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


class _ControlConnection(ControlProtocol):
    """A control connection the socket keeps track of (an upgrade waits for their commands)."""

    def __init__(self, control: ControlSocket) -> None:
        super().__init__(control.router, control.router, upgrader=control.upgrader)
        self.control = control
        self.opened_at = control.reactor.seconds()

    def connectionMade(self) -> None:
        super().connectionMade()
        self.control.connections.add(self)

    def connectionLost(self, reason) -> None:
        self.control.connections.discard(self)
        super().connectionLost(reason)


class ControlSocket(appservice.Service):
    """The AMP control socket: mode 0600, never stolen from a live server.

    An upgrade pauses it (connections queue in the backlog), waits for the commands in
    progress (:meth:`quiesce`), and then either resumes it or hands it over: the new process
    inherits the listening socket, this one closes its copy without removing the file
    (:meth:`release`).  A process started for an upgrade holds the inherited socket and
    accepts on it only once it has taken over (:meth:`accept`).
    """

    def __init__(
        self, reactor, path: str, router: Router, sockets: ListeningSockets | None = None
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.router = router
        self.sockets = sockets if sockets is not None else ListeningSockets()
        self.port = None
        self.upgrader: Any = None
        self.connections: set[_ControlConnection] = set()
        #: Accept only once told to (a process started for an upgrade, until it takes over).
        self.deferred_accept = False
        #: This process removes the socket file at stop (not once it handed the socket over).
        self.owns_path = True

    def startService(self) -> None:
        super().startService()
        if not self.sockets.inherited("control") and _socket_is_live(self.path):
            raise StartupError(
                f"listen unix {self.path}: another kamal-proxy is already running on this socket"
            )
        try:
            self.sockets.unix("control", self.path)
        except BindError as e:
            raise StartupError(e.message) from None
        if not self.deferred_accept:
            self.accept()

    def accept(self, _: object = None) -> None:
        """Start accepting control connections (the socket file is ours to remove then)."""
        if self.port is not None or not self.running:
            return
        self.owns_path = True
        sock = self.sockets.get("control")
        if sock is None:
            return
        factory = Factory.forProtocol(lambda: _ControlConnection(self))
        factory.noisy = False  # no "Starting factory" line in twistd's log
        self.port = adopt_unix_port(self.reactor, sock, factory)

    # -- upgrades ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop accepting; connections wait in the backlog."""
        if self.port is not None:
            self.port.stopReading()

    def resume(self) -> None:
        if self.port is not None and self.running:
            self.port.startReading()

    async def quiesce(self, exclude: Any, timeout: float) -> None:
        """Wait until no accepted connection but ``exclude`` has a command in progress, then
        close them (a CLI sends one command per connection and has its answer by then)."""
        deadline = self.reactor.seconds() + timeout
        while True:
            now = self.reactor.seconds()
            busy = False
            for connection in list(self.connections):
                if connection is exclude:
                    continue
                if connection.pending:
                    busy = True
                elif connection.answered or now - connection.opened_at >= IDLE_CONTROL_GRACE:
                    connection.transport.loseConnection()
                else:
                    busy = True  # just accepted: its command is on the way
            if not busy:
                return
            if now >= deadline:
                from kamal_proxy.process.upgrade import UpgradeError

                raise UpgradeError(f"commands still in progress after {timeout:g}s")
            await deferLater(self.reactor, 0.05, lambda: None)

    def release(self) -> None:
        """The socket is the new process's now: close our copy, keep the file."""
        self.owns_path = False
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()
        self.sockets.close("control")

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        d = defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)

        def closed(_):
            self.sockets.close("control")
            if not self.owns_path:
                return
            try:
                os.unlink(self.path)
            except OSError:
                pass

        return d.addBoth(closed)


class Listener(appservice.Service):
    """A TCP listener on all interfaces whose stop waits for requests in flight (SPEC §4.2).

    The socket is opened in ``privilegedStartService`` (before a privilege drop), or at start
    when nobody called that, and served through a duplicate: stopping closes the duplicate
    and leaves the socket to whoever else holds it (a new process during an upgrade).
    """

    def __init__(
        self, reactor, port: int, factory, sockets: ListeningSockets | None = None, role="tcp"
    ) -> None:
        self.reactor = reactor
        self.requested_port = port
        self.factory = factory
        self.sockets = sockets if sockets is not None else ListeningSockets()
        self.role = role
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
            sock = self.sockets.tcp(self.role, self.requested_port)
        except BindError as e:
            raise StartupError(e.message) from None
        # TLS, when wanted, is inside the factory (it reads the ClientHello first).
        self.port = self.reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory)

    def stopService(self):
        super().stopService()
        if self.port is None:
            return None
        self.sockets.close(self.role)
        return defer.maybeDeferred(self.port.stopListening)


class ListeningSocket(appservice.Service):
    """A listening TCP socket on all interfaces that this process holds but never accepts on:
    the workers adopt it.  Opened in ``privilegedStartService`` (before a privilege drop)."""

    def __init__(
        self, port: int, sockets: ListeningSockets | None = None, role: str = "tcp"
    ) -> None:
        self.requested_port = port
        self.sockets = sockets if sockets is not None else ListeningSockets()
        self.role = role
        self.socket: socket.socket | None = None

    @property
    def family(self) -> int:
        return self.socket.family if self.socket is not None else socket.AF_INET6

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
        try:
            self.socket = self.sockets.tcp(self.role, self.requested_port)
        except BindError as e:
            raise StartupError(e.message) from None

    def stopService(self):
        super().stopService()
        # The workers hold their own copies; the port closes when the last one closes it.
        if self.socket is not None:
            self.sockets.close(self.role)
            self.socket = None


class DatagramSockets(appservice.Service):
    """``count`` UDP sockets on one port (``SO_REUSEPORT``), one per worker, for HTTP/3; opened
    in ``privilegedStartService`` and held by this process for the workers' lifetimes."""

    def __init__(self, port: int, count: int, sockets: ListeningSockets | None = None) -> None:
        self.requested_port = port
        self.count = count
        self.sockets = sockets if sockets is not None else ListeningSockets()
        self.opened = False

    def fileno(self, index: int) -> int:
        return self.sockets.get(f"udp.{index}").fileno()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open()

    def startService(self) -> None:
        super().startService()
        if not self.opened:
            self._open()

    def _open(self) -> None:
        try:
            for index in range(self.count):
                self.sockets.udp(f"udp.{index}", self.requested_port, reuse_port=True)
        except BindError as e:
            self._close()
            raise StartupError(e.message) from None
        self.opened = True

    def _close(self) -> None:
        for index in range(self.count):
            self.sockets.close(f"udp.{index}")
        self.opened = False

    def stopService(self):
        super().stopService()
        self._close()


class GracefulShutdown(appservice.Service):
    """Lets requests in flight finish for up to 10 seconds, then closes what is left.

    After an upgrade (``handover_drain`` set, in seconds) the bound is that one instead, and
    WebSocket tunnels and other open connections of ``ports`` are let run until it too: then
    they are closed cleanly (what was relayed is flushed, then FIN), not reset.
    """

    def __init__(self, reactor, tracker, sites, ports: Callable[[], list] = list) -> None:
        self.reactor = reactor
        self.tracker = tracker
        self.sites = sites
        self.ports = ports
        self.handover_drain: float | None = None

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self.drain(self.handover_drain))

    async def drain(self, handover_drain: float | None = None) -> None:
        deadline = SHUTDOWN_DEADLINE if handover_drain is None else handover_drain
        ends = self.reactor.seconds() + deadline
        had_connections = bool(open_connections(self.reactor, self.ports()))
        if had_connections:
            await deferLater(self.reactor, ACCEPT_GRACE, lambda: None)
        for site in self.sites:
            site.close_idle()
        finished = self.tracker.wait_idle()
        timer = self.reactor.callLater(max(ends - self.reactor.seconds(), 0), finished.cancel)
        try:
            await finished
        except defer.CancelledError:
            warn("Closing active connections")
            self.tracker.abort_all()
        finally:
            if timer.active():
                timer.cancel()
        if handover_drain is not None:
            await self._close_when_done(ends)
        if had_connections:
            # The reactor drops connections without flushing them once shutdown proceeds:
            # give the last responses a moment to leave the socket buffers.
            await deferLater(self.reactor, FLUSH_GRACE, lambda: None)

    async def _close_when_done(self, ends: float) -> None:
        """Let the connections still open (tunnels) run until ``ends``, then close them
        cleanly: what was relayed is flushed, then the client sees the end of the stream
        (a TLS close_notify over TLS).  A plain TCP connection is only half-closed, and read
        until the client closes its side, so that nothing it sends meanwhile turns the close
        into a reset.  Whatever is still open :data:`CLOSE_GRACE` later is aborted."""
        from twisted.internet.interfaces import ISSLTransport

        while True:
            left = open_connections(self.reactor, self.ports())
            if not left:
                return
            if self.reactor.seconds() >= ends:
                break
            await deferLater(self.reactor, 0.1, lambda: None)
        info("Closing connections at the end of the drain", count=len(left))
        for transport in left:
            if ISSLTransport.providedBy(transport.protocol):
                transport.protocol.loseConnection()
            else:
                transport.loseWriteConnection()
        closing_ends = self.reactor.seconds() + CLOSE_GRACE
        while left and self.reactor.seconds() < closing_ends:
            await deferLater(self.reactor, 0.05, lambda: None)
            left = open_connections(self.reactor, self.ports())
        for transport in left:
            transport.abortConnection()


def open_connections(reactor, ports: list) -> list:
    """The connections that ``ports`` accepted and that are still open (their transports)."""
    ports = [p for p in ports if p is not None]
    if not ports:
        return []
    found = {}
    for selectable in (*reactor.getReaders(), *reactor.getWriters()):
        if getattr(selectable, "server", None) in ports and getattr(selectable, "connected", 0):
            found[id(selectable)] = selectable
    return list(found.values())


class Announce(appservice.Service):
    """Logs ``Server started`` once the reactor runs.

    Process managers and tests take that line as "ready", and may send SIGTERM at once: the
    reactor installs its signal handlers as it starts running, so announcing any earlier would
    leave a window in which SIGTERM kills the process instead of stopping it gracefully.
    Under systemd (``Type=notify``) it also sends ``READY=1`` then.  A process started for an
    upgrade first tells the old one it serves, and announces once it has taken over.
    """

    def __init__(self, reactor, http, https, ready=None, successor=None) -> None:
        self.reactor = reactor
        self.http = http
        self.https = https
        # With workers: a callable giving a Deferred that fires once they all serve.
        self.ready = ready
        self.successor = successor

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._when_ready)

    def _when_ready(self) -> None:
        d = defer.succeed(None) if self.ready is None else self.ready()
        if self.successor is not None:
            d.addCallback(lambda _: self.successor.serving())
        d.addCallback(lambda _: self._announce())

    def _announce(self) -> None:
        if self.running:
            info("Server started", http=self.http.bound_port, https=self.https.bound_port)
            if self.successor is None:
                notify.notify("READY=1")


class UpgradeSignal(appservice.Service):
    """SIGUSR2 upgrades the server, as ``kamal-proxy upgrade`` does (for process managers)."""

    def __init__(self, reactor, upgrader) -> None:
        self.reactor = reactor
        self.upgrader = upgrader

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        import signal

        try:
            signal.signal(signal.SIGUSR2, self._received)
        except ValueError:  # not the main thread (a test's reactor): no signal
            pass

    def _received(self, signum, frame) -> None:
        self.reactor.callFromThread(self._upgrade)

    def _upgrade(self) -> None:
        if self.running:
            self.upgrader.on_signal()


class ProxyService(appservice.MultiService):
    """The whole server; ``Server stopped`` once every part has stopped."""

    #: Set when this process handed over to a new one (the new pid).
    handed_over_to: int | None = None

    def startService(self) -> None:
        super().startService()
        sockets = getattr(self, "sockets", None)
        if sockets is not None:
            # Handed-over sockets this configuration has no use for (fewer workers) close.
            sockets.close_unclaimed()

    @property
    def is_the_server(self) -> bool:
        """Not (or no longer, or not yet) a process of an upgrade that another one serves."""
        successor = getattr(self, "successor", None)
        taken_over = successor is None or successor.committed.called
        return taken_over and self.handed_over_to is None

    def stopService(self):
        upgrader = getattr(self, "upgrader", None)
        if upgrader is not None:
            upgrader.cancel()
        if self.is_the_server:
            notify.notify("STOPPING=1")
        d = defer.maybeDeferred(super().stopService)
        return d.addBoth(lambda _: self._stopped())

    def _stopped(self) -> None:
        sockets = getattr(self, "sockets", None)
        if sockets is not None:
            sockets.close_all()
        if self.handed_over_to is not None:
            info("Old process stopped", pid=os.getpid(), new_pid=self.handed_over_to)
        elif not self.is_the_server:
            info("New process stopped: the upgrade was called off", pid=os.getpid())
        else:
            info("Server stopped")


def upstream_pool(reactor, host: str, port: int):
    """A target's keep-alive connection pool: the proxy's, given to routing (which lies below
    the proxy and does not import it)."""
    from kamal_proxy.proxy.upstream import UpstreamPool

    return UpstreamPool(reactor, host, port)


def health_check(reactor, address: str, config, report):
    """A target's health check (``health.checker``), given to routing like the pool; it
    reports ``(ok, reason)`` so that a deploy can show why its targets are not healthy yet."""
    from kamal_proxy.health.checker import HealthCheck

    return HealthCheck(reactor, address, config, report)


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
        self.reactor = reactor
        self.tls = tls

    def http3(self, port: int, fd: int | Callable[[], int]) -> Any:
        """``--http3``: an ``Http3Listener`` on the UDP socket ``fd`` (as the listener takes
        it) at the HTTPS port, with the same certificates and pipeline; Alt-Svc on TCP."""
        from kamal_proxy.proxy.http3 import Http3Server
        from kamal_proxy.proxy.http3_bridge import Http3Bridge
        from kamal_proxy.proxy.http3_listener import Http3Listener

        self.https_site.advertise_http3(port)
        bridge = Http3Bridge(self.https_resource, port)
        server = Http3Server(self.reactor, self.tls.selector(), bridge)
        return Http3Listener(self.reactor, fd, server)


def load_deferred_modules() -> None:
    """Import what the server loads on first use (``run`` starts without it): for a process
    that may lose the right to read its Python installation (``twistd -u``)."""
    import codecs

    import OpenSSL.SSL  # noqa: F401  # TLS loads with the first handshake (tls/lazy.py)
    import twisted.internet.ssl  # noqa: F401
    import twisted.protocols.tls  # noqa: F401
    import twisted.web.client  # noqa: F401

    import kamal_proxy.health.checker  # noqa: F401
    import kamal_proxy.proxy.webrequest  # noqa: F401  # HTTP/2: twisted.web with h2
    import kamal_proxy.tls.certificates  # noqa: F401
    from kamal_proxy.tls.acme import load_libraries

    load_libraries()
    codecs.lookup("idna")  # host names are encoded with it (getaddrinfo)


def make_service(
    options: RunOptions, reactor=None, relaunch=None, preforked=None, sockets=None
) -> appservice.MultiService:
    """The server.  ``relaunch`` (``process/relaunch.py``) says how an upgrade starts it
    again; by default as this process was started (``kamal-proxy run``).  ``preforked`` are
    children forked to become the first workers (``process/prefork.py``); ``sockets`` those
    ``run`` bound before loading the server (``ListeningSockets.bound_early``)."""
    raise_open_files_limit()
    if reactor is None:
        from twisted.internet import reactor
    from kamal_proxy.process.handover import Successor
    from kamal_proxy.tls.certificates import TLS

    # Started by an upgrade: the sockets are inherited, the old process waits for our word.
    successor = Successor.from_environ(reactor)
    if successor is not None:
        sockets = successor.sockets
    elif sockets is None:
        sockets = ListeningSockets()

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
    top.sockets = sockets
    top.successor = successor

    if successor is not None:
        _Successor(reactor, successor).setServiceParent(top)
    RestoreState(router, options.state_path).setServiceParent(top)
    # After the restore (certificates of restored services are known), before the listeners.
    tls.acme.setServiceParent(top)
    if options.workers > 1:
        _main_process(options, reactor, top, preforked)
    else:
        _single_process(options, reactor, top)
    _add_upgrades(top, reactor, relaunch)
    return top


def _single_process(options: RunOptions, reactor, top: ProxyService) -> None:
    """``--workers 1``: this process serves the traffic itself."""
    router, tls, sockets = top.router, top.tls, top.sockets
    metrics = None
    if options.metrics_port:
        from kamal_proxy.observe.metrics import Metrics, MetricsService

        metrics = Metrics()
        MetricsService(reactor, options.metrics_port, metrics, sockets=sockets).setServiceParent(
            top
        )
    else:
        debug("Metrics server disabled")

    plane = DataPlane(reactor, router, tls, options.http_port, options.https_port, metrics)
    http = Listener(reactor, options.http_port, plane.http_site, sockets, "http")
    https = Listener(reactor, options.https_port, plane.https_factory, sockets, "https")
    # On stop, every service stops at once: the listeners close while this one closes idle
    # connections and waits for the requests in flight.
    shutdown = GracefulShutdown(
        reactor, plane.tracker, plane.sites, ports=lambda: [http.port, https.port]
    )
    shutdown.setServiceParent(top)
    top.drains = [shutdown]
    http.setServiceParent(top)
    https.setServiceParent(top)
    if options.http3:
        _add_http3(top, plane, options.https_port)
    top.control = ControlSocket(reactor, paths.socket_path(), router, sockets)
    top.control.setServiceParent(top)
    Announce(reactor, http, https, successor=top.successor).setServiceParent(top)


def _main_process(options: RunOptions, reactor, top: ProxyService, preforked=None) -> None:
    """The main process of ``--workers N``: ports, state, health, ACME, control, metrics;
    the workers serve."""
    from kamal_proxy.process.supervisor import WorkerPool

    sockets = top.sockets
    successor = top.successor
    http = ListeningSocket(options.http_port, sockets, "http")
    https = ListeningSocket(options.https_port, sockets, "https")
    # HTTP/3: one UDP socket per worker on the HTTPS port, kept here so that a replaced
    # worker gets the same one (and no other worker's connections move).
    udp = DatagramSockets(options.https_port, options.workers, sockets) if options.http3 else None
    pool = WorkerPool(
        reactor,
        options,
        top.router,
        top.tls,
        http,
        https,
        udp=udp,
        stderr=(lambda: successor.stderr_fd) if successor is not None else None,
        preforked=preforked,
    )
    top.workers = pool
    top.drains = [pool]
    if options.metrics_port:
        from kamal_proxy.observe.metrics import Metrics, MetricsService

        MetricsService(
            reactor,
            options.metrics_port,
            Metrics(),
            gather=pool.collect_metrics,
            sockets=sockets,
        ).setServiceParent(top)
    else:
        debug("Metrics server disabled")
    http.setServiceParent(top)
    https.setServiceParent(top)
    if udp is not None:
        udp.setServiceParent(top)
    pool.setServiceParent(top)
    top.control = ControlSocket(reactor, paths.socket_path(), top.router, sockets)
    top.control.setServiceParent(top)
    Announce(reactor, http, https, ready=pool.when_serving, successor=successor).setServiceParent(
        top
    )


def _add_http3(top, plane: DataPlane, port: int) -> None:
    """``--http3`` in the serving process: the listener opens its UDP socket at start."""
    sockets = top.sockets

    def open_udp() -> int:
        try:
            sock = sockets.udp("udp.0", port)
        except BindError as e:
            raise StartupError(e.message) from None
        return os.dup(sock.fileno())

    plane.http3(port, open_udp).setServiceParent(top)


class _Successor(appservice.Service):
    """A process started by an upgrade: the channel to the old process, the pid file check,
    and the control socket held until the commit."""

    def __init__(self, reactor, successor) -> None:
        self.reactor = reactor
        self.successor = successor

    def startService(self) -> None:
        super().startService()
        from kamal_proxy.process.pidfile import PidFileError

        try:
            self.successor.prepare()
        except PidFileError as e:
            raise StartupError(str(e)) from None
        self.successor.connect()
        pidfile = self.successor.pidfile
        if pidfile is not None:
            self.reactor.addSystemEventTrigger("after", "shutdown", pidfile.remove)


def _add_upgrades(top: ProxyService, reactor, relaunch) -> None:
    """``kamal-proxy upgrade`` and SIGUSR2 (``process/upgrade.py``)."""
    from kamal_proxy.process.relaunch import run_relaunch
    from kamal_proxy.process.upgrade import Upgrader

    if relaunch is None:
        relaunch = run_relaunch()
    successor = top.successor
    if successor is not None:
        # Whoever replaces this process moves the pid file on, as this one did.
        relaunch.pidfile = successor.pidfile
        top.control.deferred_accept = True
        top.control.owns_path = False
        successor.committed.addCallback(top.control.accept)

    def stop(drain: float) -> None:
        """Handed over: stop for good, letting what is in flight finish within ``drain``."""
        top.handed_over_to = upgrader.new.pid if upgrader.new is not None else None
        for service in top.drains:
            service.handover_drain = drain
        if reactor.running:
            reactor.stop()

    upgrader = Upgrader(
        reactor,
        control=top.control,
        router=top.router,
        acme=top.tls.acme,
        sockets=top.sockets,
        relaunch=relaunch,
        stop=stop,
    )
    top.upgrader = upgrader
    top.control.upgrader = upgrader
    UpgradeSignal(reactor, upgrader).setServiceParent(top)


def run_server(options: RunOptions, sockets: ListeningSockets | None = None) -> int:
    """``kamal-proxy run``: start, serve until SIGTERM/SIGINT, then exit the process (0);
    returns 1 if the server cannot start (after printing ``Error: <why>``)."""
    preforked = []
    if options.workers > 1:
        # Before anything installs the reactor: the first workers are forked children (with
        # the open-files limit a spawned worker would inherit).
        from kamal_proxy.process import prefork

        raise_open_files_limit()
        prefork.preload(http3=options.http3)
        preforked = prefork.fork_workers(options.workers)

    from twisted.internet import reactor

    from kamal_proxy.observe.log import start_logging

    log = start_logging(debug=options.debug)
    log.batch_flushes(reactor.callLater)
    try:
        top = make_service(options, reactor, preforked=preforked, sockets=sockets)
        top.privilegedStartService()
        top.startService()
    except StartupError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    log.flush()
    # Everything is stopped and written: skip the interpreter's teardown (a quarter of a
    # second of freeing what the process is about to lose anyway), as a worker does.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


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
