"""The HTTPS listener's TLS context: certificates chosen per SNI name (SPEC §16.1)."""

from __future__ import annotations

from twisted.internet.ssl import CertificateOptions


def https_context(router) -> CertificateOptions:
    """Until a service has a certificate, every handshake fails (no certificate to offer)."""

    def for_name(name: bytes | None):
        certificates = getattr(router, "certificates", None)
        if certificates is None:
            return None
        return certificates.context_for(name)

    return CertificateOptions(
        contextForServerName=for_name, acceptableProtocols=[b"h2", b"http/1.1"]
    )
