"""example/kamal-proxy.service: what the unit promises, and systemd's own verdict on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "example" / "kamal-proxy.service"
EXEC = "/opt/kamal-proxy/bin/kamal-proxy"


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key more than once."""
    out = []
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


class UnitTests(unittest.TestCase):
    def setUp(self):
        self.text = UNIT.read_text()
        self.service = {}
        self.environment = {}
        for section, key, value in directives(self.text):
            if section == "Service" and key == "Environment":
                name, _, val = value.partition("=")
                self.environment[name] = val
            elif section == "Service":
                self.service[key] = value

    def test_runs_the_proxy_as_its_own_user(self):
        self.assertEqual(self.service["ExecStart"], f"{EXEC} run")
        self.assertEqual(self.service["User"], "kamal-proxy")
        self.assertEqual(self.service["Group"], "kamal-proxy")

    def test_socket_in_the_runtime_directory(self):
        self.assertEqual(self.service["RuntimeDirectory"], "kamal-proxy")
        self.assertEqual(self.service["RuntimeDirectoryMode"], "0700")
        self.assertEqual(
            self.environment["KAMAL_PROXY_SOCKET"], "/run/kamal-proxy/kamal-proxy.sock"
        )

    def test_state_in_the_state_directory(self):
        self.assertEqual(self.service["StateDirectory"], "kamal-proxy")
        self.assertEqual(self.environment["HOME"], "/var/lib/kamal-proxy")

    def test_low_ports_without_root(self):
        self.assertEqual(self.service["AmbientCapabilities"], "CAP_NET_BIND_SERVICE")
        self.assertEqual(self.service["CapabilityBoundingSet"], "CAP_NET_BIND_SERVICE")
        self.assertEqual(self.service["NoNewPrivileges"], "true")

    def test_reload_upgrades_and_systemd_follows_the_new_process(self):
        # READY=1 when it serves; MAINPID= names the new process of an upgrade.
        self.assertEqual(self.service["Type"], "notify")
        self.assertEqual(self.service["NotifyAccess"], "main")
        self.assertEqual(self.service["ExecReload"], f"{EXEC} upgrade")
        # A reload is bounded by TimeoutStartSec: an upgrade may wait for commands in
        # progress (COMMANDS_TIMEOUT) and for the new process to serve (START_TIMEOUT).
        from kamal_proxy.process.upgrade import COMMANDS_TIMEOUT, START_TIMEOUT

        self.assertGreater(int(self.service["TimeoutStartSec"]), COMMANDS_TIMEOUT + START_TIMEOUT)

    def test_restarts_and_stops_gracefully(self):
        self.assertEqual(self.service["Restart"], "on-failure")
        self.assertEqual(self.service["KillSignal"], "SIGTERM")
        # Longer than the proxy's own 10 s drain, so systemd never has to SIGKILL it.
        self.assertGreater(int(self.service["TimeoutStopSec"]), 10)

    def test_systemd_analyze_verify(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed (apt-get install systemd)")
        # verify checks that ExecStart exists: point it at this install's kamal-proxy.
        script = Path(sys.executable).parent / "kamal-proxy"
        if not os.access(script, os.X_OK):
            raise unittest.SkipTest(f"no installed kamal-proxy next to {sys.executable}")
        directory = tempfile.mkdtemp(prefix="kp-unit-")
        self.addCleanup(shutil.rmtree, directory, True)
        unit = Path(directory) / UNIT.name
        unit.write_text(self.text.replace(f"={EXEC} ", f"={script} "))
        result = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # Unknown keys and bad values are only warnings: any output is a finding.
        self.assertEqual(result.stdout + result.stderr, "")
