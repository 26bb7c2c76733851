"""The example walk-through (example/walkthrough.py) run end to end with local processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from tests.integration.support import IT_WORKERS, proxy_command

ROOT = Path(__file__).resolve().parents[2]


class ExampleWalkthroughTests(unittest.TestCase):
    def test_walkthrough_steps(self):
        command = proxy_command()
        if len(command) != 1:
            raise unittest.SkipTest("needs an installed kamal-proxy command")
        result = subprocess.run(
            [sys.executable, str(ROOT / "example" / "walkthrough.py"), "--kamal-proxy", command[0]],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KAMAL_PROXY_WORKERS": str(IT_WORKERS)},
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        lines = result.stdout.splitlines()
        expected = [
            ("deploy v1", "200 Hello from v1"),
            ("switch to v2 under traffic", "0 failed"),
            ("after the switch", "200 Hello from v2"),
            ("paused (held until resume)", "200 Hello from v2"),
            ("stopped with a message", "503"),
            ("resumed", "200 Hello from v2"),
            ("removed", "404"),
        ]
        for step, shown in expected:
            matching = [line for line in lines if line.startswith(step)]
            self.assertTrue(matching, f"step {step!r} missing from:\n{result.stdout}")
            self.assertIn(shown, matching[0])
        self.assertEqual(lines[-1], "walk-through complete")
