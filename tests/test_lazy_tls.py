"""An idle proxy loads no TLS library, not even the standard library's ``ssl`` (issue 8 §4,
``kamal_proxy/tls/lazy.py``).

Each check runs in a fresh interpreter: the test runner's own process has Twisted and
OpenSSL loaded already, and there ``import_twisted_without_tls`` rightly does nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys

from twisted.trial import unittest

TLS_MODULES = ("OpenSSL", "cryptography", "h2", "treq", "josepy", "acme", "ssl", "_ssl", "_hashlib")

SERVER = f"""
import json, sys
import kamal_proxy.app
from twisted.internet import reactor
import kamal_proxy.proxy.channel, kamal_proxy.proxy.upstream, kamal_proxy.health.checker
import kamal_proxy.control.server, kamal_proxy.tls.certificates
loaded = [m for m in {TLS_MODULES!r} if m in sys.modules]
maps = open("/proc/self/maps").read()
print(json.dumps(loaded + [lib for lib in ("libcrypto", "libssl") if lib in maps]))
"""

LATER = """
import json
import kamal_proxy.app
from OpenSSL import SSL
from twisted.internet import ssl
print(json.dumps({
    "pyopenssl": SSL.Context(SSL.TLS_SERVER_METHOD) is not None,
    "twisted_tls": ssl.CertificateOptions is not None,
}))
"""

STDLIB_LATER = """
import json
import kamal_proxy.app
import hashlib, hmac
import http.client, ssl, urllib.request
import prometheus_client.exposition
print(json.dumps({
    "sha256": hashlib.sha256(b"kamal").hexdigest(),
    "md5": hashlib.md5(b"kamal").hexdigest(),
    "hmac": hmac.new(b"k", b"m", "sha256").hexdigest(),
    "https_handler": hasattr(urllib.request, "HTTPSHandler"),
    "https_connection": hasattr(http.client, "HTTPSConnection"),
    "tls_context": ssl.create_default_context() is not None,
    "prometheus": prometheus_client.exposition.choose_encoder is not None,
}))
"""


def run(code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise AssertionError(done.stderr)
    return json.loads(done.stdout)


class LazyTLSTests(unittest.TestCase):
    def test_the_server_modules_load_no_tls_library(self) -> None:
        self.assertEqual(run(SERVER), [])

    def test_the_standard_library_works_whole_afterwards(self) -> None:
        """What was loaded without ``ssl`` still does its work, and what needs ``ssl`` gets it."""
        self.assertEqual(
            run(STDLIB_LATER),
            {
                "sha256": hashlib.sha256(b"kamal").hexdigest(),
                "md5": hashlib.md5(b"kamal").hexdigest(),
                "hmac": hmac.new(b"k", b"m", "sha256").hexdigest(),
                "https_handler": True,
                "https_connection": True,
                "tls_context": True,
                "prometheus": True,
            },
        )

    def test_tls_works_when_first_used(self) -> None:
        self.assertEqual(
            run(LATER),
            {"pyopenssl": True, "twisted_tls": True},
        )
