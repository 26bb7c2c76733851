"""QUIC on the reactor: aioquic's sans-I/O ``QuicConnection`` behind a ``DatagramProtocol``.

aioquic's connection takes datagrams (``receive_datagram``), hands back datagrams to send
(``datagrams_to_send``) and asks for one timer (``get_timer``/``handle_timer``); only its
``aioquic.asyncio`` package needs an event loop, and nothing here uses it.  This module is the
transport half of HTTP/3 and knows nothing of HTTP:

* :class:`QuicEndpoint` owns the UDP socket.  Every datagram goes to its connection by
  destination connection ID (one dict read); a datagram nobody knows that is not a client's
  Initial is dropped, so garbage costs one header parse.
* A new connection's certificate is chosen by server name before aioquic sees it: aioquic
  takes one certificate per connection up front and has no SNI callback.  The endpoint
  decrypts the client's Initial packets (their keys derive from the connection ID, RFC 9001
  §5.2), reassembles the ClientHello from the CRYPTO frames (it may span datagrams), asks the
  certificate source, and only then builds the connection and replays the datagrams.  When
  the certificate must be issued first (ACME, on-demand TLS), the handshake waits on a
  Deferred, bounded by :data:`HANDSHAKE_WAIT`, while the client's retransmissions are
  buffered (a few); the reactor never blocks.
* :class:`QuicSession` is one connection: one reactor timer (rescheduled, never one per
  packet), datagrams sent in a batch on the next reactor turn after any change, events
  handed to :meth:`QuicSession.quic_event`.
* :class:`FlowControlledConnection` grants the peer receive credit for what the application
  consumed, not for what arrived: aioquic doubles its windows as data arrives, which lets an
  upload outrun a slow upstream without bound.  With it, a request body held in memory is
  bounded by :data:`STREAM_WINDOW` per stream and :data:`CONNECTION_WINDOW` per connection.

That class and :meth:`FlowControlledConnection.send_buffered` read aioquic internals (the
``Limit`` and stream objects); ``tests/test_quic.py`` pins the behaviour they rely on.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.tls import ClientHello, pull_client_hello
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kamal_proxy.tls.store import KeyAndChain

#: The one application protocol served.
ALPN = ["h3"]
#: Length of the connection IDs this server issues (aioquic's default).
CID_LENGTH = 8
#: Request body bytes held per stream before the client must wait for credit.
STREAM_WINDOW = 1 << 20
#: Request body bytes held per connection (all streams) before the client must wait.
CONNECTION_WINDOW = 4 << 20
#: How long a handshake may wait for its certificate (on-demand check and issuance).
HANDSHAKE_WAIT = 30.0
#: Handshakes being peeked or waiting for a certificate at once; more Initials are dropped.
MAX_PENDING = 256
#: A ClientHello still incomplete after this long is forgotten (its slot freed).
PEEK_TIMEOUT = 10.0
#: Datagrams kept per pending handshake (the ClientHello and a few retransmissions).
MAX_PENDING_DATAGRAMS = 8
#: A ClientHello larger than this is not one we will parse.
MAX_HELLO_BYTES = 64 * 1024
#: Idle connections are closed after this long (quic-go's default).
IDLE_TIMEOUT = 30.0
#: TLS alert ``unrecognized_name``, sent when no certificate serves the name.
ALERT_UNRECOGNIZED_NAME = 112
_TRANSPORT_CLOSE_CAPACITY = 32
SUPPORTED_VERSIONS = (QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2)

_log = Logger()


class CertificateSource(Protocol):
    """What the endpoint needs of TLS (``kamal_proxy.tls.sni.CertificateSelector``)."""

    def prepare(self, server_name: str | None) -> defer.Deferred | None:
        """None when the certificate can be had now, else a Deferred to wait for first."""

    def key_and_chain(self, server_name: str | None) -> KeyAndChain | None:
        """The certificate for the name, or None to refuse the handshake."""


# -- flow control ------------------------------------------------------------------------------


class FlowControlledConnection(QuicConnection):
    """A ``QuicConnection`` whose receive credit follows what the application consumed.

    The application calls :meth:`hold` for request body bytes it keeps and :meth:`release`
    when it passed them on.  Credit granted = bytes received - bytes held + window, so the
    bytes held never exceed the window.  aioquic's own heuristic (double the window whenever
    half of it was received) is kept from running by hiding the received count from it for
    the duration of the call; the limit it then writes out is ours.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._held: dict[int, int] = {}
        self._held_total = 0

    def hold(self, stream_id: int, size: int) -> None:
        self._held[stream_id] = self._held.get(stream_id, 0) + size
        self._held_total += size

    def release(self, stream_id: int, size: int) -> None:
        held = self._held.get(stream_id, 0)
        size = min(size, held)
        if held - size:
            self._held[stream_id] = held - size
        else:
            self._held.pop(stream_id, None)
        self._held_total -= size

    def forget(self, stream_id: int) -> None:
        """The stream is done: whatever it held no longer counts."""
        self._held_total -= self._held.pop(stream_id, 0)

    def held(self, stream_id: int) -> int:
        return self._held.get(stream_id, 0)

    def send_buffered(self, stream_id: int) -> int:
        """Bytes written to the stream that the peer has not acknowledged yet."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else len(stream.sender._buffer)

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        limit = self._local_max_data
        want = limit.used - self._held_total + CONNECTION_WINDOW
        if want > limit.value:
            limit.value = want
        used, limit.used = limit.used, 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if not stream.max_stream_data_local:  # our own unidirectional streams
            super()._write_stream_limits(builder, space, stream)
            return
        receiver = stream.receiver
        highest = receiver.highest_offset
        want = highest - self._held.get(stream.stream_id, 0) + STREAM_WINDOW
        if want > stream.max_stream_data_local:
            stream.max_stream_data_local = want
        receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest


# -- ClientHello peeking -----------------------------------------------------------------------


class InitialPeek:
    """A new connection's Initial datagrams, until their CRYPTO frames hold the ClientHello."""

    def __init__(self, version: int, dcid: bytes, scid: bytes) -> None:
        self.version = version
        self.dcid = dcid
        self.scid = scid
        self.datagrams: list[tuple[bytes, Any]] = []
        self.hello: ClientHello | None = None
        self.failed = False
        self.waiting: defer.Deferred | None = None
        self.timer: IDelayedCall | None = None
        self._crypto = CryptoPair()
        self._crypto.setup_initial(cid=dcid, is_client=False, version=version)
        self._chunks: dict[int, bytes] = {}

    def add(self, data: bytes, addr: Any) -> None:
        """Keep the datagram; parse its Initial packets while the ClientHello is incomplete."""
        if len(self.datagrams) >= MAX_PENDING_DATAGRAMS:
            return
        self.datagrams.append((data, addr))
        if self.hello is not None or self.failed:
            return
        try:
            self._read_datagram(data)
            self.hello = self._client_hello()
        except Exception:  # noqa: BLE001 - whatever the bytes, a parse failure only
            self.failed = True

    def _read_datagram(self, data: bytes) -> None:
        buf = Buffer(data=data)
        while not buf.eof():
            start = buf.tell()
            try:
                header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
            except ValueError:
                if start == 0:
                    raise
                return  # the padding after the packets (clients pad Initial datagrams)
            end = start + header.packet_length
            if header.packet_type == QuicPacketType.INITIAL and header.version == self.version:
                _, payload, _ = self._crypto.decrypt_packet(data[start:end], buf.tell() - start, 0)
                self._read_frames(payload.rstrip(b"\x00"))
            buf.seek(end)

    def _read_frames(self, payload: bytes) -> None:
        buf = Buffer(data=payload)
        while not buf.eof():
            frame_type = buf.pull_uint_var()
            if frame_type in (QuicFrameType.PADDING, QuicFrameType.PING):
                continue
            if frame_type == QuicFrameType.CRYPTO:
                offset = buf.pull_uint_var()
                length = buf.pull_uint_var()
                if offset + length > MAX_HELLO_BYTES:
                    raise ValueError("ClientHello too large")
                self._chunks[offset] = buf.pull_bytes(length)
            elif frame_type in (QuicFrameType.ACK, QuicFrameType.ACK_ECN):
                buf.pull_uint_var()  # largest acknowledged
                buf.pull_uint_var()  # delay
                ranges = buf.pull_uint_var()
                buf.pull_uint_var()  # first range
                for _ in range(2 * ranges + (3 if frame_type == QuicFrameType.ACK_ECN else 0)):
                    buf.pull_uint_var()
            else:
                return  # nothing else carries the ClientHello

    def _client_hello(self) -> ClientHello | None:
        data = b""
        while True:
            chunk = self._chunks.get(len(data))
            if chunk is None:
                # Overlapping retransmissions: take the longest chunk covering the end.
                ahead = [(o, c) for o, c in self._chunks.items() if o < len(data) < o + len(c)]
                if not ahead:
                    break
                offset, chunk = max(ahead, key=lambda oc: oc[0] + len(oc[1]))
                chunk = chunk[len(data) - offset :]
            data += chunk
        if len(data) < 4:
            return None
        if data[0] != 1:  # not a ClientHello
            raise ValueError("first handshake message is not a ClientHello")
        if len(data) < 4 + int.from_bytes(data[1:4], "big"):
            return None
        return pull_client_hello(Buffer(data=data))


def refusal_datagram(version: int, dcid: bytes, scid: bytes, alert: int) -> bytes:
    """An Initial packet closing the handshake with a TLS alert (a quick "no" to the client,
    instead of letting it time out)."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=dcid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=os.urandom(CID_LENGTH),
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=scid,
        version=version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=_TRANSPORT_CLOSE_CAPACITY)
    buf.push_uint_var(QuicErrorCode.CRYPTO_ERROR + alert)
    buf.push_uint_var(QuicFrameType.CRYPTO)
    buf.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]


# -- connections -------------------------------------------------------------------------------


class QuicSession:
    """One QUIC connection on the reactor: its datagrams, its one timer, its events.

    Subclasses implement :meth:`quic_event` (and :meth:`after_transmit`,
    :meth:`connection_lost`).  Changes made by the application (a response written, credit
    released) call :meth:`flush_soon`: the datagrams leave together on the next reactor turn.
    """

    def __init__(self, endpoint: QuicEndpoint, quic: FlowControlledConnection) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.reactor = endpoint.reactor
        self.closed = False
        self._closing = False
        #: the client's address, as of its latest datagram
        self.peer: Any = None
        #: the connection IDs the endpoint routes to this connection
        self.cids: set[bytes] = set()
        self._call: IDelayedCall | None = None
        self._call_at = 0.0

    # -- from the endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        self.peer = addr
        self.quic.receive_datagram(data, addr, now=self.reactor.seconds())
        self._drain_events()
        self.flush_soon()

    # -- timer and sending

    def flush_soon(self) -> None:
        """Send what is pending on the next reactor turn (one batch for many changes)."""
        self._schedule(self.reactor.seconds())

    def _schedule(self, at: float) -> None:
        if self.closed:
            return
        call = self._call
        if call is not None and call.active():
            if self._call_at <= at:
                return
            call.reset(max(0.0, at - self.reactor.seconds()))
        else:
            self._call = self.reactor.callLater(max(0.0, at - self.reactor.seconds()), self._fire)
        self._call_at = at

    def _fire(self) -> None:
        self._call = None
        if self.closed:
            return
        now = self.reactor.seconds()
        timer = self.quic.get_timer()
        if timer is not None and timer <= now:
            self.quic.handle_timer(now)
            self._drain_events()
        self.transmit()

    def transmit(self) -> None:
        """Send every datagram aioquic has ready, then re-arm the timer."""
        if self.closed:
            return
        quic = self.quic
        send = self.endpoint.send
        for data, addr in quic.datagrams_to_send(now=self.reactor.seconds()):
            send(data, addr)
        self.after_transmit()
        timer = quic.get_timer()
        if timer is not None:
            self._schedule(timer)

    # -- events

    def _drain_events(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.ConnectionIdIssued):
                self.endpoint.register(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                self.endpoint.unregister(event.connection_id, self)
            try:
                self.quic_event(event)
            except Exception:  # noqa: BLE001 - one connection's bug must not stop the others
                _log.failure("HTTP/3: error handling {event!r}", event=event)
                quic.close(error_code=QuicErrorCode.INTERNAL_ERROR)
            if isinstance(event, events.ConnectionTerminated):
                self._terminated()
                return

    def _terminated(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.endpoint.forget(self)
        self.connection_lost()

    def close_now(self, error_code: int = QuicErrorCode.NO_ERROR) -> None:
        """Send CONNECTION_CLOSE at once and drop the connection (no draining period)."""
        if self.closed or self._closing:
            return
        self._closing = True
        self.quic.close(error_code=error_code)
        self.transmit()
        self._terminated()

    # -- for subclasses

    def quic_event(self, event: events.QuicEvent) -> None:
        """Handle one QUIC event."""

    def after_transmit(self) -> None:
        """Called after each batch of datagrams left (acknowledgements may have freed room)."""

    def connection_lost(self) -> None:
        """The connection ended (closed by either side, timed out, or dropped)."""


SessionFactory = Callable[["QuicEndpoint", FlowControlledConnection], QuicSession]


class QuicEndpoint(DatagramProtocol):
    """A UDP port serving QUIC: datagrams to connections, new connections by server name."""

    def __init__(
        self,
        reactor: IReactorTime,
        certificates: CertificateSource,
        session_factory: SessionFactory,
    ) -> None:
        self.reactor = reactor
        self.certificates = certificates
        self.session_factory = session_factory
        self.sessions: dict[bytes, QuicSession] = {}
        self.pending: dict[bytes, InitialPeek] = {}
        #: while True, new connections are not accepted (graceful stop)
        self.accepting = True
        self._configurations: weakref.WeakKeyDictionary[KeyAndChain, QuicConfiguration] = (
            weakref.WeakKeyDictionary()
        )

    # -- sending

    def send(self, data: bytes, addr: Any) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            transport.write(data, addr)
        except OSError:
            pass  # a full socket buffer is a lost packet; QUIC retransmits

    # -- routing

    def register(self, cid: bytes, session: QuicSession) -> None:
        self.sessions[cid] = session
        session.cids.add(cid)

    def unregister(self, cid: bytes, session: QuicSession) -> None:
        session.cids.discard(cid)
        if self.sessions.get(cid) is session:
            del self.sessions[cid]

    def forget(self, session: QuicSession) -> None:
        """Route nothing more to ``session`` (it ended): its own IDs, not the whole table."""
        sessions = self.sessions
        for cid in session.cids:
            if sessions.get(cid) is session:
                del sessions[cid]
        session.cids.clear()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except Exception:  # noqa: BLE001 - not QUIC: dropped
            return
        session = self.sessions.get(header.destination_cid)
        if session is not None:
            try:
                session.datagram_received(data, addr)
            except Exception:  # noqa: BLE001
                _log.failure("HTTP/3: error on a connection; closing it")
                session.close_now(QuicErrorCode.INTERNAL_ERROR)
            return
        if header.version is None or header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            return  # a short header for no connection of ours, or a stray negotiation
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return  # RFC 9000 §14.1; and no amplification of small datagrams
        if header.version not in SUPPORTED_VERSIONS:
            self.send(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=list(SUPPORTED_VERSIONS),
                ),
                addr,
            )
            return
        if header.packet_type != QuicPacketType.INITIAL:
            return
        self._initial(header, data, addr)

    # -- new connections

    def _initial(self, header: Any, data: bytes, addr: Any) -> None:
        dcid = header.destination_cid
        peek = self.pending.get(dcid)
        if peek is None:
            if not self.accepting or len(self.pending) >= MAX_PENDING:
                return
            peek = self.pending[dcid] = InitialPeek(header.version, dcid, header.source_cid)
            peek.timer = self.reactor.callLater(PEEK_TIMEOUT, self._expire, peek)
        peek.add(data, addr)
        if peek.failed:
            self._drop(peek)
            return
        if peek.hello is None or peek.waiting is not None:
            return
        name = peek.hello.server_name
        try:
            ready = self.certificates.prepare(name)
        except Exception as e:  # noqa: BLE001 - the handshake fails, nothing else
            _log.debug("HTTP/3: certificate preparation failed: {error}", error=str(e))
            ready = None
        if ready is None:
            self._accept(peek)
            return
        peek.waiting = ready
        if peek.timer is not None and peek.timer.active():
            peek.timer.reset(HANDSHAKE_WAIT)
        ready.addBoth(self._ready, peek)

    def _expire(self, peek: InitialPeek) -> None:
        """A ClientHello that never completed, or a certificate that took too long."""
        peek.timer = None
        if self.pending.get(peek.dcid) is not peek:
            return
        if peek.waiting is not None:
            peek.waiting.cancel()  # the handshake goes on with what there is (or is refused)
        else:
            del self.pending[peek.dcid]

    def _drop(self, peek: InitialPeek) -> None:
        if peek.timer is not None and peek.timer.active():
            peek.timer.cancel()
        peek.timer = None
        if self.pending.get(peek.dcid) is peek:
            del self.pending[peek.dcid]

    def _ready(self, result: Any, peek: InitialPeek) -> None:
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            _log.debug("HTTP/3: no certificate: {error}", error=str(result.value))
        if self.pending.get(peek.dcid) is peek:
            self._accept(peek)

    def _accept(self, peek: InitialPeek) -> None:
        self._drop(peek)
        if not self.accepting:
            return
        assert peek.hello is not None
        entry = self.certificates.key_and_chain(peek.hello.server_name)
        first_addr = peek.datagrams[0][1]
        if entry is None:
            self.send(
                refusal_datagram(peek.version, peek.dcid, peek.scid, ALERT_UNRECOGNIZED_NAME),
                first_addr,
            )
            return
        quic = FlowControlledConnection(
            configuration=self._configuration(entry),
            original_destination_connection_id=peek.dcid,
        )
        session = self.session_factory(self, quic)
        self.register(peek.dcid, session)
        self.register(quic.host_cid, session)
        try:
            for data, addr in peek.datagrams:
                session.datagram_received(data, addr)
        except Exception:  # noqa: BLE001
            _log.failure("HTTP/3: error starting a connection; closing it")
            session.close_now(QuicErrorCode.INTERNAL_ERROR)

    def _configuration(self, entry: KeyAndChain) -> QuicConfiguration:
        configuration = self._configurations.get(entry)
        if configuration is None:
            configuration = QuicConfiguration(
                is_client=False,
                alpn_protocols=ALPN,
                connection_id_length=CID_LENGTH,
                idle_timeout=IDLE_TIMEOUT,
                max_data=CONNECTION_WINDOW,
                max_stream_data=STREAM_WINDOW,
            )
            configuration.certificate = entry.chain[0]
            configuration.certificate_chain = list(entry.chain[1:])
            configuration.private_key = entry.key
            self._configurations[entry] = configuration
        return configuration

    # -- stopping

    def stop_accepting(self) -> None:
        """New handshakes are dropped from now on (those waiting for a certificate too)."""
        self.accepting = False
        for peek in list(self.pending.values()):
            if peek.waiting is not None:
                peek.waiting.cancel()
            self._drop(peek)
