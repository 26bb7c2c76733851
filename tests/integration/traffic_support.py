"""Helpers for the traffic-control end-to-end tests (pause/stop, rollout, readers, buffering,
error pages, logs and metrics; SPEC §8.2-§18).

Everything under test still goes through the real ``kamal-proxy run`` process and the real CLI
(``tests/integration/support.py``); this module only adds reference computations (FNV-1a, Go's
template escaping), bounded background requests and a few assertions shared by the files.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.integration.support import (
    IntegrationTestCase,
    ProxyProcess,
    Response,
    UpstreamProcess,
    http_request,
    shared_upstream,
)

__all__ = [
    "Background",
    "TrafficTestCase",
    "shared_upstream",
    "fnv1a32",
    "go_escape",
    "in_flight",
    "in_group",
    "spill_files",
    "split_point",
    "wait_in_flight",
]

BUILTIN_TITLES = {
    404: "404 \u2014 Not Found",
    413: "413 \u2014 Content Too Large",
    502: "502 \u2014 Bad Gateway",
    503: "503 \u2014 Service Temporarily Unavailable",
    504: "504 \u2014 Gateway Timeout",
}
DEFAULT_503_TEXT = "<strong>The service is temporarily unavailable.</strong>"


def fnv1a32(data: bytes) -> int:
    """Reference 32-bit FNV-1a (SPEC §12.3), written independently of the product."""
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) % (1 << 32)
    return h


def split_point(percentage: int) -> float:
    return 4294967295.0 * (percentage / 100.0)


def in_group(value: str, percentage: int, allowlist: tuple[str, ...] = ()) -> bool:
    if not value:
        return False
    if value in allowlist:
        return True
    return float(fnv1a32(value.encode())) <= split_point(percentage)


_GO_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&#34;",
    "'": "&#39;",
    "+": "&#43;",
    "\x00": "\ufffd",
}


def go_escape(text: str) -> str:
    """Go ``html/template`` text-context escaping of the stop message (SPEC §11.3)."""
    return "".join(_GO_ESCAPES.get(c, c) for c in text)


def spill_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("proxy-buffer-"))


class Background:
    """One blocking call in a daemon thread; ``result()`` waits bounded and re-raises."""

    def __init__(self, fn: Callable[[], Any]):
        self.value: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._done = threading.Event()

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in result()
                self.error = e
            finally:
                self.finished_at = time.monotonic()
                self._done.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started

    def result(self, timeout: float = 15.0) -> Any:
        if not self._done.wait(timeout):
            raise AssertionError(f"background call did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value


def parse_set_cookie(value: str) -> tuple[str, str, dict[str, str]]:
    parts = [p.strip() for p in value.split(";")]
    name, _, val = parts[0].partition("=")
    attrs = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        attrs[k.lower()] = v
    return name, val, attrs


def raw_request_head(port: int, head: bytes, timeout: float = 5.0) -> socket.socket:
    """Open a connection and send ``head`` only (the caller sends the body pieces)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(head)
    return s


def read_response(sock: socket.socket, timeout: float = 10.0) -> http.client.HTTPResponse:
    sock.settimeout(timeout)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format samples as ``{(name, frozenset(labels.items())): value}``."""
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise AssertionError(f"unparseable metrics line {line!r}")
        labels = frozenset(_LABEL.findall(m.group(3) or ""))
        samples[(m.group(1), labels)] = float(m.group(4))
    return samples


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def in_flight(metrics_port: int, service: str) -> float | None:
    """The proxy's ``kamal_proxy_http_in_flight_requests`` gauge for ``service`` (None before
    its first request)."""
    resp = http_request(metrics_port, "GET", "/metrics")
    return sample(parse_metrics(resp.text), "kamal_proxy_http_in_flight_requests", service=service)


def wait_in_flight(metrics_port: int, service: str, count: int, timeout: float = 10.0) -> None:
    """Return once the proxy counts ``count`` requests in flight for ``service``: the signal
    that requests it holds (a pause) have arrived, where no upstream sees them."""
    deadline = time.monotonic() + timeout
    while True:
        value = in_flight(metrics_port, service)
        if value == count:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{service}: {value} requests in flight, not {count}, after {timeout}s"
            )
        time.sleep(0.02)


class TrafficTestCase(IntegrationTestCase):
    """Shared helpers for the traffic-control test files."""

    def cli_error(self, proxy: ProxyProcess, *args: str) -> str:
        """Run a command that must fail: exit 1, only an ``Error: …`` line; returns that line."""
        result = proxy.cli(*args)
        self.assertEqual(result.code, 1, f"{args}: {result!r}")
        lines = [ln for ln in result.err.splitlines() if ln.strip()]
        self.assertTrue(lines, f"{args}: no error output: {result!r}")
        self.assertEqual(result.out, "", f"{args}: unexpected stdout")
        return lines[0]

    def upstream(self, name: str, *args: str, port: int = 0) -> UpstreamProcess:
        """A private upstream (stopped at cleanup)."""
        if port:
            args = (*args, "--port", str(port))
        up = UpstreamProcess(name, *args)
        self.addCleanup(up.stop)
        return up

    def background(self, fn: Callable[[], Any]) -> Background:
        return Background(fn)

    def bg_request(self, proxy: ProxyProcess, method: str, path: str, **kw: Any) -> Background:
        kw.setdefault("timeout", 120)
        return Background(lambda: http_request(proxy.http_port, method, path, **kw))

    def assertErrorPage(self, resp: Response, status: int, *texts: str) -> None:
        self.assertEqual(resp.status, status, repr(resp))
        self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8", repr(resp))
        if status in BUILTIN_TITLES:
            self.assertIn(f"<title>{BUILTIN_TITLES[status]}</title>", resp.text)
        for text in texts:
            self.assertIn(text, resp.text)

    def state_service(self, proxy: ProxyProcess, name: str) -> dict:
        import json

        with open(proxy.state_path, encoding="utf-8") as f:
            for obj in json.load(f):
                if obj["name"] == name:
                    return obj
        raise AssertionError(f"service {name!r} not in the state file")

    def list_state(self, proxy: ProxyProcess, name: str) -> list[str]:
        for row in proxy.list_rows()[1:]:
            if row[0] == name:
                return row
        raise AssertionError(f"{name} not listed")
