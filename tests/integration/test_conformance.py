"""Black-box conformance sweep: SPEC details not asserted elsewhere in the suite.

Everything runs against the real ``kamal-proxy`` executable (CLI processes, ``run`` processes)
with real upstreams over loopback.  Each test names the SPEC section or §20 scenario it pins.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time

from twisted.trial import unittest

from tests.integration.pebble import cert_pem, key_pem, make_ca, make_leaf
from tests.integration.support import (
    IT_WORKERS,
    PROCESS_TIMEOUT,
    IntegrationTestCase,
    eventually,
    free_port,
    port_open,
    proxy_command,
    raw_body,
    raw_exchange,
    raw_status,
    run_cli,
    shared_upstream,
)


def _base_env(home: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KAMAL_PROXY_")
        and k not in ("HTTP_PORT", "HTTPS_PORT", "METRICS_PORT", "DEBUG", "XDG_RUNTIME_DIR")
    }
    env["HOME"] = home
    env["KAMAL_PROXY_WORKERS"] = str(IT_WORKERS)  # the pass's worker count (support.py)
    env.update(extra)
    return env


# -- a raw upstream for framing details the stdlib server cannot produce ---------------------


class _RawHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        sock.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        head = data.split(b"\r\n\r\n", 1)[0]
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target = line.split(" ")[:2]
        server: _RawServer = self.server  # type: ignore[assignment]
        if target != "/up":
            with server.lock:
                server.heads.append(head)
        if target == "/up":
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        elif target == "/early":
            answer = (
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
                b"Connection: close\r\n\r\nbody"
            )
        elif target == "/trailers":
            answer = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                b"Trailer: X-Checksum\r\nConnection: close\r\n\r\n"
                b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\n\r\n"
            )
        elif target == "/hop":
            answer = (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close, X-Hop\r\n"
                b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
                b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Keep: kept\r\n\r\nhop"
            )
        else:
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nraw"
        try:
            sock.sendall(answer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _RawServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RawHandler)
        self.lock = threading.Lock()
        self.heads: list[bytes] = []
        threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _head_headers(raw: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            out.setdefault(k.decode("latin-1").strip().lower(), []).append(
                v.decode("latin-1").strip()
            )
    return out


# -- CLI (§3) ---------------------------------------------------------------------------------


class CliConformanceTests(unittest.TestCase):
    """The CLI alone: every case fails or succeeds before (or at) connecting."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="kp-conf-cli-")
        self.home = os.path.join(self.root, "home")
        os.makedirs(self.home)
        self.sock = os.path.join(self.root, "none.sock")

    def cli(self, *args: str, **env: str):
        env = {"KAMAL_PROXY_SOCKET": self.sock, **env}
        return run_cli(
            *args,
            env=_base_env(self.home, **env),
            cwd=self.root,
        )

    def assertError(self, result, message: str) -> None:
        self.assertEqual(result.code, 1, result)
        self.assertEqual(result.err, f"Error: {message}\n", result)
        self.assertEqual(result.out, "")

    def assertDialError(self, result, path: str | None = None) -> None:
        self.assertError(
            result, f"dial unix {path or self.sock}: connect: no such file or directory"
        )

    def test_unknown_command_suggestion_block(self):
        """§3.1: near-miss → `Did you mean this?` block, then the `Run ...` line; exit 1."""
        result = self.cli("deplyo")
        self.assertEqual(result.code, 1)
        self.assertEqual(result.out, "")
        self.assertEqual(
            result.err,
            'Error: unknown command "deplyo" for "kamal-proxy"\n\nDid you mean this?\n'
            "\tdeploy\n\nRun 'kamal-proxy --help' for usage.\n",
        )
        result = self.cli("frobnicate")
        self.assertEqual(
            (result.code, result.err),
            (
                1,
                'Error: unknown command "frobnicate" for "kamal-proxy"\n'
                "Run 'kamal-proxy --help' for usage.\n",
            ),
        )

    def test_only_the_error_line_is_printed(self):
        """§3.1: on a flag error only `Error: …` is printed (usage suppressed)."""
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--bogus"), "unknown flag: --bogus"
        )
        self.assertError(self.cli("deploy", "svc", "--target"), "flag needs an argument: --target")
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--deploy-timeout", "5"),
            'invalid argument "5" for "--deploy-timeout" flag: time: missing unit in duration "5"',
        )
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--health-check-port", "abc"),
            'invalid argument "abc" for "--health-check-port" flag: '
            'strconv.ParseInt: parsing "abc": invalid syntax',
        )

    def test_double_dash_ends_flags(self):
        """§3.1: after `--` a flag-looking word is a positional argument."""
        self.assertDialError(self.cli("remove", "--", "--target"))
        self.assertError(self.cli("remove", "--", "a", "--b"), "accepts 1 arg(s), received 2")

    def test_flags_before_positional_and_base_prefixed_ints(self):
        """§3.1/§3.2: flags may precede the service; ints accept 0x/0o/0b/_ forms."""
        self.assertDialError(self.cli("pause", "--drain-timeout", "1s", "--max-pause=2s", "svc"))
        self.assertDialError(
            self.cli(
                "deploy",
                "--target",
                "a:1",
                "--buffer-requests",
                "--buffer-memory",
                "0x10",
                "--max-request-body=1_000",
                "--health-check-port",
                "0o17",
                "svc",
            )
        )

    def test_bool_with_space_value_is_positional(self):
        """§3.2: `--force false` makes `false` a second positional argument."""
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--force", "false"),
            "accepts 1 arg(s), received 2",
        )

    def test_validation_order(self):
        """§3.3: flags, then arg count, then pre-validation, then required flags, groups."""
        self.assertError(self.cli("deploy", "a", "b", "--bogus"), "unknown flag: --bogus")
        self.assertError(self.cli("deploy", "a", "b"), "accepts 1 arg(s), received 2")
        self.assertError(
            self.cli("deploy", "svc", "--max-request-body", "10"),
            "max-request-body can only be set when request buffering is enabled",
        )
        # Service-option pre-validation runs before the required-flag check.
        self.assertError(
            self.cli("deploy", "svc", "--tls"),
            "service options invalid: host must be set when using TLS",
        )
        self.assertError(self.cli("deploy", "svc"), 'required flag(s) "target" not set')
        self.assertError(
            self.cli("rollout", "set", "svc"),
            "at least one of the flags in the group [percent list] is required",
        )
        self.assertError(self.cli("rollout", "set"), "accepts 1 arg(s), received 0")
        # `--buffer-requests=false` counts as given (§21.1 #12).
        self.assertDialError(
            self.cli(
                "deploy",
                "svc",
                "--target",
                "a:1",
                "--buffer-requests=false",
                "--max-request-body=40000000",
            )
        )

    def test_help_forms(self):
        """§3.1: `-h`, `help <cmd>`, `rollout` alone, `help <unknown>`."""
        for args in (("deploy", "-h"), ("help", "deploy"), ("deploy", "--help")):
            result = self.cli(*args)
            self.assertEqual(result.code, 0, args)
            for text in ("--target", "--deploy-timeout", "30s", "/up", "1048576"):
                self.assertIn(text, result.out, (args, text))
        result = self.cli("rollout")
        self.assertEqual(result.code, 0)
        for name in ("deploy", "set", "stop"):
            self.assertTrue(
                any(line.startswith(f"  {name} ") for line in result.out.splitlines()), name
            )
        result = self.cli()
        self.assertEqual(result.code, 0)
        self.assertIn("HTTP proxy for zero downtime deployments", result.out)
        for name in ("deploy", "list", "pause", "remove", "resume", "rollout", "run", "stop"):
            self.assertTrue(
                any(line.startswith(f"  {name} ") for line in result.out.splitlines()), name
            )
        self.assertFalse(any(line.startswith("  completion ") for line in result.out.splitlines()))
        result = self.cli("help", "nosuch")
        self.assertEqual(result.code, 0)
        self.assertIn("Unknown help topic", result.out + result.err)

    def test_list_extra_argument(self):
        """§3.1: `list` takes no positional arguments."""
        self.assertError(
            self.cli("list", "extra"), 'unknown command "extra" for "kamal-proxy list"'
        )
        self.assertError(self.cli("ls", "extra"), 'unknown command "extra" for "kamal-proxy list"')

    def test_socket_path_rules(self):
        """§2.2: KAMAL_PROXY_SOCKET, else $XDG_RUNTIME_DIR, else TMPDIR."""
        xdg = os.path.join(self.root, "xdg")
        tmp = os.path.join(self.root, "tmp")
        os.makedirs(xdg)
        os.makedirs(tmp)
        self.assertDialError(
            self.cli("list", KAMAL_PROXY_SOCKET="", XDG_RUNTIME_DIR=xdg, TMPDIR=tmp),
            os.path.join(xdg, "kamal-proxy.sock"),
        )
        self.assertDialError(
            self.cli("list", KAMAL_PROXY_SOCKET="", XDG_RUNTIME_DIR="", TMPDIR=tmp),
            os.path.join(tmp, "kamal-proxy.sock"),
        )

    def test_every_command_creates_the_data_dir_0700(self):
        """§2.4: the data dir (with parents) is created mode 0700 by any CLI invocation."""
        self.assertDialError(self.cli("list"))
        data = os.path.join(self.home, ".config", "kamal-proxy")
        self.assertTrue(os.path.isdir(data))
        self.assertEqual(os.stat(data).st_mode & 0o777, 0o700)

    def test_run_socket_directory_missing(self):
        """§2.2: `run` with an unusable socket path fails with the listen error, exit 1."""
        path = os.path.join(self.root, "missing", "kp.sock")
        result = run_cli(
            "run",
            "--http-port",
            str(free_port()),
            "--https-port",
            str(free_port()),
            env=_base_env(self.home, KAMAL_PROXY_SOCKET=path),
            cwd=self.root,
        )
        self.assertEqual(result.code, 1, result)
        self.assertIn(
            f"Error: listen unix {path}: bind: no such file or directory", result.err, result
        )


class RunEnvironmentTests(unittest.TestCase):
    """§3.4 environment rules, observed through the `Server started` log line."""

    def start(self, *args: str, **env: str) -> tuple[subprocess.Popen, list[dict]]:
        root = tempfile.mkdtemp(prefix="kp-conf-env-")
        home = os.path.join(root, "home")
        os.makedirs(home)
        full_env = _base_env(home, KAMAL_PROXY_SOCKET=os.path.join(root, "kp.sock"), **env)
        full_env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            proxy_command() + ["run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=root,
        )
        records: list[dict] = []

        def stop() -> None:
            if proc.poll() is None:
                os.kill(proc.pid, 15)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, 9)
                    proc.wait(5)
            proc.stdout.close()
            proc.stderr.close()

        self.addCleanup(stop)
        lines: queue.Queue[bytes] = queue.Queue()

        def read() -> None:
            try:
                for line in iter(proc.stdout.readline, b""):
                    lines.put(line)
            except (OSError, ValueError):
                pass
            lines.put(b"")

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                break
            if not line:
                break
            record = json.loads(line)
            records.append(record)
            if record.get("msg") == "Server started":
                return proc, records
        proc.kill()  # so that reading its stderr ends
        proc.wait(10)
        raise AssertionError(
            f"no Server started within {PROCESS_TIMEOUT}s: {records} {proc.stderr.read()!r}"
        )

    def test_empty_prefixed_variable_hides_plain_one(self):
        """`KAMAL_PROXY_HTTP_PORT=""` + `HTTP_PORT=P` → the built-in 80 (§3.4 example)."""
        if port_open(80):
            raise unittest.SkipTest("port 80 is busy on this machine")
        p, q = free_port(), free_port()
        try:
            _, records = self.start(
                "--https-port",
                str(q),
                KAMAL_PROXY_HTTP_PORT="",
                HTTP_PORT=str(p),
                KAMAL_PROXY_DEBUG="",
                DEBUG="true",
                METRICS_PORT="0x10",
            )
        except AssertionError as e:
            # Another suite on this machine (the same test) can take port 80 after the check.
            if "listen tcp :80: bind: address already in use" in str(e):
                raise unittest.SkipTest("port 80 was taken meanwhile") from None
            raise
        started = records[-1]
        self.assertEqual((started["http"], started["https"]), (80, q))
        self.assertFalse(port_open(p))
        # `KAMAL_PROXY_DEBUG=""` hides `DEBUG=true` → INFO level; `0x10` is not Atoi → 0.
        self.assertFalse([r for r in records if r["level"] == "DEBUG"], records)
        self.assertFalse([r for r in records if r["msg"] == "Metrics enabled"], records)

    def test_signed_decimal_and_extra_positional(self):
        """Atoi accepts `+P`; `run` ignores extra positional arguments (§3.1)."""
        p, q = free_port(), free_port()
        _, records = self.start("extra", "args", HTTP_PORT=f"+{p}", HTTPS_PORT=str(q))
        self.assertEqual((records[-1]["http"], records[-1]["https"]), (p, q))
        self.assertTrue(port_open(p))


# -- one shared proxy for request-level details ------------------------------------------------


class RequestConformanceTests(IntegrationTestCase):
    shared = True
    metrics = True

    def setUp(self):
        super().setUp()
        self.app = shared_upstream("conf-app")

    def deploy_host(self, service: str, host: str, *args: str, target: str | None = None):
        self.deploy(service, target or self.app.addr, "--host", host, *args)

    def req(self, host: str, method: str = "GET", path: str = "/", **kw):
        return self.proxy.request(method, path, host=host, **kw)

    # §7 redirects

    def test_canonical_redirect_shapes(self):
        """§7, scenarios 12/162: exact body for GET, headers for HEAD, empty POST, port dropped."""
        self.deploy_host("canon", "example.com,www.example.com", "--canonical-host", "example.com")
        resp = self.req("www.example.com", path="/a/b?c=d&e=<f>")
        self.assertEqual(resp.status, 301)
        location = "http://example.com/a/b?c=d&e=<f>"
        self.assertEqual(resp.header("Location"), location)
        self.assertEqual(resp.header("Connection"), "close")
        self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
        self.assertEqual(
            resp.text,
            '<a href="http://example.com/a/b?c=d&amp;e=&lt;f&gt;">Moved Permanently</a>.\n\n',
        )
        resp = self.req("www.example.com", "HEAD", "/x")
        self.assertEqual((resp.status, resp.body), (301, b""))
        self.assertEqual(resp.header("Location"), "http://example.com/x")
        self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
        resp = self.req("www.example.com", "POST", "/form", body=b"data")
        self.assertEqual((resp.status, resp.body), (301, b""))
        self.assertEqual(resp.header("Location"), "http://example.com/form")
        self.assertNotEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
        resp = self.req(f"www.example.com:{self.proxy.http_port}", path="/x")
        self.assertEqual(resp.header("Location"), "http://example.com/x")
        self.assertEqual(self.req(f"example.com:{self.proxy.http_port}").text, "conf-app")

    def test_canonical_host_without_hosts(self):
        """§3.6.4/§7: a canonical host with no hosts redirects every Host to it."""
        self.deploy(
            "canonall",
            self.app.addr,
            "--path-prefix",
            "/canonall",
            "--canonical-host",
            "canonical.example.com",
        )
        resp = self.req("anything.example.org", path="/canonall/x?y=1")
        self.assertEqual(resp.status, 301)
        self.assertEqual(resp.header("Location"), "http://canonical.example.com/canonall/x?y=1")
        self.assertEqual(self.req("canonical.example.com", path="/canonall").status, 200)

    def test_tls_redirect_body_and_combined_hop(self):
        """§7, scenarios 11/13/163: TLS + canonical in one 301 hop; POST body empty."""
        self.deploy_host(
            "tlsredir",
            "tr.example.com,www.tr.example.com",
            "--tls",
            "--canonical-host",
            "tr.example.com",
        )
        resp = self.req("www.tr.example.com", path="/p?q=1")
        self.assertEqual(
            (resp.status, resp.header("Location")), (301, "https://tr.example.com/p?q=1")
        )
        self.assertEqual(
            resp.text, '<a href="https://tr.example.com/p?q=1">Moved Permanently</a>.\n\n'
        )
        resp = self.req(f"tr.example.com:{self.proxy.http_port}", "POST", "/", body=b"Something")
        self.assertEqual((resp.status, resp.body), (301, b""))
        self.assertEqual(resp.header("Location"), "https://tr.example.com/")
        self.assertEqual(resp.header("Connection"), "close")

    def test_scenario_11_sequence(self):
        """Scenario 11: 413 with buffering, 200 without, 301 with TLS, 301 on a new host."""
        body = b"Something longer than 10"
        self.deploy_host(
            "s11", "dummy.example.com", "--buffer-requests", "--max-request-body", "10"
        )
        self.assertEqual(self.req("dummy.example.com", "POST", body=body).status, 413)
        self.deploy_host("s11", "dummy.example.com")
        resp = self.req("dummy.example.com", "POST", body=body)
        self.assertEqual((resp.status, resp.text), (200, "conf-app"))
        self.deploy_host("s11", "dummy.example.com", "--tls")
        resp = self.req("dummy.example.com", "POST", body=body)
        self.assertEqual((resp.status, resp.body), (301, b""))
        self.deploy_host("s11", "other.example.com", "--tls")
        resp = self.req("other.example.com", "POST", body=body)
        self.assertEqual((resp.status, resp.body), (301, b""))

    # §9 forwarding details

    def test_request_hop_by_hop_removals_and_te_trailers(self):
        """§9.2: Te/Trailer/Upgrade/Proxy-Connection dropped; `Te: trailers` kept."""
        self.deploy_host("hop", "hop.example.com")
        resp = self.req(
            "hop.example.com",
            path="/echo",
            headers={
                "Proxy-Connection": "keep-alive",
                "Te": "gzip",
                "Trailer": "X-T",
                "Upgrade": "h2c",
                "Proxy-Authenticate": "Basic",
                "X-Pass": "1",
            },
        )
        for name in ("Proxy-Connection", "Te", "Trailer", "Upgrade", "Proxy-Authenticate"):
            self.assertIsNone(resp.echo_header(name), name)
        self.assertEqual(resp.echo_header("X-Pass"), "1")
        resp = self.req("hop.example.com", path="/echo", headers={"Te": "trailers, deflate"})
        self.assertEqual(resp.echo_header_all("Te"), ["trailers"])

    def test_zero_content_length_not_chunked(self):
        """§9.1: `Content-Length: 0` → no body, and no chunked framing upstream."""
        self.deploy_host("zero", "zero.example.com")
        info = self.req("zero.example.com", "POST", "/upload", body=b"").json()
        self.assertEqual(info["length"], 0)
        self.assertIsNone(info["transfer_encoding"])
        self.assertIn(info["content_length"], (None, "0"))

    def test_http10_without_host_uses_target_address(self):
        """§9.1/§21.1 #39: empty host → `Host: <target>` upstream, empty X-Forwarded-Host."""
        self.deploy("h10", self.app.addr, "--path-prefix", "/h10")
        raw = raw_exchange(self.proxy.http_port, b"GET /h10/echo HTTP/1.0\r\n\r\n")
        self.assertEqual(raw_status(raw), 200, raw[:300])
        info = json.loads(raw_body(raw))
        headers = {k.lower(): v for k, v in info["headers"]}
        self.assertEqual(headers.get("host"), self.app.addr)
        self.assertEqual(headers.get("x-forwarded-host", ""), "")
        log = self.proxy.wait_for_log("Request", path="/h10/echo")
        self.assertEqual((log["proto"], log["host"], log["service"]), ("HTTP/1.0", "", "h10"))

    def test_raw_upstream_framing(self):
        """§9.4: 103 relayed, trailers dropped, response hop-by-hop headers removed."""
        raw_up = _RawServer()
        self.addCleanup(raw_up.stop)
        self.deploy_host("rawup", "raw.example.com", target=raw_up.addr)
        req = b"GET %s HTTP/1.1\r\nHost: raw.example.com\r\nConnection: close\r\n\r\n"
        # 1xx informational responses are relayed before the final response.
        raw = raw_exchange(self.proxy.http_port, req % b"/early")
        self.assertTrue(raw.startswith(b"HTTP/1.1 103 "), raw[:300])
        first, _, rest = raw.partition(b"\r\n\r\n")
        self.assertIn(b"Link: </style.css>; rel=preload", first)
        self.assertEqual(raw_status(rest), 200, raw)
        self.assertEqual(raw_body(rest), b"body")
        # Trailers are not relayed; the body is intact.
        raw = raw_exchange(self.proxy.http_port, req % b"/trailers")
        self.assertEqual((raw_status(raw), raw_body(raw)), (200, b"hello"), raw)
        self.assertNotIn(b"abc123", raw)
        # Hop-by-hop response headers (and those named in Connection) are removed.
        raw = raw_exchange(self.proxy.http_port, req % b"/hop")
        headers = _head_headers(raw)
        self.assertEqual((raw_status(raw), raw_body(raw)), (200, b"hop"), raw)
        for name in ("x-hop", "keep-alive", "proxy-authenticate", "proxy-connection", "upgrade"):
            self.assertNotIn(name, headers, raw)
        self.assertEqual(headers.get("x-keep"), ["kept"])

    def test_trailer_announcement_relayed(self):
        """§9.4: the `Trailer` announcement header is relayed (trailers themselves are not)."""
        raw_up = _RawServer()
        self.addCleanup(raw_up.stop)
        self.deploy_host("rawtr", "rawtr.example.com", target=raw_up.addr)
        raw = raw_exchange(
            self.proxy.http_port,
            b"GET /trailers HTTP/1.1\r\nHost: rawtr.example.com\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(_head_headers(raw).get("trailer"), ["X-Checksum"], raw)

    def test_target_timeout_only_until_headers(self):
        """§9.5: the timeout covers neither the body stream nor the request upload."""
        self.deploy_host("tt", "tt.example.com", "--target-timeout", "500ms")
        resp = self.req("tt.example.com", path="/stream?chunks=2&ms=1200")
        self.assertEqual((resp.status, resp.text), (200, "chunk 0\nchunk 1\n"))
        self.assertGreater(resp.elapsed, 1.0)

        def slow_body():
            for _ in range(4):
                yield b"x" * 100
                time.sleep(0.35)

        resp = self.req("tt.example.com", "POST", "/upload", body=slow_body())
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.json()["length"], 400)
        # The upstream holds this one until cleanup: only the timeout answers it.
        resp = self.req("tt.example.com", path=f"/hold?gate={self.gate(self.app)}")
        self.assertEqual(resp.status, 504)
        self.assertGreaterEqual(resp.elapsed, 0.45)

    def test_empty_request_id_and_start_are_replaced(self):
        """§5 P2/P3: an *empty* `X-Request-ID` / `X-Request-Start` counts as absent."""
        self.deploy_host("rid", "rid.example.com")
        resp = self.req(
            "rid.example.com", path="/echo", headers={"X-Request-ID": "", "X-Request-Start": ""}
        )
        self.assertRegex(resp.echo_header("X-Request-ID") or "", r"^[0-9a-f-]{36}$")
        self.assertRegex(resp.echo_header("X-Request-Start") or "", r"^t=\d{13}$")

    def test_multiple_forwarded_for_lines(self):
        """§9.2/§17.2: all incoming XFF lines joined; the log shows the first line verbatim."""
        self.deploy_host("xff", "xff.example.com")
        mark = self.proxy.log_mark()
        resp = self.req(
            "xff.example.com",
            path="/echo",
            headers=[
                ("X-Forwarded-For", "1.1.1.1, 3.3.3.3"),
                ("X-Forwarded-For", "2.2.2.2"),
                ("X-Forwarded-Host", ""),
            ],
        )
        self.assertEqual(
            resp.echo_header_all("X-Forwarded-For"), ["1.1.1.1, 3.3.3.3, 2.2.2.2, 127.0.0.1"]
        )
        self.assertEqual(resp.echo_header("X-Forwarded-Host"), "xff.example.com")
        log = self.proxy.wait_for_log("Request", since=mark, path="/echo", service="xff")
        self.assertEqual(log["remote_addr"], "1.1.1.1, 3.3.3.3")

    def test_empty_host_and_bracketed_ipv6_host(self):
        """§4.3/§6.3: `Host:` empty → catch-all; `[::1]:port` routes as `::1`."""
        self.deploy("h10", self.app.addr, "--path-prefix", "/h10")
        raw = raw_exchange(
            self.proxy.http_port, b"GET /h10/x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual((raw_status(raw), raw_body(raw)), (200, b"conf-app"), raw[:300])
        self.deploy_host("v6", "::1")
        self.assertEqual(self.req("[::1]:8080").text, "conf-app")
        self.assertEqual(self.req("[::1]").status, 404)

    def test_redirect_keeps_raw_request_uri(self):
        """§7: Location = original escaped path + raw query."""
        self.deploy_host("rawredir", "rr.example.com", "--tls")
        resp = self.req("rr.example.com", path="/a%20b/c%2Fd?x=%41&y=a+b")
        self.assertEqual(resp.header("Location"), "https://rr.example.com/a%20b/c%2Fd?x=%41&y=a+b")

    def test_empty_target_list(self):
        """§13.1: `--target=` never becomes healthy; forced it serves 503."""
        result = self.proxy.cli(
            "deploy",
            "empty",
            "--target=",
            "--host",
            "empty.example.com",
            "--deploy-timeout",
            "300ms",
        )
        self.assertEqual(
            (result.code, result.err),
            (1, "Error: target failed to become healthy within configured timeout (300ms)\n"),
        )
        self.assertEqual(self.req("empty.example.com").status, 404)
        self.deploy("empty", "--target=", "--host", "empty.example.com", "--force")
        self.assertEqual(self.req("empty.example.com").status, 503)

    def test_non_positive_health_interval_rejected(self):
        """§12.1/§21.2: interval 0 is rejected with an error, never a crash."""
        result = self.proxy.cli(
            "deploy",
            "ival",
            "--target",
            self.app.addr,
            "--host",
            "ival.example.com",
            "--health-check-interval",
            "0s",
        )
        self.remove_later("ival")
        self.assertEqual(result.code, 1, result)
        self.assertTrue(result.err.startswith("Error: "), result)
        self.assertTrue(self.proxy.alive())
        self.assertEqual(self.req("ival.example.com").status, 404)

    def test_http10_client_gets_close_delimited_stream(self):
        """§9.4: an upstream chunked response reaches an HTTP/1.0 client close-delimited."""
        self.deploy_host("v10", "v10.example.com")
        raw = raw_exchange(
            self.proxy.http_port,
            b"GET /stream?chunks=3&ms=10 HTTP/1.0\r\nHost: v10.example.com\r\n\r\n",
        )
        self.assertEqual(raw_status(raw), 200, raw[:300])
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(body, b"chunk 0\nchunk 1\nchunk 2\n")

    def test_expect_100_continue(self):
        """§4.3 (robust HTTP/1.1 server): `Expect: 100-continue` gets `100 Continue`."""
        self.deploy_host("expect", "expect.example.com")
        with socket.create_connection(("127.0.0.1", self.proxy.http_port), timeout=5) as s:
            s.sendall(
                b"POST /upload HTTP/1.1\r\nHost: expect.example.com\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            s.settimeout(2)
            try:
                interim = s.recv(65536)
            except TimeoutError:
                interim = b""
            s.sendall(b"hello")
            s.settimeout(5)
            rest = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
        raw = interim + rest
        self.assertTrue(raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), raw[:200])
        # Exactly one: the upstream's own 100 is not relayed on top of ours (as in Go).
        self.assertEqual(raw.count(b" 100 Continue\r\n"), 1, raw[:400])
        final = raw
        while final.startswith(b"HTTP/1.1 1"):
            final = final.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(raw_status(final), 200, raw[:400])
        self.assertEqual(json.loads(raw_body(final))["length"], 5)

    def test_connection_tokens_are_case_insensitive(self):
        """§9.2: headers named in `Connection` are dropped whatever the case."""
        self.deploy_host("conntok", "conntok.example.com")
        resp = self.req(
            "conntok.example.com",
            path="/echo",
            headers={"Connection": "X-DROP, x-other", "x-drop": "1", "X-Other": "2", "X-Stay": "3"},
        )
        self.assertIsNone(resp.echo_header("X-Drop"))
        self.assertIsNone(resp.echo_header("X-Other"))
        self.assertEqual(resp.echo_header("X-Stay"), "3")

    def test_list_sorted_by_bytes(self):
        """§3.5.1: rows sorted by service name in byte order (upper case first)."""
        self.deploy_host("zz-sort", "zz.sort.example.com")
        self.deploy_host("ZZ-sort", "ZZ.sort.example.com")
        names = [row[0] for row in self.proxy.list_rows()[1:]]
        self.assertLess(names.index("ZZ-sort"), names.index("zz-sort"))
        self.assertEqual(names, sorted(names, key=lambda n: n.encode()))

    # §4.3 parser table, one entry at a time

    def assertRejected(self, data: bytes, statuses: tuple[int, ...], what: str) -> None:
        self.deploy_once_parser()
        before = self.app.stats()["counts"].get("/parser", 0)
        raw = raw_exchange(self.proxy.http_port, data)
        self.assertIn(raw_status(raw), statuses, f"{what}: {raw[:300]!r}")
        self.assertEqual(self.app.stats()["counts"].get("/parser", 0), before, what)
        self.assertEqual(self.req("parser.example.com", path="/ok").status, 200)

    def deploy_once_parser(self):
        if not getattr(self.proxy, "_conf_parser", False):
            self.proxy.cli_ok(
                "deploy", "parser", "--target", self.app.addr, "--host", "parser.example.com"
            )
            self.proxy._conf_parser = True

    def test_parser_extra_rejections(self):
        """§4.3: other `Transfer-Encoding`s → 501; malformed lines/names/lengths → 400."""
        h = b"Host: parser.example.com\r\n"
        post = b"POST /parser HTTP/1.1\r\n" + h
        cases = [
            (
                post + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                (501,),
                "gzip, chunked",
            ),
            (
                post + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                (501, 400),
                "two TE lines",
            ),
            (post + b"Transfer-Encoding: identity\r\n\r\n", (501,), "identity"),
            (post + b"Content-Length: 5, 5\r\n\r\nhello", (400,), "CL list"),
            (post + b"Content-Length: +5\r\n\r\nhello", (400,), "CL with sign"),
            (b"GET /parser HTTP/1.1\r\n" + h + b"X(Foo): a\r\n\r\n", (400,), "bad name char"),
            (b"GET /parser HTTP/1.1\r\n" + h + b"NoColonHere\r\n\r\n", (400,), "no colon"),
            (b"GET /parser HTTP/1.1\r\n" + h + b"X-Foo: a\x01b\r\n\r\n", (400,), "CTL in value"),
            (b"GET  /parser HTTP/1.1\r\n" + h + b"\r\n", (400,), "double space"),
            (b"GET /parser HTTP/1.1 extra\r\n" + h + b"\r\n", (400, 505), "extra token"),
            (b"GET /parser http/1.1\r\n" + h + b"\r\n", (400, 505), "lowercase version"),
            (b"GET /parser HTTP/2.0\r\n" + h + b"\r\n", (505,), "HTTP/2.0 text"),
            (b"GET /parser HTTP/1.1\r\nHost: a\x00b\r\n\r\n", (400,), "NUL in Host"),
            (b"GET /parser%zz HTTP/1.1\r\n" + h + b"\r\n", (400,), "bad escape in path"),
            (b"GET parser HTTP/1.1\r\n" + h + b"\r\n", (400,), "relative target"),
        ]
        for data, statuses, what in cases:
            self.assertRejected(data, statuses, what)

    def test_parser_accepted_forms(self):
        """§4.3: identical repeated Content-Length, `Chunked` in any case, obs-fold safe,
        `HTTP/1.2` served as HTTP/1.1."""
        self.deploy_once_parser()
        raw = raw_exchange(
            self.proxy.http_port,
            b"GET /parser HTTP/1.2\r\nHost: parser.example.com\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(raw_status(raw), 200, raw[:300])
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:300])
        raw = raw_exchange(
            self.proxy.http_port,
            b"POST /upload HTTP/1.1\r\nHost: parser.example.com\r\nContent-Length: 5\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        self.assertEqual(raw_status(raw), 200, raw[:300])
        self.assertEqual(json.loads(raw_body(raw))["length"], 5)
        raw = raw_exchange(
            self.proxy.http_port,
            b"POST /upload HTTP/1.1\r\nHost: parser.example.com\r\nTransfer-Encoding: Chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        self.assertEqual(raw_status(raw), 200, raw[:300])
        self.assertEqual(json.loads(raw_body(raw))["length"], 5)
        # obs-fold: either rejected, or folded into one value -- never a header of its own.
        raw = raw_exchange(
            self.proxy.http_port,
            b"GET /echo HTTP/1.1\r\nHost: parser.example.com\r\nX-Folded: a\r\n"
            b" X-Smuggled: b\r\nConnection: close\r\n\r\n",
        )
        self.assertIn(raw_status(raw), (200, 400), raw[:300])
        if raw_status(raw) == 200:
            names = [k.lower() for k, _ in json.loads(raw_body(raw))["headers"]]
            self.assertNotIn("x-smuggled", names)

    # §17.2 / §18

    def test_log_fields_for_chunked_and_http10(self):
        """§17.2: `req_content_length` -1 for chunked, `proto` HTTP/1.0, `query`."""
        self.deploy_host("logf", "logf.example.com")
        mark = self.proxy.log_mark()
        resp = self.req("logf.example.com", "POST", "/upload?a=1", body=iter([b"abc", b"de"]))
        self.assertEqual(resp.status, 200)
        log = self.proxy.wait_for_log("Request", since=mark, path="/upload")
        self.assertEqual(
            (log["req_content_length"], log["query"], log["proto"], log["scheme"], log["port"]),
            (-1, "a=1", "HTTP/1.1", "http", self.proxy.http_port),
        )
        raw_exchange(self.proxy.http_port, b"GET /v10 HTTP/1.0\r\nHost: logf.example.com\r\n\r\n")
        log = self.proxy.wait_for_log("Request", since=mark, path="/v10")
        self.assertEqual((log["proto"], log["req_content_length"]), ("HTTP/1.0", 0))

    def test_metrics_exposition_details(self):
        """§18: HELP texts, buckets, any path, lazy series, in-flight gauge 1 then 0."""
        self.deploy_host("metr", "metr.example.com")
        self.req("metr.example.com", "PURGE", "/")
        gate = self.gate(self.app)
        result: list = []
        t = threading.Thread(
            target=lambda: result.append(
                self.req("metr.example.com", path=f"/hold?gate={gate}", timeout=30)
            )
        )
        t.start()

        def gauge() -> str:
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy.metrics_port, timeout=5)
            conn.request("GET", "/some/other/path")
            resp = conn.getresponse()
            body = resp.read().decode()
            self.assertIn("text/plain", resp.getheader("Content-Type"))
            conn.close()
            return body

        self.app.wait_arrived(gate)
        self.assertIn('kamal_proxy_http_in_flight_requests{service="metr"} 1', gauge())
        self.app.release(gate)
        t.join(15)
        self.assertEqual([r.status for r in result], [200])
        text = gauge()
        self.assertIn('kamal_proxy_http_in_flight_requests{service="metr"} 0', text)
        for line in (
            "# HELP kamal_proxy_http_requests_total HTTP requests processed, labeled by service,"
            " status code and method.",
            "# TYPE kamal_proxy_http_requests_total counter",
            "# HELP kamal_proxy_http_request_duration_seconds Duration of HTTP requests, labeled"
            " by service, status code and method.",
            "# TYPE kamal_proxy_http_request_duration_seconds histogram",
            "# HELP kamal_proxy_http_in_flight_requests Number of in-flight HTTP requests,"
            " labeled by service.",
            "# TYPE kamal_proxy_http_in_flight_requests gauge",
        ):
            self.assertIn(line + "\n", text)
        self.assertIn('method="OTHER"', text)
        self.assertNotIn('method="PURGE"', text)
        les = {
            part.split('le="')[1].split('"')[0]
            for part in text.splitlines()
            if part.startswith("kamal_proxy_http_request_duration_seconds_bucket")
            and 'service="metr"' in part
        }
        self.assertEqual(
            {float(x) for x in les if x != "+Inf"},
            {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10},
        )
        self.assertIn("+Inf", les)

    # §13.3 / §14

    def test_concurrent_deploys_of_one_service(self):
        """§13.3: both deploys succeed; the later installation wins."""
        slow = self.upstream("slowhealth", "--health-status", "503")
        fast = self.upstream("fasthealth")
        results: dict[str, object] = {}

        def run(name: str, target: str) -> None:
            results[name] = self.proxy.cli(
                "deploy", "conc", "--target", target, "--host", "conc.example.com",
                "--deploy-timeout", "5m",
            )  # fmt: skip

        self.remove_later("conc")
        t1 = threading.Thread(target=run, args=("slow", slow.addr))
        t1.start()
        # The first deploy is under way (its target being checked) when the second starts, and
        # its target turns healthy only after the second deploy has installed its own.
        eventually(lambda: slow.health_checks() >= 1, timeout=PROCESS_TIMEOUT)
        run("fast", fast.addr)
        self.assertEqual(self.req("conc.example.com").text, "fasthealth")
        self.assertTrue(t1.is_alive(), "the first deploy returned before its target was healthy")
        slow.set_health(200)
        t1.join(PROCESS_TIMEOUT)
        self.assertFalse(t1.is_alive(), "the first deploy did not return once healthy")
        self.assertEqual(results["fast"].code, 0, results["fast"])
        self.assertEqual(results["slow"].code, 0, results["slow"])
        self.assertEqual(self.req("conc.example.com").text, "slowhealth")
        rows = [r for r in self.proxy.list_rows() if r[0] == "conc"]
        self.assertEqual(rows[0][3], slow.addr)

    def test_pause_from_stopped_and_resume_when_running(self):
        """§14: pause of a stopped service → paused (waits, then 504); resume of running ok."""
        self.deploy_host("pst", "pst.example.com")
        result = self.proxy.cli("resume", "pst")
        self.assertEqual((result.code, result.out, result.err), (0, "", ""))
        self.assertEqual(self.req("pst.example.com").status, 200)
        self.proxy.cli_ok("stop", "pst", "--message", "first")
        self.proxy.cli_ok("stop", "pst", "--message", "second")
        resp = self.req("pst.example.com")
        self.assertEqual(resp.status, 503)
        self.assertIn("second", resp.text)
        self.assertNotIn("first", resp.text)
        self.proxy.cli_ok("pause", "pst", "--max-pause", "400ms")
        rows = [r for r in self.proxy.list_rows() if r[0] == "pst"]
        self.assertEqual(rows[0][4], "paused")
        resp = self.req("pst.example.com")
        self.assertEqual(resp.status, 504)
        self.assertGreater(resp.elapsed, 0.3)
        self.proxy.cli_ok("resume", "pst")
        self.assertEqual(self.req("pst.example.com").status, 200)


# -- when the state file is written (§15.1) ---------------------------------------------------


class StateSaveTests(IntegrationTestCase):
    def test_which_commands_save(self):
        proxy = self.start_proxy()
        self.proxy = proxy
        app = shared_upstream("conf-app")
        bad = self.upstream("bad", "--health-status", "500")
        path = proxy.state_path

        def saved() -> bool:
            return os.path.exists(path)

        # Failed validation, bad target address and health timeout: no save.
        self.assertEqual(proxy.cli("deploy", "s1", "--target", "bad target").code, 1)
        self.assertEqual(
            proxy.cli("deploy", "s1", "--target", bad.addr, "--deploy-timeout", "200ms").code, 1
        )
        self.assertEqual(proxy.cli("rollout", "deploy", "s1", "--target", app.addr).code, 1)
        self.assertFalse(saved(), "a failed deploy wrote the state file")
        # A command failing with `service not found` re-saves (here: an empty list).
        for args in (
            ("remove", "nope"),
            ("pause", "nope"),
            ("stop", "nope"),
            ("resume", "nope"),
            ("rollout", "set", "nope", "--percent", "1"),
            ("rollout", "stop", "nope"),
        ):
            result = proxy.cli(*args)
            self.assertEqual((result.code, result.err), (1, "Error: service not found\n"), args)
            self.assertTrue(saved(), args)
            with open(path) as f:
                text = f.read()
            self.assertEqual(json.loads(text), [], args)
            self.assertTrue(text.endswith("\n"))
            os.unlink(path)
        # `rollout set` before `rollout deploy`: error, still saved.
        self.deploy("s1", app.addr)
        os.unlink(path)
        result = proxy.cli("rollout", "set", "s1", "--percent", "5")
        self.assertEqual(result.err, "Error: rollout target not set\n")
        self.assertTrue(saved())
        # An install-step failure (conflict, error pages) re-writes the unchanged state.
        for args in (
            ("deploy", "s2", "--target", app.addr),
            ("deploy", "s1", "--target", app.addr, "--error-pages", "missing-dir"),
        ):
            os.unlink(path)
            result = proxy.cli(*args)
            self.assertEqual(result.code, 1, result)
            self.assertTrue(saved(), args)
            with open(path) as f:
                state = json.load(f)
            self.assertEqual([s["name"] for s in state], ["s1"])
            self.assertEqual(state[0]["options"]["error_page_path"], "")


# -- TLS with a static certificate (scenarios 13, 52, 54, 159, 171) -----------------------------


class TlsConformanceTests(IntegrationTestCase):
    shared = True

    def setUp(self):
        super().setUp()
        self.app = shared_upstream("conf-tls-app")
        if not getattr(self.proxy, "_conf_tls", None):
            ca_key, ca = make_ca("Conformance CA")
            key, leaf = make_leaf(
                ca_key, ca, ["tls.example.test", "www.tls.example.test", "noredir.example.test"]
            )
            cert_path = os.path.join(self.proxy.root, "c.crt")
            key_path = os.path.join(self.proxy.root, "c.key")
            with open(cert_path, "wb") as f:
                f.write(cert_pem(leaf))
            with open(key_path, "wb") as f:
                f.write(key_pem(key))
            certs = ("--tls-certificate-path", cert_path, "--tls-private-key-path", key_path)
            self.proxy.cli_ok(
                "deploy",
                "tls",
                "--target",
                self.app.addr,
                "--host",
                "tls.example.test,www.tls.example.test",
                "--tls",
                "--canonical-host",
                "tls.example.test",
                *certs,
            )
            self.proxy.cli_ok(
                "deploy",
                "noredir",
                "--target",
                self.app.addr,
                "--host",
                "noredir.example.test",
                "--tls",
                "--tls-redirect=false",
                *certs,
            )
            self.proxy.cli_ok(
                "deploy", "plain", "--target", self.app.addr, "--host", "plain.example.test"
            )
            self.proxy._conf_tls = cert_pem(ca).decode()
        self.cadata = self.proxy._conf_tls

    def https(self, sni: str, host: str, path: str = "/", headers=()):
        ctx = ssl.create_default_context(cadata=self.cadata)
        ctx.set_alpn_protocols(["http/1.1"])
        sock = socket.create_connection(("127.0.0.1", self.proxy.https_port), timeout=10)
        tls = ctx.wrap_socket(sock, server_hostname=sni)
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.https_port, timeout=10)
        conn.sock = tls
        try:
            conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def test_https_to_non_canonical_host_keeps_https(self):
        """Scenario 13: HTTPS `www.` → 301 `https://tls.example.test/`; canonical → 200."""
        status, headers, _ = self.https("www.tls.example.test", "www.tls.example.test", "/a?b=c")
        self.assertEqual((status, headers.get("Location")), (301, "https://tls.example.test/a?b=c"))
        status, _, body = self.https("tls.example.test", "tls.example.test")
        self.assertEqual((status, body), (200, b"conf-tls-app"))

    def test_tls_mismatch_is_503_and_logged_https(self):
        """§5 P12, scenario 54, §17.2: TLS request for a TLS-off service → 503, scheme https."""
        mark = self.proxy.log_mark()
        status, headers, body = self.https("tls.example.test", "plain.example.test", "/mm")
        self.assertEqual(status, 503)
        self.assertIn(b"503", body)
        self.assertEqual(headers.get("Content-Type"), "text/html; charset=utf-8")
        log = self.proxy.wait_for_log("Request", since=mark, path="/mm")
        self.assertEqual(
            (log["scheme"], log["port"], log["status"], log["service"]),
            ("https", self.proxy.https_port, 503, "plain"),
        )

    def test_redirect_off_and_forwarded_headers_over_tls(self):
        """Scenarios 52/159: redirect off → HTTP 200 with XFP http; TLS forward headers off."""
        resp = self.proxy.request(
            "GET",
            "/echo",
            host="noredir.example.test",
            headers={"X-Forwarded-For": "1.2.3.4", "X-Forwarded-Proto": "https"},
        )
        self.assertEqual(resp.status, 200)
        # --tls makes forward_headers default off: client values replaced even on plain HTTP.
        self.assertEqual(resp.echo_header_all("X-Forwarded-For"), ["127.0.0.1"])
        self.assertEqual(resp.echo_header("X-Forwarded-Proto"), "http")
        status, _, body = self.https(
            "noredir.example.test",
            "noredir.example.test",
            "/echo",
            headers=[("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "http")],
        )
        self.assertEqual(status, 200)
        info = json.loads(body)
        hdrs = {k.lower(): v for k, v in info["headers"]}
        self.assertEqual(
            (hdrs["x-forwarded-for"], hdrs["x-forwarded-proto"]), ("127.0.0.1", "https")
        )
        self.assertNotIn("alt-svc", {k.lower() for k in dict(info["headers"])})

    def test_no_alt_svc_without_http3(self):
        """§4.1 step 5: no `Alt-Svc` unless `--http3`."""
        status, headers, _ = self.https("tls.example.test", "tls.example.test")
        self.assertEqual(status, 200)
        self.assertNotIn("alt-svc", {k.lower() for k in headers})
