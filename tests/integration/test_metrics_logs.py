"""Prometheus metrics and the request log line against the real process (SPEC §9.3, §17.2,
§18; scenarios 56, 117-121, 171, 172)."""

from __future__ import annotations

import json
import socket
import time

from tests.integration.support import http_request
from tests.integration.traffic_support import (
    TrafficTestCase,
    parse_metrics,
    sample,
    shared_upstream,
)

BUCKETS = [
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    "1.0",
    "2.5",
    "5.0",
    "10.0",
    "+Inf",
]
REQUEST_KEYS = [
    "time",
    "level",
    "msg",
    "host",
    "port",
    "path",
    "request_id",
    "status",
    "service",
    "target",
    "duration",
    "method",
    "req_content_length",
    "req_content_type",
    "resp_content_length",
    "resp_content_type",
    "client_addr",
    "client_port",
    "remote_addr",
    "user_agent",
    "proto",
    "scheme",
    "query",
]


class MetricsTests(TrafficTestCase):
    shared = True
    metrics = True

    def scrape(self, path: str = "/metrics"):
        resp = http_request(self.proxy.metrics_port, "GET", path)
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.header("Content-Type", "").startswith("text/plain"), repr(resp))
        return resp.text, parse_metrics(resp.text)

    def test_metrics_after_traffic(self):
        """Scenarios 56, 121, 172: counters, histogram and gauge after real traffic."""
        log = self.proxy.wait_for_log("Metrics enabled")
        self.assertIn(str(self.proxy.metrics_port), log["address"])
        up = shared_upstream("metrics")
        self.deploy(
            "web",
            up.addr,
            "--host",
            "web.metrics",
            "--exclude-metrics-path",
            "/skip",
            "--exclude-metrics-path",
            "/healthz",
        )
        doomed = self.upstream("doomed")
        self.deploy("down", doomed.addr, "--host", "down.metrics")
        doomed.stop()

        client = self.proxy.client(host="web.metrics")
        for path in ("/", "/a?x=1", "/skip/nested"):
            self.assertEqual(client.request("GET", path).status, 200)
        self.assertEqual(client.request("POST", "/respond?status=201", body=b"hi").status, 201)
        purge_status = str(client.request("PURGE", "/").status)  # upstream_app: 501
        mark = self.proxy.log_mark()
        self.assertEqual(client.request("GET", "/skip").status, 200)
        self.assertEqual(client.request("POST", "/healthz", body=b"").status, 200)
        self.assertEqual(self.get("nothing.metrics").status, 404)
        self.assertEqual(self.get("down.metrics").status, 502)
        client.close()
        self.proxy.wait_for_log("Request", since=mark, path="/skip", status=200)
        self.proxy.wait_for_log("Request", since=mark, path="/healthz", method="POST")

        gate = self.gate(up)
        slow = self.bg_request(self.proxy, "GET", f"/hold?gate={gate}", host="web.metrics")
        up.wait_arrived(gate)
        _, during = self.scrape("/any/path")
        self.assertEqual(sample(during, "kamal_proxy_http_in_flight_requests", service="web"), 1)
        # Held for 0.8 s at least (a lower bound: the histogram checks below rely on it).
        time.sleep(0.8)
        up.release(gate)
        self.assertEqual(slow.result(15).status, 200)

        text, samples = self.scrape()
        for line in (
            "# HELP kamal_proxy_http_requests_total HTTP requests processed, labeled by service, "
            "status code and method.",
            "# TYPE kamal_proxy_http_requests_total counter",
            "# HELP kamal_proxy_http_request_duration_seconds Duration of HTTP requests, "
            "labeled by service, status code and method.",
            "# TYPE kamal_proxy_http_request_duration_seconds histogram",
            "# HELP kamal_proxy_http_in_flight_requests Number of in-flight HTTP requests, "
            "labeled by service.",
            "# TYPE kamal_proxy_http_in_flight_requests gauge",
        ):
            self.assertIn(line, text.splitlines())
        total = "kamal_proxy_http_requests_total"
        hist = "kamal_proxy_http_request_duration_seconds"
        self.assertEqual(sample(samples, total, service="web", method="GET", status="200"), 4)
        self.assertEqual(sample(samples, total, service="web", method="POST", status="201"), 1)
        self.assertEqual(
            sample(samples, total, service="web", method="OTHER", status=purge_status), 1
        )
        self.assertEqual(sample(samples, total, service="", method="GET", status="404"), 1)
        self.assertEqual(sample(samples, total, service="down", method="GET", status="502"), 1)
        self.assertNotIn("PURGE", text)
        self.assertIsNone(
            sample(samples, total, service="web", method="POST", status="200"),
            "excluded POST /healthz was counted",
        )
        labels = dict(service="web", method="GET", status="200")
        self.assertEqual(sample(samples, hist + "_count", **labels), 4)
        self.assertEqual(sample(samples, hist + "_bucket", le="+Inf", **labels), 4)
        self.assertGreater(sample(samples, hist + "_sum", **labels), 0.7, "slow request's time")
        les = [
            dict(k)["le"]
            for (name, k) in samples
            if name == hist + "_bucket"
            and dict(k)["service"] == "web"
            and dict(k)["method"] == "GET"
        ]
        self.assertEqual([float(le) for le in les], [float(b) for b in BUCKETS])
        self.assertEqual(sample(samples, hist + "_bucket", le="0.5", **labels), 3)
        self.assertEqual(sample(samples, "kamal_proxy_http_in_flight_requests", service="web"), 0)
        self.assertIsNone(sample(samples, "kamal_proxy_http_in_flight_requests", service=""))


class RequestLogTests(TrafficTestCase):
    shared = True

    def log_line(self, mark_lines: int, path: str, **attrs) -> dict:
        """The raw ``Request`` line (keys in written order) for ``path`` after a mark."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for raw in list(self.proxy.lines[mark_lines:]):
                try:
                    pairs = json.loads(raw, object_pairs_hook=list)
                except ValueError:
                    continue
                record = dict(pairs)
                if (
                    record.get("msg") == "Request"
                    and record.get("path") == path
                    and all(record.get(k) == v for k, v in attrs.items())
                ):
                    record["__keys__"] = [k for k, _ in pairs]
                    return record
            time.sleep(0.05)
        raise AssertionError(f"no Request log for {path}\n" + self.proxy.describe())

    def test_request_log_fields(self):
        """Scenarios 117, 171: every §17.2 field with the values sent, custom req_/resp_ keys
        (canonicalised names, multiple values joined with ","), remote_addr from XFF."""
        self.assertEqual(self.proxy.logs("Metrics enabled"), [])
        up = shared_upstream("logs")
        self.deploy(
            "logs",
            up.addr,
            "--host",
            "app.example.com",
            "--log-request-header",
            "x-custom",
            "--log-request-header",
            "X-A",
            "--log-response-header",
            "Cache-Control",
            "--log-response-header",
            "x-custom",
        )
        mark = len(self.proxy.lines)
        query = (
            "status=201&ctype=text/html&body=12345678&h=X-Custom:goodbye"
            "&h=Cache-Control:public,%20max-age%3D3600"
        )
        resp = self.proxy.request(
            "POST",
            f"/respond?{query}",
            host="app.example.com",
            body=b"hello",
            headers=[
                ("Content-Type", "application/json"),
                ("User-Agent", "Robot/1"),
                ("X-Forwarded-For", "192.168.1.1"),
                ("x-custom", "hello"),
                ("X-A", "1"),
                ("x-a", "2"),
                ("X-Request-ID", "request-id"),
            ],
        )
        self.assertEqual((resp.status, resp.text), (201, "12345678"))
        log = self.log_line(mark, "/respond")
        self.assertEqual(
            log.pop("__keys__"),
            REQUEST_KEYS + ["req_x_custom", "req_x_a", "resp_cache_control", "resp_x_custom"],
        )
        self.assertIsInstance(log.pop("duration"), int)
        self.assertTrue(log.pop("client_port").isdigit())
        log.pop("time")
        self.assertEqual(
            log,
            {
                "level": "INFO",
                "msg": "Request",
                "host": "app.example.com",
                "port": self.proxy.http_port,
                "path": "/respond",
                "request_id": "request-id",
                "status": 201,
                "service": "logs",
                "target": up.addr,
                "method": "POST",
                "req_content_length": 5,
                "req_content_type": "application/json",
                "resp_content_length": 8,
                "resp_content_type": "text/html",
                "client_addr": "127.0.0.1",
                "remote_addr": "192.168.1.1",
                "user_agent": "Robot/1",
                "proto": "HTTP/1.1",
                "scheme": "http",
                "query": query,
                "req_x_custom": "hello",
                "req_x_a": "1,2",
                "resp_cache_control": "public, max-age=3600",
                "resp_x_custom": "goodbye",
            },
        )

        mark = len(self.proxy.lines)
        self.proxy.request("GET", "/slow?ms=300&x=1&y=2", host="app.example.com")
        log = self.log_line(mark, "/slow")
        self.assertGreaterEqual(log["duration"], 250_000_000)
        self.assertEqual(
            (log["query"], log["req_content_length"], log["remote_addr"]),
            ("ms=300&x=1&y=2", 0, "127.0.0.1"),
        )
        self.assertEqual((log["req_x_custom"], log["resp_x_custom"]), ("", ""))

        mark = len(self.proxy.lines)
        self.get("unrouted.example.com", "/nowhere")
        log = self.log_line(mark, "/nowhere")
        self.assertEqual((log["status"], log["service"], log["target"]), (404, "", ""))
        self.assertEqual(log["__keys__"], REQUEST_KEYS)

    def test_client_ip_header_and_kamal_log_headers(self):
        """Scenarios 50, 118, 160, 171: --client-ip-header sets remote_addr and XFF (header
        name matched case-insensitively); Kamal's default --log-request-header trio."""
        up = shared_upstream("logs")
        self.deploy(
            "cip",
            up.addr,
            "--host",
            "cip.example.com",
            "--client-ip-header",
            "True-Client-IP",
            "--log-request-header",
            "Cache-Control",
            "--log-request-header",
            "Last-Modified",
            "--log-request-header",
            "User-Agent",
        )
        mark = len(self.proxy.lines)
        resp = self.proxy.request(
            "GET",
            "/echo",
            host="cip.example.com",
            headers={
                "X-Forwarded-For": "10.10.10.10",
                "true-client-ip": "203.0.113.7",
                "Cache-Control": "no-cache",
                "User-Agent": "kamal-test",
            },
        )
        self.assertEqual(resp.echo_header("X-Forwarded-For"), "203.0.113.7, 127.0.0.1")
        self.assertEqual(resp.echo_header("True-Client-IP"), "203.0.113.7")
        log = self.log_line(mark, "/echo")
        self.assertEqual(log["remote_addr"], "203.0.113.7")
        self.assertEqual(
            (log["req_cache_control"], log["req_last_modified"], log["req_user_agent"]),
            ("no-cache", "", "kamal-test"),
        )
        mark = len(self.proxy.lines)
        resp = self.proxy.request(
            "GET", "/echo", host="cip.example.com", headers={"X-Forwarded-For": "6.6.6.6"}
        )
        self.assertEqual(resp.echo_header("X-Forwarded-For"), "6.6.6.6, 127.0.0.1")
        self.assertEqual(self.log_line(mark, "/echo")["remote_addr"], "6.6.6.6")

    def test_client_disconnect_logged_as_499(self):
        """Scenario 171: a client that hangs up during a slow upstream response → 499."""
        self.deploy("gone", shared_upstream("logs").addr, "--host", "gone.example.com")
        mark = len(self.proxy.lines)
        up = shared_upstream("logs")
        gate = self.gate(up)
        with socket.create_connection(("127.0.0.1", self.proxy.http_port), timeout=10) as s:
            s.sendall(f"GET /hold?gate={gate} HTTP/1.1\r\nHost: gone.example.com\r\n\r\n".encode())
            up.wait_arrived(gate)
        # Logged while the upstream still holds the request (released only at cleanup).
        log = self.log_line(mark, "/hold", service="gone")
        self.assertEqual((log["status"], log["resp_content_length"]), (499, 0))

    def test_scope_cookie_paths(self):
        """Scenarios 34-37, 161 (issue item 6): --scope-cookie-paths rewrites Set-Cookie paths
        below the stripped prefix; other domains and the default stay byte-identical."""
        up = shared_upstream("logs")
        self.deploy(
            "cookies-on",
            up.addr,
            "--host",
            "cookie.example.com",
            "--path-prefix",
            "/app",
            "--scope-cookie-paths",
        )
        self.deploy(
            "cookies-off", up.addr, "--host", "cookie.example.com", "--path-prefix", "/plain"
        )
        query = (
            "h=Set-Cookie:s%3D1%3B%20Path%3D/something"
            "&h=Set-Cookie:t%3D2"
            "&h=Set-Cookie:u%3D3%3B%20Path%3D/"
            "&h=Set-Cookie:v%3D4%3B%20Path%3D/x%3B%20Domain%3Dother.com"
            "&h=Set-Cookie:w%3D5%3B%20Path%3D/original%3B%20Domain%3Dcookie.example.com"
        )
        resp = self.get("cookie.example.com:8080", f"/app/respond?{query}")
        self.assertEqual(resp.status, 200, repr(resp))
        self.assertEqual(
            resp.header_all("Set-Cookie"),
            [
                "s=1; Path=/app/something",
                "t=2; Path=/app",
                "u=3; Path=/app",
                "v=4; Path=/x; Domain=other.com",
                "w=5; Path=/app/original; Domain=cookie.example.com",
            ],
        )
        resp = self.get("cookie.example.com", f"/plain/respond?{query}")
        self.assertEqual(
            resp.header_all("Set-Cookie"),
            [
                "s=1; Path=/something",
                "t=2",
                "u=3; Path=/",
                "v=4; Path=/x; Domain=other.com",
                "w=5; Path=/original; Domain=cookie.example.com",
            ],
        )
