"""Memory under buffered uploads (issue 4): 20 concurrent 50 MiB request bodies.

kamal-proxy is deployed with ``--buffer-requests --buffer-memory 1048576`` (the default
memory limit, stated explicitly), then N client threads each POST one body of the given size
at the same time, through the proxy, to an origin that reads and discards bodies
(``sink_origin.py``).  Every response must be 200 with the origin confirming every byte.

Reported per mode: the proxy's RSS when idle before the batch, its peak RSS during the batch
(``VmHWM``, reset with ``echo 5 > /proc/<pid>/clear_refs`` just before), the peak minus idle
per upload in flight, the spill files seen in the proxy's private ``TMPDIR`` during the batch
(most at once) and left there afterwards (must be 0).  The same batch without request buffering
(bodies streamed) is the comparison.  Each mode gets a fresh proxy process; modes alternate
when ``--reps`` > 1.

    python bench/buffering.py [--uploads 20] [--size-mib 50] [--reps 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import HOST, MIB, pb  # noqa: E402

MODES = {
    "buffered": ["--buffer-requests", "--buffer-memory", "1048576"],  # --buffer-memory may change
    "streaming": [],
}


def upload(port: int, body: bytes, results: list, i: int, timeout: float) -> None:
    t0 = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request(
                "POST",
                "/sink",
                body=body,
                headers={"Host": HOST, "Content-Type": "application/octet-stream"},
            )
            resp = conn.getresponse()
            resp.read()
            got = int(resp.getheader("X-Body-Bytes") or -1)
            results[i] = {"status": resp.status, "bytes": got, "s": time.monotonic() - t0}
        finally:
            conn.close()
    except Exception as e:  # noqa: BLE001 - recorded, reported as a failed upload
        results[i] = {"status": None, "error": repr(e), "s": time.monotonic() - t0}


class SpillWatcher(threading.Thread):
    """Polls the proxy's TMPDIR: the most files (and bytes) present at once."""

    def __init__(self, path: Path, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.max_files = 0
        self.max_bytes = 0
        self.names: set[str] = set()
        self.stopping = threading.Event()

    def snapshot(self) -> tuple[int, int]:
        files, total = 0, 0
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    files += 1
                    self.names.add(entry.name)
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
        return files, total

    def run(self) -> None:
        while not self.stopping.is_set():
            files, total = self.snapshot()
            self.max_files = max(self.max_files, files)
            self.max_bytes = max(self.max_bytes, total)
            self.stopping.wait(self.interval)


def run_batch(ctx, kamal, mode: str, body: bytes, uploads: int, timeout: float) -> dict:
    kamal.start(MODES[mode])
    try:
        roots = kamal.roots()
        # One small request first, so that idle RSS includes a warmed-up request path.
        upload(kamal.http_port, b"x" * 1024, [None], 0, 10)
        time.sleep(0.3)
        idle = pb.tree_memory_kb(roots)
        pb.reset_peak_rss(roots)
        watcher = SpillWatcher(kamal.tmpdir)
        watcher.start()
        results: list = [None] * uploads
        threads = [
            threading.Thread(target=upload, args=(kamal.http_port, body, results, i, timeout))
            for i in range(uploads)
        ]
        b_cpu = pb.tree_cpu_seconds(roots)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        wall = time.monotonic() - t0
        cpu = pb.tree_cpu_seconds(roots) - b_cpu
        mem = pb.tree_memory_kb(roots)
        # Spill files must go when their request ends; allow the reactor a moment.
        deadline = time.monotonic() + 3
        left = watcher.snapshot()[0]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = watcher.snapshot()[0]
        watcher.stopping.set()
        watcher.join()
        alive = kamal.proc.alive()
    finally:
        kamal.stop()
    ok = [r for r in results if r and r["status"] == 200 and r["bytes"] == len(body)]
    failed = [r for r in results if r not in ok]
    idle_mib, peak_mib = idle["rss_kb"] / 1024, mem["hwm_kb"] / 1024
    return {
        "mode": mode,
        "uploads": uploads,
        "ok": len(ok),
        "failed": failed[:5],
        "idle_rss_mib": idle_mib,
        "peak_rss_mib": peak_mib,
        "per_upload_mib": (peak_mib - idle_mib) / uploads,
        "wall_s": wall,
        "mib_s": len(ok) * len(body) / MIB / wall,
        "cpu_s": cpu,
        "spill_max_files": watcher.max_files,
        "spill_max_mib": watcher.max_bytes / MIB,
        "spill_names": sorted(watcher.names)[:3],
        "spill_left": left,
        "proxy_alive": alive,
    }


def render(records: list[dict], args) -> str:
    headers = ["mode", "uploads OK", "idle RSS MiB", "peak RSS MiB", "(peak−idle)/upload MiB",
               "spill files (most at once)", "spill MiB (most)", "spill files left", "MiB/s",
               "proxy CPU s"]  # fmt: skip
    rows = [
        [
            r["mode"],
            f"{r['ok']}/{r['uploads']}",
            f"{r['idle_rss_mib']:.1f}",
            f"{r['peak_rss_mib']:.1f}",
            f"{r['per_upload_mib']:.2f}",
            str(r["spill_max_files"]),
            f"{r['spill_max_mib']:,.0f}",
            str(r["spill_left"]),
            f"{r['mib_s']:,.0f}",
            f"{r['cpu_s']:.1f}",
        ]
        for r in records
    ]
    return (
        f"### buffering — {args.uploads} concurrent {args.size_mib} MiB POSTs, "
        f"--buffer-memory {args.buffer_memory}\n\n"
        + benchlib.table(headers, rows)
        + f"\n\nbuffered = `deploy ... {' '.join(MODES['buffered'])}`; streaming = no buffering "
        "flags. Peak RSS = VmHWM of the proxy process, reset just before the batch; idle = "
        "VmRSS after one small request. Spill files counted in the proxy's private TMPDIR "
        f"(polled every 20 ms); 'left' = after all responses (+ up to 3 s). "
        f"{benchlib.machine_note()}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=20, help="concurrent uploads")
    ap.add_argument("--size-mib", type=int, default=50, help="body size of each upload")
    ap.add_argument("--reps", type=int, default=1, help="batches per mode (alternating)")
    ap.add_argument("--modes", default="buffered,streaming")
    ap.add_argument(
        "--buffer-memory", type=int, default=1048576, help="deploy's --buffer-memory when buffered"
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="per upload, seconds")
    ap.add_argument("--kamal-cmd", default=benchlib.default_kamal(), help="kamal-proxy command")
    ap.add_argument("--out", default=str(benchlib.BENCH / "results-buffering.json"))
    ap.add_argument("--markdown", default=str(benchlib.BENCH / "results-buffering.md"))
    ap.add_argument("--workdir", help="scratch directory (kept); default: a temporary one")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    MODES["buffered"][-1] = str(args.buffer_memory)
    benchlib.install_signal_handlers()
    ctx = benchlib.make_ctx(Path(args.workdir) if args.workdir else None)
    if ctx.loadgen_cpus:
        os.sched_setaffinity(0, ctx.loadgen_cpus)  # the client threads share wrk's CPU
    records = []
    origin = None
    try:
        ctx.origin_port = pb.free_port()
        argv_origin = [sys.executable, str(benchlib.BENCH / "sink_origin.py"), str(ctx.origin_port)]
        origin = pb.Managed(
            "sink-origin", argv_origin, cpus=ctx.origin_cpus, log_path=ctx.run / "origin.log"
        )
        pb.wait_http_ready(ctx.origin_port, origin, 15)
        body = os.urandom(MIB) * args.size_mib
        kamal = benchlib.Kamal(ctx, "kamal", args.kamal_cmd)
        for rep in range(args.reps):
            for mode in modes if rep % 2 == 0 else list(reversed(modes)):
                rec = run_batch(ctx, kamal, mode, body, args.uploads, args.timeout)
                rec["rep"] = rep
                records.append(rec)
                pb.log(
                    f"round {rep + 1} {mode:<9} ok {rec['ok']}/{rec['uploads']}  "
                    f"peak {rec['peak_rss_mib']:.1f} MiB (idle {rec['idle_rss_mib']:.1f})  "
                    f"spill max {rec['spill_max_files']} files, left {rec['spill_left']}  "
                    f"{rec['mib_s']:.0f} MiB/s"
                )
                if rec["failed"]:
                    pb.log(f"  failures: {rec['failed']}")
    finally:
        if origin:
            origin.stop()
        pb.Managed.stop_all()
        if not args.workdir:
            shutil.rmtree(ctx.run, ignore_errors=True)
    text = render(records, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    bad = [r for r in records if r["ok"] != r["uploads"] or r["spill_left"] or not r["proxy_alive"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
