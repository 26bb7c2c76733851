"""Helpers for the upgrade tests (issue 10): a proxy followed across upgrades, and mixed load.

:class:`UpgradableProxy` is ``kamal-proxy run`` started from a script of its own, which
stands for "the code installed now": an upgrade runs that script again, so a test breaks the
installation by rewriting it (and mends it the same way).  After an upgrade the server is
another process, a grandchild of the test: the test process makes itself a child subreaper
(Linux ``PR_SET_CHILD_SUBREAPER``), so that the new processes become its own children when
the old ones exit, and it can stop each one by its pid and read its exit status.

:class:`MixedLoad` is the traffic of the issue's test: keep-alive and new-connection GETs,
slow (1-3 s) requests, 5 MiB uploads and downloads, HTTPS GETs and a WebSocket that keeps
sending, each in a bounded thread that records every outcome.  Nothing is retried except what
HTTP clients retry by design (RFC 9112 §9.3.1): a GET sent on a reused keep-alive connection
that the server closed before answering a single byte.  Those retries are counted apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.integration.support import ProxyProcess, pattern_bytes
from tests.integration.upstream_app import ws_frame

__all__ = ["MixedLoad", "UpgradableProxy", "pid_alive", "wait_pid_gone"]

#: The "installed code": what ``kamal-proxy`` is, as a script.
GOOD_INSTALL = "import sys\nfrom kamal_proxy.cli.main import main\nsys.exit(main())\n"
PR_SET_CHILD_SUBREAPER = 36
HARD_LIMIT = 240.0  # no load thread outlives this, whatever the test does


def become_subreaper() -> None:
    """Orphaned descendants (servers whose old process exited) become our children."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float) -> int | None:
    """Wait (bounded) until ``pid`` has exited; its exit code when it was our child."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            if not pid_alive(pid):
                return None
        if time.monotonic() >= deadline:
            raise AssertionError(f"process {pid} still running after {timeout}s")
        time.sleep(0.05)


class UpgradableProxy(ProxyProcess):
    """``kamal-proxy run`` from its own "installed" script, followed across upgrades."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script = os.path.join(self.root, "kamal-proxy-installed.py")
        self.install(GOOD_INSTALL)
        #: Every server process started, oldest first; the last one serves.
        self.pids: list[int] = []

    def install(self, text: str) -> None:
        with open(self.script, "w") as f:
            f.write(text)

    def command(self) -> list[str]:
        return [sys.executable, self.script]

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> UpgradableProxy:
        become_subreaper()
        super().start(timeout, wait_ready)
        self.pids = [self.proc.pid]
        return self

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def alive(self) -> bool:
        return bool(self.pids) and pid_alive(self.pid)

    def upgrade(self, *args: str, timeout: float = 120.0) -> int:
        """``kamal-proxy upgrade ARGS`` that must succeed; the new server's pid."""
        mark = self.log_mark()
        old = self.pid
        self.cli_ok("upgrade", *args, timeout=timeout)
        record = self.wait_for_log("Upgraded", timeout=10, since=mark, old_pid=old)
        self.pids.append(record["pid"])
        return record["pid"]

    def wait_ready(self, timeout: float = 30.0) -> None:
        super().wait_ready(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Stop every server process still running (the serving one first) by its pid."""
        code = None
        for pid in reversed(self.pids):
            if self.proc is not None and pid == self.proc.pid:
                continue
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                try:
                    status = wait_pid_gone(pid, timeout)
                except AssertionError:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    status = wait_pid_gone(pid, 10)
                if pid == self.pid:
                    code = status
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        first = super().stop(sig, timeout)
        return first if len(self.pids) <= 1 else code


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """What the load saw, by kind of request."""

    ok: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    refused: int = 0
    #: GETs retried after a reused keep-alive connection closed before any response byte.
    stale_retries: int = 0
    #: WebSocket connections ended by the server: (opened, closed, "eof" | reason) in order.
    ws_closes: list[tuple[float, float, str]] = field(default_factory=list)
    ws_echoes: int = 0
    #: sha256 of every certificate the HTTPS GETs were served.
    certificates: set[str] = field(default_factory=set)
    #: Times of failures and refusals (for the restart comparison).
    failure_times: list[float] = field(default_factory=list)


class MixedLoad:
    """Client threads on ``port`` (HTTP) and ``https_port`` until :meth:`finish`.

    ``web_host`` serves ``/``, ``/slow``, ``/upload``, ``/big`` (an upstream_app), whose
    ``X-Upstream-Name`` must be in ``allowed``; ``ws_host`` an upstream_app's ``/ws``;
    ``tls_host`` is served over HTTPS with a certificate signed by ``ca_file``.
    """

    BIG = 5 * 1024 * 1024

    def __init__(
        self,
        port: int,
        allowed: set[str],
        web_host: str,
        ws_host: str | None = None,
        https_port: int | None = None,
        tls_host: str | None = None,
        ca_file: str | None = None,
        pace: float = 0.01,
        only: set[str] | None = None,
    ) -> None:
        self.port = port
        self.allowed = allowed
        self.web_host = web_host
        self.ws_host = ws_host
        self.https_port = https_port
        self.tls_host = tls_host
        self.ca_file = ca_file
        self.pace = pace
        self.out = Outcomes()
        # A condition: waiters learn of each success (wait_each_served).
        self.lock = threading.Condition(threading.Lock())
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + HARD_LIMIT
        kinds = [
            ("keepalive", self._keepalive),
            ("keepalive", self._keepalive),
            ("fresh", self._fresh),
            ("fresh", self._fresh),
            ("slow", self._slow),
            ("slow", self._slow),
            ("upload", self._upload),
            ("download", self._download),
        ]
        if ws_host:
            kinds.append(("websocket", self._websocket))
        if https_port and tls_host:
            kinds.append(("https", self._https))
        self.threads = [
            threading.Thread(target=fn, name=kind, daemon=True)
            for kind, fn in kinds
            if only is None or kind in only
        ]

    def start(self) -> MixedLoad:
        for thread in self.threads:
            thread.start()
        return self

    def running(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    def finish(self, timeout: float = 30.0) -> Outcomes:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout)
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            self._fail("load", f"threads still running: {stuck}")
        return self.out

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.out.ok)

    def _served(self) -> dict[str, int]:
        served = dict(self.out.ok)
        served["websocket"] = self.out.ws_echoes
        return served

    def wait_each_served(self, timeout: float = 60.0) -> None:
        """Return once every kind of load running has had one more success than when this
        was called (an order of events: each kind went through the proxy since then)."""
        kinds = {t.name for t in self.threads}
        deadline = time.monotonic() + timeout
        with self.lock:
            before = self._served()
            while True:
                now = self._served()
                behind = sorted(k for k in kinds if now.get(k, 0) <= before.get(k, 0))
                if not behind:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no success of {behind} within {timeout:g}s; "
                        f"failures: {self.out.failures[-5:]}"
                    )
                self.lock.wait(left)

    # -- recording ---------------------------------------------------------------------------

    def _ok(self, kind: str) -> None:
        with self.lock:
            self.out.ok[kind] = self.out.ok.get(kind, 0) + 1
            self.lock.notify_all()

    def _fail(self, kind: str, problem: str) -> None:
        with self.lock:
            self.out.failures.append(f"{time.strftime('%H:%M:%S')} {kind}: {problem}")
            self.out.failure_times.append(time.monotonic())

    def _refused(self, kind: str) -> None:
        with self.lock:
            self.out.refused += 1
            self.out.failure_times.append(time.monotonic())
        self._fail(kind, "connection refused")

    def _connection(self, timeout: float = 20.0) -> http.client.HTTPConnection | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.connect()
        except ConnectionRefusedError:
            return None
        return conn

    def _check(self, kind: str, resp: http.client.HTTPResponse, body: bytes) -> bool:
        name = resp.getheader("X-Upstream-Name")
        if resp.status != 200:
            self._fail(kind, f"status {resp.status}: {body[:120]!r}")
            return False
        if name not in self.allowed:
            self._fail(kind, f"answered by {name!r}")
            return False
        return True

    def _one(self, kind: str, method: str, path: str, body: bytes | None = None):
        """One request on a new connection: (response, body) or None (recorded)."""
        try:
            conn = self._connection()
            if conn is None:
                self._refused(kind)
                return None
            with contextlib.closing(conn):
                headers = {"Host": self.web_host}
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp, resp.read()
        except Exception as e:  # noqa: BLE001 - every exception is a failed request
            self._fail(kind, f"{type(e).__name__}: {e}")
            return None

    # -- the kinds -----------------------------------------------------------------------------

    def _keepalive(self) -> None:
        conn: http.client.HTTPConnection | None = None
        reused = False
        i = 0
        while self.running():
            i += 1
            for attempt in (1, 2):
                try:
                    if conn is None:
                        conn = self._connection()
                        reused = False
                        if conn is None:
                            self._refused("keepalive")
                            break
                    conn.request("GET", f"/?i={i}", headers={"Host": self.web_host})
                    resp = conn.getresponse()
                    body = resp.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    conn.close()
                    conn = None
                    if reused and attempt == 1:
                        with self.lock:
                            self.out.stale_retries += 1
                        continue
                    self._fail("keepalive", f"connection closed without an answer (#{i})")
                    break
                except Exception as e:  # noqa: BLE001
                    self._fail("keepalive", f"{type(e).__name__}: {e}")
                    if conn is not None:
                        conn.close()
                    conn = None
                    break
                if self._check("keepalive", resp, body):
                    self._ok("keepalive")
                reused = True
                if resp.will_close:
                    conn.close()
                    conn = None
                break
            time.sleep(self.pace)
        if conn is not None:
            conn.close()

    def _fresh(self) -> None:
        while self.running():
            got = self._one("fresh", "GET", "/")
            if got is not None and self._check("fresh", *got):
                self._ok("fresh")
            time.sleep(self.pace)

    def _slow(self) -> None:
        while self.running():
            ms = random.randint(1000, 3000)
            got = self._one("slow", "GET", f"/slow?ms={ms}")
            if got is not None and self._check("slow", *got):
                self._ok("slow")

    def _upload(self) -> None:
        while self.running():
            body = os.urandom(self.BIG)
            got = self._one("upload", "POST", "/upload", body)
            if got is not None and self._check("upload", *got):
                info = json.loads(got[1])
                digest = hashlib.sha256(body).hexdigest()
                if info["length"] != len(body) or info["sha256"] != digest:
                    self._fail("upload", f"mangled: {info}")
                else:
                    self._ok("upload")
            time.sleep(0.1)

    def _download(self) -> None:
        expected = hashlib.sha256(pattern_bytes(self.BIG)).hexdigest()
        while self.running():
            got = self._one("download", "GET", f"/big?bytes={self.BIG}")
            if got is not None and self._check("download", *got):
                if hashlib.sha256(got[1]).hexdigest() != expected:
                    self._fail("download", f"mangled ({len(got[1])} bytes)")
                else:
                    self._ok("download")
            time.sleep(0.1)

    def _https(self) -> None:
        context = ssl.create_default_context(cafile=self.ca_file)
        while self.running():
            try:
                raw = socket.create_connection(("127.0.0.1", self.https_port), timeout=20)
            except ConnectionRefusedError:
                self._refused("https")
                continue
            except OSError as e:
                self._fail("https", f"connect: {e}")
                continue
            try:
                with context.wrap_socket(raw, server_hostname=self.tls_host) as tls:
                    der = tls.getpeercert(binary_form=True)
                    with self.lock:
                        self.out.certificates.add(hashlib.sha256(der).hexdigest())
                    tls.sendall(
                        f"GET / HTTP/1.1\r\nHost: {self.tls_host}\r\n"
                        "Connection: close\r\n\r\n".encode()
                    )
                    data = b""
                    while True:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                if data.startswith(b"HTTP/1.1 200"):
                    self._ok("https")
                else:
                    self._fail("https", f"answer {data[:80]!r}")
            except Exception as e:  # noqa: BLE001
                raw.close()
                self._fail("https", f"{type(e).__name__}: {e}")
            time.sleep(self.pace)

    def _websocket(self) -> None:
        """Ping-pong on one WebSocket; when the server ends it, note how, and open another."""
        n = 0
        while self.running():
            try:
                sock = self._ws_connect()
            except ConnectionRefusedError:
                self._refused("websocket")
                continue
            except Exception as e:  # noqa: BLE001
                self._fail("websocket", f"handshake: {type(e).__name__}: {e}")
                time.sleep(0.1)
                continue
            opened = time.monotonic()
            with contextlib.closing(sock):
                while self.running():
                    n += 1
                    payload = f"message {n}".encode()
                    try:
                        sock.sendall(ws_frame(0x1, payload, mask=os.urandom(4)))
                    except OSError as e:
                        self._ws_closed(opened, f"send: {type(e).__name__}")
                        break
                    answer = self._ws_read(sock)
                    if isinstance(answer, str):
                        self._ws_closed(opened, answer)
                        break
                    if answer != payload:
                        self._fail("websocket", f"echo {answer[:40]!r} != {payload!r}")
                        break
                    with self.lock:
                        self.out.ws_echoes += 1
                        self.lock.notify_all()
                    time.sleep(0.05)

    def _ws_closed(self, opened: float, how: str) -> None:
        with self.lock:
            self.out.ws_closes.append((opened, time.monotonic(), how))

    def _ws_connect(self) -> socket.socket:
        import base64

        key = base64.b64encode(os.urandom(16)).decode()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        try:
            sock.sendall(
                (
                    f"GET /ws HTTP/1.1\r\nHost: {self.ws_host}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(f"handshake answered {head[:60]!r}")
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _ws_read(sock: socket.socket) -> bytes | str:
        """One frame's payload, or how the connection ended: ``"eof"`` at a frame boundary
        (a clean close), ``"torn frame"``, ``"reset"``, ``"timeout"``, ``"close frame"``."""

        def exactly(n: int, first: bool) -> bytes | str:
            data = b""
            while len(data) < n:
                try:
                    chunk = sock.recv(n - len(data))
                except ConnectionResetError:
                    return "reset"
                except TimeoutError:
                    return "timeout"
                if not chunk:
                    return "eof" if first and not data else "torn frame"
                data += chunk
            return data

        head = exactly(2, True)
        if isinstance(head, str):
            return head
        length = head[1] & 0x7F
        if length == 126:
            raw = exactly(2, False)
            if isinstance(raw, str):
                return raw
            length = struct.unpack("!H", raw)[0]
        elif length == 127:
            raw = exactly(8, False)
            if isinstance(raw, str):
                return raw
            length = struct.unpack("!Q", raw)[0]
        payload = exactly(length, False) if length else b""
        if isinstance(payload, str):
            return payload
        if head[0] & 0x0F == 0x8:
            return "close frame"
        return payload
