"""pause / stop / resume against the real process (SPEC §14, §11.2-§11.3, §15; scenarios 15,
30, 55, 87-91, 166)."""

from __future__ import annotations

from tests.integration.support import PROCESS_TIMEOUT, shared_upstream
from tests.integration.traffic_support import (
    DEFAULT_503_TEXT,
    Background,
    TrafficTestCase,
    go_escape,
    wait_in_flight,
)

MS = 1_000_000


class PauseTests(TrafficTestCase):
    shared = True
    metrics = True  # the in-flight gauge tells when requests held by a pause have arrived

    def setUp(self):
        super().setUp()
        self.up = shared_upstream("first")

    def test_held_requests_complete_after_resume(self):
        """Scenarios 88, 166: pause holds requests (also several at once) until resume."""
        self.deploy("p-hold", self.up.addr, "--host", "hold.test")
        self.assertEqual(self.list_state(self.proxy, "p-hold")[4], "running")
        self.proxy.cli_ok("pause", "p-hold", "--max-pause", "20s")
        self.assertEqual(self.list_state(self.proxy, "p-hold")[4], "paused")
        held = [self.bg_request(self.proxy, "GET", f"/held{i}", host="hold.test") for i in range(3)]
        wait_in_flight(self.proxy.metrics_port, "p-hold", 3)
        self.assertFalse(any(h.done() for h in held), "paused requests must be held")
        mark = self.proxy.log_mark()
        self.assertEqual(self.proxy.cli_ok("resume", "p-hold"), "")
        for h in held:
            resp = h.result(15)
            self.assertEqual((resp.status, resp.text), (200, "first"))
        self.proxy.wait_for_log("Service resumed", since=mark, service="p-hold")
        self.assertEqual(self.get("hold.test").text, "first")

    def test_max_pause_gives_504_and_warns(self):
        """Scenario 166: --max-pause 500ms → 504 page after ≈0.5s with a WARN log; pausing again
        with a shorter max-pause applies to new requests."""
        self.deploy("p-max", self.up.addr, "--host", "max.test")
        mark = self.proxy.log_mark()
        self.proxy.cli_ok("pause", "p-max", "--max-pause", "500ms")
        self.proxy.wait_for_log("Service paused", since=mark, service="p-max")
        self.proxy.wait_for_log("Service drained", since=mark, service="p-max")
        resp = self.get("max.test", "/waiting?x=1")
        self.assertErrorPage(resp, 504, "did not respond within the allowed time limit")
        self.assertGreaterEqual(resp.elapsed, 0.45, "504 before max-pause")
        warn = self.proxy.wait_for_log(
            "Rejecting request due to expired pause", since=mark, service="p-max"
        )
        self.assertEqual((warn["level"], warn["path"]), ("WARN", "/waiting"))
        self.assertEqual(
            self.state_service(self.proxy, "p-max")["pause_controller"],
            {"state": 1, "stop_message": "", "fail_after": 500 * MS},
        )

        # Pausing again applies the new max-pause to new requests (a longer one, so that only
        # a lower bound, which load cannot break, tells it from the old 500ms).
        self.proxy.cli_ok("pause", "p-max", "--max-pause", "1500ms")
        resp = self.get("max.test", "/again")
        self.assertEqual(resp.status, 504)
        self.assertGreaterEqual(resp.elapsed, 1.45, "504 after the old max-pause")
        self.assertEqual(
            self.state_service(self.proxy, "p-max")["pause_controller"]["fail_after"], 1500 * MS
        )

    def test_stop_page_default_text_and_escaped_messages(self):
        """Scenarios 90, 112, 166 and §11.3: default text, escaped message replacing it, UTF-8,
        and the default text again after resume + stop without message."""
        self.deploy("p-stop", self.up.addr, "--host", "stop.test")
        mark = self.proxy.log_mark()
        self.assertEqual(self.proxy.cli_ok("stop", "p-stop"), "")
        self.proxy.wait_for_log("Service stopped", since=mark, service="p-stop")
        self.assertEqual(self.list_state(self.proxy, "p-stop")[4], "stopped")
        resp = self.get("stop.test", "/page")
        self.assertErrorPage(resp, 503, DEFAULT_503_TEXT)

        message = 'Back soon <b>"really"</b> & it\'s 1+1 – Wartung läuft, bald zurück'
        escaped = (
            "Back soon &lt;b&gt;&#34;really&#34;&lt;/b&gt; &amp; it&#39;s 1&#43;1 – "
            "Wartung läuft, bald zurück"
        )
        self.assertEqual(go_escape(message), escaped)
        self.proxy.cli_ok("stop", "p-stop", f"--message={message}")
        resp = self.get("stop.test", "/page")
        self.assertErrorPage(resp, 503, escaped)
        self.assertNotIn(DEFAULT_503_TEXT, resp.text)
        self.assertNotIn("<b>", resp.text)
        self.assertEqual(
            self.state_service(self.proxy, "p-stop")["pause_controller"]["stop_message"], message
        )

        self.proxy.cli_ok("resume", "p-stop")
        self.assertEqual(self.get("stop.test").text, "first")
        self.proxy.cli_ok("stop", "p-stop")
        resp = self.get("stop.test")
        self.assertErrorPage(resp, 503, DEFAULT_503_TEXT)
        self.assertNotIn("Wartung", resp.text)

    def test_stop_releases_held_requests_with_message(self):
        """Scenario 91: a request waiting in a pause gets the 503 with the stop message."""
        self.deploy("p-rel", self.up.addr, "--host", "rel.test")
        self.proxy.cli_ok("pause", "p-rel", "--max-pause", "20s")
        held = self.bg_request(self.proxy, "GET", "/", host="rel.test")
        wait_in_flight(self.proxy.metrics_port, "p-rel", 1)
        self.assertFalse(held.done())
        self.proxy.cli_ok("stop", "p-rel", "--message", "Back in 15 mins!")
        # Released by the stop (its max-pause is 20s away), with the stop's message.
        resp = held.result(15)
        self.assertErrorPage(resp, 503, "Back in 15 mins!")

    def test_health_path_passes_through_while_paused_or_stopped(self):
        """Scenarios 30, 55, 166: GET/HEAD of the health path answer 200 empty, not proxied."""
        self.deploy("p-health", self.up.addr, "--host", "health.test")
        self.proxy.cli_ok("pause", "p-health", "--max-pause", "150ms")
        checks_before = self.up.health_checks()
        for method, path in (("GET", "/up"), ("HEAD", "/up"), ("GET", "/up?one=two")):
            resp = self.proxy.request(method, path, host="health.test")
            self.assertEqual((resp.status, resp.body), (200, b""), f"paused {method} {path}")
        self.assertEqual(self.get("health.test", "/up/other").status, 504)
        self.assertEqual(self.proxy.request("POST", "/up", host="health.test").status, 504)

        self.proxy.cli_ok("stop", "p-health", "--message", "down")
        for method, path in (("GET", "/up"), ("HEAD", "/up"), ("HEAD", "/up?one=two")):
            resp = self.proxy.request(method, path, host="health.test")
            self.assertEqual((resp.status, resp.body), (200, b""), f"stopped {method} {path}")
        self.assertErrorPage(self.proxy.request("POST", "/up", host="health.test"), 503, "down")
        self.assertErrorPage(self.get("health.test", "/health"), 503, "down")
        self.assertEqual(self.up.health_checks(), checks_before, "pass-through must not proxy")

        # A service whose health path is /health: /up is not special.
        h2 = self.upstream("h2", "--health-path", "/health")
        self.deploy(
            "p-health2", h2.addr, "--host", "health2.test", "--health-check-path", "/health"
        )
        self.proxy.cli_ok("stop", "p-health2")
        self.assertEqual(self.get("health2.test", "/health").status, 200)
        self.assertEqual(self.get("health2.test", "/up").status, 503)

    def test_health_path_with_prefixes(self):
        """Scenario 30: stripped prefix /api → /api/up; unstripped /admin with /admin/up."""
        self.deploy("p-api", self.up.addr, "--host", "prefix.test", "--path-prefix", "/api")
        admin = self.upstream("admin", "--health-path", "/admin/up")
        self.deploy(
            "p-admin",
            admin.addr,
            "--host",
            "prefix.test",
            "--path-prefix",
            "/admin",
            "--strip-path-prefix=false",
            "--health-check-path",
            "/admin/up",
        )
        for svc in ("p-api", "p-admin"):
            self.proxy.cli_ok("pause", svc, "--max-pause", "10ms")
        self.assertEqual(self.get("prefix.test", "/api/up").status, 200)
        self.assertEqual(self.get("prefix.test", "/admin/up").status, 200)
        self.assertEqual(self.get("prefix.test", "/api/other").status, 504)
        self.assertEqual(self.get("prefix.test", "/admin/other").status, 504)

    def test_pause_survives_redeploy(self):
        """Scenario 15: paused (10ms) → 504; redeploy keeps the pause; resume → 200."""
        self.deploy("p-redeploy", self.up.addr, "--host", "redeploy.test")
        self.proxy.cli_ok("pause", "p-redeploy", "--max-pause", "10ms")
        self.assertEqual(self.proxy.request("POST", "/", host="redeploy.test").status, 504)
        second = shared_upstream("second")
        self.proxy.cli_ok(
            "deploy", "p-redeploy", "--target", second.addr, "--host", "redeploy.test"
        )
        self.assertEqual(self.proxy.request("POST", "/", host="redeploy.test").status, 504)
        self.assertEqual(self.list_state(self.proxy, "p-redeploy")[4], "paused")
        self.proxy.cli_ok("resume", "p-redeploy")
        resp = self.proxy.request("POST", "/", host="redeploy.test")
        self.assertEqual((resp.status, resp.text), (200, "second"))

    def test_pause_drains_and_stop_cuts_in_flight(self):
        """Scenario 166: pause waits for a request in flight; stop --drain-timeout 500ms cuts
        one that the upstream holds with 504.  Stopping one service does not affect another."""
        slow = self.upstream("slow")
        self.deploy("p-drain", slow.addr, "--host", "drain.test")
        self.deploy("p-other", self.up.addr, "--host", "other.test")
        gate = self.gate(slow)
        inflight = self.bg_request(self.proxy, "GET", f"/hold?gate={gate}", host="drain.test")
        slow.wait_arrived(gate)
        mark = self.proxy.log_mark()
        pause = Background(
            lambda: self.proxy.cli("pause", "p-drain", "--drain-timeout", "5m", "--max-pause", "5s")
        )
        self.proxy.wait_for_log(
            "Service paused", since=mark, service="p-drain", timeout=PROCESS_TIMEOUT
        )
        # The upstream still holds the request: the pause is draining.
        self.assertEqual(self.proxy.logs("Service drained", since=mark), [])
        self.assertFalse(pause.done(), "pause returned while a request was in flight")
        slow.release(gate)
        resp = inflight.result(15)
        self.assertEqual((resp.status, resp.text), (200, "slow"))
        result = pause.result(PROCESS_TIMEOUT)
        self.assertEqual(result.code, 0, repr(result))
        self.proxy.wait_for_log("Service drained", since=mark, service="p-drain")
        self.proxy.cli_ok("resume", "p-drain")

        gate = self.gate(slow)
        inflight = self.bg_request(self.proxy, "GET", f"/hold?gate={gate}", host="drain.test")
        slow.wait_arrived(gate)
        mark = self.proxy.log_mark()
        result = self.proxy.cli("stop", "p-drain", "--drain-timeout", "500ms")
        self.assertEqual(result.code, 0, repr(result))
        self.assertGreaterEqual(result.elapsed, 0.45, "stop returned before its drain timeout")
        # The upstream holds the request until cleanup: only the drain timeout ends it.
        resp = inflight.result(15)
        self.assertErrorPage(resp, 504)
        self.proxy.wait_for_log("Request cancelled due to draining", since=mark, path="/hold")
        self.assertEqual(self.get("drain.test").status, 503)
        self.assertEqual(self.get("other.test").text, "first")

    def test_unknown_service(self):
        """Scenario 166 (bad input): unknown service for pause/stop/resume."""
        before = self.proxy.cli_ok("list")
        for args in (("pause", "nope"), ("stop", "nope", "--message", "x"), ("resume", "nope")):
            self.assertEqual(self.cli_error(self.proxy, *args), "Error: service not found")
        self.assertEqual(self.proxy.cli_ok("list"), before)
        self.assertEqual(
            self.cli_error(self.proxy, "pause", "x", "--max-pause", "soon"),
            'Error: invalid argument "soon" for "--max-pause" flag: time: invalid duration "soon"',
        )


class PauseRestartTests(TrafficTestCase):
    def test_pause_state_survives_restart_and_restored_pause_can_be_released(self):
        """§14, §15, scenario 142/166: stopped and paused states survive a restart; a restored
        paused service holds requests, and resume/stop release them without crashing."""
        proxy = self.start_proxy(metrics=True)
        up = self.upstream("first")
        self.deploy("stopped", up.addr, "--host", "stopped.test", proxy=proxy)
        self.deploy("paused-a", up.addr, "--host", "a.test", proxy=proxy)
        self.deploy("paused-b", up.addr, "--host", "b.test", proxy=proxy)
        self.deploy("paused-short", up.addr, "--host", "short.test", proxy=proxy)
        proxy.cli_ok("stop", "stopped", "--message", "Zurück um 12 <Uhr>")
        proxy.cli_ok("pause", "paused-a", "--max-pause", "20s")
        proxy.cli_ok("pause", "paused-b", "--max-pause", "20s")
        proxy.cli_ok("pause", "paused-short", "--max-pause", "300ms")
        listing = proxy.cli_ok("list")

        proxy.restart()
        proxy.wait_for_log("Restored saved state")
        self.assertEqual(proxy.cli_ok("list"), listing)
        self.assertEqual(
            self.state_service(proxy, "stopped")["pause_controller"],
            {"state": 2, "stop_message": "Zurück um 12 <Uhr>", "fail_after": 0},
        )
        resp = proxy.request("GET", "/", host="stopped.test")
        self.assertErrorPage(resp, 503, "Zurück um 12 &lt;Uhr&gt;")
        resp = proxy.request("GET", "/", host="short.test")
        self.assertEqual(resp.status, 504)
        self.assertGreaterEqual(resp.elapsed, 0.25, "504 before the restored max-pause")

        held_a = self.bg_request(proxy, "GET", "/", host="a.test")
        held_b = self.bg_request(proxy, "GET", "/", host="b.test")
        wait_in_flight(proxy.metrics_port, "paused-a", 1)
        wait_in_flight(proxy.metrics_port, "paused-b", 1)
        self.assertFalse(held_a.done() or held_b.done(), "restored pause must hold requests")
        result = proxy.cli("resume", "paused-a")
        self.assertEqual((result.code, result.err), (0, ""), "resume of a restored pause")
        self.assertEqual(held_a.result(15).text, "first")
        result = proxy.cli("stop", "paused-b", "--message", "bye")
        self.assertEqual((result.code, result.err), (0, ""), "stop of a restored pause")
        self.assertErrorPage(held_b.result(15), 503, "bye")
        self.assertTrue(proxy.alive(), proxy.describe())
        proxy.cli_ok("resume", "stopped")
        self.assertEqual(proxy.request("GET", "/", host="stopped.test").text, "first")
        self.assertEqual(proxy.request("GET", "/", host="a.test").text, "first")
