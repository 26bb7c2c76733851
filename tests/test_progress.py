"""A deploy's progress (issue 12 §3): the Router's observer events, the health check's reason,
the terminal view, and the CLI asking for progress only on a terminal."""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import defer

from kamal_proxy import app
from kamal_proxy.cli.progress import DeployProgressView, send_deploy
from kamal_proxy.control import commands
from kamal_proxy.health import checker
from kamal_proxy.routing.router import Router, RouterError
from kamal_proxy.service_options import HealthCheckConfig, ServiceOptions, TargetOptions
from tests.test_balancer import Base, FakeHealthCheck, FakeInFlight, FakePool
from tests.test_health import FakeAgent

SECOND = 10**9


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def health_checked(self, target: str, reason: str | None) -> None:
        self.events.append(("health", target, reason))

    def draining(self, targets: list[str], timeout: int) -> None:
        self.events.append(("drain", targets, timeout))

    def drained(self, targets: list[str]) -> None:
        self.events.append(("drained", targets))


class RouterObserverTests(Base):
    """The Router tells an observer of each health check it waits for, then of the drain."""

    def setUp(self) -> None:
        super().setUp()
        self.router = Router(
            self.clock, None, pool_factory=FakePool, health_check_factory=FakeHealthCheck
        )

    def deploy(self, targets: list[str], observer: Any = None, **kw: Any) -> defer.Deferred:
        return defer.ensureDeferred(
            self.router.deploy(
                "web",
                targets,
                [],
                kw.get("deploy_timeout", 30 * SECOND),
                kw.get("drain_timeout", 5 * SECOND),
                False,
                ServiceOptions(),
                TargetOptions(),
                observer=observer,
            )
        )

    def check(self, address: str) -> FakeHealthCheck:
        return [c for c in FakeHealthCheck.instances if c.address == address and not c.closed][-1]

    def test_health_checks_then_drain(self) -> None:
        first = self.deploy(["aa:1"])
        self.check("aa:1").report(True)
        self.successResultOf(first)
        old = self.router.services["web"].active.targets[0]
        request = FakeInFlight(old)

        observer = RecordingObserver()
        second = self.deploy(["bb:2", "cc:3"], observer)
        self.check("bb:2").report(False, "connection refused")
        self.check("bb:2").report(False, "unexpected status (503)")
        self.check("cc:3").report(True)
        self.assertEqual(
            observer.events,
            [
                ("health", "bb:2", "connection refused"),
                ("health", "bb:2", "unexpected status (503)"),
                ("health", "cc:3", None),
            ],
        )
        self.check("bb:2").report(True)
        # Healthy: the switch, then the drain of the old target, which waits for its request.
        self.assertEqual(
            observer.events[-2:], [("health", "bb:2", None), ("drain", ["aa:1"], 5 * SECOND)]
        )
        self.assertNoResult(second)
        request.complete()
        self.successResultOf(second)
        self.assertEqual(observer.events[-1], ("drained", ["aa:1"]))
        # Checks after the wait (two targets are checked for ever) are no longer told.
        count = len(observer.events)
        self.check("cc:3").report(False, "connection refused")
        self.assertEqual(len(observer.events), count)

    def test_failed_deploy_tells_each_check_and_no_drain(self) -> None:
        observer = RecordingObserver()
        d = self.deploy(["aa:1"], observer, deploy_timeout=2 * SECOND)
        self.check("aa:1").report(False, "connection refused")
        self.clock.advance(2)
        failure = self.failureResultOf(d, RouterError)
        self.assertIn("within configured timeout (2s)", str(failure.value))
        self.assertEqual(observer.events, [("health", "aa:1", "connection refused")])

    def test_rollout_deploy_tells_too(self) -> None:
        first = self.deploy(["aa:1"])
        self.check("aa:1").report(True)
        self.successResultOf(first)
        observer = RecordingObserver()
        d = defer.ensureDeferred(
            self.router.rollout_deploy("web", ["bb:2"], [], 30 * SECOND, SECOND, observer=observer)
        )
        self.check("bb:2").report(False)
        self.check("bb:2").report(True)
        self.successResultOf(d)
        self.assertEqual(
            observer.events, [("health", "bb:2", "unhealthy"), ("health", "bb:2", None)]
        )

    def test_no_observer_no_change(self) -> None:
        d = self.deploy(["aa:1"])
        self.check("aa:1").report(False, "connection refused")
        self.check("aa:1").report(True)
        self.successResultOf(d)
        self.assertIsNone(self.router.services["web"].active.targets[0].on_check)


class HealthCheckReasonTests(Base):
    """``app.health_check`` reports why a check failed, with the result."""

    def test_reason_comes_with_the_result(self) -> None:
        agent = FakeAgent()
        self.patch(
            checker,
            "http_get",
            lambda reactor, url, host: defer.ensureDeferred(checker.agent_get(agent, url, host)),
        )
        reports: list[tuple[bool, str | None]] = []
        check = app.health_check(
            self.clock,
            "web:3000",
            HealthCheckConfig(),
            lambda ok, reason: reports.append((ok, reason)),
        )
        check.start()
        self.addCleanup(check.close)
        agent.answer(503)
        self.clock.advance(1)
        agent.answer(200)
        self.assertEqual(reports, [(False, "unexpected status (503)"), (True, None)])


class ViewTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.now = 100.0
        self.out = io.StringIO()
        self.view = DeployProgressView(self.out, clock=lambda: self.now)

    def test_status_line_healthy_drain(self) -> None:
        show = self.view.show
        show({"event": "health", "target": "web:3000", "reason": "connection refused"})
        show({"event": "health", "target": "web:3000", "reason": "unexpected status (503)"})
        show({"event": "health", "target": "web:3000", "reason": ""})
        show({"event": "drain", "targets": ["old:3000"], "timeout": 30 * SECOND})
        self.now += 1.25
        show({"event": "drained", "targets": ["old:3000"]})
        self.view.close()
        self.assertEqual(
            self.out.getvalue(),
            "\r\x1b[Kweb:3000 not healthy yet: check 1 failed (connection refused)"
            "\r\x1b[Kweb:3000 not healthy yet: check 2 failed (unexpected status (503))"
            "\r\x1b[Kweb:3000 healthy after 3 checks\n"
            "\r\x1b[KDraining old:3000 (at most 30s)"
            "\r\x1b[KDrained old:3000 in 1.2s\n",
        )

    def test_close_ends_the_status_line_before_an_error(self) -> None:
        self.view.show({"event": "health", "target": "web:3000", "reason": "connection refused"})
        self.view.close()
        self.view.close()
        self.assertTrue(self.out.getvalue().endswith("(connection refused)\n"))

    def test_a_long_status_line_is_cut_to_the_terminal(self) -> None:
        self.view.show({"event": "health", "target": "web:3000", "reason": "x" * 200})
        line = self.out.getvalue()[len("\r\x1b[K") :]
        self.assertEqual(len(line), 79)  # no terminal: 80 columns
        self.assertTrue(line.endswith("..."))


class FakeInvocation:
    def __init__(self) -> None:
        self.sent: list[tuple[type, dict[str, Any]]] = []

    def send(self, command: type, **arguments: Any) -> dict[str, Any]:
        self.sent.append((command, arguments))
        handlers = arguments.get("on_notification") or {}
        for handle in handlers.values():
            handle({"event": "health", "target": "a:1", "reason": "connection refused"})
        return {}


class SendDeployTests(Base):
    def test_not_a_terminal_sends_what_it_always_sent(self) -> None:
        inv = FakeInvocation()
        out = io.StringIO()
        send_deploy(inv, commands.Deploy, stream=out, service="web", force=False)
        self.assertEqual(inv.sent, [(commands.Deploy, {"service": "web", "force": False})])
        self.assertEqual(out.getvalue(), "")

    def test_a_terminal_asks_for_progress_and_shows_it(self) -> None:
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        stream = open(slave, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        self.addCleanup(stream.close)
        inv = FakeInvocation()
        send_deploy(inv, commands.RolloutDeploy, stream=stream, service="web")
        [(command, arguments)] = inv.sent
        self.assertIs(command, commands.RolloutDeploy)
        self.assertIs(arguments["progress"], True)
        self.assertEqual(list(arguments["on_notification"]), [commands.DeployProgress])
        shown = os.read(master, 4096).decode()
        self.assertIn("a:1 not healthy yet: check 1 failed (connection refused)", shown)
