"""A small blocking HTTP/3 client for the tests: aioquic's own QUIC and HTTP/3 state machines
driven over a loopback UDP socket (no asyncio), every wait bounded by a deadline.

Used by the end-to-end tests (a real ``kamal-proxy run --http3``) and the benchmark.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass, field

from aioquic.buffer import Buffer
from aioquic.h3.connection import FrameType, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection


class H3Error(Exception):
    """The connection failed or closed, a stream was reset, or a deadline passed."""


@dataclass
class H3Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None
    chunks: list[bytes] = field(default_factory=list, repr=False)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def has_header(self, name: str) -> bool:
        return self.header(name) is not None


class H3Client:
    """One QUIC connection; ``request`` sends one request and waits for its response."""

    def __init__(
        self,
        port: int,
        server_name: str | None,
        cadata: str | None = None,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        alpn: tuple[str, ...] = ("h3",),
    ) -> None:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=list(alpn),
            server_name=server_name,
            max_data=16 << 20,
            max_stream_data=16 << 20,
        )
        if cadata is None:
            configuration.verify_mode = ssl.CERT_NONE
        else:
            configuration.load_verify_locations(cadata=cadata.encode())
        self.addr = (host, port)
        self.timeout = timeout
        self.quic = QuicConnection(configuration=configuration)
        self.h3: H3Connection | None = None
        self.responses: dict[int, H3Response] = {}
        self.terminated: events.ConnectionTerminated | None = None
        self.goaway = False
        self._control = b""
        self.peer_certificate = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            self.sock.connect(self.addr)
            self.sock.setblocking(False)
            self.quic.connect(self.addr, now=time.monotonic())
            self._flush()
            self._run_until(lambda: self.h3 is not None, "handshake")
            self.peer_certificate = self.quic.tls._peer_certificate
        except BaseException:
            self.sock.close()
            raise

    # -- driving

    def _flush(self) -> None:
        for data, _addr in self.quic.datagrams_to_send(now=time.monotonic()):
            try:
                self.sock.send(data)
            except OSError:
                pass  # lost, like on a network

    def _step(self, deadline: float) -> None:
        now = time.monotonic()
        timer = self.quic.get_timer()
        wait = deadline - now
        if timer is not None:
            wait = min(wait, timer - now)
        # At least a millisecond: aioquic's pacing timer can sit a microsecond ahead, and
        # spinning on it would starve the server of the CPU it shares with this client.
        readable, _, _ = select.select([self.sock], [], [], max(0.001, wait))
        if readable:
            for _ in range(256):
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                self.quic.receive_datagram(data, self.addr, now=time.monotonic())
        timer = self.quic.get_timer()
        if timer is not None and timer <= time.monotonic():
            self.quic.handle_timer(now=time.monotonic())
        self._events()
        self._flush()

    def _events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self.h3 = H3Connection(self.quic)
            elif isinstance(event, events.ConnectionTerminated):
                self.terminated = event
            elif isinstance(event, events.StreamReset):
                response = self.responses.get(event.stream_id)
                if response is not None:
                    response.reset = event.error_code
            if self.h3 is None:
                continue
            for h3_event in self.h3.handle_event(event):
                response = self.responses.get(getattr(h3_event, "stream_id", -1))
                if isinstance(h3_event, HeadersReceived) and response is not None:
                    for name, value in h3_event.headers:
                        if name == b":status":
                            response.status = int(value)
                        else:
                            response.headers.append((name.decode(), value.decode()))
                    response.ended = response.ended or h3_event.stream_ended
                elif isinstance(h3_event, DataReceived) and response is not None:
                    response.chunks.append(h3_event.data)  # joined once, at the end
                    response.ended = response.ended or h3_event.stream_ended
            if isinstance(event, events.StreamDataReceived) and event.stream_id == 3:
                self._control += event.data
                self.goaway = self.goaway or _has_goaway(self._control)

    def _run_until(self, done, what: str, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.timeout
        while not done():
            if self.terminated is not None:
                raise H3Error(
                    f"connection closed during {what}: {self.terminated.error_code:#x} "
                    f"{self.terminated.reason_phrase}"
                )
            if time.monotonic() >= deadline:
                raise H3Error(f"timed out during {what}")
            self._step(deadline)

    # -- requests

    def send(
        self,
        method: str = "GET",
        path: str = "/",
        authority: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> int:
        """Start a request; returns its stream id (see ``wait``)."""
        assert self.h3 is not None
        stream_id = self.quic.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", (authority or self.quic.configuration.server_name or "").encode()),
            (b":path", path.encode()),
        ]
        fields += [(k.lower().encode(), v.encode()) for k, v in headers or []]
        self.responses[stream_id] = H3Response()
        self.h3.send_headers(stream_id, fields, end_stream=not body)
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self._flush()
        return stream_id

    def wait(self, stream_id: int, timeout: float | None = None) -> H3Response:
        response = self.responses[stream_id]
        deadline = time.monotonic() + (timeout or self.timeout)
        self._run_until(lambda: response.ended or response.reset is not None, "response", deadline)
        if response.reset is not None:
            raise H3Error(f"stream reset by the server: {response.reset:#x}")
        del self.responses[stream_id]
        response.body = b"".join(response.chunks)
        response.chunks = []
        return response

    def wait_for(self, done, what: str, timeout: float | None = None) -> None:
        """Keep the connection going until ``done()`` is true, e.g. ``lambda: client.goaway``."""
        self._run_until(done, what, time.monotonic() + (timeout or self.timeout))

    def wait_closed(self, timeout: float | None = None) -> events.ConnectionTerminated:
        """Keep answering (acknowledgements) until the server closes the connection."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.terminated is None:
            if time.monotonic() >= deadline:
                raise H3Error("timed out waiting for the server to close")
            self._step(deadline)
        return self.terminated

    def request(self, method: str = "GET", path: str = "/", **kwargs) -> H3Response:
        timeout = kwargs.pop("timeout", None)
        return self.wait(self.send(method, path, **kwargs), timeout)

    def close(self) -> None:
        try:
            if self.terminated is None:
                self.quic.close()
                self._flush()
        finally:
            self.sock.close()

    def __enter__(self) -> H3Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _has_goaway(control: bytes) -> bool:
    """Whether the server's control stream (type byte, then frames) carried a GOAWAY."""
    buf = Buffer(data=control[1:])
    try:
        while not buf.eof():
            frame_type = buf.pull_uint_var()
            length = buf.pull_uint_var()
            if frame_type == FrameType.GOAWAY:
                return True
            buf.pull_bytes(length)
    except ValueError:
        pass  # an incomplete frame: more to come
    return False


def h3_request(port: int, server_name: str | None, cadata: str | None = None, **kwargs):
    """One request on a new connection."""
    with H3Client(port, server_name, cadata, timeout=kwargs.pop("connect_timeout", 10.0)) as c:
        return c.request(**kwargs)
