"""Micro-benchmark: UpstreamPool.forward() against twisted.web.client.Agent.

Not a test. Starts a minimal keep-alive origin in a child process on 127.0.0.1, then runs
N concurrent request loops in this process for a fixed time with each client, and reports
requests/s and this process's CPU time per request (the figure that matters for the proxy's
hot path: DESIGN §4).

    python bench/upstream_micro.py [--duration 3] [--concurrency 1,16] [--size 13]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

ORIGIN = r"""
import sys
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

body = b"x" * int(sys.argv[1])
response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(body), body)

class Origin(Protocol):
    buf = b""
    def dataReceived(self, data):
        buf = self.buf + data
        n = buf.count(b"\r\n\r\n")
        if n:
            self.transport.write(response * n)
            buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
        self.buf = buf

port = reactor.listenTCP(0, Factory.forProtocol(Origin), interface="127.0.0.1", backlog=1024)
print(port.getHost().port, flush=True)
reactor.run()
"""


def start_origin(size: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ORIGIN, str(size)], stdout=subprocess.PIPE, text=True
    )
    port = int(proc.stdout.readline())
    return proc, port


def run(client: str, port: int, concurrency: int, duration: float) -> tuple[float, float]:
    """Return (requests/s, CPU microseconds per request) for one client kind."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    count = 0
    stop_at = [0.0]
    finished: Deferred = Deferred()
    active = [concurrency]

    def loop_done() -> None:
        active[0] -= 1
        if active[0] == 0:
            finished.callback(None)

    if client == "upstream":
        from kamal_proxy.proxy.upstream import UpstreamPool

        pool = UpstreamPool(reactor, "127.0.0.1", port)
        headers = [(b"Host", b"bench.test"), (b"User-Agent", b"bench"), (b"Accept", b"*/*")]

        class Loop:
            def response_started(self, status, reason, headers, length):
                pass

            def response_data(self, data):
                pass

            def informational(self, status, headers):
                pass

            def upgraded(self, tunnel):
                pass

            def done(self, _):
                nonlocal count
                count += 1
                self.next()

            def next(self):
                if time.monotonic() >= stop_at[0]:
                    loop_done()
                    return
                ex = pool.forward(b"GET", b"/", headers, None, self, timeout=30)
                ex.done.addCallback(self.done)

        def start() -> None:
            for _ in range(concurrency):
                Loop().next()

        def close() -> None:
            pool.close()

    else:
        from twisted.web.client import Agent, HTTPConnectionPool, readBody
        from twisted.web.http_headers import Headers

        hpool = HTTPConnectionPool(reactor, persistent=True)
        hpool.maxPersistentPerHost = concurrency
        agent = Agent(reactor, pool=hpool)
        url = b"http://127.0.0.1:%d/" % port
        agent_headers = Headers({b"Host": [b"bench.test"], b"Accept": [b"*/*"]})

        def next_request(_=None, first=False) -> None:
            nonlocal count
            if not first:
                count += 1
            if time.monotonic() >= stop_at[0]:
                loop_done()
                return
            d = agent.request(b"GET", url, agent_headers)
            d.addCallback(readBody)
            d.addCallback(next_request)

        def start() -> None:
            for _ in range(concurrency):
                next_request(first=True)

        def close() -> None:
            hpool.closeCachedConnections()

    results: list[tuple[float, float]] = []

    def go() -> None:
        nonlocal count
        count = 0
        stop_at[0] = time.monotonic() + duration
        t0, c0 = time.monotonic(), time.process_time()

        def report(_: object) -> None:
            elapsed, cpu = time.monotonic() - t0, time.process_time() - c0
            results.append((count / elapsed, cpu / max(count, 1) * 1e6))
            close()
            reactor.callLater(0.1, reactor.stop)

        finished.addCallback(report)
        start()

    reactor.callWhenRunning(go)
    reactor.run()
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--size", type=int, default=13, help="response body bytes")
    parser.add_argument("--clients", default="upstream,agent")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: client conc
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # one measurement in a fresh process (a reactor runs once per process)
        rps, cpu = run(args.one[0], args.port, int(args.one[1]), args.duration)
        print(f"{rps:.0f} {cpu:.1f}")
        return

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc, port = start_origin(args.size)
    try:
        print(f"origin 127.0.0.1:{port}, {args.size}-byte body, {args.duration:g}s per run")
        print(f"{'client':10} {'conc':>5} {'req/s':>9} {'CPU us/req':>11}")
        here = os.path.abspath(__file__)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(here)))
        for conc in args.concurrency.split(","):
            for client in args.clients.split(","):
                out = subprocess.run(
                    [sys.executable, here, "--one", client, conc, "--port", str(port)]
                    + ["--duration", str(args.duration)],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=args.duration + 60,
                )
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    continue
                rps, cpu = out.stdout.split()
                print(f"{client:10} {conc:>5} {float(rps):>9.0f} {float(cpu):>11.1f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
