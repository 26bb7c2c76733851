"""setup.py declares what the code imports, each with a minimum version; Twisted is bounded to
the releases tested; the lint tool is pinned; tox tries the newest Twisted release."""

from __future__ import annotations

import ast
import configparser
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent


def setup_arguments() -> dict[str, object]:
    """The literal keyword arguments of the ``setup()`` call in setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            out = {}
            for keyword in node.keywords:
                try:
                    out[keyword.arg] = ast.literal_eval(keyword.value)
                except ValueError:
                    pass
            return out
    raise AssertionError("no setup() call in setup.py")


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    arguments = setup_arguments()
    texts = arguments["install_requires"] if extra is None else arguments["extras_require"][extra]
    return {canonical(Requirement(t).name): Requirement(t) for t in texts}  # type: ignore[union-attr]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def imported_top_level(*directories: str) -> set[str]:
    names = set()
    for directory in directories:
        for path in (ROOT / directory).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "kamal_proxy"}


class DependencyTests(unittest.TestCase):
    def test_every_imported_distribution_is_declared(self):
        declared = set(requirements())
        providers = packages_distributions()
        missing = {}
        for module in sorted(imported_top_level("kamal_proxy", "twisted")):
            dists = {canonical(d) for d in providers.get(module, [module])}
            if not dists & declared:
                missing[module] = sorted(dists)
        self.assertEqual(missing, {}, "imported but not in install_requires")

    def test_every_dependency_has_a_minimum(self):
        for name, requirement in {**requirements(), **requirements("test")}.items():
            lower = [s for s in requirement.specifier if s.operator in (">=", "==", "~=")]
            self.assertTrue(lower, f"{name} has no minimum version")

    def test_twisted_is_bounded_to_the_tested_releases(self):
        twisted = requirements()["twisted"]
        self.assertEqual(twisted.extras, {"tls", "http2"})
        self.assertTrue(any(s.operator == "<" for s in twisted.specifier), str(twisted))
        from twisted import __version__ as installed

        self.assertIn(installed, twisted.specifier, "the tested Twisted is outside the bound")

    def test_the_lint_tool_is_pinned(self):
        [pin] = requirements("test")["ruff"].specifier
        self.assertEqual(pin.operator, "==")

    def test_tox_tries_the_newest_twisted(self):
        tox = configparser.ConfigParser(interpolation=None)
        tox.read(ROOT / "tox.ini")
        self.assertIn("newest-twisted", tox["tox"]["envlist"].split(", "))
        env = tox["testenv:newest-twisted"]
        self.assertIn('pip install --quiet --upgrade "twisted[tls,http2]"', env["commands_pre"])
        # The constraints (the image's versions) would hold Twisted back: this env drops them.
        self.assertEqual(env["setenv"].split(), ["PIP_CONSTRAINT", "="])
        self.assertIn("twisted.trial", env["commands"])
