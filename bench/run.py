"""Benchmark this proxy beside ``direct`` and ``nginx`` with the shared harness (proxybench).

Figures are ratios measured in one run (the machine is shared and noisy): CPU per request
against nginx on ``small-keepalive``, throughput against nginx on ``big-download`` and
``upload``, and peak RSS under ``upload``.  Extra arguments go to proxybench, e.g.
``python bench/run.py --reps 1 --duration 3``.  With ``--bars`` (taken out before the rest
goes to proxybench) it also prints issue 2's bars, as paired ratios per round, from the
results it just wrote (``--bars-only`` prints them for the saved ``bench/results.json``).

The harness lives outside the repository; point ``PROXYBENCH`` at ``proxybench.py`` if it is
not in ``../shared/bench/`` beside the checkout.  It needs Debian's ``wrk`` and ``nginx``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchlib import harness_path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKLOADS = "small-keepalive,big-download,upload"


def paired(runs: list[dict], workload: str, key: str) -> list[float]:
    """kamal ÷ nginx per round (same round, adjacent in time)."""
    by = {(r["proxy"], r["rep"]): r.get(key) for r in runs if r["workload"] == workload}
    return [
        by[("kamal", rep)] / by[("nginx", rep)]
        for (name, rep) in by
        if name == "kamal" and by.get(("nginx", rep)) and by[("kamal", rep)] is not None
    ]


def bars(path: Path) -> str:
    """Issue 2's bars as a Markdown table: median (min–max) over rounds, and the verdict."""
    runs = [r for r in json.loads(path.read_text())["runs"] if r.get("ok")]
    rss = [r["peak_rss_mib"] for r in runs if r["proxy"] == "kamal" and r["workload"] == "upload"]
    checks = [
        ("small-keepalive CPU/req ×nginx", paired(runs, "small-keepalive", "cpu_ms_per_1k"),
         "≤ 10", lambda v: v <= 10),
        ("big-download MiB/s ×nginx", paired(runs, "big-download", "mibps"),
         "≥ 0.6", lambda v: v >= 0.6),
        ("upload MiB/s ×nginx", paired(runs, "upload", "mibps"), "≥ 0.6", lambda v: v >= 0.6),
        ("upload peak RSS MiB (max)", rss, "≤ 80", lambda v: v <= 80),
    ]  # fmt: skip
    lines = ["| figure | median (min–max) | bar | met |", "|---|---|---|---|"]
    for name, values, bar, ok in checks:
        if not values:
            lines.append(f"| {name} | — | {bar} | not measured |")
            continue
        value = max(values) if "max" in name else statistics.median(values)
        spread = f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"
        lines.append(f"| {name} | {spread} | {bar} | {'yes' if ok(value) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    results = ROOT / "bench" / "results.json"
    if "--bars-only" in argv:
        print(bars(results))
        return 0
    want_bars = "--bars" in argv
    argv = [a for a in argv if a != "--bars"]
    missing = [tool for tool in ("wrk", "nginx") if not shutil.which(tool)]
    if missing and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False)
    kamal = Path(sys.executable).parent / "kamal-proxy"
    cmd = [
        sys.executable,
        str(harness_path()),
        "--proxies",
        "direct,nginx,kamal",
        "--kamal-cmd",
        str(kamal),
        "--workloads",
        DEFAULT_WORKLOADS,
        "--out",
        str(results),
        "--markdown",
        str(ROOT / "bench" / "results.md"),
        *argv,
    ]
    rc = subprocess.call(cmd)
    if want_bars and results.exists():
        print(bars(results))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
