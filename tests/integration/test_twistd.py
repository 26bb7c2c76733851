"""``twistd -n kamal-proxy``: the same server as ``kamal-proxy run``, through the plugin."""

from __future__ import annotations

import os
import signal
import sys

from tests.integration.support import (
    PROCESS_TIMEOUT,
    IntegrationTestCase,
    ProxyProcess,
    SigtermOnStartMixin,
)


class TwistdProxyProcess(ProxyProcess):
    """Started with twistd and the JSON log observer, so the harness reads the same lines."""

    def command(self) -> list[str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return [twistd, "-n", "--pidfile=", "--logger", "kamal_proxy.observe.log.twistd_observer"]

    def run_args(self) -> list[str]:
        return ["kamal-proxy", *super().run_args()[1:]]


class TwistdSigtermWhenStarted(SigtermOnStartMixin, TwistdProxyProcess):
    pass


class TwistdPluginTests(IntegrationTestCase):
    def setUp(self):
        super().setUp()
        if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "twistd")):
            self.skipTest("twistd is not installed beside this Python")

    def test_plugin_serves_deploys_and_stops(self):
        proxy = TwistdProxyProcess()
        self.addCleanup(proxy.cleanup)
        proxy.start()
        proxy.wait_for_log("Server started", http=proxy.http_port, https=proxy.https_port)
        up = self.upstream("plugin")
        self.deploy("web", up.addr, proxy=proxy)
        resp = proxy.request("GET", "/")
        self.assertEqual((resp.status, resp.text), (200, "plugin"))
        proxy.wait_for_log("Request", status=200, service="web")
        self.assertEqual(proxy.bad_lines, [])
        # twistd re-raises the signal that stopped it, so its status is "killed by SIGTERM".
        self.assertIn(proxy.stop(signal.SIGTERM), (0, -signal.SIGTERM))
        proxy.wait_for_log("Server stopped")
        self.assertFalse(os.path.exists(proxy.socket_path))

    def test_sigterm_the_moment_it_is_started(self):
        """Under twistd too, ``Server started`` means SIGTERM is handled gracefully."""
        for _ in range(3):
            proxy = TwistdSigtermWhenStarted()
            self.addCleanup(proxy.cleanup)
            proxy.start(wait_ready=False)
            proxy.wait_for_log("Server started", timeout=PROCESS_TIMEOUT)
            self.assertTrue(proxy.signalled.wait(5))
            proxy.proc.wait(PROCESS_TIMEOUT)
            self.assertIn(proxy.stop(), (0, -signal.SIGTERM))
            proxy.wait_for_log("Server stopped")
