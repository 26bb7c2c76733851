"""``kamal-proxy run``: start the server in this process (SPEC §3.4).

The environment only changes flag *defaults* (``KAMAL_PROXY_<K>`` beats ``<K>``), so an explicit
flag always wins.  The server modules are imported only when ``run`` actually runs, keeping the
client commands light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kamal_proxy.cli.command import CobraCommand, Invocation, Spec
from kamal_proxy.cli.flags import BOOL, INT, STRING, Flag
from kamal_proxy.options import RunOptions, env_bool, env_int, env_lookup


@dataclass(frozen=True, slots=True)
class RunFlag:
    """One ``run`` flag: the CLI flag, its env key (if any) and the RunOptions field it sets."""

    name: str
    kind: str
    field: str
    env: str | None
    usage: str


RUN_FLAGS = (
    RunFlag("debug", BOOL, "debug", "DEBUG", "Include debugging logs"),
    RunFlag("http-port", INT, "http_port", "HTTP_PORT", "Port to serve HTTP traffic on"),
    RunFlag("https-port", INT, "https_port", "HTTPS_PORT", "Port to serve HTTPS traffic on"),
    RunFlag(
        "metrics-port",
        INT,
        "metrics_port",
        "METRICS_PORT",
        "Publish metrics on the specified port (0 = disabled)",
    ),
    RunFlag("http3", BOOL, "http3", None, "Enable HTTP/3"),
    RunFlag(
        "workers",
        INT,
        "workers",
        "WORKERS",
        "Processes serving traffic (one per usable CPU by default; 1 = a single process)",
    ),
    RunFlag(
        "acme-directory",
        STRING,
        "acme_directory",
        "ACME_DIRECTORY",
        "ACME directory URL to use instead of Let's Encrypt",
    ),
    RunFlag(
        "acme-ca-bundle",
        STRING,
        "acme_ca_bundle",
        "ACME_CA_BUNDLE",
        "CA bundle (PEM) to trust for the ACME directory",
    ),
)


def run_defaults(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Flag name -> default after applying the environment (bad env values are ignored)."""
    builtin = RunOptions()
    defaults: dict[str, Any] = {}
    for flag in RUN_FLAGS:
        value = getattr(builtin, flag.field)
        if flag.env is not None:
            if flag.kind == BOOL:
                value = env_bool(flag.env, value, environ)
            elif flag.kind == INT:
                value = env_int(flag.env, value, environ)
            else:
                found = env_lookup(flag.env, environ)
                value = value if found is None else found
        defaults[flag.name] = value
    return defaults


def run_options(values: Mapping[str, Any]) -> RunOptions:
    """Flag name -> value mapping to RunOptions."""
    return RunOptions(**{flag.field: values[flag.name] for flag in RUN_FLAGS})


def _run(inv: Invocation) -> int:
    options = run_options({flag.name: inv[flag.name] for flag in RUN_FLAGS})
    sockets = _bind_early(options)
    from kamal_proxy.app import run_server

    # run_server reports expected start-up failures itself (``Error: ...``, exit code 1);
    # anything else is a bug and keeps its traceback.
    return int(run_server(options, sockets) or 0)


def _bind_early(options: RunOptions) -> Any:
    """The HTTP and HTTPS ports, bound before the server's modules load (a few hundred
    milliseconds): a restart then refuses connections only while no process holds them.
    Not for a process started by an upgrade, which inherits them."""
    import os

    if "KAMAL_PROXY_HANDOVER" in os.environ:
        return None
    from kamal_proxy.process.listening import ListeningSockets

    return ListeningSockets.bound_early({"http": options.http_port, "https": options.https_port})


def run_command(environ: Mapping[str, str]) -> CobraCommand:
    defaults = run_defaults(environ)
    flags = [Flag(f.name, f.kind, defaults[f.name], f.usage) for f in RUN_FLAGS]
    return CobraCommand("run", Spec(use="run", short="Run the server", flags=flags, run=_run))
