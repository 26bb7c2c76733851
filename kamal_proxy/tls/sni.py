"""The HTTPS listener: certificate selection per SNI name, ALPN, and ClientHello peeking.

OpenSSL's server-name callback is synchronous, so it can only hand out certificates that are
already in memory (SPEC §16.1).  When a certificate must first be fetched (a configured host
whose certificate is still being issued, or an on-demand host that must be checked and
issued), :class:`PeekingProtocol` reads the ClientHello before TLS starts, asks the service's
certificate source to get ready (asynchronously, bounded by :data:`HANDSHAKE_WAIT`), then
starts TLS and replays the buffered bytes.  Other connections are never held up: the waiting
connection is just a buffered socket in the reactor.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from kamal_proxy.observe.events import debug, warn

if TYPE_CHECKING:
    # pyOpenSSL loads with the HTTPS port's first connection (kamal_proxy.tls.lazy).
    from OpenSSL import SSL
    from twisted.internet.ssl import CertificateOptions

    from kamal_proxy.tls.store import KeyAndChain

_T = TypeVar("_T")

ALPN = [b"h2", b"http/1.1"]
#: How long a handshake waits for its certificate (on-demand check + issuance).
HANDSHAKE_WAIT = 30.0
#: A ClientHello is at most a few KiB; give up parsing (and let TLS fail) beyond this.
MAX_HELLO_BYTES = 64 * 1024


def server_context(entry: KeyAndChain) -> SSL.Context:
    """The server context for one certificate: TLS 1.2+, ALPN h2/http1.1 (cached on entry)."""
    context = entry.context
    if context is None:
        from OpenSSL.crypto import X509, PKey
        from twisted.internet.ssl import CertificateOptions, TLSVersion

        options = CertificateOptions(
            privateKey=PKey.from_cryptography_key(entry.key),
            certificate=X509.from_cryptography(entry.leaf),
            extraCertChain=[X509.from_cryptography(c) for c in entry.chain[1:]],
            acceptableProtocols=ALPN,
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        context = entry.context = options.getContext()
    return context


# -- ClientHello -------------------------------------------------------------------------------


class NeedMore:
    """Sentinel: the ClientHello is not complete yet."""


NEED_MORE = NeedMore()


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None
    alpn: tuple[bytes, ...]


def parse_client_hello(data: bytes) -> ClientHello | NeedMore | None:
    """The SNI name and ALPN offers of a TLS ClientHello at the start of ``data``.

    Returns :data:`NEED_MORE` while incomplete, None when ``data`` is not a well-formed TLS
    ClientHello (the TLS layer then deals with it).  The handshake message may span records.
    """
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            return NEED_MORE
        content_type, major, length = (
            data[pos],
            data[pos + 1],
            struct.unpack_from("!H", data, pos + 3)[0],
        )
        if content_type != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            return None
        if len(data) < pos + 5 + length:
            return NEED_MORE
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                return None
            total = 4 + int.from_bytes(handshake[1:4], "big")
            if total > MAX_HELLO_BYTES:
                return None
            if len(handshake) >= total:
                try:
                    return _parse_hello_body(bytes(handshake[4:total]))
                except (IndexError, struct.error, ValueError):
                    return None


def _parse_hello_body(body: bytes) -> ClientHello | None:
    pos = 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # session id
    (n,) = struct.unpack_from("!H", body, pos)
    pos += 2 + n  # cipher suites
    pos += 1 + body[pos]  # compression methods
    if pos > len(body):
        return None
    name: str | None = None
    alpn: list[bytes] = []
    if pos == len(body):
        return ClientHello(None, ())
    (ext_total,) = struct.unpack_from("!H", body, pos)
    pos += 2
    end = pos + ext_total
    if end > len(body):
        return None
    while pos + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", body, pos)
        pos += 4
        ext = body[pos : pos + ext_len]
        if len(ext) != ext_len:
            return None
        pos += ext_len
        if ext_type == 0:  # server_name
            (list_len,) = struct.unpack_from("!H", ext, 0)
            i = 2
            while i + 3 <= 2 + list_len:
                kind, n = ext[i], struct.unpack_from("!H", ext, i + 1)[0]
                value = ext[i + 3 : i + 3 + n]
                if len(value) != n:
                    return None
                if kind == 0 and name is None:
                    name = value.decode("ascii", "replace")
                i += 3 + n
        elif ext_type == 16:  # application_layer_protocol_negotiation
            (list_len,) = struct.unpack_from("!H", ext, 0)
            i = 2
            while i < 2 + list_len:
                n = ext[i]
                alpn.append(bytes(ext[i + 1 : i + 1 + n]))
                i += 1 + n
    return ClientHello(name, tuple(alpn))


# -- selection (SPEC §16.1) ----------------------------------------------------------------


class CertificateSelector:
    """``contextForServerName`` for the HTTPS listener, and the async ``prepare`` step."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def _source(self, name: str | None, quiet: bool) -> tuple[Any, str] | None:
        """The certificate source and the name it should answer, or None (logged)."""
        table = self.router.table
        if not name:
            name = table.default_tls_host
            if not name:
                if not quiet:
                    debug("ACME: Unable to get certificate (no server name)")
                return None
            if not quiet:
                warn("No server name; using default TLS hostname", host=name)
        service = table.service_for_tls_name(name)
        if service is None:
            if not quiet:
                debug("ACME: Unable to get certificate (unknown server name)")
            return None
        if not service.options.tls_enabled or service.certificates is None:
            if not quiet:
                debug("ACME: Unable to get certificate (service does not support TLS)")
            return None
        return service.certificates, name

    def __call__(self, servername: bytes | None) -> SSL.Context | None:
        name = servername.decode("ascii", "replace") if servername else None
        return self._certificate(name, lambda source, name: source.context_for(name))

    def key_and_chain(self, server_name: str | None) -> KeyAndChain | None:
        """The same choice as ``__call__`` as keys and chain, for an HTTP/3 (QUIC) handshake:
        aioquic signs with ``cryptography`` keys, not with an OpenSSL context."""
        return self._certificate(server_name, lambda source, name: source.key_and_chain(name))

    def _certificate(self, server_name: str | None, form: Callable[[Any, str], _T]) -> _T | None:
        """The certificate chosen for ``server_name``, in the ``form`` the handshake needs;
        None when there is none or it cannot be loaded (a handshake failure, never a crash)."""
        found = self._source(server_name, False)
        if found is None:
            return None
        source, name = found
        try:
            return form(source, name)
        except Exception as e:  # noqa: BLE001 - a handshake failure, never a crash
            debug("ACME: Unable to get certificate", host=name, error=str(e))
            return None

    def prepare(self, server_name: str | None) -> defer.Deferred | None:
        """None when the handshake can go ahead now; else a Deferred to wait for first."""
        found = self._source(server_name, True)
        if found is None:
            return None
        source, name = found
        return source.prepare(name)


def https_options(selector: CertificateSelector) -> CertificateOptions:
    """The listener's options: no certificate of its own, one per SNI name from the selector."""
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    return CertificateOptions(
        contextForServerName=selector,
        acceptableProtocols=ALPN,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


# -- peeking ---------------------------------------------------------------------------------


class PeekingProtocol(protocol.Protocol):
    """Buffers the ClientHello, lets the certificate get ready, then hands over to TLS."""

    def __init__(self, tls: protocol.Protocol, factory: PeekingFactory) -> None:
        self.tls = tls
        self.factory = factory
        self.buffer = b""
        self.waiting: defer.Deferred | None = None
        self.timer: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting is not None:
            if len(self.buffer) > MAX_HELLO_BYTES:
                self.transport.abortConnection()
            return
        hello = parse_client_hello(self.buffer)
        if hello is NEED_MORE:
            if len(self.buffer) > MAX_HELLO_BYTES:
                self._start_tls()
            return
        ready = None
        if hello is not None:
            try:
                ready = self.factory.selector.prepare(hello.server_name)
            except Exception as e:  # noqa: BLE001
                debug("ACME: Unable to get certificate", host=hello.server_name, error=str(e))
        if ready is None:
            self._start_tls()
            return
        self.waiting = ready
        reactor = self.factory.reactor
        self.timer = reactor.callLater(self.factory.wait, ready.cancel)
        ready.addBoth(self._ready)

    def _ready(self, result: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.waiting = None
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            debug("ACME: Unable to get certificate", error=str(result.value))
        if self.connected:
            self._start_tls()

    def _start_tls(self) -> None:
        tls = self.tls
        data, self.buffer = self.buffer, b""
        # From now on the transport talks to the TLS protocol directly.
        self.dataReceived = tls.dataReceived  # type: ignore[method-assign]
        self.connectionLost = tls.connectionLost  # type: ignore[method-assign]
        tls.makeConnection(self.transport)
        if data:
            tls.dataReceived(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected = 0
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.cancel()  # only this connection's wait; issuance goes on


class PeekingFactory(protocol.Factory):
    """Wraps ``TLSMemoryBIOFactory(options, site)`` with a ClientHello peek per connection.

    The TLS factory (and with it pyOpenSSL) is made for the first connection: a proxy whose
    HTTPS port is never used does not load TLS at all.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        site: protocol.Factory,
        selector: CertificateSelector,
        wait: float = HANDSHAKE_WAIT,
    ) -> None:
        self.reactor = reactor
        self.site = site
        self.selector = selector
        self.wait = wait
        self._tls_factory: Any = None

    @property
    def tls_factory(self) -> Any:
        factory = self._tls_factory
        if factory is None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(https_options(self.selector), False, self.site)
            self._tls_factory = factory
        return factory

    @tls_factory.setter
    def tls_factory(self, factory: Any) -> None:
        self._tls_factory = factory

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        tls = self.tls_factory.buildProtocol(addr)
        if tls is None:
            return None
        return PeekingProtocol(tls, self)


def tls_server_factory(reactor: IReactorTime, router: Any, site: protocol.Factory):
    """The factory for the HTTPS ``listenTCP``: SNI selection, ALPN, ClientHello peeking."""
    return PeekingFactory(reactor, site, CertificateSelector(router))
