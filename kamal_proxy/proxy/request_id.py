"""Random UUIDv4 request IDs, cheaply.

``uuid.uuid4()`` makes one ``getrandom`` system call and a ``UUID`` object per request; here the
kernel's randomness is fetched 4 KiB at a time, turned into hex once per batch, and each ID is
sliced out of it with its version (``4``) and variant (``8``-``b``) digits set.  Same source,
same format (lowercase canonical form), same distribution (the variant keeps two random bits).
"""

from __future__ import annotations

import os

_BATCH = 256
_hex = b""
_offset = 0
# A random hex digit -> the variant digit with its two low bits (RFC 4122: 10xx).
_VARIANT = {ord(d): b"89ab"[int(d, 16) & 3 : (int(d, 16) & 3) + 1] for d in "0123456789abcdef"}


def new_request_id() -> bytes:
    global _hex, _offset
    i = _offset
    if i >= len(_hex):
        _hex = os.urandom(16 * _BATCH).hex().encode("ascii")
        i = 0
    _offset = i + 32
    h = _hex
    return b"%s-%s-4%s-%s%s-%s" % (
        h[i : i + 8],
        h[i + 8 : i + 12],
        h[i + 13 : i + 16],
        _VARIANT[h[i + 16]],
        h[i + 17 : i + 20],
        h[i + 20 : i + 32],
    )
