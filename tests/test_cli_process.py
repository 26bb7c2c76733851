"""The ``kamal-proxy`` client as the operator runs it: a process that starts fast (imports only
what the command needs) and that Ctrl-C ends at once, as killed by SIGINT."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from kamal_proxy.control import wire
from tests.test_cli import FakeControlServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("twisted", "OpenSSL", "cryptography", "zope", "prometheus_client", "acme", "treq")


def imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


class ImportTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kp-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "kp.sock")

    async def run_cli(self, *args: str) -> tuple[str, str, int]:
        env = {
            "HOME": self.dir,
            "KAMAL_PROXY_SOCKET": self.path,
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": REPO,
        }
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-X", "importtime", "-m", "kamal_proxy.cli", *args], env=env, path=REPO
        )
        return out.decode(), err.decode(), code

    async def test_list_does_not_import_twisted(self):
        received: list = []
        port = reactor.listenUNIX(
            self.path, Factory.forProtocol(lambda: FakeControlServer(received))
        )
        self.addCleanup(port.stopListening)
        out, err, code = await self.run_cli("list")
        self.assertEqual(code, 0, err)
        self.assertIn("localhost:3000", out)
        self.assertEqual(received, [("list", {})])
        modules = imported(err)
        self.assertIn("kamal_proxy.control.client", modules)
        self.assertEqual(heavy(modules), [])

    async def test_deploy_and_remove_do_not_import_twisted(self):
        received: list = []
        port = reactor.listenUNIX(
            self.path, Factory.forProtocol(lambda: FakeControlServer(received))
        )
        self.addCleanup(port.stopListening)
        for args in (["deploy", "app", "--target", "web:3000"], ["remove", "missing"]):
            out, err, code = await self.run_cli(*args)
            self.assertIn("kamal_proxy.control.client", imported(err))
            self.assertEqual(heavy(imported(err)), [], args)
        self.assertEqual([name for name, _ in received], ["deploy", "remove"])
        self.assertIn("Error: service not found", err)

    async def test_help_and_flag_errors_import_no_client(self):
        not_needed = {"socket", "json", "kamal_proxy.control", "kamal_proxy.control.client"}
        for args in (["--help"], ["deploy", "--help"], ["deploy", "--bogus"], ["list", "x"]):
            out, err, code = await self.run_cli(*args)
            modules = imported(err)
            self.assertIn("kamal_proxy.cli.main", modules)
            self.assertEqual(heavy(modules), [], args)
            self.assertEqual(sorted(modules & not_needed), [], args)


class InterruptTests(unittest.TestCase):
    """A client waiting for the server, interrupted as a terminal's Ctrl-C would."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kp-int-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "kp.sock")
        # A server that takes the request and never answers, like a deploy that waits.
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.server.close)
        self.server.bind(self.path)
        self.server.listen(1)
        self.server.settimeout(60)  # the CLI's start-up, on a loaded machine

    def start_waiting_deploy(self, sigint: str) -> tuple[subprocess.Popen, socket.socket]:
        """Start ``deploy`` with SIGINT as the shell left it, and return once it waits."""
        launcher = (
            f"import runpy, signal; signal.signal(signal.SIGINT, signal.{sigint}); "
            "runpy.run_module('kamal_proxy.cli', run_name='__main__')"
        )
        env = {**os.environ, "HOME": self.dir, "KAMAL_PROXY_SOCKET": self.path, "PYTHONPATH": REPO}
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, "deploy", "app", "--target", "web:3000"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(self.stop, proc)
        connection, _ = self.server.accept()
        self.addCleanup(connection.close)
        connection.settimeout(60)
        reader = wire.BoxReader()
        boxes: list = []
        while not boxes:
            data = connection.recv(65536)
            self.assertTrue(data, "the CLI hung up before sending its request")
            boxes = reader.feed(data)
        self.assertEqual(boxes[0][wire.COMMAND], b"Deploy")
        return proc, connection

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)

    def test_ctrl_c_kills_at_once_without_traceback(self):
        proc, _connection = self.start_waiting_deploy("default_int_handler")
        proc.send_signal(signal.SIGINT)
        # Killed by the signal while the server still holds the request: a client that went on
        # waiting would never end (communicate's bound), one that handled it would exit 1.
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, -signal.SIGINT)
        self.assertEqual((out, err), (b"", b""))

    def test_an_ignored_sigint_stays_ignored(self):
        # A background job of a script: the shell made it ignore Ctrl-C, so it keeps waiting.
        proc, connection = self.start_waiting_deploy("SIG_IGN")
        proc.send_signal(signal.SIGINT)
        with self.assertRaises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        connection.close()
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(err, b"Error: unexpected EOF\n")
