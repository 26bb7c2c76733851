"""Error pages (SPEC §11): the built-in pages and custom Go-template pages per service.

Custom pages are Go ``html/template`` files; this module implements the subset that error
pages use (``{{ .Message }}``, ``{{ if }}``/``{{ else if }}``/``{{ else }}``/``{{ end }}``,
comments and ``{{-``/``-}}`` trim markers). Anything else is a parse error, reported at deploy
time exactly like a template that Go would refuse.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "ErrorPages",
    "PagesError",
    "builtin_page",
    "escape_html",
    "status_text",
    "write_error",
]

HTML_CONTENT_TYPE = b"text/html; charset=utf-8"


class PagesError(Exception):
    """A custom error page directory that cannot be loaded (missing, empty or unparsable)."""


# Go's net/http StatusText (its spelling differs from Python's in places, e.g. 418).
_STATUS_TEXT = {
    100: "Continue",
    101: "Switching Protocols",
    102: "Processing",
    103: "Early Hints",
    200: "OK",
    201: "Created",
    202: "Accepted",
    203: "Non-Authoritative Information",
    204: "No Content",
    205: "Reset Content",
    206: "Partial Content",
    207: "Multi-Status",
    208: "Already Reported",
    226: "IM Used",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    305: "Use Proxy",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Request Entity Too Large",
    414: "Request URI Too Long",
    415: "Unsupported Media Type",
    416: "Requested Range Not Satisfiable",
    417: "Expectation Failed",
    418: "I'm a teapot",
    421: "Misdirected Request",
    422: "Unprocessable Entity",
    423: "Locked",
    424: "Failed Dependency",
    425: "Too Early",
    426: "Upgrade Required",
    428: "Precondition Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    451: "Unavailable For Legal Reasons",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
    506: "Variant Also Negotiates",
    507: "Insufficient Storage",
    508: "Loop Detected",
    510: "Not Extended",
    511: "Network Authentication Required",
}


def status_text(status: int) -> str:
    """Go's ``http.StatusText`` (``""`` for unknown codes)."""
    return _STATUS_TEXT.get(status, "")


_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&#34;",
        "'": "&#39;",
        "+": "&#43;",
        "\x00": "\ufffd",
    }
)


def escape_html(text: str) -> str:
    """Go ``html/template`` text-context escaping (not ``html.escape``: other entities)."""
    return text.translate(_ESCAPES)


# --------------------------------------------------------------------------------------------
# Built-in pages

_PAGES = {
    404: (
        "Not Found",
        "<strong>The page you were looking for doesn\u2019t exist.</strong> You may have "
        "mistyped the address or the page may have moved. If you are the application owner "
        "check the logs for more information.",
    ),
    413: (
        "Content Too Large",
        "<strong>The file or data you are trying to upload exceeds the allowed size.</strong> "
        "Please try again<br> with a smaller file. If you continue to see this error, contact "
        "the application owner.",
    ),
    502: (
        "Bad Gateway",
        "<strong>The server received an invalid response.</strong> Please try again later.<br> "
        "If you continue to see this error, please contact the application owner.",
    ),
    503: (
        "Service Temporarily Unavailable",
        "<strong>The service is temporarily unavailable.</strong> It may be overloaded,<br> or "
        "undergoing scheduled maintenance. Please try again later.",
    ),
    504: (
        "Gateway Timeout",
        "<strong>The service did not respond within the allowed time limit.</strong> It may be "
        "overloaded,<br> or there may be a temporary technical issue. Please try again later.",
    ),
}

_LAYOUT = """<!doctype html>
<html lang="en">
  <head>
    <title>{status} \u2014 {reason}</title>
    <meta charset="utf-8">
    <meta name="viewport" content="initial-scale=1, width=device-width">
    <meta name="robots" content="noindex, nofollow">
    <style>
      *, *::before, *::after {{ box-sizing: border-box; }}
      * {{ margin: 0; }}
      html {{ font-size: 16px; }}
      body {{
        background: #0971D5;
        color: #FFF;
        display: grid;
        font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial,
          sans-serif;
        font-size: clamp(1rem, 2.5vw, 2rem);
        -webkit-font-smoothing: antialiased;
        line-height: 1.5;
        min-height: 100vh;
        place-items: center;
        text-align: center;
      }}
      main {{ display: grid; gap: 1em; padding: 2em; place-items: center; }}
      header {{ width: min(100%, 12em); }}
      header svg {{ height: auto; max-width: 100%; width: 100%; }}
      article {{ width: min(100%, 30em); }}
      strong {{ font-weight: 800; }}
    </style>
  </head>
  <body>
    <main>
      <header>
        <svg viewBox="0 0 300 140" xmlns="http://www.w3.org/2000/svg" aria-hidden="true">
          <text x="150" y="110" text-anchor="middle" font-size="120" font-weight="800"
            fill="currentColor" fill-opacity="0.1">{status}</text>
          <text x="150" y="80" text-anchor="middle" font-size="22" font-weight="700"
            fill="currentColor">{reason}</text>
        </svg>
      </header>
      <article>
        <p>{text}</p>
      </article>
    </main>
  </body>
</html>
"""


def builtin_page(status: int, message: str | None = None) -> bytes:
    """The root renderer's page (SPEC §11.2): a designed page for 404/413/502/503/504 (the
    503 shows the escaped stop message when there is one), ``<h1>`` fallback otherwise."""
    page = _PAGES.get(status)
    if page is None:
        return f"<h1>{status} {status_text(status)}</h1>".encode()
    reason, text = page
    if status == 503 and message:
        text = escape_html(message)
    return _LAYOUT.format(status=status, reason=reason, text=text).encode()


# --------------------------------------------------------------------------------------------
# Custom pages: a Go template subset


@dataclass(frozen=True, slots=True)
class _Text:
    text: str


@dataclass(frozen=True, slots=True)
class _Field:
    path: tuple[str, ...]  # () is the dot itself


@dataclass(frozen=True, slots=True)
class _If:
    branches: tuple[tuple[_Field, tuple[Any, ...]], ...]
    otherwise: tuple[Any, ...]


_Node = Union[_Text, _Field, _If]

_FIELD = re.compile(r"\.(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?\Z")
_SPACE = " \t\r\n"


class _RenderError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _StopData:
    """The template data of a ``stop`` 503 (Go: a struct with one field, ``Message``)."""

    message: str


def _tokenize(source: str, name: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", inner) tokens, applying trim markers."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            if text:
                tokens.append(("text", text))
            return tokens
        inner_start = start + 2
        marker = source[inner_start + 1 : inner_start + 2]
        trim_prev = source.startswith("-", inner_start) and marker != "" and marker in _SPACE
        if trim_prev:
            text = text.rstrip(_SPACE)
            inner_start += 2
        if text:
            tokens.append(("text", text))
        if source.startswith("/*", inner_start):
            close = source.find("*/", inner_start + 2)
            if close < 0:
                raise PagesError(f"template: {name}: unclosed comment")
            after = close + 2
            trim_next = False
            gap = source[after : after + 1]
            if gap != "" and gap in _SPACE and source.startswith("-}}", after + 1):
                trim_next = True
                after = source.find("}}", after) + 2
            elif source.startswith("}}", after):
                after += 2
            else:
                raise PagesError(f"template: {name}: comment ends before closing delimiter")
            pos = after
            continue
        end = source.find("}}", inner_start)
        if end < 0:
            raise PagesError(f"template: {name}: unclosed action")
        inner = source[inner_start:end]
        trim_next = False
        if len(inner) >= 2 and inner.endswith("-") and inner[-2] in _SPACE:
            trim_next = True
            inner = inner[:-1]
        if "{{" in inner:
            raise PagesError(f'template: {name}: unexpected "{{{{" in command')
        tokens.append(("action", inner.strip(_SPACE)))
        pos = end + 2


def _parse_field(expr: str, name: str) -> _Field:
    if not _FIELD.match(expr):
        raise PagesError(f"template: {name}: unsupported or invalid action {{{{{expr}}}}}")
    if expr == ".":
        return _Field(())
    return _Field(tuple(expr[1:].split(".")))


def _parse(source: str, name: str) -> tuple[Any, ...]:
    tokens = _tokenize(source, name)
    # Stack of frames: (nodes list, if-branches, current condition, in_else)
    root: list[Any] = []
    stack: list[dict[str, Any]] = []
    current = root
    for kind, value in tokens:
        if kind == "text":
            current.append(_Text(value))
            continue
        words = value.split(None, 1)
        if not words:
            raise PagesError(f"template: {name}: missing value for command")
        keyword = words[0]
        rest = words[1].strip(_SPACE) if len(words) > 1 else ""
        if keyword == "if":
            if not rest:
                raise PagesError(f"template: {name}: missing value for if")
            frame = {
                "branches": [],
                "cond": _parse_field(rest, name),
                "else": None,
                "parent": current,
            }
            stack.append(frame)
            current = []
            frame["body"] = current
        elif keyword == "else":
            if not stack or stack[-1]["else"] is not None:
                raise PagesError(f"template: {name}: unexpected {{{{else}}}}")
            frame = stack[-1]
            frame["branches"].append((frame["cond"], tuple(frame["body"])))
            if rest.startswith("if ") or rest.startswith("if\t"):
                frame["cond"] = _parse_field(rest[2:].strip(_SPACE), name)
                current = []
                frame["body"] = current
            elif rest:
                raise PagesError(f"template: {name}: unexpected {rest!r} in else")
            else:
                frame["cond"] = None
                current = []
                frame["else"] = current
        elif keyword == "end":
            if rest or not stack:
                raise PagesError(f"template: {name}: unexpected {{{{end}}}}")
            frame = stack.pop()
            if frame["else"] is None:
                frame["branches"].append((frame["cond"], tuple(frame["body"])))
                otherwise: tuple[Any, ...] = ()
            else:
                otherwise = tuple(frame["else"])
            current = frame["parent"]
            current.append(_If(tuple(frame["branches"]), otherwise))
        else:
            current.append(_parse_field(value, name))
    if stack:
        raise PagesError(f"template: {name}: unexpected EOF")
    return tuple(root)


def _lookup(field: _Field, data: Any) -> Any:
    value = data
    for part in field.path:
        if value is None:
            return None  # Go: fields of nil data evaluate to nothing
        if isinstance(value, _StopData) and part == "Message":
            value = value.message
        else:
            raise _RenderError(f"can't evaluate field {part}")
    return value


def _truth(value: Any) -> bool:
    if isinstance(value, _StopData):
        return True
    return bool(value)


def _render_nodes(nodes: tuple[Any, ...], data: Any, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Field):
            value = _lookup(node, data)
            if value is None:
                continue
            if isinstance(value, _StopData):
                value = "{" + value.message + "}"
            out.append(escape_html(str(value)))
        else:
            for cond, body in node.branches:
                if _truth(_lookup(cond, data)):
                    _render_nodes(body, data, out)
                    break
            else:
                _render_nodes(node.otherwise, data, out)


class ErrorPages:
    """A service's custom error pages (``--error-pages DIR``), loaded once per deploy."""

    def __init__(self, directory: str, templates: dict[str, tuple[Any, ...]]) -> None:
        self.directory = directory
        self._templates = templates

    @classmethod
    def load(cls, directory: str) -> ErrorPages:
        """Parse every ``DIR/*.html`` (top level); raises ``PagesError`` with the detail."""
        try:
            names = sorted(
                entry
                for entry in os.listdir(directory)
                if entry.endswith(".html") and os.path.isfile(os.path.join(directory, entry))
            )
        except OSError as error:
            raise PagesError(f"unable to read {directory}: {error.strerror or error}") from None
        if not names:
            raise PagesError(f"template: pattern matches no files: `{directory}/*.html`")
        templates: dict[str, tuple[Any, ...]] = {}
        for name in names:
            try:
                with open(os.path.join(directory, name), "rb") as handle:
                    source = handle.read().decode("utf-8", "replace")
            except OSError as error:
                raise PagesError(f"unable to read {name}: {error.strerror or error}") from None
            templates[name] = _parse(source, name)
        return cls(directory, templates)

    def has_page(self, status: int) -> bool:
        return f"{status}.html" in self._templates

    def render(self, status: int, message: str | None = None) -> bytes | None:
        """The page for ``status``; None when there is no template for it or it fails to
        render (the root renderer then writes the built-in page).

        ``message`` is the stop message of a ``stop`` 503 (possibly ``""``); None means the
        template data is null (every other error)."""
        nodes = self._templates.get(f"{status}.html")
        if nodes is None:
            return None
        data = None if message is None else _StopData(message)
        out: list[str] = []
        try:
            _render_nodes(nodes, data, out)
        except _RenderError:
            return None
        return "".join(out).encode()


def render_page(status: int, message: str | None = None, custom: ErrorPages | None = None) -> bytes:
    """The custom page when there is one for ``status``, else the built-in one."""
    if custom is not None:
        body = custom.render(status, message)
        if body is not None:
            return body
    return builtin_page(status, message)


def write_error(
    request: Any, status: int, message: str | None = None, custom: ErrorPages | None = None
) -> bool:
    """Answer ``request`` with the error page for ``status`` and finish it.

    Does nothing (returns False) when the response has already started or the client left.
    """
    if request.startedWriting or request.finished or getattr(request, "gone", False):
        return False
    body = render_page(status, message, custom)
    request.setResponseCode(status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [HTML_CONTENT_TYPE])
    headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()
    return True
