"""Issue 10's figures: how fast ``kamal-proxy run`` serves its restored state, how fast an idle
proxy exits on SIGTERM, and what a steady load sees across a restart (SIGTERM + start, as a
process manager restarts it) and across ``kamal-proxy upgrade``.

    .venv/bin/python bench/restart.py [--services 5] [--starts 7] [--rate 600] [--json FILE]

Everything runs on 127.0.0.1 in a temporary home; every process started here is stopped by its
PID.  The kamal-proxy is the one beside the Python that runs this script (``--kamal-cmd``).

* start: from just before ``exec`` to (1) ``READY=1`` on a ``NOTIFY_SOCKET`` the script owns
  and (2) the first answer of the last restored service through the HTTP port (polled every
  2 ms); with ``--workers 1`` and with the default workers.  The state (``--services``
  services, each with its own origin) was saved by an earlier run.
* stop: from SIGTERM of an idle proxy to its exit (``waitpid``).
* load: ``--rate`` requests/s from client threads, half on fresh connections, half on
  keep-alive ones (a request on a reused connection that the server closed before answering
  is sent again on a new one, as HTTP clients do, and counted as ``retried``); ``refused``
  are refused connections, ``failed`` requests that got no answer or not the origin's; the
  window is from the first to the last refused/failed request.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_subreaper() -> None:
    """Upgraded servers are children of the old one; once it exits they are ours to reap."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = tempfile.mkdtemp(prefix="kp-restart-")
        self.socket_path = os.path.join(self.home, "kp.sock")
        self.http_port = free_port()
        self.https_port = free_port()
        self.origins: list[subprocess.Popen] = []
        self.proxies: list[subprocess.Popen] = []
        self.other_pids: set[int] = set()
        self.kamal = args.kamal_cmd or [
            os.path.join(os.path.dirname(sys.executable), "kamal-proxy")
        ]
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path = os.path.join(self.home, "notify.sock")
        self.notify.bind(self.notify_path)
        self.log = open(os.path.join(self.home, "proxy.log"), "ab")  # noqa: SIM115

    # -- processes -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAMAL_PROXY_")}
        env.update(HOME=self.home, KAMAL_PROXY_SOCKET=self.socket_path, NO_PROXY="*")
        env["NOTIFY_SOCKET"] = self.notify_path
        return env

    def start_origins(self, count: int) -> list[int]:
        ports = []
        for i in range(count):
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.upstream_app", f"app{i}"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            self.origins.append(proc)
            line = proc.stdout.readline().decode()
            ports.append(int(line.split()[1]))
        return ports

    def run_command(self, workers: int) -> list[str]:
        return [
            *self.kamal,
            "run",
            "--http-port",
            str(self.http_port),
            "--https-port",
            str(self.https_port),
            "--workers",
            str(workers),
        ]

    def start_proxy(self, workers: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            self.run_command(workers), env=self.env(), stdout=self.log, stderr=self.log
        )
        self.proxies.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self.kamal, *args],
            env=self.env(),
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, pid: int, timeout: float = 30) -> float:
        """SIGTERM ``pid`` and wait for it; the seconds it took."""
        start = time.perf_counter()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return time.perf_counter() - start
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RuntimeError(f"pid {pid} did not exit within {timeout} s of SIGTERM")

    def drain_notify(self) -> None:
        self.notify.setblocking(False)
        try:
            while True:
                self.notify.recv(4096)
        except BlockingIOError:
            pass

    def wait_ready(self, timeout: float = 30) -> float:
        """Seconds until READY=1 arrives on the notify socket."""
        self.notify.settimeout(timeout)
        start = time.perf_counter()
        while True:
            message = self.notify.recv(4096)
            if b"READY=1" in message.split(b"\n"):
                return time.perf_counter() - start

    def wait_serving(self, host: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if probe(self.http_port, host) == 200:
                return
            time.sleep(0.002)
        raise RuntimeError(f"{host} not served within {timeout} s")

    def cleanup(self) -> None:
        for proc in [*self.proxies, *self.origins]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for pid in list(self.other_pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in [*self.proxies, *self.origins]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in list(self.other_pids):
            reap(pid, 10)
        self.log.close()
        self.notify.close()
        shutil.rmtree(self.home, ignore_errors=True)

    # -- the measurements --------------------------------------------------------------------

    def deploy_state(self, ports: list[int]) -> list[str]:
        proxy = self.start_proxy(1)
        self.drain_notify()
        self.wait_ready()
        hosts = []
        for i, port in enumerate(ports):
            host = f"app{i}.example"
            self.cli("deploy", f"app{i}", "--target", f"127.0.0.1:{port}", "--host", host)
            hosts.append(host)
        self.stop(proxy.pid)
        return hosts

    def timed_start(self, workers: int, hosts: list[str]) -> tuple[subprocess.Popen, float, float]:
        self.drain_notify()
        self.notify.setblocking(True)
        exec_at = time.perf_counter()
        proc = self.start_proxy(workers)
        self.notify.settimeout(30)
        while b"READY=1" not in self.notify.recv(4096).split(b"\n"):
            pass
        ready = time.perf_counter() - exec_at
        self.wait_serving(hosts[-1])
        return proc, ready, time.perf_counter() - exec_at

    def start_figures(self, workers: int, hosts: list[str]) -> dict[str, Any]:
        ready, serving, stops = [], [], []
        for _ in range(self.args.starts):
            proc, r, s = self.timed_start(workers, hosts)
            ready.append(r)
            serving.append(s)
            time.sleep(0.5)  # idle: nothing in flight
            stops.append(self.stop(proc.pid))
        return {
            "workers": workers,
            "exec_to_ready_s": ready,
            "exec_to_serving_s": serving,
            "idle_sigterm_to_exit_s": stops,
            "median_exec_to_ready_s": statistics.median(ready),
            "median_exec_to_serving_s": statistics.median(serving),
            "median_idle_sigterm_to_exit_s": statistics.median(stops),
        }

    def under_load(self, workers: int, hosts: list[str], how: str) -> dict[str, Any]:
        proc, _, _ = self.timed_start(workers, hosts)
        load = Load(self.http_port, hosts, self.args.rate)
        load.start()
        time.sleep(self.args.before)
        began = time.perf_counter()
        if how == "restart":
            self.stop(proc.pid)
            proc, _, _ = self.timed_start(workers, hosts)
            pid = proc.pid
        else:
            self.cli("upgrade", timeout=120)
            pid = self._serving_pid(proc.pid)
        done = time.perf_counter() - began
        time.sleep(self.args.after)
        result = load.finish()
        result.update(how=how, workers=workers, action_s=done)
        if how == "upgrade":
            reap(proc.pid, 30)
            self.other_pids.add(pid)
        self.stop(pid)
        self.other_pids.discard(pid)
        return result

    def _serving_pid(self, old: int) -> int:
        """The new server's pid, from the old one's ``Upgraded`` log line."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.log.flush()
            with open(os.path.join(self.home, "proxy.log"), "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("msg") == "Upgraded" and record.get("old_pid") == old:
                        return int(record["pid"])
            time.sleep(0.05)
        raise RuntimeError("no Upgraded record")


def reap(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.01)


def probe(port: int, host: str) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status
    except OSError:
        return None


class Load:
    """Paced GETs from threads: half on fresh connections, half on kept-alive ones."""

    THREADS = 8

    def __init__(self, port: int, hosts: list[str], rate: float) -> None:
        self.port = port
        self.hosts = hosts
        self.interval = self.THREADS / rate
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.counts = {"ok": 0, "failed": 0, "refused": 0, "retried": 0}
        self.bad: list[float] = []
        self.problems: dict[str, int] = {}
        self.threads = [
            threading.Thread(target=self.run, args=(i % 2 == 0, i), daemon=True)
            for i in range(self.THREADS)
        ]

    def start(self) -> None:
        self.began = time.perf_counter()
        for t in self.threads:
            t.start()

    def finish(self) -> dict[str, Any]:
        self.stopping.set()
        for t in self.threads:
            t.join(30)
        elapsed = time.perf_counter() - self.began
        total = sum(self.counts[k] for k in ("ok", "failed", "refused"))
        window = (max(self.bad) - min(self.bad)) if self.bad else 0.0
        return {
            **self.counts,
            "requests": total,
            "rate_per_s": total / elapsed,
            "window_s": window,
            "problems": self.problems,
        }

    def note(self, kind: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if kind in ("failed", "refused"):
                self.bad.append(time.perf_counter())
                if problem:
                    self.problems[problem] = self.problems.get(problem, 0) + 1

    def run(self, keepalive: bool, index: int) -> None:
        conn: http.client.HTTPConnection | None = None
        reused = False
        next_at = time.perf_counter() + index * self.interval / self.THREADS
        n = 0
        while not self.stopping.is_set():
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_at += self.interval
            host = self.hosts[n % len(self.hosts)]
            n += 1
            for attempt in (0, 1):
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    reused = False
                    try:
                        conn.connect()
                    except ConnectionRefusedError:
                        self.note("refused")
                        conn = None
                        break
                    except OSError as e:
                        self.note("failed", type(e).__name__)
                        conn = None
                        break
                try:
                    conn.request("GET", "/", headers={"Host": host})
                    resp = conn.getresponse()
                    body = resp.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                    conn.close()
                    conn = None
                    if reused and attempt == 0:  # closed while idle: send it again
                        self.note("retried")
                        continue
                    self.note("failed", type(e).__name__)
                    break
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = None
                    self.note("failed", type(e).__name__)
                    break
                if resp.status == 200 and body:
                    self.note("ok")
                else:
                    self.note("failed", f"status {resp.status}")
                if keepalive and not resp.will_close:
                    reused = True
                else:
                    conn.close()
                    conn = None
                break
        if conn is not None:
            conn.close()


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "load_avg_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=5)
    parser.add_argument("--starts", type=int, default=7)
    parser.add_argument("--rate", type=float, default=600)
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before")
    parser.add_argument("--after", type=float, default=4.0, help="seconds of load after")
    parser.add_argument("--rounds", type=int, default=3, help="restarts and upgrades each")
    parser.add_argument("--kamal-cmd", nargs="+")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args(argv)
    become_subreaper()
    bench = Bench(args)
    stop = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    results: dict[str, Any] = {
        "commit": commit(),
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "machine": machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": vars(args),
    }
    try:
        ports = bench.start_origins(args.services)
        hosts = bench.deploy_state(ports)
        default = len(os.sched_getaffinity(0))
        worker_counts = [1] if default <= 1 else [1, default]
        results["start"] = [bench.start_figures(w, hosts) for w in worker_counts]
        loads = []
        for w in worker_counts:
            for _ in range(args.rounds):
                for how in ("restart", "upgrade"):
                    loads.append(bench.under_load(w, hosts, how))
                    print(json.dumps(loads[-1]), flush=True)
        results["load"] = loads
    finally:
        bench.cleanup()
    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
