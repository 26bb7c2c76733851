"""``kamal-proxy upgrade``: replace the running server by the code installed now, without
refusing a connection (``process/upgrade.py`` does the work, in the server).

Not in the Go original.  It prints nothing and exits 0 once the new server process serves;
if the new process cannot start, it prints ``Error: <why>`` and exits 1, and the running
server carries on as before.
"""

from __future__ import annotations

from kamal_proxy.cli.command import CobraCommand, Invocation, Spec, no_args
from kamal_proxy.cli.flags import DURATION, Flag

# How long the old process may finish its requests and WebSocket tunnels: 30 s, as a deploy's.
from kamal_proxy.service_options import DEFAULT_DRAIN_TIMEOUT


def _run_upgrade(inv: Invocation) -> None:
    from kamal_proxy.control import commands

    inv.send(commands.Upgrade, drain_timeout=inv["drain-timeout"])


def upgrade_command() -> CobraCommand:
    return CobraCommand(
        "upgrade",
        Spec(
            use="upgrade",
            short="Restart the server from the code installed now, without downtime",
            long=(
                "Start a new server process from the code installed now, hand it the listening\n"
                "sockets, the control socket and the state, and return once it serves. The old\n"
                "process then stops accepting, lets its requests (and WebSocket tunnels) finish\n"
                "within --drain-timeout, and exits. SIGUSR2 to the server does the same."
            ),
            flags=[
                Flag(
                    "drain-timeout",
                    DURATION,
                    DEFAULT_DRAIN_TIMEOUT,
                    "How long the old process may finish requests in flight and WebSockets",
                )
            ],
            args=no_args,
            run=_run_upgrade,
        ),
    )
