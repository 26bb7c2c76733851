"""The main process's side of the workers: spawn them, keep them in step, replace the dead.

:class:`WorkerPool` is the Router's ``replicas`` (``routing/replication.py``) and the ACME
issuers' ``events`` (``tls/acme.py``): every routing change, health change, drain, http-01
token and new certificate goes to every live worker, and a change is acknowledged only when
all of them applied it.  A worker that dies is logged and replaced at once; the new one gets
a snapshot of the state (and the tokens out) before it accepts a connection.  A worker that
stops answering is killed, which makes it a dead worker (and the same recovery applies).

Each worker is ``python -m kamal_proxy.process.worker CONFIG`` with the listening sockets on
fds 3 and 4, one end of a socketpair on fd 5, where this side speaks AMP
(``process/commands.py``), the shared round-robin positions on fd 6 (``routing/turns.py``)
and, with ``--http3``, its own UDP socket on fd 7 (the same one for its replacement).  Stdout
and stderr are this process's own: request lines are written whole (``observe/log.py``), so
they never interleave.  Under twistd's text log (whose file a worker cannot share, and a
daemon's stdout is ``/dev/null``) they are pipes instead, and each line a worker writes is
relayed to that log by this process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from twisted.application import service as appservice
from twisted.internet import defer, error, protocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from kamal_proxy.observe import log
from kamal_proxy.observe.events import error as log_error
from kamal_proxy.observe.events import info, warn
from kamal_proxy.process import commands
from kamal_proxy.process.notify import without_notify
from kamal_proxy.routing.replication import routing_change, routing_snapshot
from kamal_proxy.routing.turns import SharedTurns, TurnSlots
from kamal_proxy.startup import StartupError

HTTP_FD, HTTPS_FD, CONTROL_FD, TURNS_FD, UDP_FD = 3, 4, 5, 6, 7
#: How long a worker may take to apply a change before it is replaced.
APPLY_TIMEOUT = 30.0
#: Extra time a worker may take beyond a drain's own timeout.
DRAIN_GRACE = 10.0
#: How long a scrape waits for a worker's metrics (then its last ones count).
METRICS_TIMEOUT = 2.0
#: A worker's own graceful stop takes at most 10 s (app.SHUTDOWN_DEADLINE); then it is killed.
STOP_TIMEOUT = 15.0
#: A worker that dies sooner than this after starting is replaced after a growing delay.
CRASH_WINDOW = 1.0
MAX_RESPAWN_DELAY = 5.0

_LOST = (error.ConnectionDone, error.ConnectionLost, amp.ProtocolSwitched)


class Worker:
    """One worker process as the main process sees it."""

    def __init__(self, index: int, started: float) -> None:
        self.index = index
        self.started = started
        self.pid: int | None = None
        self.process: Any = None
        self.connection: MainConnection | None = None
        self.serving = False
        self.exited = False
        #: Its last metrics, kept so a dead worker's counts still add up.
        self.metrics: dict[str, Any] | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.connected and not self.exited


class MainConnection(amp.AMP):
    """The main process's end of one worker's socketpair."""

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        super().__init__()
        self.pool = pool
        self.worker = worker
        self.connected = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connected = True

    def connectionLost(self, reason: Failure) -> None:
        self.connected = False
        super().connectionLost(reason)

    @commands.ObtainCertificate.responder
    def obtain_certificate(self, issuer: str, name: str):
        return defer.ensureDeferred(self.pool.obtain_certificate(issuer, name))


class WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self._partial = {1: b"", 2: b""}

    # With relayed output only: the worker's stdout (JSON lines) and stderr, line by line.

    def outReceived(self, data: bytes) -> None:
        self._lines(1, data)

    def errReceived(self, data: bytes) -> None:
        self._lines(2, data)

    def _lines(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        for line in lines:
            self._relay(fd, line)

    def _relay(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if fd == 1:
            log.relay(text)
        elif text.strip():
            log_error("Worker error output", worker=self.worker.index, text=text)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._relay(fd, rest)
        self._partial = {1: b"", 2: b""}
        self.pool._ended(self.worker, reason)


class WorkerPool(appservice.Service):
    """``count`` workers serving the listening sockets ``http`` and ``https``."""

    def __init__(
        self,
        reactor: Any,
        options: Any,
        router: Any,
        tls: Any,
        http: Any,
        https: Any,
        argv: list[str] | None = None,
        udp: Any = None,
        stderr: Any = None,
        preforked: list[Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.count = options.workers
        self.router = router
        self.tls = tls
        self.http = http
        self.https = https
        # HTTP/3: the UDP socket of each worker index (``app.DatagramSockets``), or None.
        self.udp = udp
        # The descriptor workers write errors to (a process started by an upgrade has the
        # server's real stderr elsewhere until it takes over): a callable, or None for 2.
        self.stderr = stderr
        #: Set when this main process handed over (seconds): how long workers may drain.
        self.handover_drain: float | None = None
        #: Children forked before the reactor started (``process/prefork.py``): the first
        #: workers become those instead of new interpreters.
        self.preforked = list(preforked or ())
        self.config = {
            "http_port": options.http_port,
            "https_port": options.https_port,
            "metrics": bool(options.metrics_port),
            "debug": options.debug,
            "acme_directory": options.acme_directory,
            "parent": os.getpid(),
            "http3": udp is not None,
        }
        self.slots = TurnSlots(SharedTurns.create())
        self.argv = argv or [sys.executable, "-m", "kamal_proxy.process.worker"]
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self._crashes: dict[int, int] = {}
        self._ready: defer.Deferred[None] = defer.Deferred()
        self._ready_waiters: list[defer.Deferred] = []
        #: Counts of workers that are gone (their gauges are not kept); made on first use, as
        #: the metrics libraries are loaded only when metrics are on.
        self._departed_metrics: Any = None
        #: http-01 tokens out: (issuer key, token) -> (name, key authorization)
        self._challenges: dict[tuple[str, str], tuple[str, str]] = {}
        router.replicas = self
        tls.acme.set_events(self)

    @property
    def _departed(self) -> Any:
        if self._departed_metrics is None:
            from kamal_proxy.observe.metrics import Metrics

            self._departed_metrics = Metrics(process=False)
        return self._departed_metrics

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.config["parent"] = os.getpid()
        for index in range(self.count):
            try:
                self._spawn(index)
            except OSError as e:
                raise StartupError(f"start worker: {e}") from None

    def when_serving(self) -> defer.Deferred[None]:
        """Fires once every worker of the first generation serves."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._ready.called:
            d.callback(None)
        else:
            self._ready_waiters.append(d)
        return d

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.stopping = True
        for child in self.preforked:
            child.discard()
        self.preforked = []
        workers = [w for w in self.workers.values() if not w.exited]
        arguments = {}
        stop_timeout = STOP_TIMEOUT
        if self.handover_drain is not None:
            arguments["drain_timeout"] = int(self.handover_drain * 1e9)
            stop_timeout = max(STOP_TIMEOUT, self.handover_drain + DRAIN_GRACE)
        for worker in workers:
            if worker.connected:
                d = worker.connection.callRemote(commands.Shutdown, **arguments)
                d.addErrback(lambda _: None)
            else:
                self._signal(worker, "TERM")
        done = defer.DeferredList([w.ended for w in workers], consumeErrors=True)
        timer = self.reactor.callLater(stop_timeout, self._kill_all, workers)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()

        return done.addCallback(finished)

    def _kill_all(self, workers: list[Worker]) -> None:
        for worker in workers:
            if not worker.exited:
                warn("Worker did not stop in time; killing it", pid=worker.pid)
                self._signal(worker, "KILL")

    def _signal(self, worker: Worker, name: str) -> None:
        try:
            worker.process.signalProcess(name)
        except (error.ProcessExitedAlready, OSError, AttributeError):
            pass

    # -- spawning ----------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        worker = Worker(index, self.reactor.seconds())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stdin = os.open(os.devnull, os.O_RDONLY)
        relayed = getattr(log.active(), "relays_workers", False)
        fds = {
            0: stdin,
            1: "r" if relayed else 1,
            2: "r" if relayed else self.stderr() if self.stderr is not None else 2,
            HTTP_FD: self.http.fileno(),
            HTTPS_FD: self.https.fileno(),
            CONTROL_FD: theirs.fileno(),
            TURNS_FD: self.slots.turns.fd,
        }
        if self.udp is not None:
            fds[UDP_FD] = self.udp.fileno(index)
        # The address family of the sockets, known once they are open (not at construction).
        config = {**self.config, "index": index, "family": int(self.http.family)}
        try:
            worker.process = None
            # A forked child takes descriptors only (not pipes to read, as under twistd).
            while self.preforked and worker.process is None and not relayed:
                worker.process = self._start_preforked(worker, config, fds)
            if worker.process is None:
                worker.process = self.reactor.spawnProcess(
                    WorkerProcess(self, worker),
                    self.argv[0],
                    [*self.argv, json.dumps(config)],
                    env=without_notify(os.environ),
                    childFDs=fds,
                )
        except BaseException:
            ours.close()
            raise
        finally:
            os.close(stdin)
            theirs.close()
        worker.pid = worker.process.pid
        connection = MainConnection(self, worker)
        worker.connection = connection
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, protocol.Factory.forProtocol(lambda: connection)
        )
        ours.close()
        self.workers[index] = worker
        info("Worker started", worker=index, pid=worker.pid)
        # Queued before any later change: the worker applies them in this order.
        first = self._call(
            worker,
            commands.ApplyRoutes,
            APPLY_TIMEOUT,
            change=json.dumps(routing_snapshot(self.router, self.slots.slot_for)),
        )
        for (key, token), (name, validation) in self._challenges.items():
            self._call(
                worker,
                commands.AcmeChallenge,
                APPLY_TIMEOUT,
                issuer=key,
                name=name,
                token=token,
                validation=validation,
            )
        first.addCallback(lambda _: self._call(worker, commands.StartServing, APPLY_TIMEOUT))
        first.addCallback(lambda _: self._serving(worker))

    def _start_preforked(self, worker: Worker, config: dict[str, Any], fds: dict[int, int]) -> Any:
        """Give a forked child what a spawned worker inherits; it becomes the worker."""
        from kamal_proxy.process.prefork import PreforkedProcess

        child = self.preforked.pop(0)
        try:
            # The child keeps the stdin it forked with.
            child.start(config, {fd: target for fd, target in fds.items() if fd != 0})
        except OSError as e:  # it is gone (killed while it waited): spawn one instead
            child.discard()
            warn(
                "Forked worker gone, spawning one", worker=worker.index, pid=child.pid, error=str(e)
            )
            return None
        return PreforkedProcess(child.pid, WorkerProcess(self, worker))

    def _serving(self, worker: Worker) -> None:
        if worker.exited:
            return
        worker.serving = True
        info("Worker serving", worker=worker.index, pid=worker.pid)
        if (
            not self._ready.called
            and all(w.serving for w in self.workers.values())
            and len(self.workers) == self.count
        ):
            self._ready.callback(None)
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(None)

    def _ended(self, worker: Worker, reason: Failure) -> None:
        worker.exited = True
        if worker.metrics is not None:
            self._departed.add(worker.metrics, gauges=False)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if worker.connection is not None and worker.connection.transport is not None:
            worker.connection.transport.loseConnection()
        worker.ended.callback(None)
        if self.stopping or not self.running:
            return
        value = reason.value
        log_error(
            "Worker exited",
            worker=worker.index,
            pid=worker.pid,
            status=getattr(value, "exitCode", None),
            signal=getattr(value, "signal", None),
        )
        lived = self.reactor.seconds() - worker.started
        crashes = self._crashes[worker.index] = (
            self._crashes.get(worker.index, 0) + 1 if lived < CRASH_WINDOW else 0
        )
        delay = 0.0 if crashes == 0 else min(0.1 * 2 ** (crashes - 1), MAX_RESPAWN_DELAY)
        self.reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and not self.stopping and index not in self.workers:
            try:
                self._spawn(index)
            except OSError as e:
                log_error("Unable to start worker", worker=index, error=str(e))
                self.reactor.callLater(MAX_RESPAWN_DELAY, self._respawn, index)

    # -- talking to workers ------------------------------------------------------------------

    def _call(self, worker: Worker, command: type, deadline: float | None, **arguments: Any):
        """``callRemote`` on one worker; a lost worker counts as done (its replacement starts
        from a snapshot), one that does not answer within ``deadline`` seconds is killed (and
        replaced)."""
        if not worker.connected:
            return defer.succeed(None)
        d = worker.connection.callRemote(command, **arguments)
        if d is None:
            return defer.succeed(None)
        if deadline is not None:
            d.addTimeout(deadline, self.reactor)

        def failed(failure: Failure) -> None:
            if failure.check(*_LOST) or worker.exited:
                return None
            if failure.check(defer.TimeoutError):
                log_error(
                    "Worker not answering; replacing it",
                    worker=worker.index,
                    pid=worker.pid,
                    command=command.__name__,
                )
                self._signal(worker, "KILL")
                return None
            return failure

        return d.addErrback(failed)

    def _broadcast(self, command: type, deadline: float | None, **arguments: Any) -> defer.Deferred:
        calls = [
            self._call(w, command, deadline, **arguments)
            for w in list(self.workers.values())
            if w.connected
        ]
        return defer.gatherResults(calls, consumeErrors=True).addCallback(lambda _: None)

    # -- Replicas (the Router's hook) --------------------------------------------------------

    def publish(self, router: Any, names: list[str], removed: list[str]) -> defer.Deferred:
        change = json.dumps(routing_change(router, names, removed, self.slots.slot_for))
        return self._broadcast(commands.ApplyRoutes, APPLY_TIMEOUT, change=change)

    def drain(self, balancers: list[Any], drain_timeout: int) -> defer.Deferred:
        return self._broadcast(
            commands.DrainBalancers,
            max(drain_timeout, 0) / 1e9 + DRAIN_GRACE,
            balancers=[lb.id for lb in balancers],
            timeout=drain_timeout,
        )

    def retire(self, balancers: list[Any]) -> None:
        for lb in balancers:
            self.slots.free(lb)
        self._broadcast(commands.RetireBalancers, None, balancers=[lb.id for lb in balancers])

    def health(self, balancer: Any, target: Any) -> defer.Deferred:
        return self._broadcast(
            commands.TargetHealth,
            APPLY_TIMEOUT,
            balancer=balancer.id,
            target=balancer.targets.index(target),
            state=target.state.value,
        )

    # -- IssuerEvents (the ACME issuers' hook) -----------------------------------------------

    def challenge(self, issuer: Any, name: str, token: str, validation: str) -> defer.Deferred:
        self._challenges[(issuer.key, token)] = (name, validation)
        return self._broadcast(
            commands.AcmeChallenge,
            APPLY_TIMEOUT,
            issuer=issuer.key,
            name=name,
            token=token,
            validation=validation,
        )

    def challenge_done(self, issuer: Any, token: str) -> None:
        self._challenges.pop((issuer.key, token), None)
        self._broadcast(commands.AcmeChallengeDone, None, issuer=issuer.key, token=token)

    def issued(self, issuer: Any, name: str, entry: Any) -> None:
        pem = entry.to_pem().decode("ascii")
        self._broadcast(commands.CertificateIssued, None, issuer=issuer.key, name=name, pem=pem)

    async def obtain_certificate(self, key: str, name: str) -> dict[str, str]:
        """A worker needs the certificate of ``name``: issue it (or find it) here."""
        from kamal_proxy.tls.acme import AcmeError
        from kamal_proxy.tls.certificates import AcmeCertificates

        issuer = self.tls.acme.find_issuer(key)
        if issuer is None:
            raise commands.WorkerError(f"unknown ACME issuer {key}")
        entry = issuer.cached(name)
        if entry is None or self.reactor.seconds() >= entry.not_after:
            try:
                entry = await issuer.obtain(name)
            except AcmeError as e:
                raise commands.WorkerError(str(e)) from None
        # On-demand names are renewed for the services that allowed them (as in one process).
        for service in list(self.router.services.values()):
            certificates = service.certificates
            if (
                isinstance(certificates, AcmeCertificates)
                and certificates.on_demand is not None
                and certificates.issuer is issuer
            ):
                certificates.names.add(name)
        return {"pem": entry.to_pem().decode("ascii")}

    # -- metrics -------------------------------------------------------------------------------

    def collect_metrics(self) -> defer.Deferred[list[dict[str, Any]]]:
        """Every worker's metrics now (a silent one's last), plus the counts of the dead."""
        workers = [w for w in self.workers.values() if w.connected]

        def one(worker: Worker) -> defer.Deferred:
            d = worker.connection.callRemote(commands.CollectMetrics)
            d.addTimeout(METRICS_TIMEOUT, self.reactor)

            def got(answer: dict[str, str]) -> dict[str, Any]:
                worker.metrics = json.loads(answer["metrics"])
                return worker.metrics

            return d.addCallbacks(got, lambda _: worker.metrics or {})

        d = defer.gatherResults([one(w) for w in workers], consumeErrors=True)
        return d.addCallback(lambda found: [self._departed.snapshot(), *found])
