"""How to start this same server again, from the code installed now (``process/upgrade.py``).

``kamal-proxy run`` is started again with its own command line: the same interpreter path (a
virtualenv's ``bin/python``, so a ``pip install`` into it is what runs next), the same script
or module and the same flags.  The environment is the running server's own.

A server started by ``twistd`` is started again by twistd, as a foreground process
(``--nodaemon``: it is already detached, and a second daemonisation would lose it) without
twistd's pid file handling (``--pidfile=``: twistd would refuse to start while the pid file
names a live process, and the new process moves the pid file itself, see ``pidfile.py``),
without ``-u``/``-g``/``--chroot``/``--rundir`` (already in effect and inherited; a process that
dropped its privileges cannot apply them again), and with the same logging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kamal_proxy.process.pidfile import PidFile


@dataclass
class Relaunch:
    """The command that starts this server again, and the pid file that must follow it."""

    argv: list[str]
    executable: str = field(default_factory=lambda: sys.executable)
    pidfile: PidFile | None = None


def run_relaunch(orig_argv: Sequence[str] | None = None) -> Relaunch:
    """``kamal-proxy run`` as it was started (``sys.orig_argv``: interpreter options too)."""
    orig = list(sys.orig_argv if orig_argv is None else orig_argv)
    return Relaunch([sys.executable, *orig[1:]])


def _interpreter_and_script(orig_argv: Sequence[str], argv: Sequence[str]) -> list[str]:
    """The part of the original command line before the script's own arguments:
    ``python [options] /path/twistd`` or ``python [options] -m twisted.scripts.twistd``."""
    prefix = len(orig_argv) - len(argv) + 1
    if prefix < 1 or prefix > len(orig_argv):
        return [sys.executable, argv[0]]
    return [sys.executable, *orig_argv[1:prefix]]


def twistd_relaunch(
    config: Mapping[str, Any],
    plugin_args: Sequence[str],
    cwd: str,
    orig_argv: Sequence[str] | None = None,
    argv: Sequence[str] | None = None,
    release: Any = None,
) -> Relaunch:
    """``twistd ... kamal-proxy ...`` again, from twistd's parsed ``config`` (ServerOptions).

    ``cwd`` is the directory relative paths were given from (twistd opens its log file before
    it changes to ``--rundir``); ``release`` keeps twistd from removing its pid file at exit.
    """
    orig = list(sys.orig_argv if orig_argv is None else orig_argv)
    args = list(sys.argv if argv is None else argv)
    command = _interpreter_and_script(orig, args)
    command += ["--nodaemon", "--pidfile="]
    daemon = not config.get("nodaemon")
    logfile = config.get("logfile")
    if config.get("syslog"):
        command += ["--syslog", f"--prefix={config.get('prefix') or 'twisted'}"]
    elif logfile and logfile != "-":
        command.append(f"--logfile={os.path.join(cwd, logfile)}")
    elif daemon:
        # A daemon without --logfile logs to twistd.log; in the foreground that would be stdout.
        command.append(f"--logfile={os.path.join(cwd, 'twistd.log')}")
    logger = config.get("logger")
    if logger:
        # twistd keeps the observer it imported, not its name.
        if not isinstance(logger, str):
            logger = f"{logger.__module__}.{logger.__qualname__}"
        command.append(f"--logger={logger}")
    if config.get("no_save"):
        command.append("--no_save")
    if config.get("originalname"):
        command.append("--originalname")
    command += ["kamal-proxy", *plugin_args]
    pidfile = config.get("pidfile") or None
    return Relaunch(command, pidfile=PidFile(pidfile, release) if pidfile else None)
