"""Conformance sweep, unit level: SPEC tables checked entry by entry (§3.2, §6.1, §8.1, §12.3)."""

from __future__ import annotations

from twisted.trial import unittest

from kamal_proxy.durations import DurationError, format_duration, parse_duration
from kamal_proxy.routing.rollout import fnv1a32, in_rollout_group, request_cookie, split_point
from kamal_proxy.service_options import (
    OptionsError,
    ServiceOptions,
    has_configured_hosts,
    normalize_hosts,
    normalize_path_prefixes,
    validate_service_options,
    validate_target_address,
)

MS = 1_000_000
S = 1_000_000_000


class DurationTableTests(unittest.TestCase):
    def test_formatting(self):
        """§3.2 Go duration formatting."""
        table = {
            0: "0s",
            1: "1ns",
            1500: "1.5µs",
            1_500_000: "1.5ms",
            500 * MS: "500ms",
            30 * S: "30s",
            90 * S: "1m30s",
            120 * S: "2m0s",
            3600 * S: "1h0m0s",
            1500 * MS: "1.5s",
            -1500 * MS: "-1.5s",
            20 * MS: "20ms",
        }
        for ns, text in table.items():
            self.assertEqual(format_duration(ns), text, ns)

    def test_parsing(self):
        """§3.2: sign, fractions, both micro signs, bare 0; unit-less and empty invalid."""
        table = {
            "0": 0,
            "+5s": 5 * S,
            "-1m30s": -90 * S,
            "1.5s": 1500 * MS,
            ".5s": 500 * MS,
            "1.s": S,
            "3µs": 3000,
            "3μs": 3000,
            "2us": 2000,
            "1h1m1s1ms": 3661 * S + MS,
        }
        for text, ns in table.items():
            self.assertEqual(parse_duration(text), ns, text)
        for text in ("", "5", "s", ".s", "1x", "1.5", "--1s", "1s2"):
            self.assertRaises(DurationError, parse_duration, text)


class RoutingOptionTableTests(unittest.TestCase):
    def test_normalization(self):
        """§6.1: hosts verbatim (duplicates, case kept); prefixes get one leading slash."""
        self.assertEqual(normalize_hosts([]), [""])
        self.assertEqual(normalize_hosts(["A.com", "A.com", ""]), ["A.com", "A.com", ""])
        self.assertEqual(
            normalize_path_prefixes(["api", "/api/", "//", "", "a/B//", "/x/y/"]),
            ["/api", "/api", "/", "/", "/a/B", "/x/y"],
        )
        self.assertEqual(normalize_path_prefixes([]), ["/"])

    def test_configured_hosts(self):
        """Scenario 57."""
        for hosts, expected in (
            ([], False),
            ([""], False),
            (["*.example.com", ""], False),
            (["example.com"], True),
            (["*.example.com"], True),
        ):
            self.assertEqual(has_configured_hosts(hosts), expected, hosts)

    def test_target_addresses(self):
        """§8.1 pattern, including the odd error spacing."""
        for ok in (
            "one",
            "ab",
            "web-1:3000",
            "localhost",
            "172.1.0.2:80",
            "a+b",
            "_x",
            "0123456789ab",
        ):
            validate_target_address(ok)
        for bad in ("", "_", "/", "a", "a:1", "host:", "::1", "[::1]:80", "http://x:1", "x y",
                    "-ab", "ab:1:2", "ab\n", "ab:80\n"):  # fmt: skip
            with self.assertRaises(OptionsError) as caught:
                validate_target_address(bad)
            self.assertEqual(str(caught.exception), f"{bad} :invalid host pattern")

    def test_validation_messages(self):
        """§3.6.4 order: on-demand URL without TLS is reported first; canonical list format."""
        with self.assertRaises(OptionsError) as caught:
            validate_service_options(
                ServiceOptions(tls_on_demand_url="ftp://x", canonical_host="c", hosts=["h"])
            )
        self.assertEqual(
            str(caught.exception),
            "service options invalid: TLS must be enabled to use a TLS on-demand URL",
        )
        with self.assertRaises(OptionsError) as caught:
            validate_service_options(
                ServiceOptions(hosts=["example.com", "www.example.com"], canonical_host="api")
            )
        self.assertEqual(
            str(caught.exception),
            "service options invalid: canonical-host 'api' must be present in the hosts list: "
            "[example.com www.example.com]",
        )
        with self.assertRaises(OptionsError) as caught:
            validate_service_options(
                ServiceOptions(hosts=["h.example.com"], tls_enabled=True, path_prefixes=["api/"])
            )
        self.assertEqual(
            str(caught.exception),
            "service options invalid: TLS settings must be specified on the root path service",
        )
        # TLS on a root prefix written as "//" is the root after normalization.
        validate_service_options(
            ServiceOptions(hosts=["h.example.com"], tls_enabled=True, path_prefixes=["//"])
        )


class RolloutTableTests(unittest.TestCase):
    def test_hashes_and_split_points(self):
        """§12.3 examples and §15.2's persisted split point."""
        self.assertEqual(fnv1a32(b"1"), 873244444)
        self.assertEqual(fnv1a32(b"2"), 923577301)
        self.assertEqual(fnv1a32(b"00001"), 1231224044)
        self.assertEqual(split_point(20), 858993459.0)
        self.assertEqual(split_point(100), 4294967295.0)
        self.assertEqual(split_point(0), 0.0)

    def test_group_membership(self):
        split = {"percentage": 0, "percentage_split_point": 0.0, "allowlist": ["1", "2"]}
        self.assertTrue(in_rollout_group(b"1", split))
        self.assertFalse(in_rollout_group(b"3", split))
        self.assertFalse(in_rollout_group(None, split))
        self.assertFalse(in_rollout_group(b"", split))
        everyone = {"percentage": 100, "percentage_split_point": split_point(100), "allowlist": []}
        self.assertTrue(in_rollout_group(b"anything", everyone))
        self.assertFalse(in_rollout_group(b"", everyone))

    def test_cookie_value(self):
        """§12.3: first cookie of that name, surrounding double quotes removed."""
        headers = [b'a=1; kamal-rollout="42"; kamal-rollout=7', b"kamal-rollout=9"]
        self.assertEqual(request_cookie(headers, b"kamal-rollout"), b"42")
        self.assertIsNone(request_cookie([b"other=1"], b"kamal-rollout"))
        self.assertIsNone(request_cookie(None, b"kamal-rollout"))
