"""The per-service client commands: ``remove``, ``list``, ``pause``, ``stop``, ``resume``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from kamal_proxy.cli.command import CobraCommand, Invocation, Spec, exact_args, no_args
from kamal_proxy.cli.flags import DURATION, STRING, Flag
from kamal_proxy.service_options import DEFAULT_DRAIN_TIMEOUT, DEFAULT_PAUSE_TIMEOUT

HEADER_STYLE = "3;94"
NAME_STYLE = "1;34"
PLAIN_STYLE = ""


def format_service_table(services: Mapping[str, Mapping[str, Any]]) -> str:
    """SPEC §3.5.1: header plus one row per service by name, every cell styled and padded.

    Widths are byte lengths (as Go's ``len``) and every cell, even the last, is followed by two
    spaces, so the output matches the Go original byte for byte.
    """
    rows = [["Service", "Host", "Path", "Target", "State", "TLS"]]
    for name in sorted(services):
        info = services[name]
        rows.append(
            [
                name,
                str(info.get("host") or "*"),
                str(info.get("path", "")),
                str(info.get("target", "")),
                str(info.get("state", "")),
                "yes" if info.get("tls") else "no",
            ]
        )
    widths = [max(_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for number, row in enumerate(rows):
        line = []
        for i, cell in enumerate(row):
            if number == 0:
                style = HEADER_STYLE
            elif i == 0:
                style = NAME_STYLE
            else:
                style = PLAIN_STYLE
            pad = " " * (widths[i] - _width(cell))
            line.append(f"\033[{style}m{cell}\033[0m{pad}  ")
        out.append("".join(line) + "\n")
    return "".join(out)


def _width(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# The control contract (and json) are imported by the functions that call the server, so that
# help and flag errors do not load them.


def _run_list(inv: Invocation) -> None:
    import json

    from kamal_proxy.control import commands

    reply = inv.send(commands.List)
    services = json.loads(reply.get("services") or "{}")
    # color=True: the table carries its ANSI styles even when stdout is a pipe, as in Go.
    click.echo(format_service_table(services), nl=False, color=True)


def _run_remove(inv: Invocation) -> None:
    from kamal_proxy.control import commands

    inv.send(commands.Remove, service=inv.args[0])


def _run_pause(inv: Invocation) -> None:
    from kamal_proxy.control import commands

    inv.send(
        commands.Pause,
        service=inv.args[0],
        drain_timeout=inv["drain-timeout"],
        pause_timeout=inv["max-pause"],
    )


def _run_stop(inv: Invocation) -> None:
    from kamal_proxy.control import commands

    inv.send(
        commands.Stop,
        service=inv.args[0],
        drain_timeout=inv["drain-timeout"],
        message=inv["message"],
    )


def _run_resume(inv: Invocation) -> None:
    from kamal_proxy.control import commands

    inv.send(commands.Resume, service=inv.args[0])


def _drain_timeout() -> Flag:
    return Flag(
        "drain-timeout",
        DURATION,
        DEFAULT_DRAIN_TIMEOUT,
        "How long to allow in-flight requests to complete",
    )


def service_commands() -> list[CobraCommand]:
    return [
        CobraCommand(
            "remove",
            Spec(
                use="remove <service>",
                short="Remove the service",
                aliases=("rm",),
                args=exact_args(1),
                run=_run_remove,
            ),
        ),
        CobraCommand(
            "pause",
            Spec(
                use="pause <service>",
                short="Pause a service",
                flags=[
                    _drain_timeout(),
                    Flag(
                        "max-pause",
                        DURATION,
                        DEFAULT_PAUSE_TIMEOUT,
                        "How long to enqueue requests before shedding load",
                    ),
                ],
                args=exact_args(1),
                run=_run_pause,
            ),
        ),
        CobraCommand(
            "stop",
            Spec(
                use="stop <service>",
                short="Stop a service",
                flags=[
                    _drain_timeout(),
                    Flag("message", STRING, "", "Message to display to clients while stopped"),
                ],
                args=exact_args(1),
                run=_run_stop,
            ),
        ),
        CobraCommand(
            "resume",
            Spec(
                use="resume <service>",
                short="Resume a service",
                args=exact_args(1),
                run=_run_resume,
            ),
        ),
        CobraCommand(
            "list",
            Spec(
                use="list",
                short="List the services currently running",
                aliases=("ls",),
                args=no_args,
                run=_run_list,
            ),
        ),
    ]
