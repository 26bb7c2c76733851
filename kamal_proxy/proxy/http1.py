"""The HTTP/1.1 codec of both sides of the proxy, sans I/O (SPEC §4.3, §9; DESIGN §4).

One module parses what the client sends (request heads, chunked request bodies) and what an
upstream answers (response heads, chunked response bodies), so the rules live in one place:

* **Heads** are parsed only once complete: :func:`find_head_end` locates the blank line
  (CRLF, or bare LF as Go's textproto tolerates) without splitting anything, so a head costs
  one pass over its bytes and a refused one costs nothing more.  Limits are checked before
  any splitting: at most :data:`MAX_HEAD_BYTES` of head (Go: 1 MiB plus its 4 KiB slack) and
  at most :data:`MAX_HEADER_LINES` header lines, ``Host`` included (Go's net/http: 501 lines
  get 431).  The caller counts newlines of an incomplete head with :func:`too_many_lines` as
  bytes arrive, so a flood of short headers is refused on its first read.
* **Requests** are strict, like Go's server: the statuses of SPEC §4.3's table, one
  ``Host``, no obs-fold, no control bytes, one framing (``Transfer-Encoding: chunked`` wins
  over ``Content-Length``, which is then dropped: no smuggling).  Header names are
  canonicalised as Go's ``textproto.CanonicalMIMEHeaderKey`` does; that is how Go forwards
  them upstream.
* **Responses** are tolerant where Go's client is: bare LF line ends, obs-fold (folded into
  the previous value), header names kept as received.
* **Chunked bodies**: :class:`ChunkedDecoder` for both directions; the request side checks
  its trailer lines, as Go's server does.

Parsing into plain bytes, lists and dicts is measured to beat ``httptools`` (llhttp) here:
its C parser calls back into Python once per header, which costs more than splitting a
complete head with ``bytes.split``, and it cannot give the Go statuses (431 per line count,
501, 505, HTTP/1.2 served) without a second pass.  See ``bench/codec_micro.py``.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_HEAD_BYTES",
    "MAX_HEADER_LINES",
    "MAX_RESPONSE_HEAD_BYTES",
    "MAX_TRAILER_BYTES",
    "BadResponse",
    "ChunkedDecoder",
    "HeadError",
    "MalformedBody",
    "RequestHead",
    "canonical_name",
    "connection_tokens",
    "find_head_end",
    "has_token",
    "parse_request_head",
    "parse_response",
    "parse_response_head",
    "split_response_headers",
    "too_many_lines",
]

#: Request line plus headers: Go's http.DefaultMaxHeaderBytes plus its bufio slack.
MAX_HEAD_BYTES = (1 << 20) + 4096
#: Header lines of a request, ``Host`` included (Go >= 1.27: DefaultMaxHeaderValueCount).
MAX_HEADER_LINES = 500
#: An upstream's status line and headers (Go's transport default is larger; 1 MiB is plenty).
MAX_RESPONSE_HEAD_BYTES = 1 << 20
MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 64 << 10

_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TOKEN_START = frozenset(_TOKEN_BYTES)
# httpguts.ValidHostHeader's byte set.
_HOST_BYTES = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!$%&'()*+,-.:;=[]_~"
# CTL bytes other than HTAB (httpguts.ValidHeaderFieldValue, url's invalid control characters).
_CTL_BYTES = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
_HEX_BYTES = b"0123456789abcdefABCDEF"
_VERSION_SHAPE = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*\Z")
_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"))


class HeadError(Exception):
    """A request head the server refuses with ``status`` (SPEC §4.3), before any handler."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


class MalformedBody(Exception):
    """A chunked body is malformed (a request's: the pipeline answers 400, SPEC §4.3)."""


class BadResponse(Exception):
    """An upstream's response cannot be parsed (the proxy answers 502, or aborts)."""


# -- header names ------------------------------------------------------------------------------

_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
# Name as received -> canonical name (None: not a valid field name).  Clients and upstreams
# repeat a few dozen names; the cache is bounded so that hostile input cannot grow it.
_CANONICAL: dict[bytes, bytes | None] = {}
_CANONICAL_MAX = 4096


def canonical_name(name: bytes) -> bytes | None:
    """Go's ``CanonicalMIMEHeaderKey`` for a valid field name (``x-foo`` -> ``X-Foo``), else
    None (empty, or a byte outside the token set, e.g. a space before the colon)."""
    canon = _CANONICAL.get(name, False)
    if canon is not False:
        return canon  # type: ignore[return-value]
    if not name or name.translate(None, _TOKEN_BYTES):
        canon = None
    else:
        parts = name.translate(_LOWER).split(b"-")
        canon = b"-".join(p[:1].translate(_UPPER) + p[1:] for p in parts)
    if len(_CANONICAL) < _CANONICAL_MAX:
        _CANONICAL[name] = canon
    return canon


def has_token(values: list[bytes] | None, token: bytes) -> bool:
    """Whether comma-separated header ``values`` hold ``token`` (lower case), any case."""
    if values:
        for value in values:
            for part in value.lower().split(b","):
                if part.strip(b" \t") == token:
                    return True
    return False


def connection_tokens(values: list[bytes] | None) -> set[bytes]:
    """The lower-cased tokens of ``Connection`` header values."""
    if not values:
        return set()
    return {t.strip(b" \t").lower() for v in values for t in v.split(b",")}


# -- finding a head ----------------------------------------------------------------------------


def find_head_end(buf: bytes, start: int = 0) -> tuple[int, int] | None:
    """Where the head at the start of ``buf`` ends: ``(end of its last line, start of what
    follows the blank line)``, or None while incomplete.  ``start`` skips bytes already
    searched (pass ``max(0, searched - 2)``).  The first blank line wins, whichever its line
    ends (``\\r\\n`` or a bare ``\\n``), as in Go's textproto reader."""
    i = buf.find(b"\n\r\n", start)
    j = buf.find(b"\n\n", start, i + 1 if i >= 0 else len(buf))
    if j >= 0 and (i < 0 or j < i):
        end, after = j, j + 2
    elif i >= 0:
        end, after = i, i + 3
    else:
        return None
    if end and buf[end - 1] == 13:  # the last line's own CR
        end -= 1
    return end, after


def too_many_lines(newlines: int) -> bool:
    """Whether an incomplete request head with ``newlines`` line ends so far already has more
    than :data:`MAX_HEADER_LINES` complete header lines (the first ends the request line)."""
    return newlines - 1 > MAX_HEADER_LINES


def _split_lines(head: bytes) -> list[bytes]:
    """The lines of a head (CRLF or bare LF ends); raises on control bytes anywhere."""
    lines = head.split(b"\r\n")
    if head.count(b"\n") == len(lines) - 1:
        # Only CRLF line ends: every CTL byte must be one of their CR LF pairs.
        if len(head) - len(head.translate(None, _CTL_BYTES)) != 2 * (len(lines) - 1):
            raise HeadError(400, "invalid header value")
        return lines
    lines = [line[:-1] if line[-1:] == b"\r" else line for line in head.split(b"\n")]
    for line in lines:
        if line.translate(None, _CTL_BYTES) != line:
            raise HeadError(400, "invalid header value")
    return lines


# -- requests ----------------------------------------------------------------------------------


class RequestHead:
    """A parsed request head.

    ``headers`` maps canonical names to their values in arrival order (Go's ``http.Header``).
    ``uri`` is the origin-form target (``path?query``, from an absolute-form target too) and
    ``path`` its raw path; ``host`` the ``Host`` value (or the absolute-form authority, which
    wins), ``b""`` when absent.  ``length`` is the body's declared length, ``-1`` when chunked
    (then ``Content-Length`` is gone from ``headers``).  ``version`` is as received (the log's
    ``proto``); ``http11`` says whether HTTP/1.1 semantics apply (1.1 and any later 1.x).
    """

    __slots__ = (
        "method",
        "uri",
        "path",
        "version",
        "http11",
        "headers",
        "host",
        "length",
        "keep_alive",
        "expect_continue",
        "asterisk",
    )

    method: bytes
    uri: bytes
    path: bytes
    version: bytes
    http11: bool
    headers: dict[bytes, list[bytes]]
    host: bytes
    length: int
    keep_alive: bool
    expect_continue: bool
    asterisk: bool


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes, bool]:
    """(method, target, version, http11) of a request line; raises :class:`HeadError`."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HeadError(400, "malformed HTTP request")
    method, target, version = parts
    if method not in _METHODS and (not method or method.translate(None, _TOKEN_BYTES)):
        raise HeadError(400, "invalid method")
    if version == b"HTTP/1.1":
        http11 = True
    elif version == b"HTTP/1.0":
        http11 = False
    elif _VERSION_SHAPE.match(version):
        if version[5] != 49:  # major version "1"
            raise HeadError(505, "unsupported protocol version")
        http11 = True  # HTTP/1.2 and later minors: served as HTTP/1.1 (RFC 9112)
    else:
        raise HeadError(400, "malformed HTTP version")
    if not target:
        raise HeadError(400, "invalid URI for request")
    return method, target, version, http11


def check_request_start(buf: bytes) -> None:
    """Refuse binary garbage (e.g. a TLS ClientHello) before its head is complete."""
    if buf[0] not in _TOKEN_START:
        raise HeadError(400, "malformed HTTP request")
    nl = buf.find(b"\n")
    if nl >= 0:
        parse_request_line(buf[:nl].rstrip(b"\r"))


def parse_request_head(head: bytes, into: RequestHead | None = None) -> RequestHead:
    """Parse a complete request head (``head`` ends before its blank line) into ``into`` (a
    :class:`RequestHead`, or an instance of a subclass the caller made); raises
    :class:`HeadError` with the status SPEC §4.3 gives."""
    if len(head) > MAX_HEAD_BYTES:
        raise HeadError(431)
    # Each header line takes at least 4 bytes ("a:" CR LF): short heads need no count.
    if len(head) > 4 * MAX_HEADER_LINES and head.count(b"\n") > MAX_HEADER_LINES:
        raise HeadError(431, "too many header lines")
    lines = _split_lines(head)
    method, target, version, http11 = parse_request_line(lines[0])
    headers: dict[bytes, list[bytes]] = {}
    cache = _CANONICAL
    for i in range(1, len(lines)):
        name, sep, value = lines[i].partition(b":")
        canon = cache.get(name)
        if canon is None:
            canon = canonical_name(name)
            if canon is None or not sep:
                raise HeadError(400, "malformed MIME header line")
        elif not sep:
            raise HeadError(400, "malformed MIME header line")
        values = headers.get(canon)
        if values is None:
            headers[canon] = [value.strip(b" \t")]
        else:
            values.append(value.strip(b" \t"))
    return finish_request_head(method, target, version, http11, headers, into)


def finish_request_head(
    method: bytes,
    target: bytes,
    version: bytes,
    http11: bool,
    headers: dict[bytes, list[bytes]],
    into: RequestHead | None = None,
) -> RequestHead:
    """The checks and derived fields of a request head once its lines are split: ``Host``,
    framing, expectations, persistence and the request target."""
    # Host: required for HTTP/1.1, at most one, valid bytes.
    hosts = headers.get(b"Host")
    if hosts is None:
        if http11 and method != b"CONNECT":
            raise HeadError(400, "missing required Host header")
        host = b""
    else:
        if len(hosts) > 1:
            raise HeadError(400, "too many Host headers")
        host = hosts[0]
        if host.translate(None, _HOST_BYTES):
            raise HeadError(400, "malformed Host header")

    # Framing: chunked wins over Content-Length, which is then dropped.
    length = 0
    lengths = headers.get(b"Content-Length")
    if lengths is not None and len(lengths) > 1:
        if any(v != lengths[0] for v in lengths):
            raise HeadError(400, "multiple Content-Length headers")
        lengths = headers[b"Content-Length"] = [lengths[0]]
    encodings = headers.pop(b"Transfer-Encoding", None)
    if encodings is not None and http11:
        if len(encodings) != 1 or encodings[0].lower() != b"chunked":
            raise HeadError(501)
        length = -1
        headers[b"Transfer-Encoding"] = [b"chunked"]  # informative: it is hop-by-hop
        headers.pop(b"Content-Length", None)
    elif lengths is not None:
        text = lengths[0]
        if not text:
            del headers[b"Content-Length"]
        elif not text.isdigit() or len(text) > 19 or int(text) >= 1 << 63:
            raise HeadError(400, "bad Content-Length")
        else:
            length = int(text)

    # Go: 100-continue only for HTTP/1.1 with a body; any other expectation fails.
    expect_continue = False
    expect = headers.get(b"Expect")
    if expect is not None:
        if has_token(expect[:1], b"100-continue"):
            expect_continue = version == b"HTTP/1.1" and length != 0
        elif expect[0]:
            raise HeadError(417)

    keep_alive = http11
    connection = headers.get(b"Connection")
    if connection is not None and keep_alive and has_token(connection, b"close"):
        keep_alive = False

    pragma = headers.get(b"Pragma")
    if pragma is not None and pragma[0] == b"no-cache" and b"Cache-Control" not in headers:
        headers[b"Cache-Control"] = [b"no-cache"]

    # Request target: origin-form, absolute-form (its host wins), '*', CONNECT authority.
    asterisk = False
    if target[0] == 47:  # "/"
        uri = target
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
    else:
        uri, path, authority = _parse_target(method, target)
        if target == b"*":
            asterisk = True
        else:
            host = authority
            headers[b"Host"] = [authority]
    if 37 in path and _BAD_PERCENT.search(path):  # "%"
        raise HeadError(400, "invalid URL escape")

    req = into if into is not None else RequestHead()
    req.method = method
    req.uri = uri
    req.path = path
    req.version = version
    req.http11 = http11
    req.headers = headers
    req.host = host
    req.length = length
    req.keep_alive = keep_alive
    req.expect_continue = expect_continue
    req.asterisk = asterisk
    return req


def _parse_target(method: bytes, target: bytes) -> tuple[bytes, bytes, bytes]:
    """(uri, path, host) for a target that is not origin-form."""
    if target == b"*":
        return target, target, b""
    scheme, sep, rest = target.partition(b"://")
    if sep and _SCHEME.match(scheme):
        rest, qsep, query = rest.partition(b"?")
        slash = rest.find(b"/")
        if slash < 0:
            authority, path = rest, b"/"
        else:
            authority, path = rest[:slash], rest[slash:]
        host = authority.rpartition(b"@")[2]
        if host.translate(None, _HOST_BYTES):
            raise HeadError(400, "invalid host in request URI")
        return (path + b"?" + query if qsep else path), path, host
    if method == b"CONNECT" and b"/" not in target and b"?" not in target:
        if target.translate(None, _HOST_BYTES):
            raise HeadError(400, "invalid host in request URI")
        return target, b"", target
    raise HeadError(400, "invalid URI for request")


# -- responses ---------------------------------------------------------------------------------

Header = tuple[bytes, bytes]


def _parse_status(line: bytes) -> tuple[bool, int, bytes]:
    version = line[:9]
    if version == b"HTTP/1.1 ":
        v11 = True
    elif version == b"HTTP/1.0 ":
        v11 = False
    else:
        raise BadResponse(f"malformed HTTP response {line[:64]!r}")
    code = line[9:12]
    if not code.isdigit() or code[0] == 48 or line[12:13] not in (b" ", b""):
        raise BadResponse(f"malformed HTTP status code {line[9:25]!r}")
    return v11, int(code), line[13:]


def parse_response_head(head: bytes) -> tuple[bool, int, bytes, list[Header]]:
    """``(is HTTP/1.1, status, reason, headers)`` of an upstream's head (``head`` ends before
    its blank line).  Names are kept as received; obs-fold continues the previous value;
    raises :class:`BadResponse` with Go's wording."""
    lines = head.split(b"\r\n")
    if len(lines) != head.count(b"\n") + 1:
        lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    v11, status, reason = _parse_status(lines[0])
    headers: list[Header] = []
    append = headers.append
    for i in range(1, len(lines)):
        line = lines[i]
        name, sep, value = line.partition(b":")
        # `32 in name` (an int) is several times faster than `b" " in name`.
        if not sep or not name or 32 in name or 9 in name:
            return v11, status, reason, _careful_header_lines(lines)
        append((name, value.strip(b" \t")))
    return v11, status, reason, headers


def parse_response(
    head: bytes,
) -> tuple[bool, int, bytes, list[Header], list[bytes], list[bytes], frozenset[bytes] | set[bytes]]:
    """:func:`parse_response_head` and :func:`split_response_headers` in one pass (the
    upstream client's path): ``(is HTTP/1.1, status, reason, relayed headers,
    Content-Length values, Transfer-Encoding values, Connection tokens)``."""
    lines = head.split(b"\r\n")
    if len(lines) != head.count(b"\n") + 1:
        lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    v11, status, reason = _parse_status(lines[0])
    headers: list[Header] = []
    cl: list[bytes] = []
    te: list[bytes] = []
    conn: list[bytes] = []
    codes = _NAME_CODES
    for i in range(1, len(lines)):
        name, sep, value = lines[i].partition(b":")
        if not sep or not name or 32 in name or 9 in name:
            return (v11, status, reason, *split_response_headers(_careful_header_lines(lines)))
        h = (name, value.strip(b" \t"))
        code = codes.get(name)
        if code is None:
            code = _name_code(name)
        if not code:
            headers.append(h)
        elif code == _CONTENT_LENGTH:
            if not cl:
                headers.append(h)
            cl.append(h[1])
        elif code == _TRANSFER_ENCODING:
            te.append(h[1])
        elif code == _CONNECTION:
            conn.append(h[1])
    if not conn:
        return v11, status, reason, headers, cl, te, _NO_TOKENS
    tokens = connection_tokens(conn)
    named = tokens - _NOT_HEADER_TOKENS
    if named and any(h[0].lower() in named for h in headers):
        headers = [h for h in headers if h[0].lower() not in named]
    return v11, status, reason, headers, cl, te, tokens


def _careful_header_lines(lines: list[bytes]) -> list[Header]:
    """Obsolete line folding, and the errors Go reports."""
    headers: list[Header] = []
    for i in range(1, len(lines)):
        line = lines[i]
        if not line:
            continue
        if line[0] in (32, 9):
            if not headers:
                raise BadResponse(f"malformed MIME header initial line {line[:64]!r}")
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t\r"))
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or 32 in name or 9 in name:
            raise BadResponse(f"malformed MIME header line {line[:64]!r}")
        headers.append((name, value.strip(b" \t\r")))
    return headers


# Response header names consumed by the proxy and never relayed (SPEC §9.2/§9.4); `Trailer`
# (the announcement) is kept.
_CONTENT_LENGTH = 1
_TRANSFER_ENCODING = 2
_CONNECTION = 3
_HOP = 4
_RESPONSE_SPECIAL = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"proxy-connection": _HOP,
    b"keep-alive": _HOP,
    b"proxy-authenticate": _HOP,
    b"proxy-authorization": _HOP,
    b"te": _HOP,
    b"upgrade": _HOP,
}
# Connection tokens that never name a relayed header (and Content-Length must survive).
_NOT_HEADER_TOKENS = frozenset((b"keep-alive", b"close", b"content-length", b""))
_NO_TOKENS: frozenset[bytes] = frozenset()
# Header name as received -> its code (0: relay); bounded like _CANONICAL.
_NAME_CODES: dict[bytes, int] = {}


def _name_code(name: bytes) -> int:
    code = _RESPONSE_SPECIAL.get(name.lower(), 0)
    if len(_NAME_CODES) < _CANONICAL_MAX:
        _NAME_CODES[name] = code
    return code


def split_response_headers(
    raw: list[Header],
) -> tuple[list[Header], list[bytes], list[bytes], frozenset[bytes] | set[bytes]]:
    """Split framing and hop-by-hop headers off an upstream's headers.

    Returns (relayed headers, the first ``Content-Length`` among them; all ``Content-Length``
    values, ``Transfer-Encoding`` values, the lower-cased ``Connection`` tokens).
    """
    headers: list[Header] = []
    cl: list[bytes] = []
    te: list[bytes] = []
    conn: list[bytes] = []
    codes = _NAME_CODES
    for h in raw:
        code = codes.get(h[0])
        if code is None:
            code = _name_code(h[0])
        if not code:
            headers.append(h)
        elif code == _CONTENT_LENGTH:
            if not cl:
                headers.append(h)
            cl.append(h[1])
        elif code == _TRANSFER_ENCODING:
            te.append(h[1])
        elif code == _CONNECTION:
            conn.append(h[1])
    if not conn:
        return headers, cl, te, _NO_TOKENS
    tokens = connection_tokens(conn)
    named = tokens - _NOT_HEADER_TOKENS
    if named and any(h[0].lower() in named for h in headers):
        headers = [h for h in headers if h[0].lower() not in named]
    return headers, cl, te, tokens


# -- chunked bodies ----------------------------------------------------------------------------

_SIZE, _DATA, _CR, _LF, _TRAILER, _DONE = range(6)


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder; trailers are read and dropped.

    ``strict`` (request bodies, as Go's server): trailer lines must look like header lines
    and stay under :data:`MAX_TRAILER_BYTES`.  Both sides require the CRLF after each
    chunk's data and accept at most 16 hex digits of size, with extensions ignored.
    """

    __slots__ = ("state", "remaining", "partial", "trailer", "strict")

    def __init__(self, strict: bool = True) -> None:
        self.state = _SIZE
        self.remaining = 0
        self.partial = b""
        self.trailer = 0
        self.strict = strict

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes, out: list[bytes]) -> bytes | None:
        """Append the body bytes found in ``data`` to ``out`` (slices of ``data``; all of it
        when it is all body); return the bytes after the body once it is complete, None
        while more is needed.  Raises :class:`MalformedBody` (``out`` keeps what came
        before the error)."""
        pos = 0
        end = len(data)
        while pos < end:
            state = self.state
            if state == _DATA:
                take = end - pos
                if take > self.remaining:
                    take = self.remaining
                out.append(data if take == end else data[pos : pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _CR
            elif state == _CR:
                if data[pos] != 13:
                    raise MalformedBody("malformed chunked encoding")
                pos += 1
                self.state = _LF
            elif state == _LF:
                if data[pos] != 10:
                    raise MalformedBody("malformed chunked encoding")
                pos += 1
                self.state = _SIZE
            elif state == _DONE:
                return data[pos:]
            else:  # _SIZE or _TRAILER: line based
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.partial += data[pos:]
                    if len(self.partial) > MAX_CHUNK_LINE:
                        raise MalformedBody("chunk line too long")
                    return None
                line = data[pos:nl]
                if self.partial:
                    line = self.partial + line
                    self.partial = b""
                pos = nl + 1
                if len(line) > MAX_CHUNK_LINE:
                    raise MalformedBody("chunk line too long")
                line = line.rstrip(b" \t\r")
                if state == _SIZE:
                    size = line.split(b";", 1)[0].rstrip(b" \t")
                    if not size or len(size) > 16 or size.translate(None, _HEX_BYTES):
                        raise MalformedBody("invalid byte in chunk length")
                    n = int(size, 16)
                    if n:
                        self.remaining = n
                        self.state = _DATA
                    else:
                        self.state = _TRAILER
                elif not line:
                    self.state = _DONE
                    return data[pos:]
                elif self.strict:
                    self.trailer += len(line)
                    if self.trailer > MAX_TRAILER_BYTES or b":" not in line:
                        raise MalformedBody("malformed trailer")
        return b"" if self.state == _DONE else None


def response_status_line(version11: bool, status: int, reason: bytes | None) -> bytes:
    """``HTTP/1.x <status> <reason>\\r\\n`` (the reason phrase Go would use when none)."""
    if reason is None:
        reason = REASONS.get(status, b"")
    return b"%s %d %s\r\n" % (b"HTTP/1.1" if version11 else b"HTTP/1.0", status, reason)


#: Reason phrases (Go's http.StatusText), for the responses the proxy makes itself.
REASONS: dict[int, bytes] = {
    100: b"Continue",
    101: b"Switching Protocols",
    102: b"Processing",
    103: b"Early Hints",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    203: b"Non-Authoritative Information",
    204: b"No Content",
    205: b"Reset Content",
    206: b"Partial Content",
    300: b"Multiple Choices",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    411: b"Length Required",
    412: b"Precondition Failed",
    413: b"Request Entity Too Large",
    414: b"Request URI Too Long",
    415: b"Unsupported Media Type",
    416: b"Requested Range Not Satisfiable",
    417: b"Expectation Failed",
    418: b"I'm a teapot",
    421: b"Misdirected Request",
    422: b"Unprocessable Entity",
    425: b"Too Early",
    426: b"Upgrade Required",
    428: b"Precondition Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_response(status: int, detail: str = "") -> bytes:
    """The answer to a refused request, Go's shape: plain text, ``Connection: close``, body =
    status and reason (plus a detail)."""
    reason = REASONS.get(status, b"Error")
    if status == 501:
        body = b"Unsupported transfer encoding"
    elif status == 417:
        body = b""
    else:
        body = b"%d %s" % (status, reason)
        if detail:
            body += b": " + detail.encode("ascii", "replace")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (status, reason, len(body), body)
    )
