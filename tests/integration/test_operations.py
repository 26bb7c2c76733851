"""The running server as an operator meets it: its open-files limit, and the directories it
creates in a fresh HOME."""

from __future__ import annotations

import os
import resource
import socket
import stat
import sys
import threading

from tests.integration.support import IntegrationTestCase, ProxyProcess, proxy_command

# Starts the real kamal-proxy as a shell would after `umask 000; ulimit -Sn 256`.
LAUNCHER = (
    "import os, resource, sys; os.umask(0); "
    "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class ConstrainedProxy(ProxyProcess):
    def command(self) -> list[str]:
        command = proxy_command()
        if len(command) > 1:  # python -c ...: exec the interpreter itself
            return [sys.executable, "-c", LAUNCHER, sys.executable, *command[1:]]
        return [sys.executable, "-c", LAUNCHER, *command]


def open_files_limits(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no open files line in /proc/PID/limits")


class OperationsTests(IntegrationTestCase):
    def start_constrained(self) -> ConstrainedProxy:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY or hard <= 256:
            self.skipTest(f"needs a finite hard open-files limit above 256, not {hard}")
        if not os.path.exists("/proc/self/limits"):
            self.skipTest("reads the server's limits from /proc")
        proxy = ConstrainedProxy()
        self.addCleanup(proxy.cleanup)
        proxy.start()
        return proxy

    def test_soft_open_files_limit_is_raised_to_the_hard_one(self):
        proxy = self.start_constrained()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.assertEqual(open_files_limits(proxy.proc.pid), (str(hard), str(hard)))

    def test_directories_it_creates_are_private_even_under_umask_000(self):
        proxy = self.start_constrained()
        self.assertEqual(proxy.cli("list").code, 0)
        for level in (os.path.join(proxy.home, ".config"), proxy.data_dir):
            self.assertEqual(stat.S_IMODE(os.stat(level).st_mode), 0o700, level)


# `ulimit -n 256` for soft and hard limit alike: the server cannot raise it.
LOW_LIMIT_LAUNCHER = LAUNCHER.replace("(256, hard)", "(256, 256)")


class LowLimitProxy(ConstrainedProxy):
    def command(self) -> list[str]:
        return [part.replace(LAUNCHER, LOW_LIMIT_LAUNCHER) for part in super().command()]


class OpenFilesLimitTests(IntegrationTestCase):
    """Issue 12 §5: at the open-files limit a client gets an answer (503) or waits for room,
    never a silent close, and admitted clients keep a descriptor for their upstream (no 502).
    Before, with the same limit and clients: 288 × 502 and 12 closed with no answer."""

    CLIENTS = 400

    def test_clients_past_the_limit_get_answers_and_no_upstream_starves(self):
        if not os.path.exists("/proc/self/limits"):
            self.skipTest("reads the server's limits from /proc")
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < self.CLIENTS + 200:
            self.skipTest("this test process needs room for its own 400 sockets")
        proxy = LowLimitProxy()
        self.addCleanup(proxy.cleanup)
        proxy.start()
        self.assertEqual(open_files_limits(proxy.proc.pid), ("256", "256"))
        up = self.upstream("app")
        self.deploy("limited", up.addr, proxy=proxy)
        # Each request takes a second upstream, so the 400 cannot all be in flight at once.
        request = b"GET /slow?ms=1000 HTTP/1.1\r\nHost: limited.test\r\n\r\n"
        results: dict[int, str] = {}

        def client(i: int) -> None:
            try:
                with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=90) as s:
                    s.sendall(request)
                    answer = b""
                    while b"\r\n" not in answer:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        answer += chunk
            except OSError as e:
                results[i] = f"error {e}"
                return
            if answer.startswith(b"HTTP/1.1 "):
                results[i] = answer[9:12].decode()
            else:
                results[i] = f"no answer {answer[:40]!r}"

        threads = [
            threading.Thread(target=client, args=(i,), daemon=True) for i in range(self.CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertFalse([t for t in threads if t.is_alive()], "clients still waiting")
        statuses = sorted(results.values())
        unexpected = [s for s in statuses if s not in ("200", "503")]
        self.assertEqual(unexpected, [], f"answers other than 200 or 503: {unexpected[:10]}")
        self.assertEqual(len(statuses), self.CLIENTS)
        self.assertIn("200", statuses)
        self.assertTrue(proxy.alive())
        # With room again, the proxy serves as before.
        self.assertEqual(proxy.request("GET", "/", host="limited.test").status, 200)
