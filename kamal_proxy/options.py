"""Run options and the file locations shared by the server and the CLI (SPEC §2.2, §2.4, §3.4)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "KAMAL_PROXY_"
SOCKET_NAME = "kamal-proxy.sock"
STATE_NAME = "kamal-proxy.state"


def default_workers() -> int:
    """The CPUs this process may run on (as the Go original uses every core)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


@dataclass(slots=True)
class RunOptions:
    http_port: int = 80
    https_port: int = 443
    metrics_port: int = 0
    debug: bool = False
    http3: bool = False
    # Where the state file lives; None means the data directory's default.
    state_path: str | None = None
    # ACME directory and CA bundle overrides (issue: TLS); empty means per-service/default.
    acme_directory: str = ""
    acme_ca_bundle: str = ""
    # Processes serving traffic; 1 keeps everything in this one process, 0 (or less) asks
    # for the default: one per usable CPU.
    workers: int = field(default_factory=default_workers)

    def __post_init__(self) -> None:
        if self.workers < 1:
            self.workers = default_workers()


def env_lookup(key: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``KAMAL_PROXY_<key>`` wins whenever it exists (even empty), else ``<key>``."""
    env = os.environ if environ is None else environ
    prefixed = ENV_PREFIX + key
    if prefixed in env:
        return env[prefixed]
    return env.get(key)


_ATOI = re.compile(r"^[+-]?[0-9]+$")
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def env_int(key: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """Go's ``strconv.Atoi`` of the env value; anything unparsable keeps the built-in default."""
    value = env_lookup(key, environ)
    if value is None or not _ATOI.match(value):
        return default
    return int(value)


def env_bool(key: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    value = env_lookup(key, environ)
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return default


def temp_dir(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("TMPDIR"):
        return env["TMPDIR"]
    import tempfile  # only here: it costs a CLI call more than the rest of this module

    return tempfile.gettempdir()


def socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The control socket: ``$KAMAL_PROXY_SOCKET``, else ``<runtime dir>/kamal-proxy.sock``.

    Read anew on every call, as client and server both resolve it when they need it.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("KAMAL_PROXY_SOCKET")
    if explicit:
        return explicit
    runtime = env.get("XDG_RUNTIME_DIR") or temp_dir(env)
    return os.path.join(runtime, SOCKET_NAME)


def data_dir(environ: Mapping[str, str] | None = None) -> str:
    """``$HOME/.config/kamal-proxy``, created with mode 0700; the temp dir when that fails."""
    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    if not home or home == "~":
        home = temp_dir(env)
    path = os.path.join(home, ".config", "kamal-proxy")
    try:
        make_private_dirs(path)
    except OSError:
        return temp_dir(env)
    return path


def make_private_dirs(path: str) -> None:
    """Go's ``os.MkdirAll(path, 0700)``: every directory created on the way gets mode 0700.

    (``os.makedirs`` gives the mode to the last one only: a missing ``~/.config`` would be
    0755, or 0777 under umask 000.)  Directories that already exist are left as they are.
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def state_path(environ: Mapping[str, str] | None = None) -> str:
    return os.path.join(data_dir(environ), STATE_NAME)


def default_acme_cache_path(environ: Mapping[str, str] | None = None) -> str:
    return os.path.join(data_dir(environ), "certs")
