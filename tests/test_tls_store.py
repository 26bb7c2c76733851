"""The on-disk certificate cache: Go-compatible names, layout and permissions (SPEC §16.3)."""

from __future__ import annotations

import os
import stat
import tempfile

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial import unittest

from kamal_proxy.service_options import ACME_STAGING_DIRECTORY
from kamal_proxy.tls.store import (
    ACCOUNT_KEY_NAME,
    CertificateStore,
    KeyAndChain,
    StoreError,
    cache_dir,
)
from tests.integration.pebble import cert_pem, key_pem, make_ca, make_leaf


def make_entry(names=("app.example.com",)) -> tuple[KeyAndChain, bytes]:
    ca_key, ca = make_ca("test ca")
    key, leaf = make_leaf(ca_key, ca, list(names))
    pem = key_pem(key) + cert_pem(leaf) + cert_pem(ca)
    return KeyAndChain.from_pem(pem), pem


class CacheDirTests(unittest.TestCase):
    def test_default_and_staging_names(self):
        self.assertEqual(
            cache_dir("/c", ""),
            "/c/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        self.assertEqual(
            cache_dir("/c", ACME_STAGING_DIRECTORY),
            "/c/67f2750652314251daad76f012141d33c9f7290f4f8ebb0a006a7f02d394a904",
        )


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.root, ignore_errors=True))
        self.path = os.path.join(self.root, "certs", "abc")
        self.store = CertificateStore(self.path)

    def test_entry_round_trip_and_permissions(self):
        entry, pem = make_entry()
        self.store.save_certificate("app.example.com", entry)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o700)
        file = os.path.join(self.path, "app.example.com")
        self.assertEqual(stat.S_IMODE(os.stat(file).st_mode), 0o600)
        data = open(file, "rb").read()
        # Go autocert layout: key first (SEC1 "EC PRIVATE KEY"), then the chain, leaf first.
        self.assertTrue(data.startswith(b"-----BEGIN EC PRIVATE KEY-----"))
        self.assertEqual(data.count(b"BEGIN CERTIFICATE"), 2)
        loaded = self.store.load_certificate("app.example.com")
        self.assertEqual(loaded.leaf, entry.leaf)
        self.assertEqual(len(loaded.chain), 2)
        self.assertTrue(self.store.exists("app.example.com"))
        self.assertFalse(self.store.exists("other.example.com"))
        self.assertIsNone(self.store.load_certificate("other.example.com"))

    def test_mismatched_key_is_rejected(self):
        entry, _ = make_entry()
        other = ec.generate_private_key(ec.SECP256R1())
        with self.assertRaises(StoreError):
            KeyAndChain.from_pem(key_pem(other) + cert_pem(entry.leaf))
        with self.assertRaises(StoreError):
            KeyAndChain.from_pem(cert_pem(entry.leaf))
        with self.assertRaises(StoreError):
            KeyAndChain.from_pem(key_pem(other))

    def test_account_key_is_created_once(self):
        key = self.store.account_key()
        again = CertificateStore(self.path).account_key()
        self.assertEqual(key.private_numbers(), again.private_numbers())
        data = open(os.path.join(self.path, ACCOUNT_KEY_NAME), "rb").read()
        self.assertTrue(data.startswith(b"-----BEGIN EC PRIVATE KEY-----"))
        self.assertIsInstance(key.curve, ec.SECP256R1)

    def test_bad_names_are_refused(self):
        for name in ("", "../x", "a/b", ".."):
            with self.assertRaises(StoreError):
                self.store.write(name, b"x")
