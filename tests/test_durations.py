"""Tests for kamal_proxy.durations: Go's ``time.ParseDuration`` and ``Duration.String``."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from kamal_proxy.durations import (
    HOUR,
    MICROSECOND,
    MILLISECOND,
    MINUTE,
    SECOND,
    DurationError,
    format_duration,
    parse_duration,
)

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


class ParseTests(unittest.TestCase):
    def assertParses(self, text: str, ns: int) -> None:
        self.assertEqual(parse_duration(text), ns, text)

    def assertRejects(self, text: str, message: str) -> None:
        with self.assertRaises(DurationError) as cm:
            parse_duration(text)
        self.assertEqual(str(cm.exception), message)

    def test_every_unit(self) -> None:
        self.assertParses("7ns", 7)
        self.assertParses("7us", 7 * MICROSECOND)
        self.assertParses("7\u00b5s", 7 * MICROSECOND)  # MICRO SIGN
        self.assertParses("7\u03bcs", 7 * MICROSECOND)  # GREEK SMALL LETTER MU
        self.assertParses("7ms", 7 * MILLISECOND)
        self.assertParses("7s", 7 * SECOND)
        self.assertParses("7m", 7 * MINUTE)
        self.assertParses("7h", 7 * HOUR)

    def test_several_groups(self) -> None:
        self.assertParses("1m30s", 90 * SECOND)
        self.assertParses("1h2m3s4ms5us6ns", HOUR + 2 * MINUTE + 3 * SECOND + 4005006)
        # Groups need not be ordered or distinct.
        self.assertParses("1s1h", HOUR + SECOND)
        self.assertParses("1s1s", 2 * SECOND)

    def test_fractions(self) -> None:
        self.assertParses("1.5s", 1500 * MILLISECOND)
        self.assertParses("1.5h", 90 * MINUTE)
        self.assertParses(".5s", 500 * MILLISECOND)
        self.assertParses("1.s", SECOND)
        self.assertParses("0.000000001s", 1)
        self.assertParses("1.0000000001s", SECOND)  # below a nanosecond: truncated
        self.assertParses("0.1ns", 0)
        self.assertParses("1.5us", 1500)
        self.assertParses("2.25ms", 2250 * MICROSECOND)

    def test_fraction_uses_go_float_arithmetic(self) -> None:
        # Go computes a fraction as uint64(float64(f) * (float64(unit) / scale)).
        self.assertParses("0.3333333333333333h", 1200000000000)
        self.assertEqual(format_duration(parse_duration("0.3333333333333333h")), "20m0s")

    def test_signs(self) -> None:
        self.assertParses("-1.5s", -1500 * MILLISECOND)
        self.assertParses("+30s", 30 * SECOND)
        self.assertParses("-1m30s", -90 * SECOND)

    def test_bare_zero(self) -> None:
        self.assertParses("0", 0)
        self.assertParses("+0", 0)
        self.assertParses("-0", 0)
        self.assertParses("0s", 0)
        self.assertParses("0.0h", 0)

    def test_limits(self) -> None:
        self.assertParses("9223372036854775807ns", INT64_MAX)
        self.assertParses("2562047h47m16.854775807s", INT64_MAX)
        self.assertParses("-9223372036854775808ns", INT64_MIN)
        self.assertRejects(
            "9223372036854775808ns", 'time: invalid duration "9223372036854775808ns"'
        )
        self.assertRejects(
            "2562047h47m16.854775808s", 'time: invalid duration "2562047h47m16.854775808s"'
        )
        self.assertRejects("3000000h", 'time: invalid duration "3000000h"')
        self.assertRejects(
            "99999999999999999999s", 'time: invalid duration "99999999999999999999s"'
        )

    def test_invalid(self) -> None:
        for text in ["abc", "", "-", "+", "s", ".s", "-.s", "1s.", " 1s", "--1s", "-+1s"]:
            self.assertRejects(text, f'time: invalid duration "{text}"')

    def test_missing_unit(self) -> None:
        self.assertRejects("1", 'time: missing unit in duration "1"')
        self.assertRejects("1.5", 'time: missing unit in duration "1.5"')
        self.assertRejects("-30", 'time: missing unit in duration "-30"')
        self.assertRejects("00", 'time: missing unit in duration "00"')
        self.assertRejects("1s2", 'time: missing unit in duration "1s2"')

    def test_unknown_unit(self) -> None:
        self.assertRejects("1x", 'time: unknown unit "x" in duration "1x"')
        self.assertRejects("1sec", 'time: unknown unit "sec" in duration "1sec"')
        self.assertRejects("1S", 'time: unknown unit "S" in duration "1S"')
        self.assertRejects("1e3s", 'time: unknown unit "e" in duration "1e3s"')
        self.assertRejects("1s ", 'time: unknown unit "s " in duration "1s "')
        self.assertRejects("1d", 'time: unknown unit "d" in duration "1d"')
        # The unit runs up to the next digit or dot, so a sign inside is part of it.
        self.assertRejects("1s-1s", 'time: unknown unit "s-" in duration "1s-1s"')

    def test_quoting_like_go(self) -> None:
        # Go's time package escapes quotes and backslashes, and writes non-ASCII and
        # control characters as \x escapes of their UTF-8 bytes, in both quoted strings.
        self.assertRejects('1x"', 'time: unknown unit "x\\"" in duration "1x\\""')
        self.assertRejects("1x\\", 'time: unknown unit "x\\\\" in duration "1x\\\\"')
        self.assertRejects("1\u00e9", 'time: unknown unit "\\xc3\\xa9" in duration "1\\xc3\\xa9"')
        self.assertRejects("1\n", 'time: unknown unit "\\x0a" in duration "1\\x0a"')
        self.assertRejects('"', 'time: invalid duration "\\""')

    def test_error_is_value_error(self) -> None:
        self.assertRaises(ValueError, parse_duration, "abc")


class FormatTests(unittest.TestCase):
    def test_spec_examples(self) -> None:
        cases = {
            0: "0s",
            500 * MILLISECOND: "500ms",
            1500 * MICROSECOND: "1.5ms",
            30 * SECOND: "30s",
            90 * SECOND: "1m30s",
            2 * MINUTE: "2m0s",
            HOUR: "1h0m0s",
            1500 * MILLISECOND: "1.5s",
            -1500 * MILLISECOND: "-1.5s",
            -90 * SECOND: "-1m30s",
            -500 * MILLISECOND: "-500ms",
        }
        for ns, text in cases.items():
            self.assertEqual(format_duration(ns), text, ns)

    def test_small_units(self) -> None:
        self.assertEqual(format_duration(1), "1ns")
        self.assertEqual(format_duration(999), "999ns")
        self.assertEqual(format_duration(1000), "1\u00b5s")
        self.assertEqual(format_duration(1500), "1.5\u00b5s")
        self.assertEqual(format_duration(999999), "999.999\u00b5s")
        self.assertEqual(format_duration(MILLISECOND), "1ms")
        self.assertEqual(format_duration(SECOND - 1), "999.999999ms")
        self.assertEqual(format_duration(-1), "-1ns")

    def test_large_values(self) -> None:
        self.assertEqual(format_duration(SECOND + 1), "1.000000001s")
        self.assertEqual(format_duration(HOUR + SECOND), "1h0m1s")
        self.assertEqual(format_duration(25 * HOUR), "25h0m0s")
        self.assertEqual(format_duration(INT64_MAX), "2562047h47m16.854775807s")
        self.assertEqual(format_duration(INT64_MIN), "-2562047h47m16.854775808s")

    def test_defaults_shown_in_messages(self) -> None:
        self.assertEqual(format_duration(60 * SECOND), "1m0s")
        self.assertEqual(format_duration(5 * SECOND), "5s")
        self.assertEqual(format_duration(10 * MILLISECOND), "10ms")


class RoundTripTests(unittest.TestCase):
    @given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
    def test_parse_of_format_is_identity(self, ns: int) -> None:
        text = format_duration(ns)
        self.assertEqual(parse_duration(text), ns)
        self.assertEqual(format_duration(parse_duration(text)), text)

    @given(st.integers(min_value=-(10**13), max_value=10**13))
    def test_round_trip_common_range(self, ns: int) -> None:
        self.assertEqual(parse_duration(format_duration(ns)), ns)

    @given(
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=10**6),
                st.sampled_from(["ns", "us", "\u00b5s", "\u03bcs", "ms", "s", "m", "h"]),
            ),
            min_size=1,
            max_size=5,
        ),
        st.sampled_from(["", "+", "-"]),
    )
    def test_sum_of_groups(self, groups: list[tuple[int, str]], sign: str) -> None:
        scale = {"ns": 1, "us": MICROSECOND, "\u00b5s": MICROSECOND, "\u03bcs": MICROSECOND}
        scale.update({"ms": MILLISECOND, "s": SECOND, "m": MINUTE, "h": HOUR})
        text = sign + "".join(f"{n}{unit}" for n, unit in groups)
        total = sum(n * scale[unit] for n, unit in groups)
        if total > (INT64_MAX + 1 if sign == "-" else INT64_MAX):
            # Past int64 nanoseconds (about 2562047h; three groups of 10**6 h get there) Go's
            # ParseDuration refuses the text as it does any other invalid duration.
            with self.assertRaises(DurationError) as cm:
                parse_duration(text)
            self.assertTrue(str(cm.exception).startswith("time: invalid duration "), cm.exception)
        else:
            self.assertEqual(parse_duration(text), -total if sign == "-" else total)

    def test_sum_past_int64_example(self) -> None:
        # The example Hypothesis found: 2562048h is one hour past the largest duration.
        with self.assertRaises(DurationError) as cm:
            parse_duration("562048h1000000h1000000h")
        self.assertEqual(str(cm.exception), 'time: invalid duration "562048h1000000h1000000h"')
        self.assertEqual(parse_duration("-562047h1000000h1000000h"), -2562047 * HOUR)
