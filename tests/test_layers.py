"""Each layer imports only the layers below it (DESIGN §2, issue 12 §6).

``LAYERS`` is the architecture as a graph: which layers each one may import directly.  Two
checks hold the code to it: every ``import`` statement of the package, function-level ones
included (read from the source, so a lazy import counts), and every layer imported alone in a
fresh interpreter, whose ``sys.modules`` afterwards may hold only that layer and the layers
below it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

from twisted.trial import unittest

import kamal_proxy

PACKAGE_DIR = os.path.dirname(os.path.abspath(kamal_proxy.__file__))
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)

#: Layer -> the layers it may import directly (its own modules are always allowed).
LAYERS: dict[str, tuple[str, ...]] = {
    # Values and rules every layer reads: durations, options, service options, start-up errors.
    "base": (),
    # Log events, the JSON writer, metrics.
    "observe": ("base",),
    # Services, targets, balancers, the routing table, the state file.
    "routing": ("base", "observe"),
    # Certificates on disk (the proxy's QUIC endpoint reads their keys).
    "certificate store": ("base",),
    # The data plane: HTTP/1, HTTP/2, HTTP/3, the request pipeline, upstream connections.
    "proxy": ("base", "observe", "routing", "certificate store"),
    # Health checks (an HTTP client: they may use the proxy's).
    "health": ("base", "observe", "proxy"),
    # ACME, SNI, on-demand checks through the pipeline.
    "tls": ("base", "observe", "certificate store", "proxy"),
    # The control socket's contract, its server (on the Router) and its client.
    "control": ("base", "observe", "routing"),
    # Assembly: the service, the main process and its workers.
    "app": (
        "base",
        "observe",
        "routing",
        "certificate store",
        "proxy",
        "health",
        "tls",
        "control",
    ),
    # The command line (``run`` starts the app).
    "cli": ("base", "control", "app"),
}

#: Module (or package) -> layer; the longest match wins.
MODULE_LAYERS: dict[str, str] = {
    "kamal_proxy.durations": "base",
    "kamal_proxy.gostrings": "base",
    "kamal_proxy.limits": "base",
    "kamal_proxy.options": "base",
    "kamal_proxy.service_options": "base",
    "kamal_proxy.startup": "base",
    "kamal_proxy.observe": "observe",
    "kamal_proxy.routing": "routing",
    "kamal_proxy.tls.store": "certificate store",
    "kamal_proxy.proxy": "proxy",
    "kamal_proxy.health": "health",
    "kamal_proxy.tls": "tls",
    "kamal_proxy.control": "control",
    "kamal_proxy.app": "app",
    "kamal_proxy.process": "app",
    "kamal_proxy.cli": "cli",
}


def layer_of(module: str) -> str | None:
    """The layer of a ``kamal_proxy`` module or package; None when it has none."""
    if module == "kamal_proxy":
        return "base"  # the package itself: its version
    best = None
    for prefix in MODULE_LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    return MODULE_LAYERS[best] if best is not None else None


def below(layer: str) -> set[str]:
    """Every layer that ``layer`` may depend on, directly or through another."""
    seen: set[str] = set()
    todo = list(LAYERS[layer])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(LAYERS[name])
    return seen


def package_modules() -> Iterator[tuple[str, str]]:
    """``(module name, file)`` of every module of the package (``__main__`` too)."""
    for directory, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, SOURCE_ROOT)[: -len(".py")].split(os.sep)
            if relative[-1] == "__init__":
                relative = relative[:-1]
            yield ".".join(relative), path


def _is_module(name: str) -> bool:
    path = os.path.join(SOURCE_ROOT, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _is_package(name: str) -> bool:
    return os.path.isfile(os.path.join(SOURCE_ROOT, *name.split("."), "__init__.py"))


def imported_modules(source: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every ``kamal_proxy`` import in ``source``, at any depth."""
    found: dict[tuple[int, str], None] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kamal_proxy":
                    found[node.lineno, alias.name] = None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "kamal_proxy":
                continue
            for alias in node.names:
                # ``from kamal_proxy.proxy import pages`` imports the module ``pages``.
                child = f"{node.module}.{alias.name}"
                found[node.lineno, child if _is_module(child) else node.module] = None
    yield from sorted(found)


def upward_imports(module: str, source: str) -> list[str]:
    """The imports of ``module`` (given as ``source``) that its layer may not make."""
    layer = layer_of(module)
    if layer is None:
        return [f"{module}: no layer (add it to MODULE_LAYERS)"]
    allowed = set(LAYERS[layer]) | {layer}
    found = []
    for line, target in imported_modules(source):
        target_layer = layer_of(target)
        if target_layer not in allowed:
            found.append(f"{module}:{line} ({layer}) imports {target} ({target_layer})")
    return found


class LayerGraphTests(unittest.TestCase):
    def test_the_graph_points_down(self) -> None:
        """No layer may reach itself: the allowed imports form no cycle."""
        for layer in LAYERS:
            self.assertNotIn(layer, below(layer), f"{layer} can reach itself")

    def test_every_module_has_a_layer(self) -> None:
        names = [name for name, _ in package_modules()]
        self.assertIn("kamal_proxy.routing.target", names)
        self.assertEqual([n for n in names if layer_of(n) is None], [])
        self.assertEqual(set(MODULE_LAYERS.values()), set(LAYERS))

    def test_the_checker_sees_an_upward_import(self) -> None:
        """The check below can fail: a lazy import of a higher layer is reported, a lower
        one is not."""
        source = textwrap.dedent(
            """
            from kamal_proxy.observe.events import info
            from kamal_proxy import startup

            def listen():
                from kamal_proxy.app import StartupError
                import kamal_proxy.proxy.upstream
            """
        )
        self.assertEqual(
            upward_imports("kamal_proxy.observe.metrics", source),
            [
                "kamal_proxy.observe.metrics:6 (observe) imports kamal_proxy.app (app)",
                "kamal_proxy.observe.metrics:7 (observe) imports kamal_proxy.proxy.upstream "
                "(proxy)",
            ],
        )
        self.assertEqual(
            upward_imports("kamal_proxy.tls.sni", "from kamal_proxy.proxy import resource\n"),
            [],
        )
        self.assertEqual(
            upward_imports("kamal_proxy.routing.target", "from kamal_proxy.proxy import pages\n"),
            ["kamal_proxy.routing.target:1 (routing) imports kamal_proxy.proxy.pages (proxy)"],
        )


class ImportStatementTests(unittest.TestCase):
    def test_every_import_points_down(self) -> None:
        """Every import statement of the package, function-level ones included."""
        found = []
        for module, path in package_modules():
            with open(path, encoding="utf-8") as f:
                found += upward_imports(module, f.read())
        self.assertEqual(found, [])


_IMPORT_ALONE = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "kamal_proxy")))
"""


class ImportAloneTests(unittest.TestCase):
    def test_each_layer_imports_alone(self) -> None:
        """Each layer in a fresh interpreter: afterwards only it and the layers below it
        are loaded."""
        modules: dict[str, list[str]] = {layer: [] for layer in LAYERS}
        for name, _ in package_modules():
            if name.rsplit(".", 1)[-1] != "__main__":  # it runs the program
                modules[layer_of(name)].append(name)
        env = {**os.environ, "PYTHONPATH": SOURCE_ROOT}
        runs = {
            layer: subprocess.Popen(
                [sys.executable, "-c", _IMPORT_ALONE, json.dumps(names)],
                cwd=SOURCE_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for layer, names in modules.items()
        }
        problems = []
        for layer, proc in runs.items():
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                problems.append(f"{layer}: import did not finish within 120s")
                continue
            if proc.returncode != 0:
                problems.append(f"{layer}: import failed:\n{err.decode(errors='replace')}")
                continue
            allowed = below(layer) | {layer}
            for loaded in json.loads(out):
                # A package's ``__init__`` loads with any of its modules (``tls`` with
                # ``tls.store``); what it imports itself is checked above.
                if _is_package(loaded):
                    continue
                if layer_of(loaded) not in allowed:
                    problems.append(f"{layer} loads {loaded} ({layer_of(loaded)})")
        self.assertEqual(problems, [])
