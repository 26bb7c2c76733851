"""Pause, stop and resume of one service (SPEC §14): a state plus the requests held while paused."""

from __future__ import annotations

import enum

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime


class PauseState(enum.IntEnum):
    RUNNING = 0
    PAUSED = 1
    STOPPED = 2


class Released(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    EXPIRED = "expired"


class PauseController:
    """Holds requests while paused; each waiter keeps the max-pause it started with."""

    def __init__(self) -> None:
        self.state = PauseState.RUNNING
        self.stop_message = ""
        self.fail_after = 0
        self._waiters: list[tuple[defer.Deferred, object]] = []

    @property
    def name(self) -> str:
        return self.state.name.lower()

    def pause(self, fail_after: int) -> None:
        self.state = PauseState.PAUSED
        self.fail_after = fail_after

    def stop(self, message: str) -> None:
        self.state = PauseState.STOPPED
        self.stop_message = message
        self._release(Released.STOPPED)

    def resume(self) -> None:
        self.state = PauseState.RUNNING
        self.stop_message = ""
        self._release(Released.RUNNING)

    def wait(self, reactor: IReactorTime) -> defer.Deferred[Released]:
        """Fires when the service resumes or stops, or when this request's max-pause expires."""
        d: defer.Deferred[Released] = defer.Deferred()
        timer = reactor.callLater(max(self.fail_after, 0) / 1e9, self._expire, d)
        self._waiters.append((d, timer))
        return d

    def _expire(self, d: defer.Deferred) -> None:
        self._waiters = [(w, t) for w, t in self._waiters if w is not d]
        if not d.called:
            d.callback(Released.EXPIRED)

    def _release(self, how: Released) -> None:
        waiters, self._waiters = self._waiters, []
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            if not d.called:
                d.callback(how)
