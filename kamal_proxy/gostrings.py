"""Go's quoting of strings (``strconv.Quote``, ``%q``): the CLI's and the proxy's messages
quote user input exactly as the Go original prints it."""

from __future__ import annotations

import unicodedata


def go_quote(text: str) -> str:
    """``strconv.Quote``: printable runes kept, everything else escaped the Go way."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif _is_print(ch):
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def go_quote_char(ch: str) -> str:
    """``%q`` of a single byte/rune: ``'x'``."""
    if ch == "'":
        return "'\\''"
    inner = go_quote(ch)[1:-1]
    if inner == '\\"':
        inner = '"'
    return "'" + inner + "'"


_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _is_print(ch: str) -> bool:
    """Go's ``unicode.IsPrint``: letters, marks, numbers, punctuation, symbols and ASCII space."""
    if ch == " ":
        return True
    return unicodedata.category(ch)[0] in "LMNPS"
