"""A tiny origin that reads request bodies and throws them away (standard library only).

Used by buffering.py: unlike proxybench's nginx ``/sink`` (which keeps each body in memory),
it holds no more than one 256 KiB read per request, so 20 concurrent 50 MiB uploads cost the
origin nothing.  ``GET /up`` answers 200 (kamal-proxy's health check); any request with a body
gets 200 once the whole body is read, with ``X-Body-Bytes`` = the bytes it read.

    python bench/sink_origin.py PORT
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 256 * 1024


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass

    def _drain(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return total
                total += self._read(size)
                self.rfile.readline()
        return self._read(int(self.headers.get("Content-Length") or 0))

    def _read(self, n: int) -> int:
        left = n
        while left:
            got = self.rfile.read(min(CHUNK, left))
            if not got:
                raise ConnectionError("body cut short")
            left -= len(got)
        return n

    def _answer(self, body: bytes, read: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Body-Bytes", str(read))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._answer(b"OK\n", self._drain())

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._answer(b"ok\n", self._drain())

    do_PUT = do_POST


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main() -> None:
    Server(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()


if __name__ == "__main__":
    main()
