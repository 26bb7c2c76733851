"""What a pending ``deploy`` waits for, on the operator's terminal (issue 12 §3).

A deploy can wait its whole ``--deploy-timeout`` for health checks and then its
``--drain-timeout`` for the old targets: on a terminal (stderr is a TTY) the command shows
each failed health check with its reason on one status line rewritten in place, then a line
per target that became healthy, then the drain.  Anywhere else (Kamal, scripts, pipes) it asks
the server for nothing more and prints nothing more: the wire, stdout and the ``Error:`` line
stay exactly the Go original's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import IO, Any

from kamal_proxy.durations import format_duration

_CLEAR_LINE = "\r\x1b[K"


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class DeployProgressView:
    """Renders ``DeployProgress`` notifications (their values as a dict) on ``stream``."""

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.checks: dict[str, int] = {}
        self.healthy: set[str] = set()
        self.drain_started: float | None = None
        #: The status line on screen, rewritten by the next event (empty: none).
        self.status = ""

    def show(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "health":
            self._health(event.get("target") or "", event.get("reason") or "")
        elif kind == "drain":
            self.drain_started = self.clock()
            targets = ", ".join(event.get("targets") or [])
            timeout = format_duration(event.get("timeout") or 0)
            self._status(f"Draining {targets} (at most {timeout})")
        elif kind == "drained":
            took = self.clock() - (self.drain_started or self.clock())
            self._line(f"Drained {', '.join(event.get('targets') or [])} in {took:.1f}s")

    def close(self) -> None:
        """End the status line, so that what follows (an ``Error:`` line) starts afresh and
        the last failure reason stays on screen."""
        if self.status:
            self._write("\n")
            self.status = ""

    def _health(self, target: str, reason: str) -> None:
        count = self.checks[target] = self.checks.get(target, 0) + 1
        if reason:
            self._status(f"{target} not healthy yet: check {count} failed ({reason})")
        elif target not in self.healthy:
            self.healthy.add(target)
            checks = "1 check" if count == 1 else f"{count} checks"
            self._line(f"{target} healthy after {checks}")

    def _status(self, text: str) -> None:
        self.status = self._fit(text)
        self._write(_CLEAR_LINE + self.status)

    def _line(self, text: str) -> None:
        self.status = ""
        self._write(_CLEAR_LINE + text + "\n")

    def _fit(self, text: str) -> str:
        # A status line that wraps could not be rewritten in place.
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            width = 0
        width = (width or 80) - 1
        return text if len(text) <= width else text[: max(width - 3, 0)] + "..."

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # the terminal is gone; the deploy's result still matters


def send_deploy(inv: Any, command: type, stream: IO[str] | None = None, **arguments: Any) -> None:
    """Send ``command`` (``Deploy`` or ``RolloutDeploy``); on a terminal, ask the server for
    progress and show it on ``stream`` (stderr) while the command waits."""
    import sys

    stream = sys.stderr if stream is None else stream
    if not is_terminal(stream):
        inv.send(command, **arguments)
        return
    from kamal_proxy.control import commands

    view = DeployProgressView(stream)
    try:
        inv.send(
            command,
            progress=True,
            on_notification={commands.DeployProgress: view.show},
            **arguments,
        )
    finally:
        view.close()
