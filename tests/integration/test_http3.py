"""HTTP/3 end to end: a real ``kamal-proxy run --http3``, aioquic's client over loopback UDP.

SPEC §4.1 step 5, stage P1 and scenario 98: the TCP HTTPS listener advertises h3 with
``Alt-Svc`` (HTTP/1.1 and HTTP/2, proxied responses and error pages), HTTP/3 requests go
through the same pipeline (log ``proto`` ``HTTP/3.0``, no ``Alt-Svc``), certificates are
chosen by SNI from the same sources as TCP, and without ``--http3`` the UDP port stays free.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time

from twisted.trial import unittest

from tests.h3client import H3Client, H3Error, h3_request
from tests.integration.pebble import (
    PebbleServer,
    cert_pem,
    key_pem,
    make_ca,
    make_leaf,
    pebble_available,
)
from tests.integration.support import (
    PROCESS_TIMEOUT,
    IntegrationTestCase,
    ProxyProcess,
    eventually,
    free_port,
    http_request,
)
from tests.integration.test_tls import h2_request, https_get
from tests.integration.traffic_support import parse_metrics, sample
from tests.integration.upstream_app import pattern_bytes

MIB = 1 << 20


def udp_port_free(port: int) -> bool:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class StaticCertificates:
    """One CA and a leaf per host name, written beside the proxy's files."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.ca_key, self.ca = make_ca("Test CA")
        self.cadata = cert_pem(self.ca).decode()

    def leaf(self, name: str, hosts: list[str]) -> tuple[str, str]:
        key, leaf = make_leaf(self.ca_key, self.ca, hosts)
        cert_path = os.path.join(self.root, f"{name}.crt")
        key_path = os.path.join(self.root, f"{name}.key")
        with open(cert_path, "wb") as f:
            f.write(cert_pem(leaf))
        with open(key_path, "wb") as f:
            f.write(key_pem(key))
        return cert_path, key_path


def common_name(certificate) -> str:
    from cryptography.x509.oid import NameOID

    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


class Http3EndToEnd(IntegrationTestCase):
    """Scenario 98 and the HTTP/3 data path against one proxy started with ``--http3``."""

    def setUp(self) -> None:
        super().setUp()
        self.proxy = self.start_proxy("--http3", metrics=True)
        self.metrics_port = self.proxy.metrics_port
        self.certs = StaticCertificates(self.proxy.root)
        self.app = self.upstream("h3app")

    def deploy_tls(self, service: str, host: str, *args: str, upstream=None) -> None:
        cert, key = self.certs.leaf(service, [host])
        self.deploy(
            service,
            (upstream or self.app).addr,
            "--host",
            host,
            "--tls",
            "--tls-certificate-path",
            cert,
            "--tls-private-key-path",
            key,
            *args,
        )

    def test_scenario_98_alt_svc_on_tcp_and_http3_served(self):
        proxy = self.proxy
        self.deploy_tls("app", "localhost")
        alt_svc = f'h3=":{proxy.https_port}"; ma=2592000'

        status, headers, body = https_get(proxy.https_port, "localhost", self.certs.cadata)
        self.assertEqual((status, body), (200, b"h3app"))
        self.assertEqual(headers.get("Alt-Svc"), alt_svc)
        # The proxy's own error page carries it too (no service for this Host: the pipeline
        # answers 404 itself, starting from empty headers).
        status, headers, body = https_get(
            proxy.https_port, "localhost", self.certs.cadata, headers={"Host": "nobody.test"}
        )
        self.assertEqual(status, 404)
        self.assertIn(b"<html", body.lower())
        self.assertEqual(headers.get("Alt-Svc"), alt_svc)

        h2_headers: dict[str, str] = {}
        sock_protocol, status, body = h2_request(
            proxy.https_port, "localhost", self.certs.cadata, response_headers=h2_headers
        )
        self.assertEqual((sock_protocol, status, body), ("h2", 200, b"h3app"))
        self.assertEqual(h2_headers.get("alt-svc"), alt_svc)

        def served() -> float | None:
            text = http_request(self.metrics_port, "GET", "/metrics").text
            total = "kamal_proxy_http_requests_total"
            return sample(parse_metrics(text), total, service="app", method="GET", status="200")

        before = served()
        mark = proxy.log_mark()
        response = h3_request(proxy.https_port, "localhost", self.certs.cadata, path="/echo?q=1")
        self.assertEqual(response.status, 200)
        self.assertFalse(response.has_header("alt-svc"))
        echoed = json.loads(response.body)
        sent = {k.lower(): v for k, v in echoed["headers"]}
        self.assertEqual(sent["host"], "localhost")
        self.assertEqual(sent["x-forwarded-proto"], "https")
        self.assertEqual(sent["x-forwarded-for"], "127.0.0.1")
        record = proxy.wait_for_log("Request", since=mark, path="/echo")
        self.assertEqual(
            (record["proto"], record["scheme"], record["port"], record["status"]),
            ("HTTP/3.0", "https", proxy.https_port, 200),
        )
        self.assertEqual((record["service"], record["query"]), ("app", "q=1"))
        self.assertEqual(record["client_addr"], "127.0.0.1")
        self.assertEqual(served(), before + 1)  # counted in the metrics like any request

        # Plain HTTP never advertises h3 (the service redirects to HTTPS here).
        response = http_request(proxy.http_port, "GET", "/", host="localhost")
        self.assertEqual(response.status, 301)
        self.assertFalse(response.has_header("Alt-Svc"))

    def test_error_pages_and_routing_by_sni_host(self):
        proxy = self.proxy
        other = self.upstream("other")
        self.deploy_tls("one", "one.h3.test")
        self.deploy_tls("two", "two.h3.test", upstream=other)
        cadata = self.certs.cadata
        with H3Client(proxy.https_port, "one.h3.test", cadata) as client:
            self.assertEqual(common_name(client.peer_certificate), "one.h3.test")
            self.assertEqual(client.request(path="/").body, b"h3app")
        with H3Client(proxy.https_port, "two.h3.test", cadata) as client:
            self.assertEqual(common_name(client.peer_certificate), "two.h3.test")
            self.assertEqual(client.request(path="/").body, b"other")
            # Requests route by :authority as over HTTP/1 and HTTP/2: an unknown host is 404.
            response = client.request(path="/", authority="nobody.h3.test")
            self.assertEqual(response.status, 404)
            self.assertIn(b"404", response.body)
            self.assertFalse(response.has_header("alt-svc"))
        # A name no service has: the handshake is refused (a TLS alert; a handshake left
        # waiting would end in "timed out during handshake" instead).
        with self.assertRaises(H3Error) as caught:
            H3Client(proxy.https_port, "unknown.h3.test", cadata, timeout=PROCESS_TIMEOUT)
        self.assertIn("0x170", str(caught.exception))

    def test_10_mib_get_and_post(self):
        proxy = self.proxy
        self.deploy_tls("big", "big.h3.test")
        with H3Client(proxy.https_port, "big.h3.test", self.certs.cadata, timeout=60) as client:
            response = client.request(path=f"/big?bytes={10 * MIB}")
            self.assertEqual(response.status, 200)
            self.assertEqual(len(response.body), 10 * MIB)
            self.assertEqual(response.body, pattern_bytes(10 * MIB))

            upload = os.urandom(10 * MIB)
            response = client.request(method="POST", path="/upload", body=upload)
            self.assertEqual(response.status, 200)
            result = json.loads(response.body)
            self.assertEqual(result["length"], len(upload))
            self.assertEqual(result["sha256"], hashlib.sha256(upload).hexdigest())
        record = proxy.wait_for_log("Request", path="/upload")
        self.assertEqual((record["req_content_length"], record["proto"]), (-1, "HTTP/3.0"))

    def test_garbage_datagrams_are_ignored(self):
        proxy = self.proxy
        self.deploy_tls("app", "localhost")
        with H3Client(proxy.https_port, "localhost", self.certs.cadata) as client:
            self.assertEqual(client.request(path="/").status, 200)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            where = ("127.0.0.1", proxy.https_port)
            try:
                for size in (0, 1, 7, 40, 1200, 1500):
                    for _ in range(20):
                        sock.sendto(os.urandom(size), where)
                # Long-header shapes: an Initial with a random body, an unknown version.
                sock.sendto(b"\xc0\x00\x00\x00\x01\x08" + os.urandom(1300), where)
                sock.sendto(b"\xc0\x0a\x0a\x0a\x0a\x08" + os.urandom(1300), where)
            finally:
                sock.close()
            # The open connection and new ones keep working; the process did not log errors.
            self.assertEqual(client.request(path="/").status, 200)
        self.assertEqual(h3_request(proxy.https_port, "localhost", self.certs.cadata).status, 200)
        self.assertTrue(proxy.alive())
        self.assertEqual(proxy.stderr_lines, [])

    def test_redeploy_under_continuous_load_has_no_failures(self):
        proxy = self.proxy
        first = self.app
        second = self.upstream("second")
        self.deploy_tls("app", "localhost")
        results: dict[str, int] = {"ok": 0, "failed": 0}
        bodies: set[bytes] = set()
        errors: list[str] = []
        stop = threading.Event()

        def load() -> None:
            deadline = time.monotonic() + 3 * PROCESS_TIMEOUT
            with H3Client(proxy.https_port, "localhost", self.certs.cadata) as client:
                while not stop.is_set() and time.monotonic() < deadline:
                    try:
                        response = client.request(path="/slow?ms=20")
                    except H3Error as e:
                        results["failed"] += 1
                        errors.append(str(e))
                        return
                    if response.status == 200:
                        results["ok"] += 1
                        bodies.add(response.body)
                    else:
                        results["failed"] += 1
                        errors.append(f"status {response.status}")

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            eventually(lambda: results["ok"] >= 10, timeout=PROCESS_TIMEOUT)
            cert, key = self.certs.leaf("app2", ["localhost"])
            proxy.cli_ok(
                "deploy",
                "app",
                "--target",
                second.addr,
                "--host",
                "localhost",
                "--tls",
                "--tls-certificate-path",
                cert,
                "--tls-private-key-path",
                key,
            )
            seen = results["ok"]
            eventually(lambda: results["ok"] >= seen + 10, timeout=PROCESS_TIMEOUT)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        self.assertEqual((results["failed"], errors), (0, []))
        self.assertEqual(bodies, {b"h3app", b"second"})
        self.assertGreater(results["ok"], 20)
        del first

    def test_graceful_stop_sends_goaway_after_the_request_in_flight(self):
        proxy = self.proxy
        self.deploy_tls("app", "localhost")
        client = H3Client(proxy.https_port, "localhost", self.certs.cadata)
        self.addCleanup(client.close)
        gate = self.gate(self.app)
        stream = client.send(path=f"/hold?gate={gate}")
        self.app.wait_arrived(gate)
        proxy.proc.send_signal(signal.SIGTERM)
        # GOAWAY comes while the upstream still holds the request; the connection stays open.
        client.wait_for(lambda: client.goaway, "GOAWAY", timeout=PROCESS_TIMEOUT)
        self.assertIsNone(client.terminated)
        self.app.release(gate)
        response = client.wait(stream, timeout=PROCESS_TIMEOUT)
        answered = time.monotonic()
        self.assertEqual((response.status, response.body), (200, b"h3app"))
        # Closed with H3_NO_ERROR once the response is acknowledged: at once, not when the 10s
        # stop deadline (counted from the SIGTERM above) closes everything.
        self.assertEqual(client.wait_closed(timeout=PROCESS_TIMEOUT).error_code, 0x100)
        self.assertLess(time.monotonic() - answered, 5)
        self.assertEqual(proxy.proc.wait(PROCESS_TIMEOUT), 0)
        proxy.wait_for_log("Server stopped")


class WithoutHttp3(IntegrationTestCase):
    def test_no_udp_listener_and_no_alt_svc(self):
        proxy = self.start_proxy()
        certs = StaticCertificates(proxy.root)
        app = self.upstream("plain")
        cert, key = certs.leaf("app", ["localhost"])
        self.deploy(
            "app",
            app.addr,
            "--host",
            "localhost",
            "--tls",
            "--tls-certificate-path",
            cert,
            "--tls-private-key-path",
            key,
            proxy=proxy,
        )
        status, headers, _ = https_get(proxy.https_port, "localhost", certs.cadata)
        self.assertEqual(status, 200)
        self.assertNotIn("alt-svc", {k.lower() for k in headers})
        h2_headers: dict[str, str] = {}
        response = h2_request(
            proxy.https_port, "localhost", certs.cadata, response_headers=h2_headers
        )
        self.assertEqual(response[1], 200)
        self.assertNotIn("alt-svc", h2_headers)
        self.assertTrue(udp_port_free(proxy.https_port))
        with self.assertRaises(H3Error):
            H3Client(proxy.https_port, "localhost", certs.cadata, timeout=1)


class Http3Acme(IntegrationTestCase):
    """An ACME certificate from Pebble: the first HTTP/3 handshake waits for its issuance."""

    def test_acme_certificate_over_http3(self):
        if not pebble_available():
            raise unittest.SkipTest("pebble is not installed (apt-get install pebble)")
        # Pebble validates on this HTTP port: it must not be picked anew at start.
        proxy = ProxyProcess(["--http3"], http_port=free_port())
        self.addCleanup(proxy.cleanup)
        pebble = PebbleServer(proxy.http_port)
        self.addCleanup(pebble.cleanup)
        pebble.start()
        proxy.extra_args += [
            "--acme-directory",
            pebble.directory_url,
            "--acme-ca-bundle",
            pebble.ca_path,
        ]
        proxy.start()
        root = pebble.root_pem().decode()
        app = self.upstream("acme")
        self.deploy("app", app.addr, "--host", "acme.h3.test", "--tls", proxy=proxy)
        # No TCP connection first: the QUIC handshake itself waits for the certificate.
        with H3Client(proxy.https_port, "acme.h3.test", root, timeout=PROCESS_TIMEOUT) as client:
            self.assertEqual(common_name(client.peer_certificate), "acme.h3.test")
            response = client.request(path="/")
        self.assertEqual((response.status, response.body), (200, b"acme"))
        self.assertEqual(len(proxy.logs("ACME: certificate obtained")), 1)
        status, headers, _ = https_get(proxy.https_port, "acme.h3.test", root)
        self.assertEqual(headers.get("Alt-Svc"), f'h3=":{proxy.https_port}"; ma=2592000')
