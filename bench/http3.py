"""HTTP/3 beside HTTP/2 on the same kamal-proxy and service: requests/s and CPU per request.

One ``kamal-proxy run --http3`` (pinned to the proxy CPU as in the other benchmarks), one
``deploy --host bench.test --tls`` with a generated certificate, proxybench's nginx origin
(``GET /small``, 100 B).  wrk speaks neither protocol here, so the load comes from Python
clients in separate processes pinned to the load-generator CPU: aioquic's client for HTTP/3
(``tests/h3client.py``) and the ``h2`` library over ``ssl`` for HTTP/2, each on one
connection keeping ``--streams`` requests in flight.  The clients are the slower side, so
requests/s mostly measures them; the proxy's CPU time per request (``/proc`` of its process
tree over the run) is the figure to compare.  Rounds alternate the protocols.

    python bench/http3.py [--reps 3] [--duration 5] [--clients 2] [--streams 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


# -- load clients (run as child processes: ``http3.py --client h3|h2 ...``) --------------------


def run_h3_client(port: int, cert: str, duration: float, streams: int) -> dict:
    from tests.h3client import H3Client

    done = errors = 0
    with H3Client(port, "bench.test", Path(cert).read_text(), timeout=30) as client:
        end = time.monotonic() + duration
        while time.monotonic() < end:
            ids = [client.send(path="/small") for _ in range(streams)]
            for stream_id in ids:
                response = client.wait(stream_id)
                if response.status == 200:
                    done += 1
                else:
                    errors += 1
    return {"requests": done, "errors": errors}


def run_h2_client(port: int, cert: str, duration: float, streams: int) -> dict:
    import h2.config
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=cert)
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock = context.wrap_socket(raw, server_hostname="bench.test")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    done = errors = 0
    headers = [
        (":method", "GET"),
        (":path", "/small"),
        (":scheme", "https"),
        (":authority", "bench.test"),
    ]
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            pending: dict[int, int] = {}
            for _ in range(streams):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, headers, end_stream=True)
                pending[stream_id] = 0
            sock.sendall(conn.data_to_send())
            while pending:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("connection closed")
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        pending[event.stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        status = pending.pop(event.stream_id, 0)
                        if status == 200:
                            done += 1
                        else:
                            errors += 1
                sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return {"requests": done, "errors": errors}


def client_main(args: argparse.Namespace) -> int:
    run = run_h3_client if args.client == "h3" else run_h2_client
    print(json.dumps(run(args.port, args.cert, args.duration, args.streams)))
    return 0


# -- the run -----------------------------------------------------------------------------------


def load(ctx, proto: str, port: int, cert: Path, args: argparse.Namespace, duration: float):
    """``args.clients`` client processes for ``duration``; their summed counts."""
    argv = [sys.executable, __file__, "--client", proto, "--port", str(port)]
    argv += ["--cert", str(cert), "--duration", str(duration), "--streams", str(args.streams)]
    cpus = ctx.loadgen_cpus

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=pin)
        for _ in range(args.clients)
    ]
    totals = {"requests": 0, "errors": 0}
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"{proto} client failed (exit {proc.returncode})")
        result = json.loads(out)
        totals["requests"] += result["requests"]
        totals["errors"] += result["errors"]
    return totals


def measure(ctx, pb, proxy, proto: str, cert: Path, args: argparse.Namespace) -> dict:
    if args.warmup > 0:
        load(ctx, proto, proxy.https_port, cert, args, args.warmup)
    roots = proxy.roots()
    before = pb.tree_cpu_seconds(roots)
    started = time.monotonic()
    counts = load(ctx, proto, proxy.https_port, cert, args, args.duration)
    wall = time.monotonic() - started
    cpu = pb.tree_cpu_seconds(roots) - before
    proxy.trim_log()
    requests = counts["requests"]
    return {
        "proto": proto,
        "requests": requests,
        "errors": counts["errors"],
        "rps": requests / wall,
        "cpu_us_per_req": cpu * 1e6 / requests if requests else None,
        "proxy_cpu_frac": cpu / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=["h3", "h2"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args)

    import benchlib
    from tls import make_certificate

    pb = benchlib.pb
    benchlib.install_signal_handlers()
    ctx = benchlib.make_ctx(args.workdir)
    origin = pb.Origin(ctx)
    proxy = benchlib.Kamal(ctx, "kamal", benchlib.default_kamal())
    runs: list[dict] = []
    try:
        origin.start()
        cert, key = make_certificate(ctx.run)
        proxy.start(
            ["--tls", "--tls-certificate-path", str(cert), "--tls-private-key-path", str(key)],
            ["--http3"],
        )
        for rep in range(args.reps):
            order = ["h3", "h2"] if rep % 2 == 0 else ["h2", "h3"]
            for proto in order:
                result = measure(ctx, pb, proxy, proto, cert, args)
                print(json.dumps(result), flush=True)
                runs.append(result)
    finally:
        proxy.stop()
        origin.stop()
    print()
    print("| protocol | requests/s | proxy CPU µs/request | errors |")
    print("|---|---|---|---|")
    for proto, label in (("h2", "HTTP/2"), ("h3", "HTTP/3")):
        mine = [r for r in runs if r["proto"] == proto]
        rps = statistics.median(r["rps"] for r in mine)
        cpu = statistics.median(r["cpu_us_per_req"] for r in mine if r["cpu_us_per_req"])
        print(f"| {label} | {rps:,.0f} | {cpu:,.0f} | {sum(r['errors'] for r in mine)} |")
    print(f"\n{args.clients} client processes x {args.streams} streams, {args.reps} rounds")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
