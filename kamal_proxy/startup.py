"""Start-up failures, shared by every layer that opens something when the server starts.

``app`` prints them (``Error: <message>``, exit 1); the metrics port, the listeners and the
workers raise them (a socket that cannot be bound is a :class:`BindError` first).
They live at the bottom of the layers (DESIGN §2) so that ``observe``
does not have to import ``app`` to refuse a port that is taken.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the base layer loads no Twisted, as the CLI reads from it
    from twisted.internet import error as neterror


class StartupError(Exception):
    """Printed as ``Error: <message>`` by ``run``; the process exits 1."""


def bind_reason(e: neterror.CannotListenError) -> str:
    """The end of Go's ``listen tcp :80: bind: <reason>``: ``address already in use``, or the
    system's text for the error in lower case (``permission denied``)."""
    err = e.socketError
    code = getattr(err, "errno", None)
    if not isinstance(code, int) and getattr(err, "args", None):
        code = err.args[0]
    return _reason(code, err)


def _reason(code: object, err: object) -> str:
    """Go's text for a socket error: its errno's, in lower case, or the error's own."""
    if code == errno.EADDRINUSE:
        return "address already in use"
    if isinstance(code, int):
        return os.strerror(code).lower()
    return str(err)


class BindError(OSError):
    """A socket could not be opened; ``kind`` and ``address`` name it as Go does in errors
    (``listen tcp :80: bind: address already in use``)."""

    def __init__(self, kind: str, address: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.kind = kind
        self.address = address
        self.cause = cause

    @property
    def reason(self) -> str:
        return _reason(self.cause.errno, self.cause)

    @property
    def message(self) -> str:
        """The whole of Go's error: ``listen tcp :80: bind: address already in use``."""
        return f"listen {self.kind} {self.address}: bind: {self.reason}"
