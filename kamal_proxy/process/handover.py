"""The hand-over between a running main process and the new one that replaces it.

The running process (``process/upgrade.py``) starts the new one with:

* every listening socket (``process/listening.py``) as an inherited descriptor;
* one end of a socketpair on which the two speak AMP (:class:`Serving`);
* its own stderr (the server's real one) on another descriptor, while the new process's
  stderr is, until it takes over, a pipe the old one reads: what a failed start prints
  (``Error: ...``, a traceback) is also the reason the ``upgrade`` command reports;
* in the environment variable ``KAMAL_PROXY_HANDOVER``, which descriptor is what (JSON), and
  the pid file to move, if any.

The new process starts as any server does, from the state file, but on the inherited sockets
(it binds nothing) and without accepting on the control socket.  Once it serves, it sends
:class:`Serving`; the answer is the commit.  Only then does it accept control connections,
move the pid file to itself, and switch its stderr to the real one: until the answer, the old
process may still call the upgrade off, and then stops it with SIGTERM (it drains what it has
accepted and exits without touching anything the old one owns).  If the old process vanishes
before answering, the new one takes over anyway: it holds every socket, and nobody else serves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from kamal_proxy.observe.events import info, warn
from kamal_proxy.process.listening import ListeningSockets
from kamal_proxy.process.pidfile import PidFile

ENV = "KAMAL_PROXY_HANDOVER"
#: Descriptors of the new process: the AMP channel, the real stderr; sockets from SOCKETS_FD on.
CHANNEL_FD, STDERR_FD, SOCKETS_FD = 3, 4, 5


class HandoverRefused(Exception):
    """The old process called the upgrade off; it stops the new one."""


class Serving(amp.Command):
    """New → old: I serve.  The answer commits the upgrade; an error calls it off."""

    arguments = [(b"pid", amp.Integer())]
    response: list = []
    errors = {HandoverRefused: b"REFUSED"}


@dataclass
class HandoverInfo:
    """What the environment variable carries: descriptor numbers and the pid file."""

    sockets: dict[str, int] = field(default_factory=dict)
    channel: int = CHANNEL_FD
    stderr: int = STDERR_FD
    pidfile: str | None = None
    parent: int = 0

    def to_env(self) -> str:
        return json.dumps(
            {
                "sockets": self.sockets,
                "channel": self.channel,
                "stderr": self.stderr,
                "pidfile": self.pidfile,
                "parent": self.parent,
            }
        )

    @classmethod
    def from_env(cls, text: str) -> HandoverInfo:
        data = json.loads(text)
        return cls(
            sockets={str(k): int(v) for k, v in data["sockets"].items()},
            channel=int(data["channel"]),
            stderr=int(data["stderr"]),
            pidfile=data.get("pidfile") or None,
            parent=int(data.get("parent") or 0),
        )


class _NewSide(amp.AMP):
    def __init__(self, successor: Successor) -> None:
        super().__init__()
        self.successor = successor

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.successor._channel_lost()


class Successor:
    """This process replaces a running one: its sockets, its pid file, its commit."""

    def __init__(self, reactor: Any, handover: HandoverInfo) -> None:
        self.reactor = reactor
        self.info = handover
        self.sockets = ListeningSockets.inherit(handover.sockets)
        self.pidfile = PidFile(handover.pidfile) if handover.pidfile else None
        #: The server's real stderr (ours is a pipe to the old process until the commit).
        self.stderr_fd = handover.stderr
        #: Fires at the commit: this process is the server now.
        self.committed: defer.Deferred[None] = defer.Deferred()
        self._channel: _NewSide | None = None
        self._asked = False

    @classmethod
    def from_environ(
        cls, reactor: Any, environ: MutableMapping[str, str] | None = None
    ) -> Successor | None:
        """The hand-over this process was started for, if any.  The variable is removed, so
        that no worker or later process takes it for its own."""
        env = os.environ if environ is None else environ
        text = env.pop(ENV, None)
        if not text:
            return None
        return cls(reactor, HandoverInfo.from_env(text))

    def connect(self) -> None:
        """Speak AMP with the old process on the inherited channel."""
        import socket

        channel = _NewSide(self)
        self._channel = channel
        self.reactor.adoptStreamConnection(
            self.info.channel, socket.AF_UNIX, protocol.Factory.forProtocol(lambda: channel)
        )
        os.close(self.info.channel)

    def prepare(self) -> None:
        """At start: make sure the pid file can follow this process (raises PidFileError),
        so that an upgrade that could not move it fails before anything changes."""
        if self.pidfile is not None:
            self.pidfile.prepare()

    def serving(self) -> defer.Deferred[None]:
        """Tell the old process this one serves; fires once this process is the server
        (never, when the upgrade is called off: the old process then stops this one)."""
        if self._asked:
            return self.committed
        self._asked = True
        channel = self._channel
        if channel is None or channel.transport is None or not channel.transport.connected:
            self._commit("the old process is gone")
            return self.committed
        d = channel.callRemote(Serving, pid=os.getpid())
        d.addCallbacks(lambda _: self._commit(None), self._refused)
        return self.committed

    def _refused(self, failure: Failure) -> None:
        if failure.check(HandoverRefused):
            warn("Upgrade called off by the old process; stopping")
            if self.pidfile is not None:
                self.pidfile.discard()
            return
        if failure.check(error.ConnectionDone, error.ConnectionLost):
            self._commit("the old process is gone")
            return
        failure.raiseException()

    def _channel_lost(self) -> None:
        if self._asked and not self.committed.called:
            self._commit("the old process is gone")

    def _commit(self, note: str | None) -> None:
        if self.committed.called:
            return
        if note is not None:
            warn("Taking over without an answer", reason=note)
        if self.pidfile is not None:
            try:
                self.pidfile.claim()
            except OSError as e:  # checked by prepare(); keep serving whatever happens
                warn("Unable to update the pid file", error=str(e))
        # From now on our errors go where the server's always went.
        try:
            os.dup2(self.stderr_fd, 2)
            os.close(self.stderr_fd)
        except OSError:
            pass
        self.stderr_fd = 2
        info("Took over from the old process", pid=os.getpid(), old_pid=self.info.parent)
        self.committed.callback(None)


def handover_environment(environ: Mapping[str, str], handover: HandoverInfo) -> dict[str, str]:
    """The new process's environment: ours, with the hand-over variable."""
    return {**environ, ENV: handover.to_env()}
