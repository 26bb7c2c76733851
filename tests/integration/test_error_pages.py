"""Built-in and custom error pages against the real process (SPEC §9.7, §11; scenarios 14,
111-116, 170)."""

from __future__ import annotations

import os
import shutil
import tempfile

from tests.integration.traffic_support import TrafficTestCase, shared_upstream

PAGE_503 = (
    "{{ if .Message }}Maintenance: {{ .Message }}{{ else }}Custom Maintenance Page: "
    "{{ .Message }}{{ end }}"
)


class ErrorPageTests(TrafficTestCase):
    shared = True

    def pages_dir(self, **files: str) -> str:
        """A directory of ``<name>.html`` files, e.g. ``pages_dir(p503="...")``."""
        path = tempfile.mkdtemp(prefix="kp-pages-")
        self.addCleanup(shutil.rmtree, path, True)
        for key, text in files.items():
            name = key[1:] if key.startswith("p") else key
            with open(os.path.join(path, f"{name}.html"), "w", encoding="utf-8") as f:
                f.write(text)
        return path

    def test_builtin_502_and_504(self):
        """Scenario 170: upstream down → 502 page + ERROR log with target; --target-timeout
        500ms → 504 page after ≈0.5s; unrouted → 404 page."""
        up = self.upstream("doomed")
        self.deploy("ep-builtin", up.addr, "--host", "builtin.pages", "--target-timeout", "500ms")
        gate = self.gate(up)
        resp = self.get("builtin.pages", f"/hold?gate={gate}")
        # The upstream holds the request: only the target timeout answers it.
        self.assertErrorPage(resp, 504, "did not respond within the allowed time limit")
        self.assertGreaterEqual(resp.elapsed, 0.45, "504 before the target timeout")
        up.stop()
        mark = self.proxy.log_mark()
        resp = self.get("builtin.pages", "/gone")
        self.assertErrorPage(resp, 502, "The server received an invalid response.")
        log = self.proxy.wait_for_log("Error while proxying", since=mark, target=up.addr)
        self.assertEqual((log["level"], log["path"]), ("ERROR", "/gone"))
        self.assertTrue(log.get("error"), log)
        resp = self.get("unrouted.pages", "/")
        self.assertErrorPage(resp, 404, "doesn\u2019t exist")

    def test_custom_pages_rendered(self):
        """Scenarios 115, 170, §11.3: custom 504/502 verbatim, 503 with escaped or empty message
        and {{ if }}, built-in fallback for missing statuses, never for unrouted 404s, and
        per service."""
        up = self.upstream("custom")
        pages = self.pages_dir(
            p502="<p>Custom 502 page</p>",
            p504="Custom 504 \u2013 slow",
            p503=PAGE_503,
            p404="Custom 404",
        )
        self.deploy(
            "ep-custom",
            up.addr,
            "--host",
            "custom.pages",
            "--error-pages",
            pages,
            "--target-timeout",
            "300ms",
            "--buffer-requests",
            "--max-request-body",
            "10",
        )
        self.deploy("ep-plain", shared_upstream("plain").addr, "--host", "plain.pages")

        resp = self.get("custom.pages", f"/hold?gate={self.gate(up)}")
        self.assertEqual((resp.status, resp.text), (504, "Custom 504 \u2013 slow"))
        self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
        resp = self.proxy.request("POST", "/", host="custom.pages", body=b"x" * 11)
        self.assertErrorPage(resp, 413, "exceeds the allowed size")
        self.assertErrorPage(self.get("nothing.pages"), 404, "Not Found")
        self.assertNotIn("Custom 404", self.get("nothing.pages").text)

        self.proxy.cli_ok("stop", "ep-custom")
        resp = self.get("custom.pages")
        self.assertEqual((resp.status, resp.text), (503, "Custom Maintenance Page: "))
        self.assertEqual(resp.header("Content-Type"), "text/html; charset=utf-8")
        self.proxy.cli_ok("stop", "ep-custom", "--message", '<b>soon</b> & "x" \u00e4')
        resp = self.get("custom.pages")
        self.assertEqual(
            (resp.status, resp.text),
            (503, "Maintenance: &lt;b&gt;soon&lt;/b&gt; &amp; &#34;x&#34; \u00e4"),
        )
        self.proxy.cli_ok("stop", "ep-plain", "--message", "plain")
        self.assertErrorPage(self.get("plain.pages"), 503, "plain")
        self.proxy.cli_ok("resume", "ep-custom")

        up.stop()
        resp = self.get("custom.pages")
        self.assertEqual((resp.status, resp.text), (502, "<p>Custom 502 page</p>"))

    def test_unusable_pages_dir_changes_nothing(self):
        """Scenarios 14, 116, 170: a missing dir, an empty dir, a dir without *.html and a
        template that does not compile → `Error: unable to load error pages`; the previous
        target, pages and state stay; a later good directory replaces the templates."""
        first, second = shared_upstream("first"), shared_upstream("second")
        old = self.pages_dir(p503="Old page: {{ .Message }}")
        self.deploy("ep-bad", first.addr, "--host", "bad.pages", "--error-pages", old)
        before = self.state_service(self.proxy, "ep-bad")
        missing = os.path.join(old, "does-not-exist")
        empty = self.pages_dir()
        no_html = self.pages_dir()
        with open(os.path.join(no_html, "503.txt"), "w") as f:
            f.write("text")
        broken = self.pages_dir(p503="{{ {{", p404="fine")
        for pages in (missing, empty, no_html, broken, "not valid"):
            mark = self.proxy.log_mark()
            line = self.cli_error(
                self.proxy,
                "deploy",
                "ep-bad",
                "--target",
                second.addr,
                "--host",
                "bad.pages",
                "--error-pages",
                pages,
            )
            self.assertEqual(line, "Error: unable to load error pages", pages)
            log = self.proxy.wait_for_log(
                "Unable to parse custom error pages", since=mark, service="ep-bad"
            )
            self.assertEqual(log["level"], "ERROR")
            self.assertEqual(self.get("bad.pages").text, "first", pages)
        self.assertEqual(self.state_service(self.proxy, "ep-bad"), before)
        self.proxy.cli_ok("stop", "ep-bad", "--message", "m")
        self.assertEqual(self.get("bad.pages").text, "Old page: m")

        new = self.pages_dir(p503="New page: {{ .Message }}")
        self.proxy.cli_ok(
            "deploy", "ep-bad", "--target", second.addr, "--host", "bad.pages", "--error-pages", new
        )
        shutil.rmtree(new)
        self.assertEqual(self.get("bad.pages").text, "New page: m")
        self.proxy.cli_ok("resume", "ep-bad")
        self.assertEqual(self.get("bad.pages").text, "second")
