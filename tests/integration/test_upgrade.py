"""``kamal-proxy upgrade`` and SIGUSR2 against the real processes (issue 10).

Every server here is an :class:`~tests.integration.upgrade_support.UpgradableProxy`: started
from a script that stands for the installed code, so a test can break the installation and
mend it.  ``KAMAL_PROXY_IT_WORKERS`` applies as everywhere (one process, or a main process and
workers).
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time

from twisted.trial import unittest

from tests.integration.pebble import (
    PebbleServer,
    cert_pem,
    key_pem,
    make_ca,
    make_leaf,
    pebble_available,
)
from tests.integration.support import IT_WORKERS, IntegrationTestCase, http_request, run_cli
from tests.integration.upgrade_support import (
    GOOD_INSTALL,
    MixedLoad,
    UpgradableProxy,
    pid_alive,
    wait_pid_gone,
)

WEB = "web.example.com"
WS = "ws.example.com"
TLS = "secure.example.com"

BROKEN_INSTALLS = [
    (
        'raise ImportError("simulated broken install")\n',
        "new process exited with status 1 before serving: ImportError: simulated broken install",
    ),
    (
        "import sys\nsys.argv.append('--no-such-flag')\n" + GOOD_INSTALL,
        "new process exited with status 1 before serving: unknown flag: --no-such-flag",
    ),
    (
        "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
        "new process was killed by signal 11 (SIGSEGV) before serving",
    ),
]


class UpgradeTestCase(IntegrationTestCase):
    def start_upgradable(self, *args: str, **kwargs) -> UpgradableProxy:
        proxy = UpgradableProxy(args, **kwargs)
        self.addCleanup(proxy.cleanup)
        proxy.start()
        return proxy

    def read_state(self, proxy: UpgradableProxy) -> bytes:
        with open(proxy.state_path, "rb") as f:
            return f.read()

    def assertServedBy(self, proxy, host: str, name: str) -> None:
        response = http_request(proxy.http_port, "GET", "/", host=host, timeout=10)
        self.assertEqual((response.status, response.text), (200, name))


class FailedStartTests(UpgradeTestCase):
    def test_a_broken_new_process_leaves_the_old_one_serving(self):
        """Import error, bad option, crash: ``upgrade`` exits 1 with the reason, the old
        process serves on as if nothing happened (no request lost, same state), and the next
        upgrade, with the installation mended, works."""
        proxy = self.start_upgradable()
        blue = self.upstream("blue")
        self.deploy("web", blue.addr, "--host", WEB, proxy=proxy)
        load = MixedLoad(proxy.http_port, {"blue"}, WEB, only={"keepalive", "fresh"}).start()
        self.addCleanup(load.finish)
        state = self.read_state(proxy)
        listed = proxy.list_rows()
        first = proxy.pid

        for text, reason in BROKEN_INSTALLS:
            proxy.install(text)
            mark = proxy.log_mark()
            result = proxy.cli("upgrade")
            self.assertEqual(
                (result.code, result.out, result.err), (1, "", f"Error: {reason}\n"), result
            )
            # The would-be successor is gone; the old process is the server, unchanged.
            started = proxy.wait_for_log("Started the new process", since=mark)["pid"]
            wait_pid_gone(started, 15)
            self.assertEqual(proxy.pid, first)
            self.assertTrue(pid_alive(first))
            self.assertEqual(proxy.list_rows(), listed)
            self.assertEqual(self.read_state(proxy), state)
            self.assertServedBy(proxy, WEB, "blue")

        proxy.install(GOOD_INSTALL)
        new = proxy.upgrade()
        self.assertNotEqual(new, first)
        wait_pid_gone(first, 15)
        self.assertEqual(proxy.list_rows(), listed)
        self.assertEqual(self.read_state(proxy), state)
        self.assertServedBy(proxy, WEB, "blue")
        # The new server answers commands, and upgrades again.
        green = self.upstream("green")
        load.allowed.add("green")
        self.deploy("web", green.addr, "--host", WEB, proxy=proxy)
        self.assertServedBy(proxy, WEB, "green")
        proxy.upgrade()
        self.assertServedBy(proxy, WEB, "green")

        out = load.finish()
        self.assertEqual(out.failures, [])
        self.assertEqual(out.refused, 0)
        self.assertGreater(out.ok.get("fresh", 0), 10)


class ControlSocketTests(UpgradeTestCase):
    def test_commands_during_an_upgrade_neither_fail_nor_reach_the_old_process(self):
        """A deploy in progress is let finish before the state is handed over; a command sent
        meanwhile waits in the socket's backlog and is answered by the new process."""
        proxy = self.start_upgradable()
        slow = self.upstream("slow", "--unhealthy-for", "2")
        fast = self.upstream("fast")
        results: dict[str, object] = {}

        def run(name: str, *args: str) -> threading.Thread:
            def target() -> None:
                results[name] = run_cli(*args, env=proxy.env, timeout=90)

            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            return thread

        mark = proxy.log_mark()
        first = proxy.pid
        threads = [run("slow", "deploy", "slow", "--target", slow.addr, "--host", "slow.test")]
        proxy.wait_for_log("Deploying", since=mark, service="slow")
        threads.append(run("upgrade", "upgrade"))
        proxy.wait_for_log("Upgrading", since=mark)
        threads.append(run("fast", "deploy", "fast", "--target", fast.addr, "--host", "fast.test"))
        threads.append(run("list", "list"))
        for thread in threads:
            thread.join(120)
        for name in ("slow", "upgrade", "fast", "list"):
            self.assertEqual(results[name].code, 0, f"{name}: {results[name]!r}")
        self.remove_later("slow", proxy)
        self.remove_later("fast", proxy)

        records = proxy.logs(since=mark)
        messages = [(r["msg"], r.get("service")) for r in records]
        took_over = messages.index(("Took over from the old process", None))
        # The slow deploy finished in the old process before the new one started ...
        self.assertLess(
            messages.index(("Deployed", "slow")), messages.index(("Started the new process", None))
        )
        # ... and the command sent during the upgrade reached only the new process.
        self.assertGreater(messages.index(("Deploying", "fast")), took_over)
        self.assertEqual(messages.count(("Deploying", "fast")), 1)
        new = proxy.wait_for_log("Upgraded", since=mark)["pid"]
        proxy.pids.append(new)
        self.assertNotEqual(new, first)
        rows = {row[0]: row for row in proxy.list_rows()[1:]}
        self.assertEqual(sorted(rows), ["fast", "slow"])
        self.assertServedBy(proxy, "fast.test", "fast")
        self.assertServedBy(proxy, "slow.test", "slow")
        wait_pid_gone(first, 15)


class NotifySocket:
    """A stand-in for systemd's notification socket: records (sender pid, message)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []

    def receive(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                4096, socket.CMSG_SPACE(struct.calcsize("3i"))
            )
            pid = 0
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", value[: struct.calcsize("3i")])[0]
            self.messages.append((pid, data.decode()))

    def wait_for(self, message: str, timeout: float = 10.0) -> int:
        """The pid that sent ``message`` (waiting for it, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            for pid, text in self.messages:
                if message in text.split("\n"):
                    return pid
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {message!r} within {timeout}s: {self.messages}")
            self.receive(0.1)

    def close(self) -> None:
        self.sock.close()


class SystemdTests(UpgradeTestCase):
    def test_ready_then_main_pid_moves_to_the_new_process(self):
        """``Type=notify``: READY=1 from the server; at an upgrade the old process names the
        new one (MAINPID=) before it exits; the new one reports its own stop.  No worker and
        no process of an upgrade speaks before it is the server."""
        proxy = UpgradableProxy()
        notify = NotifySocket(proxy.root)
        self.addCleanup(notify.close)
        proxy.extra_env["NOTIFY_SOCKET"] = notify.path
        self.addCleanup(proxy.cleanup)
        proxy.start()
        first = proxy.pid
        self.assertEqual(notify.wait_for("READY=1"), first)

        new = proxy.upgrade()
        self.assertEqual(notify.wait_for(f"MAINPID={new}"), first)
        wait_pid_gone(first, 15)
        notify.receive(0.3)
        self.assertEqual(proxy.stop(), 0)
        self.assertEqual(notify.wait_for("STOPPING=1"), new)
        notify.receive(0.2)
        self.assertEqual(
            notify.messages,
            [(first, "READY=1"), (first, f"MAINPID={new}"), (new, "STOPPING=1")],
        )


class TwistdTests(UpgradeTestCase):
    def setUp(self):
        super().setUp()
        self.twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(self.twistd):
            raise unittest.SkipTest("twistd is not installed beside this Python")

    def test_pid_file_follows_the_new_process_on_sigusr2_and_upgrade(self):
        twistd = self.twistd

        class TwistdProxy(UpgradableProxy):
            def command(self) -> list[str]:
                return [
                    sys.executable,
                    twistd,
                    "-n",
                    f"--pidfile={self.pidfile}",
                    "--logger",
                    "kamal_proxy.observe.log.twistd_observer",
                ]

            def run_args(self) -> list[str]:
                return ["kamal-proxy", *super().run_args()[1:]]

            @property
            def pidfile(self) -> str:
                return os.path.join(self.root, "twistd.pid")

        proxy = TwistdProxy()
        self.addCleanup(proxy.cleanup)
        proxy.start()
        up = self.upstream("plugin")
        self.deploy("web", up.addr, "--host", WEB, proxy=proxy)

        def pidfile() -> int:
            with open(proxy.pidfile) as f:
                return int(f.read())

        first = proxy.pid
        self.assertEqual(pidfile(), first)

        # A process manager's way: the signal.
        mark = proxy.log_mark()
        os.kill(first, signal.SIGUSR2)
        second = proxy.wait_for_log("Upgraded", timeout=60, since=mark, old_pid=first)["pid"]
        proxy.pids.append(second)
        self.assertEqual(wait_pid_gone(first, 15), 0)
        self.assertEqual(pidfile(), second)
        self.assertServedBy(proxy, WEB, "plugin")

        # The command, from the new process: the pid file follows again.
        third = proxy.upgrade()
        wait_pid_gone(second, 15)
        self.assertEqual(pidfile(), third)
        self.assertServedBy(proxy, WEB, "plugin")
        self.assertEqual(proxy.bad_lines, [])

        # The last one removes the pid file when it stops, as twistd does.
        os.kill(third, signal.SIGTERM)
        self.assertIn(wait_pid_gone(third, 15), (0, -signal.SIGTERM))
        self.assertFalse(os.path.exists(proxy.pidfile))


class StaticCertificate:
    """A CA and a certificate for ``TLS`` in ``directory``."""

    def __init__(self, directory: str) -> None:
        ca_key, ca = make_ca("Upgrade test CA")
        key, cert = make_leaf(ca_key, ca, [TLS])
        self.ca_path = os.path.join(directory, "ca.pem")
        self.cert_path = os.path.join(directory, "cert.pem")
        self.key_path = os.path.join(directory, "key.pem")
        for path, data in (
            (self.ca_path, cert_pem(ca)),
            (self.cert_path, cert_pem(cert)),
            (self.key_path, key_pem(key)),
        ):
            with open(path, "wb") as f:
                f.write(data)


class UnderLoadTests(UpgradeTestCase):
    UPGRADES = 5
    DRAIN = 5.0  # --drain-timeout of each upgrade: slow requests take at most 3 s

    def test_five_upgrades_under_mixed_load(self):
        """Issue 10's test: keep-alive and new-connection GETs, 1-3 s requests, 5 MiB uploads
        and downloads, HTTPS and a WebSocket through five upgrades, with deploys before and
        after each: no failed request, no refused connection, the WebSocket closed cleanly at
        the drain bound of the process it was on, the state and ``list`` unchanged by each
        upgrade, the same certificate throughout."""
        proxy = self.start_upgradable()
        cert = StaticCertificate(proxy.root)
        blue, green = self.upstream("blue"), self.upstream("green")
        echo, secure = self.upstream("ws"), self.upstream("secure")
        self.deploy("web", blue.addr, "--host", WEB, "--drain-timeout", "10s", proxy=proxy)
        self.deploy("ws", echo.addr, "--host", WS, proxy=proxy)
        self.deploy(
            "secure",
            secure.addr,
            "--host",
            TLS,
            "--tls",
            "--tls-certificate-path",
            cert.cert_path,
            "--tls-private-key-path",
            cert.key_path,
            proxy=proxy,
        )
        load = MixedLoad(
            proxy.http_port,
            {"blue", "green"},
            WEB,
            ws_host=WS,
            https_port=proxy.https_port,
            tls_host=TLS,
            ca_file=cert.ca_path,
        ).start()
        self.addCleanup(load.finish)
        load.wait_each_served()  # every kind of request went through before the first upgrade

        targets = [green, blue]
        commits = []
        timings = []
        for n in range(self.UPGRADES):
            # A deploy before the upgrade ...
            up = targets[n % 2]
            self.deploy("web", up.addr, "--host", WEB, "--drain-timeout", "10s", proxy=proxy)
            self.assertServedBy(proxy, WEB, up.name)
            state, listed = self.read_state(proxy), proxy.list_rows()
            old = proxy.pid
            started = time.monotonic()
            proxy.upgrade("--drain-timeout", f"{self.DRAIN:g}s")
            commits.append(time.monotonic())
            timings.append(commits[-1] - started)
            # ... the same state and list after it ...
            self.assertEqual(self.read_state(proxy), state, f"upgrade {n + 1}")
            self.assertEqual(proxy.list_rows(), listed, f"upgrade {n + 1}")
            self.assertTrue(pid_alive(proxy.pid))
            # ... and a deploy after it, on the new process.
            up = targets[(n + 1) % 2]
            self.deploy("web", up.addr, "--host", WEB, "--drain-timeout", "10s", proxy=proxy)
            self.assertServedBy(proxy, WEB, up.name)
            self.assertNotEqual(proxy.pid, old)

        # The last old process reaches its bound (its WebSocket closes) and exits; then every
        # kind of request goes through the last new one before the load stops.
        for pid in proxy.pids[:-1]:
            wait_pid_gone(pid, self.DRAIN + 15)
        load.wait_each_served()
        out = load.finish()

        summary = (
            f"\n  {self.UPGRADES} upgrades ({IT_WORKERS} worker(s)) in "
            f"{', '.join(f'{t:.2f}' for t in timings)} s; requests {out.ok}; "
            f"stale keep-alive retries {out.stale_retries}; WebSocket echoes {out.ws_echoes}, "
            f"closes {[how for _, _, how in out.ws_closes]}"
        )
        print(summary)
        self.assertEqual(out.failures[:20], [], f"{len(out.failures)} failures{summary}")
        self.assertEqual(out.refused, 0)
        for kind in ("keepalive", "fresh", "slow", "upload", "download", "https"):
            self.assertGreater(out.ok.get(kind, 0), 0, kind)
        self.assertGreater(out.ws_echoes, 50)
        self.assertEqual(len(out.certificates), 1, out.certificates)
        # The WebSocket ended only cleanly (EOF between frames), and only at the drain bound of
        # the process it was on: DRAIN seconds after the commit of the upgrade that replaced
        # it (the first one after it opened, or the next, for one opened while both served).
        self.assertIn(len(out.ws_closes), range(1, self.UPGRADES + 1))
        for opened, closed, how in out.ws_closes:
            self.assertEqual(how, "eof")
            replaced = [c for c in commits if c > opened - 1.0][:2]
            self.assertTrue(
                any(self.DRAIN - 0.5 <= closed - c <= self.DRAIN + 4.0 for c in replaced),
                f"WebSocket opened at {opened:.2f} closed at {closed:.2f}; commits {commits}",
            )


class AcmeTests(UpgradeTestCase):
    def setUp(self):
        super().setUp()
        if not pebble_available():
            raise unittest.SkipTest("pebble is not installed (apt-get install pebble)")

    def test_certificates_and_account_carry_over_without_a_new_order(self):
        """A certificate issued over ACME (Pebble) is served by the new process as it is: no
        new order, no new account, the same certificate on the first handshake."""
        proxy = UpgradableProxy()
        self.addCleanup(proxy.cleanup)
        # No bad-nonce rejections (Pebble's default 5 %): a retried POST would count as an
        # order of its own.
        pebble = PebbleServer(proxy.http_port, env={"PEBBLE_WFE_NONCEREJECT": "0"})
        self.addCleanup(pebble.cleanup)
        pebble.start()
        proxy.extra_args = ["--acme-directory", pebble.directory_url]
        proxy.extra_args += ["--acme-ca-bundle", pebble.ca_path]
        proxy.start()
        root = pebble.root_pem().decode()
        up = self.upstream("acme")
        self.deploy("secure", up.addr, "--host", TLS, "--tls", proxy=proxy)

        def served() -> str:
            context = ssl.create_default_context(cadata=root)
            with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=30) as raw:
                with context.wrap_socket(raw, server_hostname=TLS) as tls:
                    return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()

        before = served()
        self.assertEqual(pebble.orders(), 1)
        ca_log = len(pebble.log())
        mark = proxy.log_mark()
        first = proxy.pid
        proxy.upgrade()
        wait_pid_gone(first, 15)
        self.assertEqual(served(), before)
        # The new process checked its certificates at start: nothing was due.
        self.assertEqual(proxy.logs("ACME: obtaining certificate", since=mark), [])
        # Nothing at all was asked of the CA: no account, no order, no nonce.
        self.assertNotIn("POST /", pebble.log()[ca_log:])
        self.assertEqual(pebble.orders(), 1)
