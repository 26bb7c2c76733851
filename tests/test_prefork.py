"""Preforked workers (``process/prefork.py``): descriptors land where a spawned worker has
them, and the reactor (trial's, here) reaps and signals a forked child as it does a spawned
one.  The whole path, fork to serving, runs in every integration test with workers."""

from __future__ import annotations

import os
import signal
import time

from twisted.internet import defer, error, process, task
from twisted.trial import unittest

from kamal_proxy.process import prefork


class Ended:
    def __init__(self) -> None:
        self.reason: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:  # noqa: N802 - Twisted's name
        self.reason.callback(reason.value)


class PreforkTests(unittest.TestCase):
    def setUp(self) -> None:
        # What the reactor's SIGCHLD handling does once ``reactor.run`` installs it (trial
        # does not always run the reactor with it): reap the registered children.
        self.reaping = task.LoopingCall(process.reapAllProcesses)
        self.reaping.start(0.01)
        self.addCleanup(self.reaping.stop)

    def fork(self, body) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                body()
            finally:
                os._exit(0)
        return pid

    def test_a_forked_child_is_reaped_with_its_status(self):
        ended = Ended()
        pid = self.fork(lambda: os._exit(3))
        prefork.PreforkedProcess(pid, ended)
        d = ended.reason.addCallback(
            lambda value: self.assertEqual(
                (type(value), value.exitCode), (error.ProcessTerminated, 3)
            )
        )
        return d

    def test_a_forked_child_is_signalled_and_then_cannot_be(self):
        ended = Ended()

        ready_r, ready_w = os.pipe()

        def wait() -> None:
            # (This child is forked from a running reactor, unlike the real ones: it must not
            # run the parent's signal handler, so it is signalled once it has its own.)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.write(ready_w, b"!")
            time.sleep(30)

        pid = self.fork(wait)
        os.close(ready_w)
        self.assertEqual(os.read(ready_r, 1), b"!")
        os.close(ready_r)
        child = prefork.PreforkedProcess(pid, ended)
        child.signalProcess("TERM")

        def check(value):
            self.assertEqual(value.signal, signal.SIGTERM)
            self.assertRaises(error.ProcessExitedAlready, child.signalProcess, "TERM")

        return ended.reason.addCallback(check)

    def test_a_child_gone_before_its_start_is_an_error_and_is_reaped(self):
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = self.fork(lambda: os._exit(0))
        theirs.close()
        child = prefork.Preforked(pid, ours)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _state(pid) not in ("Z", None):
            time.sleep(0.01)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertRaises(OSError, child.start, {"index": 0}, {5: r})
        child.discard()
        self.assertIsNone(_state(pid))

    def test_no_fork_once_a_reactor_is_installed(self):
        # (trial's reactor is.)
        self.assertEqual(prefork.fork_workers(2), [])

    def test_descriptors_move_to_their_numbers(self):
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        self.addCleanup(lambda: [os.close(fd) for fd in (w1, r2, 250, 251) if _open(fd)])
        inode = os.fstat(r1).st_ino, os.fstat(w2).st_ino
        prefork._place({250: r1, 251: w2})
        self.assertEqual((os.fstat(250).st_ino, os.fstat(251).st_ino), inode)
        self.assertFalse(_open(r1))
        self.assertFalse(_open(w2))


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
