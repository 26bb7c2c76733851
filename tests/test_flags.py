"""Tests for kamal_proxy.cli.flags: pflag value syntax, Go parse errors and the FlagSet parser."""

from __future__ import annotations

import csv

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from kamal_proxy.cli.flags import (
    BOOL,
    DURATION,
    INT,
    INT64,
    STRING,
    STRING_SLICE,
    Flag,
    FlagError,
    FlagSet,
    InvalidValue,
    go_quote,
    parse_bool,
    parse_go_duration,
    parse_int,
    read_csv_record,
    write_csv_record,
)

TRUE = ["1", "t", "T", "TRUE", "true", "True"]
FALSE = ["0", "f", "F", "FALSE", "false", "False"]
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


class BoolTests(unittest.TestCase):
    def test_accepted_spellings(self):
        for text in TRUE:
            self.assertIs(parse_bool(text), True)
        for text in FALSE:
            self.assertIs(parse_bool(text), False)

    @given(st.text().filter(lambda s: s not in TRUE + FALSE))
    def test_everything_else_is_rejected_with_go_text(self, text):
        with self.assertRaises(InvalidValue) as caught:
            parse_bool(text)
        self.assertEqual(
            str(caught.exception), f"strconv.ParseBool: parsing {go_quote(text)}: invalid syntax"
        )

    def test_yes_is_not_a_bool(self):
        with self.assertRaises(InvalidValue) as caught:
            parse_bool("yes")
        self.assertEqual(str(caught.exception), 'strconv.ParseBool: parsing "yes": invalid syntax')


class IntTests(unittest.TestCase):
    def test_base_detection(self):
        cases = {
            "8080": 8080,
            "+5": 5,
            "-12": -12,
            "0": 0,
            "-0": 0,
            "0x1F": 31,
            "0X1f": 31,
            "0o17": 15,
            "0O17": 15,
            "017": 15,
            "0b101": 5,
            "0B11": 3,
            "1_000_000": 1000000,
            "0x_1F": 31,
            "0_7": 7,
            "-0x10": -16,
            "9223372036854775807": INT64_MAX,
            "-9223372036854775808": INT64_MIN,
        }
        for text, value in cases.items():
            self.assertEqual(parse_int(text), value, text)

    def test_syntax_errors(self):
        for text in [
            "",
            "abc",
            "12abc",
            "0x",
            "0b",
            "08",
            "0b102",
            "1__0",
            "_1",
            "1_",
            "0x_",
            "1.5",
            " 1",
            "1 ",
            "--1",
            "+-1",
            "1e3",
            "٣",
        ]:
            with self.assertRaises(InvalidValue, msg=text) as caught:
                parse_int(text)
            self.assertEqual(
                str(caught.exception), f"strconv.ParseInt: parsing {go_quote(text)}: invalid syntax"
            )

    def test_out_of_range(self):
        for text in [
            "9223372036854775808",
            "-9223372036854775809",
            "0xffffffffffffffffff",
            "99999999999999999999999abc",
        ]:
            with self.assertRaises(InvalidValue) as caught:
                parse_int(text)
            self.assertEqual(
                str(caught.exception),
                f"strconv.ParseInt: parsing {go_quote(text)}: value out of range",
            )

    def test_exact_abc_message(self):
        with self.assertRaises(InvalidValue) as caught:
            parse_int("abc")
        self.assertEqual(str(caught.exception), 'strconv.ParseInt: parsing "abc": invalid syntax')

    @given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
    def test_round_trip_in_every_base(self, n):
        sign = "-" if n < 0 else ""
        m = abs(n)
        self.assertEqual(parse_int(str(n)), n)
        self.assertEqual(parse_int(f"{sign}0x{m:x}"), n)
        self.assertEqual(parse_int(f"{sign}0o{m:o}"), n)
        self.assertEqual(parse_int(f"{sign}0{m:o}"), n)
        self.assertEqual(parse_int(f"{sign}0b{m:b}"), n)
        self.assertEqual(parse_int(f"{n:_}"), n)

    @given(st.one_of(st.integers(max_value=INT64_MIN - 1), st.integers(min_value=INT64_MAX + 1)))
    def test_beyond_int64_is_out_of_range(self, n):
        with self.assertRaises(InvalidValue) as caught:
            parse_int(str(n))
        self.assertIn("value out of range", str(caught.exception))


class DurationTests(unittest.TestCase):
    def test_valid(self):
        self.assertEqual(parse_go_duration("30s"), 30_000_000_000)
        self.assertEqual(parse_go_duration("1m30s"), 90_000_000_000)
        self.assertEqual(parse_go_duration("0"), 0)
        self.assertEqual(parse_go_duration("-1.5ms"), -1_500_000)

    def test_invalid(self):
        with self.assertRaises(InvalidValue) as caught:
            parse_go_duration("abc")
        self.assertEqual(str(caught.exception), 'time: invalid duration "abc"')
        with self.assertRaises(InvalidValue) as caught:
            parse_go_duration("30")
        self.assertEqual(str(caught.exception), 'time: missing unit in duration "30"')


class CSVTests(unittest.TestCase):
    def test_records(self):
        cases = {
            "a": ["a"],
            "a,b": ["a", "b"],
            "a,": ["a", ""],
            ",": ["", ""],
            '"a,b",c': ["a,b", "c"],
            '"say ""hi"""': ['say "hi"'],
            '""': [""],
            "a,b\nc,d": ["a", "b"],
            "\n\na": ["a"],
            '"multi\nline",x': ["multi\nline", "x"],
            "a\r\n": ["a"],
            "a\r": ["a"],
            " a , b ": [" a ", " b "],
        }
        for text, fields in cases.items():
            self.assertEqual(read_csv_record(text), fields, repr(text))

    def test_empty_is_no_fields(self):
        self.assertEqual(read_csv_record(""), [])

    def test_errors(self):
        cases = {
            'a"b': 'parse error on line 1, column 2: bare " in non-quoted field',
            'x,a"b': 'parse error on line 1, column 4: bare " in non-quoted field',
            '"a"b': 'parse error on line 1, column 3: extraneous or missing " in quoted-field',
            '"abc': 'parse error on line 1, column 5: extraneous or missing " in quoted-field',
            '"a\nb': (
                "record on line 1; parse error on line 2, column 2: "
                'extraneous or missing " in quoted-field'
            ),
            "\n": "EOF",
        }
        for text, message in cases.items():
            with self.assertRaises(InvalidValue, msg=repr(text)) as caught:
                read_csv_record(text)
            self.assertEqual(str(caught.exception), message)

    @given(st.lists(st.text(alphabet=st.characters(blacklist_characters='",\r\n')), min_size=1))
    def test_plain_fields_match_python_csv(self, fields):
        text = ",".join(fields)
        if text == "":
            return
        self.assertEqual(read_csv_record(text), next(csv.reader([text])))
        self.assertEqual(read_csv_record(text), fields)

    @given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r")), min_size=1))
    def test_writer_round_trip(self, fields):
        text = write_csv_record(fields)
        if text == "" or text.strip("\n") == "" and not any(fields):
            return
        self.assertEqual(read_csv_record(text), fields)


def flagset(*flags: Flag) -> FlagSet:
    return FlagSet(
        list(flags)
        or [
            Flag("host", STRING_SLICE, [], "hosts"),
            Flag("tls", BOOL, False, "tls"),
            Flag("port", INT, 0, "port"),
            Flag("size", INT64, 1 << 20, "size"),
            Flag("timeout", DURATION, 30_000_000_000, "timeout"),
            Flag("path", STRING, "/up", "path"),
            Flag("help", BOOL, False, "help", shorthand="h"),
        ]
    )


class FlagSetTests(unittest.TestCase):
    def parse(self, *args: str) -> FlagSet:
        fs = flagset()
        fs.parse(list(args))
        return fs

    def error(self, *args: str) -> str:
        with self.assertRaises(FlagError) as caught:
            self.parse(*args)
        return str(caught.exception)

    def test_defaults_and_changed(self):
        fs = self.parse()
        self.assertEqual(fs["host"], [])
        self.assertEqual(fs["size"], 1 << 20)
        self.assertEqual(fs["path"], "/up")
        self.assertEqual(fs.changed, set())

    def test_value_forms(self):
        fs = self.parse("--port", "0x10", "--path=/health", "--timeout=1m", "svc")
        self.assertEqual(fs["port"], 16)
        self.assertEqual(fs["path"], "/health")
        self.assertEqual(fs["timeout"], 60_000_000_000)
        self.assertEqual(fs.args, ["svc"])

    def test_empty_string_value(self):
        self.assertEqual(self.parse("--path=")["path"], "")
        self.assertEqual(self.parse("--path", "")["path"], "")

    def test_slice_first_replaces_later_append(self):
        fs = FlagSet([Flag("host", STRING_SLICE, ["default"], "hosts")])
        fs.parse(["--host=a,b", "--host", "c"])
        self.assertEqual(fs["host"], ["a", "b", "c"])

    @given(
        st.lists(
            st.lists(st.text(alphabet=st.characters(blacklist_characters='",\r\n')), max_size=3),
            min_size=1,
            max_size=4,
        )
    )
    def test_slice_occurrences_concatenate(self, occurrences):
        fs = FlagSet([Flag("host", STRING_SLICE, ["default"], "hosts")])
        args = []
        for values in occurrences:
            args.append("--host=" + ",".join(values))
        fs.parse(args)
        expected = [v for values in occurrences for v in (values if ",".join(values) else [])]
        self.assertEqual(fs["host"], expected)
        self.assertTrue(fs.is_changed("host"))

    def test_slice_empty_contributes_nothing_but_counts_as_given(self):
        fs = self.parse("--host=")
        self.assertEqual(fs["host"], [])
        self.assertTrue(fs.is_changed("host"))
        self.assertEqual(self.parse("--host=", "--host=a")["host"], ["a"])

    def test_slice_trailing_comma(self):
        self.assertEqual(self.parse("--host=a,")["host"], ["a", ""])

    def test_bool_forms(self):
        self.assertTrue(self.parse("--tls")["tls"])
        self.assertFalse(self.parse("--tls=false")["tls"])
        self.assertTrue(self.parse("--tls=T")["tls"])
        fs = self.parse("--tls", "false")
        self.assertTrue(fs["tls"])
        self.assertEqual(fs.args, ["false"])

    def test_given_false_counts_as_changed(self):
        self.assertTrue(self.parse("--tls=false").is_changed("tls"))

    def test_interspersed_and_double_dash(self):
        fs = self.parse("a", "--tls", "b", "--", "--port", "c")
        self.assertEqual(fs.args, ["a", "b", "--port", "c"])
        self.assertFalse(fs.is_changed("port"))

    def test_single_dash_and_empty_are_positional(self):
        self.assertEqual(self.parse("-", "").args, ["-", ""])

    def test_short_help(self):
        self.assertTrue(self.parse("-h")["help"])
        self.assertTrue(self.parse("--help")["help"])
        self.assertFalse(self.parse("--help=false")["help"])

    def test_repeated_scalar_last_wins(self):
        self.assertEqual(self.parse("--port=1", "--port=2")["port"], 2)

    def test_errors(self):
        self.assertEqual(self.error("--nope"), "unknown flag: --nope")
        self.assertEqual(self.error("--nope=1"), "unknown flag: --nope")
        self.assertEqual(self.error("-x"), "unknown shorthand flag: 'x' in -x")
        self.assertEqual(self.error("-hx"), "unknown shorthand flag: 'x' in -x")
        self.assertEqual(self.error("--port"), "flag needs an argument: --port")
        self.assertEqual(self.error("---port"), "bad flag syntax: ---port")
        self.assertEqual(self.error("--=x"), "bad flag syntax: --=x")
        self.assertEqual(
            self.error("--port", "abc"),
            'invalid argument "abc" for "--port" flag: strconv.ParseInt: parsing "abc": '
            "invalid syntax",
        )
        self.assertEqual(
            self.error("--timeout=abc"),
            'invalid argument "abc" for "--timeout" flag: time: invalid duration "abc"',
        )
        self.assertEqual(
            self.error("--tls=yes"),
            'invalid argument "yes" for "--tls" flag: strconv.ParseBool: parsing "yes": '
            "invalid syntax",
        )
        self.assertEqual(
            self.error("--help=maybe"),
            'invalid argument "maybe" for "-h, --help" flag: strconv.ParseBool: parsing '
            '"maybe": invalid syntax',
        )
        self.assertEqual(
            self.error('--host=a"b'),
            'invalid argument "a\\"b" for "--host" flag: parse error on line 1, column 2: '
            'bare " in non-quoted field',
        )

    def test_first_error_stops_parsing(self):
        self.assertEqual(self.error("--nope", "--port"), "unknown flag: --nope")

    def test_usages_show_non_zero_defaults(self):
        text = flagset().usages()
        self.assertIn('      --path string        path (default "/up")\n', text)
        self.assertIn("(default 30s)", text)
        self.assertIn("(default 1048576)", text)
        self.assertIn("  -h, --help ", text)
        self.assertNotIn("(default false)", text)
        self.assertNotIn("(default [])", text)
        self.assertNotIn("(default 0)", text)


class GoQuoteTests(unittest.TestCase):
    def test_quoting(self):
        self.assertEqual(go_quote("abc"), '"abc"')
        self.assertEqual(go_quote('a"b\\c'), '"a\\"b\\\\c"')
        self.assertEqual(go_quote("a\nb\t\x00\x7f"), '"a\\nb\\t\\x00\\x7f"')
        self.assertEqual(go_quote("héllo ✓"), '"héllo ✓"')
        self.assertEqual(go_quote("\u200b"), '"\\u200b"')
