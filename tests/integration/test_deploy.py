"""deploy / list / remove through the real CLI, health checks and draining (SPEC §3.5, §3.6,
§8, §12, §13; scenarios 2-4, 10, 20, 140, 141, 144-149, 151, 153)."""

from __future__ import annotations

import threading
import time

from tests.integration.support import (
    PROCESS_TIMEOUT,
    IntegrationTestCase,
    eventually,
    parse_list_output,
    shared_upstream,
)

HEADER = ["Service", "Host", "Path", "Target", "State", "TLS"]


class Background(threading.Thread):
    """Run a callable in a thread and keep its result (or exception) for the test."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e
        self.finished_at = time.monotonic()

    def value(self, timeout: float = 30.0):
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.fn} still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


def check_gaps(up, count: int) -> list[float]:
    """The sorted gaps (seconds) between the last ``count`` health checks that reached ``up``."""
    eventually(lambda: up.health_checks() >= count, timeout=15)
    times = [r["time"] for r in up.stats()["health_requests"]][-count:]
    return sorted(b - a for a, b in zip(times, times[1:], strict=False))


class DeployListRemoveTests(IntegrationTestCase):
    shared = True

    def test_deploy_list_remove(self):
        """Scenarios 2, 4, 140: deploy/list/remove, silent on success."""
        up = shared_upstream("first")
        result = self.proxy.cli("deploy", "basic", "--target", up.addr, "--host", "basic.test")
        self.assertEqual((result.code, result.out, result.err), (0, "", ""))
        self.remove_later("basic")
        self.assertServes("basic.test", "first")

        rows = self.proxy.list_rows()
        self.assertEqual(rows[0], HEADER)
        self.assertIn(["basic", "basic.test", "/", up.addr, "running", "no"], rows[1:])
        self.assertEqual(parse_list_output(self.proxy.cli_ok("ls")), rows)

        result = self.proxy.cli("rm", "basic")
        self.assertEqual((result.code, result.out, result.err), (0, "", ""))
        self.assertNotFound("basic.test")
        self.assertNotIn("basic", [row[0] for row in self.proxy.list_rows()])
        result = self.proxy.cli("remove", "basic")
        self.assertEqual(result.code, 1)
        self.assertEqual(result.err.strip(), "Error: service not found")

    def test_list_format(self):
        """§3.5.1: styled cells padded to the column width plus two spaces, sorted by name."""
        up = shared_upstream("first")
        self.deploy("fmt-b", up.addr, "--host", "b.fmt.test", "--path-prefix", "/api,/app")
        self.deploy("fmt-a", up.addr, "--host", "a.fmt.test,c.fmt.test")
        out = self.proxy.cli_ok("list")
        lines = out.split("\n")
        self.assertEqual(lines[-1], "")
        lines = lines[:-1]
        self.assertEqual(len(lines), 3, out)
        widths = [
            max(len("Service"), len("fmt-a")),
            len("a.fmt.test,c.fmt.test"),
            len("/api,/app"),
            len(up.addr),
            len("running"),
            len("TLS"),
        ]

        def styled(style, text, width):
            return f"\x1b[{style}m{text}\x1b[0m" + " " * (width - len(text)) + "  "

        expected_header = "".join(styled("3;94", h, w) for h, w in zip(HEADER, widths, strict=True))
        self.assertEqual(lines[0], expected_header)
        row_a = ["fmt-a", "a.fmt.test,c.fmt.test", "/", up.addr, "running", "no"]
        expected_a = styled("1;34", row_a[0], widths[0]) + "".join(
            styled("", c, w) for c, w in zip(row_a[1:], widths[1:], strict=True)
        )
        self.assertEqual(lines[1], expected_a)
        self.assertTrue(lines[2].startswith("\x1b[1;34mfmt-b\x1b[0m"), lines[2])

    def test_catch_all_listed_as_star(self):
        """§3.5.1: a service without hosts is listed with host ``*``."""
        up = shared_upstream("first")
        self.deploy("star", up.addr, "--path-prefix", "/only-star-test")
        row = [r for r in self.proxy.list_rows() if r[0] == "star"][0]
        self.assertEqual(row[1:4], ["*", "/only-star-test", up.addr])

    def test_flag_forms(self):
        """Scenario 140: ``--f=v`` and flags before the service name."""
        up = shared_upstream("first")
        self.proxy.cli_ok(
            "deploy", "--target", up.addr, "--deploy-timeout", "5s", "flags", "--host=flags.test"
        )
        self.remove_later("flags")
        self.assertServes("flags.test", "first")
        self.proxy.cli_ok("deploy", "flags", f"--target={up.addr}", "--host", "flags2.test")
        self.assertServes("flags2.test", "first")
        self.assertNotFound("flags.test")

    def test_redeploy_switches_target(self):
        """Scenario 10."""
        first, second = shared_upstream("first"), shared_upstream("second")
        self.deploy("switch", first.addr, "--host", "switch.test")
        self.assertServes("switch.test", "first")
        self.deploy("switch", second.addr, "--host", "switch.test")
        self.assertServes("switch.test", "second")
        row = [r for r in self.proxy.list_rows() if r[0] == "switch"][0]
        self.assertEqual(row[3], second.addr)

    def test_invalid_targets(self):
        """Scenario 141: bad target addresses are rejected and nothing is created."""
        for bad in ("http://127.0.0.1:8000", "a", "127.0.0.1:abc", "/", "bad target"):
            result = self.proxy.cli("deploy", "badtarget", "--target", bad, "--host", "bad.test")
            self.assertEqual(result.code, 1, (bad, result))
            self.assertTrue(result.err.startswith("Error: "), result.err)
            self.assertIn("invalid host pattern", result.err)
            self.assertIn(bad, result.err)
        self.assertNotIn("badtarget", [row[0] for row in self.proxy.list_rows()])
        self.assertNotFound("bad.test")

    def test_hostname_target(self):
        """Scenario 141: ``localhost:PORT`` is valid and listed verbatim."""
        up = shared_upstream("first")
        target = f"localhost:{up.port}"
        self.deploy("byname", target, "--host", "byname.test")
        self.assertServes("byname.test", "first")
        row = [r for r in self.proxy.list_rows() if r[0] == "byname"][0]
        self.assertEqual(row[3], target)

    def test_missing_target_flag(self):
        result = self.proxy.cli("deploy", "notarget")
        self.assertEqual(result.code, 1)
        self.assertEqual(result.err.strip(), 'Error: required flag(s) "target" not set')

    def test_round_robin(self):
        """Scenarios 3 and 148: two targets alternate strictly; ``a,b`` equals two flags."""
        first, second = shared_upstream("first"), shared_upstream("second")
        self.deploy("rr", first.addr, second.addr, "--host", "rr.test")
        bodies = [self.get("rr.test").text for _ in range(8)]
        self.assertEqual(sorted(set(bodies)), ["first", "second"])
        self.assertEqual(bodies.count("first"), 4, bodies)
        for a, b in zip(bodies, bodies[1:], strict=False):
            self.assertNotEqual(a, b, bodies)

        self.proxy.cli_ok(
            "deploy", "rr", "--target", f"{first.addr},{second.addr}", "--host", "rr.test"
        )
        row = [r for r in self.proxy.list_rows() if r[0] == "rr"][0]
        self.assertEqual(row[3], f"{first.addr},{second.addr}")
        bodies = [self.get("rr.test").text for _ in range(4)]
        self.assertEqual(sorted(bodies), ["first", "first", "second", "second"])

    def test_post_empty_body(self):
        """Scenario 49."""
        up = shared_upstream("first")
        self.deploy("emptypost", up.addr, "--host", "emptypost.test")
        resp = self.proxy.request("POST", "/", host="emptypost.test", body=b"")
        self.assertEqual((resp.status, resp.text), (200, "first"))


class HealthTests(IntegrationTestCase):
    shared = True

    def test_deploy_waits_until_healthy(self):
        """Scenario 144: deploy returns only once healthy; no traffic reached the target while
        it was unhealthy, although clients kept asking for its host."""
        up = self.upstream("late", "--health-status", "503")
        stop = threading.Event()
        statuses = []

        def poll():
            while not stop.is_set():
                statuses.append(self.get("late.test").status)
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        self.addCleanup(poller.join, 5)
        self.addCleanup(stop.set)
        deploy = Background(
            self.proxy.cli, "deploy", "late", "--target", up.addr, "--host", "late.test",
            "--deploy-timeout", "5m", "--health-check-interval", "200ms",
        )  # fmt: skip
        self.remove_later("late")
        # The proxy is checking the unhealthy target and clients are asking for its host.
        eventually(lambda: up.health_checks() >= 3, timeout=PROCESS_TIMEOUT)
        eventually(lambda: len(statuses) >= 3, timeout=15)
        self.assertTrue(deploy.is_alive(), "deploy returned before the target was healthy")
        self.assertEqual(up.request_count(), 0, "requests reached the target before it was healthy")
        up.set_health(200)
        result = deploy.value(PROCESS_TIMEOUT)
        self.assertEqual((result.code, result.out, result.err), (0, "", ""))
        stop.set()
        poller.join(5)
        self.assertTrue(set(statuses) <= {404, 200}, statuses)
        self.assertServes("late.test", "late")
        self.proxy.wait_for_log("Target health updated", target=up.addr, state="healthy")

    def test_never_healthy_fails_within_timeout(self):
        """Scenarios 20 and 145: exact message, nothing created."""
        up = self.upstream("sick", "--health-status", "500")
        result = self.proxy.cli(
            "deploy", "sick", "--target", up.addr, "--host", "sick.test", "--deploy-timeout", "1s"
        )
        self.assertEqual(result.code, 1)
        self.assertEqual(
            result.err, "Error: target failed to become healthy within configured timeout (1s)\n"
        )
        self.assertEqual(result.out, "")
        self.assertGreaterEqual(result.elapsed, 0.9, "failed before the deploy timeout")
        # It gave up after 1s, not after the 30s default: at the default 1s interval the target
        # was checked a few times, not thirty (load can only make it fewer).
        self.assertLessEqual(up.health_checks(), 3)
        self.assertNotIn("sick", [row[0] for row in self.proxy.list_rows()])
        self.assertNotFound("sick.test")
        self.proxy.wait_for_log(
            "Healthcheck failed", url=f"http://{up.addr}/up", error="unexpected status (500)"
        )

    def test_closed_port_healthcheck_url(self):
        """Scenario 145: ``Healthcheck failed`` names the URL of a closed port."""
        mark = self.proxy.log_mark()
        result = self.proxy.cli(
            "deploy", "closed", "--target", "127.0.0.1:9", "--host", "closed.test",
            "--deploy-timeout", "500ms",
        )  # fmt: skip
        self.assertEqual(result.code, 1)
        self.assertEqual(
            result.err.strip(),
            "Error: target failed to become healthy within configured timeout (500ms)",
        )
        record = self.proxy.wait_for_log(
            "Healthcheck failed", since=mark, url="http://127.0.0.1:9/up"
        )
        self.assertTrue(record.get("error"))

    def test_failed_redeploy_keeps_old_target(self):
        """Scenario 145: a failed redeploy leaves the old target serving and listed."""
        good = shared_upstream("first")
        bad = self.upstream("bad", "--health-status", "500")
        self.deploy("keep", good.addr, "--host", "keep.test")
        result = self.proxy.cli(
            "deploy", "keep", "--target", bad.addr, "--host", "keep.test", "--deploy-timeout", "1s"
        )
        self.assertEqual(result.code, 1)
        self.assertIn("target failed to become healthy within configured timeout (1s)", result.err)
        self.assertServes("keep.test", "first")
        row = [r for r in self.proxy.list_rows() if r[0] == "keep"][0]
        self.assertEqual(row[3], good.addr)
        self.assertEqual(bad.request_count(), 0)

    def test_one_of_two_unhealthy_fails(self):
        """Scenario 145: all targets must be healthy."""
        good = shared_upstream("first")
        bad = self.upstream("bad", "--health-status", "500")
        result = self.proxy.cli(
            "deploy", "half", "--target", good.addr, "--target", bad.addr, "--host", "half.test",
            "--deploy-timeout", "1s",
        )  # fmt: skip
        self.assertEqual(result.code, 1)
        self.assertIn("target failed to become healthy", result.err)
        self.assertNotFound("half.test")

    def test_force_to_unhealthy_target(self):
        """Scenario 149: ``--force`` returns at once; 503 until the first passing check."""
        up = self.upstream("forced", "--health-status", "500")
        result = self.proxy.cli(
            "deploy", "forced", "--target", up.addr, "--host", "forced.test", "--force",
            "--health-check-interval", "200ms",
        )  # fmt: skip
        self.remove_later("forced")
        # Exit 0 is the "at once": without --force this target would fail the deploy.
        self.assertEqual(result.code, 0, result)
        resp = self.get("forced.test")
        self.assertEqual(resp.status, 503)
        self.assertIn("503", resp.text)
        self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
        self.assertEqual(up.request_count(), 0)
        up.set_health(200)
        eventually(lambda: self.get("forced.test").text == "forced", timeout=5)

    def test_force_to_closed_port(self):
        """Scenario 149: ``--force`` to a closed port returns at once, 503, listed."""
        result = self.proxy.cli(
            "deploy", "forceclosed", "--target", "127.0.0.1:9", "--host", "forceclosed.test",
            "--force",
        )  # fmt: skip
        self.remove_later("forceclosed")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(self.get("forceclosed.test").status, 503)
        row = [r for r in self.proxy.list_rows() if r[0] == "forceclosed"][0]
        self.assertEqual(row[3], "127.0.0.1:9")

    def test_check_counts(self):
        """Scenario 147: each target of a pair is checked every 200ms; a lone healthy target is
        no longer checked and keeps serving when its /up fails."""
        a, b = self.upstream("a"), self.upstream("b")
        self.deploy(
            "pair", a.addr, b.addr, "--host", "pair.test", "--health-check-interval", "200ms"
        )
        a.reset()
        b.reset()
        for up in (a, b):
            gaps = check_gaps(up, 8)
            # The median gap between checks is the interval; a late check shortens the next
            # gap as much as it lengthens its own (fixed rate), so load leaves it in place.
            median = gaps[len(gaps) // 2]
            self.assertTrue(0.1 <= median <= 0.6, f"{up.name}: gaps between checks {gaps}")

        lone = self.upstream("lone")
        self.deploy("lone", lone.addr, "--host", "lone.test", "--health-check-interval", "200ms")
        # Checks stop as the lone target turns healthy, before the deploy returns.
        lone.reset()
        lone.set_health(500)
        a.reset()
        # While the pair's target is checked three times, the lone one is not checked at all.
        eventually(lambda: a.health_checks() >= 3, timeout=15)
        self.assertEqual(lone.health_checks(), 0)
        self.assertServes("lone.test", "lone")

    def test_unhealthy_target_leaves_rotation(self):
        """Scenario 147: a failing target leaves rotation and returns after recovery."""
        a, b = self.upstream("a"), self.upstream("b")
        self.deploy("rot", a.addr, b.addr, "--host", "rot.test", "--health-check-interval", "100ms")
        mark = self.proxy.log_mark()
        a.set_health(500)
        record = self.proxy.wait_for_log(
            "Target health updated", since=mark, target=a.addr, state="unhealthy"
        )
        self.assertEqual(record["was"], "healthy")
        bodies = {self.get("rot.test").text for _ in range(6)}
        self.assertEqual(bodies, {"b"})

        b.set_health(500)
        self.proxy.wait_for_log(
            "Target health updated", since=mark, target=b.addr, state="unhealthy"
        )
        self.assertEqual(self.get("rot.test").status, 503)

        a.set_health(200)
        b.set_health(200)
        self.proxy.wait_for_log("Target health updated", since=mark, target=a.addr, state="healthy")
        self.proxy.wait_for_log("Target health updated", since=mark, target=b.addr, state="healthy")
        bodies = {self.get("rot.test").text for _ in range(6)}
        self.assertEqual(bodies, {"a", "b"})

        # Replaced targets are no longer checked.
        c, d = self.upstream("c"), self.upstream("d")
        self.deploy("rot", c.addr, d.addr, "--host", "rot.test", "--health-check-interval", "100ms")
        # A check of a or b already sent when the deploy switched may still land: let c and d
        # be checked a few times first, then watch a and b while c and d are checked again.
        for _ in range(2):
            for up in (a, b, c, d):
                up.reset()
            eventually(lambda: c.health_checks() >= 3 and d.health_checks() >= 3, timeout=15)
        self.assertEqual((a.health_checks(), b.health_checks()), (0, 0))

    def test_health_check_request_shape(self):
        """Scenario 146: ``GET /up``, ``User-Agent: kamal-proxy``, ``Host: <target>``."""
        up = self.upstream("shape")
        self.deploy("shape", up.addr, "--host", "shape.test")
        req = up.stats()["health_requests"][0]
        self.assertEqual((req["method"], req["target"]), ("GET", "/up"))
        headers = {k.lower(): v for k, v in req["headers"]}
        self.assertEqual(headers.get("user-agent"), "kamal-proxy")
        self.assertEqual(headers.get("host"), up.addr)

    def test_health_check_options(self):
        """Scenario 146: path, host and port options."""
        up = self.upstream("opts", "--health-path", "/health")
        self.deploy(
            "opts", up.addr, "--host", "opts.test", "--health-check-path", "/health",
            "--health-check-host", "health.internal",
        )  # fmt: skip
        stats = up.stats()
        self.assertEqual(stats["counts"].get("/up"), None)
        req = stats["health_requests"][0]
        self.assertEqual(req["target"], "/health")
        self.assertEqual({k.lower(): v for k, v in req["headers"]}["host"], "health.internal")

        checker = self.upstream("checker")
        self.deploy(
            "hport", f"127.0.0.1:{up.port}", "--host", "hport.test",
            "--health-check-port", str(checker.port), "--health-check-interval", "200ms",
        )  # fmt: skip
        self.assertGreaterEqual(checker.health_checks(), 1)
        req = checker.stats()["health_requests"][0]
        self.assertEqual({k.lower(): v for k, v in req["headers"]}["host"], checker.addr)
        self.assertServes("hport.test", "opts")

    def test_health_statuses(self):
        """Scenario 146: 204/299 are healthy; 404 and 302 are not, logged as unexpected."""
        for status in (204, 299):
            up = self.upstream(f"h{status}", "--health-status", str(status))
            self.deploy(
                f"h{status}", up.addr, "--host", f"h{status}.test", "--deploy-timeout", "3s"
            )
        for status in (404, 302):
            up = self.upstream(f"h{status}", "--health-status", str(status))
            result = self.proxy.cli(
                "deploy", f"h{status}", "--target", up.addr, "--host", f"h{status}.test",
                "--deploy-timeout", "300ms",
            )  # fmt: skip
            self.assertEqual(result.code, 1)
            self.proxy.wait_for_log(
                "Healthcheck failed",
                url=f"http://{up.addr}/up",
                error=f"unexpected status ({status})",
            )

    def test_health_check_timeout(self):
        """Scenario 146: a check slower than the timeout fails with ``timed out``."""
        up = self.upstream("slowhealth")
        up.set_health(delay_ms=1500)
        result = self.proxy.cli(
            "deploy", "slowhealth", "--target", up.addr, "--host", "slowhealth.test",
            "--health-check-timeout", "200ms", "--deploy-timeout", "800ms",
        )  # fmt: skip
        self.assertEqual(result.code, 1)
        record = self.proxy.wait_for_log("Healthcheck failed", url=f"http://{up.addr}/up")
        self.assertIn("timed out", record["error"])


class DrainTests(IntegrationTestCase):
    shared = True

    def test_in_flight_request_completes_before_deploy_returns(self):
        """Scenario 151: the deploy drains the old target; new requests reach the new one."""
        old, new = self.upstream("old"), self.upstream("new")
        self.deploy("drain", old.addr, "--host", "drain.test")
        gate = self.gate(old)
        slow = Background(self.get, "drain.test", f"/hold?gate={gate}", timeout=120)
        old.wait_arrived(gate)
        mark = self.proxy.log_mark()
        deploy = Background(
            self.proxy.cli, "deploy", "drain", "--target", new.addr, "--host", "drain.test",
            "--drain-timeout", "5m",
        )  # fmt: skip
        eventually(lambda: self.get("drain.test").text == "new", timeout=PROCESS_TIMEOUT)
        # The old target still holds the request: the deploy must still be draining.
        self.assertTrue(deploy.is_alive(), "deploy returned while a request was in flight")
        self.assertEqual(self.proxy.logs("Deployed", since=mark, service="drain"), [])
        old.release(gate)
        resp = slow.value()
        self.assertEqual((resp.status, resp.text), (200, "old"))
        result = deploy.value()
        self.assertEqual(result.code, 0, result)
        self.proxy.wait_for_log("Deployed", since=mark, service="drain")

    def test_drain_timeout_cancels_request(self):
        """Scenario 151: ``--drain-timeout 1s`` cuts a request the old target still holds with
        504, and the deploy returns then."""
        old, new = self.upstream("old"), self.upstream("new")
        self.deploy("cut", old.addr, "--host", "cut.test")
        gate = self.gate(old)
        slow = Background(self.get, "cut.test", f"/hold?gate={gate}", timeout=120)
        old.wait_arrived(gate)
        mark = self.proxy.log_mark()
        started = time.monotonic()
        result = self.proxy.cli(
            "deploy", "cut", "--target", new.addr, "--host", "cut.test", "--drain-timeout", "1s"
        )
        self.assertEqual(result.code, 0, result)
        self.assertGreaterEqual(
            time.monotonic() - started, 0.9, "returned before the drain timeout"
        )
        resp = slow.value(20)
        self.assertEqual(resp.status, 504)
        record = self.proxy.wait_for_log("Request cancelled due to draining", since=mark)
        self.assertEqual(record.get("target"), old.addr)
        self.assertEqual(record.get("path"), "/hold")
        self.assertServes("cut.test", "new")

    def test_deploy_with_nothing_in_flight_is_prompt(self):
        """Scenario 151: an idle drain returns at once, not after the drain timeout."""
        old, new = self.upstream("old"), self.upstream("new")
        self.deploy("idle", old.addr, "--host", "idle.test")
        self.assertServes("idle.test", "old")
        result = self.proxy.cli(
            "deploy", "idle", "--target", new.addr, "--host", "idle.test", "--drain-timeout", "5m"
        )
        # Waiting for the 5 minutes would outlast the CLI's bound (PROCESS_TIMEOUT, a minute).
        self.assertEqual(result.code, 0)
        self.assertServes("idle.test", "new")

    def test_remove_does_not_wait(self):
        """Scenario 153: remove returns while a request is in flight; that request completes."""
        up = self.upstream("rm")
        other = self.upstream("other")
        self.deploy("rmsvc", up.addr, "--host", "rm.test")
        gate = self.gate(up)
        slow = Background(self.get, "rm.test", f"/hold?gate={gate}", timeout=120)
        up.wait_arrived(gate)
        result = self.proxy.cli("remove", "rmsvc")
        self.assertEqual((result.code, result.out, result.err), (0, "", ""))
        # The upstream holds the request until the release below: had remove waited for it, or
        # for a drain timeout that cancels it, it would not be in flight any more.
        self.assertTrue(slow.is_alive(), "remove returned only once the request had ended")
        self.assertNotFound("rm.test")
        up.release(gate)
        resp = slow.value()
        self.assertEqual((resp.status, resp.text), (200, "rm"))
        again = self.proxy.cli("remove", "rmsvc")
        self.assertEqual(again.code, 1)
        self.assertEqual(again.err.strip(), "Error: service not found")
        self.deploy("rmsvc-2", other.addr, "--host", "rm.test")
        self.assertServes("rm.test", "other")
