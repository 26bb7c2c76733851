"""Harness for the end-to-end tests: the real ``kamal-proxy run`` process, real upstream
processes, the real CLI, and plain HTTP over loopback.

Everything here is synchronous (subprocess, sockets, ``http.client``): the proxy is another
process, so blocking the test's reactor thread costs nothing and keeps the tests readable.
Every wait is bounded, every process is stopped by its PID, and every helper that starts
something registers its cleanup on the test case.

Running: the tests drive the *installed* ``kamal-proxy`` console script next to the Python that
runs them (a normal, non-editable install), so reinstall after changing the product::

    pip install -q . && python -m twisted.trial [-j 4] tests.integration

``KAMAL_PROXY_TEST_BIN`` points the suite at another executable; ``KAMAL_PROXY_IT_TIMINGS=FILE``
appends each test's wall time to FILE.  ``KAMAL_PROXY_IT_WORKERS=N`` runs every proxy with N
worker processes (default 1, a single process); ``make test`` runs the suite with 1 and with 2.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from twisted.trial import unittest

from tests.integration.upstream_app import pattern_bytes, read_ws_frame, ws_frame

__all__ = [
    "PROCESS_TIMEOUT",
    "CliResult",
    "HttpClient",
    "IntegrationTestCase",
    "amp_call",
    "ProxyProcess",
    "Response",
    "UpstreamProcess",
    "WebSocketClient",
    "eventually",
    "free_port",
    "http_request",
    "pattern_bytes",
    "raw_body",
    "raw_exchange",
    "raw_status",
    "shared_proxy",
    "shared_upstream",
]

# How long a process may take to start, or to stop, on a heavily loaded machine (2 CPUs, a
# load of 40: start-up is ~0.5 s of CPU, and such a machine gives a process a few percent of
# one).  A failure detector only: a passing run never waits this long.
PROCESS_TIMEOUT = 60.0

HERE = os.path.dirname(os.path.abspath(__file__))
UPSTREAM_APP = os.path.join(HERE, "upstream_app.py")

# Variables of the test runner's environment that would change the proxy's behaviour.
_SCRUBBED_ENV = (
    "HTTP_PORT",
    "HTTPS_PORT",
    "METRICS_PORT",
    "DEBUG",
    "XDG_RUNTIME_DIR",
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "all_proxy",
    "ACME_DIRECTORY",
    "ACME_CA_BUNDLE",
    "ALL_PROXY",
    "WORKERS",
)

#: Worker processes of every proxy the suite starts (``KAMAL_PROXY_IT_WORKERS``).
IT_WORKERS = int(os.environ.get("KAMAL_PROXY_IT_WORKERS") or 1)


# -- processes ------------------------------------------------------------------------------


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """Child pre-exec hook: SIGKILL the child if the test runner dies (Linux only).

    The signal fires when the *thread* that forked exits, so long-lived children (proxy,
    upstreams) are spawned from the main thread only.  The libc handle is looked up at import
    so the hook itself takes no locks.
    """
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop_pid(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = PROCESS_TIMEOUT
) -> int:
    """Signal one process by PID, wait bounded, SIGKILL as a last resort; returns the exit code."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
    return proc.returncode


def proxy_command() -> list[str]:
    """The ``kamal-proxy`` console script installed next to this Python (a normal install).

    ``KAMAL_PROXY_TEST_BIN`` overrides it, e.g. to run the suite against another build.
    """
    override = os.environ.get("KAMAL_PROXY_TEST_BIN")
    if override:
        return [override]
    script = os.path.join(os.path.dirname(sys.executable), "kamal-proxy")
    if os.path.exists(script):
        return [script]
    return [
        sys.executable,
        "-c",
        "import sys; from kamal_proxy.cli.main import main; sys.exit(main())",
    ]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port that is free on all interfaces right now (the proxy binds ``:P``).

    Chosen below the kernel's ephemeral range: a port the kernel hands out can be taken by
    any outgoing connection (ours included) between a proxy's stop and its restart on the
    same port, which makes the restart fail with "address already in use".
    """
    low = 10000
    high = max(low + 1000, _ephemeral_low() - 1)
    for _ in range(200):
        port = random.randint(low, high)
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                s.bind(("::", port))
        except OSError:
            continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unix_socket_accepts(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns a truthy value; the last value or AssertionError."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except AssertionError as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {last_error!r})")
        time.sleep(interval)


class _LineCollector(threading.Thread):
    """Reads a pipe line by line in the background so the child never blocks on output."""

    def __init__(self, stream, on_line: Callable[[str], None]):
        super().__init__(daemon=True)
        self.stream = stream
        self.on_line = on_line

    def run(self) -> None:
        try:
            for raw in iter(self.stream.readline, b""):
                self.on_line(raw.decode("utf-8", "replace").rstrip("\n"))
        except (OSError, ValueError):
            pass


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    elapsed: float = 0.0

    def __iter__(self):
        return iter((self.code, self.out, self.err))


class ProxyProcess:
    """One ``kamal-proxy run`` with its own HOME and control socket, on free loopback ports."""

    def __init__(
        self,
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        home: str | None = None,
        http_port: int | None = None,
        https_port: int | None = None,
        metrics: bool = False,
    ):
        """``metrics=True`` serves metrics on a port of the harness's choice (``metrics_port``);
        prefer it to ``--metrics-port`` in ``extra_args``, which start() cannot pick anew."""
        self.root = tempfile.mkdtemp(prefix="kp-it-")
        self.home = home or os.path.join(self.root, "home")
        os.makedirs(self.home, exist_ok=True)
        self.socket_dir = os.path.join(self.root, "run")
        os.makedirs(self.socket_dir, exist_ok=True)
        self.socket_path = os.path.join(self.socket_dir, "kamal-proxy.sock")
        # Ports the harness picks itself may be taken by another process (other suites run on
        # the same machine) between the pick and the bind: start() picks those again.
        self._picked = {"http_port": http_port is None, "https_port": https_port is None}
        self.http_port = http_port or free_port()
        self.https_port = https_port or free_port()
        self.metrics_port = free_port() if metrics else None
        self._picked["metrics_port"] = metrics
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.records: list[dict] = []
        self.bad_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self._readers: list[_LineCollector] = []
        self.starts = 0

    # -- environment ------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED_ENV and not k.startswith("KAMAL_PROXY_")
        }
        env["HOME"] = self.home
        env["KAMAL_PROXY_SOCKET"] = self.socket_path
        env["KAMAL_PROXY_WORKERS"] = str(IT_WORKERS)
        env["NO_PROXY"] = "*"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    @property
    def data_dir(self) -> str:
        return os.path.join(self.home, ".config", "kamal-proxy")

    @property
    def state_path(self) -> str:
        return os.path.join(self.data_dir, "kamal-proxy.state")

    def command(self) -> list[str]:
        return proxy_command()

    def run_args(self) -> list[str]:
        args = ["run", "--http-port", str(self.http_port), "--https-port", str(self.https_port)]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        return [*args, *self.extra_args]

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = PROCESS_TIMEOUT, wait_ready: bool = True) -> ProxyProcess:
        for attempt in range(3):
            self._spawn()
            if not wait_ready:
                return self
            try:
                self.wait_ready(timeout)
                return self
            except PortTaken as e:
                if attempt == 2 or not self._pick_again(e.port):
                    raise
        raise AssertionError("unreachable")

    def _pick_again(self, port: int) -> bool:
        """Replace ``port`` with a fresh one if the harness picked it; whether it did."""
        for name, picked in self._picked.items():
            if picked and getattr(self, name) == port:
                setattr(self, name, free_port())
                return True
        return False

    def _spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self._cond:
            self.lines.clear()
            self.records.clear()
            self.bad_lines.clear()
            self.stderr_lines.clear()
        self.proc = subprocess.Popen(
            self.command() + self.run_args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.root,
            preexec_fn=_die_with_parent,
        )
        self.starts += 1
        self._readers = [
            _LineCollector(self.proc.stdout, self._on_stdout),
            _LineCollector(self.proc.stderr, self._on_stderr),
        ]
        for reader in self._readers:
            reader.start()

    def wait_ready(self, timeout: float = PROCESS_TIMEOUT) -> None:
        """Ready = ``Server started`` is logged (as a process manager reads it), the control
        socket accepts connections and the HTTP port answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._join_readers()
                message = (
                    f"kamal-proxy run exited with {self.proc.returncode} during start-up\n"
                    + self.describe()
                )
                with self._cond:
                    stderr = "\n".join(self.stderr_lines)
                taken = _PORT_TAKEN.search(stderr)
                if taken:
                    raise PortTaken(message, int(taken.group(1)))
                raise AssertionError(message)
            if (
                self.logs("Server started")
                and unix_socket_accepts(self.socket_path)
                and port_open(self.http_port)
            ):
                return
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"kamal-proxy run not ready within {timeout}s\n" + self.describe())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = PROCESS_TIMEOUT) -> int | None:
        """Stop by PID (SIGTERM, bounded wait, SIGKILL fallback); returns the exit code."""
        if self.proc is None:
            return None
        code = _stop_pid(self.proc, sig, timeout)
        self._join_readers()
        return code

    def exit_status(self, timeout: float = PROCESS_TIMEOUT) -> int | None:
        """The exit status if the process ends by itself within ``timeout``, else None; either
        way it is then stopped (by PID) and its output read to the end."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.stop()
        return code

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def restart(self, timeout: float = PROCESS_TIMEOUT) -> ProxyProcess:
        """Stop and start again with the same HOME, socket and ports."""
        code = self.stop()
        assert code == 0, f"kamal-proxy exited {code} on SIGTERM\n" + self.describe()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.stop(signal.SIGTERM, timeout=12)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- output -----------------------------------------------------------------------------

    def _on_stdout(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    self.bad_lines.append(line)
                else:
                    if isinstance(record, dict):
                        self.records.append(record)
                    else:
                        self.bad_lines.append(line)
            self._cond.notify_all()

    def _on_stderr(self, line: str) -> None:
        with self._cond:
            self.stderr_lines.append(line)

    def log_mark(self) -> int:
        """A position in the log; pass it as ``since`` to look only at later lines."""
        with self._cond:
            return len(self.records)

    def logs(self, msg: str | None = None, since: int = 0, **attrs: Any) -> list[dict]:
        with self._cond:
            records = list(self.records[since:])
        return [r for r in records if _matches(r, msg, attrs)]

    def wait_for_log(self, msg: str, timeout: float = 10.0, since: int = 0, **attrs: Any) -> dict:
        """The first JSON log record with ``msg`` (and the given attributes) after ``since``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self.records[since:]:
                    if _matches(record, msg, attrs):
                        return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
        raise AssertionError(
            f"no log {msg!r} {attrs or ''} within {timeout}s; last lines:\n"
            + "\n".join(self.lines[-15:])
        )

    def describe(self) -> str:
        with self._cond:
            return (
                "--- stdout (tail) ---\n"
                + "\n".join(self.lines[-25:])
                + "\n--- stderr (tail) ---\n"
                + "\n".join(self.stderr_lines[-40:])
            )

    # -- CLI --------------------------------------------------------------------------------

    def cli(
        self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> CliResult:
        """Run ``kamal-proxy ARGS`` against this server; ``(code, stdout, stderr)``."""
        return run_cli(*args, env={**self.env, **(env or {})}, timeout=timeout, cwd=self.root)

    def cli_ok(self, *args: str, timeout: float = 60.0) -> str:
        result = self.cli(*args, timeout=timeout)
        if result.code != 0:
            raise AssertionError(
                f"kamal-proxy {' '.join(args)} exited {result.code}\n"
                f"stdout: {result.out!r}\nstderr: {result.err!r}\n" + self.describe()
            )
        return result.out

    def list_rows(self) -> list[list[str]]:
        """``list`` output without ANSI styling: one list of cells per row (header first)."""
        return parse_list_output(self.cli_ok("list"))

    # -- HTTP -------------------------------------------------------------------------------

    def request(self, method: str = "GET", path: str = "/", **kwargs: Any) -> Response:
        return http_request(self.http_port, method, path, **kwargs)

    def client(self, **kwargs: Any) -> HttpClient:
        return HttpClient(self.http_port, **kwargs)


_PORT_TAKEN = re.compile(r"listen (?:tcp|udp) :(\d+): bind: address already in use")


class PortTaken(AssertionError):
    """The proxy could not start: ``port`` is in use."""

    def __init__(self, message: str, port: int):
        super().__init__(message)
        self.port = port


def _matches(record: dict, msg: str | None, attrs: dict[str, Any]) -> bool:
    if msg is not None and record.get("msg") != msg:
        return False
    return all(record.get(k) == v for k, v in attrs.items())


def run_cli(
    *args: str, env: dict[str, str], timeout: float = PROCESS_TIMEOUT, cwd: str | None = None
) -> CliResult:
    started = time.monotonic()
    proc = subprocess.Popen(
        proxy_command() + list(args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        preexec_fn=_die_with_parent,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_pid(proc, signal.SIGKILL, 5)
        proc.communicate()
        raise AssertionError(
            f"kamal-proxy {' '.join(args)} did not finish within {timeout}s"
        ) from None
    return CliResult(
        proc.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        time.monotonic() - started,
    )


def strip_ansi(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\x1b" and i + 1 < len(text) and text[i + 1] == "[":
            j = text.find("m", i)
            i = j + 1 if j >= 0 else len(text)
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_list_output(out: str) -> list[list[str]]:
    """Cells of the ``list`` table.  Cells are delimited by the ANSI reset codes, so a cell
    that itself holds spaces survives."""
    rows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = line.split("\x1b[0m")
        cells = [strip_ansi(p).strip() for p in parts[:-1]]
        rows.append(cells if cells else strip_ansi(line).split())
    return rows


class UpstreamProcess:
    """``upstream_app.py NAME`` in its own process on 127.0.0.1:<ephemeral>."""

    def __init__(self, name: str, *args: str, port: int = 0):
        self.name = name
        self.args = list(args)
        if port:
            self.args += ["--port", str(port)]
        self.proc = subprocess.Popen(
            [sys.executable, UPSTREAM_APP, name, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        line = _readline_with_timeout(self.proc, PROCESS_TIMEOUT)
        if not line.startswith("PORT "):
            _stop_pid(self.proc, signal.SIGKILL, 5)
            raise AssertionError(f"upstream {name} failed to start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        code = _stop_pid(self.proc, signal.SIGTERM, 5)
        try:
            self.proc.stdout.close()
        except OSError:
            pass
        return code

    def get(self, path: str, timeout: float = 5.0) -> Response:
        return http_request(self.port, "GET", path, timeout=timeout)

    def stats(self) -> dict:
        return self.get("/control/stats").json()

    def reset(self) -> None:
        self.get("/control/reset")

    def set_health(self, status: int | None = None, delay_ms: int | None = None) -> None:
        query = []
        if status is not None:
            query.append(f"status={status}")
        if delay_ms is not None:
            query.append(f"delay_ms={delay_ms}")
        self.get("/control/health?" + "&".join(query))

    def request_count(self) -> int:
        """Requests other than health checks and control calls."""
        return self.stats()["request_count"]

    def health_checks(self) -> int:
        return self.stats()["health_checks"]

    # Gates (upstream_app.py): requests that the test holds in flight and releases, so that a
    # test states an order of events instead of sleeping "long enough".

    def wait_arrived(self, gate: str, count: int = 1, timeout: float = 10.0) -> None:
        """Return once ``count`` requests naming ``gate`` have reached this upstream."""
        resp = http_request(
            self.port,
            "GET",
            f"/control/arrived?gate={quote(gate)}&count={count}&timeout_ms={int(timeout * 1000)}",
            timeout=timeout + 10,
        )
        if resp.status != 200:
            raise AssertionError(f"upstream {self.name}: {resp.text} within {timeout}s")

    def release(self, gate: str, count: int = 1) -> None:
        """Let requests held on ``gate`` go on (``count`` more steps of a gated stream)."""
        resp = self.get(f"/control/release?gate={quote(gate)}&count={count}")
        if resp.status != 200:
            raise AssertionError(f"upstream {self.name}: release of {gate} failed: {resp!r}")


def _readline_with_timeout(proc: subprocess.Popen, timeout: float) -> str:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].decode().strip() if result else ""


# -- HTTP -----------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    version: int = 11
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)

    def header(self, name: str, default: str | None = None) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return default

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def has_header(self, name: str) -> bool:
        return self.header(name) is not None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def echo_header(self, name: str) -> str | None:
        """For ``/echo`` responses: a request header as the upstream saw it."""
        values = self.echo_header_all(name)
        return values[0] if values else None

    def echo_header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.json()["headers"] if k.lower() == lname]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers!r} {self.body[:200]!r}>"


class HttpClient:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port, reopened only when asked to."""

    def __init__(self, port: int, host: str | None = None, timeout: float = 10.0):
        self.port = port
        self.host = host
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        elif self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        else:
            self.conn.timeout = timeout
        return self.conn

    def send(
        self,
        method: str = "GET",
        path: str = "/",
        host: str | None = None,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes | Iterable[bytes] | None = None,
        timeout: float | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request and return the unread ``HTTPResponse`` (for streaming reads)."""
        conn = self._connection(timeout or self.timeout)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        host = host if host is not None else (self.host or f"127.0.0.1:{self.port}")
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in pairs}
        if host is not None and "host" not in names:
            conn.putheader("Host", host)
        chunked = False
        if body is not None and not isinstance(body, (bytes, bytearray)):
            chunked = True
            if "transfer-encoding" not in names:
                conn.putheader("Transfer-Encoding", "chunked")
        elif body is not None and "content-length" not in names:
            conn.putheader("Content-Length", str(len(body)))
        for k, v in pairs:
            conn.putheader(k, v)
        conn.endheaders(body, encode_chunked=chunked)
        return conn.getresponse()

    def request(self, method: str = "GET", path: str = "/", **kwargs: Any) -> Response:
        started = time.monotonic()
        resp = self.send(method, path, **kwargs)
        body = resp.read()
        result = Response(
            resp.status,
            resp.reason,
            list(resp.getheaders()),
            body,
            resp.version,
            time.monotonic() - started,
        )
        if resp.will_close:
            self.close()
        return result

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def http_request(port: int, method: str = "GET", path: str = "/", **kwargs: Any) -> Response:
    """One request on a fresh connection, closed afterwards."""
    client = HttpClient(port)
    try:
        return client.request(method, path, **kwargs)
    finally:
        client.close()


# -- raw sockets ----------------------------------------------------------------------------


def raw_exchange(
    port: int,
    data: bytes | Iterable[bytes],
    timeout: float = 5.0,
    half_close: bool = False,
    pause: float = 0.0,
) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout`` passes); the bytes read.

    ``data`` may be a list of pieces sent with ``pause`` seconds between them.  Sending runs
    in a helper thread while this one reads, so an early answer (e.g. 431 to a huge header)
    is caught even if the server closes before everything was sent.
    """
    pieces = [data] if isinstance(data, (bytes, bytearray)) else list(data)
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

        def send_all() -> None:
            try:
                for i, piece in enumerate(pieces):
                    if i and pause:
                        time.sleep(pause)
                    s.sendall(piece)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sender.join(timeout)
    return bytes(received)


def raw_status(response: bytes) -> int | None:
    """The status code of the first response in raw bytes, or None if there is none."""
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def raw_body(response: bytes) -> bytes:
    """The body of the first raw response (Content-Length, chunked or close-delimited)."""
    head, _, rest = response.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return bytes(body)
    if b"content-length" in headers:
        return rest[: int(headers[b"content-length"])]
    return rest


# -- WebSocket ------------------------------------------------------------------------------


class WebSocketClient:
    """A minimal RFC 6455 client over a raw socket (masked frames, no extensions)."""

    def __init__(self, sock: socket.socket, response_head: bytes, leftover: bytes):
        self.sock = sock
        self.response_head = response_head
        self._buffer = leftover
        self.status = raw_status(response_head)
        self.headers: list[tuple[str, str]] = []
        for line in response_head.split(b"\r\n")[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                self.headers.append((k.decode("latin-1").strip(), v.decode("latin-1").strip()))

    @classmethod
    def connect(
        cls,
        port: int,
        path: str = "/ws",
        host: str = "localhost",
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> WebSocketClient:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        client = cls(sock, head, rest)
        if client.status == 101:
            expected = base64.b64encode(
                hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            ).decode()
            accept = client.header("Sec-WebSocket-Accept")
            if accept != expected:
                sock.close()
                raise AssertionError(f"bad Sec-WebSocket-Accept {accept!r}")
        return client

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def send(self, payload: bytes | str, opcode: int | None = None) -> None:
        if isinstance(payload, str):
            payload, default = payload.encode(), 0x1
        else:
            default = 0x2
        self.sock.sendall(ws_frame(opcode or default, payload, mask=os.urandom(4)))

    def recv(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next data frame as ``(opcode, payload)``; None when the connection closed."""
        self.sock.settimeout(timeout)
        reader = _SocketReader(self.sock, self._buffer)
        try:
            frame = read_ws_frame(reader)
        except (ConnectionResetError, BrokenPipeError):
            return None
        self._buffer = reader.buffer
        if frame is None:
            return None
        _fin, opcode, payload = frame
        if opcode == 0x8:
            return None
        return opcode, payload

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the peer closes the connection (EOF, reset or close frame) within timeout."""
        try:
            return self.recv(timeout) is None
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.sendall(ws_frame(0x8, b"\x03\xe8", mask=os.urandom(4)))
        except OSError:
            pass
        self.sock.close()


class _SocketReader:
    """File-like ``read(n)`` over a socket with a carry-over buffer."""

    def __init__(self, sock: socket.socket, buffer: bytes):
        self.sock = sock
        self.buffer = buffer

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def amp_call(path: str, command: bytes, timeout: float = 30.0, **arguments: bytes) -> dict:
    """One synchronous AMP request over the control socket; the answer (or error) box.

    Used for cleanup only, where the CLI's start-up time would be pure overhead; everything
    under test goes through the real CLI.
    """

    def encode(box: dict[bytes, bytes]) -> bytes:
        out = bytearray()
        for key, value in box.items():
            out += len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
        return bytes(out + b"\x00\x00")

    box = {b"_command": command, b"_ask": b"1"}
    box.update({k.encode(): v for k, v in arguments.items()})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(encode(box))
        reader = _SocketReader(s, b"")
        answer: dict[bytes, bytes] = {}
        while True:
            size = int.from_bytes(reader.read(2), "big")
            if size == 0:
                return answer
            key = reader.read(size)
            value = reader.read(int.from_bytes(reader.read(2), "big"))
            answer[key] = value


# -- test case base -------------------------------------------------------------------------

_SHARED: dict[str, ProxyProcess] = {}
# Shared proxies kept running by one test process, the most recently used.  Trial (also with
# -j) runs a process's tests in suite order, so a class's tests come together and an earlier
# class's proxy is seldom needed again; kept until exit, the twenty-odd of a process took
# ~65 MB each, three times that with two workers, and the machine ran out of memory.
SHARED_PROXIES_KEPT = 2


def shared_proxy(key: str, **kwargs: Any) -> ProxyProcess:
    """A proxy shared by the tests of one class (started on first use, stopped when other
    classes' proxies push it out, or at exit).

    Trial has no class-level fixtures; start-up costs about a second, so classes whose tests
    do not interfere (distinct services and hosts) share one process.  A dead one is replaced.
    """
    proxy = _SHARED.pop(key, None)
    if proxy is not None and proxy.alive():
        _SHARED[key] = proxy  # now the most recently used
        return proxy
    if proxy is not None:
        proxy.cleanup()
    while len(_SHARED) >= SHARED_PROXIES_KEPT:
        _SHARED.pop(next(iter(_SHARED))).cleanup()
    proxy = ProxyProcess(**kwargs)
    try:
        proxy.start()
    except BaseException:
        proxy.cleanup()
        raise
    _SHARED[key] = proxy
    return proxy


_SHARED_UPSTREAMS: dict[str, UpstreamProcess] = {}


def shared_upstream(name: str) -> UpstreamProcess:
    """A plain upstream answering ``name``, shared by every test that only reads from it."""
    up = _SHARED_UPSTREAMS.get(name)
    if up is None or not up.alive():
        up = UpstreamProcess(name)
        _SHARED_UPSTREAMS[name] = up
    return up


@atexit.register
def _stop_shared() -> None:
    for proxy in _SHARED.values():
        proxy.cleanup()
    _SHARED.clear()
    for up in _SHARED_UPSTREAMS.values():
        up.stop()
    _SHARED_UPSTREAMS.clear()


def _release_quietly(upstream: UpstreamProcess, gate: str) -> None:
    if upstream.alive():
        try:
            upstream.release(gate, 1000)
        except (OSError, AssertionError):
            pass


class SigtermOnStartMixin:
    """Sends SIGTERM from the stdout reader the instant ``Server started`` arrives, as a
    process manager may: the server must stop gracefully, not die of the signal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signalled = threading.Event()

    def _on_stdout(self, line: str) -> None:
        if not self.signalled.is_set() and '"Server started"' in line:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.signalled.set()
        super()._on_stdout(line)


class SigtermWhenStarted(SigtermOnStartMixin, ProxyProcess):
    pass


class IntegrationTestCase(unittest.TestCase):
    """Base class: helpers that start things and register their cleanup."""

    # Subclasses that set this share one proxy process per class (with metrics on a port of
    # its own, ``self.proxy.metrics_port``, if ``metrics``).
    shared: bool = False
    proxy_args: tuple[str, ...] = ()
    metrics: bool = False

    def setUp(self) -> None:
        timings = os.environ.get("KAMAL_PROXY_IT_TIMINGS")
        if timings:
            started = time.monotonic()

            def record() -> None:
                with open(timings, "a") as f:
                    f.write(f"{time.monotonic() - started:7.2f} {self.id()}\n")

            self.addCleanup(record)
        if self.shared:
            self.proxy = shared_proxy(
                type(self).__qualname__, extra_args=self.proxy_args, metrics=self.metrics
            )
            self.proxy.log_mark()

    def start_proxy(self, *extra_args: str, **kwargs: Any) -> ProxyProcess:
        proxy = ProxyProcess(extra_args, **kwargs)
        self.addCleanup(proxy.cleanup)
        proxy.start()
        return proxy

    def upstream(self, name: str, *args: str, port: int = 0) -> UpstreamProcess:
        up = UpstreamProcess(name, *args, port=port)
        self.addCleanup(up.stop)
        return up

    def deploy(self, service: str, *targets_and_args: str, proxy: ProxyProcess | None = None):
        """``deploy SERVICE --target T1 --target T2 ARGS...``: the leading arguments up to the
        first flag are targets.  The service is removed again at cleanup."""
        proxy = proxy or self.proxy
        args = ["deploy", service]
        items = list(targets_and_args)
        while items and not items[0].startswith("-"):
            args += ["--target", items.pop(0)]
        proxy.cli_ok(*args, *items)
        self.remove_later(service, proxy)

    def gate(self, upstream: UpstreamProcess, name: str = "gate") -> str:
        """A fresh gate name on ``upstream`` (``/hold?gate=G``, ``/stream?gate=G`` ...), released
        at cleanup so that nothing stays held after the test."""
        gate = f"{name}-{uuid.uuid4().hex[:12]}"
        self.addCleanup(_release_quietly, upstream, gate)
        return gate

    def remove_later(self, service: str, proxy: ProxyProcess | None = None) -> None:
        """Remove ``service`` at cleanup (whether or not it exists by then)."""
        self.addCleanup(self._quiet_remove, proxy or self.proxy, service)

    @staticmethod
    def _quiet_remove(proxy: ProxyProcess, service: str) -> None:
        """Cleanup only: a direct AMP ``Remove`` (no CLI start-up cost); errors ignored."""
        if proxy.alive():
            try:
                amp_call(proxy.socket_path, b"Remove", service=service.encode())
            except OSError:
                pass

    def get(self, host: str, path: str = "/", proxy: ProxyProcess | None = None, **kw) -> Response:
        return (proxy or self.proxy).request("GET", path, host=host, **kw)

    def assertServes(self, host: str, body: str, path: str = "/", proxy=None) -> Response:
        resp = self.get(host, path, proxy=proxy)
        self.assertEqual((resp.status, resp.text), (200, body), f"{host}{path}: {resp!r}")
        return resp

    def assertNotFound(self, host: str, path: str = "/", proxy=None) -> Response:
        resp = self.get(host, path, proxy=proxy)
        self.assertEqual(resp.status, 404, f"{host}{path}: {resp!r}")
        return resp

    def assertTakes(self, low: float, high: float, elapsed: float, what: str = "") -> None:
        self.assertTrue(
            low <= elapsed <= high, f"{what} took {elapsed:.2f}s, not in [{low}, {high}]"
        )
