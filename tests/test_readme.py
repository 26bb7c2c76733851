"""The README documents the CLI that exists: every command it shows and every flag it names."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner
from twisted.trial import unittest

from kamal_proxy.cli.main import build_root

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

COMMANDS = [
    ["run"],
    ["deploy"],
    ["list"],
    ["remove"],
    ["pause"],
    ["stop"],
    ["resume"],
    ["rollout", "deploy"],
    ["rollout", "set"],
    ["rollout", "stop"],
    ["completion"],
    ["upgrade"],
]
# The syntax placeholder, the example app's own flags (example/app/app.py), twistd's, Kamal's
# (`kamal proxy boot_config set`) and Docker's.
NOT_OURS = {"--help", "--flag", "--port", "--version", "--logger", "--logfile", "--pidfile"}
NOT_OURS |= {"--syslog"}
NOT_OURS |= {"--registry", "--repository", "--image", "--rm", "--ulimit"}


def help_text(args: list[str]) -> str:
    result = CliRunner().invoke(build_root(environ={}), [*args, "--help"])
    return result.output


class ReadmeTests(unittest.TestCase):
    def test_every_flag_in_the_readme_exists(self):
        helps = {" ".join(c): help_text(c) for c in COMMANDS}
        everything = "\n".join(helps.values())
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README)) - NOT_OURS
        self.assertGreater(len(flags), 40)
        missing = sorted(f for f in flags if f"{f} " not in everything)
        self.assertEqual(missing, [], "flags in README.md that no command knows")

    def test_every_command_line_in_the_readme_parses_its_command(self):
        # (`docker exec kamal-proxy kamal-proxy list` names the container, then the command.)
        lines = re.findall(r"kamal-proxy (?!kamal-proxy )((?:rollout )?[a-z]+)", README)
        names = {line.split()[0] if not line.startswith("rollout") else line for line in lines}
        known = {" ".join(c) for c in COMMANDS} | {"help", "ls", "rm", "rollout", "for"}
        self.assertEqual(sorted(names - known), [])

    def test_help_shows_the_documented_defaults(self):
        deploy = help_text(["deploy"])
        for default in ("30s", "/up", "1048576", "1s", "5s"):
            self.assertIn(default, deploy)
        run = help_text(["run"])
        self.assertIn("(default 80)", run)
        self.assertIn("(default 443)", run)

    def test_troubleshooting_explains_the_dial_error_the_cli_prints(self):
        section = README[README.index("## Troubleshooting") :]
        section = section[: section.index("\n## ", 1)]
        documented = re.search(
            r"`(Error: dial unix (\S+): connect: no such file or directory)`", section
        )
        self.assertIsNotNone(documented)
        path = documented.group(2)
        result = CliRunner().invoke(build_root(environ={"KAMAL_PROXY_SOCKET": path}), ["list"])
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(result.stderr, documented.group(1) + "\n")

    def test_completion_is_documented(self):
        section = README[README.index("### `completion`") :]
        for shell in ("bash", "zsh", "fish", "powershell"):
            self.assertIn(f"kamal-proxy completion {shell}", section)
            result = CliRunner().invoke(build_root(environ={}), ["completion", shell])
            self.assertEqual(result.exit_code, 0, result.output)
