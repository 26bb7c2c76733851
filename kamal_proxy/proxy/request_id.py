"""Random UUIDv4 request IDs, cheaply.

``uuid.uuid4()`` makes one ``getrandom`` system call and a ``UUID`` object per request; here the
kernel's randomness is fetched 4 KiB at a time and formatted directly.  Same source, same
format (lowercase canonical form with the version and variant bits set).
"""

from __future__ import annotations

import os

_BATCH = 256
_pool = b""
_offset = 0


def new_request_id() -> bytes:
    global _pool, _offset
    if _offset >= len(_pool):
        _pool = os.urandom(16 * _BATCH)
        _offset = 0
    raw = bytearray(_pool[_offset : _offset + 16])
    _offset += 16
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex().encode("ascii")
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])
