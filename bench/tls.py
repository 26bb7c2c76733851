"""HTTPS beside nginx: keep-alive requests and new-connection handshakes (issue 3).

The shared harness has no TLS mode, so this script adds one, with the harness's method: one
run, interleaved rounds (the proxy order rotates), wrk and the origin pinned to the first CPU,
the proxy to the second, CPU per request from ``/proc/<pid>/stat`` of the proxy's process tree.

* nginx: ``worker_processes 1``, TLS with a self-signed ECDSA P-256 certificate generated for
  the run, proxying to the origin over a keep-alive upstream (as proxybench's nginx).
* kamal: ``kamal-proxy deploy --host bench.test --tls --tls-certificate-path ...
  --tls-private-key-path ...`` with the same certificate and key.

Workloads (wrk, 1 thread, ``https://bench.test:PORT/small`` resolved to 127.0.0.1 by a Lua
``wrk.resolve`` so that SNI and Host are ``bench.test``):

* ``tls-keepalive``: GET /small (100 B), 64 keep-alive connections;
* ``tls-newconn``: the same with ``Connection: close``, 32 connections: one full TLS handshake
  per request (wrk does not resume sessions).

Before any load each proxy must answer ``GET /small`` over TLS (SNI bench.test, certificate
verified against the generated one) with 200 and the origin's exact body.

    python bench/tls.py [--reps 3] [--duration 5] [--kamal-cmd kamal-proxy]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import HOST, pb  # noqa: E402

NGINX_TLS_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid @@RUN@@/nginx-tls.pid;
error_log @@RUN@@/nginx-tls-error.log warn;
worker_rlimit_nofile 16384;

events {
    worker_connections 8192;
}

http {
    access_log off;
    server_tokens off;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;

    client_body_temp_path @@RUN@@/nginx-tls-tmp/body;
    proxy_temp_path       @@RUN@@/nginx-tls-tmp/proxy;
    fastcgi_temp_path     @@RUN@@/nginx-tls-tmp/fastcgi;
    uwsgi_temp_path       @@RUN@@/nginx-tls-tmp/uwsgi;
    scgi_temp_path        @@RUN@@/nginx-tls-tmp/scgi;

    upstream origin {
        server 127.0.0.1:@@ORIGIN_PORT@@;
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 120s;
    }

    server {
        listen 127.0.0.1:@@PORT@@ ssl default_server backlog=4096;
        server_name bench.test;
        ssl_certificate     @@CERT@@;
        ssl_certificate_key @@KEY@@;
        ssl_protocols TLSv1.2 TLSv1.3;

        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering on;
        proxy_buffers 16 16k;
        proxy_max_temp_file_size 0;

        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }
    }
}
"""

WORKLOADS = {
    "tls-keepalive": {"connections": 64, "headers": [], "about": "GET /small, keep-alive"},
    "tls-newconn": {
        "connections": 32,
        "headers": ["Connection: close"],
        "about": "GET /small, Connection: close (a full TLS handshake per request)",
    },
}


def make_certificate(run: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for bench.test (and 127.0.0.1)."""
    cert, key = run / "bench.crt", run / "bench.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={HOST}",
            "-addext", f"subjectAltName=DNS:{HOST},IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    os.chmod(key, 0o600)
    return cert, key


class NginxTLS:
    name = "nginx"

    def __init__(self, ctx, cert: Path, key: Path) -> None:
        self.ctx, self.cert, self.key = ctx, cert, key
        self.proc = None
        self.port = 0

    def start(self) -> None:
        ctx = self.ctx
        self.port = pb.free_port()
        (ctx.run / "nginx-tls-tmp").mkdir(exist_ok=True)
        conf = ctx.run / "nginx-tls.conf"
        text = NGINX_TLS_CONF
        values = {
            "RUN": ctx.run,
            "PORT": self.port,
            "ORIGIN_PORT": ctx.origin_port,
            "CERT": self.cert,
            "KEY": self.key,
        }
        for k, v in values.items():
            text = text.replace(f"@@{k}@@", str(v))
        conf.write_text((ctx.user_line + "\n" if ctx.user_line else "") + text)
        argv = [ctx.args.nginx, "-p", str(ctx.run), "-e", str(ctx.run / "nginx-tls-error.log")]
        argv += ["-c", str(conf)]
        self.proc = pb.Managed("nginx", argv, cpus=ctx.proxy_cpus, log_path=ctx.run / "nginx.log")
        wait_https(self.port, self.cert, self.proc)
        self.proc.remember_descendants()

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def trim_log(self) -> None:
        pass

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None


class KamalTLS(benchlib.Kamal):
    def __init__(self, ctx, cmd: str, cert: Path, key: Path) -> None:
        super().__init__(ctx, "kamal", cmd)
        self.cert, self.key = cert, key

    @property
    def port(self) -> int:
        return self.https_port

    def start(self) -> None:  # type: ignore[override]
        super().start(
            ["--tls", "--tls-certificate-path", str(self.cert),
             "--tls-private-key-path", str(self.key)]
        )  # fmt: skip
        wait_https(self.https_port, self.cert, self.proc)


def https_get(port: int, cert: Path, path: str = "/small", timeout: float = 5.0):
    """GET over TLS with SNI bench.test, the chain verified against the generated cert."""
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    # Connect to 127.0.0.1 whatever bench.test resolves to; SNI and Host stay bench.test.
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sock = context.wrap_socket(raw, server_hostname=HOST)
    try:
        conn.request("GET", path, headers={"Host": HOST})
        resp = conn.getresponse()
        return resp.status, resp.read(), conn.sock.version()
    finally:
        conn.close()


def wait_https(port: int, cert: Path, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"exited:\n{proc.log_tail()}")
        try:
            status, body, _ = https_get(port, cert, "/up", timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, ssl.SSLError) as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"https port {port} not ready ({last})\n{proc.log_tail() if proc else ''}")


def check(proxy, cert: Path, script: Path) -> str:
    """200 with the exact body over TLS, from Python and from wrk itself; returns TLS version."""
    status, body, version = https_get(proxy.port, cert)
    if status != 200 or body.decode(errors="replace") != pb.SMALL_BODY:
        raise RuntimeError(f"{proxy.name}: GET /small over TLS -> {status}, {body[:80]!r}")
    res = benchlib.run_wrk(
        proxy.ctx, f"https://{HOST}:{proxy.port}/small", script, connections=2, duration=1
    )
    if res["requests"] == 0 or benchlib.wrk_errors(res):
        raise RuntimeError(f"{proxy.name}: wrk over TLS: {res['requests']} reqs, {res['errors']}")
    expected = len(pb.SMALL_BODY)
    if res["bytes"] < res["requests"] * expected:
        raise RuntimeError(f"{proxy.name}: wrk got {res['bytes']} bytes for {res['requests']} reqs")
    return version


def measure(ctx, origin, proxy, wl: str, script: Path, duration: float, warmup: float) -> dict:
    spec = WORKLOADS[wl]
    url = f"https://{HOST}:{proxy.port}/small"

    def go(seconds: float) -> dict:
        return benchlib.run_wrk(
            ctx,
            url,
            script,
            connections=spec["connections"],
            duration=seconds,
            headers=spec["headers"],
        )

    if warmup > 0:
        go(warmup)
    roots = proxy.roots()
    pb.reset_peak_rss(roots)
    b_cpu, b_busy = pb.tree_cpu_seconds(roots), pb.cpu_times()
    t0 = time.monotonic()
    res = go(duration)
    wall = time.monotonic() - t0
    a_busy, a_cpu = pb.cpu_times(), pb.tree_cpu_seconds(roots)
    mem = pb.tree_memory_kb(roots)
    proxy.trim_log()
    reqs, dur = res["requests"], res["duration_us"] / 1e6
    busy = pb.cpu_busy_delta(b_busy, a_busy)["busy"]
    cpu = a_cpu - b_cpu
    return {
        "proxy": proxy.name,
        "workload": wl,
        "requests": reqs,
        "rps": reqs / dur if dur else 0.0,
        "cpu_us_per_req": cpu * 1e6 / reqs if reqs else None,
        "proxy_cpu_frac": cpu / wall,
        "p50_us": res["latency_us"]["p50"],
        "p99_us": res["latency_us"]["p99"],
        "errors": benchlib.wrk_errors(res),
        "peak_rss_mib": mem["hwm_kb"] / 1024 if mem else None,
        "core_busy": {str(k): round(v, 3) for k, v in busy.items()},
        "wrk": res,
    }


def summarize(runs: list[dict], names: list[str]) -> str:
    parts = []
    for wl, spec in WORKLOADS.items():
        rows = []
        for name in names:
            rs = [r for r in runs if r["proxy"] == name and r["workload"] == wl]
            if not rs:
                continue
            ref = {r["rep"]: r for r in runs if r["proxy"] == "nginx" and r["workload"] == wl}
            x_rps = [r["rps"] / ref[r["rep"]]["rps"] for r in rs if r["rep"] in ref]
            x_cpu = [
                r["cpu_us_per_req"] / ref[r["rep"]]["cpu_us_per_req"]
                for r in rs
                if r["rep"] in ref and r["cpu_us_per_req"] and ref[r["rep"]]["cpu_us_per_req"]
            ]
            cpu = [r["cpu_us_per_req"] for r in rs if r["cpu_us_per_req"] is not None]
            rps = [r["rps"] for r in rs]
            rows.append(
                [
                    name,
                    f"{statistics.median(rps):,.0f}",
                    f"{min(rps):,.0f}–{max(rps):,.0f}",
                    f"{statistics.median(x_rps):.2f}",
                    f"{statistics.median(cpu):,.0f} ({min(cpu):,.0f}–{max(cpu):,.0f})",
                    f"{statistics.median(x_cpu):.2f}",
                    f"{statistics.median([r['proxy_cpu_frac'] for r in rs]):.0%}",
                    f"{statistics.median([r['p50_us'] for r in rs]) / 1000:.2f}",
                    f"{statistics.median([r['p99_us'] for r in rs]) / 1000:.2f}",
                    f"{max(r['peak_rss_mib'] or 0 for r in rs):.1f}",
                    str(sum(r["errors"] for r in rs)),
                ]
            )
        headers = ["proxy", "req/s (median)", "min–max", "×nginx req/s", "CPU-µs/req",
                   "×nginx CPU/req", "proxy CPU", "p50 ms", "p99 ms", "peak RSS MiB",
                   "errors"]  # fmt: skip
        n = max(len([r for r in runs if r["workload"] == wl and r["proxy"] == p]) for p in names)
        about = f"{spec['about']}, {spec['connections']} connections (n={n} per proxy)"
        parts.append(f"### {wl} — {about}\n\n" + benchlib.table(headers, rows))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between runs")
    ap.add_argument("--kamal-cmd", default=benchlib.default_kamal(), help="kamal-proxy command")
    ap.add_argument("--out", default=str(benchlib.BENCH / "results-tls.json"))
    ap.add_argument("--markdown", default=str(benchlib.BENCH / "results-tls.md"))
    ap.add_argument("--workdir", help="scratch directory (kept); default: a temporary one")
    args = ap.parse_args(argv)
    benchlib.require_tools("wrk", "nginx", "openssl")
    benchlib.install_signal_handlers()
    ctx = benchlib.make_ctx(Path(args.workdir) if args.workdir else None)
    origin = pb.Origin(ctx)
    proxies = []
    runs: list[dict] = []
    versions = {}
    try:
        cert, key = make_certificate(ctx.run)
        origin.start()
        script = benchlib.wrk_script(ctx, "tls", resolve_to="127.0.0.1")
        for proxy in (NginxTLS(ctx, cert, key), KamalTLS(ctx, args.kamal_cmd, cert, key)):
            proxy.start()
            proxies.append(proxy)
            versions[proxy.name] = check(proxy, cert, script)
            pb.log(f"{proxy.name}: HTTPS 127.0.0.1:{proxy.port} ({versions[proxy.name]}), checked")
        for rep in range(args.reps):
            for wl in WORKLOADS:
                order = proxies[rep % len(proxies) :] + proxies[: rep % len(proxies)]
                for proxy in order:
                    if proxy.proc is None or not proxy.proc.alive():
                        raise RuntimeError(f"{proxy.name} is gone:\n{proxy.proc.log_tail()}")
                    rec = measure(ctx, origin, proxy, wl, script, args.duration, args.warmup)
                    rec["rep"] = rep
                    runs.append(rec)
                    pb.log(
                        f"round {rep + 1} {wl:<14} {proxy.name:<6} {rec['rps']:8,.0f} req/s  "
                        f"cpu {rec['cpu_us_per_req']:6,.0f} µs/req  err {rec['errors']}  "
                        f"busy {rec['core_busy']}"
                    )
                    time.sleep(args.pause)
    finally:
        for proxy in proxies:
            proxy.stop()
        origin.stop()
        pb.Managed.stop_all()
        if not args.workdir:
            shutil.rmtree(ctx.run, ignore_errors=True)
    names = [p.name for p in proxies]
    text = summarize(runs, names)
    load, proxy_cpus = sorted(ctx.loadgen_cpus or []), sorted(ctx.proxy_cpus or [])
    pinning = f"wrk+origin on CPU {load}, proxy on {proxy_cpus}"
    text += (
        f"\nTLS: {', '.join(f'{k} {v}' for k, v in versions.items())}, ECDSA P-256 self-signed, "
        f"SNI {HOST}; {pinning}; {benchlib.machine_note()}; {args.reps} rounds × "
        f"{args.duration:g} s, interleaved. CPU-µs/req = proxy user+sys time (process tree) per "
        "request; ×nginx = median over rounds of the paired ratio in the same round.\n"
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "tls": versions}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
