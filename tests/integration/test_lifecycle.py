"""The ``kamal-proxy run`` process: start-up, logs, shutdown, the control socket (SPEC §2, §4,
§17; scenarios 1, 136, 138, 139)."""

from __future__ import annotations

import os
import signal
import socket

from tests.integration.support import (
    PROCESS_TIMEOUT,
    IntegrationTestCase,
    ProxyProcess,
    SigtermWhenStarted,
    WebSocketClient,
    eventually,
    free_port,
    port_open,
    run_cli,
)
from tests.integration.traffic_support import Background

NOT_FOUND_TITLE = "404 \u2014 Not Found"


class StartupTests(IntegrationTestCase):
    def test_started_logs_and_not_found_page(self):
        """Scenarios 1 and 136: JSON logs on stdout, both ports listen, 404 page for anything."""
        proxy = self.start_proxy()
        started = proxy.wait_for_log("Server started")
        self.assertEqual(started["http"], proxy.http_port)
        self.assertEqual(started["https"], proxy.https_port)
        self.assertIsInstance(started["http"], int)
        for key in ("time", "level", "msg"):
            self.assertIn(key, started)
        self.assertEqual(started["level"], "INFO")
        restore = proxy.wait_for_log("No previous state to restore")
        self.assertEqual(restore["level"], "INFO")
        self.assertEqual(restore.get("path"), proxy.state_path)
        self.assertTrue(port_open(proxy.http_port))
        self.assertTrue(port_open(proxy.https_port))

        for host in ("example.com", "127.0.0.1", "anything.test:8080"):
            resp = proxy.request("GET", "/", host=host)
            self.assertEqual(resp.status, 404)
            self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
            self.assertIn("Not Found", resp.text)
            self.assertIn(NOT_FOUND_TITLE, resp.text)
            self.assertIsNone(resp.header("Server"))

        self.assertEqual(proxy.bad_lines, [], "every stdout line must be a JSON object")
        self.assertEqual(proxy.logs(level="DEBUG"), [])

    def test_no_debug_lines_without_debug(self):
        """Scenario 136: at INFO level a deploy produces no DEBUG lines."""
        proxy = self.start_proxy()
        up = self.upstream("first")
        self.deploy("web", up.addr, proxy=proxy)
        self.assertEqual(proxy.request("GET", "/").text, "first")
        proxy.wait_for_log("Deployed", service="web")
        self.assertEqual(proxy.logs(level="DEBUG"), [])
        self.assertEqual(proxy.bad_lines, [])

    def test_debug_flag_and_env(self):
        """Scenario 136: ``--debug`` and ``DEBUG=true`` lower the level to DEBUG."""
        up = self.upstream("first")
        for args, env in (
            (("--debug",), {}),
            ((), {"DEBUG": "true"}),
            ((), {"KAMAL_PROXY_DEBUG": "true"}),
        ):
            proxy = self.start_proxy(*args, env=env)
            self.deploy("web", up.addr, proxy=proxy)
            debug = proxy.logs(level="DEBUG")
            self.assertTrue(debug, f"no DEBUG lines with {args} {env}")
            self.assertEqual(proxy.bad_lines, [])
            proxy.stop()

    def test_request_log_line(self):
        """Scenario 136/§17.2: a routed request is logged as ``Request`` with the key attributes."""
        proxy = self.start_proxy()
        up = self.upstream("first")
        self.deploy("web", up.addr, "--host", "log.example.com", proxy=proxy)
        mark = proxy.log_mark()
        resp = proxy.request("GET", "/some/path?q=1", host="log.example.com")
        self.assertEqual(resp.status, 200)
        record = proxy.wait_for_log("Request", since=mark, path="/some/path")
        self.assertEqual(record["host"], "log.example.com")
        self.assertEqual(record["port"], proxy.http_port)
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["service"], "web")
        self.assertEqual(record["target"], up.addr)
        self.assertEqual(record["method"], "GET")
        self.assertEqual(record["query"], "q=1")
        self.assertEqual(record["proto"], "HTTP/1.1")
        self.assertEqual(record["scheme"], "http")
        self.assertEqual(record["client_addr"], "127.0.0.1")
        self.assertEqual(record["resp_content_length"], len("first"))
        self.assertIsInstance(record["duration"], int)

        mark = proxy.log_mark()
        self.assertEqual(proxy.request("GET", "/x", host="nothing.example.com").status, 404)
        record = proxy.wait_for_log("Request", since=mark, path="/x")
        self.assertEqual((record["status"], record["service"], record["target"]), (404, "", ""))


class ShutdownTests(IntegrationTestCase):
    def _assert_clean_exit(self, sig: int) -> None:
        proxy = self.start_proxy()
        self.assertTrue(os.path.exists(proxy.socket_path))
        code = proxy.stop(sig)
        self.assertEqual(code, 0, proxy.describe())
        self.assertTrue(proxy.logs("Server stopped"), proxy.describe())
        # Idle: it stopped without waiting for the 10s deadline (which would log this).
        self.assertEqual(proxy.logs("Closing active connections"), [], proxy.describe())
        self.assertFalse(port_open(proxy.http_port))
        self.assertFalse(os.path.exists(proxy.socket_path), "socket file left behind")

    def test_sigterm(self):
        """Scenario 138."""
        self._assert_clean_exit(signal.SIGTERM)

    def test_sigint(self):
        """Scenario 138."""
        self._assert_clean_exit(signal.SIGINT)

    def test_sigterm_the_moment_it_is_started(self):
        """A SIGTERM sent as soon as ``Server started`` is read stops the server gracefully:
        the line is logged only once the signal handlers are in place."""
        for _ in range(5):
            proxy = SigtermWhenStarted()
            self.addCleanup(proxy.cleanup)
            proxy.start(wait_ready=False)
            proxy.wait_for_log("Server started", timeout=PROCESS_TIMEOUT)
            self.assertTrue(proxy.signalled.wait(5))
            proxy.proc.wait(PROCESS_TIMEOUT)
            self.assertEqual(proxy.stop(), 0, proxy.describe())
            self.assertTrue(proxy.logs("Server stopped"), proxy.describe())

    def test_open_websocket_does_not_hold_shutdown(self):
        """§4.2: upgraded connections are not waited for; idle keep-alive ones close at once."""
        proxy = self.start_proxy()
        up = self.upstream("ws")
        self.deploy("web", up.addr, proxy=proxy)
        ws = WebSocketClient.connect(proxy.http_port, "/ws", host="localhost")
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 101, ws.response_head)
        ws.send("hello")
        self.assertEqual(ws.recv(), (1, b"hello"))
        idle = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=5)
        self.addCleanup(idle.close)
        idle.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIn(b"200 OK", idle.recv(65536))
        self.assertEqual(proxy.stop(signal.SIGTERM), 0, proxy.describe())
        # Neither connection held the shutdown until its 10s deadline (which logs this).
        self.assertEqual(proxy.logs("Closing active connections"), [], proxy.describe())

    def test_in_flight_request_finishes_on_shutdown(self):
        """§4.2: graceful shutdown stops accepting, lets an in-flight request finish, then
        exits 0."""
        proxy = self.start_proxy()
        up = self.upstream("first")
        self.deploy("web", up.addr, proxy=proxy)
        gate = self.gate(up)
        slow = Background(lambda: proxy.request("GET", f"/hold?gate={gate}", timeout=30))
        up.wait_arrived(gate)
        os.kill(proxy.proc.pid, signal.SIGTERM)
        # Shutting down: the HTTP port no longer accepts, yet the process waits for the request
        # the upstream still holds.
        eventually(lambda: not port_open(proxy.http_port), timeout=15)
        self.assertTrue(proxy.alive(), "exited with a request in flight")
        self.assertFalse(slow.done(), "the in-flight request ended with the shutdown")
        up.release(gate)
        resp = slow.result(15)
        self.assertEqual((resp.status, resp.text), (200, "first"))
        code = proxy.exit_status()
        self.assertEqual(code, 0, proxy.describe())
        self.assertTrue(proxy.logs("Server stopped"), proxy.describe())
        self.assertEqual(proxy.logs("Closing active connections"), [], proxy.describe())


class ControlSocketTests(IntegrationTestCase):
    def test_second_run_on_same_socket_fails(self):
        """A second server must not steal the socket of a live one: ``Error: ...``, exit 1."""
        first = self.start_proxy()
        second = ProxyProcess(env={"KAMAL_PROXY_SOCKET": first.socket_path})
        self.addCleanup(second.cleanup)
        second.start(wait_ready=False)
        code = second.exit_status()
        self.assertIsNotNone(code, "second kamal-proxy run on a live socket kept running")
        self.assertEqual(code, 1, second.describe())
        errors = [line for line in second.stderr_lines if line.startswith("Error: ")]
        self.assertTrue(errors, second.describe())
        # The first server still owns its socket.
        self.assertTrue(os.path.exists(first.socket_path))
        result = first.cli("list")
        self.assertEqual(result.code, 0, result)
        self.assertTrue(first.alive())

    def test_stale_regular_file_is_replaced(self):
        """Scenario 138: a regular file at the socket path is replaced at start-up."""
        proxy = ProxyProcess()
        self.addCleanup(proxy.cleanup)
        with open(proxy.socket_path, "w") as f:
            f.write("stale")
        proxy.start()
        self.assertEqual(proxy.cli("list").code, 0)

    def test_stale_socket_is_replaced(self):
        """A socket file left by a crashed server (nobody listening) is replaced."""
        proxy = ProxyProcess()
        self.addCleanup(proxy.cleanup)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(proxy.socket_path)
        dead.close()
        self.assertTrue(os.path.exists(proxy.socket_path))
        proxy.start()
        self.assertEqual(proxy.cli("list").code, 0)

    def test_socket_mode(self):
        """The control socket is created with mode 0600."""
        proxy = self.start_proxy()
        self.assertEqual(os.stat(proxy.socket_path).st_mode & 0o777, 0o600)

    def test_cli_without_server(self):
        """Scenario 139: every client command fails with the dial error.  A CLI that kept
        retrying would hit run_cli's bound; no tighter bound on its time, since a CLI call
        alone took 10.7 s with two suites running."""
        proxy = ProxyProcess()
        self.addCleanup(proxy.cleanup)
        for args in (("list",), ("deploy", "svc", "--target", "127.0.0.1:9"), ("remove", "svc")):
            result = run_cli(*args, env=proxy.env)
            self.assertEqual(result.code, 1, result)
            self.assertEqual(
                result.err.strip(),
                f"Error: dial unix {proxy.socket_path}: connect: no such file or directory",
            )
            self.assertEqual(result.out, "")

        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(proxy.socket_path)
        dead.close()
        result = run_cli("list", env=proxy.env)
        self.assertEqual(result.code, 1, result)
        self.assertEqual(
            result.err.strip(),
            f"Error: dial unix {proxy.socket_path}: connect: connection refused",
        )

    def test_http_port_in_use(self):
        """Scenario 138: a bound HTTP port is an ``Error: ...`` on stderr and a non-zero exit."""
        port = free_port()
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(blocker.close)
        blocker.bind(("", port))
        blocker.listen(1)
        proxy = ProxyProcess(http_port=port)
        self.addCleanup(proxy.cleanup)
        proxy.start(wait_ready=False)
        code = proxy.exit_status()
        self.assertIsNotNone(code, "kamal-proxy run kept running with its HTTP port taken")
        self.assertEqual(code, 1)
        errors = [line for line in proxy.stderr_lines if line.startswith("Error: ")]
        self.assertTrue(errors, proxy.describe())
        self.assertIn("address already in use", errors[0])
        self.assertFalse(os.path.exists(proxy.socket_path))
