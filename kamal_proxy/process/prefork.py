"""The first workers of ``kamal-proxy run``, forked before the main process starts its reactor.

A worker started as a new interpreter (``python -m kamal_proxy.process.worker``) spends most
of its start importing Twisted and the data plane, some 0.3 s of CPU each, after the main
process spent as much on its own imports: with workers, the server served only after the
sum of the two.  Forked from the main process once the worker's modules are imported, a
worker has nothing left to import, and the pages of those modules are shared with the main
process (copy-on-write).

The fork must happen before anything installs the reactor (a forked epoll reactor would
share its kernel object with the parent), so :func:`fork_workers` runs first thing in
``run_server``; the children then wait, doing nothing, until the main process has bound its
sockets and restored its state, and sends each of them (:meth:`Preforked.start`) the
configuration and the descriptors a spawned worker would have inherited.  Each then runs
``process/worker.py``'s ``main`` exactly as a spawned one does.

Only the first generation is forked: a worker that dies is replaced by a spawned one (the
main process's reactor runs by then), and under ``twistd`` (whose reactor is installed before
the plugin runs) every worker is spawned.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from kamal_proxy.process import notify

#: Bytes of the configuration message (JSON), far more than it needs.
MAX_CONFIG = 65536
MAX_FDS = 16


def preload(http3: bool = False) -> None:
    """Import what a worker imports, so that forked workers find it all loaded."""
    import kamal_proxy.process.certificates  # noqa: F401
    import kamal_proxy.process.worker  # noqa: F401
    import kamal_proxy.proxy.channel  # noqa: F401
    import kamal_proxy.proxy.resource  # noqa: F401

    if http3:
        import kamal_proxy.proxy.http3  # noqa: F401
        import kamal_proxy.proxy.http3_bridge  # noqa: F401
        import kamal_proxy.proxy.http3_listener  # noqa: F401


class Preforked:
    """A forked child waiting to become a worker (the main process's handle on it)."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel

    def start(self, config: Mapping[str, Any], fds: Mapping[int, int]) -> None:
        """Send the configuration and the descriptors, each to appear in the worker under
        its key (as ``childFDs`` would place them); the child runs the worker from here."""
        targets = sorted(fds)
        message = json.dumps({"config": dict(config), "targets": targets}).encode()
        try:
            socket.send_fds(self.channel, [message], [fds[t] for t in targets])
        finally:
            self.channel.close()

    def discard(self) -> None:
        """Not needed: the child sees its channel close and exits (reaped here if it is
        gone already; otherwise when the main process exits)."""
        self.channel.close()
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def fork_workers(count: int) -> list[Preforked]:
    """Fork ``count`` children that wait to become workers; none once a reactor is installed
    or another thread runs (a forked child would share the reactor's kernel objects, or hold
    a lock some thread had): the workers are then spawned."""
    import threading

    if "twisted.internet.reactor" in sys.modules or threading.active_count() > 1:
        return []
    children: list[Preforked] = []
    for _ in range(count):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            code = 1
            try:
                code = _become_worker(theirs)
            finally:
                os._exit(code)
        theirs.close()
        children.append(Preforked(pid, ours))
    return children


def _become_worker(channel: socket.socket) -> int:
    """In the child: keep nothing of the parent's but stdio, wait for the word, then serve."""
    for number in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR2):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent()
    keep = channel.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, _max_fd())
    random.seed()
    try:
        message, fds, _flags, _address = socket.recv_fds(channel, MAX_CONFIG, MAX_FDS)
    except OSError:
        return 0
    channel.close()
    if not message:  # the main process did not need us (or is gone)
        return 0
    start = json.loads(message)
    _place(dict(zip(start["targets"], fds, strict=True)))
    os.environ.pop(notify.ENV, None)  # only the main process speaks for the service
    from kamal_proxy.process.worker import main

    return main([sys.executable, json.dumps(start["config"])]) or 0


def _place(fds: dict[int, int]) -> None:
    """Move each received descriptor to its number (a received one may sit on a target)."""
    import fcntl

    above = max(fds, default=2) + 1
    moved = {target: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for target, fd in fds.items()}
    for fd in fds.values():
        os.close(fd)
    for target, fd in moved.items():
        os.dup2(fd, target)
        os.close(fd)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 1024


class PreforkedProcess:
    """Twisted's view of a preforked worker: signalled, and reaped by the reactor as the
    processes it spawns are (``registerReapProcessHandler``), ending in ``processEnded``."""

    def __init__(self, pid: int, proto: Any) -> None:
        from twisted.internet import process

        self.pid: int | None = pid
        self.proto = proto
        process.registerReapProcessHandler(pid, self)

    def signalProcess(self, name: str | int) -> None:  # noqa: N802 - Twisted's name
        from twisted.internet import error

        if self.pid is None:
            raise error.ProcessExitedAlready()
        number = getattr(signal, f"SIG{name}") if isinstance(name, str) else name
        try:
            os.kill(self.pid, number)
        except ProcessLookupError:
            raise error.ProcessExitedAlready() from None

    def reapProcess(self) -> None:  # noqa: N802
        if self.pid is None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid:
            from twisted.internet import process

            process.unregisterReapProcessHandler(self.pid, self)
            self.processEnded(status)

    def processEnded(self, status: int) -> None:  # noqa: N802
        from twisted.internet import error
        from twisted.python.failure import Failure

        self.pid = None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = None if os.WIFEXITED(status) else os.WTERMSIG(status)
        if code or sig:
            reason: Exception = error.ProcessTerminated(code, sig, status)
        else:
            reason = error.ProcessDone(status)
        self.proto.processEnded(Failure(reason))
