"""Round-robin positions shared by worker processes, so targets alternate as in one process.

Each worker holds its own copy of every balancer, but "the next target" must be one sequence
for all of them, or two workers answering alternate requests would both pick the same target.
The positions live in one shared memory file (a memfd the main process creates and every
worker inherits): two 64-bit counters (writers, readers) per balancer slot.  A worker bumps
the counter with a plain read and write; two workers choosing at the very same instant may
pick the same target once, which only shifts the rotation, never breaks it.
"""

from __future__ import annotations

import mmap
import os

from kamal_proxy.routing.balancer import LoadBalancer
from kamal_proxy.routing.target import Target

#: Balancers alive at once that get a shared position (others keep a position of their own).
SLOTS = 16384
_SIZE = SLOTS * 2 * 8
_WRAP = (1 << 62) - 1


class SharedTurns:
    """The counters, mapped in this process."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        self.counters = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls) -> SharedTurns:
        fd = os.memfd_create("kamal-proxy-turns")
        os.ftruncate(fd, _SIZE)
        return cls(fd)


class TurnSlots:
    """The main process's allocation of slots to balancer ids."""

    def __init__(self, turns: SharedTurns) -> None:
        self.turns = turns
        self._slots: dict[int, int] = {}
        self._free = list(range(SLOTS - 1, -1, -1))

    def slot_for(self, lb: LoadBalancer) -> int | None:
        slot = self._slots.get(lb.id)
        if slot is None and self._free:
            slot = self._slots[lb.id] = self._free.pop()
            self.turns.counters[2 * slot] = 0
            self.turns.counters[2 * slot + 1] = 0
        return slot

    def free(self, lb: LoadBalancer) -> None:
        slot = self._slots.pop(lb.id, None)
        if slot is not None:
            self._free.append(slot)


class SharedTurnBalancer(LoadBalancer):
    """A balancer copy whose round-robin position is a shared slot (same choices as
    ``LoadBalancer.choose``: the first request goes to index 1 % n)."""

    def __init__(self, *args, turns: SharedTurns, slot: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._counters = turns.counters
        self._slot = 2 * slot

    def choose(self, treat_as_read: bool) -> Target | None:
        counters = self._counters
        if treat_as_read:
            readers = self.healthy_readers
            if readers:
                i = (counters[self._slot + 1] + 1) & _WRAP
                counters[self._slot + 1] = i
                return readers[i % len(readers)]
        writers = self.healthy_writers
        if writers:
            i = (counters[self._slot] + 1) & _WRAP
            counters[self._slot] = i
            return writers[i % len(writers)]
        return None
