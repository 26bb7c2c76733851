"""systemd's readiness protocol (``sd_notify``), for ``Type=notify`` units.

systemd gives a ``Type=notify`` service the path of a datagram socket in ``$NOTIFY_SOCKET``
and waits for ``READY=1`` before it counts the service as started.  An upgrade moves the
service to another process: the process systemd knows sends ``MAINPID=<new pid>`` before it
exits, so systemd follows the new one instead of taking the old one's exit for the service's
end (``example/kamal-proxy.service``).  ``STOPPING=1`` tells it a stop has begun.

Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.  Worker processes get
an environment without it: only the main process speaks for the service.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

ENV = "NOTIFY_SOCKET"


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; True if it was sent.

    Never raises: a service manager that went away must not stop the proxy.
    """
    path = (os.environ if environ is None else environ).get(ENV)
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        address = "\0" + path[1:]
    else:
        address = path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True


def without_notify(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a process that must not speak for the service (a worker)."""
    return {k: v for k, v in environ.items() if k != ENV}
