"""The control plane's wire contract: one AMP command per operation (SPEC §2.3).

Options travel as the JSON objects of the state file (SPEC §15.2), so the CLI, the server and
the state file share one encoding.  Durations are integer nanoseconds.  Every failure the user
should see travels as :class:`CommandFailed` whose description is the exact message the CLI
prints after ``Error: ``.
"""

from __future__ import annotations

from twisted.protocols import amp


class CommandFailed(Exception):
    """A command was refused; ``str()`` is the user-facing message."""


_ERRORS = {CommandFailed: b"COMMAND_FAILED"}


class BigUnicode(amp.Argument):
    """Text of any length: AMP caps one value at 64 KiB, so long text spans numbered keys."""

    _CHUNK = 0xFFFF

    def toBox(self, name, strings, objects, proto):
        data = objects[name.decode("ascii")].encode("utf-8")
        chunks = [data[i : i + self._CHUNK] for i in range(0, len(data), self._CHUNK)] or [b""]
        strings[name] = str(len(chunks)).encode("ascii")
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode("ascii")] = chunk

    def fromBox(self, name, strings, objects, proto):
        count = int(strings[name])
        data = b"".join(strings[name + b"." + str(i).encode("ascii")] for i in range(count))
        objects[name.decode("ascii")] = data.decode("utf-8")


class Deploy(amp.Command):
    arguments = [
        (b"service", amp.Unicode()),
        (b"targets", amp.ListOf(amp.Unicode())),
        (b"readers", amp.ListOf(amp.Unicode())),
        (b"deploy_timeout", amp.Integer()),
        (b"drain_timeout", amp.Integer()),
        (b"force", amp.Boolean()),
        (b"service_options", BigUnicode()),  # JSON, SPEC §15.2 "options"
        (b"target_options", BigUnicode()),  # JSON, SPEC §15.2 "target_options"
    ]
    response: list = []
    errors = _ERRORS


class Remove(amp.Command):
    arguments = [(b"service", amp.Unicode())]
    response: list = []
    errors = _ERRORS


class Pause(amp.Command):
    arguments = [
        (b"service", amp.Unicode()),
        (b"drain_timeout", amp.Integer()),
        (b"pause_timeout", amp.Integer()),
    ]
    response: list = []
    errors = _ERRORS


class Stop(amp.Command):
    arguments = [
        (b"service", amp.Unicode()),
        (b"drain_timeout", amp.Integer()),
        (b"message", amp.Unicode()),
    ]
    response: list = []
    errors = _ERRORS


class Resume(amp.Command):
    arguments = [(b"service", amp.Unicode())]
    response: list = []
    errors = _ERRORS


class List(amp.Command):
    arguments: list = []
    # JSON object: service name -> {"host", "path", "tls", "target", "state"}
    response = [(b"services", BigUnicode())]
    errors = _ERRORS


class RolloutDeploy(amp.Command):
    arguments = [
        (b"service", amp.Unicode()),
        (b"targets", amp.ListOf(amp.Unicode())),
        (b"readers", amp.ListOf(amp.Unicode())),
        (b"deploy_timeout", amp.Integer()),
        (b"drain_timeout", amp.Integer()),
    ]
    response: list = []
    errors = _ERRORS


class RolloutSet(amp.Command):
    arguments = [
        (b"service", amp.Unicode()),
        (b"percentage", amp.Integer()),
        (b"allowlist", amp.ListOf(amp.Unicode())),
    ]
    response: list = []
    errors = _ERRORS


class RolloutStop(amp.Command):
    arguments = [(b"service", amp.Unicode())]
    response: list = []
    errors = _ERRORS
