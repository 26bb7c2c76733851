"""The example walk-through with local processes instead of Docker.

Starts ``kamal-proxy run`` and two versions of ``app/app.py`` on loopback ports, then deploys
v1, switches to v2 under continuous traffic, pauses, stops with a message, resumes and removes
the service, printing what each step shows and checking it.  Exits 1 at the first surprise.

    python3 example/walkthrough.py [--kamal-proxy PATH]

Everything it starts is stopped (by PID) when it ends; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Walkthrough:
    def __init__(self, kamal_proxy: str) -> None:
        self.kamal_proxy = kamal_proxy
        self.tmp = tempfile.mkdtemp(prefix="kamal-proxy-example-")
        self.env = dict(os.environ, HOME=self.tmp, KAMAL_PROXY_SOCKET=f"{self.tmp}/kp.sock")
        self.env.pop("XDG_RUNTIME_DIR", None)
        self.http_port = free_port()
        self.processes: list[subprocess.Popen] = []

    # -- processes --------------------------------------------------------

    def start(self, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
        proc = subprocess.Popen(
            args,
            env=self.env,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.processes.append(proc)
        return proc

    def start_app(self, version: str) -> int:
        proc = self.start(
            sys.executable,
            str(HERE / "app" / "app.py"),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--version",
            version,
        )
        line = proc.stdout.readline().split()
        return int(line[1])

    def start_proxy(self) -> None:
        # Its JSON log goes to a file: an unread pipe would fill up and stall the proxy.
        with open(f"{self.tmp}/proxy.log", "w") as log:
            self.start(
                self.kamal_proxy,
                "run",
                "--http-port",
                str(self.http_port),
                "--https-port",
                str(free_port()),
                stdout=log,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.kp("list", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit("kamal-proxy did not start")

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- talking to it ----------------------------------------------------

    def kp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.kamal_proxy, *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise SystemExit(f"kamal-proxy {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def get(self, path: str = "/") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def expect(self, step: str, status: int, text: str, path: str = "/") -> None:
        got_status, body = self.get(path)
        shown = body.strip().splitlines()[0] if body.strip() else ""
        print(f"{step:<34} -> {got_status} {shown[:60]}")
        if got_status != status or text not in body:
            raise SystemExit(f"{step}: expected {status} containing {text!r}, got {got_status}")

    # -- the story ----------------------------------------------------------

    def run(self) -> None:
        v1 = self.start_app("v1")
        v2 = self.start_app("v2")
        self.start_proxy()

        self.kp("deploy", "web", "--target", f"127.0.0.1:{v1}")
        self.expect("deploy v1", 200, "Hello from v1")

        failures: list[str] = []
        answers: set[str] = set()
        done = threading.Event()

        def traffic() -> None:
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    status, body = self.get()
                except OSError as e:
                    failures.append(repr(e))
                    continue
                if status != 200:
                    failures.append(str(status))
                answers.add(body.strip())

        thread = threading.Thread(target=traffic)
        thread.start()
        time.sleep(0.3)
        self.kp("deploy", "web", "--target", f"127.0.0.1:{v2}")
        time.sleep(0.3)
        done.set()
        thread.join()
        print(
            f"{'switch to v2 under traffic':<34} -> {len(failures)} failed, saw {sorted(answers)}"
        )
        if failures:
            raise SystemExit(f"requests failed during the switch: {failures[:5]}")
        self.expect("after the switch", 200, "Hello from v2")

        self.kp("pause", "web", "--max-pause", "10s")
        timer = threading.Timer(1.0, lambda: self.kp("resume", "web"))
        timer.start()
        started = time.monotonic()
        self.expect("paused (held until resume)", 200, "Hello from v2")
        timer.join()
        waited = time.monotonic() - started
        print(f"{'  held for':<34} -> {waited:.1f}s")
        if waited < 0.5:
            raise SystemExit("the paused request was not held")

        self.kp("stop", "web", "--message", "Back in 5 minutes")
        self.expect("stopped with a message", 503, "Back in 5 minutes")
        self.kp("resume", "web")
        self.expect("resumed", 200, "Hello from v2")
        self.kp("remove", "web")
        self.expect("removed", 404, "Not Found")
        print("walk-through complete")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = shutil.which("kamal-proxy") or str(Path(sys.executable).parent / "kamal-proxy")
    parser.add_argument("--kamal-proxy", default=default, help="the kamal-proxy command")
    args = parser.parse_args()
    walk = Walkthrough(args.kamal_proxy)
    try:
        walk.run()
    finally:
        walk.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
