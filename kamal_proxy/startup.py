"""Start-up failures, shared by every layer that opens something when the server starts.

``app`` prints them (``Error: <message>``, exit 1); the metrics port, the listeners and the
workers raise them (a socket that cannot be bound is a :class:`BindError` first).
They live at the bottom of the layers (DESIGN §2) so that ``observe``
does not have to import ``app`` to refuse a port that is taken.
"""

from __future__ import annotations

import errno
import os


class StartupError(Exception):
    """Printed as ``Error: <message>`` by ``run``; the process exits 1."""


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
        """Go's text for the error: its errno's, in lower case, or the error's own."""
        code = self.cause.errno
        if code == errno.EADDRINUSE:
            return "address already in use"
        if isinstance(code, int):
            return os.strerror(code).lower()
        return str(self.cause)

    @property
    def message(self) -> str:
        """The whole of Go's error: ``listen tcp :80: bind: address already in use``."""
        return f"listen {self.kind} {self.address}: bind: {self.reason}"
