"""``twistd kamal-proxy``: the same server as ``kamal-proxy run``, as a twistd plugin.

Flags and environment defaults are those of ``run`` (SPEC §3.4); both doors build the service
with ``kamal_proxy.app.make_service``.

Logging follows twistd's: with its own text log (``--logfile``, ``--syslog``, or stdout with
``-n``) every event, request lines and the workers' lines included, goes to that log as a
readable sentence; with ``--logger kamal_proxy.observe.log.twistd_observer`` they are the JSON
lines of ``run`` on stdout.  DEBUG events appear only with ``--debug`` (or ``DEBUG=true``).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


def _port(text: str) -> int:
    """Ints as ``kamal-proxy run`` reads them (Go ``strconv.ParseInt`` with base prefixes)."""
    from kamal_proxy.cli.flags import parse_int

    return parse_int(text)


class Options(usage.Options):
    """Options of ``twistd kamal-proxy``; defaults come from the environment at parse time."""

    optFlags = [
        ["debug", None, "Include debugging logs"],
        ["http3", None, "Enable HTTP/3"],
    ]
    optParameters = [
        ["http-port", None, None, "Port to serve HTTP traffic on", _port],
        ["https-port", None, None, "Port to serve HTTPS traffic on", _port],
        ["metrics-port", None, None, "Publish metrics on the specified port (0 = disabled)", _port],
        ["acme-directory", None, None, "ACME directory URL to use instead of Let's Encrypt"],
        ["acme-ca-bundle", None, None, "CA bundle (PEM) to trust for the ACME directory"],
        [
            "workers",
            None,
            None,
            "Processes serving traffic (one per usable CPU by default; 1 = a single process)",
            _port,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        from kamal_proxy.cli.run import run_defaults

        flags = {flag[0] for flag in self.optFlags}
        for name, value in run_defaults().items():
            self[name] = bool(value) if name in flags else value

    def opt_debug(self) -> None:
        self["debug"] = True

    def opt_http3(self) -> None:
        self["http3"] = True

    def run_options(self) -> Any:
        from kamal_proxy.cli.run import run_options

        return run_options(self)

    def as_args(self) -> list[str]:
        """These options as flags (every value explicit), for the process an upgrade starts."""
        args = [f"--{parameter[0]}={self[parameter[0]]}" for parameter in self.optParameters]
        args += [f"--{flag[0]}" for flag in self.optFlags if self[flag[0]]]
        return args

    def relaunch(self) -> Any:
        """How ``kamal-proxy upgrade`` starts this server again: twistd with the same logging
        (``kamal_proxy.process.relaunch``); the pid file follows the new process."""
        import os

        from kamal_proxy.process.relaunch import run_relaunch, twistd_relaunch

        config = getattr(self, "parent", None)
        if config is None:
            return run_relaunch()

        def release() -> None:
            config["pidfile"] = None  # twistd removes it at exit otherwise

        return twistd_relaunch(config, self.as_args(), os.getcwd(), release=release)


@implementer(IServiceMaker, IPlugin)
class KamalProxyServiceMaker:
    tapname = "kamal-proxy"
    description = "HTTP proxy for zero downtime deployments"
    options = Options

    def makeService(self, options: Options) -> Any:
        from twisted.internet import reactor

        from kamal_proxy.app import load_deferred_modules, make_service
        from kamal_proxy.observe import log

        # twistd may switch to another user (-u/-g) once the service is made, who may not be
        # able to read the Python installation: load now what `run` loads on first use.
        load_deferred_modules()
        json_log = log.active()
        if json_log is None:
            # twistd's own text log: request lines become events of it (a daemon has no
            # stdout), and workers' lines are relayed to it.
            log.set_active(log.TextLog(debug=options["debug"]))
            log.set_debug(options["debug"])
        else:
            # Our JSON observer (--logger): --debug lowers its level too.
            if options["debug"]:
                json_log.min_rank = 0
            log.set_debug(json_log.min_rank == 0)
            json_log.batch_flushes(reactor.callLater)
        return make_service(options.run_options(), relaunch=options.relaunch())


serviceMaker = KamalProxyServiceMaker()
