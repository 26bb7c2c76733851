"""An idle proxy loads no TLS library (issue 8 §4, ``kamal_proxy/tls/lazy.py``).

Each check runs in a fresh interpreter: the test runner's own process has Twisted and
OpenSSL loaded already, and there ``import_twisted_without_tls`` rightly does nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial import unittest

TLS_MODULES = ("OpenSSL", "cryptography", "h2", "treq", "josepy", "acme")

SERVER = f"""
import json, sys
import kamal_proxy.app
from twisted.internet import reactor
import kamal_proxy.proxy.channel, kamal_proxy.proxy.upstream, kamal_proxy.health.checker
import kamal_proxy.control.server, kamal_proxy.tls.certificates
print(json.dumps([m for m in {TLS_MODULES!r} if m in sys.modules]))
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

    def test_tls_works_when_first_used(self) -> None:
        self.assertEqual(
            run(LATER),
            {"pyopenssl": True, "twisted_tls": True},
        )
