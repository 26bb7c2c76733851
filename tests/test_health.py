"""Tests for kamal_proxy.health.checker: URL building, real checks, and the check schedule."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from kamal_proxy.durations import MILLISECOND, SECOND
from kamal_proxy.health.checker import HealthCheck, health_check_url
from kamal_proxy.observe import events
from kamal_proxy.service_options import HealthCheckConfig


def capture_events(case: unittest.TestCase) -> list[tuple[str, str, dict[str, Any]]]:
    """Replace the log sink with a list so tests can assert on emitted events."""
    captured: list[tuple[str, str, dict[str, Any]]] = []
    case.patch(events, "_emit", lambda level, msg, attrs: captured.append((level, msg, attrs)))
    return captured


class URLTests(unittest.TestCase):
    def url(self, address: str, path: str = "/up", port: int = 0) -> str:
        return health_check_url(address, HealthCheckConfig(path=path, port=port))

    def test_scenario_76(self) -> None:
        self.assertEqual(self.url("localhost:3000", "/up"), "http://localhost:3000/up")
        self.assertEqual(
            self.url("localhost:3000", "/health", 8080), "http://localhost:8080/health"
        )
        self.assertEqual(self.url("localhost", "/status", 9090), "http://localhost:9090/status")
        self.assertEqual(self.url("localhost", "/up"), "http://localhost/up")

    def test_scenario_134_relative_path(self) -> None:
        self.assertEqual(
            self.url("web-1:3000", "web/index.html"), "http://web-1:3000/web/index.html"
        )

    def test_path_cleaning(self) -> None:
        self.assertEqual(self.url("web:3000", "/a/./b/../c"), "http://web:3000/a/c")
        self.assertEqual(self.url("web:3000", "/../../up"), "http://web:3000/up")
        self.assertEqual(self.url("web:3000", "//up//now"), "http://web:3000/up/now")
        self.assertEqual(self.url("web:3000", "/up/"), "http://web:3000/up/")
        self.assertEqual(self.url("web:3000", "up/"), "http://web:3000/up/")
        self.assertEqual(self.url("web:3000", "/"), "http://web:3000/")

    def test_encoded_path_example(self) -> None:
        self.assertEqual(
            self.url("127.0.0.1:3000", '/up?x=1&y="2" z#f'),
            "http://127.0.0.1:3000/up%3Fx=1&y=%222%22%20z%23f",
        )

    def test_reserved_characters_kept(self) -> None:
        self.assertEqual(
            self.url("web:3000", "/a:b@c;d,e=f&g+h$i~j"), "http://web:3000/a:b@c;d,e=f&g+h$i~j"
        )
        self.assertEqual(self.url("web:3000", "/caf\u00e9"), "http://web:3000/caf%C3%A9")

    def test_valid_encoding_kept_as_given(self) -> None:
        # Go's URL.EscapedPath keeps a path that is already validly encoded.
        self.assertEqual(self.url("web:3000", "/health!"), "http://web:3000/health!")
        self.assertEqual(self.url("web:3000", "/(a)*[b]'"), "http://web:3000/(a)*[b]'")
        self.assertEqual(self.url("web:3000", "/a%20b"), "http://web:3000/a%20b")
        self.assertEqual(self.url("web:3000", "/a%2Fb"), "http://web:3000/a%2Fb")
        # Otherwise the decoded path is escaped afresh.
        self.assertEqual(self.url("web:3000", "/a b%20c!"), "http://web:3000/a%20b%20c%21")
        self.assertEqual(self.url("web:3000", "/a%2Fb c"), "http://web:3000/a/b%20c")
        # An invalid escape cannot be decoded: its % is escaped.
        self.assertEqual(self.url("web:3000", "/x%zz"), "http://web:3000/x%25zz")


class Backend:
    """A twisted.web server on 127.0.0.1 with the endpoints the checks below need."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.case = case
        self.seen: list[tuple[bytes, dict[bytes, list[bytes]]]] = []
        self.hanging: list[Any] = []
        self.retrying = 0
        self._lost: list[defer.Deferred[None]] = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        backend = self

        class Handler(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> Any:
                return backend.render(request)

        site = Site(Handler())
        original = site.buildProtocol

        def build(addr: Any) -> Any:
            proto = original(addr)
            lost: defer.Deferred[None] = defer.Deferred()
            self._lost.append(lost)
            connection_lost = proto.connectionLost

            def wrapped(reason: Failure) -> None:
                connection_lost(reason)
                lost.callback(None)

            proto.connectionLost = wrapped
            return proto

        site.buildProtocol = build
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.case.addCleanup(self.stop)
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        yield None

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for request in self.hanging:
            if not request._disconnected and not request.finished:
                request.channel.transport.abortConnection()
        yield self.port.stopListening()
        yield defer.gatherResults(self._lost)
        # Let the client side see its end of the connections close too.
        yield task.deferLater(reactor, 0.01, lambda: None)

    def render(self, request: Any) -> Any:
        self.seen.append((request.path, dict(request.requestHeaders.getAllRawHeaders())))
        parts = request.path.decode().strip("/").split("/")
        if parts[0] == "status":
            request.setResponseCode(int(parts[1]))
            return b"status"
        if parts[0] == "found":
            request.setResponseCode(302)
            return b""
        if parts[0] == "chain":
            left = int(parts[1])
            if left == 0:
                return b"ok"
            request.setResponseCode(302)
            request.setHeader(b"Location", f"/chain/{left - 1}".encode())
            return b""
        if parts[0] == "absolute":
            request.setResponseCode(307)
            request.setHeader(b"Location", f"http://{self.address}/status/204".encode())
            return b""
        if parts[0] == "example-host-only":
            ok = request.requestHeaders.getRawHeaders(b"host") == [b"example.com"]
            request.setResponseCode(200 if ok else 421)
            return b""
        if parts[0] == "retrying":
            self.retrying += 1
            request.setResponseCode(502 if self.retrying < 3 else 200)
            return b""
        if parts[0] == "slow":
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found"


class RealCheckTests(unittest.TestCase):
    """One check at a time against a real server on an ephemeral loopback port."""

    timeout = 10

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.events = capture_events(self)
        self.backend = Backend(self)
        yield self.backend.start()

    def checker(self, path: str, timeout: int = SECOND, host: str = "", address: str = "") -> Any:
        config = HealthCheckConfig(path=path, interval=SECOND, timeout=timeout, host=host)
        results: list[bool] = []
        check = HealthCheck(
            reactor, address or self.backend.address, config, lambda ok, _reason: results.append(ok)
        )
        self.addCleanup(check.close)
        return check

    def failures(self) -> list[dict[str, Any]]:
        return [attrs for level, msg, attrs in self.events if msg == "Healthcheck failed"]

    @defer.inlineCallbacks
    def assertHealthy(self, path: str, **kwargs: Any) -> Any:
        before = len(self.failures())
        result = yield defer.ensureDeferred(self.checker(path, **kwargs).check())
        self.assertIsNone(result)
        self.assertEqual(len(self.failures()), before)

    @defer.inlineCallbacks
    def assertUnhealthy(self, path: str, error: str, **kwargs: Any) -> Any:
        check = self.checker(path, **kwargs)
        result = yield defer.ensureDeferred(check.check())
        self.assertEqual(result, error)
        self.assertEqual(self.failures()[-1], {"url": check.url, "error": error})
        self.assertEqual(self.events[-1][0], "INFO")

    @defer.inlineCallbacks
    def test_checks_log_no_factory_lines(self) -> Any:
        """Issue 12 §2: no "Starting factory"/"Stopping factory" in twistd's log per check."""
        from twisted.logger import formatEvent, globalLogPublisher

        seen: list[str] = []

        def observe(event: dict) -> None:
            seen.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for _ in range(2):
            yield self.assertHealthy("/status/200")
        yield self.assertUnhealthy("/status/503", "unexpected status (503)")
        # The connection of the last check closes after its result: let it.
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([line for line in seen if "factory" in line.lower()], [])

    @defer.inlineCallbacks
    def test_2xx_is_healthy(self) -> Any:
        for code in (200, 204, 299):
            yield self.assertHealthy(f"/status/{code}")

    @defer.inlineCallbacks
    def test_other_statuses_are_unhealthy(self) -> Any:
        yield self.assertUnhealthy("/found", "unexpected status (302)")
        yield self.assertUnhealthy("/status/404", "unexpected status (404)")
        yield self.assertUnhealthy("/status/500", "unexpected status (500)")
        yield self.assertUnhealthy("/status/503", "unexpected status (503)")
        yield self.assertUnhealthy("/status/304", "unexpected status (304)")

    @defer.inlineCallbacks
    def test_failure_url_is_the_full_check_url(self) -> Any:
        yield self.assertUnhealthy("/status/500", "unexpected status (500)")
        self.assertEqual(self.failures()[-1]["url"], f"http://{self.backend.address}/status/500")

    @defer.inlineCallbacks
    def test_redirects_followed(self) -> Any:
        yield self.assertHealthy("/chain/3")
        self.assertEqual(
            [path for path, _ in self.backend.seen],
            [b"/chain/3", b"/chain/2", b"/chain/1", b"/chain/0"],
        )
        yield self.assertHealthy("/absolute")
        self.assertEqual(self.backend.seen[-1][0], b"/status/204")

    @defer.inlineCallbacks
    def test_redirect_limit_like_go(self) -> Any:
        # Go's client sends at most 10 requests: 9 redirects are followed, a 10th fails.
        yield self.assertHealthy("/chain/9")
        yield self.assertUnhealthy("/chain/10", "stopped after 10 redirects")
        self.assertEqual(len(self.backend.seen), 10 + 10)

    @defer.inlineCallbacks
    def test_redirect_to_a_failing_status(self) -> Any:
        yield self.assertHealthy("/chain/0")
        check = self.checker("/absolute")
        self.backend.address = "127.0.0.1:1"  # the Location now points at a closed port
        result = yield defer.ensureDeferred(check.check())
        self.assertIsNotNone(result)

    @defer.inlineCallbacks
    def test_headers(self) -> Any:
        yield self.assertHealthy("/status/200")
        headers = self.backend.seen[0][1]
        self.assertEqual(headers[b"User-Agent"], [b"kamal-proxy"])
        self.assertEqual(headers[b"Host"], [self.backend.address.encode()])

    @defer.inlineCallbacks
    def test_host_override_scenario_86(self) -> Any:
        yield self.assertHealthy("/example-host-only", host="example.com")
        self.assertEqual(self.backend.seen[-1][1][b"Host"], [b"example.com"])
        yield self.assertUnhealthy(
            "/example-host-only", "unexpected status (421)", host="wrong.com"
        )
        self.assertEqual(self.backend.seen[-1][1][b"Host"], [b"wrong.com"])
        yield self.assertHealthy("/status/200")
        self.assertEqual(self.backend.seen[-1][1][b"Host"], [self.backend.address.encode()])

    @defer.inlineCallbacks
    def test_slow_endpoint_times_out(self) -> Any:
        # Real sockets, the timeout on a fake clock: it expires once the server holds the
        # request, however slowly this machine gets there.
        clock = task.Clock()
        config = HealthCheckConfig(path="/slow", interval=SECOND, timeout=50 * MILLISECOND)
        address = self.backend.address
        check = HealthCheck(clock, address, config, lambda ok, _reason: None, connector=reactor)
        self.addCleanup(check.close)
        result = defer.ensureDeferred(check.check())
        for _ in range(1000):
            if self.backend.hanging:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.backend.hanging), 1, "the check never reached the server")
        clock.advance(0.049)
        self.assertNoResult(result)
        clock.advance(0.001)
        self.assertEqual((yield result), "request timed out")
        self.assertEqual(self.failures()[-1], {"url": check.url, "error": "request timed out"})
        self.assertEqual(len(self.backend.hanging), 1)

    @defer.inlineCallbacks
    def test_connection_refused(self) -> Any:
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        address = f"127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        check = self.checker("/up", address=address)
        result = yield defer.ensureDeferred(check.check())
        self.assertIn("refused", result)
        self.assertEqual(self.failures()[-1], {"url": f"http://{address}/up", "error": result})

    @defer.inlineCallbacks
    def test_scheduled_checks_scenario_85(self) -> Any:
        # 10ms interval and timeout: 502, 502, then 200.
        results: list[bool] = []
        done: defer.Deferred[None] = defer.Deferred()

        def report(ok: bool, _reason: str | None) -> None:
            results.append(ok)
            if len(results) == 3:
                done.callback(None)

        config = HealthCheckConfig(path="/retrying", interval=10 * MILLISECOND, timeout=SECOND)
        check = HealthCheck(reactor, self.backend.address, config, report)
        self.addCleanup(check.close)
        check.start()
        yield done
        check.close()
        self.assertEqual(results, [False, False, True])
        self.assertEqual([a["error"] for a in self.failures()], ["unexpected status (502)"] * 2)


class FakeResponse:
    phrase = b"OK"

    def __init__(self, code: int, location: str | None = None, stall: bool = False) -> None:
        self.code = code
        self.stall = stall
        self.headers = Headers()
        if location is not None:
            self.headers.setRawHeaders(b"Location", [location.encode()])

    def deliverBody(self, protocol: Any) -> None:
        if self.stall:
            return  # the body never arrives
        protocol.dataReceived(b"body")
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Records requests; the test answers each one by firing its Deferred."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Headers, defer.Deferred[Any]]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.requests.append((method, uri, headers or Headers(), d))
        return d

    def answer(
        self, code: int, location: str | None = None, stall: bool = False, index: int = -1
    ) -> None:
        self.requests[index][3].callback(FakeResponse(code, location, stall))


class ScheduleTests(unittest.TestCase):
    """The check schedule, driven by task.Clock and a fake agent."""

    def setUp(self) -> None:
        self.events = capture_events(self)
        self.clock = task.Clock()
        self.agent = FakeAgent()
        self.results: list[bool] = []

    def make(self, interval: int = SECOND, timeout: int = 5 * SECOND, **kw: Any) -> HealthCheck:
        config = HealthCheckConfig(path="/up", interval=interval, timeout=timeout, **kw)
        check = HealthCheck(
            self.clock,
            "web:3000",
            config,
            lambda ok, _reason: self.results.append(ok),
            agent=self.agent,
        )
        self.addCleanup(check.close)
        return check

    def test_first_check_immediately_then_every_interval(self) -> None:
        check = self.make()
        check.start()
        self.assertEqual(len(self.agent.requests), 1)
        method, uri, headers, _ = self.agent.requests[0]
        self.assertEqual((method, uri), (b"GET", b"http://web:3000/up"))
        self.assertEqual(headers.getRawHeaders(b"User-Agent"), [b"kamal-proxy"])
        self.assertFalse(headers.hasHeader(b"Host"))
        self.agent.answer(200)
        self.assertEqual(self.results, [True])
        self.clock.advance(0.999)
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.answer(500)
        self.assertEqual(self.results, [True, False])
        self.clock.advance(1)
        self.assertEqual(len(self.agent.requests), 3)
        self.agent.answer(204)
        self.assertEqual(self.results, [True, False, True])

    def test_host_header_override(self) -> None:
        self.make(host="example.com").start()
        self.assertEqual(self.agent.requests[0][2].getRawHeaders(b"Host"), [b"example.com"])

    def test_tick_while_running_is_dropped(self) -> None:
        self.make().start()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(0.5)
        self.agent.answer(200)
        self.assertEqual(self.results, [True])
        # Fixed rate: the next tick is on the original grid (t=3), not 1s after the answer.
        self.clock.advance(0.5)
        self.assertEqual(len(self.agent.requests), 2)

    def test_timeout(self) -> None:
        self.make(interval=10 * SECOND, timeout=2 * SECOND).start()
        self.clock.advance(1.999)
        self.assertEqual(self.results, [])
        self.clock.advance(0.001)
        self.assertEqual(self.results, [False])
        self.assertEqual(
            self.events,
            [
                (
                    "INFO",
                    "Healthcheck failed",
                    {"url": "http://web:3000/up", "error": "request timed out"},
                )
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 10)

    def test_answer_cancels_the_timeout(self) -> None:
        self.make(interval=10 * SECOND, timeout=2 * SECOND).start()
        self.agent.answer(200)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # just the next tick

    def test_zero_timeout_fails_every_check(self) -> None:
        self.make(timeout=0).start()
        self.clock.advance(0)
        self.assertEqual(self.results, [False])

    def test_redirect_followed_with_fake_agent(self) -> None:
        self.make().start()
        self.agent.answer(301, "/elsewhere?x=1")
        self.assertEqual(self.agent.requests[1][1], b"http://web:3000/elsewhere?x=1")
        self.agent.answer(200)
        self.assertEqual(self.results, [True])

    def test_timeout_while_reading_a_redirect_body(self) -> None:
        # The timeout must end the check, not just the body read (and then follow the redirect).
        self.make(interval=10 * SECOND, timeout=2 * SECOND).start()
        self.agent.answer(302, "/elsewhere", stall=True)
        self.clock.advance(2)
        self.assertEqual(self.results, [False])
        self.assertEqual(self.events[-1][2]["error"], "request timed out")
        self.assertEqual(len(self.agent.requests), 1)

    def test_close_stops_checks(self) -> None:
        check = self.make()
        check.start()
        self.agent.answer(200)
        check.close()
        self.clock.advance(10)
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_during_check_ignores_its_result(self) -> None:
        check = self.make()
        check.start()
        check.close()
        self.assertTrue(self.agent.requests[0][3].called)  # cancelled
        self.clock.advance(10)
        self.assertEqual(self.results, [])
        self.assertEqual(self.events, [])
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_twice_and_before_start(self) -> None:
        check = self.make()
        check.close()
        check.close()
        self.assertEqual(self.agent.requests, [])

    def test_agent_error_is_a_failure(self) -> None:
        self.make().start()
        self.agent.requests[0][3].errback(RuntimeError("boom"))
        self.assertEqual(self.results, [False])
        self.assertEqual(self.events[-1][2]["error"], "boom")

    def test_non_positive_interval_rejected(self) -> None:
        for interval in (0, -SECOND):
            self.assertRaises(ValueError, self.make(interval=interval).start)
        self.assertEqual(self.agent.requests, [])


class ProxyEnvironmentTests(unittest.TestCase):
    """SPEC §12.1: health checks honour the HTTP proxy variables as Go's client does."""

    def test_proxy_rules(self):
        from kamal_proxy.health.checker import proxy_for

        env = {"HTTP_PROXY": "http://proxy.internal:3128", "NO_PROXY": "skip.example,.corp"}
        self.assertEqual(proxy_for("http://web-1:3000/up", env), ("proxy.internal", 3128))
        self.assertIsNone(proxy_for("http://localhost:3000/up", env))
        self.assertIsNone(proxy_for("http://127.0.0.1:3000/up", env))
        self.assertIsNone(proxy_for("http://skip.example:3000/up", env))
        self.assertIsNone(proxy_for("http://a.corp/up", env))
        self.assertIsNone(proxy_for("http://web-1:3000/up", {}))
        self.assertIsNone(proxy_for("http://web-1/up", {**env, "NO_PROXY": "*"}))
        self.assertEqual(proxy_for("http://web-1/up", {"http_proxy": "p:8080"}), ("p", 8080))

    def test_check_goes_through_the_proxy(self):
        """A real check through a real (tiny) forward proxy on loopback."""
        from twisted.internet import reactor
        from twisted.web import resource, server

        from kamal_proxy.health.checker import HealthCheck
        from kamal_proxy.service_options import HealthCheckConfig

        seen = []

        class Proxy(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                seen.append((request.uri, request.getHeader(b"host")))
                return b"ok"

        port = reactor.listenTCP(0, server.Site(Proxy()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        env = {"HTTP_PROXY": f"http://127.0.0.1:{port.getHost().port}"}
        self.patch(os, "environ", env)
        check = HealthCheck(
            reactor, "web-1.invalid:3000", HealthCheckConfig(), lambda ok, _reason: None
        )
        d = defer.ensureDeferred(check.check())

        def checked(result):
            self.assertIsNone(result)
            self.assertEqual(seen, [(b"http://web-1.invalid:3000/up", b"web-1.invalid:3000")])

        return d.addCallback(checked)
