"""Automatic certificates over ACME (RFC 8555), without threads (SPEC §16.3).

Three layers, each testable on its own:

* :class:`AcmeClient` speaks the protocol with treq: nonces (and the badNonce retry), JWS
  POSTs signed by the account key, account, order, http-01 challenges, finalize, chain.  The
  ``acme`` library is used only for its pure parts (JWS, message parsing, key authorizations),
  never its blocking ``ClientV2``.
* :class:`Issuer` is one ACME directory and its cache directory: the account, the certificates
  in memory, the pending http-01 tokens, one issuance in flight per name and the failure
  backoff (no new attempt for a failed name within a minute, doubling to an hour).
* :class:`AcmeService` is the Twisted ``Service``: it owns the issuers, and a ``LoopingCall``
  that obtains missing certificates for the hosts of deployed TLS services and renews those
  that are due (30 days before expiry, or at a third of the lifetime for shorter-lived ones).

Nothing here blocks the reactor, and a CA that is down only delays the names it is asked for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from kamal_proxy.observe.events import error, info
from kamal_proxy.tls.lazy import lazy_module, preload
from kamal_proxy.tls.store import CertificateStore, KeyAndChain, StoreError

# The protocol's libraries load with the first issuance, not at start (kamal_proxy.tls.lazy).
jose = lazy_module("josepy")
treq = lazy_module("treq")
challenges = lazy_module("acme.challenges")
jws = lazy_module("acme.jws")
messages = lazy_module("acme.messages")
x509 = lazy_module("cryptography.x509")
oid = lazy_module("cryptography.x509.oid")
hashes = lazy_module("cryptography.hazmat.primitives.hashes")
serialization = lazy_module("cryptography.hazmat.primitives.serialization")
ec = lazy_module("cryptography.hazmat.primitives.asymmetric.ec")


def load_libraries() -> None:
    """Import the protocol's libraries now (``app.load_deferred_modules``)."""
    preload(jose, treq, challenges, jws, messages, x509, oid, hashes, serialization, ec)


def read_cached(store: CertificateStore, name: str) -> KeyAndChain | None:
    """The stored certificate for a handshake: an unreadable one is logged and counts as
    missing (so it is issued again).  The main process's issuer and a worker's copy read
    the one cache directory through this."""
    try:
        return store.load_certificate(name)
    except StoreError as e:
        error("ACME: unable to read cached certificate", host=name, error=str(e))
        return None


DAY = 86400.0
RENEW_BEFORE = 30 * DAY
FIRST_RETRY = 60.0
MAX_RETRY = 3600.0
ISSUE_TIMEOUT = 300.0
CHECK_INTERVAL = 60.0
USER_AGENT = b"kamal-proxy (Python, Twisted)"


class AcmeError(Exception):
    """Issuance failed; ``str()`` says why (the CA's problem detail when there is one)."""


class AcmeProblem(AcmeError):
    """The CA answered with an error status and (usually) an RFC 7807 problem document."""

    def __init__(self, status: int, problem: messages.Error | None, text: str) -> None:
        self.status = status
        self.problem = problem
        detail = problem.detail or problem.typ if problem is not None else text[:200]
        super().__init__(f"{status}: {detail}")

    @property
    def code(self) -> str | None:
        return self.problem.code if self.problem is not None else None


def renew_at(entry: KeyAndChain) -> float:
    """When to renew: 30 days before expiry, or with a third of the lifetime left if sooner."""
    lifetime = max(entry.not_after - entry.not_before, 0.0)
    return entry.not_after - min(RENEW_BEFORE, lifetime / 3)


def make_csr(key: ec.EllipticCurvePrivateKey, names: list[str]) -> bytes:
    """A DER CSR for ``names`` (first name as CN when it fits)."""
    subject = []
    if len(names[0]) <= 64:
        subject.append(x509.NameAttribute(oid.NameOID.COMMON_NAME, names[0]))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


class AcmeClient:
    """A thread-free RFC 8555 client for one directory and one account key."""

    def __init__(
        self,
        reactor: IReactorTime,
        directory_url: str,
        account_key: ec.EllipticCurvePrivateKey,
        http: treq.client.HTTPClient,
        poll_interval: float = 0.25,
        max_poll_wait: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.directory_url = directory_url
        self.jwk = jose.JWKEC(key=account_key)
        self.http = http
        self.poll_interval = poll_interval
        self.max_poll_wait = max_poll_wait
        self.kid: str | None = None
        self._directory: messages.Directory | None = None
        self._nonces: list[bytes] = []
        self._registering = defer.DeferredLock()
        #: How many newOrder requests this client sent (tests check "no new order").
        self.orders = 0

    # -- transport --------------------------------------------------------------------------

    def _remember_nonce(self, response) -> None:
        nonce = response.headers.getRawHeaders(b"replay-nonce")
        if nonce:
            try:
                self._nonces.append(jose.decode_b64jose(nonce[0].decode("ascii")))
            except (jose.DeserializationError, UnicodeDecodeError):
                pass

    async def _check(self, response) -> bytes:
        body = await treq.content(response)
        self._remember_nonce(response)
        if response.code >= 400:
            problem = None
            try:
                problem = messages.Error.from_json(json.loads(body))
            except (ValueError, jose.DeserializationError):
                pass
            raise AcmeProblem(response.code, problem, body.decode("utf-8", "replace"))
        return body

    async def directory(self) -> messages.Directory:
        if self._directory is None:
            response = await self.http.get(
                self.directory_url, headers={b"User-Agent": [USER_AGENT]}
            )
            body = await self._check(response)
            try:
                self._directory = messages.Directory.from_json(json.loads(body))
            except (ValueError, jose.DeserializationError) as e:
                raise AcmeError(f"invalid ACME directory: {e}") from None
        return self._directory

    async def _nonce(self) -> bytes:
        if self._nonces:
            return self._nonces.pop()
        directory = await self.directory()
        response = await self.http.head(
            directory["newNonce"], headers={b"User-Agent": [USER_AGENT]}
        )
        await treq.content(response)
        self._remember_nonce(response)
        if not self._nonces:
            raise AcmeError("the ACME server sent no Replay-Nonce")
        return self._nonces.pop()

    async def post(
        self, url: str, payload: Any, accept: bytes | None = None, with_jwk: bool = False
    ) -> tuple[Any, bytes]:
        """A JWS POST (``payload`` None = POST-as-GET), retrying badNonce twice.

        Signed with the account URL (kid) once known, with the public key (JWK) before
        that or when ``with_jwk`` (newAccount)."""
        data = b"" if payload is None else json.dumps(payload).encode("utf-8")
        for attempt in range(3):
            signed = jws.JWS.sign(
                data,
                key=self.jwk,
                alg=jose.ES256,
                nonce=await self._nonce(),
                url=url,
                kid=None if with_jwk else self.kid,
            )
            headers = {
                b"Content-Type": [b"application/jose+json"],
                b"User-Agent": [USER_AGENT],
            }
            if accept is not None:
                headers[b"Accept"] = [accept]
            response = await self.http.post(
                url, data=signed.json_dumps().encode("utf-8"), headers=headers
            )
            try:
                return response, await self._check(response)
            except AcmeProblem as e:
                if e.code != "badNonce" or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- protocol ---------------------------------------------------------------------------

    async def register(self) -> str:
        """Create (or find, for a known key) the account; terms of service accepted.

        Concurrent issuances share one registration (and its kid).
        """
        if self.kid is not None:
            return self.kid
        return await self._registering.run(lambda: defer.ensureDeferred(self._register()))

    async def _register(self) -> str:
        if self.kid is not None:  # registered while this caller waited for the lock
            return self.kid
        directory = await self.directory()
        response, _ = await self.post(
            directory["newAccount"], {"termsOfServiceAgreed": True}, with_jwk=True
        )
        location = response.headers.getRawHeaders(b"location")
        if not location:
            raise AcmeError("the ACME server sent no account URL")
        self.kid = location[0].decode("ascii")
        return self.kid

    async def issue(
        self,
        names: list[str],
        csr_der: bytes,
        publish: Callable[[str, str], Any],
        withdraw: Callable[[str], None],
    ) -> bytes:
        """Order a certificate for ``names`` over http-01; the PEM chain, leaf first.

        ``publish(token, key_authorization)`` must make the token answerable on port 80
        before it returns, or return a Deferred that fires once it is (worker processes);
        ``withdraw(token)`` is called once the authorization is final.
        """
        await self.register()
        directory = await self.directory()
        self.orders += 1
        response, body = await self.post(
            directory["newOrder"],
            {"identifiers": [{"type": "dns", "value": n} for n in names]},
        )
        location = response.headers.getRawHeaders(b"location")
        if not location:
            raise AcmeError("the ACME server sent no order URL")
        order_url = location[0].decode("ascii")
        order = _parse(messages.Order, body)
        for authz_url in order.authorizations:
            await self._authorize(authz_url, publish, withdraw)

        order = await self._poll(order_url, messages.Order, ("pending",))
        if order.status == messages.STATUS_READY:
            _, body = await self.post(order.finalize, {"csr": jose.b64encode(csr_der).decode()})
            order = _parse(messages.Order, body)
        order = await self._poll(order_url, messages.Order, ("ready", "processing"))
        if order.status != messages.STATUS_VALID or not order.certificate:
            raise AcmeError(f"order {order.status.name}: {_problem(order.error)}")
        _, chain = await self.post(order.certificate, None, b"application/pem-certificate-chain")
        return chain

    async def _authorize(
        self, url: str, publish: Callable[[str, str], Any], withdraw: Callable[[str], None]
    ) -> None:
        _, body = await self.post(url, None)
        authz = _parse(messages.Authorization, body)
        if authz.status == messages.STATUS_VALID:
            return  # reused authorization
        name = authz.identifier.value if authz.identifier else "?"
        challb = next((c for c in authz.challenges if isinstance(c.chall, challenges.HTTP01)), None)
        if challb is None:
            raise AcmeError(f"no http-01 challenge offered for {name}")
        _, validation = challb.chall.response_and_validation(self.jwk)
        token = challb.chall.encode("token")
        published = publish(token, validation)
        try:
            if published is not None:
                await published
            await self.post(challb.uri, {})
            authz = await self._poll(url, messages.Authorization, ("pending",))
        finally:
            withdraw(token)
        if authz.status != messages.STATUS_VALID:
            failed = next((c for c in authz.challenges if c.error is not None), None)
            detail = _problem(failed.error) if failed is not None else authz.status.name
            raise AcmeError(f"authorization for {name} failed: {detail}")

    async def _poll(self, url: str, kind: type, waiting: tuple[str, ...]):
        while True:
            response, body = await self.post(url, None)
            obj = _parse(kind, body)
            if obj.status is None or obj.status.name not in waiting:
                return obj
            delay = self.poll_interval
            retry_after = response.headers.getRawHeaders(b"retry-after")
            if retry_after:
                delay = _retry_after(retry_after[0].decode("latin-1"), delay)
            await task.deferLater(self.reactor, min(delay, self.max_poll_wait), lambda: None)


def _parse(kind: type, body: bytes):
    try:
        return kind.from_json(json.loads(body))
    except (ValueError, jose.DeserializationError) as e:
        raise AcmeError(f"invalid {kind.__name__} from the ACME server: {e}") from None


def _problem(problem: messages.Error | None) -> str:
    if problem is None:
        return "no detail"
    return problem.detail or problem.typ


def _retry_after(value: str, default: float) -> float:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return default


class Issuer:
    """One ACME directory with its cache directory (shared by all services using them)."""

    def __init__(
        self,
        reactor: IReactorTime,
        directory_url: str,
        store: CertificateStore,
        http_factory: Callable[[], Any],
        on_ready: Callable[[str, KeyAndChain], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.directory_url = directory_url
        self.store = store
        self._http_factory = http_factory
        self._client: AcmeClient | None = None
        #: name -> certificate in memory (loaded from the store or freshly issued)
        self.certificates: dict[str, KeyAndChain] = {}
        #: http-01 token -> key authorization, while an authorization is pending
        self.tokens: dict[str, str] = {}
        self._inflight: dict[str, defer.Deferred] = {}
        self._waiters: dict[str, list[defer.Deferred]] = {}
        #: name -> (consecutive failures, earliest next attempt, last error)
        self.failures: dict[str, tuple[int, float, str]] = {}
        self._on_ready = on_ready
        #: Told about tokens and new certificates (the worker processes' copies); or None.
        self.events: IssuerEvents | None = None

    @property
    def key(self) -> str:
        """Names this issuer across processes: its directory and its cache directory."""
        return f"{self.directory_url} {self.store.path}"

    @property
    def client(self) -> AcmeClient:
        if self._client is None:
            key = self.store.account_key()
            self._client = AcmeClient(self.reactor, self.directory_url, key, self._http_factory())
        return self._client

    # -- lookups (synchronous: used during handshakes) --------------------------------------

    def cached(self, name: str) -> KeyAndChain | None:
        """The certificate for ``name`` from memory, else from the store (then kept)."""
        entry = self.certificates.get(name)
        if entry is None:
            entry = read_cached(self.store, name)
            if entry is not None:
                self._install(name, entry)
        return entry

    def has_entry(self, name: str) -> bool:
        """Cache check of the on-demand policy: ``name`` or ``name+rsa`` exists (§16.4)."""
        return (
            name in self.certificates or self.store.exists(name) or self.store.exists(name + "+rsa")
        )

    def _install(self, name: str, entry: KeyAndChain) -> None:
        self.certificates[name] = entry
        if self._on_ready is not None:
            self._on_ready(name, entry)

    def needs_certificate(self, name: str) -> bool:
        entry = self.cached(name)
        return entry is None or self.reactor.seconds() >= renew_at(entry)

    def in_backoff(self, name: str) -> bool:
        failure = self.failures.get(name)
        return failure is not None and self.reactor.seconds() < failure[1]

    def in_flight(self, name: str) -> bool:
        return name in self._inflight

    @property
    def busy(self) -> bool:
        """A certificate is being issued (an upgrade waits for it: ``process/upgrade.py``)."""
        return bool(self._inflight)

    # -- issuance ---------------------------------------------------------------------------

    def obtain(self, name: str) -> defer.Deferred:
        """Issue (or renew) the certificate for ``name``; fires with the KeyAndChain.

        Concurrent callers share one issuance, and each may cancel its own Deferred without
        stopping it.  A name that failed recently fails at once with the last error until
        its backoff has passed.
        """
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._waiters.get(name)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        failure = self.failures.get(name)
        if failure is not None and self.reactor.seconds() < failure[1]:
            return defer.fail(AcmeError(failure[2]))
        self._waiters[name] = [waiter]
        d = defer.ensureDeferred(self._issue(name))
        self._inflight[name] = d
        d.addTimeout(ISSUE_TIMEOUT, self.reactor)
        d.addBoth(self._issued, name, self.reactor.seconds())
        return waiter

    async def _issue(self, name: str) -> KeyAndChain:
        info("ACME: obtaining certificate", host=name, directory=self.directory_url)
        key = ec.generate_private_key(ec.SECP256R1())
        chain_pem = await self.client.issue(
            [name], make_csr(key, [name]), lambda t, v: self._publish(name, t, v), self._withdraw
        )
        entry = KeyAndChain.from_pem(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            + chain_pem
        )
        self.store.save_certificate(name, entry)
        return entry

    def _publish(self, name: str, token: str, validation: str) -> defer.Deferred | None:
        self.tokens[token] = validation
        if self.events is None:
            return None
        return self.events.challenge(self, name, token, validation)

    def _withdraw(self, token: str) -> None:
        self.tokens.pop(token, None)
        if self.events is not None:
            self.events.challenge_done(self, token)

    def _issued(self, result: Any, name: str, started: float) -> None:
        del self._inflight[name]
        waiters = self._waiters.pop(name, [])
        if isinstance(result, Failure):
            exc = result.value
            if isinstance(exc, defer.TimeoutError):
                reason = "timed out"
            elif isinstance(exc, defer.CancelledError):
                reason = "cancelled"
            else:
                reason = str(exc) or repr(exc)
            count = self.failures.get(name, (0, 0.0, ""))[0] + 1
            delay = min(FIRST_RETRY * 2 ** (count - 1), MAX_RETRY)
            self.failures[name] = (count, self.reactor.seconds() + delay, reason)
            error(
                "ACME: unable to obtain certificate",
                host=name,
                error=reason,
                retry_in=int(delay),
            )
            for waiter in waiters:
                if not waiter.called:
                    waiter.errback(AcmeError(reason))
            return
        self.failures.pop(name, None)
        self._install(name, result)
        if self.events is not None:
            self.events.issued(self, name, result)
        info(
            "ACME: certificate obtained",
            host=name,
            not_after=result.leaf.not_valid_after_utc.isoformat(),
            seconds=round(self.reactor.seconds() - started, 3),
        )
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(result)

    def cancel_all(self) -> None:
        for d in list(self._inflight.values()):
            d.cancel()


class IssuerEvents(Protocol):
    """What happens in an issuer that other processes must know (see ``Issuer.events``)."""

    def challenge(
        self, issuer: Issuer, name: str, token: str, validation: str
    ) -> defer.Deferred | None:
        """An http-01 token must be answerable; a Deferred that fires once it is."""

    def challenge_done(self, issuer: Issuer, token: str) -> None:
        """The token's authorization is final."""

    def issued(self, issuer: Issuer, name: str, entry: KeyAndChain) -> None:
        """A certificate was issued or renewed."""


class AcmeService(service.Service):
    """Owns the issuers; obtains and renews the certificates deployed services need.

    ``wanted()`` yields ``(issuer, name)`` pairs for every name that should have a valid
    certificate now (the hosts of deployed ACME services); each check obtains the missing
    ones and renews the due ones, in the background.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        http_factory: Callable[[], Any],
        wanted: Callable[[], Iterable[tuple[Issuer, str]]] = lambda: (),
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.http_factory = http_factory
        self.wanted = wanted
        self.check_interval = check_interval
        self.issuers: dict[tuple[str, str], Issuer] = {}
        #: Given to every issuer (see ``Issuer.events``).
        self.events: IssuerEvents | None = None
        self._loop: task.LoopingCall | None = None
        self._kicked: Any = None

    def issuer(self, directory_url: str, cache_path: str, store: CertificateStore) -> Issuer:
        key = (directory_url, store.path)
        issuer = self.issuers.get(key)
        if issuer is None:
            issuer = self.issuers[key] = Issuer(
                self.reactor, directory_url, store, self.http_factory
            )
            issuer.events = self.events
        return issuer

    def set_events(self, events: IssuerEvents | None) -> None:
        self.events = events
        for issuer in self.issuers.values():
            issuer.events = events

    def find_issuer(self, key: str) -> Issuer | None:
        """The issuer whose ``key`` this is (as a worker names it)."""
        for issuer in self.issuers.values():
            if issuer.key == key:
                return issuer
        return None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.check_interval, now=True).addErrback(
            lambda f: error("ACME: renewal loop failed", error=str(f.value))
        )

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._kicked is not None and self._kicked.active():
            self._kicked.cancel()
        for issuer in self.issuers.values():
            issuer.cancel_all()

    def issuing(self) -> bool:
        """Some certificate is being issued now."""
        return any(issuer.busy for issuer in self.issuers.values())

    def kick(self) -> None:
        """Check soon (after the current reactor turn, once the deploy is installed)."""
        if not self.running:
            return
        if self._kicked is None or not self._kicked.active():
            self._kicked = self.reactor.callLater(0, self.check)

    def check(self) -> None:
        for issuer, name in self.wanted():
            if issuer.in_flight(name) or issuer.in_backoff(name):
                continue
            if issuer.needs_certificate(name):
                issuer.obtain(name).addErrback(lambda _: None)
