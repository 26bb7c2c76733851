"""pyOpenSSL and cryptography are loaded when TLS is first used, not when the proxy starts.

Together they are some 13 MiB of a process's memory, and a proxy whose services all speak
plain HTTP never needs them.  Two Twisted modules import pyOpenSSL whenever it is installed:
the TCP transport (``twisted.internet.tcp``, for ``startTLS``, through ``_newtls``; the
reactor's ``listenSSL``/``connectSSL`` in ``posixbase`` likewise) and AMP (for its
``StartTLS`` command).  The proxy uses none of these: its HTTPS listener wraps connections in
``TLSMemoryBIOFactory`` when the first ClientHello arrives, and its HTTPS client (ACME,
through treq) does the same.

:func:`import_twisted_without_tls` imports those modules while pyOpenSSL is hidden, so they
come up without their TLS extras; afterwards pyOpenSSL imports normally, the first time the
HTTPS port sees a handshake or a certificate is loaded.  It must run before anything imports
the reactor, so it runs when this module is first imported (``kamal_proxy.app`` imports it
first of all); once Twisted's TCP module is loaded, it does nothing.

In the same window the standard library's own OpenSSL binding (``ssl``, ``_hashlib``: libcrypto
and libssl, some 4.5 MiB of every process) is hidden too.  Twisted's core imports it only
through modules the proxy never uses for TLS: ``asyncio`` (for ``Deferred.asFuture``), and
``urllib.request`` with ``http.client`` (through ``http.cookiejar``).  Those come up without
their TLS parts (a server process runs no asyncio loop, so it never misses asyncio's TLS
transports); ``hashlib`` and ``hmac`` use the interpreter's built-in digests, which give
the same results.  ``http.client`` and ``urllib.request`` are then forgotten, so whoever
imports them later (prometheus_client, when metrics are on) gets them whole, and ``ssl``
imports normally.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["import_twisted_without_tls", "lazy_module", "preload"]

# Imported with pyOpenSSL hidden: the reactor's modules (not the reactor itself, which is
# installed later by whoever runs it), AMP, and twisted.web's interfaces (through twisted.cred,
# the first importer of ``hmac``).
_MODULES = (
    "twisted.internet.tcp",
    "twisted.internet.posixbase",
    "twisted.internet.epollreactor",
    "twisted.protocols.amp",
    "twisted.web.iweb",
)

# Hidden while they load: pyOpenSSL, and the standard library's binding to OpenSSL.
_HIDDEN = ("OpenSSL", "ssl", "_ssl", "_hashlib")

# Loaded without TLS in that window, and loaded again, whole, by whoever imports them next.
_FORGOTTEN = ("http.client", "urllib.request")


def import_twisted_without_tls() -> bool:
    """Import Twisted's TCP, reactor and AMP modules without their pyOpenSSL extras, and
    Twisted's core without the standard library's ``ssl``.

    Returns False (and does nothing) when it is too late: Twisted's TCP module or pyOpenSSL
    is already loaded.  A module of ``_HIDDEN`` that is loaded already stays as it is.
    """
    if "twisted.internet.tcp" in sys.modules or "OpenSSL" in sys.modules:
        return False
    hidden = [name for name in _HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        for name in _MODULES:
            try:
                importlib.import_module(name)
            except ImportError:  # e.g. no epoll on this platform
                pass
    finally:
        for name in hidden:
            del sys.modules[name]
        if "ssl" in hidden:
            for name in _FORGOTTEN:
                sys.modules.pop(name, None)
    return True


class lazy_module:  # noqa: N801 - stands in for a module name
    """A module imported when one of its attributes is first used.

    For the libraries of features a proxy may never use (the ACME protocol: josepy, acme,
    treq, cryptography): ``messages = lazy_module("acme.messages")`` at the top of a module,
    then ``messages.Order`` imports ``acme.messages`` the first time it runs.
    """

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def preload(*modules: lazy_module) -> None:
    """Import lazy modules now (for a process about to lose the right to read them)."""
    for module in modules:
        if module._module is None:
            module._module = importlib.import_module(module._name)


import_twisted_without_tls()
