"""Issue 12 §3: on a terminal, ``deploy`` shows what it waits for; anywhere else, nothing new.

The real CLI runs against the real server with its stderr on a pseudo-terminal (the pty
module), and once more with pipes, which Kamal and scripts use.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import threading
import time

from tests.integration.support import (
    IntegrationTestCase,
    _die_with_parent,
    _stop_pid,
    proxy_command,
)


class TerminalRun:
    """``kamal-proxy ARGS`` with stderr on a pseudo-terminal (200 columns) and stdout on a
    pipe; what the terminal shows is collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.master = master
        self.shown = b""
        self._cond = threading.Condition()
        try:
            self.proc = subprocess.Popen(
                proxy_command() + args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=slave,
                env=env,
                cwd=cwd,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the CLI closed its end
                data = b""
            with self._cond:
                if not data:
                    self._cond.notify_all()
                    return
                self.shown += data
                self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return self.shown.decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the terminal shows ``text`` while the command still runs."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while text.encode() not in self.shown:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"terminal never showed {text!r}:\n{self.text()!r}")
                self._cond.wait(min(remaining, 0.1))
        if self.proc.poll() is not None:
            raise AssertionError(f"{text!r} came only after the command ended: {self.text()!r}")

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """Exit code, stdout, and everything the terminal showed."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_pid(self.proc, signal.SIGKILL, 5)
            raise AssertionError(f"the CLI did not finish: {self.text()!r}") from None
        self._reader.join(5)
        os.close(self.master)
        return self.proc.returncode, out.decode(), self.text()

    def close(self) -> None:
        if self.proc.poll() is None:
            _stop_pid(self.proc, signal.SIGKILL, 5)
            self.finish(5)


class DeployProgressTests(IntegrationTestCase):
    def terminal(self, proxy, *args: str) -> TerminalRun:
        run = TerminalRun(list(args), proxy.env, proxy.root)
        self.addCleanup(run.close)
        return run

    def test_terminal_shows_health_checks_then_the_drain(self):
        proxy = self.start_proxy()
        old = self.upstream("old")
        self.deploy("web", old.addr, proxy=proxy)
        # An unhealthy new target, and a slow request on the old one to drain.
        new = self.upstream("new", "--health-status", "503")
        slow: list = []
        request = threading.Thread(
            target=lambda: slow.append(proxy.request("GET", "/slow?ms=2500", timeout=20))
        )
        request.start()
        self.addCleanup(request.join, 20)
        run = self.terminal(
            proxy,
            "deploy",
            "web",
            "--target",
            new.addr,
            "--health-check-interval",
            "100ms",
            "--drain-timeout",
            "20s",
        )
        run.wait_for(f"{new.addr} not healthy yet: check 2 failed (unexpected status (503))")
        new.set_health(status=200)
        run.wait_for(f"{new.addr} healthy after")
        run.wait_for(f"Draining {old.addr} (at most 20s)")
        code, out, shown = run.finish()
        self.assertEqual((code, out), (0, ""))
        self.assertRegex(shown, rf"Drained {old.addr} in \d+\.\ds\r\n$")
        request.join(20)
        self.assertEqual(slow[0].status, 200)
        self.assertEqual(slow[0].text, "old")

    def test_terminal_failure_keeps_the_error_line(self):
        proxy = self.start_proxy()
        new = self.upstream("never", "--health-status", "503")
        run = self.terminal(
            proxy,
            "rollout",
            "deploy",
            "nothing",
            "--target",
            new.addr,
            "--deploy-timeout",
            "1s",
        )
        code, out, shown = run.finish()
        # No such service: the server says so at once, with no progress.
        self.assertEqual((code, out, shown), (1, "", "Error: service not found\r\n"))
        run = self.terminal(proxy, "deploy", "web", "--target", new.addr, "--deploy-timeout", "1s")
        code, out, shown = run.finish()
        self.assertEqual((code, out), (1, ""))
        self.assertIn("not healthy yet: check 1 failed (unexpected status (503))", shown)
        self.assertTrue(
            shown.endswith(
                "(unexpected status (503))\r\n"
                "Error: target failed to become healthy within configured timeout (1s)\r\n"
            ),
            repr(shown),
        )

    def test_pipes_get_nothing_new(self):
        """Kamal's view: exit codes, an empty stdout, stderr only the Error: line."""
        proxy = self.start_proxy()
        old = self.upstream("old")
        self.deploy("web", old.addr, proxy=proxy)
        new = self.upstream("new", "--unhealthy-for", "0.5")
        result = proxy.cli(
            "deploy", "web", "--target", new.addr, "--health-check-interval", "100ms"
        )
        self.assertEqual(tuple(result), (0, "", ""))
        never = self.upstream("never", "--health-status", "503")
        result = proxy.cli("deploy", "web", "--target", never.addr, "--deploy-timeout", "500ms")
        self.assertEqual(
            tuple(result),
            (1, "", "Error: target failed to become healthy within configured timeout (500ms)\n"),
        )
