"""The state file across restarts of the real process (SPEC §15; scenarios 48, 142, 143)."""

from __future__ import annotations

import json
import os

from tests.integration.support import IntegrationTestCase, ProxyProcess
from tests.spec_keys import OPTION_KEYS, SERVICE_KEYS, TARGET_OPTION_KEYS

SECOND = 1_000_000_000


def go_state_object(name, hosts, writers, readers=(), state=0, message="", cache_path=""):
    """One service object exactly as the Go original writes it (SPEC §15.2)."""
    return {
        "name": name,
        "options": {
            "hosts": list(hosts),
            "path_prefixes": ["/"],
            "tls_enabled": False,
            "tls_certificate_path": "",
            "tls_private_key_path": "",
            "tls_on_demand_url": "",
            "tls_redirect": True,
            "canonical_host": "",
            "acme_directory": "",
            "acme_cache_path": cache_path,
            "error_page_path": "",
            "strip_prefix": True,
            "writer_affinity_timeout": SECOND,
            "read_targets_accept_websockets": False,
            "exclude_metrics_paths": None,
            "client_ip_header": "",
        },
        "target_options": {
            "health_check_config": {
                "path": "/up",
                "port": 0,
                "interval": SECOND,
                "timeout": 5 * SECOND,
                "host": "",
            },
            "response_timeout": 30 * SECOND,
            "buffer_requests": False,
            "buffer_responses": False,
            "max_memory_buffer_size": 1048576,
            "max_request_body_size": 0,
            "max_response_body_size": 0,
            "log_request_headers": None,
            "log_response_headers": None,
            "forward_headers": True,
            "scope_cookie_paths": False,
        },
        "active_targets": list(writers),
        "active_readers": list(readers),
        "rollout_targets": None,
        "rollout_readers": None,
        "pause_controller": {"state": state, "stop_message": message, "fail_after": 30 * SECOND},
        "rollout_controller": None,
    }


class StateTests(IntegrationTestCase):
    def write_state(self, proxy, content) -> None:
        os.makedirs(proxy.data_dir, mode=0o700, exist_ok=True)
        with open(proxy.state_path, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content) + "\n")

    def read_state(self, proxy) -> list:
        with open(proxy.state_path) as f:
            text = f.read()
        self.assertTrue(text.endswith("\n"))
        return json.loads(text)

    def start_with_state(self, content):
        proxy = ProxyProcess()
        self.addCleanup(proxy.cleanup)
        self.write_state(proxy, content)
        proxy.start()
        return proxy

    def test_first_start_and_first_save(self):
        """Scenario 48 and §15.2: no state file, then one in the Go layout after a deploy."""
        proxy = self.start_proxy()
        proxy.wait_for_log("No previous state to restore", path=proxy.state_path)
        self.assertFalse(os.path.exists(proxy.state_path))
        up = self.upstream("first")

        failed = proxy.cli("deploy", "web", "--target", "127.0.0.1:9", "--deploy-timeout", "200ms")
        self.assertEqual(failed.code, 1)
        self.assertFalse(os.path.exists(proxy.state_path), "saved after a failed health wait")

        self.deploy("web", up.addr, "--host", "web.example.com", proxy=proxy)
        state = self.read_state(proxy)
        self.assertEqual(len(state), 1)
        service = state[0]
        self.assertEqual(list(service), SERVICE_KEYS)
        self.assertEqual(list(service["options"]), OPTION_KEYS)
        self.assertEqual(list(service["target_options"]), TARGET_OPTION_KEYS)
        self.assertEqual(service["name"], "web")
        self.assertEqual(service["options"]["hosts"], ["web.example.com"])
        self.assertEqual(service["options"]["path_prefixes"], ["/"])
        self.assertEqual(service["active_targets"], [up.addr])
        self.assertEqual(
            service["target_options"]["health_check_config"],
            {"path": "/up", "port": 0, "interval": SECOND, "timeout": 5 * SECOND, "host": ""},
        )
        self.assertEqual(service["target_options"]["response_timeout"], 30 * SECOND)
        self.assertIs(service["target_options"]["forward_headers"], True)
        self.assertEqual(service["pause_controller"]["state"], 0)
        self.assertEqual(
            service["options"]["acme_cache_path"], os.path.join(proxy.data_dir, "certs")
        )

    def test_restart_restores_services(self):
        """Scenario 142: services answer at once after a restart; list is identical."""
        proxy = self.start_proxy()
        a, b = self.upstream("a"), self.upstream("b")
        api, gone, lone = self.upstream("api"), self.upstream("gone"), self.upstream("lone")
        self.deploy("web", a.addr, b.addr, "--host", "web.example.com", proxy=proxy)
        self.deploy(
            "api", api.addr, "--host", "web.example.com", "--path-prefix", "/api",
            "--strip-path-prefix=false", proxy=proxy,
        )  # fmt: skip
        self.deploy("gone", gone.addr, "--host", "gone.example.com", proxy=proxy)
        self.deploy("lone", lone.addr, "--host", "lone.example.com", proxy=proxy)
        proxy.cli_ok("remove", "gone")
        before = proxy.list_rows()
        # A lone target whose health check now fails is still restored as healthy.
        lone.set_health(500)

        proxy.restart()
        proxy.wait_for_log("Restored saved state", path=proxy.state_path)
        self.assertEqual(proxy.logs("No previous state to restore"), [])
        bodies = {self.get("web.example.com", proxy=proxy).text for _ in range(2)}
        self.assertEqual(bodies, {"a", "b"})
        self.assertServes("lone.example.com", "lone", proxy=proxy)
        resp = self.assertServes("web.example.com", "api", path="/api/x", proxy=proxy)
        self.assertEqual(resp.header("X-Upstream-Path"), "/api/x")
        self.assertNotFound("gone.example.com", proxy=proxy)
        self.assertEqual(proxy.list_rows(), before)

        # Deploys after a restart work and persist in turn.
        later = self.upstream("later")
        self.deploy("later", later.addr, "--host", "later.example.com", proxy=proxy)
        proxy.restart()
        self.assertServes("later.example.com", "later", proxy=proxy)
        self.assertServes("lone.example.com", "lone", proxy=proxy)
        self.assertEqual(len(proxy.list_rows()), len(before) + 1)

    def test_go_original_state_file(self):
        """Scenario 143: a Go-written object with a writer and a reader restores faithfully."""
        writer, reader = self.upstream("writer"), self.upstream("reader")
        obj = go_state_object("app", ["example.com"], [writer.addr], [reader.addr])
        proxy = self.start_with_state([obj])
        proxy.wait_for_log("Restored saved state")
        rows = proxy.list_rows()
        self.assertEqual(rows[1], ["app", "example.com", "/", f"{writer.addr},{reader.addr}",
                                   "running", "no"])  # fmt: skip
        for _ in range(2):
            self.assertServes("example.com", "reader", proxy=proxy)
        resp = proxy.request("POST", "/", host="example.com", body=b"x")
        self.assertEqual((resp.status, resp.text), (200, "writer"))

    def test_go_original_stopped_service(self):
        """Scenario 143: a stopped service keeps its message; ``resume`` brings it back."""
        writer, reader = self.upstream("writer"), self.upstream("reader")
        obj = go_state_object(
            "app", ["example.com"], [writer.addr], [reader.addr], state=2, message="Back at noon"
        )
        proxy = self.start_with_state([obj])
        rows = proxy.list_rows()
        self.assertEqual(rows[1][3:5], [f"{writer.addr},{reader.addr}", "stopped"])
        resp = proxy.request("GET", "/", host="example.com")
        self.assertEqual(resp.status, 503)
        self.assertIn("Back at noon", resp.text)
        proxy.cli_ok("resume", "app")
        self.assertServes("example.com", "reader", proxy=proxy)
        resp = proxy.request("POST", "/", host="example.com", body=b"x")
        self.assertEqual((resp.status, resp.text), (200, "writer"))

    def test_legacy_state_object(self):
        """§15.2: a legacy single-target object restores and serves its host."""
        up = self.upstream("legacy")
        legacy = {
            "name": "old",
            "active_target": up.addr,
            "hosts": ["legacy.example.com"],
            "options": {},
            "target_options": {
                "health_check_config": {"path": "/up", "interval": SECOND, "timeout": 5 * SECOND}
            },
            "pause_controller": {"state": 0},
        }
        proxy = self.start_with_state([legacy])
        proxy.wait_for_log("Restored saved state")
        self.assertServes("legacy.example.com", "legacy", proxy=proxy)
        rows = proxy.list_rows()
        self.assertEqual(rows[1][:4], ["old", "legacy.example.com", "/", up.addr])

    def test_corrupt_state_file(self):
        """Scenario 143: ``{ this is not json`` -> start empty, keep the bad file aside."""
        corrupt = "{ this is not json"
        proxy = self.start_with_state(corrupt)
        record = eventually_log(
            proxy, ("Failed to decode saved state", "Failed to restore saved state")
        )
        self.assertEqual(record["level"], "ERROR")
        self.assertEqual(proxy.list_rows(), [["Service", "Host", "Path", "Target", "State", "TLS"]])
        up = self.upstream("fresh")
        self.deploy("fresh", up.addr, proxy=proxy)
        self.assertServes("any.example.com", "fresh", proxy=proxy)
        self.assertEqual(self.read_state(proxy)[0]["name"], "fresh")
        kept = []
        for name in os.listdir(proxy.data_dir):
            path = os.path.join(proxy.data_dir, name)
            if path != proxy.state_path and os.path.isfile(path):
                with open(path, errors="replace") as f:
                    if f.read() == corrupt:
                        kept.append(name)
        self.assertTrue(kept, f"corrupt state not kept aside: {os.listdir(proxy.data_dir)}")
        proxy.restart()
        self.assertServes("any.example.com", "fresh", proxy=proxy)


def eventually_log(proxy, messages, timeout=5.0):
    for msg in messages:
        found = proxy.logs(msg)
        if found:
            return found[0]
    try:
        return proxy.wait_for_log(messages[0], timeout=timeout)
    except AssertionError:
        found = proxy.logs(messages[1])
        if found:
            return found[0]
        raise
