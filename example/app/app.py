"""A tiny web app for the kamal-proxy example: answers with its version, and 200 on /up."""

from __future__ import annotations

import argparse
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    version = os.environ.get("VERSION", "v1")

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.startswith("/slow"):
            time.sleep(1)
        body = b"OK" if self.path == "/up" else f"Hello from {self.version}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--host", default=os.environ.get("BIND", "0.0.0.0"))
    parser.add_argument("--version", default=Handler.version)
    args = parser.parse_args()
    Handler.version = args.version
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
