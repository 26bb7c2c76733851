"""What a deploy waits for, told as it happens: for the operator's terminal (issue 12 §3).

A ``deploy`` may take its whole ``--deploy-timeout`` for health checks and then its
``--drain-timeout`` for the old targets' requests; the Router tells an observer of each
health check of the new targets and of the drain, and the control server passes that on to a
client that asked.  With worker processes the drain is the main process's (it waits for every
worker), so the events come from there.
"""

from __future__ import annotations

from typing import Protocol


class DeployObserver(Protocol):
    def health_checked(self, target: str, reason: str | None) -> None:
        """A health check of the new ``target`` ended: ``reason`` is None when it passed,
        else why it failed (``connection refused``, ``unexpected status (503)``...)."""

    def draining(self, targets: list[str], timeout: int) -> None:
        """New requests go elsewhere; those in flight on ``targets`` may take ``timeout``
        nanoseconds more."""

    def drained(self, targets: list[str]) -> None:
        """The requests in flight on ``targets`` are done (or were cut at the timeout)."""
