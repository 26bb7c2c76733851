"""Scope ``Set-Cookie`` paths under a stripped path prefix (SPEC §9.6, ``--scope-cookie-paths``).

An app mounted at ``/app`` that sets ``Path=/`` would otherwise hand the browser a cookie for
every app on the host.  Parsing and re-serialising follow Go's ``net/http`` cookie code, since
that is the output Kamal users get from the original; cookies that do not parse, or that
belong to another domain, are left byte for byte as they were.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class _Cookie:
    __slots__ = (
        "name",
        "value",
        "quoted",
        "path",
        "domain",
        "expires",
        "max_age",
        "http_only",
        "secure",
        "same_site",
        "partitioned",
    )

    def __init__(self, name: str, value: str, quoted: bool) -> None:
        self.name = name
        self.value = value
        self.quoted = quoted
        self.path = ""
        self.domain = ""
        self.expires: datetime | None = None
        self.max_age = 0
        self.http_only = False
        self.secure = False
        self.same_site = ""
        self.partitioned = False

    def serialize(self) -> str:
        """Go's ``Cookie.String``: attributes in a fixed order, unknown ones dropped."""
        value = self.value
        if self.quoted or (value and (value[0] in " ," or value[-1] in " ,")):
            value = f'"{value}"'
        parts = [f"{self.name}={value}"]
        if self.path:
            parts.append(f"Path={self.path}")
        if self.domain:
            parts.append(f"Domain={self.domain.lstrip('.')}")
        if self.expires is not None and self.expires.year >= 1601:
            parts.append("Expires=" + self.expires.strftime("%a, %d %b %Y %H:%M:%S GMT"))
        if self.max_age > 0:
            parts.append(f"Max-Age={self.max_age}")
        elif self.max_age < 0:
            parts.append("Max-Age=0")
        if self.http_only:
            parts.append("HttpOnly")
        if self.secure:
            parts.append("Secure")
        if self.same_site:
            parts.append(f"SameSite={self.same_site}")
        if self.partitioned:
            parts.append("Partitioned")
        return "; ".join(parts)


def _parse(line: str) -> _Cookie | None:
    parts = line.strip().split(";")
    name, sep, value = parts[0].strip().partition("=")
    name = name.strip()
    if not sep or not _TOKEN.match(name):
        return None
    value = value.strip()
    quoted = len(value) > 1 and value[0] == '"' and value[-1] == '"'
    if quoted:
        value = value[1:-1]
    if any(c in value for c in '";\\') or any(ord(c) < 0x20 or ord(c) >= 0x7F for c in value):
        return None
    cookie = _Cookie(name, value, quoted)
    for attr in parts[1:]:
        key, _, val = attr.strip().partition("=")
        key = key.strip().lower()
        val = val.strip()
        if key == "path":
            cookie.path = val
        elif key == "domain":
            cookie.domain = val
        elif key == "expires":
            try:
                cookie.expires = parsedate_to_datetime(val).astimezone(UTC)
            except (TypeError, ValueError, IndexError):
                cookie.expires = None
        elif key == "max-age":
            try:
                seconds = int(val)
            except ValueError:
                continue
            cookie.max_age = seconds if seconds > 0 else -1
        elif key == "httponly":
            cookie.http_only = True
        elif key == "secure":
            cookie.secure = True
        elif key == "samesite":
            cookie.same_site = {"lax": "Lax", "strict": "Strict", "none": "None"}.get(
                val.lower(), ""
            )
        elif key == "partitioned":
            cookie.partitioned = True
    return cookie


def scope_set_cookie(value: bytes, prefix: str, host: str) -> bytes:
    """``value`` with its Path moved under ``prefix`` when it applies to ``host``."""
    try:
        cookie = _parse(value.decode("latin-1"))
    except UnicodeError:  # pragma: no cover - latin-1 decodes everything
        return value
    if cookie is None or (cookie.domain and cookie.domain != host):
        return value
    rest = cookie.path.strip("/")
    cookie.path = f"{prefix.rstrip('/')}/{rest}" if rest else prefix
    return cookie.serialize().encode("latin-1")
