"""The control plane's wire contract: one AMP command per operation (SPEC §2.3).

Options travel as the JSON objects of the state file (SPEC §15.2), so the CLI, the server and
the state file share one encoding.  Durations are integer nanoseconds.  Every failure the user
should see travels as :class:`CommandFailed` whose description is the exact message the CLI
prints after ``Error: ``.

A ``deploy`` (or ``rollout deploy``) on a terminal asks for its progress with the optional
``progress`` argument: while it is pending, the server then sends :class:`DeployProgress`
notifications on the same connection, which the client reads before the answer.  A client
that does not ask (an older one, or stderr not a terminal) sends and receives exactly what it
did before.

The commands are declared with :mod:`kamal_proxy.control.wire`, so the CLI reads this module
without importing Twisted; ``Command.responder`` and ``Command.amp()`` give the server the
``twisted.protocols.amp.Command`` of the same declaration.
"""

from __future__ import annotations

from kamal_proxy.control.wire import BigUnicode, Boolean, Command, Integer, ListOf, Unicode


class CommandFailed(Exception):
    """A command was refused; ``str()`` is the user-facing message."""


_ERRORS = {CommandFailed: b"COMMAND_FAILED"}


class Deploy(Command):
    arguments = [
        (b"service", Unicode()),
        (b"targets", ListOf(Unicode())),
        (b"readers", ListOf(Unicode())),
        (b"deploy_timeout", Integer()),
        (b"drain_timeout", Integer()),
        (b"force", Boolean()),
        (b"service_options", BigUnicode()),  # JSON, SPEC §15.2 "options"
        (b"target_options", BigUnicode()),  # JSON, SPEC §15.2 "target_options"
        (b"progress", Boolean(optional=True)),  # send DeployProgress while pending
    ]
    response: list = []
    errors = _ERRORS


class Remove(Command):
    arguments = [(b"service", Unicode())]
    response: list = []
    errors = _ERRORS


class Pause(Command):
    arguments = [
        (b"service", Unicode()),
        (b"drain_timeout", Integer()),
        (b"pause_timeout", Integer()),
    ]
    response: list = []
    errors = _ERRORS


class Stop(Command):
    arguments = [
        (b"service", Unicode()),
        (b"drain_timeout", Integer()),
        (b"message", Unicode()),
    ]
    response: list = []
    errors = _ERRORS


class Resume(Command):
    arguments = [(b"service", Unicode())]
    response: list = []
    errors = _ERRORS


class List(Command):
    arguments: list = []
    # JSON object: service name -> {"host", "path", "tls", "target", "state"}
    response = [(b"services", BigUnicode())]
    errors = _ERRORS


class RolloutDeploy(Command):
    arguments = [
        (b"service", Unicode()),
        (b"targets", ListOf(Unicode())),
        (b"readers", ListOf(Unicode())),
        (b"deploy_timeout", Integer()),
        (b"drain_timeout", Integer()),
        (b"progress", Boolean(optional=True)),  # send DeployProgress while pending
    ]
    response: list = []
    errors = _ERRORS


class RolloutSet(Command):
    arguments = [
        (b"service", Unicode()),
        (b"percentage", Integer()),
        (b"allowlist", ListOf(Unicode())),
    ]
    response: list = []
    errors = _ERRORS


class RolloutStop(Command):
    arguments = [(b"service", Unicode())]
    response: list = []
    errors = _ERRORS


class Upgrade(Command):
    """Replace the server by a new process from the code installed now (``process/upgrade.py``);
    answered once the new process serves, with its pid."""

    arguments = [(b"drain_timeout", Integer())]
    response = [(b"pid", Integer())]
    errors = _ERRORS


class DeployProgress(Command):
    """Server to client, while a deploy that asked for it waits; never answered.

    ``event`` is one of:

    * ``health``: a health check of new ``target`` ended; ``reason`` says why it failed,
      empty when it passed.
    * ``drain``: the old ``targets`` are draining, for at most ``timeout`` nanoseconds.
    * ``drained``: their requests in flight are done (or were cut at the timeout).
    """

    arguments = [
        (b"event", Unicode()),
        (b"target", Unicode(optional=True)),
        (b"reason", Unicode(optional=True)),
        (b"targets", ListOf(Unicode(), optional=True)),
        (b"timeout", Integer(optional=True)),
    ]
    requiresAnswer = False
