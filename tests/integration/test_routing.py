"""Host and path routing through the real process (SPEC §6; scenarios 5-9, 16-19, 22-29, 31,
154).  Every request goes to 127.0.0.1; the Host header picks the service."""

from __future__ import annotations

from tests.integration.support import IntegrationTestCase, raw_exchange, raw_status, shared_upstream


def upstreams(*names):
    return [shared_upstream(n) for n in names]


class HostRoutingTests(IntegrationTestCase):
    shared = True

    def test_multiple_hosts(self):
        """Scenario 5."""
        (first,) = upstreams("first")
        self.deploy("multi", first.addr, "--host", "1.multi.test,2.multi.test")
        self.assertServes("1.multi.test", "first")
        self.assertServes("2.multi.test", "first")
        self.assertNotFound("3.multi.test")

    def test_redeploy_changes_hosts(self):
        """Scenario 6."""
        (first,) = upstreams("first")
        self.deploy("rehost", first.addr, "--host", "1.rehost.test", "--host", "2.rehost.test")
        self.deploy("rehost", first.addr, "--host", "3.rehost.test", "--host", "2.rehost.test")
        self.assertNotFound("1.rehost.test")
        self.assertServes("2.rehost.test", "first")
        self.assertServes("3.rehost.test", "first")

    def test_other_host_and_port_in_host(self):
        """Scenarios 7 and 8: other hosts 404; the port of the Host header is ignored."""
        (first,) = upstreams("first")
        self.deploy("dummy", first.addr, "--host", "dummy.example.com")
        self.assertNotFound("other.example.com")
        self.assertServes("dummy.example.com:80", "first")
        self.assertServes(f"dummy.example.com:{self.proxy.http_port}", "first")

    def test_host_change_with_new_target(self):
        """Scenario 16."""
        first, second = upstreams("first", "second")
        self.deploy("moving", first.addr, "--host", "dummy.moving.test")
        self.deploy("moving", second.addr, "--host", "dummy2.moving.test")
        self.assertServes("dummy2.moving.test", "second")
        self.assertNotFound("dummy.moving.test")

    def test_conflicting_host(self):
        """Scenario 17: the conflict message, and the first service keeps serving."""
        first, second = upstreams("first", "second")
        self.deploy("owner", first.addr, "--host", "conflict.test")
        mark = self.proxy.log_mark()
        result = self.proxy.cli(
            "deploy", "intruder", "--target", second.addr, "--host", "conflict.test"
        )
        self.assertEqual(result.code, 1)
        self.assertEqual(result.err, "Error: host is used by another service\n")
        self.remove_later("intruder")
        self.assertServes("conflict.test", "first")
        self.assertNotIn("intruder", [r[0] for r in self.proxy.list_rows()])
        record = self.proxy.wait_for_log("Host settings conflict with another service", since=mark)
        self.assertEqual(record.get("service"), "owner")
        # Same host under another path, and redeploying the owner, do not conflict.
        self.deploy("intruder", second.addr, "--host", "conflict.test", "--path-prefix", "/api")
        self.deploy("owner", first.addr, "--host", "conflict.test")
        self.assertServes("conflict.test", "second", path="/api")

    def test_catch_all_conflict(self):
        """Scenarios 9 and 18: a catch-all serves any host; a second catch-all conflicts."""
        first, second = upstreams("first", "second")
        self.deploy("catchall1", first.addr)
        self.assertServes("dummy.example.com", "first")
        self.assertServes("anything.test", "first")
        result = self.proxy.cli("deploy", "catchall12", "--target", second.addr)
        self.remove_later("catchall12")
        self.assertEqual(result.code, 1)
        self.assertEqual(result.err.strip(), "Error: host is used by another service")
        self.assertServes("whatever.test", "first")

    def test_two_hosts_two_services(self):
        """Scenario 19."""
        first, second = upstreams("first", "second")
        self.deploy("s1", first.addr, "--host", "s1.example.com")
        self.deploy("s2", second.addr, "--host", "s2.example.com")
        self.assertServes("s1.example.com", "first")
        self.assertServes("s2.example.com", "second")

    def test_wildcards_and_fallback(self):
        """Scenario 22."""
        first, second, fallback = upstreams("first", "second", "fallback")
        self.deploy("wild1", first.addr, "--host", "*.first.example.com")
        self.deploy("wild2", second.addr, "--host", "*.second.example.com")
        self.deploy("fallback", fallback.addr)
        self.assertServes("app.first.example.com", "first")
        self.assertServes("api.second.example.com", "second")
        self.assertServes("something-else.example.com", "fallback")

    def test_specific_host_and_catch_all(self):
        """Scenario 23."""
        first, second = upstreams("first", "second")
        self.deploy("specific", first.addr, "--host", "s1.example.com")
        self.deploy("default", second.addr)
        self.assertServes("s1.example.com", "first")
        self.assertServes("s2.example.com", "second")
        self.assertServes("s3.example.com", "second")

    def test_host_levels(self):
        """Scenarios 24 and 25: exact, single-label wildcard, then catch-all."""
        ups = upstreams("one", "two", "three", "four", "five")
        self.deploy("lvl1", ups[0].addr, "--host", "example.com")
        self.assertNotFound("app.example.com")  # scenario 25
        self.deploy("lvl2", ups[1].addr, "--host", "app.example.com")
        self.deploy("lvl3", ups[2].addr, "--host", "api.example.com")
        self.deploy("lvl4", ups[3].addr, "--host", "*.example.com")
        self.deploy("lvl5", ups[4].addr)
        self.assertServes("example.com", "one")
        self.assertServes("app.example.com", "two")
        self.assertServes("api.example.com", "three")
        self.assertServes("anything.example.com", "four")
        self.assertServes("extra.level.example.com", "five")
        self.assertServes("other.com", "five")

    def test_exact_host_matching(self):
        """Scenario 154: byte-exact hosts; single-label wildcards."""
        first, wild = upstreams("first", "wild")
        self.deploy("exact", first.addr, "--host", "example.com")
        self.deploy("wildcard", wild.addr, "--host", "*.example.com")
        self.assertNotFound("EXAMPLE.COM")
        self.assertNotFound("example.com.")
        self.assertServes("example.com", "first")
        self.assertServes("app.example.com", "wild")
        self.assertServes("api.example.com:8080", "wild")
        self.assertNotFound("a.b.example.com")

    def test_catch_all_serves_any_host(self):
        """Scenario 154: IPs, ports, single labels and HTTP/1.0 without Host."""
        (first,) = upstreams("first")
        self.deploy("any", first.addr)
        for host in ("127.0.0.1", f"127.0.0.1:{self.proxy.http_port}", "x"):
            self.assertServes(host, "first")
        raw = raw_exchange(self.proxy.http_port, b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(raw_status(raw), 200, raw)
        self.assertTrue(raw.endswith(b"first"), raw)


class PathRoutingTests(IntegrationTestCase):
    shared = True

    def test_prefix_precedence(self):
        """Scenario 26."""
        ups = upstreams("one", "two", "three", "four", "five", "six")
        self.deploy("p1", ups[0].addr, "--host", "example.com")
        self.deploy("p2", ups[1].addr, "--host", "example.com", "--path-prefix", "/api")
        self.deploy("p3", ups[2].addr, "--host", "example.com", "--path-prefix", "/api/special")
        self.deploy("p4", ups[3].addr, "--host", "other.example.com", "--path-prefix", "/api")
        self.deploy("p5", ups[4].addr, "--path-prefix", "/api")
        self.deploy("p6", ups[5].addr)
        cases = [
            ("example.com", "/", "one"),
            ("example.com", "/random", "one"),
            ("example.com", "/apiary", "one"),
            ("example.com", "/api", "two"),
            ("example.com", "/api/special", "three"),
            ("other.example.com", "/api/test", "four"),
            ("second.example.com", "/api/test", "five"),
            ("second.example.com", "/non-api/test", "six"),
        ]
        for host, path, body in cases:
            self.assertServes(host, body, path=path)

    def test_prefix_stripping(self):
        """Scenario 27: the upstream sees the stripped URI (``X-Upstream-Path``)."""
        ups = upstreams("one", "two", "three")
        self.deploy("strip1", ups[0].addr, "--host", "strip.example.com")
        self.deploy("strip2", ups[1].addr, "--host", "strip.example.com", "--path-prefix", "/app")
        self.deploy(
            "strip3", ups[2].addr, "--host", "strip.example.com", "--path-prefix", "/api/internal"
        )
        cases = [
            ("/app/show", "two", "/show"),
            ("/app", "two", "/"),
            ("/app/", "two", "/"),
            ("/api/internal/something?a=b", "three", "/something?a=b"),
            ("/api/external/something", "one", "/api/external/something"),
            ("/appointment", "one", "/appointment"),
        ]
        for path, body, seen in cases:
            resp = self.assertServes("strip.example.com", body, path=path)
            self.assertEqual(resp.header("X-Upstream-Path"), seen, path)
        self.deploy(
            "strip2", ups[1].addr, "--host", "strip.example.com", "--path-prefix", "/app",
            "--strip-path-prefix=false",
        )  # fmt: skip
        resp = self.assertServes("strip.example.com", "two", path="/app")
        self.assertEqual(resp.header("X-Upstream-Path"), "/app")
        row = [r for r in self.proxy.list_rows() if r[0] == "strip2"][0]
        self.assertEqual(row[2], "/app")

    def test_no_fall_through(self):
        """Scenario 28: a host with only prefixed services 404s elsewhere."""
        first, second = upstreams("first", "second")
        self.deploy("f1", first.addr, "--host", "nofall.example.com", "--path-prefix", "/first")
        self.deploy("f2", second.addr, "--host", "nofall.example.com", "--path-prefix", "/second")
        self.assertServes("nofall.example.com", "first", path="/first")
        self.assertServes("nofall.example.com", "second", path="/second")
        self.assertNotFound("nofall.example.com", path="/third")
        self.assertNotFound("nofall.example.com", path="/")

    def test_catch_all_prefixes(self):
        """Scenario 29."""
        first, second, third = upstreams("first", "second", "third")
        self.deploy("c1", first.addr, "--path-prefix", "/first")
        self.deploy("c2", second.addr, "--path-prefix", "/second")
        self.deploy("c3", third.addr, "--host", "third.example.com", "--path-prefix", "/second")
        self.assertServes("example.com", "first", path="/first")
        self.assertServes("example.com", "second", path="/second")
        self.assertServes("third.example.com", "third", path="/second/path")
        self.assertNotFound("example.com", path="/")

    def test_prefix_normalization(self):
        """Scenario 31: ``api/`` is stored and routed as ``/api``; ``/`` is the root."""
        first, second = upstreams("first", "second")
        self.deploy("norm", first.addr, "--host", "norm.example.com", "--path-prefix", "api/")
        self.deploy("normroot", second.addr, "--host", "norm.example.com", "--path-prefix", "/")
        rows = {r[0]: r for r in self.proxy.list_rows()}
        self.assertEqual(rows["norm"][2], "/api")
        self.assertEqual(rows["normroot"][2], "/")
        self.assertServes("norm.example.com", "first", path="/api/x")
        self.assertServes("norm.example.com", "second", path="/x")

    def test_percent_encoded_path_routing(self):
        """§6.3: routing uses the decoded path."""
        (first,) = upstreams("first")
        self.deploy("enc", first.addr, "--host", "enc.example.com", "--path-prefix", "/caf\u00e9")
        self.assertServes("enc.example.com", "first", path="/caf%C3%A9/x")
