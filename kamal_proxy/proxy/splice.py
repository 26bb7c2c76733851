"""Kernel-to-kernel bodies: ``os.splice`` from one socket to another through a pipe.

A response body with a known length that the proxy relays unchanged (no buffering, no
chunked rewriting, plain TCP on both sides) does not need to pass through Python: the bytes
go from the upstream's socket into a pipe and from the pipe into the client's socket, as
HAProxy does, without being copied into user space or allocated as ``bytes``.

While a :class:`Splice` runs, it reads the source socket and writes the destination socket
itself.  The source's transport must not read meanwhile (its owner pauses it); the
destination's transport goes on as before (reading the client's next request or the
upstream's response, which is how a client that leaves or an early answer is noticed), it only
must not write.  The splice registers its own descriptors with the reactor, on duplicates of
the two file descriptors (``os.dup``: epoll tells them apart from the transports' own), the
reading one for the source and, only while the destination's socket is full, the writing one
for it.  The pipe is the only buffer: when it is full the source is not read, the same flow
control as the streamed path, and pipe memory is the kernel's, not the process's.  At the end
(all bytes moved) ``on_done(None)`` is called; on an error ``on_done(error)``; ``stop()``
abandons it at once (a drain, a client that left, an early response).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["AVAILABLE", "MIN_SPLICE", "Splice"]

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
#: Bodies smaller than this are not worth a pipe: they go through the streamed path.
MIN_SPLICE = 256 << 10
#: The pipe's capacity, and so the most moved per wake-up (the kernel may give less).
PIPE_SIZE = 1 << 20
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class SpliceError(Exception):
    """A socket failed during a splice: ``side`` is ``"source"`` or ``"destination"``."""

    def __init__(self, side: str, message: str) -> None:
        super().__init__(message)
        self.side = side


@implementer(IReadDescriptor)
class _Reader:
    """The source's file descriptor, registered with the reactor while a splice reads it."""

    def __init__(self, splice: Splice, fd: int) -> None:
        self.splice = splice
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.splice._pump()

    def connectionLost(self, reason: Failure) -> None:
        self.splice._fail(SpliceError("source", reason.getErrorMessage()))

    def logPrefix(self) -> str:
        return "Splice"


@implementer(IWriteDescriptor)
class _Writer:
    """The destination's file descriptor, registered while its socket buffer is full."""

    def __init__(self, splice: Splice, fd: int) -> None:
        self.splice = splice
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doWrite(self) -> None:
        self.splice._pump()

    def connectionLost(self, reason: Failure) -> None:
        self.splice._fail(SpliceError("destination", reason.getErrorMessage()))

    def logPrefix(self) -> str:
        return "Splice"


class Splice:
    """Moves ``length`` bytes from ``source`` to ``destination`` (TCP transports) by splice.

    The caller pauses the source transport's reading before ``start()`` (and resumes it
    after ``on_done``); nothing may be queued on, or written to, the destination transport.
    """

    def __init__(
        self,
        reactor: Any,
        source: Any,
        destination: Any,
        length: int,
        on_done: Callable[[BaseException | None], object],
    ) -> None:
        self.reactor = reactor
        self.remaining = length
        self.moved = 0  # bytes written to the destination
        self._in_pipe = 0
        self._on_done: Callable[[BaseException | None], object] | None = on_done
        self._reader = _Reader(self, os.dup(source.fileno()))
        self._writer = _Writer(self, os.dup(destination.fileno()))
        self._reading = False
        self._writing = False
        self._pipe: tuple[int, int] | None = None

    def start(self) -> None:
        if self._on_done is None:
            return
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default (64 KiB) still works, with more wake-ups
        self._pump()

    def stop(self) -> None:
        """Abandon the splice now (no ``on_done``): unregister, close the pipe."""
        self._on_done = None
        self._release()

    # -- moving bytes ----------------------------------------------------------------------

    def _pump(self) -> None:
        pipe = self._pipe
        if pipe is None:
            return
        r, w = pipe
        src = self._reader.fd
        dst = self._writer.fd
        while True:
            while self._in_pipe:
                try:
                    n = os.splice(r, dst, self._in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    self._wait(write=True)
                    return
                except OSError as e:
                    self._fail(SpliceError("destination", os.strerror(e.errno or errno.EIO)))
                    return
                self._in_pipe -= n
                self.moved += n
            if not self.remaining:
                self._finish()
                return
            try:
                n = os.splice(src, w, min(self.remaining, PIPE_SIZE), flags=_FLAGS)
            except BlockingIOError:
                self._wait(write=False)
                return
            except OSError as e:
                self._fail(SpliceError("source", os.strerror(e.errno or errno.EIO)))
                return
            if not n:
                self._fail(SpliceError("source", "unexpected EOF"))
                return
            self._in_pipe += n
            self.remaining -= n

    def _wait(self, write: bool) -> None:
        """Wait for the destination to drain (``write``) or for the source to have bytes."""
        reactor = self.reactor
        if write:
            if self._reading:
                self._reading = False
                reactor.removeReader(self._reader)
            if not self._writing:
                self._writing = True
                reactor.addWriter(self._writer)
        else:
            if self._writing:
                self._writing = False
                reactor.removeWriter(self._writer)
            if not self._reading:
                self._reading = True
                reactor.addReader(self._reader)

    # -- the end ---------------------------------------------------------------------------

    def _finish(self) -> None:
        on_done, self._on_done = self._on_done, None
        self._release()
        if on_done is not None:
            on_done(None)

    def _fail(self, error: SpliceError) -> None:
        on_done, self._on_done = self._on_done, None
        self._release()
        if on_done is not None:
            on_done(error)

    def _release(self) -> None:
        reactor = self.reactor
        if self._reading:
            self._reading = False
            reactor.removeReader(self._reader)
        if self._writing:
            self._writing = False
            reactor.removeWriter(self._writer)
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])
        for descriptor in (self._reader, self._writer):
            if descriptor.fd >= 0:
                os.close(descriptor.fd)
                descriptor.fd = -1
