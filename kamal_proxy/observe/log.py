"""JSON logs on stdout (SPEC §17): one object per line, Go ``slog`` JSON handler layout.

Ordinary messages go through ``twisted.logger`` (``emit``/``info``/...), so tests and tools can
observe them; the observer installed by ``start_logging`` writes ours as JSON and sends nothing
else to stdout (library errors and tracebacks go to stderr, Twisted's chatter is dropped).
The request log line is on the hot path and is written directly by ``log_request_line``.

Under twistd's own text log (``twistd kamal-proxy`` without ``--logger``), every event reads
as a sentence with its fields (``Target health updated: target=web:3000 state=healthy``,
``format_text``), and :class:`TextLog` turns request lines into such events too, so that a
daemonised twistd writes them to its log file; workers' lines are relayed there (``relay``).
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText, globalLogBeginner
from twisted.python.failure import Failure

__all__ = [
    "DEBUG",
    "ERROR",
    "INFO",
    "REQUEST_KEYS",
    "WARN",
    "JsonLog",
    "TextLog",
    "debug",
    "emit",
    "error",
    "format_text",
    "format_time",
    "header_log_key",
    "info",
    "format_request_line",
    "log_request_line",
    "relay",
    "set_debug",
    "start_logging",
    "warn",
]

DEBUG = "DEBUG"
INFO = "INFO"
WARN = "WARN"
ERROR = "ERROR"

_RANK = {DEBUG: 0, INFO: 1, WARN: 2, ERROR: 3}
_TWISTED_LEVEL = {
    DEBUG: LogLevel.debug,
    INFO: LogLevel.info,
    WARN: LogLevel.warn,
    ERROR: LogLevel.error,
}

# SPEC §17.2, in order; custom req_/resp_ header keys follow.
REQUEST_KEYS = (
    "host",
    "port",
    "path",
    "request_id",
    "status",
    "service",
    "target",
    "duration",
    "method",
    "req_content_length",
    "req_content_type",
    "resp_content_length",
    "resp_content_type",
    "client_addr",
    "client_port",
    "remote_addr",
    "user_agent",
    "proto",
    "scheme",
    "query",
)

_REQUEST_KEY_SET = frozenset(REQUEST_KEYS)

_encode_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_default).encode


def header_log_key(prefix: str, name: str) -> str:
    """``req_``/``resp_`` key for a configured header (Go: canonicalise, lower, ``-`` → ``_``)."""
    return prefix + name.lower().replace("-", "_")


# --------------------------------------------------------------------------------------------
# Time: Go's time.RFC3339Nano in the local zone (``Z`` when the offset is zero).

_second_cache: list[Any] = [None, ""]


def format_time(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    if seconds != _second_cache[0]:
        local = time.localtime(seconds)
        offset = local.tm_gmtoff or 0
        if offset == 0:
            zone = "Z"
        else:
            sign = "+" if offset > 0 else "-"
            hours, minutes = divmod(abs(offset) // 60, 60)
            zone = f"{sign}{hours:02d}:{minutes:02d}"
        _second_cache[1] = (time.strftime("%Y-%m-%dT%H:%M:%S", local), zone)
        _second_cache[0] = seconds
    stamp, zone = _second_cache[1]
    if fraction:
        return f"{stamp}.{f'{fraction:09d}'.rstrip('0')}{zone}"
    return stamp + zone


# --------------------------------------------------------------------------------------------
# Values


def _json_value(value: Any) -> str:
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int or kind is float:
        return _dumps(value)
    if isinstance(value, bytes):
        return _encode_str(value.decode("utf-8", "replace"))
    if isinstance(value, Failure):
        return _encode_str(value.getErrorMessage())
    if isinstance(value, BaseException):
        return _encode_str(str(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ",".join(_json_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(_encode_str(str(k)) + ":" + _json_value(v) for k, v in value.items())
            + "}"
        )
    return _encode_str(str(value))


def _go_safe(line: str) -> str:
    # Go's JSON encoder escapes the two JavaScript line separators; Python's does not.
    if "\u2028" in line or "\u2029" in line:
        line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return line


# The §17.2 line with its built-in keys, filled by ``format_request_line``: Go slog's layout,
# built with one %-format instead of a dict and a generic JSON encoder per request.
_REQUEST_LINE = (
    '{"time":"%s","level":"INFO","msg":"Request","host":%s,"port":%d,"path":%s,'
    '"request_id":%s,"status":%d,"service":%s,"target":%s,"duration":%d,"method":%s,'
    '"req_content_length":%d,"req_content_type":%s,"resp_content_length":%d,'
    '"resp_content_type":%s,"client_addr":%s,"client_port":%s,"remote_addr":%s,'
    '"user_agent":%s,"proto":%s,"scheme":%s,"query":%s'
)


def format_request_line(
    now_ns: int, values: tuple[Any, ...], extra: Iterable[tuple[str, Any]] | None = None
) -> str:
    """The request log line (with its newline) for ``values``: the ``REQUEST_KEYS`` values
    in order, ``str`` or ``int`` as SPEC §17.2 types them; then ``extra`` (key, value) pairs.
    The same bytes as ``JsonLog.request`` writes, Go's escaping rules included."""
    (host, port, path, request_id, status, service, target, duration, method, req_len,
     req_type, resp_len, resp_type, client_addr, client_port, remote_addr, user_agent,
     proto, scheme, query) = values  # fmt: skip
    enc = _encode_str
    text = _REQUEST_LINE % (
        format_time(now_ns), enc(host), port, enc(path), enc(request_id), status, enc(service),
        enc(target), duration, enc(method), req_len, enc(req_type), resp_len, enc(resp_type),
        enc(client_addr), enc(client_port), enc(remote_addr), enc(user_agent), enc(proto),
        enc(scheme), enc(query),
    )  # fmt: skip
    if extra:
        text += "".join("," + enc(key) + ":" + _json_value(value) for key, value in extra)
    return _go_safe(text + "}\n")


# --------------------------------------------------------------------------------------------
# The writer


class JsonLog:
    """Writes JSON log lines to ``stream``; also a ``twisted.logger`` observer."""

    #: Whether worker processes' output must come through this process (``TextLog``).
    relays_workers = False

    def __init__(
        self,
        stream: IO[str],
        debug: bool = False,
        error_stream: IO[str] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.stream = stream
        self.min_rank = 0 if debug else 1
        self.error_stream = error_stream
        self.clock = clock
        # Request lines are flushed once per reactor turn rather than once per line: under
        # load that is one write system call for many requests (set by ``batch_flushes``).
        self._call_soon: Callable[..., Any] | None = None
        self._pending: list[str] = []

    def batch_flushes(self, call_soon: Callable[..., Any]) -> None:
        """Flush request lines from ``call_soon(0, ...)`` (e.g. ``reactor.callLater``)."""
        self._call_soon = call_soon

    def flush(self) -> None:
        """Write the lines held for this turn, in order, in as few writes as whole lines allow."""
        pending = self._pending
        if pending:
            self._pending = []
            write_lines(self.stream, pending)
        else:
            self.stream.flush()

    def line(self, level: str, msg: str, attrs: Iterable[tuple[str, Any]] = ()) -> None:
        """Write one line: time, level, msg, then ``attrs`` in order (duplicates kept)."""
        if _RANK.get(level, 1) < self.min_rank:
            return
        parts = [
            '{"time":"',
            format_time(self.clock()),
            '","level":"',
            level,
            '","msg":',
            _encode_str(msg),
        ]
        for key, value in attrs:
            parts += (",", _encode_str(key), ":", _json_value(value))
        parts.append("}\n")
        self._write(_go_safe("".join(parts)))

    def request(self, fields: dict[str, Any], extra: Iterable[tuple[str, Any]] = ()) -> None:
        """The §17.2 request line from a dict: the built-in keys in spec order (missing ones
        log ``""``), then the dict's other keys, then ``extra``.  The proxy writes the same
        bytes from a tuple with ``request_line``; this is the readable form of it."""
        if self.min_rank > 1:
            return
        get = fields.get
        record = {"time": format_time(self.clock()), "level": "INFO", "msg": "Request"}
        for key in REQUEST_KEYS:
            record[key] = get(key, "")
        if not _REQUEST_KEY_SET.issuperset(fields):
            for key, value in fields.items():
                if key not in _REQUEST_KEY_SET:
                    record[key] = value
        text = _dumps(record)
        if extra:
            tail = "".join(
                "," + _encode_str(key) + ":" + _json_value(value) for key, value in extra
            )
            text = text[:-1] + tail + "}"
        self._queue(_go_safe(text + "\n"))

    def request_line(
        self,
        now_ns: int,
        values: tuple[Any, ...],
        extra: Iterable[tuple[str, Any]] | None = None,
    ) -> None:
        """The §17.2 line from ``format_request_line``'s arguments (the proxy's hot path)."""
        if self.min_rank > 1:
            return
        self._queue(format_request_line(now_ns, values, extra))

    def _queue(self, text: str) -> None:
        if self._call_soon is None:
            self._write(text)
            return
        pending = self._pending
        pending.append(text)
        if len(pending) == 1:
            self._call_soon(0, self.flush)

    def _write(self, text: str) -> None:
        # Request lines held for this turn go first, so the stream keeps the events' order.
        self._pending.append(text)
        self.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        """twisted.logger observer: ours as JSON; library errors to stderr; the rest dropped."""
        msg = event.get("kp_msg")
        if msg is not None:
            self.line(event.get("kp_level", INFO), msg, event.get("kp_attrs", ()))
            return
        level = event.get("log_level")
        if self.error_stream is None:
            return
        if event.get("log_failure") is not None or (level is not None and level >= LogLevel.error):
            text = formatEventAsClassicLogText(event)
            if text:
                self.error_stream.write(text)
                self.error_stream.flush()


# --------------------------------------------------------------------------------------------
# Writing: whole lines, at most PIPE_BUF bytes per write.
#
# Worker processes share the main process's stdout.  POSIX makes a write of at most PIPE_BUF
# bytes to a pipe atomic, so lines never interleave or tear as long as each write holds whole
# lines and stays within it (a single longer line is still written with as few calls as the
# kernel allows).  Files opened for appending behave the same for such writes.

PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)  # 4096 on Linux; 512 is the POSIX floor
_WRITE_WAIT = 1.0


def line_batches(lines: Iterable[str], limit: int = PIPE_BUF) -> list[bytes]:
    """``lines`` (each ending in a newline) encoded and packed into writes of whole lines of
    at most ``limit`` bytes; a longer line is a write of its own."""
    batches: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        data = _encode(line)
        if current and size + len(data) > limit:
            batches.append(b"".join(current))
            current, size = [], 0
        current.append(data)
        size += len(data)
    if current:
        batches.append(b"".join(current))
    return batches


def _encode(line: str) -> bytes:
    try:
        # Raw bytes a decoder kept as surrogates go out as they came in.
        return line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return line.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")


def write_lines(stream: IO[str], lines: list[str]) -> None:
    """Write ``lines`` to ``stream``: straight to its file descriptor when it has one (after
    anything it buffered), else through ``stream.write``, one call per batch."""
    stream.flush()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    for batch in line_batches(lines):
        if fd is None:
            stream.write(batch.decode("utf-8", "surrogateescape"))
            stream.flush()
        else:
            _write_all(fd, batch)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Someone made the shared descriptor non-blocking: wait for room, boundedly.
            _, ready, _ = select.select([], [fd], [], _WRITE_WAIT)
            if not ready:
                return
            continue
        except OSError:
            return  # stdout is gone (closed pipe): logging must not take the server down
        view = view[written:]


class TextLog(JsonLog):
    """Request lines as events of twistd's text log (``Request: host=... status=200 ...``).

    The proxy writes request lines through the active ``JsonLog``; under twistd's text log
    this one turns each line back into an event, so it lands in twistd's log file (a daemon's
    stdout is ``/dev/null``).  It costs a JSON parse per request, in that mode only.  Worker
    processes' output is relayed here too (``relays_workers``).
    """

    relays_workers = True

    def __init__(self, debug: bool = False) -> None:
        super().__init__(sys.stdout, debug=debug, error_stream=None)

    def _queue(self, text: str) -> None:
        for line in text.splitlines():
            relay(line)

    _write = _queue


def relay(line: str) -> None:
    """A JSON log line written by another process (a worker) or by ``JsonLog``, as an event of
    this process's log; anything else as an ``Output`` error event."""
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("msg"), str):
        emit(ERROR, "Output", text=line)
        return
    record.pop("time", None)
    level = record.pop("level", INFO)
    msg = record.pop("msg")
    emit(level if level in _RANK else INFO, msg, **record)


# --------------------------------------------------------------------------------------------
# Text: for observers other than ours (twistd's log file), in the manner of Go slog's text
# handler: ``msg: key=value key="with spaces" list=[a b]``.


def format_text(msg: str, attrs: Iterable[tuple[str, Any]]) -> str:
    """``msg`` and its attributes as one readable line."""
    fields = " ".join(f"{key}={_text_value(value)}" for key, value in attrs)
    return f"{msg}: {fields}" if fields else msg


def _text_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + " ".join(_text_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return _dumps(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    elif isinstance(value, Failure):
        value = value.getErrorMessage()
    elif not isinstance(value, str):
        value = str(value)
    if value and _PLAIN_TEXT.match(value):
        return value
    return _encode_str(value)


# Printable, and nothing that would make the field ambiguous (spaces, quotes, '=', brackets).
_PLAIN_TEXT = re.compile(r'[^\s"=\[\]\\\x00-\x1f\x7f]+\Z')


_logger = Logger(namespace="kamal_proxy")
_active: JsonLog | None = None
#: Events below this rank are dropped before any observer sees them (``set_debug``).
_min_rank = 0


def set_debug(debug: bool) -> None:
    """DEBUG events only with ``--debug``: dropped at the source otherwise, whichever
    observers there are (our JSON writer also filters; twistd's text log does not)."""
    global _min_rank
    _min_rank = 0 if debug else 1


def start_logging(
    debug: bool = False,
    stream: IO[str] | None = None,
    error_stream: IO[str] | None = None,
    clock: Callable[[], int] = time.time_ns,
) -> JsonLog:
    """Install the JSON observer as the only global log observer (call once, at startup)."""
    global _active
    log = JsonLog(
        stream if stream is not None else sys.stdout,
        debug=debug,
        error_stream=error_stream if error_stream is not None else sys.stderr,
        clock=clock,
    )
    _active = log
    set_debug(debug)
    globalLogBeginner.beginLoggingTo(
        [log],
        discardBuffer=True,
        redirectStandardIO=False,
    )
    return log


def twistd_observer() -> JsonLog:
    """For ``twistd --logger kamal_proxy.observe.log.twistd_observer kamal-proxy``: the JSON
    lines of ``kamal-proxy run`` instead of twistd's text log (``DEBUG``/``KAMAL_PROXY_DEBUG``
    turn on debug lines, as for ``run``)."""
    from kamal_proxy.options import env_bool

    global _active
    log = JsonLog(sys.stdout, debug=env_bool("DEBUG", False), error_stream=sys.stderr)
    _active = log
    set_debug(log.min_rank == 0)
    return log


def active() -> JsonLog | None:
    return _active


def set_active(log: JsonLog | None) -> None:
    """Route ``log_request_line`` to ``log`` without touching Twisted's global observers (tests)."""
    global _active
    _active = log


def emit(level: str, msg: str, **attrs: Any) -> None:
    """Log ``msg`` at ``level`` (DEBUG/INFO/WARN/ERROR) with ``attrs`` in keyword order."""
    if _RANK.get(level, 1) < _min_rank:
        return
    items = tuple(attrs.items())
    _logger.emit(
        _TWISTED_LEVEL.get(level, LogLevel.info),
        # Readable in other observers too (twistd's text log): a sentence and its fields.
        "{kp_text}",
        kp_level=level,
        kp_msg=msg,
        kp_attrs=items,
        kp_text=format_text(msg, items),
    )


def debug(msg: str, **attrs: Any) -> None:
    emit(DEBUG, msg, **attrs)


def info(msg: str, **attrs: Any) -> None:
    emit(INFO, msg, **attrs)


def warn(msg: str, **attrs: Any) -> None:
    emit(WARN, msg, **attrs)


def error(msg: str, **attrs: Any) -> None:
    emit(ERROR, msg, **attrs)


def log_request_line(
    now_ns: int, values: tuple[Any, ...], extra: Iterable[tuple[str, Any]] | None = None
) -> None:
    """Write the request log line (see ``format_request_line``); a no-op before logging
    starts.  ``now_ns`` (wall clock) is the line's time."""
    log = _active
    if log is not None:
        log.request_line(now_ns, values, extra)
