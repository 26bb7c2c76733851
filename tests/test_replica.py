"""The Router's replication hook and a worker's copy of the routing state, with fakes.

A real Router (fake health checks and pools, task.Clock) drives a recording ``Replicas``; the
messages it would send are applied to real ``RouterReplica`` objects, which must then route,
balance, pause and drain exactly as the Router does.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from kamal_proxy.routing.pause import PauseState, Released
from kamal_proxy.routing.replica import RouterReplica
from kamal_proxy.routing.replication import routing_change, routing_snapshot
from kamal_proxy.routing.router import Router
from kamal_proxy.routing.target import TargetState
from kamal_proxy.routing.turns import SharedTurns, TurnSlots
from kamal_proxy.service_options import ServiceOptions, TargetOptions
from tests.test_balancer import Base, FakeHealthCheck, FakeInFlight, FakePool


class RecordingReplicas:
    """Replicas whose acknowledgements the test gives by hand; every message is also applied
    to ``copies`` (JSON round trip, as on the wire)."""

    def __init__(self, copies: list[RouterReplica], slots: TurnSlots | None = None) -> None:
        self.copies = copies
        self.slots = slots
        self.pending: list[tuple[str, defer.Deferred]] = []
        self.retired: list[int] = []

    def _wait(self, what: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((what, d))
        return d

    def ack(self, what: str) -> None:
        for i, (kind, d) in enumerate(self.pending):
            if kind == what:
                del self.pending[i]
                d.callback(None)
                return
        raise AssertionError(f"nothing pending for {what}: {self.pending}")

    def publish(self, router, names, removed):
        slot_for = self.slots.slot_for if self.slots else None
        change = json.loads(json.dumps(routing_change(router, names, removed, slot_for)))
        for copy in self.copies:
            copy.apply(change)
        return self._wait("publish")

    def drain(self, balancers, drain_timeout):
        ids = [lb.id for lb in balancers]
        waits = [copy.drain(ids, drain_timeout) for copy in self.copies]
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def retire(self, balancers):
        self.retired += [lb.id for lb in balancers]
        for copy in self.copies:
            copy.retire([lb.id for lb in balancers])

    def health(self, balancer, target):
        for copy in self.copies:
            copy.health(balancer.id, balancer.targets.index(target), target.state.value)
        return self._wait("health")


class ReplicationTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.router = Router(
            self.clock, None, pool_factory=FakePool, health_check_factory=FakeHealthCheck
        )
        self.copies = [RouterReplica(self.clock, pool_factory=FakePool) for _ in range(2)]
        self.replicas = RecordingReplicas(self.copies)
        self.router.replicas = self.replicas

    def deploy(self, name: str, targets: list[str], **options: Any) -> defer.Deferred:
        d = defer.ensureDeferred(
            self.router.deploy(
                name,
                targets,
                [],
                30 * 10**9,
                5 * 10**9,
                False,
                ServiceOptions(**options),
                TargetOptions(),
            )
        )
        return d

    def pass_health_checks(self) -> None:
        for check in FakeHealthCheck.instances:
            if not check.closed:
                check.report(True)

    def test_deploy_is_acknowledged_only_after_every_worker_applied_it(self) -> None:
        d = self.deploy("web", ["aa:1"], hosts=["web.test"])
        self.assertEqual(self.copies[0].lookup("web.test", "/"), None)
        self.pass_health_checks()
        # The health change went out first; the switch follows; nothing is answered yet.
        self.assertEqual([k for k, _ in self.replicas.pending], ["health", "publish"])
        self.assertNoResult(d)
        for copy in self.copies:
            match = copy.lookup("web.test", "/")
            self.assertEqual(match.service.name, "web")
            self.assertEqual(match.service.active.writer_addresses, ["aa:1"])
            self.assertEqual(match.service.active.choose(False).address, "aa:1")
        self.replicas.ack("publish")
        self.successResultOf(d)
        # The health line waits for the workers too.
        self.assertEqual(self.health_events(), [])
        self.replicas.ack("health")
        self.assertEqual(len(self.health_events()), 1)

    def test_redeploy_drains_the_old_balancer_in_every_worker(self) -> None:
        first = self.deploy("web", ["aa:1"])
        self.pass_health_checks()
        self.replicas.ack("health")
        self.replicas.ack("publish")
        self.successResultOf(first)
        old_id = self.router.services["web"].active.id
        in_flight = [FakeInFlight(copy.balancers[old_id].targets[0]) for copy in self.copies]

        second = self.deploy("web", ["bb:2"])
        self.pass_health_checks()
        self.replicas.ack("health")
        self.replicas.ack("publish")
        for copy in self.copies:
            self.assertEqual(copy.lookup("x", "/").service.active.writer_addresses, ["bb:2"])
        # One worker finished, the other still has a request on the old target.
        in_flight[0].complete()
        self.assertNoResult(second)
        in_flight[1].complete()
        self.successResultOf(second)
        self.assertEqual(self.replicas.retired, [old_id])
        for copy in self.copies:
            self.assertNotIn(old_id, copy.balancers)

    def test_drain_timeout_bounds_the_workers(self) -> None:
        first = self.deploy("web", ["aa:1"])
        self.pass_health_checks()
        self.replicas.ack("health")
        self.replicas.ack("publish")
        self.successResultOf(first)
        old_id = self.router.services["web"].active.id
        stuck = FakeInFlight(self.copies[1].balancers[old_id].targets[0])
        second = self.deploy("web", ["bb:2"])
        self.pass_health_checks()
        self.replicas.ack("health")
        self.replicas.ack("publish")
        self.assertNoResult(second)
        self.clock.advance(5)
        self.successResultOf(second)
        self.assertEqual(stuck.cancelled, 1)

    def test_failed_deploy_changes_no_worker(self) -> None:
        first = self.deploy("web", ["aa:1"])
        self.pass_health_checks()
        self.replicas.ack("health")
        self.replicas.ack("publish")
        self.successResultOf(first)
        failed = self.deploy("web", ["bb:2"])
        self.clock.advance(31)
        self.failureResultOf(failed)
        self.assertEqual(self.replicas.pending, [])
        for copy in self.copies:
            self.assertEqual(copy.lookup("x", "/").service.active.writer_addresses, ["aa:1"])

    def test_pause_resume_and_stop_on_every_worker(self) -> None:
        deployed = self.deploy("web", ["aa:1"])
        self.pass_health_checks()
        self.replicas.ack("health")
        self.replicas.ack("publish")
        self.successResultOf(deployed)

        paused = defer.ensureDeferred(self.router.pause("web", 10**9, 30 * 10**9))
        self.replicas.ack("publish")
        self.successResultOf(paused)
        held = [copy.services["web"].pause.wait(self.clock) for copy in self.copies]
        for copy in self.copies:
            self.assertEqual(copy.services["web"].pause.state, PauseState.PAUSED)
            self.assertEqual(copy.services["web"].pause.fail_after, 30 * 10**9)
        resumed = defer.ensureDeferred(self.router.resume("web"))
        self.assertNoResult(resumed)
        self.assertEqual([self.successResultOf(d) for d in held], [Released.RUNNING] * 2)
        self.replicas.ack("publish")
        self.successResultOf(resumed)

        stopped = defer.ensureDeferred(self.router.stop("web", 10**9, "Back soon"))
        self.replicas.ack("publish")
        self.successResultOf(stopped)
        for copy in self.copies:
            pause = copy.services["web"].pause
            self.assertEqual((pause.state, pause.stop_message), (PauseState.STOPPED, "Back soon"))

    def test_health_changes_reach_the_copies(self) -> None:
        deployed = self.deploy("web", ["aa:1", "bb:2"])
        self.pass_health_checks()
        for _ in range(2):
            self.replicas.ack("health")
        self.replicas.ack("publish")
        self.successResultOf(deployed)
        checks = [c for c in FakeHealthCheck.instances if not c.closed]
        checks[0].report(False)
        for copy in self.copies:
            lb = copy.services["web"].active
            self.assertEqual([t.address for t in lb.healthy_writers], ["bb:2"])
            self.assertEqual(lb.targets[0].state, TargetState.UNHEALTHY)
        # No health checks and no log lines in the copies: the main process does both.
        self.assertEqual(len(self.health_events()), 2)

    def test_remove_rollout_and_snapshot(self) -> None:
        for name, host in (("one", "one.test"), ("two", "two.test")):
            d = self.deploy(name, [f"{name}:1"], hosts=[host])
            self.pass_health_checks()
            self.replicas.ack("health")
            self.replicas.ack("publish")
            self.successResultOf(d)
        split = defer.ensureDeferred(self.router.rollout_set("one", 50, ["x"]))
        self.failureResultOf(split)  # no rollout targets yet: refused, nothing published
        rollout = defer.ensureDeferred(
            self.router.rollout_deploy("one", ["canary:1"], [], 10**9, 10**9)
        )
        self.pass_health_checks()
        self.replicas.ack("health")
        self.replicas.ack("publish")
        self.successResultOf(rollout)
        split = defer.ensureDeferred(self.router.rollout_set("one", 50, ["x"]))
        self.replicas.ack("publish")
        self.successResultOf(split)
        for copy in self.copies:
            service = copy.services["one"]
            self.assertEqual(service.rollout.writer_addresses, ["canary:1"])
            self.assertEqual(service.rollout_split["allowlist"], ["x"])

        removed = defer.ensureDeferred(self.router.remove("two"))
        self.replicas.ack("publish")
        self.successResultOf(removed)
        for copy in self.copies:
            self.assertIsNone(copy.lookup("two.test", "/"))
            self.assertEqual(list(copy.services), ["one"])

        # A worker that starts later gets the same state in one snapshot.
        late = RouterReplica(self.clock, pool_factory=FakePool)
        late.apply(json.loads(json.dumps(routing_snapshot(self.router))))
        self.assertEqual(list(late.services), ["one"])
        service = late.services["one"]
        self.assertEqual(service.rollout.writer_addresses, ["canary:1"])
        self.assertEqual(service.rollout_split, self.router.services["one"].rollout_split)
        self.assertEqual(service.options, self.router.services["one"].options)


class SingleProcessOrderTests(Base):
    def test_health_line_comes_before_deployed_without_workers(self) -> None:
        """One process logs exactly as before workers existed: the health change, then the
        deploy it let go on."""
        router = Router(
            self.clock, None, pool_factory=FakePool, health_check_factory=FakeHealthCheck
        )
        d = defer.ensureDeferred(
            router.deploy(
                "web", ["aa:1"], [], 10**9, 10**9, False, ServiceOptions(), TargetOptions()
            )
        )
        FakeHealthCheck.instances[0].report(True)
        self.successResultOf(d)
        messages = [m for _, m, _ in self.events if m in ("Target health updated", "Deployed")]
        self.assertEqual(messages, ["Target health updated", "Deployed"])


class SharedTurnsTests(unittest.TestCase):
    def test_workers_alternate_as_one(self) -> None:
        """Two copies of one balancer take turns from one shared position."""
        clock = task.Clock()
        router = Router(clock, None, pool_factory=FakePool, health_check_factory=FakeHealthCheck)
        slots = TurnSlots(SharedTurns.create())
        self.addCleanup(lambda: __import__("os").close(slots.turns.fd))
        copies = [
            RouterReplica(clock, pool_factory=FakePool, turns=SharedTurns(slots.turns.fd))
            for _ in range(2)
        ]
        replicas = RecordingReplicas(copies, slots)
        router.replicas = replicas
        d = defer.ensureDeferred(
            router.deploy(
                "rr", ["aa:1", "bb:2"], [], 10**9, 10**9, True, ServiceOptions(), TargetOptions()
            )
        )
        replicas.ack("publish")
        self.successResultOf(d)
        lb = router.services["rr"].active
        for copy in copies:
            copy.health(lb.id, 0, "healthy")
            copy.health(lb.id, 1, "healthy")
        picks = [copies[i % 2].lookup("x", "/").service.active.choose(False) for i in range(6)]
        # Alternating workers still alternate the targets (one process would pick b, a, b ...).
        self.assertEqual([t.address for t in picks], ["bb:2", "aa:1"] * 3)
        # A retired balancer's slot is reused, starting from the beginning again.
        slot = slots.slot_for(lb)
        slots.free(lb)
        self.assertEqual(slots.slot_for(lb), slot)
        self.assertEqual(slots.turns.counters[2 * slot], 0)
