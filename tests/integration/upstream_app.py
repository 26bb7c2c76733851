"""A standalone upstream application for the end-to-end tests (stdlib only).

Run as ``python upstream_app.py NAME [--port N] [--unhealthy-for SECONDS] [--health-status CODE]
[--health-path PATH ...]``.  It binds 127.0.0.1 (an ephemeral port unless ``--port``), prints
``PORT <n>`` as its first stdout line, then serves HTTP/1.1 with keep-alive until killed.

Gates order events between a test and this upstream without sleeping: a request that names
gate ``K`` counts as an arrival of ``K`` as soon as it is read, and waits where the endpoint
says until the test releases ``K`` (``/control/release``); the test learns of arrivals with
``/control/arrived``.  Gates are shared by all connections and survive ``/control/reset``.

Every ordinary response carries ``X-Upstream-Name: NAME`` and ``X-Upstream-Path: <request
target as received>`` so a test can tell which upstream answered and which URI it saw.

Endpoints (the first path segment picks the endpoint; anything else answers ``NAME``):

=====================================  ======================================================
``/up`` (and every ``--health-path``)   health: the current health status (default 200)
``/control/health?status=N&delay_ms=M`` set the health status / delay (not counted)
``/control/stats``                      JSON counters: per path, health checks, requests
``/control/reset``                      clear the counters (not the gates)
``/control/arrived?gate=K&count=N``     wait (``timeout_ms``, default 10000) until N requests
                                        naming gate K have arrived: 200, else 504
``/control/release?gate=K&count=N``     release gate K N more times (default 1)
``/hold?gate=K``                        ``NAME`` once gate K is released (``max_ms``, default
                                        120000, then 500): a request the test holds in flight
``/slow?ms=N``                          ``NAME`` after N ms
``/echo...``                            JSON: method, target, path, query, headers, body hash
``/stream?chunks=N&ms=M``               chunked, ``chunk <i>\\n`` every M ms
``/sse?events=N&ms=M&hold_ms=H``        ``text/event-stream`` events, then hold H ms
``/stream`` or ``/sse`` with ``gate=K`` the first piece at once; each later piece, and the end
                                        of the body, only after one more release of gate K
``/big?bytes=N``                        N pattern bytes with ``Content-Length``
``/bigchunked?bytes=N``                 N pattern bytes, chunked
``/upload``                             JSON: body length and sha256 (chunked or not)
``/status/<code>``                      that status with body ``status <code>``
``/respond?status=S&h=Name:Value&body=B`` a response shaped by the query
``/short``                              declares ``Content-Length: 1000``, sends 7 bytes, closes
``/garbage``                            a non-HTTP line, then close
``/close``                              close without answering
``/oneshot``                            ``Content-Length`` response then FIN, no ``Connection``
``/connclose``                          ``Connection: close`` response
``/ws``                                 WebSocket echo (text ``__name__`` answers NAME)
=====================================  ======================================================
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The stdlib refuses header lines over 64 KiB with its own 431; the proxy allows 1 MiB of
# head, and tests check large headers reach us, so lift the stdlib's limit.
http.client._MAXLINE = 2 * 1024 * 1024
_PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """Deterministic content for big bodies; tests regenerate it to compare byte for byte."""
    out = bytearray()
    pos = offset % 256
    while len(out) < n:
        take = min(len(_PATTERN) - pos, n - len(out))
        out += _PATTERN[pos : pos + take]
        pos = 0
    return bytes(out)


class State:
    """Counters and switches shared by all handler threads."""

    def __init__(self, name: str, health_status: int, unhealthy_until: float, health_paths):
        self.lock = threading.Lock()
        self.name = name
        self.health_status = health_status
        self.health_delay = 0.0
        self.unhealthy_until = unhealthy_until
        self.health_paths = set(health_paths)
        self.gates = threading.Condition(threading.Lock())
        self.arrivals: dict[str, int] = {}
        self.releases: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.counts: dict[str, int] = {}
            self.health_checks = 0
            self.health_requests: list[dict] = []
            self.requests: list[dict] = []  # every non-health, non-control request
            self.websockets = 0

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "name": self.name,
                "counts": dict(self.counts),
                "health_checks": self.health_checks,
                "health_requests": list(self.health_requests[-20:]),
                "requests": list(self.requests[-200:]),
                "request_count": sum(
                    n for p, n in self.counts.items() if p not in self.health_paths
                ),
                "websockets": self.websockets,
            }

    # -- gates (see the module docstring) ---------------------------------------------------

    def arrive(self, gate: str) -> None:
        with self.gates:
            self.arrivals[gate] = self.arrivals.get(gate, 0) + 1
            self.gates.notify_all()

    def release(self, gate: str, count: int) -> None:
        with self.gates:
            self.releases[gate] = self.releases.get(gate, 0) + count
            self.gates.notify_all()

    def wait_arrivals(self, gate: str, count: int, timeout: float) -> int:
        """The number of arrivals of ``gate`` once it reaches ``count`` or ``timeout`` passes."""
        with self.gates:
            self.gates.wait_for(lambda: self.arrivals.get(gate, 0) >= count, timeout)
            return self.arrivals.get(gate, 0)

    def wait_released(self, gate: str, count: int, timeout: float) -> bool:
        """True once ``gate`` has been released ``count`` times, False after ``timeout``."""
        with self.gates:
            return self.gates.wait_for(lambda: self.releases.get(gate, 0) >= count, timeout)


STATE: State


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate sends: without this, Nagle plus delayed ACKs add ~40 ms
    # to every keep-alive request.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return "upstream-app"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    # -- plumbing ---------------------------------------------------------------------------

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, body: bytes = b"", ctype="text/plain", headers=()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.common_headers()
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def common_headers(self) -> None:
        self.send_header("X-Upstream-Name", STATE.name)
        self.send_header("X-Upstream-Path", self.path)

    def start_chunked(self, status=200, ctype="text/plain", headers=()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.common_headers()
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        if self.command == "HEAD":
            return
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routing ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        target = self.path
        path, _, query = target.partition("?")
        params = parse_qs(query, keep_blank_values=True)
        segment = path.split("/")[1] if path.startswith("/") else ""

        if segment == "control":
            self.read_body()
            return self.control(path, params)

        if path in STATE.health_paths:
            self.read_body()
            return self.health(path)

        with STATE.lock:
            STATE.counts[path] = STATE.counts.get(path, 0) + 1
            if len(STATE.requests) < 2000:
                STATE.requests.append(
                    {
                        "method": self.command,
                        "target": target,
                        "headers": self.header_pairs(),
                        "time": time.time(),
                    }
                )

        gate = params.get("gate", [None])[0]
        if gate is not None:
            STATE.arrive(gate)

        if segment == "ws" and "websocket" in (self.headers.get("Upgrade") or "").lower():
            return self.websocket()

        body = self.read_body()
        handler = getattr(self, "ep_" + segment, None)
        if handler is None:
            return self.send(200, STATE.name.encode())
        return handler(path, query, params, body)

    def header_pairs(self) -> list[list[str]]:
        return [[k, v] for k, v in self.headers.items()]

    def control(self, path: str, params) -> None:
        if path == "/control/health":
            with STATE.lock:
                if "status" in params:
                    STATE.health_status = int(params["status"][0])
                    STATE.unhealthy_until = 0.0
                if "delay_ms" in params:
                    STATE.health_delay = int(params["delay_ms"][0]) / 1000
            return self.send(200, b"ok")
        if path == "/control/reset":
            STATE.reset()
            return self.send(200, b"ok")
        if path == "/control/arrived":
            gate = params["gate"][0]
            count = int(params.get("count", ["1"])[0])
            timeout = int(params.get("timeout_ms", ["10000"])[0]) / 1000
            arrived = STATE.wait_arrivals(gate, count, timeout)
            status = 200 if arrived >= count else 504
            return self.send(
                status, b"%d of %d requests of gate %s arrived" % (arrived, count, gate.encode())
            )
        if path == "/control/release":
            STATE.release(params["gate"][0], int(params.get("count", ["1"])[0]))
            return self.send(200, b"ok")
        body = json.dumps(STATE.snapshot()).encode()
        return self.send(200, body, "application/json")

    def health(self, path: str) -> None:
        with STATE.lock:
            STATE.health_checks += 1
            STATE.counts[path] = STATE.counts.get(path, 0) + 1
            STATE.health_requests.append(
                {
                    "method": self.command,
                    "target": self.path,
                    "headers": self.header_pairs(),
                    "time": time.time(),
                }
            )
            del STATE.health_requests[:-50]
            delay = STATE.health_delay
            status = STATE.health_status
            if time.monotonic() < STATE.unhealthy_until:
                status = 503
        if delay:
            time.sleep(delay)
        self.send(status, b"health %d" % status)

    # -- endpoints --------------------------------------------------------------------------

    def ep_slow(self, path, query, params, body):
        time.sleep(int(params.get("ms", ["1000"])[0]) / 1000)
        self.send(200, STATE.name.encode())

    def ep_hold(self, path, query, params, body):
        gate = params["gate"][0]
        max_wait = int(params.get("max_ms", ["120000"])[0]) / 1000
        if STATE.wait_released(gate, 1, max_wait):
            self.send(200, STATE.name.encode())
        else:
            self.send(500, b"gate %s was never released" % gate.encode())

    def pace(self, params, piece: int, delay: float) -> None:
        """Before piece ``piece`` (and before the end, piece = count): with ``gate=K`` wait
        for the piece-th release of K, else sleep ``delay`` (never before the first)."""
        gate = params.get("gate", [None])[0]
        if gate is not None:
            max_wait = int(params.get("max_ms", ["120000"])[0]) / 1000
            STATE.wait_released(gate, piece, max_wait)
        elif piece:
            time.sleep(delay)

    def ep_echo(self, path, query, params, body):
        info = {
            "name": STATE.name,
            "method": self.command,
            "version": self.request_version,
            "target": self.path,
            "path": path,
            "query": query,
            "headers": self.header_pairs(),
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body": body[:4096].decode("latin-1"),
        }
        self.send(200, json.dumps(info).encode(), "application/json")

    def ep_stream(self, path, query, params, body):
        chunks = int(params.get("chunks", ["5"])[0])
        delay = int(params.get("ms", ["100"])[0]) / 1000
        self.start_chunked()
        for i in range(chunks):
            self.pace(params, i, delay)
            self.chunk(b"chunk %d\n" % i)
        if "gate" in params:
            self.pace(params, chunks, 0)
        self.chunk(b"")

    def ep_sse(self, path, query, params, body):
        events = int(params.get("events", ["3"])[0])
        delay = int(params.get("ms", ["100"])[0]) / 1000
        hold = int(params.get("hold_ms", ["0"])[0]) / 1000
        self.start_chunked(ctype="text/event-stream", headers=[("Cache-Control", "no-cache")])
        for i in range(events):
            self.pace(params, i, delay)
            self.chunk(b"data: event %d\n\n" % i)
        if "gate" in params:
            self.pace(params, events, 0)
        elif hold:
            time.sleep(hold)
        self.chunk(b"")

    def ep_big(self, path, query, params, body):
        size = int(params.get("bytes", ["1048576"])[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.common_headers()
        self.end_headers()
        if self.command == "HEAD":
            return
        data = pattern_bytes(size)
        for i in range(0, size, 65536):
            self.wfile.write(data[i : i + 65536])

    def ep_bigchunked(self, path, query, params, body):
        size = int(params.get("bytes", ["1048576"])[0])
        self.start_chunked(ctype="application/octet-stream")
        data = pattern_bytes(size)
        for i in range(0, size, 65536):
            self.chunk(data[i : i + 65536])
        self.chunk(b"")

    def ep_upload(self, path, query, params, body):
        info = {
            "name": STATE.name,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "transfer_encoding": self.headers.get("Transfer-Encoding"),
            "content_length": self.headers.get("Content-Length"),
        }
        self.send(200, json.dumps(info).encode(), "application/json")

    def ep_status(self, path, query, params, body):
        code = int(path.split("/")[2])
        self.send(code, b"status %d" % code, headers=[("X-Status", str(code))])

    def ep_respond(self, path, query, params, body):
        status = int(params.get("status", ["200"])[0])
        headers = [tuple(h.split(":", 1)) for h in params.get("h", [])]
        payload = params.get("body", [STATE.name])[0].encode()
        ctype = params.get("ctype", ["text/plain"])[0]
        self.send(status, payload, ctype, headers=[(k, v.strip()) for k, v in headers])

    def ep_short(self, path, query, params, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "1000")
        self.common_headers()
        self.end_headers()
        self.wfile.write(b"partial")
        self.wfile.flush()
        self.hard_close()

    def ep_garbage(self, path, query, params, body):
        self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
        self.wfile.flush()
        self.hard_close()

    def ep_close(self, path, query, params, body):
        self.hard_close()

    def ep_oneshot(self, path, query, params, body):
        payload = STATE.name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.common_headers()
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def ep_connclose(self, path, query, params, body):
        self.send(200, STATE.name.encode(), headers=[("Connection", "close")])
        self.close_connection = True

    def hard_close(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- websocket --------------------------------------------------------------------------

    def websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.common_headers()
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        with STATE.lock:
            STATE.websockets += 1
        try:
            while True:
                frame = read_ws_frame(self.rfile)
                if frame is None:
                    return
                fin, opcode, payload = frame
                if opcode == 0x8:
                    self.wfile.write(ws_frame(0x8, payload[:2]))
                    self.wfile.flush()
                    return
                if opcode == 0x9:
                    self.wfile.write(ws_frame(0xA, payload))
                elif opcode == 0x1 and payload == b"__name__":
                    self.wfile.write(ws_frame(0x1, STATE.name.encode()))
                elif opcode in (0x0, 0x1, 0x2):
                    self.wfile.write(ws_frame(opcode, payload, fin))
                self.wfile.flush()
        except (OSError, ValueError):
            return


def read_exact(stream, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_ws_frame(stream):
    """One frame as ``(fin, opcode, payload)``; None at EOF.  Unmasks masked frames."""
    head = read_exact(stream, 2)
    if head is None:
        return None
    fin = bool(head[0] & 0x80)
    opcode = head[0] & 0x0F
    masked = bool(head[1] & 0x80)
    length = head[1] & 0x7F
    if length == 126:
        raw = read_exact(stream, 2)
        if raw is None:
            return None
        length = struct.unpack("!H", raw)[0]
    elif length == 127:
        raw = read_exact(stream, 8)
        if raw is None:
            return None
        length = struct.unpack("!Q", raw)[0]
    mask = read_exact(stream, 4) if masked else None
    if masked and mask is None:
        return None
    payload = read_exact(stream, length) if length else b""
    if payload is None:
        return None
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return fin, opcode, payload


def ws_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """Encode a frame; clients pass a 4-byte ``mask``, servers send unmasked frames."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 65536:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


def main(argv: list[str] | None = None) -> None:
    global STATE
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--health-status", type=int, default=200)
    parser.add_argument("--unhealthy-for", type=float, default=0.0)
    parser.add_argument("--health-path", action="append", default=None)
    args = parser.parse_args(argv)
    until = time.monotonic() + args.unhealthy_for if args.unhealthy_for else 0.0
    STATE = State(args.name, args.health_status, until, args.health_path or ["/up"])
    server = Server(("127.0.0.1", args.port), Handler)
    sys.stdout.write(f"PORT {server.server_address[1]}\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
