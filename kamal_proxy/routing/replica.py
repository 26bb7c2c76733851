"""A worker's copy of the routing state: read like the Router, written only by the main process.

The request pipeline, the certificate selector and the on-demand probe read ``lookup``,
``table`` and ``services`` exactly as they read the Router's in a single process, and find the
same objects behind them (``Service``, ``LoadBalancer``, ``Target``, ``PauseController``): only
who changes them differs.  Here every change comes from the main process (``apply``, ``health``,
``drain``, ``retire``; the messages are described in ``routing/replication.py``), and nothing is
decided locally: no health checks, no state file, no validation beyond building the objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from kamal_proxy.observe.events import error
from kamal_proxy.routing.balancer import LoadBalancer, retire_when_idle
from kamal_proxy.routing.pause import PauseController, PauseState
from kamal_proxy.routing.service import Service
from kamal_proxy.routing.table import RoutingTable
from kamal_proxy.routing.target import PoolFactory, Target, TargetState
from kamal_proxy.routing.turns import SharedTurnBalancer, SharedTurns
from kamal_proxy.service_options import ServiceOptions, TargetOptions


class RouterReplica:
    """Services, balancers and table as the main process last described them."""

    def __init__(
        self,
        reactor: IReactorTime,
        pool_factory: PoolFactory,
        service_setup: Callable[[Service], None] | None = None,
        turns: SharedTurns | None = None,
    ) -> None:
        self.reactor = reactor
        # Round-robin positions shared with the other workers (None: each its own).
        self.turns = turns
        self.services: dict[str, Service] = {}
        self.table: RoutingTable = RoutingTable.build([], "")
        #: Every balancer not retired yet, by the main process's id (old ones drain here).
        self.balancers: dict[int, LoadBalancer] = {}
        self._pool_factory = pool_factory
        # Builds per-service extras (certificates, error pages), as the Router does.
        self._service_setup = service_setup
        self._option_keys: dict[str, str] = {}

    # -- what the data plane reads ----------------------------------------------------------

    def lookup(self, host: str, path: str):
        return self.table.lookup(host, path)

    # -- what the main process sends ---------------------------------------------------------

    def apply(self, change: dict[str, Any]) -> None:
        """Apply one routing change (or a whole snapshot) in one reactor turn."""
        for name in change.get("removed", ()):
            service = self.services.pop(name, None)
            self._option_keys.pop(name, None)
            if service is not None:
                for lb in service.balancers():
                    self.reactor.callLater(0, retire_when_idle, self.reactor, lb, then=self._forget)
        for name, spec in change.get("services", {}).items():
            self._apply_service(name, spec)
        order = [name for name in change.get("order", ()) if name in self.services]
        order += [name for name in self.services if name not in order]
        self.services = {name: self.services[name] for name in order}
        default_tls_host = change.get("default_tls_host", "")
        self.table = RoutingTable.build(list(self.services.values()), default_tls_host)
        # The main process's choice, which the same build over the same services repeats.
        self.table.default_tls_host = default_tls_host

    def health(self, balancer_id: int, index: int, state: str) -> None:
        lb = self.balancers.get(balancer_id)
        if lb is None or not 0 <= index < len(lb.targets):
            return  # not published yet (its first copy carries the state) or gone
        states = [t.state for t in lb.targets]
        states[index] = TargetState(state)
        lb.set_states(states)

    def drain(self, balancer_ids: list[int], drain_timeout: int) -> defer.Deferred:
        """Fires when this worker's requests on those balancers are done (or cancelled)."""
        waits = [
            self.balancers[i].drain(drain_timeout / 1e9)
            for i in balancer_ids
            if i in self.balancers
        ]
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def retire(self, balancer_ids: list[int]) -> None:
        for i in balancer_ids:
            lb = self.balancers.pop(i, None)
            if lb is not None:
                lb.retire()

    # -- building ----------------------------------------------------------------------------

    def _forget(self, lb: LoadBalancer) -> None:
        if self.balancers.get(lb.id) is lb:
            del self.balancers[lb.id]

    def _apply_service(self, name: str, spec: dict[str, Any]) -> None:
        options = ServiceOptions.from_json(spec["options"])
        target_options = TargetOptions.from_json(spec["target_options"])
        key = json.dumps([spec["options"], spec["target_options"]], sort_keys=True)
        service = self.services.get(name)
        if service is None or self._option_keys.get(name) != key:
            candidate = Service(name, options, target_options)
            self._setup(candidate)
            if service is None:
                service = self.services[name] = candidate
            else:
                service.set_options(options, target_options)
                service.error_pages = candidate.error_pages
                service.certificates = candidate.certificates
            self._option_keys[name] = key
        service.active = self._balancer(spec.get("active"), service)
        service.rollout = self._balancer(spec.get("rollout"), service)
        pause = spec.get("pause") or {}
        apply_pause(
            service.pause,
            PauseState(pause.get("state", 0)),
            pause.get("message", ""),
            pause.get("fail_after", 0),
        )
        service.rollout_split = spec.get("rollout_split")

    def _setup(self, service: Service) -> None:
        if self._service_setup is None:
            return
        try:
            self._service_setup(service)
        except Exception as e:  # noqa: BLE001 - the main process accepted it: serve anyway
            error("Unable to set up service in worker", service=service.name, error=str(e))

    def _balancer(self, spec: dict[str, Any] | None, service: Service) -> LoadBalancer | None:
        if spec is None:
            return None
        lb = self.balancers.get(spec["id"])
        if lb is None:
            topts = service.target_options
            writers = [Target(self.reactor, a, topts, self._pool_factory) for a in spec["writers"]]
            readers = [Target(self.reactor, a, topts, self._pool_factory) for a in spec["readers"]]
            args = (
                writers,
                readers,
                service.options.writer_affinity_timeout,
                service.options.read_targets_accept_websockets,
            )
            slot = spec.get("slot")
            if self.turns is not None and slot is not None:
                lb = SharedTurnBalancer(*args, balancer_id=spec["id"], turns=self.turns, slot=slot)
            else:
                lb = LoadBalancer(*args, balancer_id=spec["id"])
            self.balancers[lb.id] = lb
        lb.set_states([TargetState(s) for s in spec["states"]])
        return lb


def apply_pause(pause: PauseController, state: PauseState, message: str, fail_after: int) -> None:
    """Bring ``pause`` to ``state`` the way the main process got there, so that held requests
    are released (resume, stop) exactly as they would be in one process."""
    if state == PauseState.RUNNING:
        if pause.state != PauseState.RUNNING:
            pause.resume()
    elif state == PauseState.PAUSED:
        pause.pause(fail_after)
    elif pause.state != PauseState.STOPPED or pause.stop_message != message:
        pause.stop(message)
    pause.fail_after = fail_after
