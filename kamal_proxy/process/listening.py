"""The server's listening sockets, by role, bound here or inherited from the process replaced.

DESIGN §1: the listening sockets outlive any one process.  Every socket the server listens on
(HTTP, HTTPS, metrics, the control socket, the UDP sockets of HTTP/3) is opened once, by this
registry, and held by it for as long as the process serves, so that an upgrade
(``process/upgrade.py``) can hand every one of them to the next main process at any moment.
The next process finds them under the same roles (:meth:`ListeningSockets.inherit`) and never
binds again, so the ports never close and nothing queued in their backlogs is lost.

The reactor serves a registry socket through ``adoptStreamPort``/``adoptDatagramPort``, on a
duplicate of the descriptor: Twisted then closes its copy without ``shutdown()`` when the port
stops (it calls ``shutdown()`` on the sockets of ``listenTCP``/``listenUNIX``, which would stop
the listening socket for every process that shares it).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Mapping

from kamal_proxy.startup import BindError

#: As Twisted's ``listenTCP``; the kernel caps it at ``net.core.somaxconn``.
BACKLOG = 1024
#: As Twisted's ``listenUNIX``.
UNIX_BACKLOG = 50


def bind_tcp(port: int, interface: str = "::") -> socket.socket:
    """A non-blocking listening TCP socket as ``listenTCP(port, interface=...)`` makes it:
    ``SO_REUSEADDR``, dual-stack on ``::``, a backlog of :data:`BACKLOG`."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((interface, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError("tcp", f":{port}", e) from None
    return sock


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600 from the start (umask while
    binding), replacing a stale file there."""
    try:
        os.unlink(path)
    except OSError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(UNIX_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError("unix", path, e) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def bind_udp(port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking dual-stack UDP socket on ``[::]:port`` (HTTP/3); with ``reuse_port``
    several can share the port, one per worker."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::", port))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError("udp", f":{port}", e) from None
    return sock


def adopt_unix_port(reactor, sock: socket.socket, factory):
    """Serve the listening Unix socket ``sock`` with ``factory``, as ``adoptStreamPort`` does,
    but leave its file as it is: Twisted's Unix port makes the file world-writable (mode 0666)
    when it starts, and shuts the socket down and removes its file when it stops, which would
    open the control socket to every user, and take it from the new process of an upgrade."""
    from twisted.internet import tcp, unix

    class KeptFilePort(unix.Port):
        # Close without shutdown(), as Twisted does for adopted TCP ports (its Unix port
        # forgets to): shutdown() would stop the socket for the other processes holding it.
        _shouldShutdown = False

        def connectionLost(self, reason):
            tcp.Port.connectionLost(self, reason)

    port = KeptFilePort._fromListeningDescriptor(reactor, sock.fileno(), factory)
    port.mode = stat.S_IMODE(os.stat(sock.getsockname()).st_mode)
    port.startListening()
    return port


def _bound_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def _listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


class ListeningSockets:
    """Role -> socket.  ``tcp``/``unix``/``udp`` give the socket of a role: the inherited one
    when it fits the request, else a new one.  Inherited sockets that nobody asks for are
    closed by :meth:`close_unclaimed`."""

    def __init__(self) -> None:
        self._sockets: dict[str, socket.socket] = {}
        self._inherited: dict[str, socket.socket] = {}

    @classmethod
    def inherit(cls, fds: Mapping[str, int]) -> ListeningSockets:
        """The sockets handed over by the previous process: role -> descriptor (ours now)."""
        registry = cls()
        for role, fd in fds.items():
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                continue
            sock.setblocking(False)
            registry._inherited[role] = sock
        return registry

    @classmethod
    def bound_early(cls, ports: Mapping[str, int]) -> ListeningSockets:
        """Role -> TCP port bound first thing at start (``kamal-proxy run``), before the
        server's modules are imported: from then on a connection waits in the backlog for the
        server instead of being refused.  Best effort: a port that cannot be bound now is left
        to the usual bind, which reports why; one the server does not ask for is closed."""
        registry = cls()
        for role, port in ports.items():
            if port <= 0:
                continue
            try:
                registry._inherited[role] = bind_tcp(port)
            except OSError:
                pass
        return registry

    # -- the sockets of each role ------------------------------------------------------------

    def tcp(self, role: str, port: int, interface: str = "::") -> socket.socket:
        return self._socket(
            role,
            lambda s: (
                s.type == socket.SOCK_STREAM
                and s.family in (socket.AF_INET, socket.AF_INET6)
                and _listening(s)
                and (port == 0 or _bound_port(s) == port)
            ),
            lambda: bind_tcp(port, interface),
        )

    def unix(self, role: str, path: str) -> socket.socket:
        return self._socket(
            role,
            lambda s: (
                s.family == socket.AF_UNIX
                and _listening(s)
                and s.getsockname() == path
                and _socket_file_exists(path)
            ),
            lambda: bind_unix(path),
        )

    def udp(self, role: str, port: int, reuse_port: bool = False) -> socket.socket:
        return self._socket(
            role,
            lambda s: s.type == socket.SOCK_DGRAM and (port == 0 or _bound_port(s) == port),
            lambda: bind_udp(port, reuse_port),
        )

    def _socket(
        self,
        role: str,
        fits: Callable[[socket.socket], bool],
        bind: Callable[[], socket.socket],
    ) -> socket.socket:
        """The socket of ``role``: the one held already, else the one handed over if it
        ``fits`` (one that does not is closed), else a new one from ``bind``."""
        sock = self._sockets.get(role)
        if sock is not None:
            return sock
        sock = self._inherited.pop(role, None)
        if sock is not None:
            try:
                fitting = fits(sock)
            except OSError:
                fitting = False
            if not fitting:
                sock.close()
                sock = None
        if sock is None:
            sock = bind()
        self._sockets[role] = sock
        return sock

    # -- handing over, closing ---------------------------------------------------------------

    def fds(self) -> dict[str, int]:
        """Role -> descriptor of every socket held now (for the next process)."""
        return {role: sock.fileno() for role, sock in self._sockets.items()}

    def inherited(self, role: str) -> bool:
        """A socket of ``role`` was handed over and not claimed yet."""
        return role in self._inherited

    def get(self, role: str) -> socket.socket | None:
        return self._sockets.get(role)

    def close(self, role: str) -> None:
        sock = self._sockets.pop(role, None)
        if sock is not None:
            sock.close()

    def close_unclaimed(self) -> None:
        """Close the inherited sockets this process has no role for (e.g. fewer workers)."""
        for sock in self._inherited.values():
            sock.close()
        self._inherited.clear()

    def close_all(self) -> None:
        for role in list(self._sockets):
            self.close(role)
        self.close_unclaimed()


def _socket_file_exists(path: str) -> bool:
    """A socket file is still at ``path`` (when it was removed, clients can no longer reach
    the inherited socket: binding a new one is better)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
