"""The ACME issuer and service with a fake CA client and a fake clock: joins, backoff, renewal."""

from __future__ import annotations

import datetime
import shutil
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import defer, task
from twisted.trial import unittest

from kamal_proxy.observe import log as logmod
from kamal_proxy.tls import acme
from kamal_proxy.tls.acme import AcmeError, AcmeService, Issuer, renew_at
from kamal_proxy.tls.store import CertificateStore, KeyAndChain
from tests.integration.pebble import cert_pem, key_pem, make_ca

DAY = 86400


def issue_chain(csr_der: bytes, now: float, days: float) -> bytes:
    ca_key, ca = make_ca("fake acme ca")
    csr = x509.load_der_x509_csr(csr_der)
    start = datetime.datetime.fromtimestamp(now, datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(csr.extensions[0].value, False)
        .sign(ca_key, hashes.SHA256())
    )
    return leaf.public_bytes(serialization.Encoding.PEM) + cert_pem(ca)


class FakeClient:
    """Stands in for AcmeClient: each issue() waits until the test answers it."""

    def __init__(self, clock):
        self.clock = clock
        self.calls: list[tuple[list[str], defer.Deferred]] = []
        self.days = 90

    def issue(self, names, csr_der, publish, withdraw):
        publish("tok-" + names[0], "keyauth")
        d = defer.Deferred()
        self.calls.append((names, d, csr_der, withdraw))
        return d

    def answer(self, i=-1, ok=True):
        names, d, csr, withdraw = self.calls[i]
        withdraw("tok-" + names[0])
        if ok:
            d.callback(issue_chain(csr, self.clock.seconds(), self.days))
        else:
            d.errback(AcmeError("the CA said no"))


class IssuerTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.records = []
        self.patch(logmod, "emit", lambda level, msg, **a: self.records.append((level, msg, a)))
        self.store = CertificateStore(self.dir + "/cache")
        self.issuer = Issuer(self.clock, "https://ca.test/dir", self.store, lambda: None)
        self.fake = FakeClient(self.clock)
        self.issuer._client = self.fake

    def test_concurrent_callers_share_one_issuance(self):
        first, second = self.issuer.obtain("a.example.com"), self.issuer.obtain("a.example.com")
        self.assertEqual(len(self.fake.calls), 1)
        self.assertEqual(self.issuer.tokens, {"tok-a.example.com": "keyauth"})
        second.cancel()  # one caller giving up does not stop the issuance
        self.assertFailure(second, defer.CancelledError)
        self.fake.answer()
        entry = self.successResultOf(first)
        self.assertEqual(self.issuer.tokens, {})
        self.assertIs(self.issuer.cached("a.example.com"), entry)
        # Stored in the Go layout, reused by a new issuer (a restart) without the CA.
        again = Issuer(self.clock, "https://ca.test/dir", self.store, lambda: None)
        self.assertEqual(again.cached("a.example.com").leaf, entry.leaf)
        self.assertTrue(again.has_entry("a.example.com"))

    def test_failure_backs_off(self):
        d = self.issuer.obtain("a.example.com")
        self.fake.answer(ok=False)
        self.assertEqual(str(self.failureResultOf(d, AcmeError).value), "the CA said no")
        self.assertIn(
            (
                "ERROR",
                "ACME: unable to obtain certificate",
                {"host": "a.example.com", "error": "the CA said no", "retry_in": 60},
            ),
            self.records,
        )
        # Within the minute: fails at once, the CA is not asked.
        self.clock.advance(59)
        self.failureResultOf(self.issuer.obtain("a.example.com"), AcmeError)
        self.assertEqual(len(self.fake.calls), 1)
        self.clock.advance(1)
        d = self.issuer.obtain("a.example.com")
        self.fake.answer(ok=False)
        self.failureResultOf(d, AcmeError)
        self.assertEqual(self.issuer.failures["a.example.com"][0], 2)
        self.assertEqual(self.issuer.failures["a.example.com"][1], self.clock.seconds() + 120)

    def test_timeout(self):
        d = self.issuer.obtain("a.example.com")
        self.clock.advance(acme.ISSUE_TIMEOUT)
        self.assertEqual(str(self.failureResultOf(d, AcmeError).value), "timed out")


class RenewalTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.patch(logmod, "emit", lambda level, msg, **a: None)
        self.service = AcmeService(self.clock, lambda: None, wanted=lambda: self.wanted)
        store = CertificateStore(self.dir + "/cache")
        self.issuer = self.service.issuer("https://ca.test/dir", self.dir, store)
        self.fake = FakeClient(self.clock)
        self.issuer._client = self.fake
        self.wanted = [(self.issuer, "a.example.com")]

    def test_renew_at(self):
        d = self.issuer.obtain("x.example.com")
        self.fake.answer()
        entry = self.successResultOf(d)
        self.assertEqual(renew_at(entry), entry.not_after - 30 * DAY)
        self.fake.days = 6
        d = self.issuer.obtain("y.example.com")
        self.fake.answer()
        short = self.successResultOf(d)
        self.assertEqual(renew_at(short), short.not_after - 2 * DAY)

    def test_loop_obtains_missing_then_renews_when_due(self):
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(len(self.fake.calls), 1)  # at start: the missing certificate
        self.fake.answer()
        first = self.issuer.cached("a.example.com")
        self.clock.advance(acme.CHECK_INTERVAL)
        self.assertEqual(len(self.fake.calls), 1)  # nothing due
        # 30 days before expiry, the next check renews.
        self.clock.advance(renew_at(first) - self.clock.seconds() - 1)
        self.assertEqual(len(self.fake.calls), 1)
        self.clock.advance(acme.CHECK_INTERVAL)
        self.assertEqual(len(self.fake.calls), 2)
        self.fake.answer()
        self.assertIsNot(self.issuer.cached("a.example.com"), first)
        self.assertGreater(self.issuer.cached("a.example.com").not_after, first.not_after)

    def test_failed_renewal_retries_with_backoff_and_keeps_serving(self):
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.fake.answer()
        first = self.issuer.cached("a.example.com")
        self.clock.advance(61 * DAY)
        self.assertEqual(len(self.fake.calls), 2)
        self.fake.answer(ok=False)
        self.clock.advance(acme.CHECK_INTERVAL - 1)
        self.assertEqual(len(self.fake.calls), 2)  # backoff
        self.clock.advance(1)
        self.assertEqual(len(self.fake.calls), 3)
        self.assertIs(self.issuer.cached("a.example.com"), first)

    def test_kick_checks_on_next_turn(self):
        self.wanted = []
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.wanted = [(self.issuer, "a.example.com")]
        self.service.kick()
        self.service.kick()
        self.clock.advance(0)
        self.assertEqual(len(self.fake.calls), 1)

    def test_stop_cancels_issuance(self):
        self.service.startService()
        self.service.stopService()
        self.assertFalse(self.issuer.in_flight("a.example.com"))


class KeyAndChainHelpers(unittest.TestCase):
    def test_csr_names(self):
        from cryptography.hazmat.primitives.asymmetric import ec

        csr = x509.load_der_x509_csr(
            acme.make_csr(ec.generate_private_key(ec.SECP256R1()), ["a.example.com"])
        )
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["a.example.com"])

    def test_key_without_certificate_is_refused(self):
        from kamal_proxy.tls.store import StoreError

        ca_key, _ca = make_ca("x")
        self.assertRaises(StoreError, KeyAndChain.from_pem, key_pem(ca_key))
