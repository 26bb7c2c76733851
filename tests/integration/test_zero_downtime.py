"""The headline guarantee: redeploys under load lose no request (SPEC §1, §13; scenario 150)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from tests.integration.support import HttpClient, IntegrationTestCase, http_request, pattern_bytes

HOST = "zero.example.com"
HARD_LIMIT = 60.0  # no worker outlives this, whatever the main thread does


class Traffic:
    """Client threads that hammer the proxy and record every failure.

    Kinds: keep-alive GETs, fresh-connection GETs, 300ms slow requests, POSTs whose body hash
    is verified by the upstream, and streaming / big downloads verified byte for byte.
    """

    def __init__(self, port: int, allowed: set[str]):
        self.port = port
        self.allowed = allowed  # upstream names that may answer (the caller adds new ones)
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.stop = threading.Event()
        self.deadline = time.monotonic() + HARD_LIMIT
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(name, fn), name=name, daemon=True)
            for name, fn in (
                ("keepalive", self._keepalive),
                ("keepalive2", self._keepalive),
                ("fresh", self._fresh),
                ("slow", self._slow),
                ("post", self._post),
                ("stream", self._stream),
            )
        ]

    def start(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def wait_for_progress(self, timeout: float = 20.0) -> None:
        """Return once every client thread has finished one more request than now (so that
        the next deploy happens under all kinds of traffic, however slow the machine)."""
        with self.lock:
            before = dict(self.counts)
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                behind = [
                    t.name
                    for t in self.threads
                    if self.counts.get(t.name, 0) <= before.get(t.name, 0)
                ]
            if not behind:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"no request of {behind} finished within {timeout}s")
            time.sleep(0.02)

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def _run(self, name, fn) -> None:
        client = HttpClient(self.port, host=HOST, timeout=15)
        i = 0
        try:
            while self.running():
                i += 1
                try:
                    problem = fn(client, i)
                except Exception as e:  # noqa: BLE001 - every exception is a failed request
                    problem = f"{type(e).__name__}: {e}"
                    client.close()
                with self.lock:
                    self.counts[name] = self.counts.get(name, 0) + 1
                    if problem:
                        self.failures.append(f"{name}#{i}: {problem}")
        finally:
            client.close()

    def _check(self, resp, body=None) -> str | None:
        if resp.status != 200:
            return f"status {resp.status}: {resp.body[:200]!r}"
        name = resp.header("X-Upstream-Name")
        if name not in self.allowed:
            return f"answered by {name!r}"
        if body is not None and resp.body != body:
            return f"body {resp.body[:100]!r} != {body[:100]!r}"
        return None

    def _keepalive(self, client, i):
        resp = client.request("GET", f"/?i={i}")
        problem = self._check(resp)
        if not problem and resp.text not in self.allowed:
            problem = f"body {resp.text!r}"
        return problem

    def _fresh(self, client, i):
        resp = http_request(self.port, "GET", "/", host=HOST, timeout=15)
        return self._check(resp) or (None if resp.text in self.allowed else f"body {resp.text!r}")

    def _slow(self, client, i):
        return self._check(client.request("GET", "/slow?ms=300"))

    def _post(self, client, i):
        body = os.urandom(16 * 1024 + i)
        resp = client.request("POST", "/upload", body=body)
        problem = self._check(resp)
        if problem:
            return problem
        info = resp.json()
        if info["length"] != len(body) or info["sha256"] != hashlib.sha256(body).hexdigest():
            return f"upload mangled: {info}"
        return None

    def _stream(self, client, i):
        if i % 2:
            expected = b"".join(b"chunk %d\n" % n for n in range(4))
            return self._check(client.request("GET", "/stream?chunks=4&ms=40"), expected)
        size = 512 * 1024
        return self._check(client.request("GET", f"/big?bytes={size}"), pattern_bytes(size))


class ZeroDowntimeTests(IntegrationTestCase):
    def assertNoFailures(self, traffic: Traffic) -> None:
        self.assertEqual(traffic.failures[:20], [], f"{len(traffic.failures)} failed requests")
        for t in traffic.threads:
            self.assertFalse(t.is_alive(), "client thread did not stop")
        for kind in ("keepalive", "fresh", "slow", "post", "stream"):
            self.assertGreater(traffic.counts.get(kind, 0), 2, traffic.counts)

    def test_alternating_deploys_lose_nothing(self):
        """Six deploys back and forth between two versions under load: zero failures."""
        proxy = self.start_proxy()
        v1, v2 = self.upstream("v1"), self.upstream("v2")
        self.deploy("zd", v1.addr, "--host", HOST, proxy=proxy)
        observer = HttpClient(proxy.http_port, host=HOST)
        self.addCleanup(observer.close)
        traffic = Traffic(proxy.http_port, {"v1", "v2"}).start()
        self.addCleanup(traffic.finish)
        traffic.wait_for_progress()
        for i in range(6):
            up = v2 if i % 2 == 0 else v1
            proxy.cli_ok("deploy", "zd", "--target", up.addr, "--host", HOST)
            resp = observer.request("GET", "/")
            self.assertEqual(resp.text, up.name, "keep-alive client did not see the new target")
            traffic.wait_for_progress()
        traffic.finish()
        self.assertNoFailures(traffic)
        self.assertTrue(proxy.alive())

    def test_old_upstream_stopped_after_each_deploy(self):
        """Five new versions in a row, each old process killed as soon as deploy returns."""
        proxy = self.start_proxy()
        current = self.upstream("v1")
        self.deploy("zd", current.addr, "--host", HOST, proxy=proxy)
        allowed = {"v1"}
        observer = HttpClient(proxy.http_port, host=HOST)
        self.addCleanup(observer.close)
        traffic = Traffic(proxy.http_port, allowed).start()
        self.addCleanup(traffic.finish)
        traffic.wait_for_progress()
        for n in range(2, 7):
            new = self.upstream(f"v{n}")
            allowed.add(new.name)
            proxy.cli_ok("deploy", "zd", "--target", new.addr, "--host", HOST)
            current.stop()
            current = new
            resp = observer.request("GET", "/")
            self.assertEqual(resp.text, new.name, "keep-alive client did not see the new target")
            traffic.wait_for_progress()
        traffic.finish()
        self.assertNoFailures(traffic)
        self.assertTrue(proxy.alive())
