"""``--workers N``: a main process and N workers behave as one server (issue "Every core
serves").  These tests pin the worker count themselves, whatever ``KAMAL_PROXY_IT_WORKERS``
says; the rest of the suite runs once with 1 and once with 2 (``make test``)."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.integration.support import (
    IT_WORKERS,
    PROCESS_TIMEOUT,
    IntegrationTestCase,
    ProxyProcess,
    _stop_pid,
    eventually,
    http_request,
    port_open,
)
from tests.integration.test_twistd import TwistdProxyProcess
from tests.integration.traffic_support import Background


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _when(record: dict) -> float:
    return datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()


class Load:
    """``threads`` clients sending ``path`` on a new connection each, until stopped; every
    request is kept as (started, ended, status or error text)."""

    def __init__(self, port: int, path: str, threads: int = 4, host: str = "load.test"):
        self.port = port
        self.path = path
        self.host = host
        self.results: list[tuple[float, float, object]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def started_after(self, moment: float) -> int:
        """How many requests started after ``moment`` have ended."""
        with self._lock:
            return sum(1 for started, _, _ in self.results if started > moment)

    def _run(self) -> None:
        deadline = time.monotonic() + 3 * PROCESS_TIMEOUT
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                outcome: object = http_request(
                    self.port, "GET", self.path, host=self.host, timeout=10
                ).text
            except OSError as e:
                outcome = f"error: {e!r}"
            except Exception as e:  # noqa: BLE001 - http.client's own errors count as failures
                outcome = f"error: {e!r}"
            with self._lock:
                self.results.append((started, time.monotonic(), outcome))

    def stop(self) -> list[tuple[float, float, object]]:
        self._stop.set()
        for t in self._threads:
            t.join(20)
        with self._lock:
            return list(self.results)


class WorkersTests(IntegrationTestCase):
    def start_workers(self, count: int = 2, **kwargs) -> ProxyProcess:
        env = {"KAMAL_PROXY_WORKERS": str(count), **kwargs.pop("env", {})}
        return self.start_proxy(env=env, **kwargs)

    def worker_pids(self, proxy: ProxyProcess) -> list[int]:
        serving = {r["worker"]: r["pid"] for r in proxy.logs("Worker serving")}
        return [serving[i] for i in sorted(serving)]

    def test_one_worker_is_one_process(self):
        proxy = self.start_workers(1)
        self.assertEqual(_children(proxy.proc.pid), [])
        self.assertEqual(proxy.logs("Worker started"), [])
        up = self.upstream("single")
        self.deploy("single", up.addr, proxy=proxy)
        self.assertEqual(proxy.request("GET", "/").text, "single")

    def test_n_workers_serve_and_main_keeps_the_state(self):
        proxy = self.start_workers(2)
        pids = self.worker_pids(proxy)
        self.assertEqual(len(pids), 2)
        self.assertEqual(sorted(_children(proxy.proc.pid)), sorted(pids))
        up = self.upstream("many")
        self.deploy("many", up.addr, "--host", "many.test", proxy=proxy)
        # New connections land on either worker; every one of them has the route.
        for _ in range(20):
            self.assertEqual(self.get("many.test", proxy=proxy).text, "many")
        self.assertIn("many", open(proxy.state_path).read())

    def test_killed_worker_is_replaced_and_only_its_requests_fail(self):
        """Issue acceptance: SIGKILL one worker under continuous load and redeploy meanwhile."""
        proxy = self.start_workers(2)
        v1, v2 = self.upstream("v1"), self.upstream("v2")
        self.deploy("load", v1.addr, "--host", "load.test", proxy=proxy)
        victim, survivor = self.worker_pids(proxy)
        mark = proxy.log_mark()

        load = Load(proxy.http_port, "/slow?ms=200")
        eventually(lambda: load.started_after(0) >= 8, timeout=PROCESS_TIMEOUT)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # Dead once it is a zombie or gone: its sockets are closed from then on.
        eventually(lambda: not _alive(victim), timeout=PROCESS_TIMEOUT)
        dead_at = time.monotonic()
        proxy.cli_ok("deploy", "load", "--target", v2.addr, "--host", "load.test")
        deployed_at = time.monotonic()
        replacement = proxy.wait_for_log("Worker serving", timeout=PROCESS_TIMEOUT, since=mark)
        serving_at = time.monotonic()
        # Some requests that started once the replacement served have been answered.
        eventually(lambda: load.started_after(serving_at) >= 8, timeout=PROCESS_TIMEOUT)
        results = load.stop()

        exited = proxy.wait_for_log("Worker exited", since=mark, pid=victim)
        started = proxy.wait_for_log("Worker started", since=mark, worker=exited["worker"])
        # Respawned at once, as the main process logs it, not after the crash-loop backoff
        # (up to MAX_RESPAWN_DELAY, 5 s).
        self.assertLess(_when(started) - _when(exited), 2.5, (exited, started))
        self.assertNotIn(replacement["pid"], (victim, survivor))
        self.assertTrue(_alive(survivor), "the other worker must keep serving")

        failures = [r for r in results if str(r[2]).startswith("error")]
        # Only requests in flight when the worker died may fail: at most one per client,
        # each started before it was dead; everything started later was answered.
        self.assertLessEqual(len(failures), 4, failures)
        for started_at, ended_at, outcome in failures:
            self.assertLess(started_at, dead_at, outcome)
            self.assertGreater(ended_at, killed_at, outcome)
        later = [r for r in results if r[0] > dead_at]
        self.assertGreater(len(later), 10)
        self.assertEqual({r[2] for r in later} - {"v1", "v2"}, set(), later)
        self.assertEqual({r[2] for r in later if r[0] > deployed_at}, {"v2"})
        # The replacement has the redeploy too: whichever worker answers, it is v2.
        for _ in range(20):
            self.assertEqual(self.get("load.test", proxy=proxy).text, "v2")
        self.assertEqual(proxy.bad_lines, [])
        rows = proxy.list_rows()
        self.assertEqual([r[3] for r in rows if r[0] == "load"], [v2.addr])

    def test_sigterm_drains_every_worker(self):
        proxy = self.start_workers(2)
        up = self.upstream("drain")
        self.deploy("drain", up.addr, "--host", "drain.test", proxy=proxy)
        pids = self.worker_pids(proxy)
        # Enough held requests that both workers carry some (connections spread over them).
        gate = self.gate(up)
        slow = [
            Background(
                lambda: self.get("drain.test", f"/hold?gate={gate}", proxy=proxy, timeout=120)
            )
            for _ in range(6)
        ]
        up.wait_arrived(gate, 6)
        os.kill(proxy.proc.pid, signal.SIGTERM)
        # Stopping (the port no longer accepts) while the upstream holds all six.
        eventually(lambda: not port_open(proxy.http_port), timeout=PROCESS_TIMEOUT)
        self.assertTrue(proxy.alive(), "exited with requests in flight")
        self.assertFalse(any(call.done() for call in slow), "a request ended with the stop")
        up.release(gate)
        for call in slow:
            resp = call.result(PROCESS_TIMEOUT)
            self.assertEqual((resp.status, resp.text), (200, "drain"))
        code = proxy.exit_status()
        self.assertEqual(code, 0, proxy.describe())
        proxy.wait_for_log("Server stopped")
        self.assertEqual(proxy.logs("Closing active connections"), [], proxy.describe())
        for pid in pids:
            eventually(lambda pid=pid: not _alive(pid), timeout=PROCESS_TIMEOUT)
        refused = socket.socket()
        self.addCleanup(refused.close)
        self.assertNotEqual(refused.connect_ex(("127.0.0.1", proxy.http_port)), 0)

    def test_request_lines_never_interleave(self):
        """Long request lines (about 3.5 KB) from two workers into a stdout pipe that is read
        slowly, so that it is often full: every line arrives whole."""
        proxy = ProxyProcess(env={"KAMAL_PROXY_WORKERS": "2"})
        self.addCleanup(proxy.cleanup)
        proc = subprocess.Popen(
            proxy.command() + proxy.run_args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=proxy.env,
            cwd=proxy.root,
        )
        self.addCleanup(proc.stdout.close)
        self.addCleanup(_stop_pid, proc, signal.SIGTERM, 15)
        received = bytearray()
        reading = threading.Event()

        def slow_reader() -> None:
            fd = proc.stdout.fileno()
            while True:
                chunk = os.read(fd, 700)
                if not chunk:
                    break
                received.extend(chunk)
                if reading.is_set():
                    time.sleep(0.002)

        reader = threading.Thread(target=slow_reader, daemon=True)
        reader.start()
        eventually(lambda: b'"Server started"' in received, timeout=PROCESS_TIMEOUT)
        up = self.upstream("lines")
        proxy.cli_ok("deploy", "lines", "--target", up.addr, "--log-request-header", "X-Big")
        big = "b" * 3000
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                for _ in range(n):
                    resp = http_request(proxy.http_port, "GET", "/", headers={"X-Big": big})
                    assert resp.status == 200, resp
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        reading.set()
        threads = [threading.Thread(target=client, args=(40,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        self.assertEqual(errors, [])
        reading.clear()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(PROCESS_TIMEOUT)
        reader.join(10)
        records, bad = [], []
        for line in bytes(received).decode("utf-8", "replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                bad.append(line[:200])
        self.assertEqual(bad, [])
        lines = [r for r in records if r.get("msg") == "Request" and r.get("service") == "lines"]
        self.assertEqual(len(lines), 320)
        self.assertEqual({r["req_x_big"] for r in lines}, {big})

    def test_metrics_are_summed_over_workers(self):
        proxy = self.start_workers(2, metrics=True)
        metrics_port = proxy.metrics_port
        up = self.upstream("counted")
        self.deploy("counted", up.addr, "--host", "counted.test", proxy=proxy)
        for _ in range(30):
            self.assertEqual(self.get("counted.test", proxy=proxy).status, 200)
        # Each request is counted by the worker that served it; the scrape shows the sum.
        line = 'kamal_proxy_http_requests_total{method="GET",service="counted",status="200"}'

        def count() -> float:
            text = http_request(metrics_port, "GET", "/metrics").text
            values = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
            return values[0] if values else 0.0

        # A scrape counts a worker that is slow to answer (2 s) by its last report: ask again.
        eventually(lambda: count() == 30.0, timeout=PROCESS_TIMEOUT)
        # process_* add up too: the open descriptors are more than the main process's own.
        text = http_request(metrics_port, "GET", "/metrics").text
        fds = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("process_open_fds")]
        self.assertGreater(fds[0], len(os.listdir(f"/proc/{proxy.proc.pid}/fd")) + 5)
        # Every request logged once, by the worker that served it.
        eventually(lambda: len(proxy.logs("Request", service="counted")) == 30)


class TwistdPrivilegesTests(IntegrationTestCase):
    """Issue 12 §2: ``twistd -u/-g`` as root opens the ports before the switch and creates
    the data directory as the target user."""

    def test_ports_before_and_data_dir_after_the_switch(self):
        if os.getuid() != 0:
            self.skipTest("needs root")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            self.skipTest("twistd is not installed beside this Python")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            self.skipTest("no user nobody")
        port = _free_privileged_port()
        # Workers are started after the switch, so the interpreter must be one nobody may run
        # (it is not when Python lives under a private home, as on some build machines).
        workers = IT_WORKERS if _runnable_by_others(sys.executable) else 1
        proxy = _TwistdAs(
            nobody.pw_uid,
            nobody.pw_gid,
            http_port=port,
            env={"KAMAL_PROXY_WORKERS": str(workers)},
        )
        self.addCleanup(proxy.cleanup)
        for path in (proxy.root, proxy.home, proxy.socket_dir):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        # The code must be readable by nobody: run from an installed tree we can reach.
        proxy.start()
        up = self.upstream("privileged")
        self.deploy("web", up.addr, proxy=proxy)
        self.assertEqual(proxy.request("GET", "/").text, "privileged")
        self.assertEqual(proxy.logs("Failed to restore saved state"), [])
        self.assertEqual(os.stat(proxy.data_dir).st_uid, nobody.pw_uid)
        self.assertEqual(os.stat(proxy.state_path).st_uid, nobody.pw_uid)
        self.assertEqual(os.stat(proxy.socket_path).st_uid, nobody.pw_uid)
        with open(f"/proc/{proxy.proc.pid}/status") as f:
            uids = [line.split()[1:] for line in f if line.startswith("Uid:")][0]
        self.assertEqual(set(uids), {str(nobody.pw_uid)})


class _TwistdAs(TwistdProxyProcess):
    def __init__(self, uid: int, gid: int, **kwargs):
        super().__init__(**kwargs)
        self.uid, self.gid = uid, gid

    def command(self) -> list[str]:
        base = super().command()
        return [base[0], "-u", str(self.uid), "-g", str(self.gid), *base[1:]]


def _runnable_by_others(path: str) -> bool:
    real = os.path.realpath(path)
    if not os.stat(real).st_mode & 0o001:
        return False
    directory = os.path.dirname(real)
    while True:
        if not os.stat(directory).st_mode & 0o001:
            return False
        parent = os.path.dirname(directory)
        if parent == directory:
            return True
        directory = parent


def _free_privileged_port() -> int:
    for port in range(900, 1000):
        with socket.socket(socket.AF_INET6) as s:
            try:
                s.bind(("::", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")
