"""One upstream address: its health state, its requests in flight, its pool, its drain."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTCP, IReactorTime

from kamal_proxy.health.checker import HealthCheck
from kamal_proxy.observe.events import info
from kamal_proxy.routing.options import TargetOptions, validate_target_address


class TargetState(enum.Enum):
    ADDING = "adding"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class InFlight(Protocol):
    """A request being served by a target, as the drain sees it."""

    is_upgraded: bool

    def cancel_for_drain(self) -> None:
        """Answer 504 if the response has not started, else cut the connection."""


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
        pool_factory: Callable[[object, str, int], object] | None = None,
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
        self._check: HealthCheck | None = None
        self.on_state_change: Callable[[Target], None] | None = None
        #: Told of a health change first; a Deferred it returns (the worker processes applying
        #: the change) delays the log line until the change is in effect everywhere.
        self.before_state_change: Callable[[Target], defer.Deferred | None] | None = None
        if pool_factory is None:
            from kamal_proxy.proxy.upstream import UpstreamPool as pool_factory
        self.pool = pool_factory(reactor, self.host, self.port)
        self.response_timeout = options.response_timeout / 1e9 if options.response_timeout else None

    def __repr__(self) -> str:
        return f"<Target {self.address} {self.state.value}{' draining' if self.draining else ''}>"

    # -- health -----------------------------------------------------------

    def start_health_checks(self) -> None:
        if self._check is None:
            self._check = HealthCheck(
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

    def report_health(self, ok: bool) -> None:
        """Apply one check result through the state machine of SPEC §12.2."""
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
