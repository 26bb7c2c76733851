"""What the upstream sees and what the client gets back (SPEC §9; scenarios 60, 64-67, 155,
157-160, part of 165)."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time

from tests.integration.support import (
    PROCESS_TIMEOUT,
    HttpClient,
    IntegrationTestCase,
    WebSocketClient,
    eventually,
    pattern_bytes,
    raw_exchange,
    raw_status,
    shared_upstream,
)
from tests.integration.traffic_support import Background

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
MiB = 1 << 20


class ProxyTestCase(IntegrationTestCase):
    shared = True
    HOST = "proxy.example.com"

    def setUp(self):
        super().setUp()
        self.app = shared_upstream("app")

    def deploy_app(self, *args: str, host: str | None = None, service: str = "app"):
        self.deploy(service, self.app.addr, "--host", host or self.HOST, *args)

    def echo(self, path: str = "/echo", method: str = "GET", **kwargs):
        kwargs.setdefault("host", self.HOST)
        resp = self.proxy.request(method, path, **kwargs)
        self.assertEqual(resp.status, 200, resp)
        return resp


class RequestForwardingTests(ProxyTestCase):
    def test_plain_body(self):
        """Scenario 60."""
        self.deploy_app()
        resp = self.proxy.request("GET", "/", host=self.HOST)
        self.assertEqual((resp.status, resp.text), (200, "app"))
        self.assertEqual(resp.header("Server"), "upstream-app")  # relayed, none added

    def test_host_header_preserved(self):
        """Scenarios 64 and 155: the upstream sees the client's Host, port included."""
        self.deploy_app(host="custom.example.com")
        resp = self.echo(host="custom.example.com")
        self.assertEqual(resp.echo_header_all("Host"), ["custom.example.com"])
        resp = self.echo(host="custom.example.com:8443")
        self.assertEqual(resp.echo_header_all("Host"), ["custom.example.com:8443"])

    def test_raw_query_and_encoded_path(self):
        """Scenarios 67 and 155: raw query byte for byte; encoded path unchanged."""
        self.deploy_app()
        resp = self.echo("/test?p1=a;b;c&p2=%x&p3=ok")
        self.assertEqual(resp.header("X-Upstream-Path"), "/test?p1=a;b;c&p2=%x&p3=ok")
        resp = self.echo("/echo?p1=a;b;c&p2=%x&p3=ok&e=%20+")
        self.assertEqual(resp.json()["query"], "p1=a;b;c&p2=%x&p3=ok&e=%20+")
        resp = self.echo("/echo/a%2Fb%20c")
        self.assertEqual(resp.json()["path"], "/echo/a%2Fb%20c")

    def test_methods_and_bodies(self):
        """Scenario 155: methods with their bodies; HEAD keeps Content-Length, no body."""
        self.deploy_app()
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            body = f"body of {method}".encode()
            info = self.echo(method=method, body=body).json()
            self.assertEqual(info["method"], method)
            self.assertEqual(info["body"], body.decode())
            self.assertEqual(info["body_sha256"], hashlib.sha256(body).hexdigest())
        resp = self.proxy.request("HEAD", "/big?bytes=12345", host=self.HOST)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.header("Content-Length"), "12345")
        self.assertEqual(resp.body, b"")
        resp = self.proxy.request("HEAD", "/", host=self.HOST)
        self.assertEqual((resp.status, resp.header("Content-Length"), resp.body), (200, "3", b""))

    def test_empty_content_length(self):
        """§9.1: ``Content-Length: 0`` is sent without a body."""
        self.deploy_app()
        info = self.echo(method="POST", body=b"").json()
        self.assertEqual(info["body_length"], 0)

    def test_forward_headers_default(self):
        """Scenarios 66 and 159: forward headers on by default without TLS."""
        self.deploy_app()
        resp = self.echo()
        self.assertEqual(resp.echo_header_all("X-Forwarded-For"), ["127.0.0.1"])
        self.assertEqual(resp.echo_header("X-Forwarded-Proto"), "http")
        self.assertEqual(resp.echo_header("X-Forwarded-Host"), self.HOST)
        self.assertIsNone(resp.echo_header("Forwarded"))
        resp = self.echo(
            headers={
                "X-Forwarded-For": "1.2.3.4",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "fwd.example.com",
                "Forwarded": "for=6.6.6.6",
            }
        )
        self.assertEqual(resp.echo_header_all("X-Forwarded-For"), ["1.2.3.4, 127.0.0.1"])
        self.assertEqual(resp.echo_header("X-Forwarded-Proto"), "https")
        self.assertEqual(resp.echo_header("X-Forwarded-Host"), "fwd.example.com")
        self.assertIsNone(resp.echo_header("Forwarded"))

    def test_forward_headers_off(self):
        """Scenarios 65 and 159: ``--forward-headers=false`` replaces client values."""
        self.deploy_app("--forward-headers=false")
        resp = self.echo(
            headers={
                "X-Forwarded-For": "10.10.10.10",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "untrusted.example.com",
                "Custom-Header": "Custom value",
            }
        )
        self.assertEqual(resp.echo_header_all("X-Forwarded-For"), ["127.0.0.1"])
        self.assertEqual(resp.echo_header("X-Forwarded-Proto"), "http")
        self.assertEqual(resp.echo_header("X-Forwarded-Host"), self.HOST)
        self.assertEqual(resp.echo_header("Custom-Header"), "Custom value")

    def test_client_ip_header(self):
        """Scenarios 50 and 160: the client IP header, matched case-insensitively."""
        self.deploy_app("--client-ip-header", "cf-connecting-ip")
        resp = self.echo(headers={"CF-Connecting-IP": "203.0.113.9", "X-Forwarded-For": "6.6.6.6"})
        self.assertEqual(resp.echo_header("X-Forwarded-For"), "203.0.113.9, 127.0.0.1")
        self.assertEqual(resp.echo_header("CF-Connecting-IP"), "203.0.113.9")
        resp = self.echo(headers={"X-Forwarded-For": "6.6.6.6"})
        self.assertEqual(resp.echo_header("X-Forwarded-For"), "6.6.6.6, 127.0.0.1")

    def test_request_id_and_start(self):
        """Scenario 160: generated UUIDv4 request IDs, kept client values, request start."""
        self.deploy_app()
        ids = set()
        for _ in range(3):
            before = int(time.time() * 1000)
            resp = self.echo()
            after = int(time.time() * 1000)
            request_id = resp.echo_header("X-Request-ID")
            self.assertRegex(request_id, UUID4)
            ids.add(request_id)
            self.assertIsNone(resp.header("X-Request-ID"))
            start = resp.echo_header("X-Request-Start")
            self.assertRegex(start, r"^t=\d+$")
            self.assertTrue(before - 5 <= int(start[2:]) <= after + 5, (before, start, after))
        self.assertEqual(len(ids), 3)
        resp = self.echo(headers={"X-Request-ID": "my-request-123", "X-Request-Start": "t=42"})
        self.assertEqual(resp.echo_header_all("X-Request-ID"), ["my-request-123"])
        self.assertEqual(resp.echo_header_all("X-Request-Start"), ["t=42"])
        self.assertIsNone(resp.header("X-Request-ID"))

    def test_hop_by_hop_and_passthrough_headers(self):
        """Scenario 160: hop-by-hop headers dropped, others passed, no User-Agent invented."""
        self.deploy_app()
        resp = self.echo(
            headers={
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "Authorization": "Bearer token",
                "Cookie": "a=1; b=2",
                "X-Custom": "custom",
            }
        )
        for name in ("X-Drop-Me", "Keep-Alive", "Proxy-Authorization", "User-Agent"):
            self.assertIsNone(resp.echo_header(name), name)
        self.assertEqual(resp.echo_header("Authorization"), "Bearer token")
        self.assertEqual(resp.echo_header("Cookie"), "a=1; b=2")
        self.assertEqual(resp.echo_header("X-Custom"), "custom")
        resp = self.echo(headers={"User-Agent": "Robot/1"})
        self.assertEqual(resp.echo_header("User-Agent"), "Robot/1")

    def test_target_header(self):
        """§9.2: ``X-Kamal-Target`` names the chosen target."""
        self.deploy_app()
        self.assertEqual(self.echo().echo_header("X-Kamal-Target"), self.app.addr)

    def test_response_headers_and_statuses_relayed(self):
        """Scenario 160 and §9.4: upstream headers and error statuses are relayed untouched."""
        self.deploy_app()
        resp = self.proxy.request(
            "GET", "/respond?status=201&h=Cache-Control:public,%20max-age=60&h=X-Thing:yes&body=hi",
            host=self.HOST,
        )  # fmt: skip
        self.assertEqual((resp.status, resp.text), (201, "hi"))
        self.assertEqual(resp.header("Cache-Control"), "public, max-age=60")
        self.assertEqual(resp.header("X-Thing"), "yes")
        for code in (404, 500, 502, 503, 504):
            resp = self.proxy.request("GET", f"/status/{code}", host=self.HOST)
            self.assertEqual((resp.status, resp.text), (code, f"status {code}"))
            self.assertEqual(resp.header("Content-Type"), "text/plain")


class UpstreamFailureTests(ProxyTestCase):
    def test_non_http_and_silent_upstreams(self):
        """Scenario 157: garbage or a silent close gives 502 every time."""
        self.deploy_app()
        for path in ("/garbage", "/close"):
            for _ in range(2):
                resp = self.proxy.request("GET", path, host=self.HOST)
                self.assertEqual(resp.status, 502, path)
                self.assertIn("502", resp.text)
        self.proxy.wait_for_log("Error while proxying", path="/close")
        self.assertEqual(self.proxy.request("GET", "/", host=self.HOST).text, "app")

    def test_truncated_body_aborts_client(self):
        """Scenario 157: a short body is never passed off as complete."""
        self.deploy_app()
        raw = raw_exchange(
            self.proxy.http_port,
            f"GET /short HTTP/1.1\r\nHost: {self.HOST}\r\n\r\n".encode(),
            timeout=5,
        )
        if raw_status(raw) == 200:
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertNotEqual(len(body), 1000)
            self.assertIn(b"partial", body)
        self.assertTrue(self.proxy.alive())
        self.assertEqual(self.proxy.request("GET", "/", host=self.HOST).text, "app")

    def test_one_shot_and_connection_close_upstreams(self):
        """Scenario 157: pooled connections are never reused after the upstream closed."""
        self.deploy_app()
        client = self.proxy.client(host=self.HOST)
        self.addCleanup(client.close)
        for path in ("/oneshot", "/connclose", "/oneshot", "/", "/oneshot"):
            for _ in range(3):
                resp = client.request("GET", path)
                self.assertEqual((resp.status, resp.text), (200, "app"), path)

    def test_refused_target_gives_502(self):
        """§9.7: connection refused -> 502 and ``Error while proxying``."""
        up = self.upstream("gone")
        self.deploy("gone", up.addr, "--host", "gone.example.com")
        up.stop()
        resp = self.proxy.request("GET", "/", host="gone.example.com")
        self.assertEqual(resp.status, 502)
        self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
        self.assertIn("502", resp.text)
        self.proxy.wait_for_log("Error while proxying", target=up.addr)

    def test_target_timeout(self):
        """§9.5: ``--target-timeout`` answers 504 when the upstream is slow to respond."""
        self.deploy_app("--target-timeout", "500ms")
        gate = self.gate(self.app)
        resp = self.proxy.request("GET", f"/hold?gate={gate}", host=self.HOST)
        # The upstream holds the request until cleanup: only the timeout answers it.
        self.assertEqual(resp.status, 504)
        self.assertGreaterEqual(resp.elapsed, 0.45)
        resp = self.proxy.request("GET", "/stream?chunks=3&ms=600", host=self.HOST)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.text, "chunk 0\nchunk 1\nchunk 2\n")


class StreamingTests(ProxyTestCase):
    def test_chunked_response_is_progressive(self):
        """Scenario 158: chunks arrive as they are sent: each one reaches the client while the
        upstream holds back the next."""
        self.deploy_app()
        gate = self.gate(self.app)
        client = self.proxy.client(host=self.HOST)
        self.addCleanup(client.close)
        resp = client.send("GET", f"/stream?chunks=3&gate={gate}")
        self.assertEqual(resp.status, 200)
        data = b""
        for i in range(3):
            while f"chunk {i}\n".encode() not in data:
                piece = resp.read1(65536)
                self.assertTrue(piece, f"stream ended before chunk {i}: {data!r}")
                data += piece
            self.app.release(gate)
        data += resp.read()
        self.assertEqual(data, b"chunk 0\nchunk 1\nchunk 2\n")

    def test_server_sent_events(self):
        """Scenarios 61 and 158: SSE events arrive before the upstream finishes."""
        self.deploy_app()
        gate = self.gate(self.app)
        client = self.proxy.client(host=self.HOST)
        self.addCleanup(client.close)
        resp = client.send("GET", f"/sse?events=2&gate={gate}")
        self.assertEqual(resp.getheader("Content-Type"), "text/event-stream")
        data = b""
        while b"event 0" not in data:
            piece = resp.read1(65536)
            self.assertTrue(piece, "stream ended early")
            data += piece
        # Event 0 arrived while the upstream holds back event 1 and the end of the stream.
        self.assertTrue(data.startswith(b"data: event 0\n\n"))
        self.app.release(gate, 2)
        rest = resp.read()
        self.assertEqual(data + rest, b"data: event 0\n\ndata: event 1\n\n")

    def test_big_download_keeps_content_length(self):
        """Scenario 158: 20 MiB with Content-Length, byte for byte."""
        self.deploy_app()
        size = 20 * MiB
        resp = self.proxy.request("GET", f"/big?bytes={size}", host=self.HOST, timeout=30)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.header("Content-Length"), str(size))
        self.assertEqual(len(resp.body), size)
        self.assertTrue(resp.body == pattern_bytes(size))

    def test_big_chunked_download(self):
        """Scenario 158: 8 MiB chunked."""
        self.deploy_app()
        size = 8 * MiB
        resp = self.proxy.request("GET", f"/bigchunked?bytes={size}", host=self.HOST, timeout=30)
        self.assertEqual(resp.status, 200)
        self.assertIsNone(resp.header("Content-Length"))
        self.assertTrue(resp.body == pattern_bytes(size))

    def test_big_upload(self):
        """Scenario 158: 10 MiB upload, and a chunked upload, arrive intact."""
        self.deploy_app()
        body = pattern_bytes(10 * MiB, offset=7)
        info = self.echo("/upload", method="POST", body=body, timeout=30).json()
        self.assertEqual(info["length"], len(body))
        self.assertEqual(info["sha256"], hashlib.sha256(body).hexdigest())

        pieces = [pattern_bytes(100_000, offset=i) for i in range(20)]
        info = self.echo("/upload", method="POST", body=iter(pieces), timeout=30).json()
        joined = b"".join(pieces)
        self.assertEqual(info["length"], len(joined))
        self.assertEqual(info["sha256"], hashlib.sha256(joined).hexdigest())
        self.assertEqual(info["transfer_encoding"], "chunked")
        self.assertIsNone(info["content_length"])

    def test_concurrency(self):
        """Scenario 158: 80 requests over 8 keep-alive clients; a fast request is not delayed
        by slow ones."""
        self.deploy_app()
        failures = []

        def worker():
            client = HttpClient(self.proxy.http_port, host=self.HOST)
            try:
                for i in range(10):
                    resp = client.request("GET", f"/echo?i={i}")
                    if resp.status != 200 or resp.json()["query"] != f"i={i}":
                        failures.append(resp)
            except Exception as e:  # noqa: BLE001
                failures.append(e)
            finally:
                client.close()

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(failures, [])

        gate = self.gate(self.app)
        slow = [
            Background(
                lambda: self.proxy.request("GET", f"/hold?gate={gate}", host=self.HOST, timeout=30)
            )
            for _ in range(5)
        ]
        self.app.wait_arrived(gate, 5)
        # Answered while the upstream holds all five slow ones.
        self.assertEqual(self.proxy.request("GET", "/", host=self.HOST).text, "app")
        self.assertFalse(any(b.done() for b in slow), "a held request ended early")
        self.app.release(gate)
        for b in slow:
            self.assertEqual(b.result(15).text, "app")


class WebSocketTests(ProxyTestCase):
    def connect(self, host=None, path="/ws") -> WebSocketClient:
        ws = WebSocketClient.connect(self.proxy.http_port, path, host=host or self.HOST)
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 101, ws.response_head)
        return ws

    def test_echo(self):
        """Scenario 165: text, binary, 1 MiB and 200 ordered messages echo correctly."""
        self.deploy_app()
        mark = self.proxy.log_mark()
        ws = self.connect()
        self.assertEqual(ws.header("X-Upstream-Name"), "app")
        ws.send("hello")
        self.assertEqual(ws.recv(), (0x1, b"hello"))
        ws.send(b"\x00\x01\x02")
        self.assertEqual(ws.recv(), (0x2, b"\x00\x01\x02"))
        big = pattern_bytes(MiB)
        ws.send(big)
        self.assertEqual(ws.recv(timeout=15), (0x2, big))
        for i in range(200):
            ws.send(f"message {i}")
        for i in range(200):
            self.assertEqual(ws.recv(), (0x1, f"message {i}".encode()))
        ws.close()
        record = self.proxy.wait_for_log("Request", since=mark, path="/ws", timeout=5)
        self.assertEqual(record["status"], 101)
        self.assertEqual(record["service"], "app")

    def test_prefix_routing(self):
        """Scenario 165: host + path-prefix routing applies to upgrades."""
        self.deploy(
            "wsprefix", self.app.addr, "--host", "ws.example.com", "--path-prefix", "/cable"
        )
        ws = self.connect(host="ws.example.com", path="/cable/ws")
        self.assertEqual(ws.header("X-Upstream-Path"), "/ws")
        ws.send("routed")
        self.assertEqual(ws.recv(), (0x1, b"routed"))

    def test_closed_when_target_replaced(self):
        """Scenarios 73 and 165: a redeploy cuts open WebSockets at once and does not wait."""
        old, new = self.upstream("old"), self.upstream("new")
        self.deploy("wsswap", old.addr, "--host", "wsswap.example.com")
        ws = self.connect(host="wsswap.example.com")
        ws.send("__name__")
        self.assertEqual(ws.recv(), (0x1, b"old"))
        deploy = Background(
            lambda: self.proxy.cli(
                "deploy", "wsswap", "--target", new.addr, "--host", "wsswap.example.com",
                "--drain-timeout", "5m",
            )
        )  # fmt: skip
        # Both come within seconds; waiting for the WebSocket to drain would take 5 minutes.
        self.assertTrue(
            ws.closed_by_peer(timeout=PROCESS_TIMEOUT), "WebSocket still open after redeploy"
        )
        result = deploy.result(PROCESS_TIMEOUT)
        self.assertEqual(result.code, 0, result)
        ws2 = self.connect(host="wsswap.example.com")
        ws2.send("__name__")
        self.assertEqual(ws2.recv(), (0x1, b"new"))

    def test_other_service_deploy_leaves_socket_open(self):
        """§21.1 #34: deploys of other services never touch an open WebSocket."""
        other = self.upstream("other")
        self.deploy_app()
        ws = self.connect()
        self.deploy("wsother", other.addr, "--host", "wsother.example.com")
        self.deploy("wsother", shared_upstream("first").addr, "--host", "wsother.example.com")
        ws.send("still here")
        self.assertEqual(ws.recv(), (0x1, b"still here"))


class KeepAliveTests(ProxyTestCase):
    def test_keep_alive_connection_sees_redeploys(self):
        """Scenario 150 (part): a keep-alive client sees the new target right after deploy."""
        first, second = shared_upstream("first"), shared_upstream("second")
        self.deploy("ka", first.addr, "--host", "ka.example.com")
        client = self.proxy.client(host="ka.example.com")
        self.addCleanup(client.close)
        self.assertEqual(client.request().text, "first")
        self.proxy.cli_ok("deploy", "ka", "--target", second.addr, "--host", "ka.example.com")
        self.assertEqual(client.request().text, "second")
        self.proxy.cli_ok("deploy", "ka", "--target", first.addr, "--host", "ka.example.com")
        self.assertEqual(client.request().text, "first")

    def test_client_hang_up_is_499(self):
        """§9.7: a client that disconnects mid-request is logged with 499."""
        self.deploy_app()
        gate = self.gate(self.app)
        mark = self.proxy.log_mark()
        with socket.create_connection(("127.0.0.1", self.proxy.http_port), timeout=10) as s:
            s.sendall(f"GET /hold?gate={gate} HTTP/1.1\r\nHost: {self.HOST}\r\n\r\n".encode())
            self.app.wait_arrived(gate)
        # Logged while the upstream still holds the request.
        record = self.proxy.wait_for_log("Request", since=mark, path="/hold", timeout=10)
        self.assertEqual(record["status"], 499)
        eventually(lambda: self.proxy.request("GET", "/", host=self.HOST).text == "app")
