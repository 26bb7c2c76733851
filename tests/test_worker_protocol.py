"""The worker protocol over an in-memory AMP connection, the pool's broadcast rules, metrics
summing, the log's write policy and the ``--workers`` option (no processes, no sockets)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from kamal_proxy.cli.run import run_defaults
from kamal_proxy.observe.log import PIPE_BUF, line_batches, write_lines
from kamal_proxy.observe.metrics import Metrics
from kamal_proxy.options import RunOptions, default_workers
from kamal_proxy.process import commands
from kamal_proxy.process.supervisor import MainConnection, Worker, WorkerPool
from kamal_proxy.process.worker import WorkerConnection
from kamal_proxy.routing.replica import RouterReplica
from kamal_proxy.routing.router import Router
from kamal_proxy.service_options import ServiceOptions, TargetOptions
from tests.test_balancer import FakeHealthCheck, FakeInFlight, FakePool


class FakeAcme:
    def __init__(self) -> None:
        self.events = None
        self.issuers: dict[str, Any] = {}

    def set_events(self, events: Any) -> None:
        self.events = events

    def find_issuer(self, key: str) -> Any:
        return self.issuers.get(key)


class FakeIssuer:
    key = "https://ca/dir /cache"

    def __init__(self, entry: Any) -> None:
        self.entry = entry
        self.asked: list[str] = []

    def cached(self, name: str) -> Any:
        return None

    def obtain(self, name: str) -> defer.Deferred:
        self.asked.append(name)
        return defer.succeed(self.entry)


class FakeTLS:
    def __init__(self) -> None:
        self.acme = FakeAcme()
        self.copies: dict[str, Any] = {}

    def copy(self, key: str) -> Any:
        return self.copies.setdefault(key, _IssuerCopy())


class _IssuerCopy:
    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}

    def challenge(self, name: str, token: str, validation: str) -> None:
        self.tokens[token] = validation

    def challenge_done(self, token: str) -> None:
        self.tokens.pop(token, None)


def pool_with(router: Router, tls: FakeTLS, clock: task.Clock) -> WorkerPool:
    options = RunOptions(http_port=80, https_port=443, workers=2)
    sockets = SimpleNamespace(family=10)
    pool = WorkerPool(clock, options, router, tls, sockets, sockets)
    pool.running = True
    return pool


class WireTests(unittest.TestCase):
    """A MainConnection and a WorkerConnection talking through iosim."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.router = Router(
            self.clock, None, pool_factory=FakePool, health_check_factory=FakeHealthCheck
        )
        self.tls = FakeTLS()
        self.pool = pool_with(self.router, self.tls, self.clock)
        self.replica = RouterReplica(self.clock, pool_factory=FakePool)
        self.metrics = Metrics()
        self.worker_side = SimpleNamespace(
            router=self.replica,
            tls=self.tls,
            metrics=self.metrics,
            reactor=self.clock,
            exit=lambda: None,
        )
        self.worker = Worker(0, 0.0)
        main = MainConnection(self.pool, self.worker)
        self.worker.connection = main
        self.pool.workers[0] = self.worker
        # iosim answers (client, server, pump): the main process's end is the client here.
        self.main_end, self.worker_end, self.pump = iosim.connectedServerAndClient(
            lambda: WorkerConnection(self.worker_side), lambda: main, greet=False
        )

    def tearDown(self) -> None:
        self.worker_end.connected = False

    def deploy(self) -> defer.Deferred:
        d = defer.ensureDeferred(
            self.router.deploy(
                "web", ["web-1:80"], [], 10**9, 10**9, True, ServiceOptions(), TargetOptions()
            )
        )
        return d

    def test_apply_health_drain_and_metrics_round_trip(self) -> None:
        d = self.deploy()
        self.assertNoResult(d)  # waits for the worker's answer
        self.pump.flush()
        self.successResultOf(d)
        lb = self.router.services["web"].active
        copy = self.replica.services["web"].active
        self.assertEqual(copy.id, lb.id)

        lb.targets[0].report_health(True)
        self.pump.flush()
        self.assertEqual([t.address for t in copy.healthy_writers], ["web-1:80"])

        request = FakeInFlight(copy.targets[0])
        drained = self.pool.drain([lb], 5 * 10**9)
        self.pump.flush()
        self.assertNoResult(drained)
        request.complete()
        self.pump.flush()
        self.successResultOf(drained)

        self.metrics.observe("web", b"GET", 200, 0.02)
        self.metrics.inflight("web").inc()
        collected = self.pool.collect_metrics()
        self.pump.flush()
        snapshots = self.successResultOf(collected)
        total = Metrics.total(snapshots)
        self.assertEqual(total.snapshot(process=False), self.metrics.snapshot(process=False))
        self.assertIn("process_cpu_seconds_total", snapshots[-1]["process"])

    def test_tokens_are_answered_before_the_ca_is_told(self) -> None:
        issuer = SimpleNamespace(key="https://ca/dir /cache")
        d = self.pool.challenge(issuer, "a.test", "tok", "tok.auth")
        self.assertNoResult(d)
        self.pump.flush()
        self.successResultOf(d)
        self.assertEqual(self.tls.copies[issuer.key].tokens, {"tok": "tok.auth"})
        self.pool.challenge_done(issuer, "tok")
        self.pump.flush()
        self.assertEqual(self.tls.copies[issuer.key].tokens, {})

    def test_worker_asks_main_for_a_certificate(self) -> None:
        entry = SimpleNamespace(not_after=0, to_pem=lambda: b"PEM")
        issuer = FakeIssuer(entry)
        self.tls.acme.issuers[issuer.key] = issuer
        d = self.worker_end.callRemote(commands.ObtainCertificate, issuer=issuer.key, name="a.test")
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), {"pem": "PEM"})
        self.assertEqual(issuer.asked, ["a.test"])
        refused: list[Failure] = []
        unknown = self.worker_end.callRemote(commands.ObtainCertificate, issuer="nope", name="b")
        unknown.addErrback(refused.append)
        self.pump.flush()
        self.assertEqual([f.type for f in refused], [commands.WorkerError])


class FakeConnection:
    transport = None

    def __init__(self) -> None:
        self.connected = True
        self.calls: list[tuple[type, defer.Deferred]] = []

    def callRemote(self, command: type, **kwargs: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((command, d))
        return d


class BroadcastTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.router = Router(
            self.clock, None, pool_factory=FakePool, health_check_factory=FakeHealthCheck
        )
        self.pool = pool_with(self.router, FakeTLS(), self.clock)
        self.killed: list[str] = []
        self.workers = []
        for i in range(3):
            worker = Worker(i, 0.0)
            worker.connection = FakeConnection()
            worker.process = SimpleNamespace(signalProcess=self.killed.append)
            self.pool.workers[i] = worker
            self.workers.append(worker)

    def test_answer_waits_for_all_and_a_lost_worker_counts_as_done(self) -> None:
        d = self.pool.publish(self.router, [], [])
        a, b, c = (w.connection.calls[0][1] for w in self.workers)
        a.callback({})
        self.assertNoResult(d)
        b.errback(Failure(error.ConnectionLost()))
        self.assertNoResult(d)
        c.callback({})
        self.successResultOf(d)

    def test_a_worker_that_does_not_answer_is_killed(self) -> None:
        d = self.pool.publish(self.router, [], [])
        for w in self.workers[:2]:
            w.connection.calls[0][1].callback({})
        self.clock.advance(31)
        self.successResultOf(d)
        self.assertEqual(self.killed, ["KILL"])

    def test_dead_worker_is_replaced_and_its_counts_kept(self) -> None:
        spawned: list[int] = []
        self.pool._spawn = spawned.append
        worker = self.workers[1]
        worker.metrics = {"requests": [["web", "GET", "200", [1] + [0] * 11, 1, 0.001]]}
        worker.started = -10.0
        self.pool._ended(worker, Failure(error.ProcessTerminated(signal=9)))
        self.clock.advance(0)
        self.assertEqual(spawned, [1])
        self.assertNotIn(1, self.pool.workers)
        self.assertEqual(self.pool._departed.snapshot()["requests"][0][4], 1)
        # A worker that keeps dying at start is replaced after a growing delay.
        for expected in (0.1, 0.2, 0.4):
            spawned.clear()
            fresh = Worker(1, self.clock.seconds())
            self.pool._ended(fresh, Failure(error.ProcessTerminated(exitCode=1)))
            self.clock.advance(expected - 0.01)
            self.assertEqual(spawned, [])
            self.clock.advance(0.01)
            self.assertEqual(spawned, [1])


class MetricsSumTests(unittest.TestCase):
    def test_sum_of_snapshots(self) -> None:
        one, two = Metrics(), Metrics()
        one.observe("web", b"GET", 200, 0.003)
        two.observe("web", "GET", 200, 0.2)
        two.observe("web", b"PURGE", 404, 1.0)
        one.inflight("web").inc()
        two.inflight("web").inc()
        total = Metrics.total([one.snapshot(), two.snapshot()])
        text = total.exposition()[0].decode()
        self.assertIn(
            'kamal_proxy_http_requests_total{method="GET",service="web",status="200"} 2.0', text
        )
        self.assertIn(
            'kamal_proxy_http_requests_total{method="OTHER",service="web",status="404"} 1.0',
            text,
        )
        self.assertIn('kamal_proxy_http_in_flight_requests{service="web"} 2.0', text)
        self.assertIn(
            'kamal_proxy_http_request_duration_seconds_bucket{le="0.005",method="GET",'
            'service="web",status="200"} 1.0',
            text,
        )
        departed = Metrics()
        departed.add(two.snapshot(), gauges=False)
        self.assertEqual(departed.snapshot()["inflight"], [])


class ProcessSeriesTests(unittest.TestCase):
    def setUp(self) -> None:
        if not os.path.exists("/proc/self/stat"):
            raise unittest.SkipTest("prometheus_client reads the process_* series from /proc")

    def test_workers_cpu_memory_and_fds_add_up(self) -> None:
        worker = {
            "requests": [],
            "inflight": [],
            "process": {
                "process_cpu_seconds_total": 100.0,
                "process_open_fds": 1000.0,
                "process_resident_memory_bytes": 5e9,
                "process_max_fds": 7.0,  # not summed: never sent, ignored if it were
            },
        }
        own = Metrics().process_values()
        total = Metrics.total([worker])
        values = total.process_values()
        self.assertGreaterEqual(
            values["process_cpu_seconds_total"], own["process_cpu_seconds_total"] + 100
        )
        self.assertGreater(values["process_open_fds"], 1000)
        self.assertGreater(values["process_resident_memory_bytes"], 5e9)
        text = total.exposition()[0].decode()
        line = [x for x in text.splitlines() if x.startswith("process_resident_memory_bytes ")]
        self.assertGreater(float(line[0].split()[1]), 5e9)
        max_fds = [x for x in text.splitlines() if x.startswith("process_max_fds ")]
        self.assertNotEqual(float(max_fds[0].split()[1]), 7.0)

    def test_a_gone_worker_keeps_only_its_cpu_time(self) -> None:
        departed = Metrics(process=False)
        departed.add(
            {"process": {"process_cpu_seconds_total": 3.5, "process_open_fds": 9.0}}, gauges=False
        )
        self.assertEqual(departed.snapshot()["process"], {"process_cpu_seconds_total": 3.5})


class WritePolicyTests(unittest.TestCase):
    def test_batches_hold_whole_lines_within_pipe_buf(self) -> None:
        lines = [f'{{"n":{i},"pad":"{"x" * (i * 37 % 900)}"}}\n' for i in range(200)]
        batches = line_batches(lines)
        self.assertEqual(b"".join(batches).decode(), "".join(lines))
        for batch in batches:
            self.assertLessEqual(len(batch), PIPE_BUF)
            self.assertTrue(batch.endswith(b"\n"))
        long_line = "y" * (PIPE_BUF + 10) + "\n"
        self.assertEqual(
            line_batches(["a\n", long_line, "b\n"]), [b"a\n", long_line.encode(), b"b\n"]
        )

    def test_undecodable_text_never_stops_a_write(self) -> None:
        # Raw bytes kept as surrogates go out as they came; other lone surrogates become U+FFFD.
        expected = b"a\xff\nb" + "\ufffd".encode() * 3 + b"\n"
        self.assertEqual(line_batches(["a\udcff\n", "b\ud800\n"]), [expected])

    def test_writes_to_a_pipe_are_whole_lines(self) -> None:
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        stream = os.fdopen(write_fd, "w")
        self.addCleanup(stream.close)
        lines = [json.dumps({"i": i, "text": "é" * 300}) + "\n" for i in range(20)]
        write_lines(stream, lines)
        data = os.read(read_fd, 1 << 20)
        self.assertEqual(data.decode(), "".join(lines))

    def test_streams_without_a_descriptor_get_one_write_per_batch(self) -> None:
        writes: list[str] = []
        stream = SimpleNamespace(write=writes.append, flush=lambda: None)
        write_lines(stream, ["a" * 3000 + "\n", "b" * 3000 + "\n"])
        self.assertEqual(writes, ["a" * 3000 + "\n", "b" * 3000 + "\n"])


class WorkersOptionTests(unittest.TestCase):
    def test_default_is_the_cpus_we_may_use(self) -> None:
        self.assertEqual(default_workers(), len(os.sched_getaffinity(0)))
        self.assertEqual(RunOptions().workers, default_workers())
        self.assertEqual(run_defaults({})["workers"], default_workers())

    def test_environment_prefix_rules(self) -> None:
        self.assertEqual(run_defaults({"WORKERS": "3"})["workers"], 3)
        self.assertEqual(run_defaults({"KAMAL_PROXY_WORKERS": "4", "WORKERS": "3"})["workers"], 4)
        self.assertEqual(
            run_defaults({"KAMAL_PROXY_WORKERS": "", "WORKERS": "3"})["workers"], default_workers()
        )
        self.assertEqual(run_defaults({"WORKERS": "many"})["workers"], default_workers())


class RelayTests(unittest.TestCase):
    """Under twistd's text log a worker's output comes through the main process, line by line
    (issue 12 §2: a daemon's stdout is /dev/null)."""

    def test_lines_are_relayed_whole(self) -> None:
        from twisted.logger import globalLogPublisher

        from kamal_proxy.process.supervisor import WorkerProcess

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        ended: list[Any] = []
        pool = SimpleNamespace(_ended=lambda worker, reason: ended.append(worker))
        process = WorkerProcess(pool, Worker(3, 0.0))
        line = b'{"time":"t","level":"INFO","msg":"Request","host":"a","status":200}\n'
        process.outReceived(line[:20])
        self.assertEqual([e for e in events if "kp_msg" in e], [])
        process.outReceived(line[20:] + line[:10])
        process.errReceived(b"Traceback (most recent call last):\n  File")
        process.processEnded(Failure(error.ProcessDone(0)))
        ours = [(e["kp_msg"], dict(e["kp_attrs"])) for e in events if "kp_msg" in e]
        self.assertEqual(
            ours,
            [
                ("Request", {"host": "a", "status": 200}),
                (
                    "Worker error output",
                    {"worker": 3, "text": "Traceback (most recent call last):"},
                ),
                ("Output", {"text": '{"time":"t'}),
                ("Worker error output", {"worker": 3, "text": "  File"}),
            ],
        )
        self.assertEqual(len(ended), 1)
