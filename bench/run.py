"""Benchmark this proxy beside ``direct`` and ``nginx`` with the shared harness (proxybench).

Figures are ratios measured in one run (the machine is shared and noisy): CPU per request
against nginx on ``small-keepalive``, throughput against nginx on ``big-download`` and
``upload``, and peak RSS under ``upload``.  Extra arguments go to proxybench, e.g.
``python bench/run.py --reps 1 --duration 3``.

The harness lives outside the repository; point ``PROXYBENCH`` at ``proxybench.py`` if it is
not in ``../shared/bench/`` beside the checkout.  It needs Debian's ``wrk`` and ``nginx``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKLOADS = "small-keepalive,big-download,upload"


def harness() -> Path:
    explicit = os.environ.get("PROXYBENCH")
    candidates = [Path(explicit)] if explicit else []
    candidates.append(ROOT.parent / "shared" / "bench" / "proxybench.py")
    for path in candidates:
        if path.exists():
            return path
    sys.exit("proxybench.py not found: set PROXYBENCH to its path")


def main(argv: list[str]) -> int:
    missing = [tool for tool in ("wrk", "nginx") if not shutil.which(tool)]
    if missing and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False)
    kamal = Path(sys.executable).parent / "kamal-proxy"
    cmd = [
        sys.executable,
        str(harness()),
        "--proxies",
        "direct,nginx,kamal",
        "--kamal-cmd",
        str(kamal),
        "--workloads",
        DEFAULT_WORKLOADS,
        "--out",
        str(ROOT / "bench" / "results.json"),
        "--markdown",
        str(ROOT / "bench" / "results.md"),
        *argv,
    ]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
