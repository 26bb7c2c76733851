"""Flag values and flag parsing with the exact semantics (and error texts) of Go's pflag.

Kamal drives the CLI with Go-style arguments (``--host=a,b``, ``--deploy-timeout=30s``,
``--buffer-requests=false``), and scripts compare our error messages with the Go original's,
so this module reproduces pflag's rules rather than any Python convention: bool flags take a
value only as ``--flag=v``, ints use ``strconv.ParseInt(s, 0, 64)``, string slices read one
``encoding/csv`` record per occurrence, and every message is worded as Go words it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kamal_proxy.durations import DurationError, format_duration, parse_duration
from kamal_proxy.gostrings import go_quote, go_quote_char

BOOL = "bool"
INT = "int"
INT64 = "int64"
STRING = "string"
DURATION = "duration"
STRING_SLICE = "stringSlice"

_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class FlagError(Exception):
    """Command-line parsing failed; ``str()`` is the pflag message (without ``Error: ``)."""


class InvalidValue(ValueError):
    """A flag value failed to parse; ``str()`` is the Go parser's message."""


# ---------------------------------------------------------------------------------------------
# Value parsers


def parse_bool(text: str) -> bool:
    """``strconv.ParseBool``."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidValue(f"strconv.ParseBool: parsing {go_quote(text)}: invalid syntax")


def parse_int(text: str, bits: int = 64) -> int:
    """``strconv.ParseInt(text, 0, bits)``: base prefixes, leading-zero octal, ``_`` separators."""
    if text == "":
        raise _int_syntax(text)
    s = text
    negative = False
    if s[0] == "+":
        s = s[1:]
    elif s[0] == "-":
        negative = True
        s = s[1:]
    unsigned, out_of_range = _parse_uint(s, text)
    cutoff = 1 << (bits - 1)
    if out_of_range or (not negative and unsigned >= cutoff) or (negative and unsigned > cutoff):
        raise InvalidValue(f"strconv.ParseInt: parsing {go_quote(text)}: value out of range")
    return -unsigned if negative else unsigned


def _int_syntax(text: str) -> InvalidValue:
    return InvalidValue(f"strconv.ParseInt: parsing {go_quote(text)}: invalid syntax")


def _parse_uint(s: str, original: str) -> tuple[int, bool]:
    """``strconv.ParseUint(s, 0, 64)``; returns (value, out_of_range) or raises syntax errors."""
    if s == "":
        raise _int_syntax(original)
    digits = _to_bytes(s)
    base = 10
    if digits[:1] == b"0":
        prefix = digits[1:2].lower()
        if len(digits) >= 3 and prefix == b"b":
            base, digits = 2, digits[2:]
        elif len(digits) >= 3 and prefix == b"o":
            base, digits = 8, digits[2:]
        elif len(digits) >= 3 and prefix == b"x":
            base, digits = 16, digits[2:]
        else:
            base, digits = 8, digits[1:]
    max_value = (1 << 64) - 1
    value = 0
    underscores = False
    for c in digits:
        ch = chr(c).lower()
        if ch == "_":
            underscores = True
            continue
        if "0" <= ch <= "9":
            d = c - ord("0")
        elif "a" <= ch <= "z":
            d = ord(ch) - ord("a") + 10
        else:
            raise _int_syntax(original)
        if d >= base:
            raise _int_syntax(original)
        value = value * base + d
        if value > max_value:
            return max_value, True
    if underscores and not _underscore_ok(s):
        raise _int_syntax(original)
    return value, False


def _underscore_ok(s: str) -> bool:
    """Go's ``underscoreOK``: ``_`` only between digits or after a base prefix."""
    saw = "^"
    i = 0
    if s[:1] in ("-", "+"):
        s = s[1:]
    hexa = False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i = 2
        saw = "0"
        hexa = s[1].lower() == "x"
    while i < len(s):
        c = s[i]
        if "0" <= c <= "9" or (hexa and "a" <= c.lower() <= "f"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
        i += 1
    return saw != "_"


def parse_go_duration(text: str) -> int:
    """``time.ParseDuration`` in nanoseconds."""
    try:
        return parse_duration(text)
    except DurationError as e:
        raise InvalidValue(str(e)) from None


# ---------------------------------------------------------------------------------------------
# One CSV record, as Go's encoding/csv Reader.Read() returns it (pflag's readAsCSV).


class CSVError(InvalidValue):
    pass


def read_csv_record(text: str) -> list[str]:
    """The first record of ``text`` under Go ``encoding/csv`` rules (strict quotes, ``,``)."""
    if text == "":
        return []
    lines = _csv_lines(text)
    # Skip empty lines; running out of input is io.EOF.
    line_no = 0
    line = ""
    while True:
        if not lines:
            raise CSVError("EOF")
        line = lines.pop(0)
        line_no += 1
        if line not in ("", "\n"):
            break
    record_line = line_no
    fields: list[str] = []
    col = 1
    while True:
        if not line.startswith('"'):
            i = line.find(",")
            field = line[:i] if i >= 0 else line[: len(line) - _nl(line)]
            j = field.find('"')
            if j >= 0:
                raise _csv_error(record_line, line_no, col + _blen(field[:j]), _BARE_QUOTE)
            fields.append(field)
            if i >= 0:
                col += _blen(line[: i + 1])
                line = line[i + 1 :]
                continue
            return fields
        # Quoted field.
        line = line[1:]
        col += 1
        buf: list[str] = []
        while True:
            i = line.find('"')
            if i >= 0:
                buf.append(line[:i])
                col += _blen(line[: i + 1])
                line = line[i + 1 :]
                if line.startswith('"'):
                    buf.append('"')
                    line = line[1:]
                    col += 1
                elif line.startswith(","):
                    line = line[1:]
                    col += 1
                    fields.append("".join(buf))
                    break
                elif _nl(line) == len(line):
                    fields.append("".join(buf))
                    return fields
                else:
                    raise _csv_error(record_line, line_no, col - 1, _QUOTE)
            elif line:
                buf.append(line)
                col += _blen(line)
                if not lines:
                    # Go reports ErrQuote at the position after the last byte read.
                    raise _csv_error(record_line, line_no, col, _QUOTE)
                line = lines.pop(0)
                line_no += 1
                col = 1
            else:
                raise _csv_error(record_line, line_no, col, _QUOTE)


_BARE_QUOTE = 'bare " in non-quoted field'
_QUOTE = 'extraneous or missing " in quoted-field'


def _csv_lines(text: str) -> list[str]:
    """Split like bufio.ReadSlice('\\n') with Go's ``\\r\\n`` -> ``\\n`` normalisation."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        last = parts[-1]
        if last.endswith("\r"):
            last = last[:-1]
        lines.append(last)
    return [ln[:-2] + "\n" if ln.endswith("\r\n") else ln for ln in lines]


def _nl(line: str) -> int:
    return 1 if line.endswith("\n") else 0


def _blen(s: str) -> int:
    return len(_to_bytes(s))


def _to_bytes(s: str) -> bytes:
    """The bytes Go would see: argv bytes that were not UTF-8 come back as themselves."""
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


def _csv_error(start: int, line: int, col: int, message: str) -> CSVError:
    if start != line:
        return CSVError(
            f"record on line {start}; parse error on line {line}, column {col}: {message}"
        )
    return CSVError(f"parse error on line {line}, column {col}: {message}")


def write_csv_record(values: Sequence[str]) -> str:
    """Go ``csv.Writer`` of one record without the final newline (pflag's slice String())."""
    out = []
    for v in values:
        if _csv_needs_quotes(v):
            out.append('"' + v.replace('"', '""') + '"')
        else:
            out.append(v)
    return ",".join(out)


def _csv_needs_quotes(v: str) -> bool:
    if v == "":
        return False
    if v == "\\.":
        return True
    if any(c in v for c in ',"\r\n'):
        return True
    return v[0] in " \t\n\v\f\r\x85\xa0" or v[0].isspace()


# ---------------------------------------------------------------------------------------------
# Flag definitions and a pflag FlagSet


@dataclass(frozen=True, slots=True)
class Flag:
    """One flag of one command; both parsing and ``--help`` are generated from these."""

    name: str
    kind: str
    default: Any
    usage: str
    shorthand: str = ""
    hidden: bool = False

    @property
    def takes_no_value(self) -> bool:
        """pflag's ``NoOptDefVal``: only bools may appear without a value."""
        return self.kind == BOOL

    def parse(self, text: str) -> Any:
        if self.kind == BOOL:
            return parse_bool(text)
        if self.kind in (INT, INT64):
            return parse_int(text)
        if self.kind == DURATION:
            return parse_go_duration(text)
        if self.kind == STRING_SLICE:
            return read_csv_record(text)
        return text

    @property
    def default_text(self) -> str:
        """pflag's ``DefValue``."""
        return format_value(self.kind, self.default)

    @property
    def default_is_zero(self) -> bool:
        if self.kind == BOOL:
            return not self.default
        if self.kind in (INT, INT64, DURATION):
            return not self.default
        if self.kind == STRING_SLICE:
            return not self.default
        return self.default == ""

    @property
    def display_name(self) -> str:
        if self.shorthand:
            return f"-{self.shorthand}, --{self.name}"
        return f"--{self.name}"


def format_value(kind: str, value: Any) -> str:
    if kind == BOOL:
        return "true" if value else "false"
    if kind == DURATION:
        return format_duration(int(value))
    if kind == STRING_SLICE:
        return "[" + write_csv_record(list(value or [])) + "]"
    return str(value)


class FlagSet:
    """pflag's ``FlagSet.Parse`` with interspersed flags and ``ContinueOnError``."""

    def __init__(self, flags: Iterable[Flag]):
        self.flags: dict[str, Flag] = {}
        self.shorthands: dict[str, Flag] = {}
        for flag in flags:
            self.flags[flag.name] = flag
            if flag.shorthand:
                self.shorthands[flag.shorthand] = flag
        self.values: dict[str, Any] = {
            f.name: (list(f.default) if f.kind == STRING_SLICE else f.default)
            for f in self.flags.values()
        }
        self.changed: set[str] = set()
        self.args: list[str] = []

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def is_changed(self, name: str) -> bool:
        return name in self.changed

    def parse(self, arguments: Sequence[str]) -> None:
        args = list(arguments)
        while args:
            s = args.pop(0)
            if len(s) <= 1 or s[0] != "-":
                self.args.append(s)
                continue
            if s[1] == "-":
                if len(s) == 2:  # "--" ends the flags
                    self.args.extend(args)
                    return
                args = self._parse_long(s, args)
            else:
                args = self._parse_short(s, args)

    def _parse_long(self, s: str, args: list[str]) -> list[str]:
        name = s[2:]
        if not name or name[0] in "-=":
            raise FlagError(f"bad flag syntax: {s}")
        name, eq, value = name.partition("=")
        flag = self.flags.get(name)
        if flag is None:
            raise FlagError(f"unknown flag: --{name}")
        if eq:
            pass
        elif flag.takes_no_value:
            value = "true"
        elif args:
            value = args.pop(0)
        else:
            raise FlagError(f"flag needs an argument: {s}")
        self.set(flag, value)
        return args

    def _parse_short(self, s: str, args: list[str]) -> list[str]:
        shorthands = s[1:]
        while shorthands:
            c = shorthands[0]
            rest = shorthands[1:]
            flag = self.shorthands.get(c)
            if flag is None:
                raise FlagError(f"unknown shorthand flag: {go_quote_char(c)} in -{shorthands}")
            if len(shorthands) > 2 and shorthands[1] == "=":
                value, rest = shorthands[2:], ""
            elif flag.takes_no_value:
                value = "true"
            elif len(shorthands) > 1:
                value, rest = shorthands[1:], ""
            elif args:
                value = args.pop(0)
            else:
                raise FlagError(f"flag needs an argument: {go_quote_char(c)} in -{shorthands}")
            self.set(flag, value)
            shorthands = rest
        return args

    def set(self, flag: Flag, text: str) -> None:
        try:
            value = flag.parse(text)
        except InvalidValue as e:
            raise FlagError(
                f"invalid argument {go_quote(text)} for {go_quote(flag.display_name)} flag: {e}"
            ) from None
        if flag.kind == STRING_SLICE and flag.name in self.changed:
            self.values[flag.name] = self.values[flag.name] + value
        else:
            self.values[flag.name] = value
        self.changed.add(flag.name)

    # -----------------------------------------------------------------------------------------
    # Help

    def usages(self) -> str:
        """pflag's ``FlagUsages``: sorted by name, usage column aligned, non-zero defaults."""
        lines = []
        for flag in sorted(self.flags.values(), key=lambda f: f.name):
            if flag.hidden:
                continue
            if flag.shorthand:
                line = f"  -{flag.shorthand}, --{flag.name}"
            else:
                line = f"      --{flag.name}"
            varname = _VARNAMES.get(flag.kind, flag.kind)
            if varname:
                line += " " + varname
            usage = flag.usage
            if not flag.default_is_zero:
                if flag.kind == STRING:
                    usage += f" (default {go_quote(flag.default_text)})"
                else:
                    usage += f" (default {flag.default_text})"
            lines.append((line, usage))
        width = max((len(line) for line, _ in lines), default=0)
        return "".join(f"{line}{' ' * (width - len(line))}   {usage}\n" for line, usage in lines)


_VARNAMES = {
    BOOL: "",
    INT: "int",
    INT64: "int",
    STRING: "string",
    DURATION: "duration",
    STRING_SLICE: "strings",
}
