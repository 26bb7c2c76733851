"""Tests for kamal_proxy.routing.target and kamal_proxy.routing.balancer.

Health checks are replaced by a fake (results are fed in by hand), upstream pools by a fake
pool, and time by task.Clock, so every test runs without the network.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.internet import task
from twisted.trial import unittest

from kamal_proxy.health.checker import HealthCheck
from kamal_proxy.observe import events
from kamal_proxy.routing.balancer import LoadBalancer
from kamal_proxy.routing.target import Target, TargetState, split_address
from kamal_proxy.service_options import (
    HealthCheckConfig,
    OptionsError,
    TargetOptions,
)
from tests.test_health import FakeAgent


class FakePool:
    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeHealthCheck:
    """Stands in for HealthCheck: records its life, reports only when the test says so."""

    instances: list[FakeHealthCheck] = []

    def __init__(self, reactor: Any, address: str, config: HealthCheckConfig, report: Any) -> None:
        self.address = address
        self.config = config
        self.report = report
        self.started = False
        self.closed = False
        FakeHealthCheck.instances.append(self)

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True


class FakeInFlight:
    """A request as the drain sees it; finishing it ends it on its target."""

    def __init__(self, target: Target, is_upgraded: bool = False, end_on_cancel: bool = True):
        self.target = target
        self.is_upgraded = is_upgraded
        self.end_on_cancel = end_on_cancel
        self.cancelled = 0
        self.completed = False
        target.start_request(self)

    def complete(self) -> None:
        self.completed = True
        self.target.end_request(self)

    def cancel_for_drain(self) -> None:
        self.cancelled += 1
        if self.end_on_cancel:
            self.target.end_request(self)


class Base(unittest.TestCase):
    def setUp(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.patch(
            events, "_emit", lambda level, msg, attrs: self.events.append((level, msg, attrs))
        )
        FakeHealthCheck.instances = []
        self.health_check_factory: Any = FakeHealthCheck
        self.clock = task.Clock()

    def target(self, address: str, options: TargetOptions | None = None) -> Target:
        return Target(
            self.clock,
            address,
            options or TargetOptions(),
            pool_factory=FakePool,
            health_check_factory=self.health_check_factory,
        )

    def health_events(self) -> list[dict[str, Any]]:
        return [
            a for level, m, a in self.events if m == "Target health updated" and level == "INFO"
        ]


class TargetTests(Base):
    def test_address(self) -> None:
        t = self.target("web-1:3000")
        self.assertEqual((t.address, t.host, t.port), ("web-1:3000", "web-1", 3000))
        self.assertEqual((t.pool.host, t.pool.port), ("web-1", 3000))
        self.assertEqual(self.target("localhost").port, 80)
        self.assertEqual(split_address("172.1.0.2:80"), ("172.1.0.2", 80))
        self.assertEqual(t.state, TargetState.ADDING)
        self.assertFalse(t.draining)

    def test_invalid_addresses_scenario_77(self) -> None:
        for address in ("", "_", "/", "a", "http://127.0.0.1:8000", "127.0.0.1:abc"):
            with self.assertRaises(OptionsError) as cm:
                self.target(address)
            self.assertEqual(str(cm.exception), f"{address} :invalid host pattern")

    def test_response_timeout(self) -> None:
        self.assertEqual(self.target("web:1").response_timeout, 30.0)
        self.assertIsNone(self.target("web:1", TargetOptions(response_timeout=0)).response_timeout)

    def test_state_machine(self) -> None:
        t = self.target("web:3000")
        changes: list[TargetState] = []
        t.on_state_change = lambda target: changes.append(target.state)

        t.report_health(False)  # adding stays adding
        self.assertEqual(t.state, TargetState.ADDING)
        t.report_health(True)  # adding -> healthy
        t.report_health(True)  # stays healthy
        t.report_health(False)  # healthy -> unhealthy
        t.report_health(False)  # stays unhealthy
        t.report_health(True)  # unhealthy -> healthy

        self.assertEqual(changes, [TargetState.HEALTHY, TargetState.UNHEALTHY, TargetState.HEALTHY])
        self.assertEqual(
            self.health_events(),
            [
                {"target": "web:3000", "state": "healthy", "was": "adding"},
                {"target": "web:3000", "state": "unhealthy", "was": "healthy"},
                {"target": "web:3000", "state": "healthy", "was": "unhealthy"},
            ],
        )

    def test_mark_healthy(self) -> None:
        t = self.target("web:3000")
        t.mark_healthy()
        self.assertEqual(t.state, TargetState.HEALTHY)
        self.assertEqual(len(self.health_events()), 1)

    def test_health_checks_use_the_target_config(self) -> None:
        config = HealthCheckConfig(path="/health", port=9090)
        t = self.target("web:3000", TargetOptions(health_check_config=config))
        self.assertFalse(t.health_checking)
        t.start_health_checks()
        t.start_health_checks()  # only one checker per target
        self.assertEqual(len(FakeHealthCheck.instances), 1)
        check = FakeHealthCheck.instances[0]
        self.assertTrue(check.started)
        self.assertEqual((check.address, check.config), ("web:3000", config))
        self.assertTrue(t.health_checking)
        check.report(True)
        self.assertEqual(t.state, TargetState.HEALTHY)
        t.stop_health_checks()
        self.assertTrue(check.closed)
        self.assertFalse(t.health_checking)
        t.stop_health_checks()

    def test_retire(self) -> None:
        t = self.target("web:3000")
        t.start_health_checks()
        t.retire()
        self.assertTrue(FakeHealthCheck.instances[0].closed)
        self.assertTrue(t.pool.closed)


class DrainTests(Base):
    def test_no_requests_returns_immediately_scenario_70(self) -> None:
        t = self.target("web:3000")
        d = t.drain(30)
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(t.draining)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_requests_scenario_71(self) -> None:
        t = self.target("web:3000")
        requests = [FakeInFlight(t) for _ in range(3)]
        d = t.drain(5)
        self.assertTrue(t.draining)
        self.clock.advance(0.2)
        requests[0].complete()
        requests[1].complete()
        self.assertNoResult(d)
        requests[2].complete()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([r.cancelled for r in requests], [0, 0, 0])
        self.assertFalse(t.draining)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(t.inflight, set())

    def test_cancels_after_timeout_scenario_72(self) -> None:
        t = self.target("web:3000")
        requests = [FakeInFlight(t) for _ in range(20)]
        d = t.drain(0.01)
        self.clock.advance(0.005)
        self.assertNoResult(d)
        self.assertEqual(sum(r.cancelled for r in requests), 0)
        self.clock.advance(0.005)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([r.cancelled for r in requests], [1] * 20)
        self.assertFalse(any(r.completed for r in requests))
        self.assertFalse(t.draining)
        self.assertEqual(t.inflight, set())

    def test_cancel_that_does_not_end_at_once(self) -> None:
        t = self.target("web:3000")
        slow = FakeInFlight(t, end_on_cancel=False)
        d = t.drain(1)
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(slow.cancelled, 1)
        slow.complete()  # ends later; nothing waits for it any more
        self.assertEqual(t.inflight, set())

    def test_only_finished_ones_are_spared(self) -> None:
        t = self.target("web:3000")
        done, stuck = FakeInFlight(t), FakeInFlight(t)
        d = t.drain(1)
        done.complete()
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual((done.cancelled, stuck.cancelled), (0, 1))

    def test_upgraded_cancelled_immediately_scenario_73(self) -> None:
        t = self.target("web:3000")
        socket = FakeInFlight(t, is_upgraded=True)
        d = t.drain(5)
        self.assertEqual(socket.cancelled, 1)
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(t.draining)

    def test_upgraded_not_waited_for_even_if_it_lingers(self) -> None:
        t = self.target("web:3000")
        socket = FakeInFlight(t, is_upgraded=True, end_on_cancel=False)
        request = FakeInFlight(t)
        d = t.drain(5)
        self.assertEqual(socket.cancelled, 1)
        self.assertNoResult(d)
        request.complete()
        self.successResultOf(d)
        self.assertEqual((socket.cancelled, request.cancelled), (1, 0))

    def test_requests_started_during_drain_are_not_waited_for(self) -> None:
        t = self.target("web:3000")
        old = FakeInFlight(t)
        d = t.drain(5)
        new = FakeInFlight(t)
        old.complete()
        self.successResultOf(d)
        self.assertEqual(new.cancelled, 0)
        self.assertIn(new, t.inflight)

    def test_drain_while_draining_returns_at_once(self) -> None:
        t = self.target("web:3000")
        request = FakeInFlight(t)
        first = t.drain(5)
        second = t.drain(5)
        self.assertIsNone(self.successResultOf(second))
        self.assertNoResult(first)
        request.complete()
        self.successResultOf(first)

    def test_drain_keeps_the_health_state(self) -> None:
        t = self.target("web:3000")
        t.mark_healthy()
        FakeInFlight(t)
        d = t.drain(1)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(t.state, TargetState.HEALTHY)
        self.assertFalse(t.draining)

    def test_drain_started_from_a_drain_callback(self) -> None:
        # The first drain completes inside end_request; a drain begun by its callback must
        # still be woken when its own requests end (not wait for its timeout).
        t = self.target("web:3000")
        a, b = FakeInFlight(t), FakeInFlight(t)
        second: list[Any] = []

        def drain_again(_: object) -> None:
            c = FakeInFlight(t)
            second.append((c, t.drain(10)))

        t.drain(1).addCallback(drain_again)
        a.complete()
        b.complete()
        c, d = second[0]
        self.assertNoResult(d)
        c.complete()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(c.cancelled, 0)
        self.assertFalse(t.draining)

    def test_second_drain_after_first_finished(self) -> None:
        t = self.target("web:3000")
        FakeInFlight(t)
        d = t.drain(1)
        self.clock.advance(1)
        self.successResultOf(d)
        request = FakeInFlight(t)
        d = t.drain(1)
        self.assertNoResult(d)
        request.complete()
        self.successResultOf(d)


class BalancerTests(Base):
    def balancer(self, writers: list[str], readers: list[str] = (), **kwargs: Any) -> LoadBalancer:
        return LoadBalancer(
            [self.target(a) for a in writers], [self.target(a) for a in readers], **kwargs
        )

    def by_address(self, lb: LoadBalancer) -> dict[str, Target]:
        return {t.address: t for t in lb.targets}

    def picks(self, lb: LoadBalancer, n: int, read: bool = False) -> list[str | None]:
        out = []
        for _ in range(n):
            t = lb.choose(read)
            out.append(None if t is None else t.address)
        return out

    def test_target_list_order(self) -> None:
        lb = self.balancer(["one", "two", "three"], ["r1", "r2"])
        self.assertEqual([t.address for t in lb.targets], ["one", "two", "three", "r1", "r2"])
        self.assertEqual(lb.writer_addresses, ["one", "two", "three"])
        self.assertEqual(lb.reader_addresses, ["r1", "r2"])
        self.assertTrue(lb.has_readers)
        self.assertFalse(self.balancer(["one"]).has_readers)

    def test_no_healthy_targets(self) -> None:
        lb = self.balancer(["a1", "b1"])
        self.assertEqual(self.picks(lb, 2), [None, None])
        self.assertEqual(self.picks(lb, 2, read=True), [None, None])

    def test_round_robin_starts_with_the_second(self) -> None:
        lb = self.balancer(["a1", "b1"])
        lb.mark_all_healthy()
        self.assertEqual(self.picks(lb, 5), ["b1", "a1", "b1", "a1", "b1"])

    def test_round_robin_three(self) -> None:
        lb = self.balancer(["a1", "b1", "c1"])
        lb.mark_all_healthy()
        self.assertEqual(self.picks(lb, 4), ["b1", "c1", "a1", "b1"])

    def test_counter_survives_changes(self) -> None:
        lb = self.balancer(["a1", "b1", "c1"])
        lb.mark_all_healthy()
        self.assertEqual(self.picks(lb, 1), ["b1"])  # index 1
        self.by_address(lb)["c1"].report_health(False)
        self.assertEqual([t.address for t in lb.healthy_writers], ["a1", "b1"])
        self.assertEqual(self.picks(lb, 2), ["a1", "b1"])  # (1 + 1) % 2 = 0, then 1
        self.by_address(lb)["c1"].report_health(True)
        self.assertEqual(self.picks(lb, 1), ["c1"])

    def test_unhealthy_target_leaves_and_rejoins_rotation(self) -> None:
        lb = self.balancer(["a1", "b1"])
        lb.mark_all_healthy()
        self.by_address(lb)["a1"].report_health(False)
        self.assertEqual(self.picks(lb, 3), ["b1", "b1", "b1"])
        self.by_address(lb)["a1"].report_health(True)
        self.assertEqual(sorted(self.picks(lb, 2)), ["a1", "b1"])

    def test_readers_and_writers(self) -> None:
        lb = self.balancer(["w1"], ["r1", "r2"])
        lb.mark_all_healthy()
        self.assertEqual(self.picks(lb, 3, read=True), ["r2", "r1", "r2"])
        self.assertEqual(self.picks(lb, 2), ["w1", "w1"])
        # Reads fall back to writers when no reader is healthy.
        for address in ("r1", "r2"):
            self.by_address(lb)[address].report_health(False)
        self.assertEqual(self.picks(lb, 2, read=True), ["w1", "w1"])

    def test_writes_never_go_to_readers(self) -> None:
        lb = self.balancer(["w1"], ["r1"])
        self.by_address(lb)["r1"].report_health(True)
        self.assertEqual(self.picks(lb, 2), [None, None])
        self.assertEqual(self.picks(lb, 1, read=True), ["r1"])

    def test_independent_counters(self) -> None:
        lb = self.balancer(["w1", "w2"], ["r1", "r2"])
        lb.mark_all_healthy()
        self.assertEqual(self.picks(lb, 1), ["w2"])
        self.assertEqual(self.picks(lb, 1, read=True), ["r2"])
        self.assertEqual(self.picks(lb, 1), ["w1"])

    def test_options_kept(self) -> None:
        lb = self.balancer(["w1"], writer_affinity_timeout=5, read_targets_accept_websockets=True)
        self.assertEqual(lb.writer_affinity_timeout, 5)
        self.assertTrue(lb.read_targets_accept_websockets)

    def test_health_events(self) -> None:
        lb = self.balancer(["w1"], ["r1"])
        lb.start()
        self.assertEqual(len(FakeHealthCheck.instances), 2)
        FakeHealthCheck.instances[1].report(True)
        self.assertEqual(
            self.health_events(), [{"target": "r1", "state": "healthy", "was": "adding"}]
        )

    def test_start_checks_every_target(self) -> None:
        lb = self.balancer(["w1", "w2"], ["r1"])
        lb.start()
        self.assertEqual([c.address for c in FakeHealthCheck.instances], ["w1", "w2", "r1"])
        self.assertTrue(all(c.started for c in FakeHealthCheck.instances))
        lb.stop()
        self.assertTrue(all(c.closed for c in FakeHealthCheck.instances))

    def test_retire(self) -> None:
        lb = self.balancer(["w1"], ["r1"])
        lb.start()
        lb.retire()
        self.assertTrue(all(c.closed for c in FakeHealthCheck.instances))
        self.assertTrue(all(t.pool.closed for t in lb.targets))

    def test_lone_target_stops_checks_once_healthy(self) -> None:
        lb = self.balancer(["w1"])
        lb.start()
        check = FakeHealthCheck.instances[0]
        check.report(False)
        self.assertFalse(check.closed)
        check.report(True)
        self.assertTrue(check.closed)
        self.assertFalse(lb.targets[0].health_checking)
        self.assertEqual(self.picks(lb, 2), ["w1", "w1"])

    def test_lone_restored_target_stops_checks(self) -> None:
        lb = self.balancer(["w1"])
        lb.start()
        lb.mark_all_healthy()
        self.assertTrue(FakeHealthCheck.instances[0].closed)

    def test_two_targets_keep_checking(self) -> None:
        lb = self.balancer(["w1", "w2"])
        lb.start()
        for check in FakeHealthCheck.instances:
            check.report(True)
        self.assertFalse(any(c.closed for c in FakeHealthCheck.instances))
        FakeHealthCheck.instances[0].report(False)
        self.assertEqual(self.picks(lb, 2), ["w2", "w2"])

    def test_writer_and_reader_keep_checking(self) -> None:
        lb = self.balancer(["w1"], ["r1"])
        lb.start()
        lb.mark_all_healthy()
        self.assertFalse(any(c.closed for c in FakeHealthCheck.instances))

    def test_lone_reader_keeps_checking(self) -> None:
        lb = self.balancer([], ["r1"])
        lb.start()
        FakeHealthCheck.instances[0].report(True)
        self.assertFalse(FakeHealthCheck.instances[0].closed)

    def test_wait_healthy_needs_all_at_the_same_time(self) -> None:
        lb = self.balancer(["a1", "b1"])
        d = lb.wait_healthy()
        a, b = lb.targets
        a.report_health(True)
        self.assertNoResult(d)
        a.report_health(False)
        b.report_health(True)
        self.assertNoResult(d)
        a.report_health(True)
        self.assertIsNone(self.successResultOf(d))
        # One-shot: later waiters fire at once, even if a target became unhealthy since.
        a.report_health(False)
        self.assertIsNone(self.successResultOf(lb.wait_healthy()))

    def test_wait_healthy_counts_readers(self) -> None:
        lb = self.balancer(["w1"], ["r1"])
        d = lb.wait_healthy()
        lb.targets[0].report_health(True)
        self.assertNoResult(d)
        lb.targets[1].report_health(True)
        self.successResultOf(d)

    def test_wait_healthy_several_waiters_and_cancel(self) -> None:
        lb = self.balancer(["a1"])
        first, second = lb.wait_healthy(), lb.wait_healthy()
        first.cancel()
        self.failureResultOf(first)
        lb.targets[0].report_health(True)
        self.successResultOf(second)

    def test_wait_healthy_after_one_failed_check_scenario_78(self) -> None:
        lb = self.balancer(["a1", "b1"])
        d = lb.wait_healthy()
        lb.targets[0].report_health(False)
        lb.targets[1].report_health(True)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)

    def test_empty_balancer_never_healthy(self) -> None:
        lb = self.balancer([])
        d = lb.wait_healthy()
        lb.start()
        lb.mark_all_healthy()
        self.assertNoResult(d)
        self.assertIsNone(lb.choose(False))
        d.cancel()
        self.failureResultOf(d)

    def test_mark_all_healthy(self) -> None:
        lb = self.balancer(["a1", "b1"], ["r1"])
        d = lb.wait_healthy()
        lb.mark_all_healthy()
        self.successResultOf(d)
        self.assertTrue(all(t.state is TargetState.HEALTHY for t in lb.targets))
        self.assertEqual(len(self.health_events()), 3)

    def test_drain_all_in_parallel(self) -> None:
        lb = self.balancer(["a1", "b1"], ["r1"])
        a, b, r = lb.targets
        slow_a, slow_b = FakeInFlight(a), FakeInFlight(b)
        socket = FakeInFlight(r, is_upgraded=True)
        d = lb.drain(2)
        self.assertEqual(socket.cancelled, 1)
        self.assertTrue(a.draining and b.draining)
        self.clock.advance(1)
        slow_b.complete()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual((slow_a.cancelled, slow_b.cancelled), (1, 0))
        self.assertFalse(any(t.draining for t in lb.targets))

    def test_drain_nothing_in_flight(self) -> None:
        lb = self.balancer(["a1", "b1"])
        self.assertIsNone(self.successResultOf(lb.drain(30)))
        self.assertIsNone(self.successResultOf(self.balancer([]).drain(30)))


class WithRealHealthCheckTests(Base):
    """Targets and balancer driving the real HealthCheck (fake agent, task.Clock)."""

    def setUp(self) -> None:
        super().setUp()
        self.agent = FakeAgent()
        self.health_check_factory = functools.partial(HealthCheck, agent=self.agent)

    def balancer(self, *writers: str) -> LoadBalancer:
        lb = LoadBalancer([self.target(a) for a in writers], [])
        self.addCleanup(lb.stop)
        return lb

    def test_lone_target_checked_until_healthy_then_never_again(self) -> None:
        lb = self.balancer("web:3000")
        lb.start()
        self.assertEqual(self.agent.requests[0][1], b"http://web:3000/up")
        self.agent.answer(503)
        self.clock.advance(1)
        self.agent.answer(200)
        self.assertEqual(lb.targets[0].state, TargetState.HEALTHY)
        self.clock.advance(60)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(
            [m for _, m, _ in self.events],
            ["Healthcheck failed", "Target health updated"],
        )

    def test_two_targets_checked_forever(self) -> None:
        lb = self.balancer("a1:3000", "b1:3000")
        d = lb.wait_healthy()
        lb.start()
        self.agent.answer(200, index=0)
        self.agent.answer(200, index=1)
        self.successResultOf(d)
        self.clock.advance(1)
        self.assertEqual(len(self.agent.requests), 4)
        self.agent.answer(500, index=2)
        self.agent.answer(200, index=3)
        self.assertEqual([t.address for t in lb.healthy_writers], ["b1:3000"])
        self.assertEqual(
            self.health_events()[-1], {"target": "a1:3000", "state": "unhealthy", "was": "healthy"}
        )
        self.clock.advance(1)
        self.agent.answer(200, index=4)
        self.assertEqual([t.address for t in lb.healthy_writers], ["a1:3000", "b1:3000"])
