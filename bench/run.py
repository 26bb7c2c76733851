"""``make bench``: this proxy beside ``direct`` and ``nginx``, and issue 8's bars.

Runs the harness (``bench/proxybench.py``) on ``small-keepalive``, ``small-newconn``,
``big-download``, ``upload`` and ``latency-light`` with ``direct``, ``nginx`` and ``kamal``
(the kamal-proxy beside the Python that runs this script), interleaved, then measures what the
harness does not: the idle RSS of a started proxy with one deployed service, and how a request
of 150,000 short header lines is answered (status, time, RSS before and after).

Figures are ratios measured in one run (shared machines are noisy): kamal ÷ nginx per round,
paired, median and spread over the rounds.  Each run is written to
``bench/results/<UTC time>-<commit>.json`` (and ``.md``) with the machine (CPU model,
kernel), the interpreter (path and version) and the commit (with ``+dirty`` when the tree had
changes), so that a figure quoted in a note can be checked.

    python bench/run.py                       # 3 rounds of 5 s per workload and proxy
    python bench/run.py --reps 2 --duration 5 # extra arguments go to proxybench
    python bench/run.py --bars-only FILE.json # the bars of a saved run

It needs Debian's ``wrk`` and ``nginx`` (installed with apt-get when missing and possible).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
WORKLOADS = "small-keepalive,small-newconn,big-download,upload,latency-light"
DEFAULTS = ["--reps", "3", "--duration", "5"]
HEADER_FLOOD_LINES = 150_000
CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


def paired(runs: list[dict], workload: str, key: str) -> list[float]:
    """kamal ÷ nginx per round (same round, adjacent in time)."""
    by = {(r["proxy"], r["rep"]): r.get(key) for r in runs if r["workload"] == workload}
    return [
        by[("kamal", rep)] / by[("nginx", rep)]
        for (name, rep) in by
        if name == "kamal" and by.get(("nginx", rep)) and by[("kamal", rep)] is not None
    ]


def kamal_values(runs: list[dict], workload: str, key: str) -> list[float]:
    return [
        r[key]
        for r in runs
        if r["proxy"] == "kamal" and r["workload"] == workload and r.get(key) is not None
    ]


def bars(data: dict) -> str:
    """Issue 8's bars as a Markdown table: median (min–max) over rounds, and the verdict."""
    runs = [r for r in data["runs"] if r.get("ok")]
    extra = data.get("kamal_extra", {})
    flood = extra.get("header_flood") or {}
    checks = [
        ("small-keepalive CPU/request ×nginx", paired(runs, "small-keepalive", "cpu_ms_per_1k"),
         "≤ 6", "median", lambda v: v <= 6),
        ("small-newconn CPU/request ×nginx", paired(runs, "small-newconn", "cpu_ms_per_1k"),
         "≤ 4.5", "median", lambda v: v <= 4.5),
        ("big-download MiB/s ×nginx", paired(runs, "big-download", "mibps"),
         "≥ 0.6", "median", lambda v: v >= 0.6),
        ("big-download CPU/GiB ×nginx", paired(runs, "big-download", "cpu_ms_per_gib"),
         "≤ 2", "median", lambda v: v <= 2),
        ("upload MiB/s ×nginx", paired(runs, "upload", "mibps"),
         "≥ 1.0", "median", lambda v: v >= 1.0),
        ("upload CPU/GiB ×nginx", paired(runs, "upload", "cpu_ms_per_gib"),
         "≤ 1.2", "median", lambda v: v <= 1.2),
        ("idle RSS MiB", [extra["idle_rss_mib"]] if extra.get("idle_rss_mib") else [],
         "≤ 35", "max", lambda v: v <= 35),
        ("upload peak RSS MiB", kamal_values(runs, "upload", "peak_rss_mib"),
         "≤ 40", "max", lambda v: v <= 40),
        ("latency-light p50 µs", kamal_values(runs, "latency-light", "p50_us"),
         "≤ 350", "median", lambda v: v <= 350),
        ("150,000 header lines: ms to 431, median",
         [flood["ms"]] if flood.get("status") == 431 else [],
         "< 5", "max", lambda v: v < 5),
        ("150,000 header lines: RSS growth MiB", [flood["rss_growth_mib"]] if flood else [],
         "≈ 0", "max", lambda v: v < 1),
    ]  # fmt: skip
    lines = ["| figure | median (min–max) | bar | met |", "|---|---|---|---|"]
    for name, values, bar, how, ok in checks:
        if not values:
            lines.append(f"| {name} | — | {bar} | not measured |")
            continue
        value = max(values) if how == "max" else statistics.median(values)
        spread = f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"
        lines.append(f"| {name} | {spread} | {bar} | {'yes' if ok(value) else 'NO'} |")
    return "\n".join(lines) + "\n"


# -- what proxybench does not measure -----------------------------------------------------------


HEADER_FLOOD_REQUESTS = 5


def header_flood(port: int, pid: int) -> dict:
    """Requests of 150,000 short header lines (750 KB, under the 1 MiB limit), one after
    another on new connections: their statuses, the milliseconds from the first byte sent to
    the answer (each, and their median: one sample on a shared machine is mostly noise), and
    the proxy's RSS growth over all of them."""
    import benchlib

    head = b"GET / HTTP/1.1\r\nHost: " + benchlib.HOST.encode() + b"\r\n"
    data = head + b"a: b\r\n" * HEADER_FLOOD_LINES + b"\r\n"
    before = benchlib.pb._status_kb(pid, "VmRSS")
    statuses, times = [], []
    for _ in range(HEADER_FLOOD_REQUESTS):
        status, ms = _one_flood(port, data)
        statuses.append(status)
        times.append(ms)
    after = benchlib.pb._status_kb(pid, "VmRSS")
    return {
        "status": statuses[0] if len(set(statuses)) == 1 else 0,
        "statuses": statuses,
        "ms": round(statistics.median(times), 3),
        "ms_each": times,
        "rss_before_mib": round(before / 1024, 2),
        "rss_after_mib": round(after / 1024, 2),
        "rss_growth_mib": round(max(0, after - before) / 1024, 2),
    }


def _one_flood(port: int, data: bytes) -> tuple[int, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

        def send() -> None:
            try:
                sock.sendall(data)
            except OSError:
                pass  # the proxy answered and closed before the end: expected

        sender = threading.Thread(target=send, daemon=True)
        started = time.perf_counter()
        sender.start()
        answer = sock.recv(4096)
        elapsed = time.perf_counter() - started
        sender.join(10)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0
    return status, round(elapsed * 1000, 3)


def kamal_extra(kamal_cmd: str) -> dict:
    """Idle RSS (started, one service deployed, 2 s later) and the header flood."""
    import benchlib

    ctx = benchlib.make_ctx(Path(tempfile.mkdtemp(prefix="kamal-bench-extra-")))
    origin = benchlib.pb.Origin(ctx)
    kamal = benchlib.Kamal(ctx, "kamal-extra", kamal_cmd)
    try:
        origin.start()
        kamal.start([])
        time.sleep(2)
        idle = benchlib.pb._status_kb(kamal.proc.pid, "VmRSS") / 1024
        flood = header_flood(kamal.http_port, kamal.proc.pid)
        return {"idle_rss_mib": round(idle, 2), "header_flood": flood}
    finally:
        kamal.stop()
        origin.stop()
        shutil.rmtree(ctx.run, ignore_errors=True)


def fingerprint() -> dict:
    """How fast this CPU runs what the proxy spends its time on, in ns (best of five): a
    pure-Python loop of dict lookups and attribute reads, a system call, a clock read, and a
    loopback TCP round trip (two sends, two receives).  CPU per request differs between
    machines (and between rounds on a shared one) with these, not with the proxy's code:
    compare them when two runs disagree (``make bench`` takes them on the proxy's CPU, before
    and after the run)."""
    import timeit

    table = {i: i for i in range(16)}

    class Thing:
        __slots__ = ("a",)

        def __init__(self) -> None:
            self.a = 1

    thing = Thing()

    def python_loop() -> None:
        get = table.get
        for i in range(1000):
            get(i & 15)
            thing.a += 1

    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * 100

    def round_trip() -> None:
        a.sendall(payload)
        b.recv(4096)
        b.sendall(payload)
        a.recv(4096)

    def best(fn, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9

    try:
        return {
            "python_loop_ns_per_op": round(best(python_loop, 200) / 1000, 2),
            "syscall_ns": round(best(os.getppid, 50_000), 1),
            "clock_read_ns": round(best(time.time_ns, 200_000), 1),
            "tcp_round_trip_ns": round(best(round_trip, 5_000), 0),
        }
    finally:
        a.close()
        b.close()


def fingerprint_on(cpus: set[int] | None) -> dict:
    """:func:`fingerprint` in a child process pinned to ``cpus`` (the proxy's)."""
    import benchlib

    r = subprocess.run(
        [sys.executable, __file__, "--fingerprint"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=benchlib.pb._affinity_fn(cpus),
    )
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": r.stderr[-500:]}


def provenance(kamal_cmd: str) -> dict:
    """The commit, the interpreter and the machine of this run."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "commit": commit,
        "interpreter": {
            "path": sys.executable,
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
        },
        "kamal_cmd": kamal_cmd,
        "machine": {
            "cpu_model": cpu_model,
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "clocksource": _read(CLOCKSOURCE),
            # SMT siblings of each CPU: two vCPUs on one core slow each other down.
            "thread_siblings": {
                str(cpu): _read(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
                for cpu in sorted(os.sched_getaffinity(0))
            },
            "vulnerabilities": {
                name: _read(f"/sys/devices/system/cpu/vulnerabilities/{name}")
                for name in ("spectre_v2", "spec_rstack_overflow", "retbleed")
            },
        },
    }


def scrub(text: str) -> str:
    """``text`` without this machine's directories: the virtualenv, the checkout, HOME."""
    for directory, name in (
        (sys.prefix, "<venv>"),
        (str(ROOT), "<checkout>"),
        (os.path.expanduser("~"), "~"),
    ):
        if directory and directory != "/":
            text = text.replace(directory, name)
    return text


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def main(argv: list[str]) -> int:
    argv = [a for a in argv if a != "--bars"]  # the bars are always printed now
    if argv[:1] == ["--fingerprint"]:
        print(json.dumps(fingerprint()))
        return 0
    if argv[:1] == ["--bars-only"]:
        path = Path(argv[1]) if len(argv) > 1 else max(RESULTS.glob("*.json"))
        print(bars(json.loads(path.read_text())))
        return 0
    missing = [tool for tool in ("wrk", "nginx") if not shutil.which(tool)]
    if missing and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False)
    sys.path.insert(0, str(BENCH))
    import benchlib
    from benchlib import harness_path

    kamal = str(Path(sys.executable).parent / "kamal-proxy")
    info = provenance(kamal)
    proxy_cpus = benchlib.make_ctx(Path(tempfile.mkdtemp(prefix="kamal-bench-"))).proxy_cpus
    info["fingerprint_before"] = fingerprint_on(proxy_cpus)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"{stamp}-{info['commit'][:12]}"
    out, markdown = base.with_suffix(".json"), base.with_suffix(".md")
    cmd = [sys.executable, str(harness_path()), "--proxies", "direct,nginx,kamal"]
    cmd += ["--kamal-cmd", kamal, "--workloads", WORKLOADS, "--out", str(out)]
    cmd += ["--markdown", str(markdown), *(argv or DEFAULTS)]
    rc = subprocess.call(cmd)
    if not out.exists():
        return rc or 1
    data = json.loads(out.read_text())
    info["fingerprint_after"] = fingerprint_on(proxy_cpus)
    data["provenance"] = info
    try:
        data["kamal_extra"] = kamal_extra(kamal)
    except Exception as e:  # noqa: BLE001 - the main figures are still worth keeping
        data["kamal_extra"] = {"error": str(e)}
    out.write_text(json.dumps(data, indent=1) + "\n")
    table = bars(data)
    fp = info["fingerprint_before"]
    note = (
        f"\n## Issue 8 bars\n\ncommit {info['commit']}, {info['interpreter']['path']} "
        f"(Python {info['interpreter']['version']}), {info['machine']['cpu_model']}, "
        f"kernel {info['machine']['kernel']}; on the proxy's CPU: "
        f"{fp.get('python_loop_ns_per_op')} ns per Python op, {fp.get('syscall_ns')} ns per "
        f"system call, {fp.get('tcp_round_trip_ns')} ns per loopback round trip\n\n{table}"
    )
    markdown.write_text(markdown.read_text() + note)
    for path in (out, markdown):  # committed files name no directory of this machine
        path.write_text(scrub(path.read_text()))
    print(note)
    print(f"results: {out.relative_to(ROOT)} and {markdown.name}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
