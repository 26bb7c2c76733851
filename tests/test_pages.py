"""Error pages (SPEC §11, scenarios 111-116)."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kamal_proxy.proxy.channel import make_site
from kamal_proxy.proxy.pages import (
    ErrorPages,
    PagesError,
    builtin_page,
    escape_html,
    status_text,
    write_error,
)


def serve(status: int, message: str | None = None, custom: ErrorPages | None = None):
    """Render an error page through a real channel; returns (status line, headers, body)."""

    class Failing(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            write_error(request, status, message, custom)
            return NOT_DONE_YET

    site = make_site(Failing(), Clock())
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return lines[0], headers, body


class EscapeTests(unittest.TestCase):
    def test_go_entities(self) -> None:
        self.assertEqual(
            escape_html('Back soon <b>"really"</b> & more'),
            "Back soon &lt;b&gt;&#34;really&#34;&lt;/b&gt; &amp; more",
        )
        self.assertEqual(escape_html("Back at <5>"), "Back at &lt;5&gt;")
        self.assertEqual(escape_html("a+b'c\x00"), "a&#43;b&#39;c\ufffd")
        self.assertEqual(escape_html("Wartung läuft – bald zurück"), "Wartung läuft – bald zurück")


class BuiltinTests(unittest.TestCase):
    def test_titles_and_texts(self) -> None:
        page = builtin_page(404).decode()
        self.assertIn("<title>404 \u2014 Not Found</title>", page)
        self.assertIn("doesn\u2019t exist.", page)
        self.assertIn('<meta name="robots" content="noindex, nofollow">', page)
        self.assertIn("#0971D5", page)
        self.assertIn("<title>413 \u2014 Content Too Large</title>", builtin_page(413).decode())
        self.assertIn("<title>502 \u2014 Bad Gateway</title>", builtin_page(502).decode())
        self.assertIn("<title>504 \u2014 Gateway Timeout</title>", builtin_page(504).decode())
        page = builtin_page(503).decode()
        self.assertIn("<title>503 \u2014 Service Temporarily Unavailable</title>", page)
        self.assertIn("<strong>The service is temporarily unavailable.</strong>", page)

    def test_503_message_replaces_text(self) -> None:
        page = builtin_page(503, 'Back soon <b>"really"</b> & more').decode()
        self.assertIn("<p>Back soon &lt;b&gt;&#34;really&#34;&lt;/b&gt; &amp; more</p>", page)
        self.assertNotIn("temporarily unavailable.</strong>", page)
        self.assertIn("temporarily unavailable.</strong>", builtin_page(503, "").decode())

    def test_fallback(self) -> None:
        self.assertEqual(builtin_page(418), b"<h1>418 I'm a teapot</h1>")
        self.assertEqual(builtin_page(500), b"<h1>500 Internal Server Error</h1>")
        self.assertEqual(builtin_page(400), b"<h1>400 Bad Request</h1>")
        self.assertEqual(status_text(413), "Request Entity Too Large")

    def test_scenario_111_404(self) -> None:
        line, headers, body = serve(404)
        self.assertTrue(line.startswith(b"HTTP/1.1 404"))
        self.assertEqual(headers[b"Content-Type"], b"text/html; charset=utf-8")
        self.assertIn(b"Not Found", body)

    def test_scenario_112_503_message(self) -> None:
        line, _, body = serve(503, "Gone to lunch")
        self.assertTrue(line.startswith(b"HTTP/1.1 503"))
        self.assertIn(b"Service Temporarily Unavailable", body)
        self.assertIn(b"Gone to lunch", body)

    def test_scenario_113_teapot(self) -> None:
        line, headers, body = serve(418)
        self.assertTrue(line.startswith(b"HTTP/1.1 418"))
        self.assertEqual(headers[b"Content-Type"], b"text/html; charset=utf-8")
        self.assertEqual(body, b"<h1>418 I'm a teapot</h1>")

    def test_write_error_after_response_started(self) -> None:
        class Request:
            startedWriting = 1
            finished = 0

        self.assertFalse(write_error(Request(), 502))


class CustomPagesTests(unittest.TestCase):
    def pages(self, **files: str) -> ErrorPages:
        directory = self.mktemp()
        os.makedirs(directory)
        for name, text in files.items():
            with open(os.path.join(directory, name.replace("_", ".")), "w") as handle:
                handle.write(text)
        return ErrorPages.load(directory)

    def test_scenario_115_layered(self) -> None:
        pages = self.pages(**{"404_html": "<body>Custom 404</body>"})
        line, headers, body = serve(404, custom=pages)
        self.assertEqual((line[9:12], body), (b"404", b"<body>Custom 404</body>"))
        self.assertEqual(headers[b"Content-Type"], b"text/html; charset=utf-8")
        line, _, body = serve(503, "Gone to lunch", custom=pages)
        self.assertEqual(line[9:12], b"503")
        self.assertIn(b"Service Temporarily Unavailable", body)
        self.assertIn(b"Gone to lunch", body)
        line, headers, body = serve(418, custom=pages)
        self.assertEqual((line[9:12], body), (b"418", b"<h1>418 I'm a teapot</h1>"))
        self.assertIsNone(pages.render(503, "x"))

    def test_message(self) -> None:
        pages = self.pages(**{"503_html": "Custom Maintenance Page: {{ .Message }}"})
        self.assertEqual(pages.render(503, ""), b"Custom Maintenance Page: ")
        self.assertEqual(pages.render(503, None), b"Custom Maintenance Page: ")
        self.assertEqual(
            pages.render(503, "Back at <5>"), b"Custom Maintenance Page: Back at &lt;5&gt;"
        )

    def test_if_else_comments_and_trim(self) -> None:
        source = (
            "{{/* a comment */}}<p>\n  {{- if .Message -}}\n  {{.Message}}\n"
            "  {{- else -}}\n  Default\n  {{- end -}}\n</p>"
        )
        pages = self.pages(**{"503_html": source})
        self.assertEqual(pages.render(503, "Down"), b"<p>Down</p>")
        self.assertEqual(pages.render(503, ""), b"<p>Default</p>")
        self.assertEqual(pages.render(503, None), b"<p>Default</p>")

    def test_else_if(self) -> None:
        pages = self.pages(**{"502_html": "{{ if .Message }}A{{ else if . }}B{{ else }}C{{ end }}"})
        self.assertEqual(pages.render(502, "m"), b"A")
        self.assertEqual(pages.render(502, ""), b"B")
        self.assertEqual(pages.render(502, None), b"C")

    def test_unknown_field_falls_back(self) -> None:
        pages = self.pages(**{"503_html": "{{ .Other }}"})
        self.assertIsNone(pages.render(503, "m"))
        self.assertEqual(pages.render(503, None), b"")

    def test_scenario_116_bad_template(self) -> None:
        self.assertRaises(PagesError, self.pages, **{"503_html": "{{ {{"})

    def test_parse_errors(self) -> None:
        for source in [
            "{{ if .Message }}",
            "{{ end }}",
            "{{ range .X }}{{ end }}",
            "{{ .Message",
            '{{ printf "x" }}',
            "{{/* open",
        ]:
            self.assertRaises(PagesError, self.pages, **{"500_html": source})

    def test_scenario_116_no_html_files(self) -> None:
        self.assertRaises(PagesError, self.pages, **{"readme_txt": "x"})

    def test_missing_directory(self) -> None:
        self.assertRaises(PagesError, ErrorPages.load, self.mktemp())

    def test_subdirectories_ignored(self) -> None:
        pages = self.pages(**{"404_html": "x"})
        os.makedirs(os.path.join(pages.directory, "sub"))
        with open(os.path.join(pages.directory, "sub", "500.html"), "w") as handle:
            handle.write("{{ {{")
        self.assertFalse(ErrorPages.load(pages.directory).has_page(500))
