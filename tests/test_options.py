"""Tests for kamal_proxy.service_options: validation, normalization, target addresses, JSON."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from kamal_proxy.service_options import (
    DEFAULT_MAX_MEMORY_BUFFER_SIZE,
    HealthCheckConfig,
    OptionsError,
    ServiceOptions,
    TargetOptions,
    has_configured_hosts,
    normalize_hosts,
    normalize_path_prefixes,
    parse_on_demand_url,
    validate_service_options,
    validate_target_address,
)
from tests.spec_keys import OPTION_KEYS, TARGET_OPTION_KEYS

PREFIX = "service options invalid: "


def invalid(**kwargs: object) -> str:
    """The message validate_service_options raises for these options."""
    try:
        validate_service_options(ServiceOptions(**kwargs))
    except OptionsError as e:
        return str(e)
    raise AssertionError(f"expected {kwargs} to be invalid")


def valid(**kwargs: object) -> None:
    validate_service_options(ServiceOptions(**kwargs))


class HasConfiguredHostsTests(unittest.TestCase):
    def test_scenario_57(self) -> None:
        self.assertFalse(has_configured_hosts([]))
        self.assertFalse(has_configured_hosts([""]))
        self.assertFalse(has_configured_hosts(["*.example.com", ""]))
        self.assertTrue(has_configured_hosts(["example.com"]))
        self.assertTrue(has_configured_hosts(["*.example.com"]))

    def test_property(self) -> None:
        self.assertFalse(ServiceOptions().has_configured_hosts)
        self.assertTrue(ServiceOptions(hosts=["a.example.com"]).has_configured_hosts)


class ValidationTests(unittest.TestCase):
    def test_defaults_are_valid(self) -> None:
        valid()

    def test_tls_needs_hosts_scenario_58(self) -> None:
        for hosts in ([], [""], ["*.example.com", ""]):
            self.assertEqual(
                invalid(tls_enabled=True, hosts=hosts), PREFIX + "host must be set when using TLS"
            )
        valid(tls_enabled=True, hosts=["example.com"])
        valid(tls_enabled=True, hosts=["example.com", "*.example.com"])

    def test_canonical_host_scenario_58(self) -> None:
        self.assertEqual(
            invalid(hosts=["example.com", "www.example.com"], canonical_host="api.example.com"),
            PREFIX + "canonical-host 'api.example.com' must be present in the hosts list: "
            "[example.com www.example.com]",
        )
        valid(hosts=["example.com", "www.example.com"], canonical_host="www.example.com")
        valid(canonical_host="www.example.com")
        valid(hosts=[""], canonical_host="www.example.com")

    def test_canonical_host_checked_with_tls_too(self) -> None:
        self.assertEqual(
            invalid(tls_enabled=True, hosts=["a.example.com"], canonical_host="b.example.com"),
            PREFIX + "canonical-host 'b.example.com' must be present in the hosts list: "
            "[a.example.com]",
        )

    def test_on_demand_scenario_59(self) -> None:
        valid(tls_enabled=True, tls_on_demand_url="/allow-host")
        valid(tls_enabled=True, tls_on_demand_url="https://example.com/allow-host")
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="/allow-host", hosts=["example.com"]),
            PREFIX + "cannot set hosts when using a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="ftp://example.com/allow-host"),
            PREFIX + 'unsupported scheme "ftp" in tls-on-demand-url',
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="://invalid-url"),
            PREFIX + 'unable to parse tls-on-demand-url: parse "://invalid-url": '
            "missing protocol scheme",
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="//example.com/allow-host"),
            PREFIX + "tls-on-demand-url must be a path or an absolute http(s) URL",
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="/allow-host", path_prefixes=["/api"]),
            PREFIX + "TLS settings must be specified on the root path service",
        )
        self.assertEqual(
            invalid(tls_on_demand_url="/allow-host"),
            PREFIX + "TLS must be enabled to use a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(
                tls_enabled=True,
                tls_on_demand_url="/allow-host",
                tls_certificate_path="cert.pem",
                tls_private_key_path="key.pem",
            ),
            PREFIX + "cannot use a custom TLS certificate with a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="/allow-host", tls_private_key_path="k"),
            PREFIX + "cannot use a custom TLS certificate with a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="/x", canonical_host="example.com"),
            PREFIX + "cannot set a canonical host when using a TLS on-demand URL",
        )

    def test_on_demand_catch_all_host_is_not_configured(self) -> None:
        valid(tls_enabled=True, tls_on_demand_url="/allow-host", hosts=[""])
        valid(tls_enabled=True, tls_on_demand_url="/allow-host", hosts=["a.example.com", ""])

    def test_check_order(self) -> None:
        # The on-demand URL without TLS is reported before anything else.
        self.assertEqual(
            invalid(tls_on_demand_url="ftp://x", hosts=["a"], canonical_host="b"),
            PREFIX + "TLS must be enabled to use a TLS on-demand URL",
        )
        # Hosts, then certificate, then canonical host, then the URL itself.
        self.assertEqual(
            invalid(
                tls_enabled=True,
                tls_on_demand_url="ftp://x",
                hosts=["a.example.com"],
                tls_certificate_path="c",
                canonical_host="a.example.com",
            ),
            PREFIX + "cannot set hosts when using a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(
                tls_enabled=True,
                tls_on_demand_url="ftp://x",
                tls_certificate_path="c",
                canonical_host="a.example.com",
            ),
            PREFIX + "cannot use a custom TLS certificate with a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="ftp://x", canonical_host="a"),
            PREFIX + "cannot set a canonical host when using a TLS on-demand URL",
        )
        self.assertEqual(
            invalid(tls_enabled=True, tls_on_demand_url="ftp://x", path_prefixes=["/api"]),
            PREFIX + 'unsupported scheme "ftp" in tls-on-demand-url',
        )
        # Missing hosts come before the root-path rule.
        self.assertEqual(
            invalid(tls_enabled=True, path_prefixes=["/api"]),
            PREFIX + "host must be set when using TLS",
        )
        self.assertEqual(
            invalid(tls_enabled=True, hosts=["a.example.com"], path_prefixes=["/api"]),
            PREFIX + "TLS settings must be specified on the root path service",
        )

    def test_root_path_after_normalization(self) -> None:
        valid(tls_enabled=True, hosts=["a.example.com"], path_prefixes=["/api", "//"])
        valid(tls_enabled=True, hosts=["a.example.com"], path_prefixes=[""])
        valid(tls_enabled=True, hosts=["a.example.com"])

    def test_server_side_check_scenario_133(self) -> None:
        self.assertEqual(
            invalid(tls_enabled=True, hosts=[]), PREFIX + "host must be set when using TLS"
        )

    def test_validation_does_not_change_the_options(self) -> None:
        options = ServiceOptions(hosts=[], path_prefixes=["api/"])
        validate_service_options(options)
        self.assertEqual(options.hosts, [])
        self.assertEqual(options.path_prefixes, ["api/"])

    def test_is_a_value_error(self) -> None:
        self.assertRaises(ValueError, validate_service_options, ServiceOptions(tls_enabled=True))


class OnDemandURLTests(unittest.TestCase):
    def assertURLError(self, url: str, message: str) -> None:
        with self.assertRaises(OptionsError) as cm:
            parse_on_demand_url(url)
        self.assertEqual(str(cm.exception), message)

    def test_scenario_110(self) -> None:
        self.assertEqual(parse_on_demand_url("/allow-host"), ("local", "/allow-host"))
        self.assertEqual(
            parse_on_demand_url("/allow-host?token=abc"), ("local", "/allow-host?token=abc")
        )
        self.assertEqual(
            parse_on_demand_url("http://example.com/check"),
            ("external", "http://example.com/check"),
        )
        self.assertEqual(
            parse_on_demand_url("https://example.com/check"),
            ("external", "https://example.com/check"),
        )
        self.assertURLError(
            "://invalid-url",
            'unable to parse tls-on-demand-url: parse "://invalid-url": missing protocol scheme',
        )
        self.assertURLError(
            "allow-host",
            'unable to parse tls-on-demand-url: parse "allow-host": invalid URI for request',
        )
        self.assertURLError(
            "ftp://example.com/check", 'unsupported scheme "ftp" in tls-on-demand-url'
        )
        self.assertURLError("http://", "missing host in tls-on-demand-url")
        self.assertURLError(
            "//example.com/check", "tls-on-demand-url must be a path or an absolute http(s) URL"
        )

    def test_unparseable_host_is_an_options_error(self) -> None:
        # urlsplit raises a bare ValueError here; it must surface as a validation message.
        with self.assertRaises(OptionsError) as cm:
            parse_on_demand_url("http://[::1")
        self.assertTrue(
            str(cm.exception).startswith(
                'unable to parse tls-on-demand-url: parse "http://[::1": '
            ),
            str(cm.exception),
        )
        self.assertTrue(
            invalid(tls_enabled=True, tls_on_demand_url="http://[::1").startswith(
                PREFIX + "unable to parse tls-on-demand-url"
            )
        )

    @given(st.text())
    def test_never_raises_anything_but_options_error(self, url: str) -> None:
        try:
            kind, same = parse_on_demand_url(url)
        except OptionsError:
            return
        self.assertIn(kind, ("local", "external"))
        self.assertEqual(same, url)


class NormalizationTests(unittest.TestCase):
    def test_hosts(self) -> None:
        self.assertEqual(normalize_hosts([]), [""])
        self.assertEqual(
            normalize_hosts(["B.example.com", " x ", "B.example.com"]),
            ["B.example.com", " x ", "B.example.com"],
        )
        self.assertEqual(normalize_hosts([""]), [""])

    def test_path_prefixes_scenario_31(self) -> None:
        self.assertEqual(normalize_path_prefixes(["api/"]), ["/api"])
        self.assertEqual(normalize_path_prefixes(["/"]), ["/"])
        self.assertEqual(normalize_path_prefixes([]), ["/"])

    def test_path_prefix_rules(self) -> None:
        self.assertEqual(normalize_path_prefixes(["api"]), ["/api"])
        self.assertEqual(normalize_path_prefixes(["/api/"]), ["/api"])
        self.assertEqual(normalize_path_prefixes(["//"]), ["/"])
        self.assertEqual(normalize_path_prefixes([""]), ["/"])
        self.assertEqual(normalize_path_prefixes(["///A//b///"]), ["/A//b"])
        self.assertEqual(normalize_path_prefixes(["/a", "b/"]), ["/a", "/b"])

    def test_service_options_normalized_is_a_copy(self) -> None:
        options = ServiceOptions(path_prefixes=["api/"], exclude_metrics_paths=["/up"])
        copy = options.normalized()
        self.assertEqual(copy.hosts, [""])
        self.assertEqual(copy.path_prefixes, ["/api"])
        self.assertEqual(options.hosts, [])
        self.assertEqual(options.path_prefixes, ["api/"])
        copy.exclude_metrics_paths.append("/x")
        self.assertEqual(options.exclude_metrics_paths, ["/up"])
        # Everything else is kept as it was.
        self.assertEqual(copy.tls_redirect, True)
        self.assertEqual(copy.strip_prefix, True)
        self.assertEqual(copy.writer_affinity_timeout, options.writer_affinity_timeout)

    @given(st.lists(st.text()))
    def test_prefixes_idempotent(self, prefixes: list[str]) -> None:
        once = normalize_path_prefixes(prefixes)
        self.assertEqual(normalize_path_prefixes(once), once)
        self.assertEqual(len(once), max(1, len(prefixes)))
        for p in once:
            self.assertTrue(p.startswith("/"))
            self.assertFalse(p.startswith("//"))
            self.assertTrue(p == "/" or not p.endswith("/"))

    @given(st.lists(st.text()))
    def test_hosts_idempotent(self, hosts: list[str]) -> None:
        once = normalize_hosts(hosts)
        self.assertEqual(normalize_hosts(once), once)
        self.assertEqual(once, hosts or [""])

    @given(st.lists(st.text(max_size=8), max_size=4), st.lists(st.text(max_size=8), max_size=4))
    def test_service_options_idempotent(self, hosts: list[str], prefixes: list[str]) -> None:
        once = ServiceOptions(hosts=hosts, path_prefixes=prefixes).normalized()
        self.assertEqual(once.normalized(), once)


_WORD = "ABCXYZabcxyz0189_"
_HOST_CHARS = _WORD + "-.+"


class TargetAddressTests(unittest.TestCase):
    def assertInvalid(self, address: str) -> None:
        with self.assertRaises(OptionsError) as cm:
            validate_target_address(address)
        self.assertEqual(str(cm.exception), f"{address} :invalid host pattern")

    def test_scenario_77(self) -> None:
        for address in ("", "_", "/"):
            self.assertInvalid(address)
        for address in ("one", "two", "three"):
            validate_target_address(address)

    def test_scenario_141(self) -> None:
        for address in ("http://127.0.0.1:8000", "a", "127.0.0.1:abc", "/", "bad target"):
            self.assertInvalid(address)
        validate_target_address("localhost:8000")

    def test_spec_examples(self) -> None:
        for address in ("web-1:3000", "localhost", "172.1.0.2:80", "0123456789ab", "a_", "a+b"):
            validate_target_address(address)
        for address in ("[::1]:80", "::1", "ab:", "ab:80:81", "-ab", ".ab", "ab/up", "ünï"):
            self.assertInvalid(address)

    def test_no_trailing_newline(self) -> None:
        # Go's `$` only matches at the very end; Python's also matches before a final "\n".
        self.assertInvalid("one\n")
        self.assertInvalid("one:80\n")

    def test_ascii_only(self) -> None:
        # Go's \w and \d are ASCII.
        self.assertInvalid("a\u0663b")
        self.assertInvalid("ab:\u0663")
        self.assertInvalid("\u00e9t\u00e9")

    @given(
        st.sampled_from(_WORD),
        st.text(alphabet=_HOST_CHARS, min_size=1, max_size=20),
        st.one_of(st.just(""), st.integers(min_value=0, max_value=10**12).map(lambda p: f":{p}")),
    )
    def test_valid_pattern(self, first: str, rest: str, port: str) -> None:
        validate_target_address(first + rest + port)

    @given(
        st.text(alphabet=_HOST_CHARS, max_size=6),
        st.sampled_from("/ ?#@!*[]\n\t,;%\u00e9\u0663"),
        st.text(alphabet=_HOST_CHARS, max_size=6),
    )
    def test_invalid_characters(self, before: str, bad: str, after: str) -> None:
        self.assertInvalid("ab" + before + bad + after)
        self.assertInvalid("ab" + before + ":80" + bad + after)


_int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
_strs = st.lists(st.text(max_size=10), max_size=3)

health_checks = st.builds(
    HealthCheckConfig,
    path=st.text(max_size=10),
    port=st.integers(min_value=0, max_value=65535),
    interval=_int64,
    timeout=_int64,
    host=st.text(max_size=10),
)

service_options = st.builds(
    ServiceOptions,
    hosts=_strs,
    path_prefixes=_strs,
    tls_enabled=st.booleans(),
    tls_certificate_path=st.text(max_size=10),
    tls_private_key_path=st.text(max_size=10),
    tls_on_demand_url=st.text(max_size=10),
    tls_redirect=st.booleans(),
    canonical_host=st.text(max_size=10),
    acme_directory=st.text(max_size=10),
    acme_cache_path=st.text(max_size=10),
    error_page_path=st.text(max_size=10),
    strip_prefix=st.booleans(),
    writer_affinity_timeout=_int64,
    read_targets_accept_websockets=st.booleans(),
    exclude_metrics_paths=_strs,
    client_ip_header=st.text(max_size=10),
)

target_options = st.builds(
    TargetOptions,
    health_check_config=health_checks,
    response_timeout=_int64,
    buffer_requests=st.booleans(),
    buffer_responses=st.booleans(),
    max_memory_buffer_size=_int64,
    max_request_body_size=_int64,
    max_response_body_size=_int64,
    log_request_headers=_strs,
    log_response_headers=_strs,
    forward_headers=st.booleans(),
    scope_cookie_paths=st.booleans(),
)


class JSONTests(unittest.TestCase):
    def test_service_key_order(self) -> None:
        self.assertEqual(list(ServiceOptions().to_json()), OPTION_KEYS)

    def test_target_key_order(self) -> None:
        data = TargetOptions().to_json()
        self.assertEqual(list(data), TARGET_OPTION_KEYS)
        self.assertEqual(
            list(data["health_check_config"]), ["path", "port", "interval", "timeout", "host"]
        )

    def test_spec_example_values(self) -> None:
        options = ServiceOptions(
            hosts=["example.com"],
            path_prefixes=["/"],
            tls_enabled=True,
            acme_cache_path="/data/certs",
        )
        self.assertEqual(
            json.dumps(options.to_json()),
            '{"hosts": ["example.com"], "path_prefixes": ["/"], "tls_enabled": true, '
            '"tls_certificate_path": "", "tls_private_key_path": "", "tls_on_demand_url": "", '
            '"tls_redirect": true, "canonical_host": "", "acme_directory": "", '
            '"acme_cache_path": "/data/certs", "error_page_path": "", "strip_prefix": true, '
            '"writer_affinity_timeout": 1000000000, "read_targets_accept_websockets": false, '
            '"exclude_metrics_paths": null, "client_ip_header": ""}',
        )
        target = TargetOptions(
            buffer_requests=True,
            buffer_responses=True,
            log_request_headers=["Cache-Control", "Last-Modified", "User-Agent"],
            forward_headers=False,
        )
        self.assertEqual(
            json.dumps(target.to_json()),
            '{"health_check_config": {"path": "/up", "port": 0, "interval": 1000000000, '
            '"timeout": 5000000000, "host": ""}, "response_timeout": 30000000000, '
            '"buffer_requests": true, "buffer_responses": true, '
            f'"max_memory_buffer_size": {DEFAULT_MAX_MEMORY_BUFFER_SIZE}, '
            '"max_request_body_size": 0, "max_response_body_size": 0, '
            '"log_request_headers": ["Cache-Control", "Last-Modified", "User-Agent"], '
            '"log_response_headers": null, "forward_headers": false, "scope_cookie_paths": false}',
        )

    def test_missing_keys_take_go_zero_values(self) -> None:
        self.assertEqual(
            ServiceOptions.from_json({}),
            ServiceOptions(tls_redirect=False, strip_prefix=False, writer_affinity_timeout=0),
        )
        self.assertEqual(ServiceOptions.from_json(None), ServiceOptions.from_json({}))
        zero_health = HealthCheckConfig(path="", port=0, interval=0, timeout=0, host="")
        self.assertEqual(
            TargetOptions.from_json({}),
            TargetOptions(
                health_check_config=zero_health,
                response_timeout=0,
                max_memory_buffer_size=0,
                forward_headers=False,
            ),
        )

    def test_nulls_read_as_empty(self) -> None:
        data = ServiceOptions().to_json()
        data["hosts"] = None
        data["exclude_metrics_paths"] = None
        options = ServiceOptions.from_json(data)
        self.assertEqual(options.hosts, [])
        self.assertEqual(options.exclude_metrics_paths, [])

    def test_legacy_health_check_without_port_and_host(self) -> None:
        target = TargetOptions.from_json(
            {"health_check_config": {"path": "/up", "interval": 1000000000, "timeout": 5000000000}}
        )
        self.assertEqual(
            target.health_check_config,
            HealthCheckConfig(path="/up", port=0, interval=10**9, timeout=5 * 10**9, host=""),
        )

    @given(service_options)
    def test_service_round_trip(self, options: ServiceOptions) -> None:
        self.assertEqual(ServiceOptions.from_json(options.to_json()), options)
        self.assertEqual(
            ServiceOptions.from_json(json.loads(json.dumps(options.to_json()))), options
        )

    @given(target_options)
    def test_target_round_trip(self, options: TargetOptions) -> None:
        self.assertEqual(TargetOptions.from_json(options.to_json()), options)
        self.assertEqual(
            TargetOptions.from_json(json.loads(json.dumps(options.to_json()))), options
        )

    @given(service_options)
    def test_empty_lists_are_null(self, options: ServiceOptions) -> None:
        data = options.to_json()
        for key in ("hosts", "path_prefixes", "exclude_metrics_paths"):
            self.assertEqual(data[key], getattr(options, key) or None)
