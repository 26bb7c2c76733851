"""Tests for kamal_proxy.routing.table: lookup, conflicts, TLS inheritance, default TLS host."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from kamal_proxy.routing.table import (
    RoutingTable,
    host_without_port,
    split_host_port,
)
from kamal_proxy.service_options import (
    OptionsError,
    ServiceOptions,
    normalize_path_prefixes,
    validate_service_options,
)


@dataclass
class FakeService:
    name: str
    options: ServiceOptions


def svc(
    name: str,
    hosts: list[str] | str = (),
    prefixes: list[str] | str = (),
    tls: bool = False,
    redirect: bool = True,
    on_demand: str = "",
) -> FakeService:
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    if isinstance(prefixes, str):
        prefixes = prefixes.split(",")
    options = ServiceOptions(
        hosts=list(hosts),
        path_prefixes=list(prefixes),
        tls_enabled=tls,
        tls_redirect=redirect,
        tls_on_demand_url=on_demand,
    )
    return FakeService(name, options.normalized())


def served_by(table: RoutingTable, host: str, path: str = "/") -> str | None:
    match = table.lookup(host, path)
    return None if match is None else match.service.name


class SplitHostPortTests(unittest.TestCase):
    """Go's net.SplitHostPort, case by case."""

    def test_cases(self) -> None:
        cases = {
            "example.com:80": ("example.com", "80"),
            "example.com:": ("example.com", ""),
            "[::1]:8080": ("::1", "8080"),
            "[::1]:": ("::1", ""),
            ":80": ("", "80"),
            "example.com": None,
            "::1": None,
            "a:b:c": None,
            "[::1]": None,
            "[::1]x:80": None,
            "[::1]:80:90": None,
            "[::1": None,
            "a[b:80": None,
            "a]b:80": None,
            "[a]]:80": None,
            "[a[b]:80": None,
        }
        for hostport, expected in cases.items():
            self.assertEqual(split_host_port(hostport), expected, hostport)

    def test_host_without_port(self) -> None:
        cases = {
            "example.com:80": "example.com",
            "dummy.example.com:8080": "dummy.example.com",
            "[::1]:8080": "::1",
            "127.0.0.1:9999": "127.0.0.1",
            "example.com": "example.com",
            ":80": ":80",  # colon at position 0: used as is
            "::1": "::1",  # does not split: used as is
            "a:b:c": "a:b:c",
            "": "",
            "example.com:": "example.com",
        }
        for host, expected in cases.items():
            self.assertEqual(host_without_port(host), expected, host)

    @given(st.one_of(st.text(), st.text(alphabet="ab.:[]1", max_size=10)))
    def test_agrees_with_split_host_port(self, host: str) -> None:
        split = split_host_port(host) if host.find(":") > 0 else None
        self.assertEqual(host_without_port(host), host if split is None else split[0])


class HostRoutingTests(unittest.TestCase):
    """SPEC §6.3 host levels: scenarios 5-9, 16, 19, 22-25, 154 and §21.1 items 4-6."""

    def test_multiple_hosts(self) -> None:
        # Scenario 5
        table = RoutingTable.build([svc("service1", "1.example.com,2.example.com")])
        self.assertEqual(served_by(table, "1.example.com"), "service1")
        self.assertEqual(served_by(table, "2.example.com"), "service1")
        self.assertIsNone(served_by(table, "3.example.com"))

    def test_redeploy_changes_hosts(self) -> None:
        # Scenario 6 (and 16): the table is rebuilt from the updated service.
        service = svc("service1", "1.example.com,2.example.com")
        RoutingTable.build([service])
        service.options = svc("service1", "3.example.com,2.example.com").options
        table = RoutingTable.build([service])
        self.assertIsNone(served_by(table, "1.example.com"))
        self.assertEqual(served_by(table, "2.example.com"), "service1")
        self.assertEqual(served_by(table, "3.example.com"), "service1")

        service.options = svc("service1", "dummy2.example.com").options
        table = RoutingTable.build([service])
        self.assertEqual(served_by(table, "dummy2.example.com"), "service1")
        self.assertIsNone(served_by(table, "dummy.example.com"))

    def test_unknown_host(self) -> None:
        # Scenario 7
        table = RoutingTable.build([svc("service1", "dummy.example.com")])
        self.assertIsNone(served_by(table, "other.example.com"))

    def test_port_is_ignored(self) -> None:
        # Scenario 8
        table = RoutingTable.build([svc("service1", "dummy.example.com")])
        self.assertEqual(served_by(table, "dummy.example.com:80"), "service1")
        self.assertEqual(served_by(table, "dummy.example.com:8080"), "service1")

    def test_ipv6_host_with_port(self) -> None:
        table = RoutingTable.build([svc("v6", "::1")])
        self.assertEqual(served_by(table, "[::1]:8080"), "v6")
        self.assertEqual(served_by(table, "::1"), "v6")

    def test_catch_all(self) -> None:
        # Scenario 9 and 154 (catch-all serves anything, also no Host at all)
        table = RoutingTable.build([svc("service1")])
        for host in ["dummy.example.com", "127.0.0.1", "127.0.0.1:8080", "x", "", "[::1]:1"]:
            self.assertEqual(served_by(table, host), "service1", host)

    def test_each_host_its_service(self) -> None:
        # Scenario 19
        table = RoutingTable.build([svc("s1", "s1.example.com"), svc("s2", "s2.example.com")])
        self.assertEqual(served_by(table, "s1.example.com"), "s1")
        self.assertEqual(served_by(table, "s2.example.com"), "s2")

    def test_wildcards_and_fallback(self) -> None:
        # Scenario 22
        table = RoutingTable.build(
            [
                svc("first", "*.first.example.com"),
                svc("second", "*.second.example.com"),
                svc("fallback"),
            ]
        )
        self.assertEqual(served_by(table, "app.first.example.com"), "first")
        self.assertEqual(served_by(table, "api.second.example.com"), "second")
        self.assertEqual(served_by(table, "something-else.example.com"), "fallback")

    def test_specific_host_and_catch_all(self) -> None:
        # Scenario 23
        table = RoutingTable.build([svc("first", "s1.example.com"), svc("second")])
        self.assertEqual(served_by(table, "s1.example.com"), "first")
        self.assertEqual(served_by(table, "s2.example.com"), "second")
        self.assertEqual(served_by(table, "s3.example.com"), "second")

    def test_host_hierarchy(self) -> None:
        # Scenario 24
        table = RoutingTable.build(
            [
                svc("1", "example.com"),
                svc("2", "app.example.com"),
                svc("3", "api.example.com"),
                svc("4", "*.example.com"),
                svc("5"),
            ]
        )
        expected = {
            "example.com": "1",
            "app.example.com": "2",
            "api.example.com": "3",
            "anything.example.com": "4",
            "extra.level.example.com": "5",
            "other.com": "5",
        }
        for host, name in expected.items():
            self.assertEqual(served_by(table, host), name, host)

    def test_no_wildcard_for_parent(self) -> None:
        # Scenario 25
        table = RoutingTable.build([svc("1", "example.com")])
        self.assertIsNone(served_by(table, "app.example.com"))

    def test_host_matching_is_byte_exact(self) -> None:
        # Scenario 154, §21.1 items 6 and 36
        table = RoutingTable.build([svc("1", "example.com"), svc("w", "*.example.com")])
        self.assertEqual(served_by(table, "example.com"), "1")
        self.assertIsNone(served_by(table, "EXAMPLE.COM"))
        self.assertIsNone(served_by(table, "example.com."))
        self.assertEqual(served_by(table, "app.example.com"), "w")
        self.assertEqual(served_by(table, "api.example.com:8080"), "w")
        self.assertIsNone(served_by(table, "a.b.example.com"))
        self.assertIsNone(served_by(table, "APP.EXAMPLE.COM"))

    def test_wildcard_is_textual(self) -> None:
        # §21.1 item 5: "*.com" matches example.com; only one label is replaced.
        table = RoutingTable.build([svc("com", "*.com")])
        self.assertEqual(served_by(table, "example.com"), "com")
        self.assertIsNone(served_by(table, "www.example.com"))
        self.assertIsNone(served_by(table, ".com"))

    def test_no_fall_through_between_levels(self) -> None:
        # §21.1 item 4: an exact host with only /api bound is a 404 for /.
        table = RoutingTable.build(
            [svc("api", "app.example.com", "/api"), svc("wild", "*.example.com"), svc("all")]
        )
        self.assertEqual(served_by(table, "app.example.com", "/api/x"), "api")
        self.assertIsNone(served_by(table, "app.example.com", "/"))
        self.assertEqual(served_by(table, "other.example.com", "/"), "wild")
        table = RoutingTable.build([svc("api", "*.example.com", "/api"), svc("all")])
        self.assertIsNone(served_by(table, "app.example.com", "/"))
        self.assertEqual(served_by(table, "example.org", "/"), "all")

    def test_configured_host_with_port_never_matches(self) -> None:
        # §21.1 item 31
        table = RoutingTable.build([svc("p", "example.com:8080")])
        self.assertIsNone(served_by(table, "example.com:8080"))
        self.assertIsNone(served_by(table, "example.com"))

    def test_empty_table(self) -> None:
        table: RoutingTable[FakeService] = RoutingTable.build([])
        self.assertIsNone(table.lookup("example.com", "/"))
        self.assertIsNone(table.service_for_tls_name("example.com"))
        self.assertEqual(table.default_tls_host, "")


class PathRoutingTests(unittest.TestCase):
    """SPEC §6.3 prefixes: scenarios 26-31."""

    def test_prefix_levels(self) -> None:
        # Scenario 26
        table = RoutingTable.build(
            [
                svc("1", "example.com", "/"),
                svc("2", "example.com", "/api"),
                svc("3", "example.com", "/api/special"),
                svc("4", "other.example.com", "/api"),
                svc("5", "", "/api"),
                svc("6", "", "/"),
            ]
        )
        expected = [
            ("example.com", "/", "1"),
            ("example.com", "/random", "1"),
            ("example.com", "/apiary", "1"),
            ("example.com", "/api", "2"),
            ("example.com", "/api/special", "3"),
            ("other.example.com", "/api/test", "4"),
            ("second.example.com", "/api/test", "5"),
            ("second.example.com", "/non-api/test", "6"),
        ]
        for host, path, name in expected:
            self.assertEqual(served_by(table, host, path), name, (host, path))

    def test_matched_prefix(self) -> None:
        # Scenario 27: the matched prefix is what the proxy strips.
        table = RoutingTable.build(
            [
                svc("service1", "example.com", "/"),
                svc("service2", "example.com", "/app"),
                svc("service3", "example.com", "/api/internal"),
            ]
        )
        expected = [
            ("/app/show", "service2", "/app"),
            ("/app", "service2", "/app"),
            ("/app/", "service2", "/app"),
            ("/api/internal/something", "service3", "/api/internal"),
            ("/api/external/something", "service1", "/"),
            ("/appointment", "service1", "/"),
        ]
        for path, name, prefix in expected:
            match = table.lookup("example.com", path)
            self.assertIsNotNone(match)
            self.assertEqual((match.service.name, match.prefix), (name, prefix), path)

    def test_no_root_service(self) -> None:
        # Scenario 28
        table = RoutingTable.build(
            [svc("first", "example.com", "/first"), svc("second", "example.com", "/second")]
        )
        self.assertEqual(served_by(table, "example.com", "/first"), "first")
        self.assertEqual(served_by(table, "example.com", "/second"), "second")
        self.assertIsNone(served_by(table, "example.com", "/third"))
        self.assertIsNone(served_by(table, "example.com", "/"))

    def test_catch_all_prefixes_and_host_prefix(self) -> None:
        # Scenario 29
        table = RoutingTable.build(
            [
                svc("first", "", "/first"),
                svc("second", "", "/second"),
                svc("third", "third.example.com", "/second"),
            ]
        )
        self.assertEqual(served_by(table, "example.com", "/first"), "first")
        self.assertEqual(served_by(table, "example.com", "/second"), "second")
        self.assertEqual(served_by(table, "third.example.com", "/second/path"), "third")
        self.assertIsNone(served_by(table, "example.com", "/"))

    def test_paused_services_routing(self) -> None:
        # Scenario 30 (routing half): health paths reach the right service.
        table = RoutingTable.build([svc("api", "", "/api"), svc("admin", "", "/admin")])
        self.assertEqual(table.lookup("x", "/api/up").prefix, "/api")
        self.assertEqual(served_by(table, "x", "/admin/up"), "admin")
        self.assertEqual(served_by(table, "x", "/api/other"), "api")

    def test_prefix_normalization(self) -> None:
        # Scenario 31 (and §6.1)
        self.assertEqual(svc("a", "", "api/").options.path_prefixes, ["/api"])
        self.assertEqual(svc("a", "", "/").options.path_prefixes, ["/"])
        self.assertEqual(svc("a").options.path_prefixes, ["/"])
        self.assertEqual(
            normalize_path_prefixes(["//", "", "/a//b/", "API"]), ["/", "/", "/a//b", "/API"]
        )
        # The table normalizes too, should a caller hand it raw options.
        raw = FakeService("raw", ServiceOptions(hosts=[], path_prefixes=["api/"]))
        table = RoutingTable.build([raw])
        self.assertEqual(table.lookup("any", "/api/x").prefix, "/api")

    def test_prefix_boundaries(self) -> None:
        table = RoutingTable.build([svc("app", "", "/app")])
        for path in ["/app", "/app/", "/app/x", "/app//x"]:
            self.assertEqual(served_by(table, "h", path), "app", path)
        for path in ["/appointment", "/", "", "app", "/ap", "*"]:
            self.assertIsNone(served_by(table, "h", path), path)

    def test_root_matches_only_slash_paths(self) -> None:
        table = RoutingTable.build([svc("root")])
        self.assertEqual(served_by(table, "h", ""), "root")  # empty path is "/"
        self.assertIsNone(served_by(table, "h", "*"))  # OPTIONS * has no leading slash

    def test_multiple_prefixes_one_service(self) -> None:
        table = RoutingTable.build([svc("multi", "example.com", "/api,/app")])
        self.assertEqual(table.lookup("example.com", "/api/x").prefix, "/api")
        self.assertEqual(table.lookup("example.com", "/app").prefix, "/app")
        self.assertIsNone(table.lookup("example.com", "/"))


class ConflictTests(unittest.TestCase):
    """SPEC §6.6: scenarios 17, 18, 131, 132."""

    def test_same_host_other_service(self) -> None:
        # Scenario 17
        table = RoutingTable.build([svc("service1", "example.com")])
        conflict = table.conflicting_service("service2", svc("service2", "example.com").options)
        self.assertEqual(conflict.name, "service1")
        self.assertEqual(served_by(table, "example.com"), "service1")

    def test_two_catch_alls(self) -> None:
        # Scenario 18
        table = RoutingTable.build([svc("service1")])
        self.assertEqual(table.conflicting_service("service12", svc("x").options).name, "service1")

    def test_matrix(self) -> None:
        # Scenario 131
        table = RoutingTable.build(
            [
                svc("1", "example.com"),
                svc("2", "app.example.com"),
                svc("3", "app.example.com", "/api"),
            ]
        )

        def conflict(name: str, hosts: str, prefixes: str = "") -> str | None:
            found = table.conflicting_service(name, svc(name, hosts, prefixes).options)
            return None if found is None else found.name

        self.assertIsNone(conflict("2", "app.example.com"))
        self.assertIsNone(conflict("4", "api.example.com"))
        self.assertIsNone(conflict("4", ""))
        self.assertIsNone(conflict("4", "app.example.com", "/app"))
        self.assertIsNone(conflict("3", "app.example.com", "/api"))
        self.assertEqual(conflict("4", "app.example.com"), "2")
        self.assertEqual(conflict("4", "app.example.com", "/api"), "3")
        self.assertEqual(conflict("4", "app.example.com", "api/"), "3")  # normalized first
        self.assertEqual(conflict("4", "other.com,example.com"), "1")

    def test_catch_all_does_not_block_specific_host(self) -> None:
        # Scenario 132 and the §6.6 consequences
        table = RoutingTable.build([svc("1"), svc("w", "*.example.com"), svc("r", "example.com")])
        self.assertIsNone(table.conflicting_service("2", svc("2", "app.example.com").options))
        self.assertIsNone(table.conflicting_service("3", svc("3", "example.com", "/api").options))
        self.assertEqual(
            table.conflicting_service("4", svc("4", "*.example.com").options).name, "w"
        )


class TLSInheritanceTests(unittest.TestCase):
    """SPEC §6.5: scenarios 32, 44."""

    def test_inherits_from_root_and_resets_when_removed(self) -> None:
        # Scenario 32
        root = svc("root", "1.example.com", tls=True, redirect=False)
        api = svc("api", "1.example.com", "/api")
        RoutingTable.build([root, api])
        self.assertEqual((api.options.tls_enabled, api.options.tls_redirect), (True, False))
        RoutingTable.build([api])
        self.assertEqual((api.options.tls_enabled, api.options.tls_redirect), (False, True))

    def test_root_services_keep_their_settings(self) -> None:
        root = svc("root", "example.com", tls=True, redirect=False)
        both = svc("both", "other.com", "/api,/", tls=True, redirect=True)
        RoutingTable.build([root, both])
        self.assertEqual((root.options.tls_enabled, root.options.tls_redirect), (True, False))
        self.assertEqual((both.options.tls_enabled, both.options.tls_redirect), (True, True))

    def test_inherits_only_from_the_same_host_key(self) -> None:
        # The non-root service's own binding makes its first host an existing exact level,
        # so (no fall-through) only a root service on the identical host key is found.
        wild = svc("wild", "*.example.com", tls=True, redirect=False)
        api = svc("api", "app.example.com", "/api")
        wild_api = svc("wild_api", "*.example.com", "/api")
        RoutingTable.build([wild, api, wild_api])
        self.assertEqual((api.options.tls_enabled, api.options.tls_redirect), (False, True))
        self.assertEqual(
            (wild_api.options.tls_enabled, wild_api.options.tls_redirect), (True, False)
        )

        catch_all = svc("all", redirect=False)
        api2 = svc("api2", "", "/api", tls=True)  # as restored from a file: overwritten
        RoutingTable.build([catch_all, api2])
        self.assertEqual((api2.options.tls_enabled, api2.options.tls_redirect), (False, False))

    def test_no_fall_through_for_inheritance(self) -> None:
        # The exact host level exists (only /api), so the TLS catch-all root is not used.
        api = svc("api", "app.example.com", "/api")
        RoutingTable.build([svc("all", tls=True, redirect=False), api])
        self.assertEqual((api.options.tls_enabled, api.options.tls_redirect), (False, True))

    def test_uses_first_host(self) -> None:
        api = svc("api", "b.example.com,a.example.com", "/api")
        RoutingTable.build([svc("a", "a.example.com", tls=True, redirect=False), api])
        self.assertEqual((api.options.tls_enabled, api.options.tls_redirect), (False, True))
        api = svc("api", "a.example.com,b.example.com", "/api")
        RoutingTable.build([svc("a", "a.example.com", tls=True, redirect=False), api])
        self.assertEqual((api.options.tls_enabled, api.options.tls_redirect), (True, False))

    def test_state_persistence_scenario(self) -> None:
        # Scenario 44 (routing half)
        default = svc("default")
        other1 = svc("other1", "other.example.com", tls=True, redirect=True)
        other2 = svc("other2", "other.example.com", "/api")
        table = RoutingTable.build([default, other1, other2])
        self.assertEqual(served_by(table, "something.example.com"), "default")
        self.assertEqual(served_by(table, "other.example.com", "/"), "other1")
        self.assertEqual(served_by(table, "other.example.com", "/api"), "other2")
        self.assertEqual((other2.options.tls_enabled, other2.options.tls_redirect), (True, True))

    def test_validation_forbids_tls_on_non_root(self) -> None:
        # Scenario 33 (the rule lives in options.py; checked here for the routing contract)
        options = ServiceOptions(hosts=["example.com"], path_prefixes=["/api"], tls_enabled=True)
        with self.assertRaises(OptionsError) as ctx:
            validate_service_options(options)
        self.assertEqual(
            str(ctx.exception),
            "service options invalid: TLS settings must be specified on the root path service",
        )


class DefaultTLSHostTests(unittest.TestCase):
    """SPEC §6.7, §21.1 item 7, scenario 97."""

    def test_scenario_97(self) -> None:
        s1 = svc("1", "example.com")
        s2 = svc("2", "other.example.com")
        table = RoutingTable.build([s1, s2])
        self.assertEqual(table.default_tls_host, "")

        s1.options = svc("1", "example.com", tls=True).options
        table = RoutingTable.build([s1, s2], table.default_tls_host)
        self.assertEqual(table.default_tls_host, "example.com")

        on_demand = svc("od", tls=True, on_demand="/allow")
        table = RoutingTable.build([s1, s2, on_demand], table.default_tls_host)
        self.assertEqual(table.default_tls_host, "example.com")
        table = RoutingTable.build([s1, s2, on_demand], table.default_tls_host)
        self.assertEqual(table.default_tls_host, "example.com")

    def test_on_demand_alone_never_default(self) -> None:
        table = RoutingTable.build([svc("od", tls=True, on_demand="/allow")])
        self.assertEqual(table.default_tls_host, "")

    def test_sticky_and_never_cleared(self) -> None:
        a = svc("a", "a.example.com", tls=True)
        b = svc("b", "b.example.com", tls=True)
        table = RoutingTable.build([b], "")
        self.assertEqual(table.default_tls_host, "b.example.com")
        # An earlier-ordered TLS service does not displace a default that is still valid.
        table = RoutingTable.build([a, b], table.default_tls_host)
        self.assertEqual(table.default_tls_host, "b.example.com")
        # Removing the default's service moves it to the first remaining TLS service.
        table = RoutingTable.build([a], table.default_tls_host)
        self.assertEqual(table.default_tls_host, "a.example.com")
        # No TLS service left: the previous value is kept.
        table = RoutingTable.build([svc("plain", "p.example.com")], table.default_tls_host)
        self.assertEqual(table.default_tls_host, "a.example.com")
        table = RoutingTable.build([], table.default_tls_host)
        self.assertEqual(table.default_tls_host, "a.example.com")

    def test_deterministic_first_in_deploy_order(self) -> None:
        a = svc("a", "a.example.com", tls=True)
        b = svc("b", "b.example.com", tls=True)
        self.assertEqual(RoutingTable.build([a, b]).default_tls_host, "a.example.com")
        self.assertEqual(RoutingTable.build([b, a]).default_tls_host, "b.example.com")
        # A stale previous value that is no longer a candidate is replaced.
        self.assertEqual(RoutingTable.build([a, b], "gone.com").default_tls_host, "a.example.com")


class TLSNameTests(unittest.TestCase):
    """SPEC §16.1 step 2."""

    def test_service_for_tls_name(self) -> None:
        exact = svc("exact", "example.com", tls=True)
        wild = svc("wild", "*.example.com", tls=True)
        api = svc("api", "api.example.com", "/api")
        table = RoutingTable.build([exact, wild, api, svc("all")])
        self.assertIs(table.service_for_tls_name("example.com"), exact)
        self.assertIs(table.service_for_tls_name("www.example.com"), wild)
        self.assertIsNone(table.service_for_tls_name("api.example.com"))  # no fall-through
        self.assertEqual(table.service_for_tls_name("other.org").name, "all")
        self.assertIs(table.service_for_tls_name("EXAMPLE.COM."), table.services[-1])


# -- properties -------------------------------------------------------------------------------

_LABELS = st.sampled_from(["a", "b", "app", "api", "example", "com", "*"])
_HOSTS = st.one_of(
    st.just(""),
    st.lists(_LABELS, min_size=1, max_size=4).map(".".join),
)
_SEGMENTS = st.sampled_from(["a", "b", "api", "app", "ap", "x", ""])
_PREFIXES = st.lists(_SEGMENTS, min_size=0, max_size=3).map(lambda parts: "/" + "/".join(parts))
_PATHS = st.one_of(
    st.lists(_SEGMENTS, max_size=4).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=20),
)
_SERVICES = st.lists(
    st.tuples(st.lists(_HOSTS, max_size=3), st.lists(_PREFIXES, max_size=3)),
    max_size=6,
)


def _reference_lookup(services: list[FakeService], host: str, path: str):
    """A slow, literal transcription of SPEC §6.3 to compare the table with."""
    if ":" in host and host.index(":") > 0:
        split = split_host_port(host)
        if split is not None:
            host = split[0]

    def bindings(key: str) -> list[tuple[str, FakeService]]:
        found = [
            (prefix, s)
            for s in services
            for h in (s.options.hosts or [""])
            for prefix in s.options.path_prefixes
            if h == key
        ]
        return sorted(found, key=lambda b: -len(b[0]))

    chosen = bindings(host)
    if not chosen and host.find(".") > 0:
        chosen = bindings("*" + host[host.find(".") :])
    if not chosen:
        chosen = bindings("")
    slashed = path if path.endswith("/") else path + "/"
    for prefix, s in chosen:
        if slashed.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return s, prefix
    return None


def _build(spec) -> list[FakeService]:
    return [svc(f"s{i}", hosts, prefixes) for i, (hosts, prefixes) in enumerate(spec)]


class PropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(_SERVICES, _HOSTS, st.sampled_from(["", ":80", ":", ":x:y"]), _PATHS)
    def test_matches_reference(self, spec, host, port, path) -> None:
        services = _build(spec)
        table = RoutingTable.build(services)
        match = table.lookup(host + port, path)
        expected = _reference_lookup(services, host + port, path)
        if expected is None:
            self.assertIsNone(match)
        else:
            self.assertIsNotNone(match)
            self.assertEqual((match.service, match.prefix), expected)

    @settings(max_examples=200, deadline=None)
    @given(_SERVICES, st.data())
    def test_path_under_prefix_matches_it_or_longer(self, spec, data) -> None:
        services = _build(spec)
        if not services:
            return
        table = RoutingTable.build(services)
        service = data.draw(st.sampled_from(services))
        host = data.draw(st.sampled_from(service.options.hosts))
        prefix = data.draw(st.sampled_from(service.options.path_prefixes))
        suffix = data.draw(st.sampled_from(["", "/", "/x", "/x/y"]))
        path = prefix.rstrip("/") + suffix if prefix != "/" else "/" + suffix.lstrip("/")
        match = table.lookup(host, path)
        self.assertIsNotNone(match)
        self.assertGreaterEqual(len(match.prefix), len(prefix))
        self.assertTrue((path.rstrip("/") + "/").startswith(match.prefix.rstrip("/") + "/"))
        if len(match.prefix) == len(prefix):
            self.assertEqual(match.prefix, prefix)

    @given(st.text(), st.text())
    def test_lookup_never_raises(self, host, path) -> None:
        table = RoutingTable.build(
            [svc("a", "example.com"), svc("w", "*.example.com", "/api"), svc("all", "", "/x")]
        )
        match = table.lookup(host, path)
        self.assertTrue(match is None or match.service.name in ("a", "w", "all"))
        table.service_for_tls_name(host)

    @given(st.lists(st.text(), max_size=5))
    def test_prefix_normalization_idempotent(self, prefixes) -> None:
        once = normalize_path_prefixes(prefixes)
        self.assertEqual(normalize_path_prefixes(once), once)
        for prefix in once:
            self.assertTrue(prefix.startswith("/"))
            self.assertTrue(prefix == "/" or not prefix.endswith("/"))

    @settings(max_examples=200, deadline=None)
    @given(_SERVICES, st.lists(_HOSTS, max_size=3), st.lists(_PREFIXES, max_size=3))
    def test_conflict_iff_identical_binding(self, spec, hosts, prefixes) -> None:
        services = _build(spec)
        table = RoutingTable.build(services)
        candidate = svc("new", hosts, prefixes)
        pairs = {(h, p) for h in candidate.options.hosts for p in candidate.options.path_prefixes}
        owners = [
            s
            for s in services
            if pairs & {(h, p) for h in s.options.hosts for p in s.options.path_prefixes}
        ]
        found = table.conflicting_service("new", candidate.options)
        if owners:
            self.assertIn(found, owners)
        else:
            self.assertIsNone(found)
        # A service never conflicts with itself (only with another owner of a binding).
        for s in services:
            self.assertIsNot(table.conflicting_service(s.name, s.options), s)
