"""A worker's view of ACME: certificates and http-01 tokens owned by the main process.

Handshakes and http-01 requests reach the workers, but issuance (the account, the orders, the
renewals, the backoff) happens once, in the main process.  A worker therefore builds the same
certificate sources as a single process (``tls/certificates.py``: static certificates,
whitelisted and on-demand ACME hosts, the on-demand check through its own pipeline) on an
:class:`IssuerCopy` instead of an ``Issuer``: it reads certificates from memory or the shared
cache directory, answers the tokens the main process sent, and asks the main process to obtain
what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from kamal_proxy import options as paths
from kamal_proxy.observe.events import error
from kamal_proxy.service_options import ACME_PRODUCTION_DIRECTORY
from kamal_proxy.tls.acme import read_cached
from kamal_proxy.tls.certificates import TLS
from kamal_proxy.tls.store import CertificateStore, KeyAndChain, StoreError, cache_dir


class IssuerCopy:
    """What ``AcmeCertificates`` and ``OnDemandPolicy`` ask of an issuer, answered in a worker.

    ``ask(issuer_key, name)`` asks the main process for a certificate: a Deferred that fires
    with the PEM entry.  The main process keeps the backoff of failed names (it answers with
    the last error at once), so ``in_backoff`` is always False here.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        key: str,
        store: CertificateStore,
        ask: Callable[[str, str], defer.Deferred],
    ) -> None:
        self.reactor = reactor
        self.key = key
        self.store = store
        self._ask = ask
        self.certificates: dict[str, KeyAndChain] = {}
        #: http-01 token -> key authorization, as sent by the main process
        self.tokens: dict[str, str] = {}
        self._token_names: dict[str, str] = {}
        self._waiters: dict[str, list[defer.Deferred]] = {}

    def cached(self, name: str) -> KeyAndChain | None:
        entry = self.certificates.get(name)
        if entry is None:
            entry = read_cached(self.store, name)
            if entry is not None:
                self.certificates[name] = entry
        return entry

    def has_entry(self, name: str) -> bool:
        return (
            name in self.certificates or self.store.exists(name) or self.store.exists(name + "+rsa")
        )

    def in_flight(self, name: str) -> bool:
        """Asked for here, or being validated by the CA (a token for it is out)."""
        return name in self._waiters or name in self._token_names.values()

    def in_backoff(self, name: str) -> bool:
        return False

    def obtain(self, name: str) -> defer.Deferred:
        """The certificate from the main process; concurrent callers share one request and
        each may cancel its own Deferred."""
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._waiters.get(name)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiters[name] = [waiter]
        self._ask(self.key, name).addBoth(self._answered, name)
        return waiter

    def _answered(self, result: Any, name: str) -> None:
        waiters = self._waiters.pop(name, [])
        if isinstance(result, str):
            try:
                entry = KeyAndChain.from_pem(result.encode("ascii"))
            except (StoreError, UnicodeError) as e:
                result = e
            else:
                self.certificates[name] = entry
                result = entry
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, KeyAndChain):
                waiter.callback(result)
            else:
                waiter.errback(result)

    # -- from the main process -----------------------------------------------------------

    def challenge(self, name: str, token: str, validation: str) -> None:
        self.tokens[token] = validation
        self._token_names[token] = name

    def challenge_done(self, token: str) -> None:
        self.tokens.pop(token, None)
        self._token_names.pop(token, None)

    def issued(self, name: str, pem: str) -> None:
        try:
            self.certificates[name] = KeyAndChain.from_pem(pem.encode("ascii"))
        except (StoreError, UnicodeError) as e:
            error("ACME: unable to read issued certificate", host=name, error=str(e))


class WorkerTLS(TLS):
    """The TLS assembly of a worker: the same certificate sources, on issuer copies."""

    def __init__(
        self,
        reactor: IReactorTime,
        router: Any,
        ask: Callable[[str, str], defer.Deferred],
        acme_directory: str = "",
        http_port: int = 80,
    ) -> None:
        super().__init__(reactor, router, acme_directory, "", http_port=http_port)
        self._ask = ask
        self.copies: dict[str, IssuerCopy] = {}

    def issuer_for(self, options: Any) -> Any:
        # The same directory and cache directory as the main process's ``TLS.issuer_for``.
        directory_key = options.acme_directory or self.acme_directory
        url = directory_key or ACME_PRODUCTION_DIRECTORY
        root = options.acme_cache_path or self.default_cache_path or paths.default_acme_cache_path()
        return self.copy(f"{url} {cache_dir(root, directory_key)}")

    def copy(self, key: str) -> IssuerCopy:
        """The copy of the issuer ``key`` (``Issuer.key``: directory URL, space, cache path);
        tokens may name an issuer before the route that uses it arrives."""
        found = self.copies.get(key)
        if found is None:
            store = CertificateStore(key.partition(" ")[2])
            found = self.copies[key] = IssuerCopy(self.reactor, key, store, self._ask)
        return found
