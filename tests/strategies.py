"""Hypothesis strategies shared by the HTTP/1 tests (the codec's and the channel's)."""

from __future__ import annotations

from hypothesis import strategies as st

#: A header name: an RFC 9110 token of the usual characters.
header_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=20,
)

#: A header value as it may be sent: visible bytes, tabs and obs-text, no leading or trailing
#: whitespace.
header_values = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c < 127 or c >= 128).strip(b" \t")
)
