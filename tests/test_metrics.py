"""Tests for kamal_proxy.observe.metrics (SPEC §18; scenarios 121, 172)."""

from __future__ import annotations

import gzip
import os

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from kamal_proxy.observe.metrics import (
    BUCKETS,
    Metrics,
    MetricsService,
    method_label,
)
from kamal_proxy.process.listening import ListeningSockets
from kamal_proxy.startup import StartupError

LABELS = ("service", "method", "status")


def samples(metrics: Metrics, prefix: str = "kamal_proxy_") -> dict[tuple[str, tuple], float]:
    """Every sample of the text exposition whose name has ``prefix``, as
    {(name, sorted labels): value}."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain"), content_type
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            if s.name.startswith(prefix):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, tuple]:
    return name, tuple(sorted(labels.items()))


class MethodLabelTests(unittest.TestCase):
    def test_scenario_121(self) -> None:
        for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"):
            self.assertEqual(method_label(m), m)
            self.assertEqual(method_label(m.encode()), m)
        for m in ("CUSTOM", "OTHER", "", "get", "PURGE", b"PURGE", b"", b"post"):
            self.assertEqual(method_label(m), "OTHER")


class MetricsTests(unittest.TestCase):
    def test_scenario_172_samples(self) -> None:
        m = Metrics()
        for _ in range(3):
            m.observe("web", b"GET", 200, 0.003)
        m.observe("web", b"POST", 201, 0.2)
        m.observe("", b"GET", 404, 0.001)
        m.observe("web", "GET", 502, 0.02)
        m.observe("web", b"PURGE", 200, 0.001)
        s = samples(m)
        total = "kamal_proxy_http_requests_total"
        hist = "kamal_proxy_http_request_duration_seconds"
        self.assertEqual(s[key(total, service="web", method="GET", status="200")], 3)
        self.assertEqual(s[key(total, service="web", method="POST", status="201")], 1)
        self.assertEqual(s[key(total, service="", method="GET", status="404")], 1)
        self.assertEqual(s[key(total, service="web", method="GET", status="502")], 1)
        self.assertEqual(s[key(total, service="web", method="OTHER", status="200")], 1)
        self.assertFalse([k for k in s if ("method", "PURGE") in k[1]])
        get200 = dict(service="web", method="GET", status="200")
        self.assertEqual(s[key(hist + "_count", **get200)], 3)
        self.assertEqual(s[key(hist + "_bucket", le="+Inf", **get200)], 3)
        self.assertEqual(s[key(hist + "_bucket", le="0.005", **get200)], 3)
        self.assertAlmostEqual(s[key(hist + "_sum", **get200)], 0.009)
        post = dict(service="web", method="POST", status="201")
        self.assertEqual(s[key(hist + "_bucket", le="0.1", **post)], 0)
        self.assertEqual(s[key(hist + "_bucket", le="0.25", **post)], 1)

    def test_exposition_text(self) -> None:
        m = Metrics()
        m.observe("web", b"GET", 200, 0.5)
        m.inflight("web")
        body, content_type = m.exposition()
        self.assertEqual(content_type, "text/plain; version=0.0.4; charset=utf-8")
        text = body.decode()
        for line in (
            "# HELP kamal_proxy_http_requests_total HTTP requests processed, labeled by service,"
            " status code and method.",
            "# TYPE kamal_proxy_http_requests_total counter",
            "# HELP kamal_proxy_http_request_duration_seconds Duration of HTTP requests, labeled"
            " by service, status code and method.",
            "# TYPE kamal_proxy_http_request_duration_seconds histogram",
            "# HELP kamal_proxy_http_in_flight_requests Number of in-flight HTTP requests,"
            " labeled by service.",
            "# TYPE kamal_proxy_http_in_flight_requests gauge",
        ):
            self.assertIn(line + "\n", text)
        les = [
            line.split('le="')[1].split('"')[0]
            for line in text.splitlines()
            if line.startswith("kamal_proxy_http_request_duration_seconds_bucket")
        ]
        self.assertEqual(les, [f"{b:g}" for b in BUCKETS] + ["+Inf"])
        self.assertIn('le="0.5"', text)
        self.assertNotIn("_created", text)

    def test_bucket_edges_are_inclusive(self) -> None:
        m = Metrics()
        for d in (0.005, 0.0051, 10.0, 10.5):
            m.observe("s", "GET", 200, d)
        s = samples(m)
        labels = dict(service="s", method="GET", status="200")
        bucket = "kamal_proxy_http_request_duration_seconds_bucket"
        self.assertEqual(s[key(bucket, le="0.005", **labels)], 1)
        self.assertEqual(s[key(bucket, le="0.01", **labels)], 2)
        self.assertEqual(s[key(bucket, le="10", **labels)], 3)
        self.assertEqual(s[key(bucket, le="+Inf", **labels)], 4)

    def test_series_created_lazily(self) -> None:
        m = Metrics()
        self.assertEqual(samples(m), {})
        m.inflight("web")
        s = samples(m)
        self.assertEqual(s, {key("kamal_proxy_http_in_flight_requests", service="web"): 0})

    def test_process_series(self) -> None:
        if not os.path.exists("/proc/self/stat"):
            raise unittest.SkipTest("prometheus_client reads the process_* series from /proc")
        s = samples(Metrics(), prefix="process_")
        for name in (
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ):
            self.assertIn(key(name), s)
        self.assertGreater(s[key("process_resident_memory_bytes")], 0)
        self.assertGreater(s[key("process_open_fds")], 0)

    def test_inflight_gauge(self) -> None:
        m = Metrics()
        g = m.inflight("web")
        self.assertIs(m.inflight("web"), g)
        g.inc()
        name = key("kamal_proxy_http_in_flight_requests", service="web")
        self.assertEqual(samples(m)[name], 1)
        g.dec()
        self.assertEqual(samples(m)[name], 0)
        other = m.inflight("api")
        other.inc()
        other.dec()
        self.assertEqual(samples(m)[key("kamal_proxy_http_in_flight_requests", service="api")], 0)

    def test_raw_and_decoded_methods_share_a_series(self) -> None:
        m = Metrics()
        m.observe("web", b"GET", 200, 0.1)
        m.observe("web", "GET", 200, 0.1)
        m.observe("web", b"FOO", 200, 0.1)
        m.observe("web", "OTHER", 200, 0.1)
        s = samples(m)
        total = "kamal_proxy_http_requests_total"
        self.assertEqual(s[key(total, service="web", method="GET", status="200")], 2)
        self.assertEqual(s[key(total, service="web", method="OTHER", status="200")], 2)
        self.assertEqual(len([k for k in s if k[0] == total]), 2)

    def test_own_registry(self) -> None:
        m = Metrics()
        m.observe("web", b"GET", 200, 0.1)
        self.assertIsNot(m.registry, REGISTRY)
        self.assertIsNone(REGISTRY.get_sample_value("kamal_proxy_http_requests_total"))
        self.assertEqual(
            m.registry.get_sample_value(
                "kamal_proxy_http_requests_total",
                {"service": "web", "method": "GET", "status": "200"},
            ),
            1,
        )

    def test_openmetrics_negotiation(self) -> None:
        m = Metrics()
        m.observe("web", b"GET", 200, 0.1)
        body, content_type = m.exposition("application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))


class MetricsServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.logs: list[tuple[str, str, dict]] = []

        def observe(event):
            if "kp_msg" in event:
                self.logs.append((event["kp_level"], event["kp_msg"], dict(event["kp_attrs"])))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def start(self, metrics: Metrics, port: int = 0) -> MetricsService:
        svc = MetricsService(
            reactor, port, metrics, interface="127.0.0.1", sockets=ListeningSockets()
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    @inlineCallbacks
    def test_served_on_every_path(self):
        m = Metrics()
        m.observe("web", b"GET", 200, 0.01)
        svc = self.start(m)
        self.assertIn(("INFO", "Metrics enabled", {"address": ":0"}), self.logs)
        agent = Agent(reactor)
        for path in (b"/", b"/metrics", b"/some/other/path?x=1"):
            url = b"http://127.0.0.1:%d%s" % (svc.bound_port, path)
            response = yield agent.request(b"GET", url)
            body = yield readBody(response)
            self.assertEqual(response.code, 200)
            [ct] = response.headers.getRawHeaders(b"content-type")
            self.assertTrue(ct.startswith(b"text/plain"), ct)
            self.assertIn(b'kamal_proxy_http_requests_total{method="GET",service="web"', body)
        response = yield agent.request(
            b"GET",
            b"http://127.0.0.1:%d/" % svc.bound_port,
            Headers({b"accept-encoding": [b"gzip"]}),
        )
        body = yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertIn(
            b"# TYPE kamal_proxy_http_request_duration_seconds histogram\n", gzip.decompress(body)
        )
        response = yield agent.request(
            b"GET",
            b"http://127.0.0.1:%d/" % svc.bound_port,
            Headers({b"accept": [b"application/openmetrics-text; version=1.0.0"]}),
        )
        body = yield readBody(response)
        [ct] = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(ct.startswith(b"application/openmetrics-text"), ct)
        self.assertTrue(body.endswith(b"# EOF\n"))

    @inlineCallbacks
    def test_listen_failure(self):
        first = self.start(Metrics())
        port = first.bound_port
        second = MetricsService(
            reactor, port, Metrics(), interface="127.0.0.1", sockets=ListeningSockets()
        )
        e = self.assertRaises(StartupError, second.startService)
        self.assertEqual(str(e), f"listen tcp :{port}: bind: address already in use")
        self.assertFalse(second.running)
        yield second.stopService()

    @inlineCallbacks
    def test_default_listener_is_dual_stack(self):
        m = Metrics()
        svc = MetricsService(reactor, 0, m, sockets=ListeningSockets())
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(svc.port.getHost().host, "::")
        response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/" % svc.bound_port)
        yield readBody(response)
        self.assertEqual(response.code, 200)
