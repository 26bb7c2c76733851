"""Profile kamal-proxy's hot path: a py-spy profile under wrk load, or instruction counts.

Two ways to look at the cost of one request, both against the harness's nginx origin with
the proxy pinned to its own CPU (as in ``run.py``):

* ``--mode pyspy`` (default): wrk drives the workload for ``--duration`` seconds while
  ``py-spy record`` samples the proxy; the flat profile (own time and total time per
  function, top ``--top`` rows) is printed and written to ``--out`` (text). Needs ``py-spy``
  (``pip install py-spy``).
* ``--mode callgrind``: the proxy runs under ``valgrind --tool=callgrind``; after a warm-up
  the counters are zeroed, wrk sends exactly ``--requests`` requests, and the instructions
  executed per request are printed. Instruction counts do not depend on the machine's load,
  so they are the repeatable A/B figure for one change to the hot path (SMT, steal, clock
  speed and other tenants move wall and CPU time, not instruction counts).

Workloads: ``small-keepalive`` (GET /small, keep-alive), ``small-newconn`` (a new connection
per request), ``big-download`` (GET /big, 1 MiB), ``upload`` (POST 1 MiB bodies to /sink).
Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import HOST, Kamal, default_kamal, make_ctx, pb

_WORKLOADS = {
    "small-keepalive": ("/small", 64, ""),
    "small-newconn": ("/small", 32, "Connection: close"),
    "big-download": ("/big", 16, ""),
    "upload": ("/sink", 8, ""),
}

_UPLOAD_LUA = """
wrk.method = "POST"
wrk.body = string.rep("u", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
"""

_COUNT_LUA = """
local proxybench_limit = tonumber(os.getenv("PROFILE_REQUESTS") or "0")
local proxybench_seen = 0
function response(status, headers, body)
   proxybench_seen = proxybench_seen + 1
   if proxybench_limit > 0 and proxybench_seen >= proxybench_limit then
      wrk.thread:stop()
   end
end
"""


def _wrk(
    ctx, port: int, workload: str, *, duration: float, connections: int | None = None, env=None
) -> subprocess.CompletedProcess:
    path, conns, header = _WORKLOADS[workload]
    script = ctx.run / f"profile-{workload}.lua"
    script.write_text(_COUNT_LUA + (_UPLOAD_LUA if workload == "upload" else ""))
    argv = [ctx.args.wrk, "-t", "1", "-c", str(connections or conns), "-d", f"{duration:g}s"]
    argv += ["--timeout", "30s", "-H", f"Host: {HOST}", "-s", str(script)]
    if header:
        argv += ["-H", header]
    argv.append(f"http://127.0.0.1:{port}{path}")
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 120,
        preexec_fn=pb._affinity_fn(ctx.loadgen_cpus),
        env=dict(os.environ, **(env or {})),
        stdin=subprocess.DEVNULL,
    )


def _requests_done(out: str) -> int:
    match = re.search(r"(\d+) requests in", out)
    return int(match.group(1)) if match else 0


def profile_pyspy(ctx, kamal: Kamal, args) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = ctx.run / "pyspy.txt"
    _wrk(ctx, kamal.http_port, args.workload, duration=1)  # warm-up
    spy = subprocess.Popen(
        [py_spy, "record", "-p", str(kamal.proc.pid), "-r", "400", "-d", f"{args.duration:g}"]
        + ["-f", "raw", "-o", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        result = _wrk(ctx, kamal.http_port, args.workload, duration=args.duration)
    finally:
        spy.wait(args.duration + 30)
    done = _requests_done(result.stdout)
    return f"{done} requests in {args.duration:g}s\n" + flat_profile(raw, args.top)


# "name (/long/path/site-packages/pkg/mod.py:123)" -> "name (pkg/mod.py)": one row per function.
_FRAME = re.compile(r" \((?:.*/(?:site-packages|lib/python[0-9.]+)/)?(.*?):\d+\)")


def flat_profile(raw: Path, top: int) -> str:
    """Own and total sample shares per function from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_FRAME.sub(r" (\1)", f) for f in stack.split(";")]
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    rows = [f"{samples} samples", f"{'own %':>6} {'total %':>7}  function"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"{100 * count / samples:6.1f} {100 * total[frame] / samples:7.1f}  {frame}")
    return "\n".join(rows) + "\n"


def profile_callgrind(ctx, kamal_cmd: str, args) -> str:
    out_file = ctx.run / "callgrind.out"
    cmd = (
        f"valgrind --tool=callgrind --callgrind-out-file={out_file} "
        f"--dump-instr=no --collect-systime=no {kamal_cmd}"
    )
    kamal = Kamal(ctx, "kamal-cg", cmd)
    kamal.start(["--deploy-timeout", "300s"], wait=300)
    try:
        _wrk(ctx, kamal.http_port, args.workload, duration=5, connections=4)  # warm-up
        subprocess.run(["callgrind_control", "--zero", str(kamal.proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
        result = _wrk(
            ctx,
            kamal.http_port,
            args.workload,
            duration=600,
            connections=args.connections,
            env={"PROFILE_REQUESTS": str(args.requests)},
        )
        done = _requests_done(result.stdout)
        dump = subprocess.run(
            ["callgrind_control", "--dump", str(kamal.proc.pid)], capture_output=True, text=True
        )
        time.sleep(1)
    finally:
        kamal.stop()
    instructions = 0
    dumps = sorted(ctx.run.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
    for path in dumps:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                instructions = int(line.split()[1])
                break
        if "part" in path.name or path.name.endswith(".1"):
            break
    if dump.returncode != 0 or not done:
        return f"callgrind dump failed: {dump.stderr}"
    return (
        f"{done} requests ({args.workload}, {args.connections} connections): "
        f"{instructions:,} instructions, {instructions / done:,.0f} per request\n"
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["pyspy", "callgrind"], default="pyspy")
    ap.add_argument("--workload", choices=sorted(_WORKLOADS), default="small-keepalive")
    ap.add_argument("--duration", type=float, default=10.0, help="py-spy: seconds of load")
    ap.add_argument("--requests", type=int, default=2000, help="callgrind: requests counted")
    ap.add_argument("--connections", type=int, default=8, help="callgrind: wrk connections")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--kamal-cmd", default=default_kamal())
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args(argv)
    benchlib.require_tools("wrk", "nginx")
    benchlib.install_signal_handlers()
    ctx = make_ctx(Path(tempfile.mkdtemp(prefix="kamal-profile-")))
    origin = pb.Origin(ctx)
    origin.start()
    try:
        if args.mode == "callgrind":
            benchlib.require_tools("valgrind", "callgrind_control")
            report = profile_callgrind(ctx, args.kamal_cmd, args)
        else:
            kamal = Kamal(ctx, "kamal", args.kamal_cmd)
            kamal.start([])
            try:
                report = profile_pyspy(ctx, kamal, args)
            finally:
                kamal.stop()
    finally:
        origin.stop()
        pb.Managed.stop_all()
        shutil.rmtree(ctx.run, ignore_errors=True)
    print(report, end="")
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
