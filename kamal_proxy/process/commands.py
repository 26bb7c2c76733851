"""The worker protocol's wire contract: AMP commands between the main process and a worker.

One AMP connection per worker, over a socketpair made before the worker is spawned.  Boxes
arrive in order on it, so a health change sent after a routing change is applied after it.

Main process → worker:

* :class:`ApplyRoutes` a routing change or a whole snapshot (JSON, ``routing/replication.py``);
  the answer means the worker's copy is updated.
* :class:`TargetHealth` one target's new health (answered once applied: the main process
  logs the change when it is in effect everywhere).
* :class:`DrainBalancers` answers when the worker's requests on those balancers are done.
* :class:`RetireBalancers` close those balancers' upstream connections.
* :class:`AcmeChallenge` an http-01 token to answer (answered once the worker knows it, so
  the CA is asked to validate only when every worker can answer); :class:`AcmeChallengeDone`
  withdraws it; :class:`CertificateIssued` a new or renewed certificate (PEM).
* :class:`StartServing` adopt the listening sockets and accept (after the first snapshot).
* :class:`CollectMetrics` the worker's request metrics (JSON), summed by the main process.
* :class:`Shutdown` stop accepting, let requests in flight finish, answer, then exit; after an
  upgrade (``drain_timeout`` given) WebSocket tunnels too, up to that bound.

Worker → main process:

* :class:`ObtainCertificate` on-demand TLS and ACME hosts whose certificate is missing:
  the main process issues (or finds) it and answers with the PEM entry.
"""

from __future__ import annotations

from twisted.protocols import amp

from kamal_proxy.control import wire


def BigUnicode() -> amp.Argument:  # noqa: N802 - reads like the other argument types
    """Text of any length, as the control contract sends it (``control/wire.py``)."""
    return wire.BigUnicode().amp()


class WorkerError(Exception):
    """A request the other side refused; ``str()`` says why."""


_ERRORS = {WorkerError: b"WORKER_ERROR"}


class ApplyRoutes(amp.Command):
    arguments = [(b"change", BigUnicode())]
    response: list = []
    errors = _ERRORS


class TargetHealth(amp.Command):
    arguments = [
        (b"balancer", amp.Integer()),
        (b"target", amp.Integer()),
        (b"state", amp.Unicode()),
    ]
    response: list = []


class DrainBalancers(amp.Command):
    arguments = [
        (b"balancers", amp.ListOf(amp.Integer())),
        (b"timeout", amp.Integer()),  # nanoseconds, as in the control commands
    ]
    response: list = []


class RetireBalancers(amp.Command):
    arguments = [(b"balancers", amp.ListOf(amp.Integer()))]
    requiresAnswer = False


class AcmeChallenge(amp.Command):
    arguments = [
        (b"issuer", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"token", amp.Unicode()),
        (b"validation", amp.Unicode()),
    ]
    response: list = []


class AcmeChallengeDone(amp.Command):
    arguments = [(b"issuer", amp.Unicode()), (b"token", amp.Unicode())]
    requiresAnswer = False


class CertificateIssued(amp.Command):
    arguments = [
        (b"issuer", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"pem", BigUnicode()),
    ]
    requiresAnswer = False


class StartServing(amp.Command):
    arguments: list = []
    response: list = []
    errors = _ERRORS


class CollectMetrics(amp.Command):
    arguments: list = []
    response = [(b"metrics", BigUnicode())]


class Shutdown(amp.Command):
    # Nanoseconds: the old process's drain after an upgrade (absent for a plain stop).
    arguments = [(b"drain_timeout", amp.Integer(optional=True))]
    response: list = []


class ObtainCertificate(amp.Command):
    arguments = [
        (b"issuer", amp.Unicode()),
        (b"name", amp.Unicode()),
    ]
    response = [(b"pem", BigUnicode())]
    errors = _ERRORS
