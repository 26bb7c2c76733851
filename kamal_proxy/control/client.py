"""The CLI side of the control plane: one AMP command over the Unix socket, then hang up.

Failures are turned into the texts the Go original prints (``dial unix <path>: connect: no
such file or directory``, ``unexpected EOF``, or the server's own message), because the CLI
shows them verbatim after ``Error: ``.  There is deliberately no client-side timeout: a deploy
legitimately waits for health checks and draining on the server.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorUNIX
from twisted.protocols import amp
from twisted.python.failure import Failure

from kamal_proxy.control.commands import CommandFailed

# sockaddr_un.sun_path holds 108 bytes on Linux including the terminating NUL.
_MAX_SOCKET_PATH = 107


class ControlError(Exception):
    """A control-plane call failed; ``str()`` is the message to print after ``Error: ``."""


def call(
    reactor: IReactorUNIX, path: str, command: type[amp.Command], **arguments: Any
) -> Deferred[dict[str, Any]]:
    """Connect to ``path``, run ``command`` and disconnect; fails with :class:`ControlError`."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        return _failed(_dial_error(path, errno.EINVAL))
    connecting = connectProtocol(UNIXClientEndpoint(reactor, path), amp.AMP())

    def connected(protocol: amp.AMP) -> Deferred[dict[str, Any]]:
        d = protocol.callRemote(command, **arguments)

        def hang_up(result: Any) -> Any:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            return result

        d.addBoth(hang_up)
        d.addErrback(_call_failed)
        return d

    def not_connected(failure: Failure) -> Failure:
        failure.trap(net_error.ConnectError)
        code = getattr(failure.value, "osError", None)
        if not isinstance(code, int):
            code = errno.ECONNREFUSED
        raise _dial_error(path, code)

    connecting.addCallbacks(connected, not_connected)
    return connecting


def call_blocking(command: type[amp.Command], path: str, **arguments: Any) -> dict[str, Any]:
    """Run :func:`call` on a private reactor until it finishes (one CLI call per process).

    A private reactor rather than the global one keeps this usable from a process (or a test)
    that already owns the global reactor, and a reactor cannot be restarted anyway.
    """
    reactor = _private_reactor()
    outcome: list[Any] = []

    def start() -> None:
        d = call(reactor, path, command, **arguments)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        _dispose(reactor)
    result = outcome[0] if outcome else Failure(ControlError("unexpected EOF"))
    if isinstance(result, Failure):
        if result.check(ControlError):
            raise result.value
        raise ControlError(result.getErrorMessage())
    return result


def _private_reactor() -> Any:
    try:
        from twisted.internet.pollreactor import PollReactor

        return PollReactor()
    except ImportError:  # pragma: no cover - platforms without poll()
        from twisted.internet.selectreactor import SelectReactor

        return SelectReactor()


def _dispose(reactor: Any) -> None:
    """Close the reactor's wake-up pipe so repeated calls in one process do not leak fds."""
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        try:
            reactor.removeReader(waker)
            waker.connectionLost(None)
        except Exception:  # noqa: BLE001 - best effort cleanup only
            pass


def _failed(exc: Exception) -> Deferred[dict[str, Any]]:
    d: Deferred[dict[str, Any]] = Deferred()
    d.errback(Failure(exc))
    return d


def _dial_error(path: str, code: int) -> ControlError:
    reason = os.strerror(code)
    reason = reason[:1].lower() + reason[1:]
    return ControlError(f"dial unix {path}: connect: {reason}")


def _call_failed(failure: Failure) -> None:
    if failure.check(CommandFailed, amp.UnknownRemoteError, amp.RemoteAmpError):
        raise ControlError(_text(failure.value)) from None
    if failure.check(net_error.ConnectionClosed, amp.ProtocolSwitched):
        raise ControlError("unexpected EOF") from None
    raise ControlError(failure.getErrorMessage()) from None


def _text(exc: BaseException) -> str:
    value: Any = exc.args[0] if exc.args else str(exc)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
