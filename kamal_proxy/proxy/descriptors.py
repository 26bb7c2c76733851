"""Admission at the open-files limit (issue 12 §5): answer 503 rather than run out.

A proxied request holds two descriptors, the client's and the upstream's.  Accepting clients
until ``accept`` fails would leave none for their upstream connections (Go's original then
answers 502 "too many open files" towards the upstream, and clients beyond that get closed
with no response).  So a new client connection is admitted only while, after it, every live
client could still open its upstream connection and a small reserve stays free (for health
checks, the state file, the control socket, the log).  A connection that is not admitted is
answered ``503 Service Unavailable`` at its first request, then closed, and its listener stops
accepting until there is room again: the clients behind it wait in the listen backlog instead
of taking, socket by socket, the descriptors that admitted clients need for their upstreams.

Far from the limit (few clients for it, and a low descriptor number: the kernel gives a new
socket the lowest free one, so every lower one is in use) that settles it with no system call;
closed descriptors leave holes below higher ones, so nearer the limit the descriptors in use
are counted (``/proc/self/fd``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["DescriptorBudget", "budget", "listening_port", "socket_number"]

#: Descriptors kept free besides one per live client, at the least.
MIN_RESERVE = 16
#: While a listener does not accept, how often room is looked for besides when clients leave.
RETRY_SECONDS = 0.5


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

    def __init__(
        self,
        limit: int | None = None,
        reserve: int | None = None,
        count_open: Callable[[], int] | None = None,
    ) -> None:
        self.clients = 0
        self.count_open = count_open or count_open_descriptors
        self._held: list[Any] = []  # listening ports that stopped accepting
        self._retry: Any = None
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
        room = self.limit - self.clients - self.reserve
        # Far from the limit, no count: descriptors 0..number are in use, and besides the
        # clients' own there are about as many upstream ones (and some idle in the pools).
        if max(number, 3 * self.clients) < room // 2:
            return True
        in_use = self.count_open()
        return max(in_use, number + 1) <= room

    def crowded(self, number: int, batch: int) -> bool:
        """Whether ``batch`` more clients (a listener accepts a batch at a time: all of
        it, once begun) could leave too few descriptors, after a client at ``number``."""
        if self.limit < 0 or number < 0:
            return False
        room = self.limit - self.clients - self.reserve - batch
        if max(number, 3 * self.clients) < room // 2:
            return False
        return self.count_open() + batch > room

    def release(self) -> None:
        self.clients -= 1
        if self._held:
            self._resume_if_room()

    def hold(self, port: Any, call_later: Callable[..., Any]) -> None:
        """Stop accepting on ``port`` (a listening port) until a client could be admitted
        again: checked as clients leave, and every ``RETRY_SECONDS`` (the descriptors may be
        held by something else than clients)."""
        if port is None or not hasattr(port, "stopReading") or port in self._held:
            return
        self._held.append(port)
        port.stopReading()
        if self._retry is None:
            self._call_later = call_later
            self._retry = call_later(RETRY_SECONDS, self._retry_expired)

    def _retry_expired(self) -> None:
        self._retry = None
        if self._held and not self._resume_if_room():
            self._retry = self._call_later(RETRY_SECONDS, self._retry_expired)

    def _resume_if_room(self) -> bool:
        # Room for the batch a listener accepts next (bounded, so that it does resume).
        batch = max([getattr(port, "numberAccepts", 1) for port in self._held] + [1])
        batch = min(batch, self.limit // 4)
        if self.count_open() + self.clients + batch + self.reserve > self.limit:
            return False
        held, self._held = self._held, []
        for port in held:
            if getattr(port, "connected", True):  # not closed meanwhile
                port.startReading()
        if self._retry is not None:
            if self._retry.active():
                self._retry.cancel()
            self._retry = None
        return True


def count_open_descriptors() -> int:
    """How many descriptors this process has open (-1: unknown)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory)) - 1  # listdir's own descriptor
        except OSError:
            continue
    return -1


def listening_port(transport: Any) -> Any:
    """The listening port that accepted ``transport`` (through a TLS wrapper), or None."""
    for _ in range(4):
        port = getattr(transport, "server", None)
        if port is not None:
            return port
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
    return None


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
