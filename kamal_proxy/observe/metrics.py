"""Prometheus request metrics and the metrics listener (SPEC §18).

Recording happens once per request on the hot path, so the series are plain Python objects
updated in the reactor thread (no locks, no per-request label validation) and handed to
prometheus_client as a custom collector only when scraped.  The counter and the histogram
share one series object: both are updated together with the same labels, so the counter's
value is the histogram's count.  The registry is our own, not prometheus_client's global one;
it also has prometheus_client's standard ``process_*`` series.
"""

from __future__ import annotations

import gzip
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.application import service as appservice
from twisted.internet import defer
from twisted.web import resource, server

from kamal_proxy.observe.events import error, info
from kamal_proxy.startup import BindError, StartupError

__all__ = [
    "BUCKETS",
    "InFlight",
    "Metrics",
    "MetricsService",
    "metrics_site",
    "method_label",
]

REQUESTS = "kamal_proxy_http_requests_total"
DURATION = "kamal_proxy_http_request_duration_seconds"
IN_FLIGHT = "kamal_proxy_http_in_flight_requests"
REQUESTS_HELP = "HTTP requests processed, labeled by service, status code and method."
DURATION_HELP = "Duration of HTTP requests, labeled by service, status code and method."
IN_FLIGHT_HELP = "Number of in-flight HTTP requests, labeled by service."
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Go spells the bounds "1", "10" (not "1.0").
_BUCKET_LABELS = tuple(f"{b:g}" for b in BUCKETS) + ("+Inf",)

CPU_SERIES = "process_cpu_seconds_total"
#: The process_* series that add up over processes.
SUMMED_PROCESS_SERIES = frozenset(
    {
        CPU_SERIES,
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)

_KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE")
_METHODS: dict[Any, str] = {m: m for m in _KNOWN_METHODS}
_METHODS.update({m.encode("ascii"): m for m in _KNOWN_METHODS})


def method_label(method: bytes | str) -> str:
    """The ``method`` label: a standard method, exactly (case-sensitive), else ``OTHER``."""
    return _METHODS.get(method, "OTHER")


class _Requests:
    """One (service, method, status) series of the counter and the histogram."""

    __slots__ = ("labels", "buckets", "count", "sum")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket (not cumulative); last is +Inf
        self.count = 0
        self.sum = 0.0


class InFlight:
    """One service's in-flight gauge; the hot path calls ``inc()``/``dec()`` on it."""

    __slots__ = ("service", "value")

    def __init__(self, service: str) -> None:
        self.service = service
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class Metrics:
    """The three request metrics of SPEC §18, with series created on first use."""

    def __init__(self, process: bool = True) -> None:
        self._requests: dict[tuple[str, Any, int], _Requests] = {}
        self._inflight: dict[str, InFlight] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        # The standard process_* series (CPU, memory, open fds...), as the Go original exports:
        # this process's, plus those of the other processes added (workers), summed.
        self._process = ProcessCollector(registry=None) if process else None
        self._other_processes: list[dict[str, float]] = []
        if process:
            self.registry.register(_ProcessSum(self))

    def observe(self, service: str, method: bytes | str, status: int, duration_s: float) -> None:
        """Count one finished request and its duration (at the time it is logged)."""
        key = (service, method, status)
        series = self._requests.get(key)
        if series is None:
            series = self._new_series(key)
        series.count += 1
        series.sum += duration_s
        series.buckets[bisect_left(BUCKETS, duration_s)] += 1

    def _new_series(self, key: tuple[str, Any, int]) -> _Requests:
        service, method, status = key
        labels = (service, method_label(method), str(status))
        # Different raw methods (b"PURGE", "PURGE", b"get") share their OTHER series.
        canonical = (service, labels[1], status)
        series = self._requests.get(canonical)
        if series is None:
            series = _Requests(labels)
            self._requests[canonical] = series
        if len(self._requests) < 100_000:  # raw custom methods must not grow this for ever
            self._requests[key] = series
        return series

    def inflight(self, service: str) -> InFlight:
        """The gauge series of ``service`` (created, at 0, on first call); cache it."""
        gauge = self._inflight.get(service)
        if gauge is None:
            gauge = self._inflight[service] = InFlight(service)
        return gauge

    # -- summing over processes -------------------------------------------------------------

    def snapshot(self, process: bool = True) -> dict[str, Any]:
        """Every series as plain JSON data (a worker's answer to the main process's scrape);
        with ``process``, the summable process_* values too."""
        series = {id(s): s for s in self._requests.values()}.values()
        out: dict[str, Any] = {
            "requests": [[*s.labels, list(s.buckets), s.count, s.sum] for s in series],
            "inflight": [[g.service, g.value] for g in self._inflight.values()],
        }
        if process:
            out["process"] = self.process_values()
        return out

    def process_values(self) -> dict[str, float]:
        """The summable process_* values of this process and of those added to it."""
        values: dict[str, float] = {}
        if self._process is not None:
            for family in self._process.collect():
                for sample in family.samples:
                    if sample.name in SUMMED_PROCESS_SERIES:
                        values[sample.name] = sample.value
        for other in self._other_processes:
            for name, value in other.items():
                if name in SUMMED_PROCESS_SERIES:
                    values[name] = values.get(name, 0.0) + value
        return values

    def add(self, snapshot: dict[str, Any], gauges: bool = True) -> None:
        """Add another process's ``snapshot`` to these series: counters and histograms add,
        gauges add too unless ``gauges`` is false (a process that is gone has none)."""
        for service, method, status, buckets, count, total in snapshot.get("requests", ()):
            key = (service, method, int(status))
            series = self._requests.get(key)
            if series is None:
                series = self._new_series(key)
            series.count += count
            series.sum += total
            mine = series.buckets
            for i, n in enumerate(buckets[: len(mine)]):
                mine[i] += n
        if gauges:
            for service, value in snapshot.get("inflight", ()):
                self.inflight(service).value += value
        process = snapshot.get("process")
        if process:
            if not gauges:  # a process that is gone keeps only its CPU time (a counter)
                process = {CPU_SERIES: process.get(CPU_SERIES, 0.0)}
            self._other_processes.append(dict(process))

    @classmethod
    def total(cls, snapshots: list[dict[str, Any]]) -> Metrics:
        """The sum of ``snapshots`` as a Metrics of its own (for one scrape)."""
        metrics = cls()
        for snapshot in snapshots:
            metrics.add(snapshot)
        return metrics

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated as prometheus_client does."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def collect(self) -> Iterator[Metric]:
        series = list({id(s): s for s in self._requests.values()}.values())
        if series:
            counter = CounterMetricFamily(
                REQUESTS, REQUESTS_HELP, labels=("service", "method", "status")
            )
            histogram = HistogramMetricFamily(
                DURATION, DURATION_HELP, labels=("service", "method", "status")
            )
            for s in series:
                counter.add_metric(s.labels, s.count)
                cumulative = []
                total = 0
                for le, n in zip(_BUCKET_LABELS, s.buckets, strict=True):
                    total += n
                    cumulative.append((le, total))
                histogram.add_metric(s.labels, cumulative, s.sum)
            yield counter
            yield histogram
        if self._inflight:
            gauge = GaugeMetricFamily(IN_FLIGHT, IN_FLIGHT_HELP, labels=("service",))
            for g in self._inflight.values():
                gauge.add_metric((g.service,), g.value)
            yield gauge


class _ProcessSum:
    """prometheus_client's process_* families for this process, with the other processes'
    CPU time, memory and open descriptors added (start time and fd limit stay this one's)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        others = self.metrics._other_processes
        for family in self.metrics._process.collect():
            if others:
                family.samples = [
                    sample._replace(
                        value=sample.value + sum(o.get(sample.name, 0.0) for o in others)
                    )
                    if sample.name in SUMMED_PROCESS_SERIES
                    else sample
                    for sample in family.samples
                ]
            yield family


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect()


Gather = Callable[[], "defer.Deferred[list[dict[str, Any]]]"]


class MetricsResource(resource.Resource):
    """Serves the exposition on every path (as the Go original's handler does).

    With worker processes, ``gather`` fetches their snapshots at scrape time and the answer
    is the sum of theirs and this process's own.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, gather: Gather | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.gather = gather

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return self

    def render(self, request: server.Request) -> bytes | int:
        if self.gather is None:
            return self._answer(request, self.metrics)
        d = self.gather()
        # The scraper may hang up while the workers answer; notifyFinish is how twisted.web
        # says so (it fails when the connection is lost before the response is finished).
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(snapshots: list[dict[str, Any]]) -> None:
            # This process's own process_* come from the total's collector (it is this one).
            mine = self.metrics.snapshot(process=False)
            body = self._answer(request, Metrics.total([mine, *snapshots]))
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Any) -> None:
            error("Unable to collect metrics", error=str(failure.value))
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET

    def _answer(self, request: server.Request, metrics: Metrics) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = metrics.exposition(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        if gzip_accepted((request.getHeader(b"accept-encoding") or b"").decode("latin-1")):
            body = gzip.compress(body)
            request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


def metrics_site(metrics: Metrics, gather: Gather | None = None) -> server.Site:
    site = server.Site(MetricsResource(metrics, gather))
    site.noisy = False
    site.displayTracebacks = False
    return site


class MetricsService(appservice.Service):
    """The ``--metrics-port`` listener on all interfaces (SPEC §4.1, §18), opened in
    ``privilegedStartService`` (before a privilege drop) or at start."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        metrics: Metrics,
        *,
        sockets: Any,
        interface: str = "::",
        gather: Gather | None = None,
    ) -> None:
        self.reactor = reactor
        self.requested_port = port
        self.interface = interface
        self.metrics = metrics
        self.gather = gather
        #: The server's listening sockets (``process/listening.py``): the port is opened
        #: there (or found there, handed over by an upgrade) and served through a duplicate.
        self.sockets = sockets
        self.port: Any = None

    @property
    def bound_port(self) -> int:
        return self.port.getHost().port

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        super().startService()
        info("Metrics enabled", address=f":{self.requested_port}")

    def _listen(self) -> None:
        try:
            sock = self.sockets.tcp("metrics", self.requested_port, self.interface)
        except BindError as e:
            raise StartupError(e.message) from None
        self.port = self.reactor.adoptStreamPort(
            sock.fileno(), sock.family, metrics_site(self.metrics, self.gather)
        )

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        self.sockets.close("metrics")
        return defer.maybeDeferred(port.stopListening)
