"""The CLI side of the control plane: one AMP command over the Unix socket, then hang up.

It speaks AMP itself (:mod:`kamal_proxy.control.wire`) over a blocking socket: a CLI call
sends one box and reads one, so it needs neither a reactor nor Twisted, whose import cost the
operator more time than the call.

Failures are turned into the texts the Go original prints (``dial unix <path>: connect: no
such file or directory``, ``unexpected EOF``, or the server's own message), because the CLI
shows them verbatim after ``Error: ``.  There is deliberately no client-side timeout: a deploy
legitimately waits for health checks and draining on the server.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from kamal_proxy.control import wire

# sockaddr_un.sun_path holds 108 bytes on Linux including the terminating NUL.
_MAX_SOCKET_PATH = 107
_TAG = b"1"


class ControlError(Exception):
    """A control-plane call failed; ``str()`` is the message to print after ``Error: ``."""


#: Notification command -> what to do with its values (``DeployProgress`` on a terminal).
Notifications = Mapping[type[wire.Command], Callable[[dict[str, Any]], None]]


def call(
    command: type[wire.Command],
    path: str,
    on_notification: Notifications | None = None,
    **arguments: Any,
) -> dict[str, Any]:
    """Connect to ``path``, run ``command`` and disconnect; fails with :class:`ControlError`.

    Notifications the server sends before the answer (those the command asked for) go to
    ``on_notification`` as they arrive; others are ignored.
    """
    request = command.request(_TAG, arguments)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise _dial_error(path, errno.EINVAL)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            raise _dial_error(path, e.errno or errno.ECONNREFUSED) from None
        try:
            sock.sendall(request)
            box = _read_reply(sock, on_notification or {})
        except (OSError, wire.WireError):
            raise ControlError("unexpected EOF") from None
    if wire.ERROR in box:
        description = box.get(wire.ERROR_DESCRIPTION, b"")
        raise ControlError(description.decode("utf-8", "replace"))
    try:
        return command.parse_response(box)
    except (KeyError, ValueError, wire.WireError) as e:
        raise ControlError(f"invalid reply to {command.__name__}: {e}") from None


def _read_reply(sock: socket.socket, on_notification: Notifications) -> wire.Box:
    handlers = {
        command.commandName: (command, handle) for command, handle in on_notification.items()
    }
    reader = wire.BoxReader()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ControlError("unexpected EOF")
        for box in reader.feed(data):
            if box.get(wire.ANSWER) == _TAG or box.get(wire.ERROR) == _TAG:
                return box
            found = handlers.get(box.get(wire.COMMAND, b""))
            if found is not None and wire.ASK not in box:
                command, handle = found
                try:
                    values = command.parse_arguments(box)
                except (KeyError, ValueError, wire.WireError):
                    continue  # a notification is only ever informative
                handle(values)


def _dial_error(path: str, code: int) -> ControlError:
    reason = os.strerror(code)
    reason = reason[:1].lower() + reason[1:]
    return ControlError(f"dial unix {path}: connect: {reason}")
