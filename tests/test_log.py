"""JSON logging (SPEC §17)."""

from __future__ import annotations

import io
import json
import time

from twisted.logger import Logger, LogLevel
from twisted.trial import unittest

from kamal_proxy.observe import log
from kamal_proxy.observe.log import JsonLog, format_time, header_log_key

NS = 1_700_000_000_123_400_000


# The request line's keys that SPEC §17.2 types as numbers.
INT_KEYS = {"port", "status", "duration", "req_content_length", "resp_content_length"}


def request_values(**given: object) -> tuple:
    """``request_line``'s values: ``given`` ones, the others empty (0 or "")."""
    return tuple(given.get(key, 0 if key in INT_KEYS else "") for key in log.REQUEST_KEYS)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


class FormatTimeTests(unittest.TestCase):
    def test_rfc3339_trimmed(self) -> None:
        text = format_time(NS)
        self.assertRegex(text, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.1234(Z|[+-]\d\d:\d\d)$")
        self.assertRegex(format_time(1_700_000_000_000_000_000), r":\d\d(Z|[+-]\d\d:\d\d)$")
        self.assertRegex(format_time(1_700_000_000_000_000_001), r"\.000000001")

    def test_local_offset(self) -> None:
        offset = time.localtime(1_700_000_000).tm_gmtoff
        expected = "Z" if offset == 0 else None
        if expected:
            self.assertTrue(format_time(NS).endswith("Z"))


class LineTests(unittest.TestCase):
    def test_key_order_and_types(self) -> None:
        stream = io.StringIO()
        writer = JsonLog(stream, clock=lambda: NS)
        writer.line(
            "INFO",
            "Deployed",
            [
                ("service", "app"),
                ("targets", ["a:1", "b:2"]),
                ("tls", False),
                ("error", ValueError("boom")),
                ("count", 3),
            ],
        )
        [text] = lines(stream)
        self.assertTrue(text.startswith('{"time":"'))
        record = json.loads(text)
        self.assertEqual(
            list(record), ["time", "level", "msg", "service", "targets", "tls", "error", "count"]
        )
        self.assertEqual(record["targets"], ["a:1", "b:2"])
        self.assertEqual(record["error"], "boom")
        self.assertIs(record["tls"], False)

    def test_debug_filtered_unless_enabled(self) -> None:
        stream = io.StringIO()
        JsonLog(stream).line("DEBUG", "Saved state")
        self.assertEqual(stream.getvalue(), "")
        JsonLog(stream, debug=True).line("DEBUG", "Saved state", [("path", "/x")])
        self.assertEqual(json.loads(stream.getvalue())["level"], "DEBUG")

    def test_unicode_and_separators(self) -> None:
        stream = io.StringIO()
        JsonLog(stream).line("WARN", "x", [("m", "läuft <&> \u2028")])
        text = stream.getvalue()
        self.assertIn("läuft <&> \\u2028", text)
        self.assertEqual(json.loads(text)["m"], "läuft <&> \u2028")


class RequestLineTests(unittest.TestCase):
    def test_spec_example(self) -> None:
        stream = io.StringIO()
        writer = JsonLog(stream, clock=lambda: NS)
        fields = {
            "method": "POST",
            "host": "app.example.com",
            "port": 80,
            "path": "/somepath",
            "request_id": "request-id",
            "status": 201,
            "service": "myapp",
            "target": "upstream:3000",
            "duration": 123456,
            "req_content_length": 5,
            "req_content_type": "application/json",
            "resp_content_length": 8,
            "resp_content_type": "text/html",
            "client_addr": "192.0.2.1",
            "client_port": "1234",
            "remote_addr": "192.168.1.1",
            "user_agent": "Robot/1",
            "proto": "HTTP/1.1",
            "scheme": "http",
            "query": "q=ok",
        }
        extra = [
            (header_log_key("req_", "X-Custom"), "hello"),
            (header_log_key("resp_", "Cache-Control"), "public, max-age=3600"),
            (header_log_key("resp_", "x-custom"), "goodbye"),
        ]
        writer.request(fields, extra)
        text = lines(stream)[0]
        expected_tail = (
            '"level":"INFO","msg":"Request","host":"app.example.com","port":80,'
            '"path":"/somepath","request_id":"request-id","status":201,"service":"myapp",'
            '"target":"upstream:3000","duration":123456,"method":"POST",'
            '"req_content_length":5,"req_content_type":"application/json",'
            '"resp_content_length":8,"resp_content_type":"text/html",'
            '"client_addr":"192.0.2.1","client_port":"1234","remote_addr":"192.168.1.1",'
            '"user_agent":"Robot/1","proto":"HTTP/1.1","scheme":"http","query":"q=ok",'
            '"req_x_custom":"hello","resp_cache_control":"public, max-age=3600",'
            '"resp_x_custom":"goodbye"}'
        )
        self.assertTrue(text.startswith('{"time":"' + format_time(NS) + '",'))
        self.assertTrue(text.endswith(expected_tail), text)

    def test_duplicate_custom_key_kept(self) -> None:
        stream = io.StringIO()
        JsonLog(stream).request(
            {"resp_content_type": "text/html"}, [("resp_content_type", "text/html")]
        )
        self.assertEqual(stream.getvalue().count('"resp_content_type":"text/html"'), 2)

    def test_custom_keys_in_fields_follow_builtins(self) -> None:
        stream = io.StringIO()
        JsonLog(stream).request({"req_x_a": "1,2", "host": "h", "resp_cache_control": ""})
        record = json.loads(stream.getvalue())
        self.assertEqual(list(record)[-2:], ["req_x_a", "resp_cache_control"])
        self.assertEqual(record["host"], "h")

    def test_log_request_uses_active_writer(self) -> None:
        stream = io.StringIO()
        log.set_active(JsonLog(stream))
        self.addCleanup(log.set_active, None)
        log.log_request_line(NS, request_values(status=499))
        self.assertEqual(json.loads(stream.getvalue())["status"], 499)


class ObserverTests(unittest.TestCase):
    def test_our_events_as_json_others_to_stderr_or_dropped(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        writer = JsonLog(out, error_stream=err)
        events: list[dict] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log.info("Server started", http=80, https=443)
        ours = [e for e in events if e.get("kp_msg") == "Server started"]
        for event in ours:
            writer(event)
        Logger(namespace="twisted").info("Starting factory {f}", f="x")
        writer({"log_level": LogLevel.info, "log_format": "Starting factory", "log_time": 0})
        writer({"log_level": LogLevel.critical, "log_format": "Unhandled error", "log_time": 0})
        record = json.loads(out.getvalue())
        self.assertEqual(
            (record["msg"], record["http"], record["https"]), ("Server started", 80, 443)
        )
        self.assertEqual(len(lines(out)), 1)
        self.assertIn("Unhandled error", err.getvalue())


class RequestLineFormsTests(unittest.TestCase):
    """The proxy's hot path (``request_line``, a tuple) writes what ``request`` (a dict) does."""

    def test_same_line_as_request(self):
        from kamal_proxy.observe.log import REQUEST_KEYS, JsonLog

        fields = {
            key: i if key in INT_KEYS else f'{key} "q" \\ \u2028 é <&>'
            for i, key in enumerate(REQUEST_KEYS)
        }
        extra = [("req_x_custom", "hello"), ("resp_content_type", "text/html")]
        one, two = io.StringIO(), io.StringIO()
        JsonLog(one, clock=lambda: NS).request(fields, extra)
        JsonLog(two).request_line(NS, tuple(fields.values()), extra)
        self.assertEqual(one.getvalue(), two.getvalue())
        self.assertIn("\\u2028", two.getvalue())


class TextTests(unittest.TestCase):
    """Issue 12 §2: twistd's text log reads as sentences with fields, not Python tuples."""

    def capture(self) -> list[dict]:
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def texts(self, events: list[dict]) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in events if "kp_msg" in e]

    def test_format_text(self) -> None:
        self.assertEqual(log.format_text("Server stopped", ()), "Server stopped")
        self.assertEqual(
            log.format_text(
                "Deploying",
                [
                    ("service", "web"),
                    ("targets", ["a:1", "b:2"]),
                    ("hosts", [""]),
                    ("tls", False),
                    ("count", 3),
                    ("message", 'Back "soon" = later'),
                    ("error", ValueError("boom")),
                    ("none", None),
                    ("split", {"percentage": 10}),
                ],
            ),
            'Deploying: service=web targets=[a:1 b:2] hosts=[""] tls=false count=3 '
            'message="Back \\"soon\\" = later" error=boom none=null split={"percentage":10}',
        )

    def test_events_read_as_sentences_in_other_observers(self) -> None:
        events = self.capture()
        log.info("Target health updated", target="web:3000", state="healthy", was="adding")
        self.assertEqual(
            self.texts(events),
            ["Target health updated: target=web:3000 state=healthy was=adding"],
        )

    def test_debug_only_when_asked(self) -> None:
        self.addCleanup(log.set_debug, True)
        events = self.capture()
        log.set_debug(False)
        log.debug("Saved state", path="/x")
        log.info("Service resumed", service="web")
        log.set_debug(True)
        log.debug("Saved state", path="/y")
        self.assertEqual(
            self.texts(events),
            ["Service resumed: service=web", "Saved state: path=/y"],
        )

    def test_request_lines_become_events(self) -> None:
        events = self.capture()
        text_log = log.TextLog()
        text_log.request({"host": "app.test", "status": 200, "path": "/a b"})
        text_log.request({key: "" for key in log.REQUEST_KEYS})
        [one, two] = self.texts(events)
        self.assertTrue(one.startswith('Request: host=app.test port="" path="/a b" '), one)
        self.assertIn(" status=200 ", one)
        self.assertTrue(two.startswith('Request: host="" port=""'), two)
        self.assertTrue(text_log.relays_workers)
        self.assertFalse(log.JsonLog(io.StringIO()).relays_workers)

    def test_relay_of_another_process_lines(self) -> None:
        events = self.capture()
        worker = io.StringIO()
        JsonLog(worker, debug=True).line("WARN", "Closing active connections", [("n", 2)])
        log.relay(worker.getvalue().rstrip("\n"))
        log.relay("Traceback (most recent call last):")
        log.relay("")
        ours = [e for e in events if "kp_msg" in e]
        self.assertEqual(
            [(e["kp_level"], e["kp_msg"], dict(e["kp_attrs"])) for e in ours],
            [
                ("WARN", "Closing active connections", {"n": 2}),
                ("ERROR", "Output", {"text": "Traceback (most recent call last):"}),
            ],
        )
