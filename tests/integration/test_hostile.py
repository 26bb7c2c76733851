"""Hostile and malformed client input on the plain-HTTP port (SPEC §4.3; scenario 156).

Parser-level rejections get their status, never reach the upstream, and the proxy keeps
serving everyone else.
"""

from __future__ import annotations

import json
import threading

from tests.integration.support import (
    IntegrationTestCase,
    raw_body,
    raw_exchange,
    raw_status,
    shared_upstream,
)

MiB = 1 << 20


class HostileInputTests(IntegrationTestCase):
    shared = True

    def setUp(self):
        super().setUp()
        # One catch-all service per proxy process, deployed on first use and kept.
        if getattr(self.proxy, "_hostile_app", None) is None:
            self.proxy._hostile_app = shared_upstream("hostile-app")
            self.proxy.cli_ok("deploy", "hostile", "--target", self.proxy._hostile_app.addr)
        self.app = self.proxy._hostile_app

    def exchange(self, data, **kwargs) -> bytes:
        return raw_exchange(self.proxy.http_port, data, **kwargs)

    def assertServing(self):
        resp = self.proxy.request("GET", "/", host="after.example.com")
        self.assertEqual((resp.status, resp.text), (200, "hostile-app"))

    def assertRejected(self, data: bytes, status: int, what: str) -> None:
        before = self.app.request_count()
        raw = self.exchange(data)
        self.assertEqual(raw_status(raw), status, f"{what}: {raw[:300]!r}")
        self.assertEqual(self.app.request_count(), before, f"{what} reached the upstream")
        self.assertTrue(self.proxy.alive())
        self.assertServing()

    def test_parser_rejections(self):
        """§4.3 table: 400 / 501 / 505 for malformed requests."""
        h = b"Host: x.example.com\r\n"
        cases = [
            (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
            (b"GET / HTTP/1.1\r\n\r\n", 400, "no Host"),
            (b"GET / HTTP/1.1\r\n" + h + b"Host: b.example.com\r\n\r\n", 400, "two Hosts"),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad Host"),
            (b"GET / HTTP/1.1\r\n" + h + b"X-Foo : a\r\n\r\n", 400, "space before colon"),
            (b"GET / HTTP/1.1\r\n" + h + b"X-Foo: a\x00b\r\n\r\n", 400, "NUL in value"),
            (
                b"POST / HTTP/1.1\r\nHost: x.example.com\r\nContent-Length: 5\r\n"
                b"Content-Length: 6\r\n\r\nhello!",
                400,
                "conflicting Content-Length",
            ),
            (b"POST / HTTP/1.1\r\n" + h + b"Content-Length: -1\r\n\r\n", 400, "negative CL"),
            (b"POST / HTTP/1.1\r\n" + h + b"Content-Length: abc\r\n\r\n", 400, "bad CL"),
            (
                b"POST / HTTP/1.1\r\nHost: x.example.com\r\nTransfer-Encoding: gzip\r\n\r\n",
                501,
                "unsupported transfer encoding",
            ),
            (b"GET / HTTP/9.9\r\nHost: x.example.com\r\n\r\n", 505, "HTTP/9.9"),
            (b"GET / HTTP/2.0\r\nHost: x.example.com\r\n\r\n", 505, "HTTP/2.0 as text"),
        ]  # fmt: skip
        for data, status, what in cases:
            self.assertRejected(data, status, what)

    def test_oversized_headers(self):
        """§4.3: request line plus headers above ~1 MiB get 431."""
        big_header = b"GET / HTTP/1.1\r\nHost: x.example.com\r\nX-Big: " + b"a" * (MiB + 64 * 1024)
        self.assertRejected(big_header + b"\r\n\r\n", 431, "huge header")
        big_line = b"GET /" + b"a" * (MiB + 64 * 1024) + b" HTTP/1.1\r\nHost: x.example.com\r\n\r\n"
        self.assertRejected(big_line, 431, "huge request line")
        # A large but acceptable header is served.
        resp = self.proxy.request(
            "GET", "/", host="x.example.com", headers={"X-Large": "b" * (64 * 1024)}
        )
        self.assertEqual(resp.status, 200)

    def test_header_line_limit(self):
        """§4.3: 500 header lines (Host included) pass, 501 get 431; so does a flood of
        150,000 short header lines (750 KB, under the size limit), and the proxy serves on."""
        head = b"GET / HTTP/1.1\r\nHost: x.example.com\r\nConnection: close\r\n"
        lines = b"".join(b"X-%d: v\r\n" % i for i in range(498))
        raw = self.exchange(head + lines + b"\r\n")
        # Forwarded: the upstream answers (Python's http.server refuses over 100 headers).
        self.assertIn(b"Server: upstream-app", raw[:300])
        self.assertRejected(head + lines + b"X-Last: v\r\n\r\n", 431, "501 header lines")
        flood = b"GET / HTTP/1.1\r\nHost: x.example.com\r\n" + b"a: b\r\n" * 150_000 + b"\r\n"
        self.assertRejected(flood, 431, "150,000 header lines")

    def test_options_asterisk(self):
        """§4.3: `OPTIONS *` is answered 200 by the server itself, never proxied."""
        before = self.app.request_count()
        raw = self.exchange(
            b"OPTIONS * HTTP/1.1\r\nHost: x.example.com\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(raw_status(raw), 200, raw[:200])
        self.assertIn(b"Content-Length: 0\r\n", raw)
        self.assertEqual(self.app.request_count(), before)

    def test_rejection_closes_connection(self):
        """A rejected request ends its connection (``Connection: close``)."""
        raw = self.exchange(b"GARBAGE\r\n\r\nGET / HTTP/1.1\r\nHost: x.example.com\r\n\r\n")
        self.assertEqual(raw_status(raw), 400)
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1, raw)

    def test_garbage_and_tls_to_plain_port(self):
        """§4.3: binary garbage, a TLS ClientHello, or a hang-up mid-headers."""
        client_hello = (
            bytes.fromhex(
                "16030100a5010000a10303" + "00" * 32 + "00" + "0020" + "c02b" * 16 + "0100" + "0058"
            )
            + b"\x00" * 0x58
        )
        for data in (bytes(range(256)) * 4, client_hello):
            raw = self.exchange(data)
            self.assertIn(raw_status(raw), (None, 400), raw[:200])
            self.assertServing()
        raw = self.exchange(b"GET / HTTP/1.1\r\nHost: x.exa", half_close=True)
        self.assertIn(raw_status(raw), (None, 400), raw[:200])
        self.assertServing()

    def test_invalid_chunk_size(self):
        """§4.3 and scenario 75: a malformed chunked body is a 400."""
        raw = self.exchange(
            b"POST / HTTP/1.1\r\nHost: x.example.com\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"
        )
        self.assertEqual(raw_status(raw), 400, raw[:300])
        self.assertServing()

    def test_content_length_with_chunked(self):
        """§4.3: chunked framing wins; Content-Length is never forwarded (no smuggling)."""
        raw = self.exchange(
            b"POST /upload HTTP/1.1\r\nHost: x.example.com\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"
        )
        status = raw_status(raw)
        self.assertIn(status, (200, 400), raw[:300])
        if status == 200:
            info = json.loads(raw_body(raw))
            self.assertEqual(info["length"], 0)
            self.assertIsNone(info["content_length"])
            self.assertEqual(info["transfer_encoding"], "chunked")
        self.assertServing()

    def test_pipelining(self):
        """Scenario 156: 21 pipelined GETs get 21 responses, in order."""
        requests = b"".join(
            b"GET /echo?n=%d HTTP/1.1\r\nHost: x.example.com\r\n\r\n" % i for i in range(20)
        )
        requests += b"GET /echo?n=20 HTTP/1.1\r\nHost: x.example.com\r\nConnection: close\r\n\r\n"
        raw = self.exchange(requests, timeout=10)
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK\r\n"), 21, raw[:500])
        positions = [raw.find(b'"query": "n=%d"' % i) for i in range(21)]
        self.assertTrue(all(p >= 0 for p in positions), positions)
        self.assertEqual(positions, sorted(positions))

    def test_http10_and_absolute_form(self):
        """§4.3: HTTP/1.0 is served; an absolute-form target supplies the host."""
        raw = self.exchange(b"GET /echo HTTP/1.0\r\nHost: x.example.com\r\n\r\n")
        self.assertEqual(raw_status(raw), 200, raw[:300])
        raw = self.exchange(
            b"GET http://abs.example.com/echo HTTP/1.1\r\nHost: other.example.com\r\n"
            b"Connection: close\r\n\r\n"
        )
        self.assertEqual(raw_status(raw), 200, raw[:300])
        info = json.loads(raw_body(raw))
        hosts = [v for k, v in info["headers"] if k.lower() == "host"]
        self.assertEqual(hosts, ["abs.example.com"])
        self.assertEqual(info["target"], "/echo")

    def test_clients_hanging_up(self):
        """Scenario 156: ten clients that send a slow request and hang up do not hurt others."""
        threads = [
            threading.Thread(
                target=self.exchange,
                args=(b"GET /slow?ms=1000 HTTP/1.1\r\nHost: x.example.com\r\n\r\n",),
                kwargs={"timeout": 0.1},
            )
            for _ in range(10)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        for _ in range(5):
            self.assertServing()
