"""End to end TLS: real ``kamal-proxy run``, real Pebble ACME server, real TLS clients.

Pebble validates http-01 against the proxy's HTTP port through the DNS shim (every name is
127.0.0.1), so issuance is the real protocol.  Clients verify chains against Pebble's root of
the run, pick hosts by SNI and negotiate h2 or http/1.1 by ALPN.
"""

from __future__ import annotations

import atexit
import http.client
import http.server
import json
import os
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
from twisted.trial import unittest

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
    UpstreamProcess,
    eventually,
    free_port,
    http_request,
)

HOSTS = ("a.example.test", "b.example.test")


def tls_connect(port: int, server_name: str | None, cadata: str | None, alpn=("h2", "http/1.1")):
    if cadata is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cadata=cadata)
        context.check_hostname = server_name is not None
    context.set_alpn_protocols(list(alpn))
    # The first handshake of a name waits for its certificate to be issued.
    sock = socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT)
    try:
        return context.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def https_get(port, host, cadata, path="/", method="GET", body=None, headers=None):
    """HTTP/1.1 over TLS: (status, headers dict, body)."""
    conn = http.client.HTTPSConnection(host, port, timeout=PROCESS_TIMEOUT)
    conn.sock = tls_connect(port, host, cadata, alpn=("http/1.1",))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def h2_request(port, host, cadata, path="/", method="GET", body=b"", response_headers=None):
    """One HTTP/2 request: (negotiated protocol, status, body); the response's headers are
    added to ``response_headers`` (a dict, names in lower case) when one is given."""
    sock = tls_connect(port, host, cadata)
    try:
        protocol = sock.selected_alpn_protocol()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [(":method", method), (":path", path), (":scheme", "https"), (":authority", host)]
        conn.send_headers(1, headers, end_stream=not body)
        if body:
            for i in range(0, len(body), 16000):
                while conn.local_flow_control_window(1) < 16000:
                    sock.sendall(conn.data_to_send())
                    conn.receive_data(sock.recv(65536))
                conn.send_data(1, body[i : i + 16000], end_stream=i + 16000 >= len(body))
        sock.sendall(conn.data_to_send())
        status, data = None, b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                    if response_headers is not None:
                        response_headers.update(
                            (name.decode().lower(), value.decode()) for name, value in event.headers
                        )
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return protocol, status, data
            sock.sendall(conn.data_to_send())
        return protocol, status, data
    finally:
        sock.close()


def common_name(sock: ssl.SSLSocket) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


class _Allow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        allowed = "host=allowed.example.test" in self.path
        body = b"ok" if allowed else b"Access denied"
        self.send_response(200 if allowed else 403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Shared:
    """One Pebble, one proxy (Pebble's httpPort is the proxy's HTTP port), one upstream and
    one on-demand endpoint for the AcmeEndToEnd tests; stopped at exit (trial has no
    class fixtures)."""

    def __init__(self) -> None:
        # Pebble validates on this HTTP port: it must not be picked anew at start.
        self.server = ProxyProcess(http_port=free_port())
        self.pebble = PebbleServer(self.server.http_port)
        self.upstream = None
        self.allow = None
        try:
            self.pebble.start()
            self.server.extra_args = [
                "--acme-directory",
                self.pebble.directory_url,
                "--acme-ca-bundle",
                self.pebble.ca_path,
            ]
            self.server.start()
            self.root = self.pebble.root_pem().decode()
            self.upstream = UpstreamProcess("first")
            self.allow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Allow)
            threading.Thread(target=self.allow.serve_forever, daemon=True).start()
        except BaseException:
            self.cleanup()
            raise

    def alive(self) -> bool:
        return self.server.alive() and self.pebble.pebble.poll() is None

    def cleanup(self) -> None:
        self.server.cleanup()
        self.pebble.cleanup()
        if self.upstream is not None:
            self.upstream.stop()
        if self.allow is not None:
            self.allow.shutdown()
            self.allow.server_close()


_shared: list[_Shared] = []


@atexit.register
def _stop_shared() -> None:
    while _shared:
        _shared.pop().cleanup()


class AcmeEndToEnd(IntegrationTestCase):
    def setUp(self):
        super().setUp()
        if not pebble_available():
            raise unittest.SkipTest("pebble is not installed (apt-get install pebble)")
        if not _shared or not _shared[0].alive():
            _stop_shared()
            _shared.append(_Shared())
        shared = _shared[0]
        self.proxy = shared.server
        self.pebble = shared.pebble
        self.root = shared.root
        self.upstream = shared.upstream
        self.allow = shared.allow

    def test_1_issue_serve_redirect_and_reuse_after_restart(self):
        proxy = self.proxy
        started = time.monotonic()
        proxy.cli_ok(
            "deploy", "app", "--target", self.upstream.addr, "--host", ",".join(HOSTS), "--tls"
        )
        deployed = time.monotonic() - started
        # The first handshake waits for the certificate (ClientHello peeking), then verifies.
        serials = {}
        for host in HOSTS:
            try:
                tls_connect(proxy.https_port, host, self.root).close()
            except Exception:
                print(proxy.describe())
                raise
            with tls_connect(proxy.https_port, host, self.root) as sock:
                self.assertEqual(common_name(sock), host)
                self.assertEqual(sock.selected_alpn_protocol(), "h2")
                self.assertIn(sock.version(), ("TLSv1.2", "TLSv1.3"))
                serials[host] = sock.getpeercert()["serialNumber"]
        issued = [r["seconds"] for r in proxy.logs("ACME: certificate obtained")]
        self.assertEqual(len(issued), 2)
        print(f"\n  deploy {deployed:.2f}s, issuance {issued} s")

        # HTTP/1.1 and HTTP/2 through the pipeline, with X-Forwarded-Proto https.
        status, headers, body = https_get(proxy.https_port, HOSTS[0], self.root, "/echo")
        self.assertEqual(status, 200)
        echoed = {k.lower(): v for k, v in json.loads(body)["headers"]}
        self.assertEqual(echoed.get("x-forwarded-proto"), "https")
        self.assertEqual(h2_request(proxy.https_port, HOSTS[1], self.root), ("h2", 200, b"first"))
        upload = os.urandom(160 * 1024)
        protocol, status, body = h2_request(
            proxy.https_port, HOSTS[1], self.root, "/upload", "POST", upload
        )
        self.assertEqual((protocol, status), ("h2", 200))
        self.assertEqual(json.loads(body)["length"], len(upload))

        # Plain HTTP redirects to https (port dropped); the challenge path is not redirected.
        response = http_request(proxy.http_port, "GET", "/path/x?q=1", host=HOSTS[0])
        self.assertEqual(response.status, 301)
        self.assertEqual(response.header("Location"), f"https://{HOSTS[0]}/path/x?q=1")
        response = http_request(
            proxy.http_port, "GET", "/.well-known/acme-challenge/unknown", host=HOSTS[0]
        )
        self.assertEqual(response.status, 404)
        rows = proxy.list_rows()
        self.assertIn("yes", rows[1])

        # Restart: the stored certificates are served at once, without asking the CA.
        cache = os.path.join(proxy.data_dir, "certs")
        for dirpath, _dirs, files in os.walk(cache):
            self.assertEqual(os.stat(dirpath).st_mode & 0o777, 0o700)
            for name in files:
                self.assertEqual(os.stat(os.path.join(dirpath, name)).st_mode & 0o777, 0o600)
        proxy.restart()
        mark = proxy.log_mark()
        for host in HOSTS:
            try:
                tls_connect(proxy.https_port, host, self.root).close()
            except Exception:
                print(proxy.describe())
                raise
            with tls_connect(proxy.https_port, host, self.root) as sock:
                self.assertEqual(sock.getpeercert()["serialNumber"], serials[host])
        self.assertEqual(proxy.logs("ACME: obtaining certificate", since=mark), [])
        proxy.cli_ok("remove", "app")

    def test_2_sni_failures_and_no_sni_default(self):
        proxy = self.proxy
        proxy.cli_ok(
            "deploy", "solo", "--target", self.upstream.addr, "--host", "c.example.test", "--tls"
        )
        with tls_connect(proxy.https_port, "c.example.test", self.root):
            pass
        with self.assertRaises(ssl.SSLError):
            tls_connect(proxy.https_port, "unknown.example.test", self.root)
        # No SNI: the default TLS host's certificate (a TLS host that was deployed first).
        with tls_connect(proxy.https_port, None, self.root) as sock:
            self.assertIn(common_name(sock), ("a.example.test", "c.example.test"))
        proxy.wait_for_log("No server name; using default TLS hostname")
        proxy.cli_ok("remove", "solo")

    def test_3_static_wildcard_certificate(self):
        proxy = self.proxy
        ca_key, ca = make_ca("Acme Co")
        key, leaf = make_leaf(ca_key, ca, ["*.static.test"], organization="Acme Co")
        cert_path = os.path.join(proxy.root, "static.crt")
        key_path = os.path.join(proxy.root, "static.key")
        open(cert_path, "wb").write(cert_pem(leaf))
        open(key_path, "wb").write(key_pem(key))
        result = proxy.cli(
            "deploy",
            "static",
            "--target",
            self.upstream.addr,
            "--host",
            "*.static.test",
            "--tls",
            "--tls-certificate-path",
            key_path,
            "--tls-private-key-path",
            cert_path,
        )
        self.assertEqual(
            (result.code, result.err.strip()), (1, "Error: unable to load certificate")
        )
        proxy.cli_ok(
            "deploy",
            "static",
            "--target",
            self.upstream.addr,
            "--host",
            "*.static.test",
            "--tls",
            "--tls-certificate-path",
            cert_path,
            "--tls-private-key-path",
            key_path,
        )
        status, _, body = https_get(proxy.https_port, "foo.static.test", cert_pem(ca).decode())
        self.assertEqual((status, body), (200, b"first"))
        # Connection: close over TLS: the response, then the server closes (a TLS transport
        # with a producer registered waited for ever).
        with tls_connect(
            proxy.https_port, "foo.static.test", cert_pem(ca).decode(), alpn=("http/1.1",)
        ) as tls:
            tls.settimeout(10)
            tls.sendall(b"GET / HTTP/1.1\r\nHost: foo.static.test\r\nConnection: close\r\n\r\n")
            received = b""
            while chunk := tls.recv(65536):
                received += chunk
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received[:100])
        self.assertTrue(received.endswith(b"\r\n\r\nfirst"), received[-100:])
        proxy.cli_ok("remove", "static")

    def test_4_on_demand_allowed_and_denied(self):
        proxy = self.proxy
        url = f"http://127.0.0.1:{self.allow.server_address[1]}/check"
        proxy.cli_ok(
            "deploy",
            "ondemand",
            "--target",
            self.upstream.addr,
            "--tls",
            "--tls-on-demand-url",
            url,
        )
        with tls_connect(proxy.https_port, "allowed.example.test", self.root) as sock:
            self.assertEqual(common_name(sock), "allowed.example.test")
        with self.assertRaises(ssl.SSLError):
            tls_connect(proxy.https_port, "denied.example.test", self.root)
        record = proxy.wait_for_log("TLS on-demand check denied host")
        self.assertEqual(
            (record["host"], record["status"], record["body"]),
            ("denied.example.test", 403, "Access denied"),
        )
        proxy.cli_ok("remove", "ondemand")


class AcmeServerDown(IntegrationTestCase):
    def test_other_routes_keep_serving_and_error_is_logged(self):
        closed = free_port()
        proxy = self.start_proxy("--acme-directory", f"https://127.0.0.1:{closed}/dir")
        upstream = UpstreamProcess("plain")
        self.addCleanup(upstream.stop)
        proxy.cli_ok("deploy", "plain", "--target", upstream.addr, "--host", "plain.test")
        proxy.cli_ok(
            "deploy", "secure", "--target", upstream.addr, "--host", "secure.test", "--tls"
        )
        record = proxy.wait_for_log("ACME: unable to obtain certificate", timeout=10)
        self.assertEqual(record["host"], "secure.test")
        self.assertIn("refused", record["error"].lower())
        self.assertEqual(
            http_request(proxy.http_port, "GET", "/", host="plain.test").body, b"plain"
        )
        # Refused at once: a handshake left waiting would end in TimeoutError, not SSLError.
        with self.assertRaises(ssl.SSLError):
            tls_connect(proxy.https_port, "secure.test", None)
        eventually(lambda: proxy.alive())
