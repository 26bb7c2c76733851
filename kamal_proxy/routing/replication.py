"""What the main process tells the workers about routing, and the hook the Router calls.

The Router in the main process is the one owner of routing state.  With worker processes it
has a :class:`Replicas` that carries each change to every worker's copy (``routing/replica.py``)
and answers only when all of them applied it.  The change itself travels as plain JSON built
here, so the encoding lives next to the state it describes and the wire module only moves text:

``{"order": [names...], "default_tls_host": str, "services": {name: spec}, "removed": [names]}``

``order`` is the Router's deploy order (the table depends on it); ``services`` holds the specs
of the services that changed (all of them in a worker's first copy).  A spec is::

    {"options": ServiceOptions JSON, "target_options": TargetOptions JSON,
     "active": balancer or null, "rollout": balancer or null,
     "pause": {"state": int, "message": str, "fail_after": ns}, "rollout_split": dict or null}

and a balancer ``{"id": int, "slot": int or null, "writers": [addr], "readers": [addr],
"states": [state]}`` (``slot``: its shared round-robin position, ``routing/turns.py``), where
the states are the targets' health (writers then readers) at the time of sending; later changes
follow as health messages naming the balancer id and the target's index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from kamal_proxy.routing.balancer import LoadBalancer
    from kamal_proxy.routing.router import Router
    from kamal_proxy.routing.service import Service
    from kamal_proxy.routing.target import Target


class Replicas(Protocol):
    """The workers' copies of the routing state, as the Router drives them."""

    def publish(self, router: Router, names: list[str], removed: list[str]) -> Deferred:
        """Send the current state of ``names`` (and the removal of ``removed``); fires once
        every worker has applied it."""

    def drain(self, balancers: list[LoadBalancer], drain_timeout: int) -> Deferred:
        """Fires once every worker's requests in flight on ``balancers`` finished (or were
        cancelled after ``drain_timeout`` nanoseconds)."""

    def retire(self, balancers: list[LoadBalancer]) -> None:
        """The balancers will never be used again: workers close their connections."""

    def health(self, balancer: LoadBalancer, target: Target) -> Deferred:
        """A target's health changed; fires once every worker applied it."""


SlotFor = Callable[["LoadBalancer"], "int | None"]


def balancer_spec(
    lb: LoadBalancer | None, slot_for: SlotFor | None = None
) -> dict[str, Any] | None:
    if lb is None:
        return None
    return {
        "id": lb.id,
        "slot": slot_for(lb) if slot_for is not None else None,
        "writers": lb.writer_addresses,
        "readers": lb.reader_addresses,
        "states": [t.state.value for t in lb.targets],
    }


def service_spec(service: Service, slot_for: SlotFor | None = None) -> dict[str, Any]:
    pause = service.pause
    return {
        "options": service.options.to_json(),
        "target_options": service.target_options.to_json(),
        "active": balancer_spec(service.active, slot_for),
        "rollout": balancer_spec(service.rollout, slot_for),
        "pause": {
            "state": int(pause.state),
            "message": pause.stop_message,
            "fail_after": pause.fail_after,
        },
        "rollout_split": service.rollout_split,
    }


def routing_change(
    router: Router, names: list[str], removed: list[str], slot_for: SlotFor | None = None
) -> dict[str, Any]:
    """The change message for ``names`` (those still deployed) and ``removed``; ``slot_for``
    gives each balancer its shared round-robin slot (``routing/turns.py``)."""
    return {
        "order": list(router.services),
        "default_tls_host": router.table.default_tls_host,
        "services": {
            name: service_spec(router.services[name], slot_for)
            for name in names
            if name in router.services
        },
        "removed": list(removed),
    }


def routing_snapshot(router: Router, slot_for: SlotFor | None = None) -> dict[str, Any]:
    """Everything, for a worker that starts."""
    return routing_change(router, list(router.services), [], slot_for)
