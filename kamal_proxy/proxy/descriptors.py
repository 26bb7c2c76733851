"""Admission at the open-files limit (issue 12 §5): answer 503 rather than run out.

A proxied request holds two descriptors, the client's and the upstream's.  Accepting clients
until ``accept`` fails would leave none for their upstream connections (Go's original then
answers 502 "too many open files" towards the upstream, and clients beyond that get closed
with no response).  So a new client connection is admitted only while, after it, every live
client could still open its upstream connection and a small reserve stays free (for health
checks, the state file, the control socket, the log).  A connection that is not admitted is
answered ``503 Service Unavailable`` at its first request, then closed.

The kernel gives a new socket the lowest free descriptor number, so an accepted socket's
number is (at least) how many descriptors are in use: the check costs no system call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DescriptorBudget", "budget", "socket_number"]

#: Descriptors kept free besides one per live client, at the least.
MIN_RESERVE = 16


def open_files_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` now (-1: none known)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return -1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return -1 if soft == resource.RLIM_INFINITY else soft


class DescriptorBudget:
    """This process's client connections against its open-files limit."""

    def __init__(self, limit: int | None = None, reserve: int | None = None) -> None:
        self.clients = 0
        self.limit = -1
        self.reserve = MIN_RESERVE
        self.refresh(limit, reserve)

    def refresh(self, limit: int | None = None, reserve: int | None = None) -> None:
        """Read the limit again (a listener starts after the limit was raised)."""
        self.limit = open_files_limit() if limit is None else limit
        if reserve is None:
            reserve = max(MIN_RESERVE, self.limit // 64)
        self.reserve = reserve

    def admit(self, number: int) -> bool:
        """Whether a client whose socket is descriptor ``number`` may be served; counted
        either way (``release`` when it closes)."""
        self.clients += 1
        if self.limit < 0 or number < 0:
            return True
        return number + self.clients + self.reserve < self.limit

    def release(self) -> None:
        self.clients -= 1


def socket_number(transport: Any) -> int:
    """The descriptor of ``transport``'s socket (through a TLS wrapper); -1 if it has none."""
    for _ in range(4):
        fileno = getattr(transport, "fileno", None)
        if fileno is not None:
            try:
                return int(fileno())
            except Exception:  # noqa: BLE001 - a closed or fake transport
                return -1
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
    return -1


#: The process's budget, shared by its HTTP and HTTPS listeners.
budget = DescriptorBudget()
