"""Round robin over healthy writers and readers (SPEC §8.2, §12.2)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from kamal_proxy.routing.target import Target, TargetState

_ids = itertools.count(1)


class LoadBalancer:
    """The targets of one deploy.  Healthy lists are recomputed on every health change, so
    choosing a target is two list lookups and a counter.

    ``id`` names this deploy's balancer across processes: the workers' copies carry the id
    of the main process's balancer, so "drain balancer 7" means the same targets everywhere.
    """

    def __init__(
        self,
        writers: list[Target],
        readers: list[Target],
        writer_affinity_timeout: int = 0,
        read_targets_accept_websockets: bool = False,
        balancer_id: int | None = None,
    ) -> None:
        self.id = next(_ids) if balancer_id is None else balancer_id
        #: Called with (balancer, target) when a target's health changes (replication); a
        #: Deferred it returns (the workers applying it) delays the target's log line.
        self.on_health_change: Callable[[LoadBalancer, Target], defer.Deferred | None] | None = None
        self.writers = writers
        self.readers = readers
        self.targets = writers + readers
        self.writer_affinity_timeout = writer_affinity_timeout
        self.read_targets_accept_websockets = read_targets_accept_websockets
        self._writer_index = 0
        self._reader_index = 0
        self.healthy_writers: list[Target] = []
        self.healthy_readers: list[Target] = []
        self._became_healthy: defer.Deferred[None] = defer.Deferred()
        for target in self.targets:
            target.before_state_change = self._tell_health
            target.on_state_change = self._target_changed

    @property
    def writer_addresses(self) -> list[str]:
        return [t.address for t in self.writers]

    @property
    def reader_addresses(self) -> list[str]:
        return [t.address for t in self.readers]

    @property
    def has_readers(self) -> bool:
        return bool(self.readers)

    def start(self) -> None:
        for target in self.targets:
            target.start_health_checks()

    def stop(self) -> None:
        """Stop health checks (the balancer was replaced or its service removed)."""
        for target in self.targets:
            target.stop_health_checks()

    def retire(self) -> None:
        self.stop()
        for target in self.targets:
            target.retire()

    def mark_all_healthy(self) -> None:
        for target in self.targets:
            target.mark_healthy()

    def wait_healthy(self) -> defer.Deferred[None]:
        """Fires once every target has been healthy at the same time."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._became_healthy.called:
            d.callback(None)
        else:
            self._became_healthy.addCallback(lambda _: d.callback(None) if not d.called else None)
        return d

    def set_states(self, states: list[TargetState]) -> None:
        """Take the health states of ``targets`` as given (a copy of another process's
        balancer): no log line, no health check, the same rotation as the original."""
        for target, state in zip(self.targets, states, strict=False):
            target.state = state
        self._recompute()

    def _tell_health(self, target: Target) -> defer.Deferred | None:
        # Before the recompute, so that the workers hear of it before whatever the recompute
        # sets off (a deploy waiting for health goes on at once and publishes its switch).
        if self.on_health_change is not None:
            return self.on_health_change(self, target)
        return None

    def _target_changed(self, target: Target) -> None:
        self._recompute()

    def _recompute(self) -> None:
        self.healthy_writers = [t for t in self.writers if t.state is TargetState.HEALTHY]
        self.healthy_readers = [t for t in self.readers if t.state is TargetState.HEALTHY]
        total = len(self.targets)
        if total == 1 and self.healthy_writers:
            # A lone target is never taken out of rotation once healthy (SPEC §12.2).
            self.writers[0].stop_health_checks()
        if (
            total
            and len(self.healthy_writers) + len(self.healthy_readers) == total
            and not self._became_healthy.called
        ):
            self._became_healthy.callback(None)

    def choose(self, treat_as_read: bool) -> Target | None:
        """Pick the next target: readers for reads when any is healthy, else writers."""
        if treat_as_read:
            readers = self.healthy_readers
            if readers:
                self._reader_index = (self._reader_index + 1) % len(readers)
                return readers[self._reader_index]
        writers = self.healthy_writers
        if writers:
            self._writer_index = (self._writer_index + 1) % len(writers)
            return writers[self._writer_index]
        return None

    def drain(self, timeout: float) -> defer.Deferred:
        return defer.gatherResults(
            [t.drain(timeout) for t in self.targets], consumeErrors=True
        ).addCallback(lambda _: None)


def retire_when_idle(
    reactor: IReactorTime, lb: LoadBalancer, attempts: int = 3600, then: Callable | None = None
) -> None:
    """Retire ``lb`` once its requests in flight are done (checked every second, an hour at
    most): a removed service's requests finish on their own (SPEC §13.4)."""
    if attempts <= 0 or not any(t.inflight for t in lb.targets):
        lb.retire()
        if then is not None:
            then(lb)
        return
    reactor.callLater(1, retire_when_idle, reactor, lb, attempts - 1, then)
