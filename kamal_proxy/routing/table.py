"""The routing table: which service answers a (host, path), rebuilt whole after every change.

The Router builds a new :class:`RoutingTable` after each deploy, remove or restore and swaps
it in with one assignment, so a request always reads one consistent snapshot and no lock is
needed.  Building is O(bindings); a lookup is at most three dict hits plus a scan of the
(short, longest-first) prefix list of one host key.  ``Match`` objects are created at build
time, so a lookup allocates only the slash-terminated path.

Behaviour follows SPEC §6.2-6.7: textual one-label wildcards, no fall-through between host
levels, case-sensitive hosts, TLS settings inherited from the root-path service, and a sticky
default TLS host name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from kamal_proxy.service_options import (
    ServiceOptions,
    normalize_hosts,
    normalize_path_prefixes,
)

ROOT_PATH = "/"


class RoutedService(Protocol):
    """What the table needs from a service: a name and its (normalized) options."""

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> ServiceOptions: ...


S = TypeVar("S", bound=RoutedService)


class Match(Generic[S]):
    """The service chosen for a request and the normalized prefix that selected it.

    ``prefix`` is what the proxy strips from the path when the service has ``strip_prefix``
    (SPEC §6.4); it is ``"/"`` for root-path services.
    """

    __slots__ = ("service", "prefix")

    def __init__(self, service: S, prefix: str) -> None:
        self.service = service
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Match(service={self.service.name!r}, prefix={self.prefix!r})"


def split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go's ``net.SplitHostPort``: ``(host, port)``, or None where Go returns an error.

    ``[::1]:8080`` gives ``("::1", "8080")``; the port is not checked (``a:`` gives
    ``("a", "")``); ``::1`` (too many colons) and ``a`` (no port) give None.
    """
    i = hostport.rfind(":")
    if i < 0:
        return None
    j = k = 0
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 != i:
            return None
        host = hostport[1:end]
        j, k = 1, end + 1
    else:
        host = hostport[:i]
        if ":" in host:
            return None
    if "[" in hostport[j:] or "]" in hostport[k:]:
        return None
    return host, hostport[i + 1 :]


def host_without_port(host: str) -> str:
    """The request host used for routing: the port removed when Go would remove it (§6.3).

    Only a ``:`` at a position > 0 triggers the split, and a host that does not split
    cleanly (``::1``, ``[::1``) is used as is.
    """
    colon = host.find(":")
    if colon > 0:
        # Fast path for the common "name:port" (one colon, no brackets); same result as Go.
        if host.find(":", colon + 1) < 0 and "[" not in host and "]" not in host:
            return host[:colon]
        split = split_host_port(host)
        if split is not None:
            return split[0]
    return host


def _slashed(path: str) -> str:
    return path if path.endswith("/") else path + "/"


class RoutingTable(Generic[S]):
    """An immutable snapshot of every (host, prefix) binding of a set of services.

    Build it with :meth:`build`; never mutate it (build a new one instead).
    """

    __slots__ = ("services", "default_tls_host", "_bindings", "_owners")

    def __init__(
        self,
        services: tuple[S, ...],
        bindings: dict[str, tuple[tuple[str, Match[S]], ...]],
        owners: dict[tuple[str, str], tuple[S, ...]],
        default_tls_host: str,
    ) -> None:
        #: The services in deploy order (the order given to :meth:`build`).
        self.services = services
        #: Name used when a TLS client sends no SNI (§6.7); "" when none was ever known.
        self.default_tls_host = default_tls_host
        # host key -> ((slash-terminated prefix, Match), ...) longest prefix first
        self._bindings = bindings
        # (host key, normalized prefix) -> services bound there, in deploy order
        self._owners = owners

    @classmethod
    def build(cls, services: Iterable[S], previous_default_tls_host: str = "") -> RoutingTable[S]:
        """Index ``services`` (iteration order = deploy order) and settle derived settings.

        Besides indexing, this does the two things the Go original does after every routing
        change, so no caller can forget them:

        * **TLS inheritance** (§6.5): every service without ``/`` among its prefixes has its
          ``options.tls_enabled`` / ``options.tls_redirect`` overwritten *in place* with those
          of the service serving ``/`` for its first host (exact, wildcard or catch-all
          level), or with ``False`` / ``True`` when there is none.  The overwritten values
          are what the state file and ``list`` show.
        * **Default TLS host** (§6.7, §21.2): the candidates are the first hosts of the
          services with TLS enabled (after inheritance) and a non-empty first host.
          ``previous_default_tls_host`` is kept while it is still a candidate (so deploying
          or redeploying other services never moves it) and also when there is no candidate
          at all (it is never cleared); otherwise the first candidate in deploy order wins.
        """
        ordered = tuple(services)
        grouped: dict[str, list[tuple[str, Match[S]]]] = {}
        owners: dict[tuple[str, str], list[S]] = {}
        for service in ordered:
            prefixes = normalize_path_prefixes(service.options.path_prefixes)
            for host in normalize_hosts(service.options.hosts):
                entries = grouped.setdefault(host, [])
                for prefix in prefixes:
                    entries.append((_slashed(prefix), Match(service, prefix)))
                    owners.setdefault((host, prefix), []).append(service)

        bindings: dict[str, tuple[tuple[str, Match[S]], ...]] = {}
        for host, entries in grouped.items():
            # Stable: equal-length prefixes keep deploy order.
            entries.sort(key=lambda entry: len(entry[1].prefix), reverse=True)
            bindings[host] = tuple(entries)

        table = cls(
            ordered,
            bindings,
            {key: tuple(value) for key, value in owners.items()},
            previous_default_tls_host,
        )
        table._inherit_tls_settings()
        table.default_tls_host = table._choose_default_tls_host(previous_default_tls_host)
        return table

    # -- request routing (hot path) ---------------------------------------------------------

    def lookup(self, host: str, path: str) -> Match[S] | None:
        """The service for a request ``Host`` (verbatim, port allowed) and decoded path."""
        if host.find(":") > 0:
            host = host_without_port(host)
        return self._match(host, path)

    def _match(self, host: str, path: str) -> Match[S] | None:
        table = self._bindings
        entries = table.get(host)
        if entries is None:
            dot = host.find(".")
            if dot > 0:
                entries = table.get("*" + host[dot:])
            if entries is None:
                entries = table.get("")
                if entries is None:
                    return None
        if not path.endswith("/"):
            path += "/"
        for prefix, match in entries:
            if path.startswith(prefix):
                return match
        return None

    # -- control-plane queries ---------------------------------------------------------------

    def service_for_host(self, host: str) -> S | None:
        """The service serving ``/`` for a host name (no port stripping, as in Go)."""
        match = self._match(host, ROOT_PATH)
        return match.service if match is not None else None

    def service_for_tls_name(self, name: str) -> S | None:
        """The service whose certificate answers a TLS server name (§16.1 step 2)."""
        return self.service_for_host(name)

    def conflicting_service(self, name: str, options: ServiceOptions) -> S | None:
        """Another service already bound to exactly one of ``options``' (host, prefix) pairs.

        Only the identical host key counts (§6.6): a wildcard or catch-all binding never
        conflicts with a specific host, and the service ``name`` never conflicts with itself.
        """
        prefixes = normalize_path_prefixes(options.path_prefixes)
        for host in normalize_hosts(options.hosts):
            for prefix in prefixes:
                for owner in self._owners.get((host, prefix), ()):
                    if owner.name != name:
                        return owner
        return None

    # -- derived settings --------------------------------------------------------------------

    def _inherit_tls_settings(self) -> None:
        for service in self.services:
            options = service.options
            if ROOT_PATH in normalize_path_prefixes(options.path_prefixes):
                continue
            root = self.service_for_host(normalize_hosts(options.hosts)[0])
            if root is None:
                options.tls_enabled, options.tls_redirect = False, True
            else:
                options.tls_enabled = root.options.tls_enabled
                options.tls_redirect = root.options.tls_redirect

    def _choose_default_tls_host(self, previous: str) -> str:
        candidates = [
            service.options.hosts[0]
            for service in self.services
            if service.options.tls_enabled and service.options.hosts and service.options.hosts[0]
        ]
        if not candidates or previous in candidates:
            return previous
        return candidates[0]
