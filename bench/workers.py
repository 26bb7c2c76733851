"""Every core serves: throughput with the default workers beside nginx, and CPU per request.

Two questions of the issue "Every core serves", answered in one run on the shared harness
(``proxybench.py``, found by ``benchlib``), unpinned (every process may use every CPU):

* small-keepalive (GET /small, 64 keep-alive connections) through kamal-proxy with its default
  workers (one per usable CPU) and through nginx with ``worker_processes auto``: the ratio;
* CPU time of the proxy's whole process tree per 1,000 requests with ``--workers 1`` and
  ``--workers 2`` under the same load: the ratio (the cost of the extra process and hop).

Each configuration is measured ``--reps`` times in turn (interleaved, so a noisy neighbour
hits them alike); the table shows medians.  Usage::

    python bench/workers.py [--duration 8] [--reps 3] [--workdir DIR] [--baseline CMD]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import pb  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--kamal", default=benchlib.default_kamal())
    ap.add_argument(
        "--baseline",
        help="another kamal-proxy command (e.g. an install of main) measured as one process",
    )
    opts = ap.parse_args(argv)
    benchlib.require_tools("wrk", "nginx")
    benchlib.install_signal_handlers()

    args = pb.parse_args(
        ["--no-pin", "--duration", str(opts.duration), "--warmup", str(opts.warmup)]
    )
    ctx = benchlib.make_ctx(opts.workdir, pin=False)
    ctx.args = args
    args.kamal_deploy_args = ""
    workload = pb.build_workloads(args)["small-keepalive"]
    script = pb.write_script(ctx, workload)
    origin = pb.Origin(ctx)
    origin.start()

    configs = {
        "nginx-auto": (pb.NginxProxy(ctx, "nginx-auto", "auto"), None),
        "kamal-default": (pb.KamalProxy(ctx, "kamal-default", opts.kamal), ""),
        "kamal-w1": (pb.KamalProxy(ctx, "kamal-w1", opts.kamal), "--workers 1"),
        "kamal-w2": (pb.KamalProxy(ctx, "kamal-w2", opts.kamal), "--workers 2"),
    }
    if opts.baseline:
        configs["baseline"] = (pb.KamalProxy(ctx, "baseline", opts.baseline), "")
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    try:
        for rep in range(opts.reps):
            for name, (proxy, run_args) in configs.items():
                if run_args is not None:
                    args.kamal_run_args = run_args
                proxy.start()
                try:
                    rec = pb.measure(ctx, origin, proxy, workload, script, rep)
                finally:
                    proxy.stop()
                runs[name].append(rec)
                print(
                    f"rep {rep + 1} {name:14} {rec.get('rps', 0):9,.0f} req/s "
                    f"{rec.get('cpu_ms_per_1k') or 0:7.1f} CPU ms/1k req "
                    f"errors {rec.get('errors')}",
                    flush=True,
                )
    finally:
        origin.stop()
        pb.Managed.stop_all()

    def median(name: str, key: str) -> float:
        values = [r[key] for r in runs[name] if r.get("ok") and r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    rows = []
    for name in configs:
        rows.append(
            [
                name,
                f"{median(name, 'rps'):,.0f}",
                f"{median(name, 'cpu_ms_per_1k'):.1f}",
                str(sum(r.get("errors") or 0 for r in runs[name])),
            ]
        )
    print()
    print(f"small-keepalive, unpinned, {benchlib.machine_note()}, {opts.reps} reps, medians")
    print(benchlib.table(["proxy", "req/s", "proxy CPU ms / 1k req", "errors"], rows))
    default_ratio = median("kamal-default", "rps") / median("nginx-auto", "rps")
    cpu_ratio = median("kamal-w2", "cpu_ms_per_1k") / median("kamal-w1", "cpu_ms_per_1k")
    print(f"default workers / nginx-auto throughput: {default_ratio:.2f}x (bar: >= 0.25x)")
    print(f"CPU per request, 2 workers / 1 worker:   {cpu_ratio:.2f}x (bar: <= 1.1x)")
    if opts.baseline:
        base = median("kamal-w1", "cpu_ms_per_1k") / median("baseline", "cpu_ms_per_1k")
        print(f"CPU per request, 1 worker / baseline:    {base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
