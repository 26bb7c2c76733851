"""Certificate sources: static pairs, ACME host policy and HTTP-01, on-demand checks (§16)."""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import server

from kamal_proxy.gostrings import go_quote
from kamal_proxy.observe import log as logmod
from kamal_proxy.service_options import ServiceOptions
from kamal_proxy.tls.acme import Issuer
from kamal_proxy.tls.certificates import (
    TLS,
    AcmeCertificates,
    CertificateError,
    HostNotAllowed,
    OnDemandPolicy,
    StaticCertificate,
    acme_name,
    check_url,
)
from kamal_proxy.tls.probe import probe
from kamal_proxy.tls.store import CertificateStore
from tests.integration.pebble import cert_pem, key_pem, make_ca, make_leaf


class Recording(unittest.TestCase):
    def setUp(self):
        self.records = []
        self.patch(logmod, "emit", lambda level, msg, **a: self.records.append((level, msg, a)))
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)


class CheckUrlTests(unittest.TestCase):
    def test_spec_examples(self):
        self.assertEqual(
            check_url("/allow-host", "test.example.com"), "/allow-host?host=test.example.com"
        )
        self.assertEqual(
            check_url("/allow-host", "test.example.com:8080"),
            "/allow-host?host=test.example.com%3A8080",
        )
        self.assertEqual(
            check_url("/allow-host?token=abc", "test.example.com"),
            "/allow-host?host=test.example.com&token=abc",
        )
        self.assertEqual(
            check_url("https://example.com/check?token=abc", "test.example.com"),
            "https://example.com/check?host=test.example.com&token=abc",
        )
        self.assertEqual(
            check_url("/c?host=old&b=2&a=x+y", "h.example.com"), "/c?a=x+y&b=2&host=h.example.com"
        )

    def test_go_quote(self):
        def quote(body: bytes) -> str:  # how the denial message quotes a response body
            return go_quote(body.decode("utf-8", "surrogateescape"))

        self.assertEqual(quote(b'Access "denied"\n'), '"Access \\"denied\\"\\n"')
        self.assertEqual(quote(b"\xff\x01"), '"\\xff\\x01"')
        self.assertEqual(quote("é".encode()), '"é"')

    def test_acme_name(self):
        self.assertEqual(acme_name("App.Example.COM."), "app.example.com")
        self.assertEqual(acme_name("bücher.example"), "xn--bcher-kva.example")
        with self.assertRaises(HostNotAllowed) as e:
            acme_name("localhost")
        self.assertEqual(str(e.exception), "acme/autocert: server name component count invalid")


class StaticCertificateTests(Recording):
    def pair(self, names=("localhost",)):
        ca_key, ca = make_ca("Acme Co")
        key, leaf = make_leaf(ca_key, ca, list(names), organization="Acme Co")
        cert_path, key_path = f"{self.tmp}/c.pem", f"{self.tmp}/k.pem"
        open(cert_path, "wb").write(cert_pem(leaf))
        open(key_path, "wb").write(key_pem(key))
        return cert_path, key_path

    def test_loads(self):
        cert, key = self.pair(["*.example.com"])
        source = StaticCertificate(cert, key)
        self.assertIsNotNone(source.context_for("anything.example.com"))
        self.assertIsNone(source.prepare("x"))
        self.assertIsNone(source.http01_response("x", "/.well-known/acme-challenge/t"))

    def test_failures(self):
        cert, key = self.pair()
        for c, k, detail in [
            (cert + ".missing", key, "no such file or directory"),
            (key, cert, "PEM inputs may have been switched"),
            (cert, cert, "found a certificate rather than a key"),
        ]:
            with self.assertRaises(CertificateError) as e:
                StaticCertificate(c, k)
            self.assertEqual(str(e.exception), "unable to load certificate")
            level, msg, attrs = self.records[-1]
            self.assertEqual((level, msg), ("ERROR", "Error loading TLS certificate"))
            self.assertIn(detail, attrs["error"])
        open(f"{self.tmp}/k2.pem", "wb").write(open(key, "rb").read())
        self.pair()  # a new certificate in c.pem: the saved key no longer matches it
        with self.assertRaises(CertificateError):
            StaticCertificate(cert, f"{self.tmp}/k2.pem")
        self.assertIn("does not match", self.records[-1][2]["error"])


class FakeService:
    def __init__(self, options):
        self.name = "svc"
        self.options = options
        self.certificates = None


class TLSSetupTests(Recording):
    def setUp(self):
        super().setUp()
        self.clock = task.Clock()

        class Router:
            services = {}

        self.tls = TLS(self.clock, Router(), default_cache_path=self.tmp)

    def test_wildcards_rejected_for_acme(self):
        service = FakeService(
            ServiceOptions(hosts=["first.example.com", "*.first.example.com"], tls_enabled=True)
        )
        with self.assertRaises(CertificateError) as e:
            self.tls.setup(service)
        self.assertEqual(str(e.exception), "automatic TLS does not support wildcards")

    def test_directory_choice(self):
        plain = ServiceOptions(hosts=["a.example.com"], tls_enabled=True)
        self.assertEqual(
            self.tls.issuer_for(plain).directory_url,
            "https://acme-v02.api.letsencrypt.org/directory",
        )
        self.assertTrue(
            self.tls.issuer_for(plain).store.path.endswith(
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            )
        )
        self.tls.acme_directory = "https://pebble.test/dir"
        self.assertEqual(self.tls.issuer_for(plain).directory_url, "https://pebble.test/dir")
        staging = ServiceOptions(
            hosts=["a.example.com"],
            tls_enabled=True,
            acme_directory="https://acme-staging-v02.api.letsencrypt.org/directory",
        )
        issuer = self.tls.issuer_for(staging)
        self.assertEqual(issuer.directory_url, staging.acme_directory)
        self.assertTrue(
            issuer.store.path.endswith(
                "67f2750652314251daad76f012141d33c9f7290f4f8ebb0a006a7f02d394a904"
            )
        )

    def test_non_tls_service_has_no_certificates(self):
        service = FakeService(ServiceOptions(hosts=["a.example.com"]))
        self.tls.setup(service)
        self.assertIsNone(service.certificates)


class Http01Tests(Recording):
    def setUp(self):
        super().setUp()
        self.clock = task.Clock()
        self.issuer = Issuer(self.clock, "https://ca/dir", CertificateStore(self.tmp), None)
        self.issuer.tokens["tok"] = "tok.thumb"
        self.certs = AcmeCertificates(self.issuer, ["App.example.com"], http_port=8080)

    def test_responses(self):
        prefix = "/.well-known/acme-challenge/"
        self.assertEqual(
            self.certs.http01_response("app.example.com", prefix + "tok"),
            (200, b"text/plain; charset=utf-8", b"tok.thumb"),
        )
        # The listener's own (non-80) port is accepted; any other port fails the policy.
        self.assertEqual(self.certs.http01_response("app.example.com:8080", prefix + "tok")[0], 200)
        status, _, body = self.certs.http01_response("app.example.com:9999", prefix + "tok")
        self.assertEqual(status, 403)
        self.assertEqual(
            body,
            b'acme/autocert: host "app.example.com:9999" not configured in HostWhitelist\n',
        )
        self.assertEqual(self.certs.http01_response("other.example.com", prefix + "tok")[0], 403)
        self.assertEqual(self.certs.http01_response("app.example.com", prefix + "nope")[0], 404)

    def test_handshake_policy(self):
        with self.assertRaises(HostNotAllowed):
            self.certs.context_for("other.example.com")
        self.assertIsNone(self.certs.context_for("app.example.com"))  # not issued yet
        self.assertIsNone(self.certs.prepare("other.example.com"))


# -- on-demand -----------------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, code, body):
        self.code = code
        self.body = body

    def deliverBody(self, protocol):
        transport = StringTransport()
        protocol.makeConnection(transport)
        for i in range(0, len(self.body), 100):
            if transport.producerState == "stopped":
                return
            protocol.dataReceived(self.body[i : i + 100])
        protocol.connectionLost(None)


class FakeHttp:
    def __init__(self, answer):
        self.answer = answer
        self.urls = []

    def get(self, url, allow_redirects=True):
        assert allow_redirects is False
        self.urls.append(url)
        host = url.split("host=")[1].split("&")[0]
        if self.answer == "hang":
            return defer.Deferred()
        if self.answer == "redirect":
            return defer.succeed(FakeResponse(302, b""))
        if host == "allowed.example.com":
            return defer.succeed(FakeResponse(200, b"ok"))
        return defer.succeed(FakeResponse(403, self.answer))


class OnDemandTests(Recording):
    def setUp(self):
        super().setUp()
        self.clock = task.Clock()
        self.issuer = Issuer(self.clock, "https://ca/dir", CertificateStore(self.tmp), None)

    def policy(self, http, url="https://example.com/check?token=abc"):
        return OnDemandPolicy(self.clock, url, self.issuer, http=http)

    def test_external_allow_and_deny(self):
        http = FakeHttp(b"Access denied")
        policy = self.policy(http)
        self.successResultOf(policy.check("allowed.example.com"))
        self.assertEqual(
            http.urls, ["https://example.com/check?host=allowed.example.com&token=abc"]
        )
        failure = self.failureResultOf(policy.check("denied.example.com"), HostNotAllowed)
        self.assertEqual(
            str(failure.value),
            'denied.example.com is not allowed to get a certificate (status: 403, body: "Access '
            'denied")',
        )
        self.assertIn(
            (
                "WARN",
                "TLS on-demand check denied host",
                {"host": "denied.example.com", "status": 403, "body": "Access denied"},
            ),
            self.records,
        )

    def test_body_limited_to_256_bytes(self):
        policy = self.policy(FakeHttp(b"a" * 500))
        message = str(self.failureResultOf(policy.check("x.example.com")).value)
        self.assertIn('"' + "a" * 256 + '"', message)
        self.assertNotIn("a" * 257, message)

    def test_redirect_denies(self):
        message = str(self.failureResultOf(self.policy(FakeHttp("redirect")).check("a.b")).value)
        self.assertIn("status: 302", message)

    def test_timeout_and_cancel_deny(self):
        d = self.policy(FakeHttp("hang")).check("a.example.com")
        self.clock.advance(2)
        self.assertIn("deadline exceeded", str(self.failureResultOf(d, HostNotAllowed).value))
        d = self.policy(FakeHttp("hang")).check("a.example.com")
        d.cancel()
        self.failureResultOf(d)

    def test_cached_names_need_no_check(self):
        self.issuer.store.write("cached.example.com", b"x")
        self.issuer.store.write("rsa-only.example.com+rsa", b"x")
        http = FakeHttp(b"no")
        policy = self.policy(http)
        for host in ("cached.example.com", "cached.example.com.", "rsa-only.example.com"):
            self.successResultOf(policy.check(host))
        self.assertEqual(http.urls, [])
        self.failureResultOf(policy.check("uncached.example.com"), HostNotAllowed)
        self.assertEqual(len(http.urls), 1)


class FakePipeline:
    """A resource standing in for the routing resource: answers like a backend would."""

    def __init__(self, status=200, body=b"", hang=False):
        self.status = status
        self.body = body
        self.hang = hang
        self.seen = []

    def render(self, request):
        self.seen.append((request.uri, request.requestHeaders.getRawHeaders(b"host")))
        request.probe_exchange = None
        if self.hang:
            return server.NOT_DONE_YET
        request.setResponseCode(self.status)
        request.write(self.body)
        request.finish()
        return server.NOT_DONE_YET


class LocalProbeTests(Recording):
    def test_status_body_and_host(self):
        clock = task.Clock()
        pipeline = FakePipeline(403, b"a" * 500)
        status, body = self.successResultOf(
            probe(clock, pipeline, "denied.example.com", "/allow?host=denied.example.com")
        )
        self.assertEqual((status, body), (403, b"a" * 256))
        self.assertEqual(
            pipeline.seen, [(b"/allow?host=denied.example.com", [b"denied.example.com"])]
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline(self):
        clock = task.Clock()
        d = probe(clock, FakePipeline(hang=True), "h.example.com", "/allow")
        clock.advance(2)
        self.assertEqual(self.successResultOf(d), (504, b""))

    def test_local_policy(self):
        clock = task.Clock()
        issuer = Issuer(clock, "https://ca/dir", CertificateStore(self.tmp), None)
        policy = OnDemandPolicy(clock, "/allow-host", issuer, local=FakePipeline(403, b"no"))
        failure = self.failureResultOf(policy.check("denied.example.com"), HostNotAllowed)
        self.assertIn("not allowed to get a certificate (status: 403", str(failure.value))
        policy.local = FakePipeline(200, b"")
        self.successResultOf(policy.check("allowed.example.com"))
