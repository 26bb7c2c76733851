"""File locations shared by the server and the CLI (SPEC §2.2, §2.4): what they resolve to and
how the directories are created."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from twisted.trial import unittest

from kamal_proxy.options import data_dir, make_private_dirs, socket_path
from kamal_proxy.tls.store import CertificateStore


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class PrivateDirectoryTests(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="kp-paths-")
        self.addCleanup(shutil.rmtree, self.root, True)
        # Under umask 000, a directory made with the default mode would be 0777.
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)

    def test_data_dir_creates_every_missing_level_0700(self):
        home = os.path.join(self.root, "home")
        path = data_dir({"HOME": home})
        self.assertEqual(path, os.path.join(home, ".config", "kamal-proxy"))
        for level in (home, os.path.join(home, ".config"), path):
            self.assertEqual(mode(level), 0o700, level)

    def test_existing_directories_are_left_alone(self):
        home = os.path.join(self.root, "home")
        os.makedirs(os.path.join(home, ".config"))
        os.chmod(home, 0o755)
        os.chmod(os.path.join(home, ".config"), 0o755)
        path = data_dir({"HOME": home})
        self.assertEqual(mode(home), 0o755)
        self.assertEqual(mode(os.path.join(home, ".config")), 0o755)
        self.assertEqual(mode(path), 0o700)

    def test_unusable_home_falls_back_to_the_temp_dir(self):
        blocker = os.path.join(self.root, "file")
        with open(blocker, "w"):
            pass
        self.assertEqual(data_dir({"HOME": blocker, "TMPDIR": self.root}), self.root)
        with self.assertRaises(OSError):
            make_private_dirs(os.path.join(blocker, "x"))

    def test_certificate_cache_levels_are_0700(self):
        store = CertificateStore(os.path.join(self.root, "certs", "abc"))
        store.write("entry", b"data")
        for level in ("certs", os.path.join("certs", "abc")):
            self.assertEqual(mode(os.path.join(self.root, level)), 0o700, level)


class SocketPathTests(unittest.TestCase):
    def test_order(self):
        self.assertEqual(socket_path({"KAMAL_PROXY_SOCKET": "/s", "XDG_RUNTIME_DIR": "/r"}), "/s")
        self.assertEqual(socket_path({"XDG_RUNTIME_DIR": "/r"}), "/r/kamal-proxy.sock")
        self.assertEqual(socket_path({"TMPDIR": "/t"}), "/t/kamal-proxy.sock")
