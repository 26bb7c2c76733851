"""The AMP responder: one command in, one Router call, one reply or ``CommandFailed``.

The socket is a security boundary: besides its 0600 mode, connections from any other user
than the server's own (or root) are refused by their peer credentials.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import struct

from twisted.internet import defer
from twisted.protocols import amp

from kamal_proxy.control import commands
from kamal_proxy.observe.events import warn
from kamal_proxy.routing.router import Router, RouterError
from kamal_proxy.service_options import ServiceOptions, TargetOptions


class ControlProtocol(amp.AMP):
    #: Commands received and not answered yet, and answered: an upgrade waits until no
    #: connection has a command in progress (``process/upgrade.py``).
    pending = 0
    answered = 0

    def __init__(self, router: Router, controller=None, upgrader=None) -> None:
        super().__init__()
        self.router = router
        # Pause/stop/resume and rollout live in their own controller (traffic issue).
        self.controller = controller
        self.upgrader = upgrader

    def makeConnection(self, transport) -> None:
        # AMP logs every connection made and lost: two lines per CLI call in twistd's log.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    def connectionMade(self) -> None:
        super().connectionMade()
        uid = _peer_uid(self.transport)
        if uid is not None and uid not in (0, os.getuid()):
            warn("Refused control connection from another user", uid=uid)
            self.transport.abortConnection()

    def dispatchCommand(self, box):
        self.pending += 1

        def done(result):
            self.pending -= 1
            self.answered += 1
            return result

        return super().dispatchCommand(box).addBoth(done)

    def _call(self, fn, *args, **kwargs):
        """Run a Router call; its RouterError becomes the CommandFailed the CLI prints."""

        async def call():
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    await result
            except RouterError as e:
                raise commands.CommandFailed(str(e)) from None
            return {}

        return defer.ensureDeferred(call())

    @commands.Deploy.responder
    def deploy(
        self,
        service,
        targets,
        readers,
        deploy_timeout,
        drain_timeout,
        force,
        service_options,
        target_options,
        progress=None,
    ):
        try:
            options = ServiceOptions.from_json(json.loads(service_options))
            topts = TargetOptions.from_json(json.loads(target_options))
        except (ValueError, TypeError, AttributeError) as e:
            raise commands.CommandFailed(f"invalid options: {e}") from None
        return self._call(
            self.router.deploy,
            service,
            list(targets),
            list(readers),
            deploy_timeout,
            drain_timeout,
            force,
            options,
            topts,
            observer=self._observer(progress),
        )

    @commands.Remove.responder
    def remove(self, service):
        return self._call(self.router.remove, service)

    @commands.List.responder
    def list_services(self):
        return {"services": json.dumps(self.router.list_services())}

    def _controller_call(self, name: str, *args, **kwargs):
        method = getattr(self.controller, name, None)
        if method is None:
            raise commands.CommandFailed(f"{name} is not supported yet")
        return self._call(method, *args, **kwargs)

    def _observer(self, progress: bool | None) -> DeployProgressSender | None:
        """Progress for a client that asked for it; the others get nothing new."""
        return DeployProgressSender(self) if progress else None

    @commands.Pause.responder
    def pause(self, service, drain_timeout, pause_timeout):
        return self._controller_call("pause", service, drain_timeout, pause_timeout)

    @commands.Stop.responder
    def stop(self, service, drain_timeout, message):
        return self._controller_call("stop", service, drain_timeout, message)

    @commands.Resume.responder
    def resume(self, service):
        return self._controller_call("resume", service)

    @commands.RolloutDeploy.responder
    def rollout_deploy(
        self, service, targets, readers, deploy_timeout, drain_timeout, progress=None
    ):
        return self._controller_call(
            "rollout_deploy",
            service,
            list(targets),
            list(readers),
            deploy_timeout,
            drain_timeout,
            observer=self._observer(progress),
        )

    @commands.RolloutSet.responder
    def rollout_set(self, service, percentage, allowlist):
        return self._controller_call("rollout_set", service, percentage, list(allowlist))

    @commands.RolloutStop.responder
    def rollout_stop(self, service):
        return self._controller_call("rollout_stop", service)

    @commands.Upgrade.responder
    def upgrade(self, drain_timeout):
        if self.upgrader is None:
            raise commands.CommandFailed("upgrade is not supported by this server")
        # A failure is an UpgradeError, a CommandFailed: the CLI prints its reason.
        d = self.upgrader.upgrade(drain_timeout, requester=self)
        return d.addCallback(lambda pid: {"pid": pid})


class DeployProgressSender:
    """A ``DeployObserver`` that sends each event to the client of a pending deploy, as a
    ``DeployProgress`` notification on its connection (read before the answer)."""

    def __init__(self, protocol: amp.AMP) -> None:
        self.protocol = protocol

    def health_checked(self, target: str, reason: str | None) -> None:
        self._send(event="health", target=target, reason=reason or "")

    def draining(self, targets: list[str], timeout: int) -> None:
        self._send(event="drain", targets=list(targets), timeout=timeout)

    def drained(self, targets: list[str]) -> None:
        self._send(event="drained", targets=list(targets))

    def _send(self, **values) -> None:
        if self.protocol.transport is None:
            return  # the client left (Ctrl-C): the deploy goes on without it
        try:
            self.protocol.callRemote(commands.DeployProgress.amp(), **values)
        except Exception as e:  # noqa: BLE001 - progress must never fail the deploy
            warn("Unable to send deploy progress", error=str(e))


def _peer_uid(transport) -> int | None:
    try:
        sock = transport.getHandle()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
