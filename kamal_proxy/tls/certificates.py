"""Per-service certificate sources, and the TLS assembly used by ``app.make_service``.

A TLS service gets one source in ``service.certificates``:

* :class:`StaticCertificate` (``--tls-certificate-path``/``--tls-private-key-path``, §16.2):
  loaded and checked at deploy, served for every name routed to the service.
* :class:`AcmeCertificates` (§16.3): certificates from an ACME :class:`Issuer` for the
  configured hosts (a whitelist), or for any host an :class:`OnDemandPolicy` allows (§16.4).

Each source answers three questions: ``context_for(name)`` during the handshake (synchronous,
memory only; ``key_and_chain(name)`` is the same certificate as keys, for QUIC),
``prepare(name)`` before the handshake starts (None = go ahead, or a Deferred to wait for),
and ``http01_response(host, path)`` for the ACME stage of the pipeline (P9).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote_plus, urlsplit, urlunsplit

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime

from kamal_proxy import options as paths
from kamal_proxy.gostrings import go_quote
from kamal_proxy.observe.events import error, warn
from kamal_proxy.proxy.resource import ProbeResource
from kamal_proxy.service_options import ACME_PRODUCTION_DIRECTORY, parse_on_demand_url
from kamal_proxy.tls.acme import AcmeService, Issuer, renew_at
from kamal_proxy.tls.sni import CertificateSelector, server_context, tls_server_factory
from kamal_proxy.tls.store import CertificateStore, KeyAndChain, StoreError, cache_dir, pem_blocks

if TYPE_CHECKING:
    # pyOpenSSL, treq and twisted.web.client load when TLS is used (kamal_proxy.tls.lazy).
    import treq
    from OpenSSL import SSL
    from twisted.web.client import BrowserLikePolicyForHTTPS

ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
ON_DEMAND_TIMEOUT = 2.0
ON_DEMAND_MAX_BODY = 256
TEXT = b"text/plain; charset=utf-8"


class CertificateError(Exception):
    """A deploy-time failure; ``str()`` is the message the deploy fails with."""


class HostNotAllowed(Exception):
    """The host policy refused a name; ``str()`` is the Go autocert-compatible text."""


# -- static certificates (§16.2) ---------------------------------------------------------------


def load_key_pair(cert_path: str, key_path: str) -> KeyAndChain:
    """Go's ``tls.LoadX509KeyPair`` checks, with its error texts."""

    def read(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise StoreError(f"open {path}: {(e.strerror or str(e)).lower()}") from None

    cert_pem, key_pem = read(cert_path), read(key_path)
    cert_labels = [label for label, _ in pem_blocks(cert_pem)]
    if "CERTIFICATE" not in cert_labels:
        if any(label.endswith("PRIVATE KEY") for label in cert_labels):
            raise StoreError(
                "tls: failed to find certificate PEM data in certificate input, but did find "
                "a private key; PEM inputs may have been switched"
            )
        raise StoreError("tls: failed to find any PEM data in certificate input")
    key_labels = [label for label, _ in pem_blocks(key_pem)]
    if not any(label.endswith("PRIVATE KEY") for label in key_labels):
        if "CERTIFICATE" in key_labels:
            raise StoreError(
                "tls: found a certificate rather than a key in the PEM for the private key"
            )
        raise StoreError("tls: failed to find any PEM data in key input")
    certs = b"".join(block for label, block in pem_blocks(cert_pem) if label == "CERTIFICATE")
    keys = b"".join(block for label, block in pem_blocks(key_pem) if label.endswith("PRIVATE KEY"))
    try:
        return KeyAndChain.from_pem(keys + certs)
    except StoreError as e:
        raise StoreError(f"tls: {e}") from None


class StaticCertificate:
    """One certificate for every name routed to the service; no ACME handling."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        from OpenSSL import SSL

        try:
            self.entry = load_key_pair(cert_path, key_path)
            self.context = server_context(self.entry)
        except (StoreError, SSL.Error, ValueError) as e:
            error("Error loading TLS certificate", error=str(e))
            raise CertificateError("unable to load certificate") from None

    def context_for(self, name: str) -> SSL.Context:
        return self.context

    def key_and_chain(self, name: str) -> KeyAndChain:
        return self.entry

    def prepare(self, name: str) -> None:
        return None

    def http01_response(self, host: str, path: str) -> None:
        return None


# -- names and policies ------------------------------------------------------------------------


def acme_name(server_name: str) -> str:
    """autocert's handshake normalization: trim dots, require one, lowercase punycode."""
    name = server_name.strip(".")
    if "." not in name:
        raise HostNotAllowed("acme/autocert: server name component count invalid")
    if name.isascii():
        return name.lower()
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError as e:
        raise HostNotAllowed(f"acme/autocert: {e}") from None


def whitelist_name(host: str) -> str:
    """How ``autocert.HostWhitelist`` stores a configured host (lowercase punycode)."""
    try:
        return host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        return host


def check_url(url: str, host: str) -> str:
    """The on-demand URL with ``host=<host>`` set, query keys sorted, form-encoded (§16.4)."""
    parts = urlsplit(url)
    values: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        values.setdefault(key, []).append(value)
    values["host"] = [host]
    query = "&".join(
        f"{quote_plus(key)}={quote_plus(value)}" for key in sorted(values) for value in values[key]
    )
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class _Limited(protocol.Protocol):
    """Collects at most ``limit`` bytes of a response body, then stops reading it."""

    def __init__(self, limit: int, done: defer.Deferred) -> None:
        self.limit = limit
        self.done = done
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.data += data[: self.limit - len(self.data)]
        if len(self.data) >= self.limit:
            self.done.callback(bytes(self.data))
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.data))


def _read_limited(response: Any, limit: int) -> defer.Deferred:
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Limited(limit, done))
    return done


class OnDemandPolicy:
    """Asks the on-demand URL whether a host may get a certificate (SPEC §16.4)."""

    def __init__(
        self,
        reactor: IReactorTime,
        url: str,
        issuer: Issuer,
        http: Any = None,
        local: Any = None,
        timeout: float = ON_DEMAND_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.url = url
        self.mode, _ = parse_on_demand_url(url)
        self.issuer = issuer
        self.http = http
        self.local = local  # (resource) for local mode
        self.timeout = timeout

    def check(self, host: str) -> defer.Deferred:
        """Fires with None when allowed; fails with HostNotAllowed (or the network error)."""
        if self.issuer.has_entry(host.rstrip(".")):
            return defer.succeed(None)
        return defer.ensureDeferred(self._ask(host))

    async def _ask(self, host: str) -> None:
        url = check_url(self.url, host)
        if self.mode == "local":
            from kamal_proxy.tls.probe import probe

            status, body = await probe(self.reactor, self.local, host, url, self.timeout)
        else:
            status, body = await self._get(url)
        if status != 200:
            warn(
                "TLS on-demand check denied host",
                host=host,
                status=status,
                body=body.decode("utf-8", "replace"),
            )
            raise HostNotAllowed(
                f"{host} is not allowed to get a certificate (status: {status}, "
                f"body: {go_quote(body.decode('utf-8', 'surrogateescape'))})"
            )

    async def _get(self, url: str) -> tuple[int, bytes]:
        async def fetch() -> tuple[int, bytes]:
            response = await self.http.get(url, allow_redirects=False)
            body = await _read_limited(response, ON_DEMAND_MAX_BODY)
            return response.code, body

        d = defer.ensureDeferred(fetch())
        d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise HostNotAllowed(
                f'Get "{url}": context deadline exceeded (Client.Timeout exceeded)'
            ) from None
        except HostNotAllowed:
            raise
        except Exception as e:  # noqa: BLE001 - any network failure denies
            raise HostNotAllowed(f'Get "{url}": {e}') from None


# -- ACME certificates (§16.3) -----------------------------------------------------------------


class AcmeCertificates:
    """Certificates for a service's hosts (whitelist) or for on-demand hosts, over ACME."""

    def __init__(
        self,
        issuer: Issuer,
        hosts: list[str] | None,
        on_demand: OnDemandPolicy | None = None,
        http_port: int = 80,
    ) -> None:
        self.issuer = issuer
        # Validation requests name our own port when it is not 80 (e.g. Pebble in tests).
        self.own_port_suffix = f":{http_port}" if http_port != 80 else None
        self.hosts = frozenset(whitelist_name(h) for h in hosts or ())
        self.on_demand = on_demand
        #: on-demand names this service allowed (kept renewed while the service lives)
        self.names: set[str] = set()

    def wanted_names(self) -> Iterator[str]:
        yield from self.hosts
        yield from self.names

    def _allowed_now(self, name: str) -> None:
        """The synchronous part of the host policy (raises HostNotAllowed)."""
        if self.on_demand is None:
            if name not in self.hosts:
                raise HostNotAllowed(
                    f'acme/autocert: host "{name}" not configured in HostWhitelist'
                )

    def context_for(self, server_name: str) -> SSL.Context | None:
        entry = self.key_and_chain(server_name)
        return None if entry is None else server_context(entry)

    def key_and_chain(self, server_name: str) -> KeyAndChain | None:
        """The cached certificate for the name (memory only); starts a due renewal."""
        name = acme_name(server_name)
        self._allowed_now(name)
        issuer = self.issuer
        entry = issuer.cached(name)
        if entry is None:
            return None
        now = issuer.reactor.seconds()
        if now >= entry.not_after:
            return None
        if now >= renew_at(entry) and not issuer.in_flight(name) and not issuer.in_backoff(name):
            issuer.obtain(name).addErrback(lambda _: None)
        return entry

    def prepare(self, server_name: str) -> defer.Deferred | None:
        try:
            name = acme_name(server_name)
            self._allowed_now(name)
        except HostNotAllowed:
            return None  # the handshake fails (and logs) in context_for
        issuer = self.issuer
        entry = issuer.cached(name)
        if entry is not None and issuer.reactor.seconds() < entry.not_after:
            return None
        if issuer.in_backoff(name):
            return None
        if self.on_demand is None:
            return issuer.obtain(name)
        return defer.ensureDeferred(self._allow_and_obtain(name))

    async def _allow_and_obtain(self, name: str) -> KeyAndChain:
        await self.on_demand.check(name)
        entry = await self.issuer.obtain(name)
        self.names.add(name)
        return entry

    def http01_response(self, host: str, path: str) -> tuple[int, bytes, bytes]:
        """Stage P9: the policy checks the Host as received, so ``name:port`` fails (§16.3),
        except with the HTTP listener's own port when that is not 80 (a deviation: a CA
        only validates on port 80, which needs no port in Host; test CAs use others)."""
        suffix = self.own_port_suffix
        if suffix is not None and host.endswith(suffix):
            host = host[: -len(suffix)]
        if self.on_demand is None:
            if host not in self.hosts:
                message = f'acme/autocert: host "{host}" not configured in HostWhitelist'
                return 403, TEXT, message.encode("utf-8") + b"\n"
        elif not self.issuer.in_flight(host) and not self.issuer.has_entry(host):
            # Only names this service is issuing for (after its policy allowed them) pass.
            message = f"{host} is not allowed to get a certificate"
            return 403, TEXT, message.encode("utf-8") + b"\n"
        validation = self.issuer.tokens.get(path[len(ACME_CHALLENGE_PREFIX) :])
        if validation is None:
            return 404, TEXT, b"acme/autocert: certificate cache miss\n"
        return 200, TEXT, validation.encode("ascii")


# -- assembly ------------------------------------------------------------------------------------


def _trust_policy(ca_bundle: str) -> BrowserLikePolicyForHTTPS:
    from twisted.internet.ssl import Certificate, trustRootFromCertificates
    from twisted.web.client import BrowserLikePolicyForHTTPS

    if not ca_bundle:
        return BrowserLikePolicyForHTTPS()
    with open(ca_bundle, "rb") as f:
        data = f.read()
    certs = [Certificate.loadPEM(b) for label, b in pem_blocks(data) if label == "CERTIFICATE"]
    if not certs:
        raise ValueError(f"no certificate found in {ca_bundle}")
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certs))


class TLS:
    """Everything TLS for one server: the ACME service, the per-service sources, the port.

    ``acme_directory`` (run option) replaces Let's Encrypt for services that did not choose
    a directory themselves (``--tls-staging``); ``acme_ca_bundle`` is trusted for it.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        router: Any,
        acme_directory: str = "",
        acme_ca_bundle: str = "",
        default_cache_path: str | None = None,
        http_port: int = 80,
    ) -> None:
        self.reactor = reactor
        self.http_port = http_port
        self.router = router
        self.acme_directory = acme_directory
        self.acme_ca_bundle = acme_ca_bundle
        self.default_cache_path = default_cache_path
        self.acme = AcmeService(reactor, self._acme_http, wanted=self._wanted)
        self._probe_resource: ProbeResource | None = None
        self._check_http: Any = None

    # -- HTTP clients -------------------------------------------------------------------------

    def _acme_http(self) -> treq.client.HTTPClient:
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(self.reactor, persistent=True)
        policy = _trust_policy(self.acme_ca_bundle)
        return treq.client.HTTPClient(Agent(self.reactor, contextFactory=policy, pool=pool))

    def _on_demand_http(self) -> treq.client.HTTPClient:
        if self._check_http is None:
            import treq
            from twisted.web.client import Agent, HTTPConnectionPool

            pool = HTTPConnectionPool(self.reactor, persistent=False)
            self._check_http = treq.client.HTTPClient(Agent(self.reactor, pool=pool))
        return self._check_http

    def _probe(self) -> ProbeResource:
        if self._probe_resource is None:
            self._probe_resource = ProbeResource(self.reactor, self.router, port=0, secure=False)
        return self._probe_resource

    # -- per service --------------------------------------------------------------------------

    def issuer_for(self, options: Any) -> Issuer:
        """The issuer of a service: its directory wins, then the run option, then LE."""
        directory_key = options.acme_directory or self.acme_directory
        url = directory_key or ACME_PRODUCTION_DIRECTORY
        root = options.acme_cache_path or self.default_cache_path or paths.default_acme_cache_path()
        store = CertificateStore(cache_dir(root, directory_key))
        return self.acme.issuer(url, root, store)

    def certificates_for(self, service: Any) -> StaticCertificate | AcmeCertificates | None:
        """Build the service's certificate source; raises CertificateError to refuse."""
        options = service.options
        if not options.tls_enabled:
            return None
        if options.uses_static_certificate:
            return StaticCertificate(options.tls_certificate_path, options.tls_private_key_path)
        hosts = [h for h in options.hosts if h]
        if any("*" in h for h in hosts):
            raise CertificateError("automatic TLS does not support wildcards")
        issuer = self.issuer_for(options)
        if options.tls_on_demand_url:
            policy = OnDemandPolicy(
                self.reactor,
                options.tls_on_demand_url,
                issuer,
                http=self._on_demand_http(),
                local=self._probe(),
            )
            return AcmeCertificates(issuer, None, policy, self.http_port)
        return AcmeCertificates(issuer, hosts, None, self.http_port)

    def setup(self, service: Any) -> None:
        """``service.certificates`` for a deploy or restore; issuance starts in the background."""
        service.certificates = self.certificates_for(service)
        if isinstance(service.certificates, AcmeCertificates):
            self.acme.kick()

    def _wanted(self) -> Iterator[tuple[Issuer, str]]:
        for service in list(self.router.services.values()):
            certificates = service.certificates
            if isinstance(certificates, AcmeCertificates) and service.options.tls_enabled:
                for name in certificates.wanted_names():
                    yield certificates.issuer, name

    # -- the HTTPS port -----------------------------------------------------------------------

    def server_factory(self, site: protocol.Factory) -> protocol.Factory:
        return tls_server_factory(self.reactor, self.router, site)

    def selector(self) -> CertificateSelector:
        """The same SNI choice as the HTTPS port, for the HTTP/3 listener."""
        return CertificateSelector(self.router)
