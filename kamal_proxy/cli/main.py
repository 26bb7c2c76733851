"""The ``kamal-proxy`` program: builds the command tree and runs it (SPEC §3).

The tree is rebuilt for each run from the environment, because flag defaults depend on it
(``run``'s ports, ``deploy --tls-acme-cache-path``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from kamal_proxy.cli.command import ROOT_NAME, CobraCommand, Runtime, Spec, Transport, help_command
from kamal_proxy.cli.completion import completion_command
from kamal_proxy.cli.deploy import deploy_command
from kamal_proxy.cli.rollout import rollout_command
from kamal_proxy.cli.run import run_command
from kamal_proxy.cli.service import service_commands
from kamal_proxy.cli.upgrade import upgrade_command


def build_root(
    environ: Mapping[str, str] | None = None, transport: Transport | None = None
) -> CobraCommand:
    """The root command; ``transport`` replaces the control-socket call (tests)."""
    env = dict(os.environ) if environ is None else environ
    if transport is None:
        transport = _dial
    root = CobraCommand(
        ROOT_NAME,
        Spec(use=ROOT_NAME, short="HTTP proxy for zero downtime deployments"),
        children=[
            run_command(env),
            deploy_command(env),
            *service_commands(),
            rollout_command(),
            upgrade_command(),
            help_command(),
            completion_command(),
        ],
    )
    root.runtime = Runtime(environ=env, transport=transport)
    return root


def _dial(command: type, path: str, **arguments: Any) -> dict[str, Any]:
    """The real transport: one blocking call over the control socket, ended by Ctrl-C."""
    from kamal_proxy.control.client import call

    with sigint_kills():
        return call(command, path, **arguments)


@contextmanager
def sigint_kills() -> Iterator[None]:
    """While waiting for the server, SIGINT kills the process at once, as it does Go's.

    The shell then sees a death by SIGINT (status 130) rather than a ``KeyboardInterrupt``
    traceback or click's ``Aborted!``; the server goes on with what it was asked, as with the
    Go original.  A SIGINT that the parent made us ignore (a background job) stays ignored.
    """
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        previous = None
    try:
        yield
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Console-script entry point; exits the process with Cobra's exit codes (0 or 1)."""
    build_root(environ).main(args=argv, prog_name=ROOT_NAME, standalone_mode=True)


if __name__ == "__main__":
    main()
