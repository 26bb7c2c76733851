"""The end-to-end upstream of ``upstream_app.py`` with Nagle's algorithm disabled.

``upstream_app``'s handler writes the status/headers and the body in separate ``send`` calls;
with Nagle on, every keep-alive request then waits for the peer's delayed ACK (~40 ms), which
makes tests that send hundreds of requests (rollout shares, metrics) slow.  The behaviour and
the endpoints are otherwise exactly those of ``upstream_app.py`` (run it the same way).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import upstream_app  # noqa: E402

upstream_app.Handler.disable_nagle_algorithm = True

if __name__ == "__main__":
    upstream_app.main()
