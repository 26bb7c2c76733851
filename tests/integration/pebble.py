"""Pebble (Debian's ``pebble``) and a DNS server answering 127.0.0.1 for every name.

``PebbleServer`` generates a CA and a listener certificate for Pebble's own HTTPS API, starts
a DNS shim (this file run as a script: a ``twisted.names`` server on a free UDP/TCP port)
and ``pebble -dnsserver`` with ``PEBBLE_VA_NOSLEEP=1`` and ``httpPort`` set to the proxy's
HTTP port, so Pebble's real http-01 validation reaches the proxy.  Pebble makes a new issuing
root at every start: ``root_pem()`` fetches it from the management port.

Every process is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


def _die_with_parent() -> None:
    """Child pre-exec hook: the child is killed if the test runner dies (Linux only)."""
    from tests.integration.support import _die_with_parent as hook

    hook()


def pebble_available() -> bool:
    return os.path.exists(PEBBLE)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_pem(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    ips: list[str] = (),
    organization: str | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


class PebbleServer:
    """Pebble plus the DNS shim, on free loopback ports, in a temporary directory."""

    def __init__(self, http_port: int, env: dict[str, str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="kp-pebble-")
        self.http_port = http_port
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = 0
        self.extra_env = dict(env or {})
        self.ca_path = os.path.join(self.dir, "ca.pem")
        self.pebble: subprocess.Popen | None = None
        self.dns: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "pebble.log")

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self, timeout: float = 60.0) -> PebbleServer:
        """Start the DNS shim and Pebble; ``timeout`` bounds each start-up (support.py's
        PROCESS_TIMEOUT: starting a process takes long on a loaded machine)."""
        from tests.integration.support import _readline_with_timeout

        ca_key, ca = make_ca("kamal-proxy test pebble CA")
        key, cert = make_leaf(ca_key, ca, ["localhost"], ["127.0.0.1"])
        write_pem(self.ca_path, cert_pem(ca))
        write_pem(os.path.join(self.dir, "cert.pem"), cert_pem(cert))
        write_pem(os.path.join(self.dir, "key.pem"), key_pem(key))
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": os.path.join(self.dir, "cert.pem"),
                "privateKey": os.path.join(self.dir, "key.pem"),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        config_path = os.path.join(self.dir, "pebble-config.json")
        with open(config_path, "w") as f:
            json.dump(config, f)

        self.dns = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        line = _readline_with_timeout(self.dns, timeout)
        if not line.startswith("READY "):
            self.stop()
            raise AssertionError(f"DNS shim failed to start: {line!r}")
        self.dns_port = int(line.split()[1])

        env = {"PATH": os.environ.get("PATH", ""), "PEBBLE_VA_NOSLEEP": "1", **self.extra_env}
        with open(self.log_path, "wb") as log:
            self.pebble = subprocess.Popen(
                [
                    PEBBLE,
                    "-config",
                    config_path,
                    "-dnsserver",
                    f"127.0.0.1:{self.dns_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get(self.directory_url)
                return self
            except OSError:
                if self.pebble.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("pebble did not start:\n" + self.log()) from None
                time.sleep(0.05)

    def get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=self.ca_path)
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.read()

    def root_pem(self) -> bytes:
        """The issuing root of this Pebble run (regenerated at every start)."""
        return self.get(f"https://127.0.0.1:{self.management_port}/roots/0")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def orders(self) -> int:
        """How many orders Pebble logged (a restart that reuses certificates adds none)."""
        return self.log().count("POST /order-plz") + self.log().count("POST /new-order")

    def stop(self) -> None:
        _stop(self.pebble)
        _stop(self.dns)
        if self.dns is not None and self.dns.stdout is not None:
            self.dns.stdout.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _serve_dns(port: int) -> None:
    """A DNS server answering A 127.0.0.1 for every name (and nothing for other types)."""
    from twisted.internet import defer, reactor
    from twisted.names import dns, server

    class AnyNameToLoopback:
        def query(self, query, timeout=None):
            if query.type == dns.A:
                answer = dns.RRHeader(
                    name=query.name.name,
                    type=dns.A,
                    ttl=0,
                    payload=dns.Record_A("127.0.0.1", ttl=0),
                )
                return defer.succeed(([answer], [], []))
            return defer.succeed(([], [], []))

    from twisted.internet.error import CannotListenError

    factory = server.DNSServerFactory(clients=[AnyNameToLoopback()])
    udp = reactor.listenUDP(
        port, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1"
    )
    port = udp.getHost().port
    try:  # TCP only matters for truncated answers, which ours never are
        reactor.listenTCP(port, factory, interface="127.0.0.1")
    except (OSError, CannotListenError):  # the UDP port number may be taken for TCP
        pass
    reactor.callWhenRunning(lambda: (sys.stdout.write(f"READY {port}\n"), sys.stdout.flush()))
    reactor.run()


if __name__ == "__main__":
    _serve_dns(int(sys.argv[1]))
