"""The on-disk certificate cache, laid out like Go's ``autocert.DirCache`` (SPEC §16.3).

One directory per ACME directory URL (``<cache root>/<sha256 hex of the URL string>``), mode
0700; one file per entry, mode 0600.  A certificate entry is the PEM private key followed by
the PEM chain, leaf first, named after the (lowercase, punycode) host; the ACME account key is
``acme_account+key``.  A Go kamal-proxy's cache therefore loads here and the other way round.

Files are a few kilobytes and written rarely (issuance, renewal), so they are read and written
synchronously; writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from kamal_proxy.options import make_private_dirs

if TYPE_CHECKING:
    # cryptography loads when a certificate is first read or made, not at start.
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

ACCOUNT_KEY_NAME = "acme_account+key"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


class StoreError(Exception):
    """An entry that cannot be parsed or a cache directory that cannot be written."""


def cache_dir(cache_root: str, directory_key: str) -> str:
    """``<cache root>/<lowercase hex SHA-256 of the directory string>``."""
    digest = hashlib.sha256(directory_key.encode("utf-8")).hexdigest()
    return os.path.join(cache_root, digest)


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Every PEM block of ``data`` as ``(label, whole block bytes)``, in order."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


@dataclass(eq=False)
class KeyAndChain:
    """A private key and its certificate chain, leaf first.

    ``context`` caches the server ``SSL.Context`` built from it (see ``sni.server_context``).
    """

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...]
    context: object = field(default=None, repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def to_pem(self) -> bytes:
        """The Go autocert entry: traditional (SEC1/PKCS#1) key PEM, then the chain."""
        from cryptography.hazmat.primitives import serialization

        key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return key + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @classmethod
    def from_pem(cls, data: bytes) -> KeyAndChain:
        """Parse an entry; the key must match the leaf (raises StoreError otherwise)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        key = None
        chain: list[x509.Certificate] = []
        try:
            for label, block in pem_blocks(data):
                if label.endswith("PRIVATE KEY"):
                    if key is None:
                        key = serialization.load_pem_private_key(block, password=None)
                elif label == "CERTIFICATE":
                    chain.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise StoreError(f"invalid PEM: {e}") from None
        if key is None:
            raise StoreError("no private key found")
        if not chain:
            raise StoreError("no certificate found")
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise StoreError("unsupported private key type")
        if not keys_match(key, chain[0]):
            raise StoreError("private key does not match public key")
        return cls(key, tuple(chain))

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    def __repr__(self) -> str:
        until = datetime.fromtimestamp(self.not_after, UTC).isoformat()
        return f"KeyAndChain(subject={self.leaf.subject.rfc4514_string()!r}, until={until})"


def keys_match(key, certificate: x509.Certificate) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == certificate.public_key().public_bytes(*fmt)


class CertificateStore:
    """One cache directory (for one ACME directory URL)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _file(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise StoreError(f"invalid cache entry name {name!r}")
        return os.path.join(self.path, name)

    def read(self, name: str) -> bytes | None:
        try:
            with open(self._file(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(str(e)) from None

    def exists(self, name: str) -> bool:
        try:
            return os.path.isfile(self._file(name))
        except StoreError:
            return False

    def write(self, name: str, data: bytes) -> None:
        """Atomically replace ``name`` (mode 0600) in the cache directory (mode 0700)."""
        target = self._file(name)
        try:
            make_private_dirs(self.path)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path)
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as e:
            raise StoreError(str(e)) from None

    # -- typed entries ----------------------------------------------------------------------

    def load_certificate(self, name: str) -> KeyAndChain | None:
        data = self.read(name)
        return None if data is None else KeyAndChain.from_pem(data)

    def save_certificate(self, name: str, entry: KeyAndChain) -> None:
        self.write(name, entry.to_pem())

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The ECDSA P-256 account key, created and stored on first use."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        data = self.read(ACCOUNT_KEY_NAME)
        if data is not None:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except ValueError as e:
                raise StoreError(f"invalid account key: {e}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise StoreError("account key is not an ECDSA key")
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        self.write(ACCOUNT_KEY_NAME, pem)
        return key
