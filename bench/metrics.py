"""What ``--metrics-port`` costs on the hot path (issue 4): CPU per request, on and off.

Runs the shared harness (proxybench) on ``small-keepalive`` with two kamal-proxies in one
interleaved session: ``kamal`` as is and ``kamal-metrics``, a wrapper that adds
``--metrics-port <port>`` to ``run`` (proxybench starts every kamal-compatible command as
``<cmd> run ...``).  Before that, the wrapper is checked: after one proxied request its metrics
port must serve ``kamal_proxy_http_requests_total`` for the service.  The figure is the
median over rounds of the paired ratio (same round) of CPU-µs per request, metrics on ÷ off.

    python bench/metrics.py [--reps 6] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import pb  # noqa: E402

WRAPPER = """#!/bin/sh
# kamal-proxy with a metrics listener: adds --metrics-port to `run`, passes the rest through.
if [ "$1" = run ]; then
    shift
    exec {kamal} run --metrics-port {port} "$@"
fi
exec {kamal} "$@"
"""


def write_wrapper(directory: Path, kamal: str, port: int) -> Path:
    path = directory / "kamal-proxy-metrics"
    path.write_text(WRAPPER.format(kamal=shlex.quote(kamal), port=port))
    path.chmod(0o755)
    return path


def check_wrapper(wrapper: Path, port: int) -> str:
    """Start the wrapper, proxy one request, scrape: the metrics must count it."""
    ctx = benchlib.make_ctx(None, pin=False)
    origin = pb.Origin(ctx)
    kamal = benchlib.Kamal(ctx, "kamal-metrics-check", str(wrapper))
    try:
        origin.start()
        kamal.start([])
        status, _, _ = pb.http_request(kamal.http_port, "GET", "/small")
        if status != 200:
            raise RuntimeError(f"GET /small through the wrapper -> {status}")
        deadline = time.monotonic() + 5
        text = ""
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            line = next(
                (
                    x
                    for x in text.splitlines()
                    if x.startswith("kamal_proxy_http_requests_total{") and 'service="bench"' in x
                ),
                None,
            )
            if line:
                return line
            time.sleep(0.1)
        raise RuntimeError(f"no kamal_proxy_http_requests_total for bench in:\n{text[:2000]}")
    finally:
        kamal.stop()
        origin.stop()
        shutil.rmtree(ctx.run, ignore_errors=True)


def paired(runs: list[dict], key: str, a: str, b: str) -> list[float]:
    by = {(r["proxy"], r["rep"]): r.get(key) for r in runs if r.get("ok")}
    return [
        by[(a, rep)] / by[(b, rep)]
        for (name, rep) in by
        if name == a and by.get((b, rep)) and by[(a, rep)] is not None
    ]


def render(data: dict, args) -> str:
    runs = data["runs"]
    rows = []
    for name in ("kamal", "kamal-metrics"):
        rs = [r for r in runs if r["proxy"] == name and r.get("ok")]
        if not rs:
            continue
        cpu = [r["cpu_ms_per_1k"] for r in rs]
        rps = [r["rps"] for r in rs]
        x_cpu = paired(runs, "cpu_ms_per_1k", name, "kamal")
        x_rps = paired(runs, "rps", name, "kamal")
        rows.append(
            [
                name,
                f"{statistics.median(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f})",
                f"{statistics.median(x_rps):.3f}",
                f"{statistics.median(cpu):.1f} ({min(cpu):.1f}–{max(cpu):.1f})",
                f"{statistics.median(x_cpu):.3f}" + (f" ({min(x_cpu):.3f}–{max(x_cpu):.3f})"),
                str(sum(r.get("errors", 0) for r in rs)),
                f"{statistics.median([r['peak_rss_mib'] for r in rs]):.1f}",
            ]
        )
    headers = ["proxy", "req/s median (min–max)", "×kamal req/s", "CPU-µs/req median (min–max)",
               "×kamal CPU/req (min–max)", "errors", "peak RSS MiB"]  # fmt: skip
    n = len({r["rep"] for r in runs})
    return (
        f"### metrics — small-keepalive (GET /small, 64 connections), n={n} rounds\n\n"
        + benchlib.table(headers, rows)
        + "\n\nkamal-metrics = the same kamal-proxy with `run --metrics-port <port>` (checked to "
        "count requests before the run). ×kamal = median over rounds of the paired ratio in the "
        f"same round. proxybench, fresh process per run, wrk+origin and proxy pinned to separate "
        f"CPUs; {benchlib.machine_note()}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6, help="interleaved rounds")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    ap.add_argument("--kamal-cmd", default=benchlib.default_kamal(), help="kamal-proxy command")
    ap.add_argument("--out", default=str(benchlib.BENCH / "results-metrics.json"))
    ap.add_argument("--markdown", default=str(benchlib.BENCH / "results-metrics.md"))
    args = ap.parse_args(argv)
    benchlib.require_tools("wrk", "nginx")
    scratch = Path(tempfile.mkdtemp(prefix="kamal-metrics-"))
    try:
        port = pb.free_port()
        wrapper = write_wrapper(scratch, args.kamal_cmd, port)
        line = check_wrapper(wrapper, port)
        pb.log(f"metrics wrapper checked: {line}")
        raw = scratch / "proxybench.json"
        cmd = [
            sys.executable, str(benchlib.harness_path()),
            "--proxies", "kamal,kamal-metrics",
            "--kamal", f"kamal={args.kamal_cmd}",
            "--kamal", f"kamal-metrics={wrapper}",
            "--workloads", "small-keepalive",
            "--reps", str(args.reps), "--duration", str(args.duration),
            "--out", str(raw),
        ]  # fmt: skip
        rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
        if not raw.exists():
            sys.exit(f"proxybench failed (rc={rc})")
        data = json.loads(raw.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = render(data, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
