"""The running server as an operator meets it: its open-files limit, and the directories it
creates in a fresh HOME."""

from __future__ import annotations

import os
import resource
import stat
import sys

from tests.integration.support import IntegrationTestCase, ProxyProcess, proxy_command

# Starts the real kamal-proxy as a shell would after `umask 000; ulimit -Sn 256`.
LAUNCHER = (
    "import os, resource, sys; os.umask(0); "
    "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class ConstrainedProxy(ProxyProcess):
    def command(self) -> list[str]:
        command = proxy_command()
        if len(command) > 1:  # python -c ...: exec the interpreter itself
            return [sys.executable, "-c", LAUNCHER, sys.executable, *command[1:]]
        return [sys.executable, "-c", LAUNCHER, *command]


def open_files_limits(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no open files line in /proc/PID/limits")


class OperationsTests(IntegrationTestCase):
    def start_constrained(self) -> ConstrainedProxy:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY or hard <= 256:
            self.skipTest(f"needs a finite hard open-files limit above 256, not {hard}")
        if not os.path.exists("/proc/self/limits"):
            self.skipTest("reads the server's limits from /proc")
        proxy = ConstrainedProxy()
        self.addCleanup(proxy.cleanup)
        proxy.start()
        return proxy

    def test_soft_open_files_limit_is_raised_to_the_hard_one(self):
        proxy = self.start_constrained()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.assertEqual(open_files_limits(proxy.proc.pid), (str(hard), str(hard)))

    def test_directories_it_creates_are_private_even_under_umask_000(self):
        proxy = self.start_constrained()
        self.assertEqual(proxy.cli("list").code, 0)
        for level in (os.path.join(proxy.home, ".config"), proxy.data_dir):
            self.assertEqual(stat.S_IMODE(os.stat(level).st_mode), 0o700, level)
