"""Read targets and writer affinity against the real process (SPEC §8.2-§8.4, §9.2; scenarios
79-84, 168)."""

from __future__ import annotations

import calendar
import time
from email.utils import parsedate_tz

from tests.integration.support import WebSocketClient
from tests.integration.traffic_support import (
    TrafficTestCase,
    parse_set_cookie,
    shared_upstream,
)

WRITES = ("POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class ReaderTests(TrafficTestCase):
    shared = True

    def setUp(self):
        super().setUp()
        self.writer = shared_upstream("writer")
        self.reader = shared_upstream("reader")

    def who(self, resp) -> str:
        self.assertEqual(resp.status, 200, repr(resp))
        return resp.header("X-Upstream-Name")

    def writer_cookies(self, resp) -> list[str]:
        return [c for c in resp.header_all("Set-Cookie") if c.startswith("kamal-writer=")]

    def test_methods_cookie_and_affinity(self):
        """Scenarios 79, 81, 82, 84, 168: reads to the reader, writes to the writer with the
        kamal-writer cookie; the cookie pins reads to the writer until it expires."""
        self.deploy(
            "rd-basic",
            self.writer.addr,
            "--read-target",
            self.reader.addr,
            "--host",
            "basic.readers",
            "--writer-affinity-timeout",
            "700ms",
        )
        self.assertEqual(
            self.list_state(self.proxy, "rd-basic")[3], f"{self.writer.addr},{self.reader.addr}"
        )
        client = self.proxy.client(host="basic.readers")
        for method in ("GET", "HEAD", "GET", "HEAD"):
            resp = client.request(method, "/")
            self.assertEqual(self.who(resp), "reader", method)
            self.assertEqual(self.writer_cookies(resp), [], f"{method} must not set the cookie")
        for method in WRITES:
            before_ms = time.time() * 1000
            resp = client.request(method, "/", body=b"x")
            self.assertEqual(self.who(resp), "writer", method)
            cookies = self.writer_cookies(resp)
            self.assertEqual(len(cookies), 1, f"{method}: {resp!r}")
        name, value, attrs = parse_set_cookie(cookies[0])
        self.assertEqual(list(attrs), ["path", "expires", "httponly"], cookies[0])
        self.assertEqual(attrs["path"], "/")
        expires_ms = int(value)
        self.assertTrue(before_ms + 600 <= expires_ms <= time.time() * 1000 + 800, cookies[0])
        parsed = parsedate_tz(attrs["expires"])
        self.assertIsNotNone(parsed, cookies[0])
        self.assertTrue(attrs["expires"].endswith(" GMT"), cookies[0])
        self.assertEqual(calendar.timegm(parsed[:9]), expires_ms // 1000 + 1, cookies[0])

        # Pinned reads, with a cookie that stays valid however slowly these requests go (the
        # one above expires 700ms after the write); it expires below.
        pinned = {"Cookie": f"kamal-writer={int(time.time() * 1000) + 60_000}"}
        resp = client.request("GET", "/", headers=pinned)
        self.assertEqual(self.who(resp), "writer")
        self.assertEqual(self.writer_cookies(resp), [], "a pinned read gets no new cookie")
        resp = client.request("GET", "/echo", headers=pinned)
        self.assertEqual(resp.echo_header("X-Kamal-Target"), self.writer.addr)
        resp = client.request("GET", "/echo")
        self.assertEqual(resp.echo_header("X-Kamal-Target"), self.reader.addr)
        resp = client.request("POST", "/echo", headers={"X-Kamal-Target": "existing"})
        self.assertEqual(resp.echo_header("X-Kamal-Target"), f"existing, {self.writer.addr}")

        for bad in ("abc", str(int(time.time() * 1000) - 1), "", "9" * 30):
            resp = client.request("GET", "/", headers={"Cookie": f"kamal-writer={bad}"})
            self.assertEqual(self.who(resp), "reader", f"invalid cookie {bad!r}")
        cookie = {"Cookie": f"kamal-writer={value}"}
        time.sleep(max(0.0, expires_ms / 1000 - time.time()) + 0.05)
        self.assertEqual(self.who(client.request("GET", "/", headers=cookie)), "reader")
        client.close()

    def test_forward_headers_off_replaces_kamal_target(self):
        """Scenario 84: without forward headers an incoming X-Kamal-Target is replaced."""
        self.deploy(
            "rd-nofwd",
            self.writer.addr,
            "--read-target",
            self.reader.addr,
            "--host",
            "nofwd.readers",
            "--forward-headers=false",
        )
        resp = self.proxy.request(
            "POST", "/echo", host="nofwd.readers", headers={"X-Kamal-Target": "existing"}
        )
        self.assertEqual(resp.echo_header_all("X-Kamal-Target"), [self.writer.addr])

    def test_no_cookie_cases(self):
        """Scenarios 83, 168: opt-out header, timeout 0 and no readers → no cookie."""
        self.deploy(
            "rd-optout",
            self.writer.addr,
            "--read-target",
            self.reader.addr,
            "--host",
            "optout.readers",
        )
        resp = self.proxy.request(
            "POST", "/respond?h=X-Writer-Affinity:false&h=X-Other:1", host="optout.readers"
        )
        self.assertEqual(self.who(resp), "writer")
        self.assertEqual(self.writer_cookies(resp), [])
        self.assertIsNone(resp.header("X-Writer-Affinity"))
        self.assertEqual(resp.header("X-Other"), "1")
        resp = self.proxy.request(
            "POST", "/respond?h=X-Writer-Affinity:true", host="optout.readers"
        )
        self.assertEqual(len(self.writer_cookies(resp)), 1)
        self.assertIsNone(resp.header("X-Writer-Affinity"))

        self.deploy(
            "rd-zero",
            self.writer.addr,
            "--read-target",
            self.reader.addr,
            "--host",
            "zero.readers",
            "--writer-affinity-timeout",
            "0s",
        )
        resp = self.proxy.request("POST", "/", host="zero.readers")
        self.assertEqual((self.who(resp), self.writer_cookies(resp)), ("writer", []))

        self.deploy("rd-alone", self.writer.addr, "--host", "alone.readers")
        for method in ("GET", "HEAD", "POST"):
            resp = self.proxy.request(method, "/", host="alone.readers")
            self.assertEqual((self.who(resp), self.writer_cookies(resp)), ("writer", []))

    def test_two_readers_alternate_and_fallback(self):
        """Scenarios 168, 147: two readers alternate; reads fall back to the writer when no
        reader is healthy."""
        r1 = self.upstream("r1")
        r2 = self.upstream("r2")
        self.deploy(
            "rd-two",
            self.writer.addr,
            "--read-target",
            r1.addr,
            "--read-target",
            r2.addr,
            "--host",
            "two.readers",
            "--health-check-interval",
            "100ms",
        )
        client = self.proxy.client(host="two.readers")
        seen = [self.who(client.request("GET", "/")) for _ in range(6)]
        self.assertEqual(sorted(set(seen)), ["r1", "r2"])
        self.assertTrue(all(a != b for a, b in zip(seen, seen[1:], strict=False)), seen)

        r1.set_health(500)
        r2.set_health(500)
        self.proxy.wait_for_log(
            "Target health updated", timeout=5, target=r2.addr, state="unhealthy"
        )
        self.proxy.wait_for_log(
            "Target health updated", timeout=5, target=r1.addr, state="unhealthy"
        )
        self.assertEqual(self.who(client.request("GET", "/")), "writer")
        client.close()

    def test_websockets_go_to_writer_unless_enabled(self):
        """Scenarios 80, 168: WebSocket upgrades to the writer; --read-target-websockets."""
        self.deploy(
            "rd-ws", self.writer.addr, "--read-target", self.reader.addr, "--host", "ws.readers"
        )
        self.deploy(
            "rd-ws2",
            self.writer.addr,
            "--read-target",
            self.reader.addr,
            "--host",
            "ws2.readers",
            "--read-target-websockets",
        )
        for host, want in (("ws.readers", "writer"), ("ws2.readers", "reader")):
            ws = WebSocketClient.connect(self.proxy.http_port, host=host)
            try:
                self.assertEqual(ws.status, 101)
                ws.send("__name__")
                self.assertEqual(ws.recv(), (1, want.encode()), host)
            finally:
                ws.close()
