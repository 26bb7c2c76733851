"""Micro-benchmark: the project's HTTP/1 request parser against ``httptools`` (llhttp).

Both produce what the pipeline needs from a request head: method, target, version and a
``{canonical name: [values]}`` header map, then run the same checks (``Host``, framing, target;
``finish_request_head``), since llhttp alone does not give SPEC §4.3's statuses.  httptools
does its parsing in C but calls back into Python for the URL, every header name and value,
and the end of the head; the Python codec finds the blank line, splits the complete head once
and partitions each line.
Run with the project's virtualenv (``pip install httptools`` for the comparison):

    .venv/bin/python bench/codec_micro.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kamal_proxy.proxy.http1 import (  # noqa: E402
    canonical_name,
    find_head_end,
    finish_request_head,
    parse_request_head,
)

HEADS = {
    "wrk (Host only)": b"GET /small HTTP/1.1\r\nHost: bench.test\r\n\r\n",
    "browser (13 headers)": (
        b"GET /assets/application-3f2a.css?v=12 HTTP/1.1\r\nHost: app.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
        b"Accept: text/css,*/*;q=0.1\r\nAccept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br, zstd\r\nReferer: https://app.example.com/\r\n"
        b"Connection: keep-alive\r\nCookie: _session=abcdef0123456789; kamal-writer=17\r\n"
        b"Sec-Fetch-Dest: style\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\n"
        b"Priority: u=2\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    ),
}


def python_codec(data: bytes):
    end, after = find_head_end(data)
    return parse_request_head(data[:end])


def make_httptools():
    import httptools

    class Collector:
        __slots__ = ("headers", "url", "done")

        def __init__(self) -> None:
            self.headers: dict[bytes, list[bytes]] = {}
            self.url = b""
            self.done = False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            canon = canonical_name(name)
            values = self.headers.get(canon)
            if values is None:
                self.headers[canon] = [value]
            else:
                values.append(value)

        def on_headers_complete(self) -> None:
            self.done = True

    def parse(data: bytes):
        collector = Collector()
        parser = httptools.HttpRequestParser(collector)
        parser.feed_data(data)
        version = parser.get_http_version()
        # The same checks as the Python codec after its split (Host, framing, target, ...).
        return finish_request_head(
            parser.get_method(), collector.url, b"HTTP/" + version.encode(), version != "1.0",
            collector.headers,
        )  # fmt: skip

    return parse


def main() -> int:
    parsers = {"python codec": python_codec}
    try:
        parsers["httptools " + __import__("httptools").__version__] = make_httptools()
    except ImportError:
        print("httptools not installed: measuring the Python codec only")
    for label, data in HEADS.items():
        for name, parse in parsers.items():
            parse(data)
            n = 200_000
            best = min(timeit.repeat(lambda: parse(data), number=n, repeat=5))  # noqa: B023
            print(f"{label:22} {name:18} {best / n * 1e6:6.2f} µs per head")
    return 0


if __name__ == "__main__":
    sys.exit(main())
