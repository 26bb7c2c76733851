"""Request/response buffering against the real process (SPEC §10, §3.6.3; scenarios 61, 74,
92-95, 169).

The proxy runs with ``TMPDIR`` pointing at a private directory so the ``proxy-buffer-*`` spill
files can be watched appearing under load and disappearing afterwards (also on errors).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile

from tests.integration.support import eventually, pattern_bytes, shared_proxy
from tests.integration.traffic_support import (
    TrafficTestCase,
    raw_request_head,
    read_response,
    shared_upstream,
    spill_files,
)

MIB = 1024 * 1024
SPILL_DIR = tempfile.mkdtemp(prefix="kp-spill-")
atexit.register(shutil.rmtree, SPILL_DIR, True)
INTERNAL_500 = b"<h1>500 Internal Server Error</h1>"


class BufferingTests(TrafficTestCase):
    def setUp(self):
        super().setUp()
        self.proxy = shared_proxy("BufferingTests", env={"TMPDIR": SPILL_DIR})
        self.up = shared_upstream("buffered")

    def assertNoSpillFiles(self):
        try:
            eventually(lambda: not spill_files(SPILL_DIR), timeout=5)
        except AssertionError:
            self.fail(f"spill files left behind: {spill_files(SPILL_DIR)}")

    def test_large_bodies_arrive_intact(self):
        """Scenario 169: a 3 MiB request and a 4 MiB response with 64 KiB of memory."""
        self.deploy(
            "bf-big",
            self.up.addr,
            "--host",
            "big.buffer",
            "--buffer-requests",
            "--buffer-responses",
            "--buffer-memory",
            "65536",
        )
        body = pattern_bytes(3 * MIB, 7)
        resp = self.proxy.request("POST", "/upload", host="big.buffer", body=body)
        info = resp.json()
        self.assertEqual(
            (info["length"], info["sha256"]), (len(body), hashlib.sha256(body).hexdigest())
        )
        resp = self.proxy.request(
            "POST", "/upload", host="big.buffer", body=iter([body[:MIB], body[MIB:]])
        )
        info = resp.json()
        self.assertEqual((info["length"], info["transfer_encoding"]), (len(body), "chunked"))
        resp = self.get("big.buffer", f"/big?bytes={4 * MIB}")
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.header("Content-Length"), str(4 * MIB))
        self.assertTrue(resp.body == pattern_bytes(4 * MIB), "4 MiB response corrupted")
        self.assertNoSpillFiles()

    def test_request_spill_file_appears_under_load_and_is_removed(self):
        """§10.1: a slow buffered upload spills to TMPDIR/proxy-buffer-*; the upstream sees
        nothing until the body is complete; the file is gone afterwards and after an abort."""
        up = self.upstream("spill")
        self.deploy(
            "bf-spill",
            up.addr,
            "--host",
            "spill.buffer",
            "--buffer-requests",
            "--buffer-memory",
            "65536",
        )
        self.assertNoSpillFiles()
        total = MIB
        body = pattern_bytes(total, 3)
        head = b"POST /upload HTTP/1.1\r\nHost: spill.buffer\r\nContent-Length: %d\r\n\r\n" % total
        sock = raw_request_head(self.proxy.http_port, head)
        try:
            sock.sendall(body[: total // 2])
            files = eventually(lambda: spill_files(SPILL_DIR), timeout=5)
            self.assertTrue(all(f.startswith("proxy-buffer-") for f in files), files)
            self.assertEqual(up.request_count(), 0, "upstream contacted before body complete")
            sock.sendall(body[total // 2 :])
            resp = read_response(sock)
            info = json.loads(resp.read())
            self.assertEqual(
                (resp.status, info["length"], info["sha256"]),
                (200, total, hashlib.sha256(body).hexdigest()),
            )
        finally:
            sock.close()
        self.assertNoSpillFiles()

        # A client that gives up mid-upload leaves nothing behind either.
        sock = raw_request_head(self.proxy.http_port, head)
        sock.sendall(body[: total // 2])
        eventually(lambda: spill_files(SPILL_DIR), timeout=5)
        sock.close()
        self.assertNoSpillFiles()
        self.assertEqual(up.request_count(), 1)

    def test_response_spill_and_chunked_response_fully_buffered(self):
        """§10.1, §10.3, scenario 94: with --buffer-memory 0 a slow chunked response spills
        to disk; the client gets the status only after the whole body arrived."""
        self.deploy(
            "bf-resp",
            self.up.addr,
            "--host",
            "resp.buffer",
            "--buffer-responses",
            "--buffer-memory",
            "0",
        )
        gate = self.gate(self.up)
        sock = raw_request_head(
            self.proxy.http_port,
            f"GET /stream?chunks=4&gate={gate} HTTP/1.1\r\nHost: resp.buffer\r\n\r\n".encode(),
        )
        self.addCleanup(sock.close)
        eventually(lambda: spill_files(SPILL_DIR), timeout=10)
        # The first chunk is spilled; the upstream holds back the rest: nothing is sent yet.
        sock.settimeout(0.2)
        with self.assertRaises(TimeoutError, msg="a buffered response must not be sent early"):
            sock.recv(1)
        self.up.release(gate, 4)
        resp = read_response(sock)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.read().decode(), "".join(f"chunk {i}\n" for i in range(4)))
        self.assertNoSpillFiles()

    def test_request_body_limit(self):
        """Scenario 169: --max-request-body 1000: 1001 → 413 (upstream untouched), 1000
        passes, a 1200-byte chunked upload → 413; the response direction is not limited."""
        up = self.upstream("reqlimit")
        self.deploy(
            "bf-req",
            up.addr,
            "--host",
            "req.buffer",
            "--buffer-requests",
            "--max-request-body",
            "1000",
            "--buffer-memory",
            "100",
        )
        resp = self.proxy.request("POST", "/upload", host="req.buffer", body=b"a" * 1001)
        self.assertErrorPage(resp, 413, "exceeds the allowed size")
        resp = self.proxy.request(
            "POST", "/upload", host="req.buffer", body=iter([b"b" * 600, b"b" * 600])
        )
        self.assertErrorPage(resp, 413)
        self.assertEqual(up.request_count(), 0, "413 must not reach the upstream")
        resp = self.proxy.request("POST", "/upload", host="req.buffer", body=b"c" * 1000)
        self.assertEqual((resp.status, resp.json()["length"]), (200, 1000))
        resp = self.get("req.buffer", "/big?bytes=5000")
        self.assertEqual((resp.status, len(resp.body)), (200, 5000))
        self.assertNoSpillFiles()

    def test_response_body_limit(self):
        """Scenario 169, §10.3: --max-response-body 1000: 1001 → 500 with exactly the <h1>
        body and none of the upstream's headers; chunked 5000 → 500, 900 → intact; requests
        are not limited."""
        self.deploy(
            "bf-resplimit",
            self.up.addr,
            "--host",
            "resplimit.buffer",
            "--buffer-responses",
            "--max-response-body",
            "1000",
            "--buffer-memory",
            "64",
        )
        mark = self.proxy.log_mark()
        for path in ("/big?bytes=1001", "/bigchunked?bytes=5000"):
            resp = self.get("resplimit.buffer", path)
            self.assertEqual(resp.status, 500, path)
            self.assertEqual(resp.body, INTERNAL_500, path)
            self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
            self.assertIsNone(resp.header("X-Upstream-Name"), "upstream headers leaked")
        self.proxy.wait_for_log("Response exceeded max response limit", since=mark, path="/big")
        resp = self.get("resplimit.buffer", "/big?bytes=1000")
        self.assertEqual((resp.status, resp.body), (200, pattern_bytes(1000)))
        resp = self.get("resplimit.buffer", "/bigchunked?bytes=900")
        self.assertEqual((resp.status, resp.body), (200, pattern_bytes(900)))
        resp = self.proxy.request("POST", "/upload", host="resplimit.buffer", body=b"d" * 5000)
        self.assertEqual(resp.json()["length"], 5000)
        self.assertNoSpillFiles()

    def test_no_limit_without_buffering(self):
        """§10.2, §21.1 #12: --buffer-requests=false --max-request-body=10 is accepted and
        enforces nothing: a 5 MiB upload passes."""
        self.deploy(
            "bf-none",
            self.up.addr,
            "--host",
            "none.buffer",
            "--buffer-requests=false",
            "--max-request-body=10",
        )
        body = pattern_bytes(5 * MIB)
        resp = self.proxy.request("POST", "/upload", host="none.buffer", body=body)
        self.assertEqual(resp.json()["sha256"], hashlib.sha256(body).hexdigest())
        line = self.cli_error(
            self.proxy, "deploy", "bf-x", "--target", self.up.addr, "--max-request-body", "10"
        )
        self.assertEqual(
            line, "Error: max-request-body can only be set when request buffering is enabled"
        )
        line = self.cli_error(
            self.proxy,
            "deploy",
            "bf-x",
            "--target",
            self.up.addr,
            "--max-response-body",
            "10",
            "--buffer-requests",
        )
        self.assertEqual(
            line, "Error: max-response-body can only be set when response buffering is enabled"
        )

    def test_sse_streams_through_buffering(self):
        """Scenarios 61, 169: an SSE event arrives at once with and without buffering."""
        self.deploy(
            "bf-sse",
            self.up.addr,
            "--host",
            "sse.buffer",
            "--buffer-requests",
            "--buffer-responses",
            "--buffer-memory",
            "1",
            "--max-response-body",
            "2",
            "--max-request-body",
            "2",
        )
        self.deploy("bf-sse-plain", self.up.addr, "--host", "sseplain.buffer")
        for host in ("sse.buffer", "sseplain.buffer"):
            gate = self.gate(self.up)
            client = self.proxy.client(host=host)
            self.addCleanup(client.close)
            resp = client.send("GET", f"/sse?events=2&gate={gate}", timeout=10)
            self.assertEqual(resp.status, 200)
            self.assertEqual(resp.getheader("Content-Type"), "text/event-stream")
            # Each event arrives while the upstream holds back the next one.
            self.assertEqual(resp.readline(), b"data: event 0\n", host)
            self.assertEqual(resp.readline(), b"\n")
            self.up.release(gate)
            self.assertEqual(resp.readline(), b"data: event 1\n", host)
            self.assertEqual(resp.readline(), b"\n")
            self.up.release(gate)
            self.assertEqual(resp.read(), b"", host)
            client.close()
