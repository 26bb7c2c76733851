"""One upstream address: its health state, its requests in flight, its pool, its drain.

Routing sits below the proxy and the health checks (DESIGN §2), so a target is given how to
make its connection pool and its health check (``app`` wires the proxy's pool and
``health.checker``); tests give fakes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTCP, IReactorTime

from kamal_proxy.observe.events import info
from kamal_proxy.service_options import HealthCheckConfig, TargetOptions, validate_target_address


class TargetState(enum.Enum):
    ADDING = "adding"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class InFlight(Protocol):
    """A request being served by a target, as the drain sees it."""

    is_upgraded: bool

    def cancel_for_drain(self) -> None:
        """Answer 504 if the response has not started, else cut the connection."""


class HealthChecker(Protocol):
    """What a target needs of its health check (``health.checker.HealthCheck``)."""

    def start(self) -> None:
        """Check now, then every interval, reporting each result."""

    def close(self) -> None:
        """Stop checking; a check in flight is dropped and reports nothing."""


#: ``(reactor, address, config, report)`` -> a health check that calls ``report(ok, reason)``
#: after every check: ``ok`` tells whether it passed, ``reason`` why it failed (or None).
HealthCheckFactory = Callable[
    [Any, str, HealthCheckConfig, Callable[[bool, "str | None"], None]], HealthChecker
]
#: ``(reactor, host, port)`` -> the target's upstream connection pool (it has ``close()``).
PoolFactory = Callable[[Any, str, int], Any]


def _log_health(address: str, new: TargetState, was: TargetState) -> None:
    info("Target health updated", target=address, state=new.value, was=was.value)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, 80
    return host, int(port)


class Target:
    """An upstream ``host[:port]``.  Every deploy makes new objects, even for the same address,
    so the old object can drain while the new one is health checked."""

    def __init__(
        self,
        reactor: IReactorTime | IReactorTCP,
        address: str,
        options: TargetOptions,
        pool_factory: PoolFactory,
        health_check_factory: HealthCheckFactory | None = None,
    ) -> None:
        validate_target_address(address)
        self.reactor = reactor
        self.address = address
        self.options = options
        self.host, self.port = split_address(address)
        self.state = TargetState.ADDING
        self.draining = False
        self.inflight: set[InFlight] = set()
        self._idle_waiters: list[tuple[set[InFlight], defer.Deferred]] = []
        self._health_check_factory = health_check_factory
        self._check: HealthChecker | None = None
        #: Told of every health check's outcome, ``(target, reason)`` with ``reason`` None
        #: when it passed (a deploy showing its progress listens while it waits).
        self.on_check: Callable[[Target, str | None], None] | None = None
        self.on_state_change: Callable[[Target], None] | None = None
        #: Told of a health change first; a Deferred it returns (the worker processes applying
        #: the change) delays the log line until the change is in effect everywhere.
        self.before_state_change: Callable[[Target], defer.Deferred | None] | None = None
        self.pool = pool_factory(reactor, self.host, self.port)
        self.response_timeout = options.response_timeout / 1e9 if options.response_timeout else None

    def __repr__(self) -> str:
        return f"<Target {self.address} {self.state.value}{' draining' if self.draining else ''}>"

    # -- health -----------------------------------------------------------

    def start_health_checks(self) -> None:
        """Start checking, with the health check factory given (none: a copy of another
        process's target, whose health that process tells)."""
        if self._check is None and self._health_check_factory is not None:
            self._check = self._health_check_factory(
                self.reactor, self.address, self.options.health_check_config, self.report_health
            )
            self._check.start()

    def stop_health_checks(self) -> None:
        if self._check is not None:
            self._check.close()
            self._check = None

    @property
    def health_checking(self) -> bool:
        return self._check is not None

    def report_health(self, ok: bool, reason: str | None = None) -> None:
        """Apply one check result through the state machine of SPEC §12.2; ``reason`` says
        why a check failed."""
        if self.on_check is not None:
            self.on_check(self, None if ok else reason or "unhealthy")
        was = self.state
        if ok:
            new = TargetState.HEALTHY
        elif was is TargetState.HEALTHY:
            new = TargetState.UNHEALTHY
        else:
            new = was
        if new is was:
            return
        self.state = new
        applied = self.before_state_change(self) if self.before_state_change is not None else None
        if applied is None:
            _log_health(self.address, new, was)
        else:
            applied.addBoth(lambda _: _log_health(self.address, new, was))
        if self.on_state_change is not None:
            self.on_state_change(self)

    def mark_healthy(self) -> None:
        """Restored targets are trusted at once (SPEC §15.3)."""
        self.report_health(True)

    # -- requests in flight -----------------------------------------------

    def start_request(self, request: InFlight) -> None:
        self.inflight.add(request)

    def end_request(self, request: InFlight) -> None:
        self.inflight.discard(request)
        if self._idle_waiters:
            still, idle = [], []
            for snapshot, d in self._idle_waiters:
                snapshot.discard(request)
                (still if snapshot else idle).append((snapshot, d))
            # Fire only after the list is updated: a callback may start another drain.
            self._idle_waiters = still
            for _, d in idle:
                d.callback(None)

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Let the requests in flight now finish, for at most ``timeout`` seconds (SPEC §13.2)."""
        if self.draining:
            return defer.succeed(None)
        self.draining = True
        snapshot = set(self.inflight)
        for request in list(snapshot):
            if request.is_upgraded:
                snapshot.discard(request)
                request.cancel_for_drain()
        snapshot &= self.inflight
        if not snapshot:
            self.draining = False
            return defer.succeed(None)

        done: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append((snapshot, done))
        timer = self.reactor.callLater(max(timeout, 0), done.cancel)

        def finish(result: object) -> None:
            if timer.active():
                timer.cancel()
            self._idle_waiters = [(s, d) for s, d in self._idle_waiters if d is not done]
            for request in list(snapshot):
                if request in self.inflight:
                    request.cancel_for_drain()
            self.draining = False

        done.addBoth(finish)
        return done

    def retire(self) -> None:
        """The target will never be used again: stop checks and close idle upstream connections."""
        self.stop_health_checks()
        self.pool.close()
