"""Rollout group selection (SPEC §12.3): FNV-1a of the ``kamal-rollout`` cookie against a split."""

from __future__ import annotations

from typing import Any

ROLLOUT_COOKIE = b"kamal-rollout"
WRITER_COOKIE = b"kamal-writer"


def split_point(percentage: int) -> float:
    """Divide first, then multiply, in float64: the value Go persists and compares."""
    return 4294967295.0 * (percentage / 100.0)


def fnv1a32(data: bytes) -> int:
    h = 2166136261
    for byte in data:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def in_rollout_group(value: bytes | None, split: dict[str, Any]) -> bool:
    if not value:
        return False
    allowlist = split.get("allowlist") or ()
    text = value.decode("utf-8", "surrogateescape")
    if text in allowlist:
        return True
    return float(fnv1a32(value)) <= float(split.get("percentage_split_point") or 0.0)


def request_cookie(cookie_headers: list[bytes] | None, name: bytes) -> bytes | None:
    """The first cookie called ``name`` in the request's Cookie headers, quotes removed."""
    if not cookie_headers:
        return None
    for header in cookie_headers:
        for part in header.split(b";"):
            key, sep, value = part.strip().partition(b"=")
            if sep and key == name:
                value = value.strip()
                if len(value) > 1 and value[:1] == b'"' and value[-1:] == b'"':
                    value = value[1:-1]
                return value
    return None
