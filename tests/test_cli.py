"""Tests for the kamal-proxy command line: Cobra-compatible behaviour, deploy options, list
formatting, the control client, and the CLI against a real AMP server on a Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

from click.testing import CliRunner
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Factory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import amp
from twisted.trial import unittest

from kamal_proxy.cli.main import build_root
from kamal_proxy.cli.service import format_service_table
from kamal_proxy.control import client, commands
from kamal_proxy.control.commands import CommandFailed
from kamal_proxy.options import RunOptions
from kamal_proxy.service_options import ACME_STAGING_DIRECTORY, ServiceOptions, TargetOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECOND = 1_000_000_000
VISIBLE = ["deploy", "list", "pause", "remove", "resume", "rollout", "run", "stop", "upgrade"]


class Recorder:
    """A transport that records control-plane calls instead of dialling the socket."""

    def __init__(self, reply: dict[str, Any] | None = None, fail: str | None = None):
        self.calls: list[tuple[type, str, dict[str, Any]]] = []
        self.reply = reply or {}
        self.fail = fail

    def __call__(self, command: type, path: str, **arguments: Any) -> dict[str, Any]:
        self.calls.append((command, path, arguments))
        if self.fail is not None:
            raise client.ControlError(self.fail)
        return self.reply


class CLITestCase(unittest.TestCase):
    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="kp-home-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.socket = os.path.join(self.home, "kp.sock")
        self.environ: dict[str, str] = {"HOME": self.home, "KAMAL_PROXY_SOCKET": self.socket}
        self.transport = Recorder()

    def cli(self, *args: str, transport: Any = None, **env: str):
        environ = {**self.environ, **env}
        root = build_root(environ, transport or self.transport)
        return CliRunner().invoke(root, list(args), prog_name="kamal-proxy")

    def assertError(self, result, message: str) -> None:
        self.assertEqual(result.exit_code, 1, result.output)
        self.assertEqual(result.stderr, f"Error: {message}\n")
        self.assertEqual(result.stdout, "")

    def assertOK(self, result) -> None:
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, "")

    def sent(self) -> dict[str, Any]:
        self.assertEqual(len(self.transport.calls), 1)
        return self.transport.calls[0][2]

    def deployed(self, *args: str) -> tuple[dict[str, Any], ServiceOptions, TargetOptions]:
        result = self.cli("deploy", *args)
        self.assertOK(result)
        command, path, arguments = self.transport.calls[-1]
        self.assertIs(command, commands.Deploy)
        self.assertEqual(path, self.socket)
        service = ServiceOptions.from_json(json.loads(arguments["service_options"]))
        target = TargetOptions.from_json(json.loads(arguments["target_options"]))
        return arguments, service, target


class HelpTests(CLITestCase):
    def assertListsCommands(self, text: str, names: list[str]) -> None:
        lines = text.splitlines()
        for name in names:
            self.assertTrue(
                any(line.startswith(f"  {name} ") for line in lines), f"{name} missing:\n{text}"
            )

    def test_no_arguments_prints_root_help(self):
        result = self.cli()
        self.assertEqual(result.exit_code, 0)
        self.assertIn("HTTP proxy for zero downtime deployments", result.stdout)
        self.assertListsCommands(result.stdout, VISIBLE)
        self.assertEqual(result.stderr, "")

    def test_help_flag_and_help_command(self):
        for args in (["--help"], ["-h"], ["help"]):
            result = self.cli(*args)
            self.assertEqual(result.exit_code, 0)
            self.assertListsCommands(result.stdout, VISIBLE)

    def test_completion_is_hidden_but_works(self):
        result = self.cli()
        self.assertNotIn("completion", result.stdout)
        result = self.cli("completion", "bash")
        self.assertEqual(result.exit_code, 0)
        self.assertIn("complete -F", result.stdout)
        self.assertIn("deploy", result.stdout)
        self.assertListsCommands(self.cli("completion").stdout, ["bash", "zsh", "fish"])

    def test_rollout_alone_prints_its_help(self):
        result = self.cli("rollout")
        self.assertEqual(result.exit_code, 0)
        self.assertIn("Manage rollout settings", result.stdout)
        self.assertListsCommands(result.stdout, ["deploy", "set", "stop"])

    def test_deploy_help_names_every_flag_with_defaults(self):
        for args in (["deploy", "--help"], ["deploy", "-h"], ["help", "deploy"]):
            result = self.cli(*args)
            self.assertEqual(result.exit_code, 0)
            text = result.stdout
            for default in ("(default 30s)", '(default "/up")', "(default 1048576)"):
                self.assertIn(default, text)
            for flag in (
                "target",
                "read-target",
                "host",
                "tls-acme-cache-path",
                "forward-headers",
                "scope-cookie-paths",
                "client-ip-header",
                "exclude-metrics-path",
            ):
                self.assertIn(f"--{flag} ", text)
            self.assertIn(os.path.join(self.home, ".config", "kamal-proxy", "certs"), text)
            self.assertEqual(self.transport.calls, [])

    def test_help_wins_over_validation_but_not_over_bad_flags(self):
        self.assertEqual(self.cli("deploy", "--help").exit_code, 0)
        self.assertEqual(self.cli("deploy", "a", "b", "--help").exit_code, 0)
        self.assertError(self.cli("deploy", "--help", "--bogus"), "unknown flag: --bogus")

    def test_help_for_nested_and_unknown_topics(self):
        result = self.cli("help", "rollout", "set")
        self.assertIn("--percent int", result.stdout)
        self.assertIn("Set traffic split for rollout", result.stdout)
        result = self.cli("help", "nope")
        self.assertEqual(result.exit_code, 0)
        self.assertIn("Unknown help topic [`nope`]", result.stderr)

    def test_aliases_shown(self):
        self.assertIn("remove, rm", self.cli("rm", "--help").stdout)
        self.assertIn("list, ls", self.cli("ls", "-h").stdout)


class ErrorTests(CLITestCase):
    def test_unknown_command(self):
        result = self.cli("frobnicate")
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(
            result.stderr,
            'Error: unknown command "frobnicate" for "kamal-proxy"\n'
            "Run 'kamal-proxy --help' for usage.\n",
        )

    def test_unknown_command_suggestion(self):
        result = self.cli("deplo")
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(
            result.stderr,
            'Error: unknown command "deplo" for "kamal-proxy"\n\nDid you mean this?\n\tdeploy\n\n'
            "Run 'kamal-proxy --help' for usage.\n",
        )

    def test_unknown_flag(self):
        self.assertError(self.cli("deploy", "svc", "--x"), "unknown flag: --x")
        self.assertError(self.cli("--x"), "unknown flag: --x")
        self.assertError(self.cli("list", "--json"), "unknown flag: --json")

    def test_flag_needs_an_argument(self):
        self.assertError(self.cli("deploy", "svc", "--target"), "flag needs an argument: --target")

    def test_invalid_values(self):
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--deploy-timeout", "abc"),
            'invalid argument "abc" for "--deploy-timeout" flag: time: invalid duration "abc"',
        )
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--buffer-memory=1MB"),
            'invalid argument "1MB" for "--buffer-memory" flag: strconv.ParseInt: parsing "1MB": '
            "invalid syntax",
        )
        self.assertError(
            self.cli("rollout", "set", "svc", "--percent", "abc"),
            'invalid argument "abc" for "--percent" flag: strconv.ParseInt: parsing "abc": '
            "invalid syntax",
        )

    def test_argument_count(self):
        # Scenario 128
        self.assertError(self.cli("pause"), "accepts 1 arg(s), received 0")
        self.assertError(self.cli("remove", "a", "b"), "accepts 1 arg(s), received 2")
        self.assertError(self.cli("rm"), "accepts 1 arg(s), received 0")
        self.assertError(self.cli("resume"), "accepts 1 arg(s), received 0")
        self.assertError(self.cli("stop", "a", "b", "c"), "accepts 1 arg(s), received 3")
        self.assertError(self.cli("rollout", "stop"), "accepts 1 arg(s), received 0")
        self.assertError(
            self.cli("deploy", "--target", "a:1", "--", "svc", "--tls"),
            "accepts 1 arg(s), received 2",
        )

    def test_list_rejects_arguments(self):
        self.assertError(self.cli("list", "x"), 'unknown command "x" for "kamal-proxy list"')
        self.assertError(self.cli("ls", "x"), 'unknown command "x" for "kamal-proxy list"')

    def test_required_flag(self):
        # Scenario 125
        self.assertError(self.cli("deploy", "svc"), 'required flag(s) "target" not set')
        self.assertError(self.cli("rollout", "deploy", "svc"), 'required flag(s) "target" not set')

    def test_required_together(self):
        # Scenario 126
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--tls-certificate-path", "c.pem"),
            "if any flags in the group [tls-certificate-path tls-private-key-path] are set they "
            "must all be set; missing [tls-private-key-path]",
        )
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--tls-private-key-path", "k.pem"),
            "if any flags in the group [tls-certificate-path tls-private-key-path] are set they "
            "must all be set; missing [tls-certificate-path]",
        )

    def test_one_required(self):
        # Scenario 127
        self.assertError(
            self.cli("rollout", "set", "svc"),
            "at least one of the flags in the group [percent list] is required",
        )
        self.assertOK(self.cli("rollout", "set", "svc", "--percent=0"))
        self.assertOK(self.cli("rollout", "set", "svc", "--list="))

    def test_validation_order(self):
        # flags, then argument count, then deploy pre-validation, required flags, groups.
        self.assertError(self.cli("deploy", "--bogus"), "unknown flag: --bogus")
        self.assertError(self.cli("deploy"), "accepts 1 arg(s), received 0")
        self.assertError(
            self.cli("deploy", "svc", "--max-request-body", "10"),
            "max-request-body can only be set when request buffering is enabled",
        )
        self.assertError(
            self.cli("deploy", "svc", "--tls"),
            "service options invalid: host must be set when using TLS",
        )
        self.assertError(
            self.cli("deploy", "svc", "--tls-certificate-path", "c.pem"),
            'required flag(s) "target" not set',
        )
        self.assertEqual(self.transport.calls, [])

    def test_server_errors_are_printed(self):
        result = self.cli("remove", "svc", transport=Recorder(fail="service not found"))
        self.assertError(result, "service not found")


class DeployValidationTests(CLITestCase):
    def test_tls_needs_a_host(self):
        # Scenario 122
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--tls"),
            "service options invalid: host must be set when using TLS",
        )
        self.assertEqual(self.transport.calls, [])
        self.assertOK(
            self.cli("deploy", "svc", "--target", "a:1", "--tls", "--host", "example.com")
        )
        self.assertOK(
            self.cli(
                "deploy",
                "svc",
                "--target",
                "a:1",
                "--tls",
                "--host",
                "example.com",
                "--host",
                "*.example.com",
            )
        )

    def test_tls_on_demand(self):
        # Scenario 123
        base = ["deploy", "svc", "--target", "a:1", "--tls"]
        self.assertOK(self.cli(*base, "--tls-on-demand-url", "https://example.com/allow-host"))
        self.assertError(
            self.cli(
                *base,
                "--tls-on-demand-url",
                "https://example.com/allow-host",
                "--host",
                "example.com",
            ),
            "service options invalid: cannot set hosts when using a TLS on-demand URL",
        )
        result = self.cli(*base, "--tls-on-demand-url", "ftp://example.com/allow")
        self.assertEqual(result.exit_code, 1)
        self.assertIn("unsupported scheme", result.stderr)

    def test_tls_must_be_on_root_path(self):
        self.assertError(
            self.cli(
                "deploy", "svc", "--target", "a:1", "--tls", "--host", "a.com", "--path-prefix=/api"
            ),
            "service options invalid: TLS settings must be specified on the root path service",
        )

    def test_canonical_host(self):
        self.assertError(
            self.cli(
                "deploy",
                "svc",
                "--target=a:1",
                "--host=example.com,www.example.com",
                "--canonical-host=api.example.com",
            ),
            "service options invalid: canonical-host 'api.example.com' must be present in the "
            "hosts list: [example.com www.example.com]",
        )

    def test_body_limits_need_buffering_flag_given(self):
        # Scenario 124 and SPEC §21.1 #12
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--max-request-body", "10"),
            "max-request-body can only be set when request buffering is enabled",
        )
        self.assertError(
            self.cli("deploy", "svc", "--target", "a:1", "--max-response-body", "10"),
            "max-response-body can only be set when response buffering is enabled",
        )
        self.assertOK(
            self.cli(
                "deploy", "svc", "--target", "a:1", "--max-request-body", "10", "--buffer-requests"
            )
        )
        self.assertOK(
            self.cli(
                "deploy",
                "svc",
                "--target",
                "a:1",
                "--max-response-body",
                "10",
                "--buffer-responses",
            )
        )
        self.assertOK(
            self.cli(
                "deploy",
                "svc",
                "--target",
                "a:1",
                "--buffer-requests=false",
                "--max-request-body=10",
            )
        )

    def test_negative_durations_are_accepted(self):
        arguments, _, _ = self.deployed("svc", "--target", "a:1", "--drain-timeout=-1s")
        self.assertEqual(arguments["drain_timeout"], -SECOND)


class DeployOptionsTests(CLITestCase):
    def test_defaults(self):
        arguments, service, target = self.deployed("svc", "--target", "web-1:3000")
        self.assertEqual(arguments["service"], "svc")
        self.assertEqual(arguments["targets"], ["web-1:3000"])
        self.assertEqual(arguments["readers"], [])
        self.assertEqual(arguments["deploy_timeout"], 30 * SECOND)
        self.assertEqual(arguments["drain_timeout"], 30 * SECOND)
        self.assertIs(arguments["force"], False)
        self.assertEqual(
            service,
            ServiceOptions(
                acme_cache_path=os.path.join(self.home, ".config", "kamal-proxy", "certs")
            ),
        )
        self.assertEqual(target, TargetOptions(forward_headers=True))
        self.assertTrue(os.path.isdir(os.path.join(self.home, ".config", "kamal-proxy")))

    def test_every_flag_maps_onto_the_options(self):
        arguments, service, target = self.deployed(
            "--target=a:1,b:2",
            "--read-target=r:1",
            "--host=example.com",
            "--host",
            "www.example.com",
            "--path-prefix=/",
            "--strip-path-prefix=false",
            "--tls",
            "--tls-staging",
            "--tls-certificate-path=c.pem",
            "--tls-private-key-path=k.pem",
            "--tls-acme-cache-path=/certs",
            "--tls-redirect=false",
            "--canonical-host=example.com",
            "--deploy-timeout=1m",
            "--drain-timeout=5s",
            "--force",
            "--health-check-interval=2s",
            "--health-check-timeout=3s",
            "--health-check-path=/health",
            "--health-check-port=0x1F90",
            "--health-check-host=internal",
            "--writer-affinity-timeout=500ms",
            "--read-target-websockets",
            "--target-timeout=45s",
            "--buffer-requests",
            "--buffer-responses",
            "--buffer-memory=2048",
            "--max-request-body=100",
            "--max-response-body=200",
            "--error-pages=pages",
            "--log-request-header=Cache-Control",
            "--log-request-header=X-Id",
            "--log-response-header=Last-Modified",
            "--exclude-metrics-path=/up,/health",
            "--forward-headers",
            "--client-ip-header=CF-Connecting-IP",
            "--scope-cookie-paths",
            "svc",
        )
        self.assertEqual(arguments["targets"], ["a:1", "b:2"])
        self.assertEqual(arguments["readers"], ["r:1"])
        self.assertEqual(arguments["deploy_timeout"], 60 * SECOND)
        self.assertEqual(arguments["drain_timeout"], 5 * SECOND)
        self.assertIs(arguments["force"], True)
        self.assertEqual(
            service,
            ServiceOptions(
                hosts=["example.com", "www.example.com"],
                path_prefixes=["/"],
                tls_enabled=True,
                tls_certificate_path="c.pem",
                tls_private_key_path="k.pem",
                tls_redirect=False,
                canonical_host="example.com",
                acme_directory=ACME_STAGING_DIRECTORY,
                acme_cache_path="/certs",
                error_page_path="pages",
                strip_prefix=False,
                writer_affinity_timeout=SECOND // 2,
                read_targets_accept_websockets=True,
                exclude_metrics_paths=["/up", "/health"],
                client_ip_header="CF-Connecting-IP",
            ),
        )
        self.assertEqual(target.health_check_config.path, "/health")
        self.assertEqual(target.health_check_config.port, 8080)
        self.assertEqual(target.health_check_config.interval, 2 * SECOND)
        self.assertEqual(target.health_check_config.timeout, 3 * SECOND)
        self.assertEqual(target.health_check_config.host, "internal")
        self.assertEqual(target.response_timeout, 45 * SECOND)
        self.assertTrue(target.buffer_requests)
        self.assertTrue(target.buffer_responses)
        self.assertEqual(target.max_memory_buffer_size, 2048)
        self.assertEqual(target.max_request_body_size, 100)
        self.assertEqual(target.max_response_body_size, 200)
        self.assertEqual(target.log_request_headers, ["Cache-Control", "X-Id"])
        self.assertEqual(target.log_response_headers, ["Last-Modified"])
        self.assertTrue(target.forward_headers)
        self.assertTrue(target.scope_cookie_paths)

    def test_forward_headers_default_is_opposite_of_tls(self):
        _, _, target = self.deployed("svc", "--target", "a:1")
        self.assertTrue(target.forward_headers)
        _, _, target = self.deployed("svc", "--target", "a:1", "--tls", "--host", "a.com")
        self.assertFalse(target.forward_headers)
        _, _, target = self.deployed(
            "svc", "--target", "a:1", "--tls", "--host", "a.com", "--forward-headers"
        )
        self.assertTrue(target.forward_headers)
        _, _, target = self.deployed("svc", "--target", "a:1", "--forward-headers=false")
        self.assertFalse(target.forward_headers)
        _, _, target = self.deployed(
            "svc", "--target", "a:1", "--path-prefix", "/api", "--tls=false"
        )
        self.assertTrue(target.forward_headers)

    def test_production_acme_directory_is_empty(self):
        _, service, _ = self.deployed("svc", "--target", "a:1", "--tls", "--host", "a.com")
        self.assertEqual(service.acme_directory, "")

    def test_acme_cache_path_comes_from_the_clients_home(self):
        other = tempfile.mkdtemp(prefix="kp-other-")
        self.addCleanup(shutil.rmtree, other, True)
        self.environ["HOME"] = other
        _, service, _ = self.deployed("svc", "--target", "a:1")
        self.assertEqual(
            service.acme_cache_path, os.path.join(other, ".config", "kamal-proxy", "certs")
        )

    def test_flags_may_precede_the_service(self):
        arguments, _, _ = self.deployed("--target", "X", "--deploy-timeout", "5s", "svc")
        self.assertEqual(arguments["service"], "svc")
        self.assertEqual(arguments["targets"], ["X"])
        self.assertEqual(arguments["deploy_timeout"], 5 * SECOND)

    def test_empty_and_trailing_comma_slices(self):
        _, service, _ = self.deployed("svc", "--target", "a:1", "--host=")
        self.assertEqual(service.hosts, [])
        _, service, _ = self.deployed("svc", "--target", "a:1", "--host=a.com,")
        self.assertEqual(service.hosts, ["a.com", ""])

    def test_targets_are_sent_verbatim(self):
        # Scenario 141, client side: the address check happens on the server.
        for value in ("http://127.0.0.1:8000", "a", "127.0.0.1:abc", "/", "bad target"):
            arguments, _, _ = self.deployed("svc", "--target", value)
            self.assertEqual(arguments["targets"], [value])

    def test_kamal_command_line(self):
        # Scenario 173: what Kamal runs, after shell unquoting.
        arguments, service, target = self.deployed(
            "app-web",
            "--target=web-1:3000",
            "--host=example.com",
            "--buffer-requests=false",
            "--max-request-body=40000000",
            "--log-request-header=Cache-Control",
            "--log-request-header=Last-Modified",
            "--health-check-path=/up",
            "--deploy-timeout=30s",
        )
        self.assertEqual(arguments["service"], "app-web")
        self.assertEqual(arguments["targets"], ["web-1:3000"])
        self.assertEqual(service.hosts, ["example.com"])
        self.assertFalse(target.buffer_requests)
        self.assertEqual(target.max_request_body_size, 40000000)
        self.assertEqual(target.log_request_headers, ["Cache-Control", "Last-Modified"])

    def test_other_kamal_shapes(self):
        shapes = [
            [
                "deploy",
                "app-web",
                "--target=web-1:3000",
                "--host=a.com",
                "--tls-redirect=true",
                "--deploy-timeout=30s",
                "--drain-timeout=30s",
                "--buffer-requests",
                "--buffer-responses",
                "--buffer-memory=1048576",
                "--max-response-body=0",
                "--health-check-interval=1s",
                "--health-check-timeout=5s",
                "--target-timeout=30s",
                "--forward-headers=true",
                "--path-prefix=/app",
                "--strip-path-prefix=false",
            ],
            [
                "rollout",
                "deploy",
                "app-web",
                "--target=web-2:3000",
                "--read-target=web-3:3000",
                "--deploy-timeout=30s",
                "--drain-timeout=30s",
            ],
            ["rollout", "set", "app-web", "--percent=20", "--list=1,2,3"],
            ["rollout", "stop", "app-web"],
            ["pause", "app-web", "--drain-timeout=30s", "--max-pause=30s"],
            ["stop", "app-web", "--drain-timeout=30s", "--message=Maintenance"],
            ["resume", "app-web"],
            ["remove", "app-web"],
            ["rm", "app-web"],
        ]
        for shape in shapes:
            self.assertOK(self.cli(*shape))
        self.assertEqual(len(self.transport.calls), len(shapes))


class ServiceCommandTests(CLITestCase):
    def test_pause_stop_resume_remove(self):
        self.assertOK(self.cli("pause", "svc", "--drain-timeout=5s", "--max-pause", "1m"))
        self.assertOK(self.cli("stop", "svc", "--message", "Back soon"))
        self.assertOK(self.cli("resume", "svc"))
        self.assertOK(self.cli("rm", "svc"))
        calls = [(c, a) for c, _, a in self.transport.calls]
        self.assertEqual(
            calls,
            [
                (
                    commands.Pause,
                    {"service": "svc", "drain_timeout": 5 * SECOND, "pause_timeout": 60 * SECOND},
                ),
                (
                    commands.Stop,
                    {"service": "svc", "drain_timeout": 30 * SECOND, "message": "Back soon"},
                ),
                (commands.Resume, {"service": "svc"}),
                (commands.Remove, {"service": "svc"}),
            ],
        )

    def test_rollout_commands(self):
        self.assertOK(self.cli("rollout", "deploy", "svc", "--target", "a:1", "--read-target=r"))
        self.assertOK(self.cli("rollout", "set", "svc", "--list", "a,b", "--list", "c"))
        self.assertOK(self.cli("rollout", "stop", "svc"))
        calls = [(c, a) for c, _, a in self.transport.calls]
        self.assertEqual(
            calls,
            [
                (
                    commands.RolloutDeploy,
                    {
                        "service": "svc",
                        "targets": ["a:1"],
                        "readers": ["r"],
                        "deploy_timeout": 30 * SECOND,
                        "drain_timeout": 30 * SECOND,
                    },
                ),
                (
                    commands.RolloutSet,
                    {"service": "svc", "percentage": 0, "allowlist": ["a", "b", "c"]},
                ),
                (commands.RolloutStop, {"service": "svc"}),
            ],
        )

    def test_list_prints_the_table(self):
        services = {
            "b": {
                "host": "b.example.com",
                "path": "/",
                "tls": True,
                "target": "b:80",
                "state": "running",
            },
        }
        recorder = Recorder(reply={"services": json.dumps(services)})
        for name in ("list", "ls"):
            result = self.cli(name, transport=recorder)
            self.assertEqual(result.exit_code, 0)
            self.assertEqual(result.stdout, format_service_table(services))
            self.assertIn("\033[1;34mb\033[0m", result.stdout)


class ListFormatTests(unittest.TestCase):
    def test_scenario_130(self):
        services = {
            "b": {
                "host": "b.example.com",
                "path": "/",
                "tls": True,
                "target": "b:80",
                "state": "running",
            },
            "a": {
                "host": "*",
                "path": "/",
                "tls": False,
                "target": "a1:80,a2:80",
                "state": "paused",
            },
        }
        H, B, P, R = "\033[3;94m", "\033[1;34m", "\033[m", "\033[0m"
        expected = (
            f"{H}Service{R}  {H}Host{R}           {H}Path{R}  {H}Target{R}       "
            f"{H}State{R}    {H}TLS{R}  \n"
            f"{B}a{R}        {P}*{R}              {P}/{R}     {P}a1:80,a2:80{R}  "
            f"{P}paused{R}   {P}no{R}   \n"
            f"{B}b{R}        {P}b.example.com{R}  {P}/{R}     {P}b:80{R}         "
            f"{P}running{R}  {P}yes{R}  \n"
        )
        self.assertEqual(format_service_table(services), expected)

    def test_no_services_prints_the_header_only(self):
        self.assertEqual(
            format_service_table({}),
            "\033[3;94mService\033[0m  \033[3;94mHost\033[0m  \033[3;94mPath\033[0m  "
            "\033[3;94mTarget\033[0m  \033[3;94mState\033[0m  \033[3;94mTLS\033[0m  \n",
        )

    def test_empty_host_is_a_wildcard_and_widths_are_bytes(self):
        table = format_service_table(
            {"é": {"host": "", "path": "/", "tls": False, "target": "t", "state": "stopped"}}
        )
        lines = table.splitlines()
        self.assertTrue(lines[1].startswith("\033[1;34mé\033[0m     "))
        self.assertIn("\033[m*\033[0m", lines[1])


class RunCommandTests(CLITestCase):
    def setUp(self):
        super().setUp()
        import kamal_proxy.app
        import kamal_proxy.cli.run

        self.started: list[RunOptions] = []
        self.exit_code = 0

        def run_server(options: RunOptions, sockets=None) -> int:
            self.started.append(options)
            return self.exit_code

        self.patch(kamal_proxy.app, "run_server", run_server)
        # (No port is bound ahead of the server that is not started.)
        self.patch(kamal_proxy.cli.run, "_bind_early", lambda options: None)

    def test_defaults(self):
        result = self.cli("run")
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(self.started, [RunOptions()])

    def test_workers_zero_means_one_per_usable_cpu(self):
        from kamal_proxy.options import default_workers

        self.cli("run", "--workers", "0")
        self.cli("run", KAMAL_PROXY_WORKERS="0")
        self.cli("run", "--workers", "3")
        self.assertEqual(
            [options.workers for options in self.started], [default_workers()] * 2 + [3]
        )

    def test_flags(self):
        self.cli(
            "run",
            "--debug",
            "--http-port",
            "8080",
            "--https-port=0x20FB",
            "--metrics-port=9090",
            "--http3",
            "--acme-directory=https://localhost:14000/dir",
            "--acme-ca-bundle",
            "ca.pem",
            "extra",
            "args",
        )
        self.assertEqual(
            self.started,
            [
                RunOptions(
                    http_port=8080,
                    https_port=8443,
                    metrics_port=9090,
                    debug=True,
                    http3=True,
                    acme_directory="https://localhost:14000/dir",
                    acme_ca_bundle="ca.pem",
                )
            ],
        )

    def test_environment_defaults(self):
        # Scenarios 129 and 137
        self.cli("run", KAMAL_PROXY_HTTP_PORT="8081", HTTP_PORT="8080")
        self.cli("run", HTTP_PORT="8080")
        self.cli("run", "--http-port", "9000", KAMAL_PROXY_HTTP_PORT="8081", HTTP_PORT="8080")
        self.cli("run", KAMAL_PROXY_HTTP_PORT="", HTTP_PORT="8080")
        self.cli("run", HTTPS_PORT="8443", KAMAL_PROXY_METRICS_PORT="9100", METRICS_PORT="9200")
        self.cli("run", DEBUG="true", KAMAL_PROXY_ACME_DIRECTORY="https://x/dir")
        self.cli("run", KAMAL_PROXY_DEBUG="true", HTTP3="true")
        self.assertEqual(
            [
                (o.http_port, o.https_port, o.metrics_port, o.debug, o.http3, o.acme_directory)
                for o in self.started
            ],
            [
                (8081, 443, 0, False, False, ""),
                (8080, 443, 0, False, False, ""),
                (9000, 443, 0, False, False, ""),
                (80, 443, 0, False, False, ""),
                (80, 8443, 9100, False, False, ""),
                (80, 443, 0, True, False, "https://x/dir"),
                (80, 443, 0, True, False, ""),
            ],
        )

    def test_help_shows_env_defaults(self):
        result = self.cli("run", "--help", HTTP_PORT="8080")
        self.assertIn("(default 8080)", result.stdout)
        self.assertIn("--acme-directory string", result.stdout)
        self.assertEqual(self.started, [])

    def test_invalid_values(self):
        self.assertError(
            self.cli("run", "--metrics-port", "abc"),
            'invalid argument "abc" for "--metrics-port" flag: strconv.ParseInt: parsing "abc": '
            "invalid syntax",
        )
        self.assertError(
            self.cli("run", "--debug=yes"),
            'invalid argument "yes" for "--debug" flag: strconv.ParseBool: parsing "yes": '
            "invalid syntax",
        )
        self.assertEqual(self.started, [])

    def test_exit_code_is_passed_on(self):
        self.exit_code = 1
        self.assertEqual(self.cli("run").exit_code, 1)


class RealSocketTests(CLITestCase):
    """The default transport dials the control socket for real."""

    def real(self, *args: str):
        root = build_root(self.environ)
        return CliRunner().invoke(root, list(args), prog_name="kamal-proxy")

    def test_no_socket(self):
        # Scenario 139
        for args in (["list"], ["deploy", "svc", "--target", "a:1"], ["remove", "svc"]):
            self.assertError(
                self.real(*args), f"dial unix {self.socket}: connect: no such file or directory"
            )

    def test_not_a_listening_socket(self):
        with open(self.socket, "w"):
            pass
        self.assertError(self.real("list"), f"dial unix {self.socket}: connect: connection refused")

    def test_path_too_long(self):
        self.environ["KAMAL_PROXY_SOCKET"] = os.path.join(self.home, "x" * 120)
        result = self.real("list")
        self.assertEqual(result.exit_code, 1)
        self.assertTrue(result.stderr.startswith("Error: dial unix "))
        self.assertTrue(result.stderr.endswith(": connect: invalid argument\n"))


class FakeControlServer(amp.AMP):
    """Records every command; behaviour per service name drives the error paths."""

    def __init__(self, received: list[tuple[str, dict[str, Any]]]):
        super().__init__()
        self.received = received

    def _answer(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self.received.append((name, arguments))
        service = arguments.get("service")
        if service == "missing":
            raise CommandFailed("service not found")
        if service == "hangup":
            self.transport.abortConnection()
            return defer.Deferred()
        return {}

    @commands.Deploy.responder
    def deploy(self, **arguments):
        return self._answer("deploy", arguments)

    @commands.Remove.responder
    def remove(self, **arguments):
        return self._answer("remove", arguments)

    @commands.List.responder
    def list(self):
        self.received.append(("list", {}))
        services = {
            "web": {
                "host": "*",
                "path": "/",
                "tls": False,
                "target": "localhost:3000",
                "state": "running",
            }
        }
        return {"services": json.dumps(services)}


class ControlClientTests(unittest.TestCase):
    """control.client (blocking, in a thread) against an AMP server on a real Unix socket."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kp-sock-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "kp.sock")
        self.received: list[tuple[str, dict[str, Any]]] = []
        port = reactor.listenUNIX(
            self.path, Factory.forProtocol(lambda: FakeControlServer(self.received))
        )
        self.addCleanup(port.stopListening)

    def call(self, command: type, path: str | None = None, **arguments: Any):
        return threads.deferToThread(client.call, command, path or self.path, **arguments)

    async def test_call_returns_the_reply(self):
        reply = await self.call(commands.List)
        self.assertEqual(json.loads(reply["services"])["web"]["target"], "localhost:3000")

    async def test_call_sends_the_arguments(self):
        await self.call(
            commands.Deploy,
            service="app",
            targets=["web-1:3000", "web-2:3000"],
            readers=[],
            deploy_timeout=5 * SECOND,
            drain_timeout=0,
            force=True,
            service_options="{}",
            target_options='{"x": "\u00e9"}',
        )
        [(name, arguments)] = self.received
        self.assertEqual(name, "deploy")
        self.assertEqual(arguments["targets"], ["web-1:3000", "web-2:3000"])
        self.assertEqual(arguments["readers"], [])
        self.assertEqual(arguments["deploy_timeout"], 5 * SECOND)
        self.assertIs(arguments["force"], True)
        self.assertEqual(arguments["target_options"], '{"x": "\u00e9"}')

    async def test_command_failed_carries_the_message(self):
        with self.assertRaises(client.ControlError) as caught:
            await self.call(commands.Remove, service="missing")
        self.assertEqual(str(caught.exception), "service not found")

    async def test_lost_connection_is_unexpected_eof(self):
        with self.assertRaises(client.ControlError) as caught:
            await self.call(commands.Remove, service="hangup")
        self.assertEqual(str(caught.exception), "unexpected EOF")

    async def test_dial_error(self):
        missing = os.path.join(self.dir, "nope.sock")
        with self.assertRaises(client.ControlError) as caught:
            await self.call(commands.List, missing)
        self.assertEqual(
            str(caught.exception), f"dial unix {missing}: connect: no such file or directory"
        )

    async def run_cli(self, *args: str) -> tuple[str, str, int]:
        env = {
            "HOME": self.dir,
            "KAMAL_PROXY_SOCKET": self.path,
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": REPO,
        }
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "kamal_proxy.cli", *args], env=env, path=REPO
        )
        return out.decode(), err.decode(), code

    async def test_cli_process_sends_deploy(self):
        out, err, code = await self.run_cli(
            "deploy", "--target=web-1:3000", "--host", "example.com", "--deploy-timeout=5s", "app"
        )
        self.assertEqual((out, err, code), ("", "", 0))
        [(name, arguments)] = self.received
        self.assertEqual(name, "deploy")
        self.assertEqual(arguments["service"], "app")
        self.assertEqual(arguments["targets"], ["web-1:3000"])
        self.assertEqual(arguments["deploy_timeout"], 5 * SECOND)
        self.assertEqual(json.loads(arguments["service_options"])["hosts"], ["example.com"])
        self.assertTrue(json.loads(arguments["target_options"])["forward_headers"])

    async def test_cli_process_errors_and_list(self):
        out, err, code = await self.run_cli("rm", "missing")
        self.assertEqual((out, err, code), ("", "Error: service not found\n", 1))
        out, err, code = await self.run_cli("remove", "hangup")
        self.assertEqual((out, err, code), ("", "Error: unexpected EOF\n", 1))
        out, err, code = await self.run_cli("ls")
        self.assertEqual(code, 0)
        self.assertIn("\033[1;34mweb\033[0m", out)
        self.assertIn("localhost:3000", out)
