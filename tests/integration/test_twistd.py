"""``twistd -n kamal-proxy``: the same server as ``kamal-proxy run``, through the plugin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.integration.support import (
    PROCESS_TIMEOUT,
    IntegrationTestCase,
    ProxyProcess,
    SigtermOnStartMixin,
    eventually,
)


class TwistdProxyProcess(ProxyProcess):
    """Started with twistd and the JSON log observer, so the harness reads the same lines."""

    def command(self) -> list[str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return [twistd, "-n", "--pidfile=", "--logger", "kamal_proxy.observe.log.twistd_observer"]

    def run_args(self) -> list[str]:
        return ["kamal-proxy", *super().run_args()[1:]]


class TwistdSigtermWhenStarted(SigtermOnStartMixin, TwistdProxyProcess):
    pass


class TwistdPluginTests(IntegrationTestCase):
    def setUp(self):
        super().setUp()
        if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "twistd")):
            self.skipTest("twistd is not installed beside this Python")

    def test_plugin_serves_deploys_and_stops(self):
        proxy = TwistdProxyProcess()
        self.addCleanup(proxy.cleanup)
        proxy.start()
        proxy.wait_for_log("Server started", http=proxy.http_port, https=proxy.https_port)
        up = self.upstream("plugin")
        self.deploy("web", up.addr, proxy=proxy)
        resp = proxy.request("GET", "/")
        self.assertEqual((resp.status, resp.text), (200, "plugin"))
        proxy.wait_for_log("Request", status=200, service="web")
        self.assertEqual(proxy.bad_lines, [])
        # twistd re-raises the signal that stopped it, so its status is "killed by SIGTERM".
        self.assertIn(proxy.stop(signal.SIGTERM), (0, -signal.SIGTERM))
        proxy.wait_for_log("Server stopped")
        self.assertFalse(os.path.exists(proxy.socket_path))

    def test_sigterm_the_moment_it_is_started(self):
        """Under twistd too, ``Server started`` means SIGTERM is handled gracefully."""
        for _ in range(3):
            proxy = TwistdSigtermWhenStarted()
            self.addCleanup(proxy.cleanup)
            proxy.start(wait_ready=False)
            proxy.wait_for_log("Server started", timeout=PROCESS_TIMEOUT)
            self.assertTrue(proxy.signalled.wait(5))
            proxy.proc.wait(PROCESS_TIMEOUT)
            self.assertIn(proxy.stop(), (0, -signal.SIGTERM))
            proxy.wait_for_log("Server stopped")


class TwistdDaemon:
    """``twistd --logfile F --pidfile P kamal-proxy ...`` daemonised, as Twisted users run it;
    the daemon is found by its pid file and stopped by that PID."""

    def __init__(self, case, *extra: str) -> None:
        self.ports = ProxyProcess()  # a HOME, a control socket, free ports and the env
        case.addCleanup(self.ports.cleanup)
        self.logfile = os.path.join(self.ports.root, "twistd.log")
        self.pidfile = os.path.join(self.ports.root, "twistd.pid")
        self.pid: int | None = None
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        command = [
            twistd,
            "--logfile",
            self.logfile,
            "--pidfile",
            self.pidfile,
            "kamal-proxy",
            *self.ports.run_args()[1:],
            *extra,
        ]
        case.addCleanup(self.stop)
        # twistd returns once the daemon has started (or failed to).
        done = subprocess.run(
            command,
            env=self.ports.env,
            cwd=self.ports.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(f"twistd exited {done.returncode}: {done.stderr!r}")
        self.pid = int(eventually(lambda: _read(self.pidfile).strip(), timeout=PROCESS_TIMEOUT))
        self.wait_for("Server started: http=")

    @property
    def socket_path(self) -> str:
        return self.ports.socket_path

    def log(self) -> str:
        return _read(self.logfile)

    def wait_for(self, text: str, count: int = 1, timeout: float = PROCESS_TIMEOUT) -> str:
        eventually(lambda: self.log().count(text) >= count, timeout=timeout)
        return self.log()

    def running(self) -> bool:
        if self.pid is None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM by PID, a bounded wait, then SIGKILL."""
        if not self.running():
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            eventually(lambda: not self.running(), timeout=15)
        except AssertionError:
            os.kill(self.pid, signal.SIGKILL)
            eventually(lambda: not self.running(), timeout=5)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


class TwistdDaemonTests(IntegrationTestCase):
    """Issue 12 §2: daemonised, the request lines and every event go to twistd's log file,
    readable, without DEBUG unless asked and without a line per health check or CLI call."""

    def setUp(self):
        super().setUp()
        if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "twistd")):
            self.skipTest("twistd is not installed beside this Python")

    def test_daemon_logs_to_its_file(self):
        daemon = TwistdDaemon(self)
        one, two = self.upstream("one"), self.upstream("two")
        # Two targets are checked for ever (every 100 ms here).
        self.deploy(
            "web", one.addr, two.addr, "--health-check-interval", "100ms", proxy=daemon.ports
        )
        mark = len(daemon.log())
        for _ in range(3):
            self.assertEqual(daemon.ports.request("GET", "/").status, 200)
            daemon.ports.cli_ok("list")
        eventually(lambda: one.health_checks() + two.health_checks() >= 10, timeout=10)
        text = daemon.wait_for("Request: host=", count=3)
        requests = [line for line in text.splitlines() if "Request: host=" in line]
        self.assertEqual(len(requests), 3, text)
        for line in requests:
            self.assertRegex(
                line,
                rf"\[kamal_proxy#info\] Request: host=127\.0\.0\.1:{daemon.ports.http_port} "
                rf"port={daemon.ports.http_port} path=/ request_id=\S+ status=200 service=web "
                rf"target=127\.0\.0\.1:\d+ duration=\d+ method=GET ",
            )
        self.assertIn(
            f'Deploying: service=web targets=[{one.addr} {two.addr}] hosts=[""] paths=[/] '
            "tls=false",
            text,
        )
        self.assertNotIn("(('", text)  # no Python tuples
        self.assertNotIn("#debug]", text)
        later = text[mark:]
        for noise in ("Starting factory", "Stopping factory", "connection established"):
            self.assertNotIn(noise, later)
        daemon.stop()
        self.assertIn("Server stopped", daemon.log())
        self.assertFalse(os.path.exists(daemon.pidfile))

    def test_debug_lines_only_with_debug(self):
        daemon = TwistdDaemon(self, "--debug")
        up = self.upstream("debug")
        self.deploy("web", up.addr, proxy=daemon.ports)
        daemon.wait_for("[kamal_proxy#debug] Saved state: path=")
        daemon.stop()
