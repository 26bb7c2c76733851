"""A worker process: the data plane on the main process's listening sockets.

Started by the main process (``process/supervisor.py``) as
``python -m kamal_proxy.process.worker CONFIG`` with the HTTP and HTTPS listening sockets on
fds 3 and 4 and its end of an AMP socketpair on fd 5.  It serves exactly what a single
process serves (the same sites, pipeline, TLS selection, error pages, request log lines), but
from a :class:`~kamal_proxy.routing.replica.RouterReplica` that the main process keeps up to
date, and it asks the main process for certificates it lacks.

It adopts the sockets only once the first routing snapshot is applied (``StartServing``), so
it never answers from an empty table.  It stops gracefully (stop accepting, let requests in
flight finish for up to 10 seconds) on ``Shutdown``, on SIGTERM/SIGINT, and when the main
process goes away.
"""

from __future__ import annotations

# First of all: Twisted's TCP and AMP modules then load without pyOpenSSL (kamal_proxy.tls.lazy).
import kamal_proxy.tls.lazy  # noqa: F401

# isort: split

import ctypes
import json
import os
import signal
import sys
from typing import Any

from twisted.internet import defer, protocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from kamal_proxy.app import DataPlane, GracefulShutdown, setup_service, upstream_pool
from kamal_proxy.observe.events import debug
from kamal_proxy.process import commands
from kamal_proxy.process.certificates import WorkerTLS
from kamal_proxy.process.supervisor import CONTROL_FD, HTTP_FD, HTTPS_FD, TURNS_FD, UDP_FD
from kamal_proxy.routing.replica import RouterReplica
from kamal_proxy.routing.turns import SharedTurns

#: At most this long for the last answers to leave before the reactor stops.
EXIT_GRACE = 0.05


class Worker:
    """Everything one worker runs: the routing copy, TLS, metrics, the sites, the ports."""

    def __init__(self, reactor: Any, config: dict[str, Any]) -> None:
        self.reactor = reactor
        self.config = config
        self.connection: WorkerConnection | None = None
        turns = SharedTurns(TURNS_FD) if config.get("turns", True) else None
        self.router = RouterReplica(
            reactor, upstream_pool, service_setup=lambda s: setup_service(s, self.tls), turns=turns
        )
        self.tls = WorkerTLS(
            reactor,
            self.router,
            self.obtain_certificate,
            acme_directory=config.get("acme_directory", ""),
            http_port=config["http_port"],
        )
        self.metrics = None
        if config.get("metrics"):
            from kamal_proxy.observe.metrics import Metrics  # prometheus_client, twisted.web

            self.metrics = Metrics()
        self.plane = DataPlane(
            reactor,
            self.router,
            self.tls,
            config["http_port"],
            config["https_port"],
            self.metrics,
        )
        self.ports: list[Any] = []
        self.fds = {HTTP_FD: self.plane.http_site, HTTPS_FD: self.plane.https_factory}
        # HTTP/3 on this worker's inherited UDP socket.
        self.http3 = self.plane.http3(config["https_port"], UDP_FD) if config.get("http3") else None
        self._stopping: defer.Deferred | None = None
        self._stopped = False
        self._stop_waiters: list[defer.Deferred] = []

    # -- start ---------------------------------------------------------------------------------

    def connect(self, fd: int = CONTROL_FD) -> None:
        """Speak AMP with the main process over the inherited socketpair end."""
        import socket

        connection = WorkerConnection(self)
        self.connection = connection
        self.reactor.adoptStreamConnection(
            fd, socket.AF_UNIX, protocol.Factory.forProtocol(lambda: connection)
        )
        os.close(fd)

    def serve(self) -> None:
        """Adopt the listening sockets (the inherited descriptors are closed after)."""
        if self.ports or self._stopping is not None:
            return
        family = self.config.get("family", 10)
        for fd, factory in self.fds.items():
            self.ports.append(self.reactor.adoptStreamPort(fd, family, factory))
            os.close(fd)
        if self.http3 is not None:
            self.http3.startService()
        debug("Worker serving", pid=os.getpid())

    # -- stop ----------------------------------------------------------------------------------

    def stop(self, handover_drain: float | None = None) -> defer.Deferred:
        """Stop accepting, let requests in flight finish (10 s at most; after an upgrade
        ``handover_drain`` seconds, WebSocket tunnels included); once only."""
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop(handover_drain))
            self._stopping.addBoth(self._done_stopping)
        if self._stopped:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._stop_waiters.append(d)
        return d

    def _done_stopping(self, _result: object) -> None:
        self._stopped = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    async def _stop(self, handover_drain: float | None) -> None:
        ports, self.ports = self.ports, []
        await defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True
        )
        shutdown = GracefulShutdown(
            self.reactor, self.plane.tracker, self.plane.sites, ports=lambda: ports
        )
        drains = [defer.ensureDeferred(shutdown.drain(handover_drain))]
        if self.http3 is not None and self.http3.running:
            drains.append(defer.maybeDeferred(self.http3.stopService))
        await defer.gatherResults(drains, consumeErrors=True)

    def exit(self) -> None:
        """Stop (gracefully) and end the process: once the connection to the main process is
        closed (which writes out the last answers first), or EXIT_GRACE after the stop."""
        self.stop().addBoth(lambda _: self._leave())

    def _leave(self) -> None:
        connection = self.connection
        if connection is not None and connection.connected and connection.transport:
            connection.transport.loseConnection()  # connectionLost calls exit() again
            self.reactor.callLater(EXIT_GRACE, self._stop_reactor)
        else:
            self._stop_reactor()

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    # -- asking the main process ---------------------------------------------------------------

    def obtain_certificate(self, issuer: str, name: str) -> defer.Deferred:
        if self.connection is None or not self.connection.connected:
            return defer.fail(commands.WorkerError("the main process is gone"))
        d = self.connection.callRemote(commands.ObtainCertificate, issuer=issuer, name=name)
        return d.addCallback(lambda answer: answer["pem"])


class WorkerConnection(amp.AMP):
    """The worker's end of the socketpair: applies what the main process sends."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker
        self.connected = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connected = True

    def connectionLost(self, reason: Failure) -> None:
        self.connected = False
        super().connectionLost(reason)
        # The main process is gone (or replaced): finish what is in flight, then leave.
        self.worker.exit()

    @commands.ApplyRoutes.responder
    def apply_routes(self, change: str):
        self.worker.router.apply(json.loads(change))
        return {}

    @commands.TargetHealth.responder
    def target_health(self, balancer: int, target: int, state: str):
        self.worker.router.health(balancer, target, state)
        return {}

    @commands.DrainBalancers.responder
    def drain_balancers(self, balancers: list[int], timeout: int):
        return self.worker.router.drain(list(balancers), timeout).addCallback(lambda _: {})

    @commands.RetireBalancers.responder
    def retire_balancers(self, balancers: list[int]):
        self.worker.router.retire(list(balancers))
        return {}

    @commands.AcmeChallenge.responder
    def acme_challenge(self, issuer: str, name: str, token: str, validation: str):
        self.worker.tls.copy(issuer).challenge(name, token, validation)
        return {}

    @commands.AcmeChallengeDone.responder
    def acme_challenge_done(self, issuer: str, token: str):
        self.worker.tls.copy(issuer).challenge_done(token)
        return {}

    @commands.CertificateIssued.responder
    def certificate_issued(self, issuer: str, name: str, pem: str):
        self.worker.tls.copy(issuer).issued(name, pem)
        return {}

    @commands.StartServing.responder
    def start_serving(self):
        try:
            self.worker.serve()
        except Exception as e:  # noqa: BLE001 - reported to the main process, which logs it
            raise commands.WorkerError(f"unable to serve: {e}") from None
        return {}

    @commands.CollectMetrics.responder
    def collect_metrics(self):
        metrics = self.worker.metrics
        return {"metrics": json.dumps(metrics.snapshot() if metrics is not None else {})}

    @commands.Shutdown.responder
    def shutdown(self, drain_timeout=None):
        d = self.worker.stop(None if drain_timeout is None else drain_timeout / 1e9)
        # The answer is written first; exit() closes the connection after it, then stops.
        d.addCallback(lambda _: self.worker.reactor.callLater(0, self.worker.exit))
        return d.addCallback(lambda _: {})


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a graceful stop) when the main process dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    config = json.loads(argv[1])
    from twisted.internet import reactor

    from kamal_proxy.observe.log import start_logging

    log = start_logging(debug=config.get("debug", False))
    log.batch_flushes(reactor.callLater)
    _die_with_parent(config.get("parent", 0))
    worker = Worker(reactor, config)
    worker.connect()
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
    reactor.run()
    log.flush()
    sys.stderr.flush()
    # Everything is answered and written: skip the interpreter's teardown, which only delays
    # the moment the main process sees this worker gone (and so the server's exit).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
