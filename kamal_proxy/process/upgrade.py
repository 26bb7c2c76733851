"""``kamal-proxy upgrade`` (and SIGUSR2): replace the running server by a new process started
from the code installed now, without refusing a connection or failing a request.

The running main process (the *old* one) does this, step by step:

1. Stops accepting on the control socket.  Connections keep queueing in its backlog (a CLI
   command waits there, it does not fail), and the commands already accepted are let finish
   (a deploy waiting for health checks, say; :data:`COMMANDS_TIMEOUT` at most), so that the
   state written next is final and no later command reaches this process.
2. Waits for certificates being issued (:data:`ACME_TIMEOUT` at most), so that the new
   process finds them in the certificate store instead of ordering them again, and writes the
   state file.
3. Starts the new process (``process/relaunch.py``) with every listening socket and the
   control socket as inherited descriptors (``process/handover.py``).  The new process
   restores the state file (targets trusted healthy, as on any restore; certificates from the
   store), serves on the inherited sockets alongside this one, and says so.
4. Commits: from here on the new process owns the state file, the control socket (it accepts
   the queued commands), the pid file and, under systemd, the service (``MAINPID=``).
5. Answers the command, then stops like a SIGTERM stop except that it closes none of the shared
   sockets for the others (and does not remove the control socket file), and gives its
   requests in flight, WebSocket tunnels included, up to ``--drain-timeout`` (30 s by
   default) before it closes what is left cleanly and exits.

If the new process exits, or does not serve within :data:`START_TIMEOUT`, the upgrade is
called off: the new process is stopped, the control socket accepts again, and the command
fails with the reason (the last line the new process printed, usually its ``Error: ...``).
Nothing else changed, so the next upgrade can be tried at once.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure

from kamal_proxy.control.commands import CommandFailed
from kamal_proxy.observe.events import error, info, warn
from kamal_proxy.process import notify
from kamal_proxy.process.handover import (
    CHANNEL_FD,
    SOCKETS_FD,
    STDERR_FD,
    HandoverInfo,
    HandoverRefused,
    Serving,
    handover_environment,
)
from kamal_proxy.process.relaunch import Relaunch
from kamal_proxy.service_options import DEFAULT_DRAIN_TIMEOUT  # a deploy's too

#: The new process must serve within this many seconds.
START_TIMEOUT = 30.0
#: Commands in progress on the control socket may take this long to finish.
COMMANDS_TIMEOUT = 120.0
#: Certificates being issued may take this long (then the new process orders them anew).
ACME_TIMEOUT = 60.0
#: A new process that was called off gets this long to stop, then it is killed.
STOP_TIMEOUT = 15.0
#: Bytes of the new process's stderr kept for the reason of a failed start.
STDERR_TAIL = 8192


class UpgradeError(CommandFailed):
    """The upgrade did not happen; ``str()`` is what ``upgrade`` prints after ``Error: ``."""


class _OldSide(amp.AMP):
    """The old process's end of the hand-over channel."""

    def __init__(self, new: NewProcess) -> None:
        super().__init__()
        self.new = new

    @Serving.responder
    def serving(self, pid: int) -> defer.Deferred:
        return self.new._serving(pid)


class NewProcess(protocol.ProcessProtocol):
    """The new process as the old one sees it during the hand-over."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pid: int | None = None
        self.process: Any = None
        self.channel: _OldSide | None = None
        #: Fires with the new pid once it says it serves.
        self.ready: defer.Deferred[int] = defer.Deferred()
        #: Our answer to its ``Serving``: {} commits, HandoverRefused calls it off.
        self.decision: defer.Deferred[dict] | None = None
        #: Fires with the exit reason (a Failure's value) when it exits.
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.exit: Any = None
        #: Where its output goes on (this process's stderr), besides the tail kept here.
        self.passthrough: int | None = 2
        self._stderr = bytearray()

    def _serving(self, pid: int) -> defer.Deferred[dict]:
        if self.decision is None:
            self.decision = defer.Deferred()
            if self.ready.called:  # too late: the upgrade was called off meanwhile
                self.decision.errback(HandoverRefused("upgrade called off"))
            else:
                self.ready.callback(pid)
        return self.decision

    # -- ProcessProtocol -------------------------------------------------------------------

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 2:
            return
        # Pass it on (it is the server's output) and keep the end for the reason of a failure.
        if self.passthrough is not None:
            try:
                os.write(self.passthrough, data)
            except OSError:
                pass
        self._stderr += data
        del self._stderr[:-STDERR_TAIL]

    def processEnded(self, reason: Failure) -> None:
        self.exit = reason.value
        if not self.ready.called:
            self.ready.errback(UpgradeError(self.failure_reason()))
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        self.ended.callback(reason.value)

    # -- outcome -------------------------------------------------------------------------------

    def failure_reason(self) -> str:
        """Why it stopped: its exit status or signal, and the last line it printed."""
        value = self.exit
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if sig:
            try:
                import signal

                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            how = f"was killed by signal {sig} ({name})"
        else:
            how = f"exited with status {code}"
        last = _last_line(bytes(self._stderr))
        if not last:
            # A crash says it all; a process that exited may have said why on stdout.
            hint = "" if sig else " (its output is in the server's log)"
            return f"new process {how} before serving{hint}"
        return f"new process {how} before serving: {last}"

    def commit(self) -> None:
        if self.decision is not None and not self.decision.called:
            self.decision.callback({})

    async def call_off(self) -> None:
        """Refuse it, stop it (SIGTERM, then SIGKILL) and wait until it is gone."""
        if self.decision is not None and not self.decision.called:
            self.decision.errback(HandoverRefused("upgrade called off"))
        if self.ended.called:
            return
        self._signal("TERM")
        timer = self.reactor.callLater(STOP_TIMEOUT, self._signal, "KILL")
        try:
            await self.ended
        finally:
            if timer.active():
                timer.cancel()

    def _signal(self, name: str) -> None:
        try:
            self.process.signalProcess(name)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _last_line(data: bytes) -> str:
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        line = line.strip()
        if line:
            return line.removeprefix("Error: ")
    return ""


class Upgrader:
    """Runs upgrades of this process (one at a time) for the control command and the signal.

    ``control`` is the control socket (``app.ControlSocket``: pause, resume, quiesce,
    release), ``sockets`` the listening sockets to hand over, ``stop(drain_seconds)`` stops
    this server for good once the new one has taken over.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        control: Any,
        router: Any,
        acme: Any,
        sockets: Any,
        relaunch: Relaunch,
        stop: Callable[[float], None],
    ) -> None:
        self.reactor = reactor
        self.control = control
        self.router = router
        self.acme = acme
        self.sockets = sockets
        self.relaunch = relaunch
        self.stop = stop
        self.state = "idle"  # "upgrading", then "done" once handed over
        self.new: NewProcess | None = None

    # -- entry points ----------------------------------------------------------------------

    def upgrade(
        self, drain_timeout: int = DEFAULT_DRAIN_TIMEOUT, requester: Any = None
    ) -> defer.Deferred[int]:
        """Upgrade; fires with the new process's pid once it serves, or fails with
        :class:`UpgradeError`.  ``requester`` is the control connection that asked (it is
        answered, not waited for)."""
        return defer.ensureDeferred(self._upgrade(drain_timeout, requester))

    def on_signal(self) -> None:
        """SIGUSR2: upgrade with the default drain; the outcome is logged."""
        d = self.upgrade()
        d.addErrback(lambda f: f.trap(UpgradeError))

    def cancel(self) -> None:
        """The server is stopping: an upgrade in progress is called off."""
        if self.state == "upgrading" and self.new is not None and not self.new.ready.called:
            self.new.ready.errback(UpgradeError("the server is stopping"))

    # -- the steps ---------------------------------------------------------------------------

    async def _upgrade(self, drain_timeout: int, requester: Any) -> int:
        if self.state == "upgrading":
            raise UpgradeError("an upgrade is already in progress")
        if self.state == "done":
            raise UpgradeError("this process has already handed over to another")
        if os.getpid() == 1:
            raise UpgradeError(
                "this server is PID 1 (a container's main process): the container would end "
                "with it; replace the container instead"
            )
        self.state = "upgrading"
        started = time.monotonic()
        info("Upgrading", pid=os.getpid(), command=self.relaunch.argv)
        new: NewProcess | None = None
        try:
            self.control.pause()
            await self.control.quiesce(requester, COMMANDS_TIMEOUT)
            await self._certificates_issued()
            self._save_state()
            new = self.new = self._spawn()
            timer = self.reactor.callLater(START_TIMEOUT, self._too_slow, new)
            try:
                pid = await new.ready
            finally:
                if timer.active():
                    timer.cancel()
        except Exception as e:
            if new is not None:
                await new.call_off()
            self.new = None
            self.control.resume()
            self.state = "idle"
            reason = str(e) if isinstance(e, UpgradeError) else f"{type(e).__name__}: {e}"
            error("Upgrade failed", error=reason)
            raise UpgradeError(reason) from None

        self._commit(new, pid, drain_timeout)
        info(
            "Upgraded",
            pid=pid,
            old_pid=os.getpid(),
            seconds=round(time.monotonic() - started, 3),
        )
        return pid

    def _too_slow(self, new: NewProcess) -> None:
        if not new.ready.called:
            new.ready.errback(UpgradeError(f"new process did not serve within {START_TIMEOUT:g}s"))

    async def _certificates_issued(self) -> None:
        deadline = self.reactor.seconds() + ACME_TIMEOUT
        while self.acme is not None and self.acme.issuing():
            if self.reactor.seconds() >= deadline:
                warn("Upgrading while a certificate is still being issued")
                return
            await deferLater(self.reactor, 0.1, lambda: None)

    def _save_state(self) -> None:
        """Write the state the new process starts from (it is written after every change
        already; this makes sure the file on disk is complete and current)."""
        from kamal_proxy.routing import state as statefile

        path = self.router.state_path
        if path is None:
            return
        try:
            statefile.save(path, self.router.snapshot())
        except Exception as e:  # noqa: BLE001 - any failure to save calls the upgrade off
            raise UpgradeError(f"unable to save state: {e}") from None

    def _spawn(self) -> NewProcess:
        new = NewProcess(self.reactor)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stdin = os.open(os.devnull, os.O_RDONLY)
        fds: dict[int, Any] = {0: stdin, 1: 1, 2: "r", CHANNEL_FD: theirs.fileno(), STDERR_FD: 2}
        handed: dict[str, int] = {}
        for number, (role, fd) in enumerate(sorted(self.sockets.fds().items()), SOCKETS_FD):
            fds[number] = fd
            handed[role] = number
        pidfile = self.relaunch.pidfile
        handover = HandoverInfo(
            sockets=handed,
            pidfile=pidfile.path if pidfile is not None else None,
            parent=os.getpid(),
        )
        try:
            new.process = self.reactor.spawnProcess(
                new,
                self.relaunch.executable,
                self.relaunch.argv,
                env=handover_environment(os.environ, handover),
                childFDs=fds,
            )
        except OSError as e:
            ours.close()
            raise UpgradeError(f"unable to start the new process: {e}") from None
        finally:
            os.close(stdin)
            theirs.close()
        new.pid = new.process.pid
        channel = _OldSide(new)
        new.channel = channel
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, protocol.Factory.forProtocol(lambda: channel)
        )
        ours.close()
        info("Started the new process", pid=new.pid)
        return new

    def _commit(self, new: NewProcess, pid: int, drain_timeout: int) -> None:
        """The new process is the server from now on; this one only finishes its work."""
        self.state = "done"
        # Nothing here writes the state file again: it is the new process's.
        self.router.state_path = None
        if self.relaunch.pidfile is not None:
            self.relaunch.pidfile.release()
        # Under systemd the service is the new process before this one exits.
        notify.notify(f"MAINPID={pid}")
        self.control.release()
        new.commit()
        drain = max(drain_timeout, 0) / 1e9
        # After this turn, so that the answer to the command is written first.
        self.reactor.callLater(0, self.stop, drain)
