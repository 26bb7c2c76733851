"""Shared pieces of the extra benchmarks (tls.py, buffering.py, metrics.py).

They reuse the harness (``bench/proxybench.py``, carried in this repository) for what it does
well: the nginx origin, child processes stopped by PID, CPU time and peak RSS from ``/proc``,
CPU pinning.  This module imports it, and adds what the harness lacks: starting a kamal-proxy
with arbitrary ``deploy`` flags, and running wrk against any URL with any Lua script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HOST = "bench.test"
MIB = 1024 * 1024


def harness_path() -> Path:
    """``proxybench.py``: ``$PROXYBENCH`` when set (another copy), else the one in ``bench/``."""
    explicit = os.environ.get("PROXYBENCH")
    path = Path(explicit) if explicit else BENCH / "proxybench.py"
    if not path.exists():
        sys.exit(f"proxybench.py not found at {path}")
    return path


def load_harness() -> ModuleType:
    """Import proxybench.py as a module (it only runs its main under ``__main__``)."""
    path = harness_path()
    spec = importlib.util.spec_from_file_location("proxybench", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["proxybench"] = module
    spec.loader.exec_module(module)
    return module


pb = load_harness()


def default_kamal() -> str:
    """The kamal-proxy beside the Python that runs this script (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "kamal-proxy"
    if beside.exists():
        return str(beside)
    return shutil.which("kamal-proxy") or "kamal-proxy"


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        names = " ".join(missing)
        sys.exit(f"missing tools: {names} (on Debian: apt-get install {names})")


def make_ctx(workdir: Path | None, *, pin: bool = True, upload_mib: int = 10):
    """A proxybench context: scratch directory, CPU sets (wrk+origin first CPU, proxy second)."""
    args = argparse.Namespace(
        nginx=os.environ.get("PROXYBENCH_NGINX", "nginx"),
        wrk=os.environ.get("PROXYBENCH_WRK", "wrk"),
        upload_sizes=[upload_mib],
        pin=pin,
        loadgen_cpus=None,
        origin_cpus=None,
        proxy_cpus=None,
        proxy_stdout_null=False,
    )
    load, origin, proxy, _allowed = pb.pick_cpus(args)
    if workdir:
        run = workdir.resolve()
        run.mkdir(parents=True, exist_ok=True)
    else:
        run = Path(tempfile.mkdtemp(prefix="kamal-bench-"))
    os.chmod(run, 0o755)
    ctx = pb.Ctx(args=args, run=run, loadgen_cpus=load, origin_cpus=origin, proxy_cpus=proxy)
    if os.geteuid() == 0:
        import grp
        import pwd

        ctx.user_line = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};"
    return ctx


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP end the run like Ctrl-C, so every child is stopped by its PID."""

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    import atexit

    atexit.register(pb.Managed.stop_all)


class Kamal:
    """``kamal-proxy run`` in a private HOME/socket/TMPDIR, then one ``deploy``."""

    def __init__(self, ctx, name: str, cmd: str, *, cpus=None) -> None:
        self.ctx = ctx
        self.name = name
        self.cmd = shlex.split(cmd)
        self.cpus = cpus if cpus is not None else ctx.proxy_cpus
        self.proc = None
        self.http_port = 0
        self.https_port = 0
        self.dir: Path | None = None
        self.starts = 0

    @property
    def tmpdir(self) -> Path:
        assert self.dir is not None
        return self.dir / "tmp"

    def start(
        self, deploy_args: list[str], run_args: list[str] | None = None, wait: float = 30
    ) -> None:
        self.starts += 1
        self.dir = self.ctx.run / f"{self.name}-{self.starts}"
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(exist_ok=True)
        sock = self.dir / "kamal-proxy.sock"
        env = dict(
            os.environ,
            KAMAL_PROXY_SOCKET=str(sock),
            HOME=str(self.dir / "home"),
            TMPDIR=str(self.tmpdir),
        )
        for k in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
            env.pop(k, None)
        self.env = env
        self.http_port, self.https_port = pb.free_port(), pb.free_port()
        argv = self.cmd + ["run", "--http-port", str(self.http_port)]
        argv += ["--https-port", str(self.https_port), *(run_args or [])]
        log_path = self.ctx.run / f"{self.name}-{self.starts}.log"
        self.proc = pb.Managed(self.name, argv, cpus=self.cpus, log_path=log_path, env=env)
        deadline = time.monotonic() + wait
        while not sock.exists():
            if not self.proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.proc.log_tail()}")
            time.sleep(0.05)
        deploy = self.cmd + ["deploy", "bench", "--target", f"127.0.0.1:{self.ctx.origin_port}"]
        deploy += ["--host", HOST, *deploy_args]
        r = subprocess.run(
            deploy,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(120, 2 * wait),
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise RuntimeError(f"{self.name} deploy failed: {r.stdout}{r.stderr}")
        self.proc.remember_descendants()

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def trim_log(self, limit: int = 16 * MIB) -> None:
        """kamal-proxy logs one JSON line per request: keep the file bounded."""
        if self.proc and self.proc.log_path.exists() and self.proc.log_path.stat().st_size > limit:
            os.truncate(self.proc.log_path, 0)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None


def wrk_script(ctx, name: str, *, resolve_to: str | None = None, extra: str = "") -> Path:
    """proxybench's JSON report hook, plus optional Lua.

    ``resolve_to`` replaces wrk's name lookup of the URL's host by that address: wrk takes
    the TLS SNI name (and the Host header) from the URL, so ``https://bench.test:PORT/`` then
    sends SNI ``bench.test`` to 127.0.0.1 without touching /etc/hosts.
    """
    text = (pb.LUA_DIR / "report.lua").read_text()
    if resolve_to:
        text += (
            "\n-- connect to a fixed address whatever the URL's host is (SNI stays the URL's)\n"
            "function wrk.resolve(host, service)\n"
            f'   wrk.addrs = wrk.lookup("{resolve_to}", service)\n'
            "end\n"
        )
    text += extra
    path = ctx.run / f"wrk-{name}.lua"
    path.write_text(text)
    return path


def run_wrk(
    ctx,
    url: str,
    script: Path,
    *,
    connections: int,
    duration: float,
    headers: list[str] = (),
    timeout_s: int = 10,
) -> dict:
    """One wrk run on the load CPU; its JSON report (raises on failure)."""
    argv = [ctx.args.wrk, "-t", "1", "-c", str(connections), "-d", f"{max(1, round(duration))}s"]
    argv += ["--timeout", f"{timeout_s}s"]
    for h in headers:
        argv += ["-H", h]
    argv += ["-s", str(script), url]
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        preexec_fn=pb._affinity_fn(ctx.loadgen_cpus),
        stdin=subprocess.DEVNULL,
    )
    for line in r.stdout.splitlines():
        if line.startswith("PROXYBENCH_JSON "):
            return json.loads(line[len("PROXYBENCH_JSON ") :])
    raise RuntimeError(f"wrk failed (rc={r.returncode}): {r.stdout[-1000:]} {r.stderr[-1000:]}")


def wrk_errors(res: dict) -> int:
    """Socket errors + 4xx/5xx responses."""
    return sum(res["errors"].values()) + res.get("bad_responses", 0)


def machine_note() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} vCPU ({model}), kernel {os.uname().release}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    return pb._table(headers, rows)
