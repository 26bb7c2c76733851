"""Cookie path scoping (SPEC §9.6), as a table plus properties."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from kamal_proxy.proxy.cookies import scope_set_cookie


class ScopeTests(unittest.TestCase):
    def test_spec_table(self):
        cases = [
            ("/api", b"s=1; Path=/", "example.com", b"s=1; Path=/api"),
            ("/api", b"s=1", "example.com", b"s=1; Path=/api"),
            ("/api", b"s=1; Path=/admin", "example.com", b"s=1; Path=/api/admin"),
            ("/app", b"s=1; Path=/foo", "example.com", b"s=1; Path=/app/foo"),
            (
                "/api",
                b"s=1; Path=/original; Domain=example.com",
                "example.com",
                b"s=1; Path=/api/original; Domain=example.com",
            ),
            ("/api", b"s=1; Path=/original; Domain=other.com", "example.com", None),
            ("/api", b"s=1; Path=/original; Domain=sub.example.com", "example.com", None),
            ("/api", b"s=1; Path=/original; Domain=example.com", "sub.example.com", None),
        ]
        for prefix, cookie, host, expected in cases:
            self.assertEqual(
                scope_set_cookie(cookie, prefix, host),
                cookie if expected is None else expected,
                (prefix, cookie, host),
            )

    def test_attributes_reserialized_in_go_order(self):
        self.assertEqual(
            scope_set_cookie(
                b"session=secret; HttpOnly; Secure; SameSite=Lax; Max-Age=60; Path=/x",
                "/app",
                "h",
            ),
            b"session=secret; Path=/app/x; Max-Age=60; HttpOnly; Secure; SameSite=Lax",
        )

    def test_unparseable_left_alone(self):
        for bad in (b"no-equals-sign", b"bad name=1; Path=/", b"=1; Path=/"):
            self.assertEqual(scope_set_cookie(bad, "/app", "h"), bad)

    @given(st.binary(max_size=80), st.sampled_from(["/a", "/api/v1"]))
    def test_never_raises_and_scoped_paths_start_with_prefix(self, raw, prefix):
        out = scope_set_cookie(raw, prefix, "example.com")
        self.assertIsInstance(out, bytes)
        if out != raw:
            self.assertIn(b"Path=" + prefix.encode(), out)
