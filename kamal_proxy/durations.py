"""Go-style durations: parse ``1m30s`` and format nanoseconds as Go's ``time.Duration.String``.

Kamal passes durations in Go syntax and the messages we print must format them exactly
as the Go original does (``target failed to become healthy within configured timeout (1m0s)``),
so both directions are reproduced here rather than approximated.
"""

from __future__ import annotations

import re

NANOSECOND = 1
MICROSECOND = 1000
MILLISECOND = 1000 * MICROSECOND
SECOND = 1000 * MILLISECOND
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_UNITS = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,
    "\u03bcs": MICROSECOND,
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}

_GROUP = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")
_MAX = (1 << 63) - 1


class DurationError(ValueError):
    """Raised with Go's own message, e.g. ``time: invalid duration "abc"``."""


def parse_duration(text: str) -> int:
    """Parse a Go duration string into integer nanoseconds."""
    quoted = _go_quote(text)
    s = text
    negative = False
    if s and s[0] in "+-":
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise DurationError(f"time: invalid duration {quoted}")
    total = 0
    while s:
        m = _GROUP.match(s)
        number, unit = m.group(1), m.group(2)
        if number in ("", "."):
            raise DurationError(f"time: invalid duration {quoted}")
        if not unit:
            raise DurationError(f"time: missing unit in duration {quoted}")
        if unit not in _UNITS:
            raise DurationError(f"time: unknown unit {_go_quote(unit)} in duration {quoted}")
        whole, _, frac = number.partition(".")
        scale = _UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            # Go's float arithmetic, not exact: "0.3333333333333333h" is 20m0s there.
            f, digits = _leading_fraction(frac)
            value += int(f * (scale / 10**digits))
        total += value
        if total > _MAX + (1 if negative else 0):
            raise DurationError(f"time: invalid duration {quoted}")
        s = s[m.end() :]
    return -total if negative else total


def _leading_fraction(digits: str) -> tuple[int, int]:
    """Go keeps fraction digits only while they fit in 63 bits; the rest are ignored."""
    f = n = 0
    for c in digits:
        if f > _MAX // 10 or f * 10 + int(c) > _MAX + 1:
            break
        f, n = f * 10 + int(c), n + 1
    return f, n


def _go_quote(s: str) -> str:
    """The time package's own quoting: non-ASCII and control bytes become ``\\xNN``."""
    out = []
    for c in s:
        if c < " " or ord(c) >= 0x80:
            out.extend(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))
        else:
            out.append("\\" + c if c in '"\\' else c)
    return '"' + "".join(out) + '"'


def format_duration(ns: int) -> str:
    """Format nanoseconds exactly like Go's ``time.Duration.String``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < SECOND:
        for unit, scale in (("ns", 1), ("\u00b5s", MICROSECOND), ("ms", MILLISECOND)):
            if u < scale * 1000:
                return sign + _fraction(u, scale) + unit
    hours, rest = divmod(u, HOUR)
    minutes, rest = divmod(rest, MINUTE)
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + _fraction(rest, SECOND) + "s"


def _fraction(value: int, scale: int) -> str:
    whole, frac = divmod(value, scale)
    if not frac:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}." + f"{frac:0{digits}d}".rstrip("0")
