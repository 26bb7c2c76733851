"""The CLI's own AMP codec (control.wire) against Twisted's AMP, and the blocking client against
the real control server (control.server with a real Router) on a Unix socket."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.trial import unittest
from twisted.web import resource, server

from kamal_proxy import app
from kamal_proxy.control import client, commands, wire
from kamal_proxy.control.server import ControlProtocol
from kamal_proxy.routing.router import Router
from kamal_proxy.service_options import HealthCheckConfig, ServiceOptions, TargetOptions

COMMANDS = [
    value
    for value in vars(commands).values()
    if inspect.isclass(value) and issubclass(value, wire.Command) and value is not wire.Command
]
#: The operations a client asks for (each answered), and what the server only tells.
OPERATIONS = [c for c in COMMANDS if c.requiresAnswer]
NOTIFICATIONS = [c for c in COMMANDS if not c.requiresAnswer]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def values_for(arguments: list[tuple[bytes, wire.Argument]]) -> st.SearchStrategy[dict[str, Any]]:
    """A strategy for keyword values that fit an argument list."""

    def strategy(argument: wire.Argument) -> st.SearchStrategy[Any]:
        if argument.optional:  # left out (None) or given
            return st.none() | given(argument)
        return given(argument)

    def given(argument: wire.Argument) -> st.SearchStrategy[Any]:
        if isinstance(argument, wire.ListOf):
            return st.lists(given(argument.element), max_size=5)
        if isinstance(argument, wire.Integer):
            return st.integers(min_value=-(2**70), max_value=2**70)
        if isinstance(argument, wire.Boolean):
            return st.booleans()
        return text

    return st.fixed_dictionaries(
        {name.decode(): strategy(argument) for name, argument in arguments}
    )


class ContractTests(unittest.TestCase):
    def test_every_operation_of_the_spec_is_declared(self):
        self.assertEqual(
            sorted(c.__name__ for c in OPERATIONS),
            sorted(
                [
                    "Deploy",
                    "List",
                    "Pause",
                    "Remove",
                    "Resume",
                    "RolloutDeploy",
                    "RolloutSet",
                    "RolloutStop",
                    "Stop",
                    # Not in the Go original: kamal-proxy upgrade (issue 10).
                    "Upgrade",
                ]
            ),
        )

        self.assertEqual([c.__name__ for c in NOTIFICATIONS], ["DeployProgress"])

    def test_the_server_side_is_twisted_amp(self):
        for command in COMMANDS:
            twin = command.amp()
            self.assertTrue(issubclass(twin, amp.Command))
            self.assertIs(command.amp(), twin)
            self.assertEqual(twin.commandName, command.__name__.encode())
            self.assertEqual(
                [(name, a.optional) for name, a in twin.arguments],
                [(name, a.optional) for name, a in command.arguments],
            )
            self.assertEqual(twin.requiresAnswer, command.requiresAnswer)
        for command in OPERATIONS:
            self.assertEqual(command.amp().errors, {commands.CommandFailed: b"COMMAND_FAILED"})

    def test_progress_is_optional_and_asked_only(self):
        """A deploy that does not ask for progress is the same box as before it existed."""
        values = {
            "service": "app",
            "targets": ["a:1"],
            "readers": [],
            "deploy_timeout": 0,
            "drain_timeout": 0,
            "force": False,
            "service_options": "{}",
            "target_options": "{}",
        }
        [plain] = amp.parseString(commands.Deploy.request(b"1", values))
        self.assertNotIn(b"progress", plain)
        self.assertIsNone(commands.Deploy.amp().parseArguments(plain, None)["progress"])
        [asked] = amp.parseString(commands.Deploy.request(b"1", {**values, "progress": True}))
        self.assertEqual(asked[b"progress"], b"True")
        rollout = {k: values[k] for k in ("service", "targets", "readers")}
        rollout.update(deploy_timeout=0, drain_timeout=0)
        [box] = amp.parseString(commands.RolloutDeploy.request(b"1", rollout))
        self.assertNotIn(b"progress", box)


class CodecTests(unittest.TestCase):
    """Every request this codec writes is what Twisted writes, byte for byte, and back."""

    @settings(max_examples=30, deadline=None)
    @given(st.data())
    def test_requests_match_twisted(self, data):
        for command in COMMANDS:
            values = data.draw(values_for(command.arguments))
            ours = command.request(b"1", values)
            box = command.amp().makeArguments(dict(values), None)
            box[amp.COMMAND] = command.commandName
            if command.requiresAnswer:
                box[amp.ASK] = b"1"
            self.assertEqual(ours, box.serialize())
            [back] = wire.BoxReader().feed(box.serialize())
            self.assertEqual(command.parse_arguments(back), values)
            [parsed] = amp.parseString(ours)
            self.assertEqual(command.amp().parseArguments(parsed, None), values)

    @settings(max_examples=30, deadline=None)
    @given(text)
    def test_responses_from_twisted_decode(self, services):
        box = commands.List.amp().makeResponse({"services": services}, None)
        box[amp.ANSWER] = b"1"
        [parsed] = wire.BoxReader().feed(box.serialize())
        self.assertEqual(commands.List.parse_response(parsed), {"services": services})

    def test_big_text_spans_keys_both_ways(self):
        big = "é" * 100_000  # 200,000 bytes: four AMP values
        box = commands.List.amp().makeResponse({"services": big}, None)
        self.assertEqual(box[b"services"], b"4")
        reader = wire.BoxReader()
        data = box.serialize()
        # Fed in small pieces, as a socket may deliver it.
        boxes = [b for i in range(0, len(data), 1000) for b in reader.feed(data[i : i + 1000])]
        self.assertEqual([commands.List.parse_response(b) for b in boxes], [{"services": big}])

    def test_big_request_text_reaches_twisted(self):
        values = {
            "service": "app",
            "targets": ["a:1"],
            "readers": [],
            "deploy_timeout": 0,
            "drain_timeout": 0,
            "force": False,
            "service_options": "x" * 200_000,
            "target_options": "",
            "progress": None,
        }
        [box] = amp.parseString(commands.Deploy.request(b"7", values))
        self.assertEqual(box[amp.ASK], b"7")
        self.assertEqual(commands.Deploy.amp().parseArguments(box, None), values)

    def test_boxes_in_a_row(self):
        data = wire.encode_box({b"a": b"1"}) + wire.encode_box({b"b": b""}) + b"\x00"
        reader = wire.BoxReader()
        self.assertEqual(reader.feed(data), [{b"a": b"1"}, {b"b": b""}])
        self.assertEqual(reader.feed(b"\x00"), [{}])

    def test_limits(self):
        with self.assertRaises(wire.WireError):
            wire.encode_box({b"k" * 256: b""})
        with self.assertRaises(wire.WireError):
            wire.encode_box({b"k": b"v" * 65536})
        with self.assertRaises(wire.WireError):
            wire.BoxReader().feed(b"\x01\x00")
        with self.assertRaises(wire.WireError):
            commands.Remove.request(b"1", {"service": "x" * 70_000})

    def test_wrong_arguments_are_a_programming_error(self):
        with self.assertRaises(TypeError):
            commands.Remove.request(b"1", {})
        with self.assertRaises(TypeError):
            commands.Remove.request(b"1", {"service": "a", "force": True})


class RealServerTests(unittest.TestCase):
    """The blocking client (in a thread) against control.server and a real Router."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kp-ctl-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "kp.sock")
        self.router = Router(
            reactor,
            os.path.join(self.dir, "state.json"),
            app.upstream_pool,
            health_check_factory=app.health_check,
        )
        port = reactor.listenUNIX(
            self.path, Factory.forProtocol(lambda: ControlProtocol(self.router))
        )
        self.addCleanup(port.stopListening)

    def call(self, command: type, **arguments: Any):
        return threads.deferToThread(client.call, command, self.path, **arguments)

    async def test_list_remove_and_errors(self):
        self.assertEqual(json.loads((await self.call(commands.List))["services"]), {})
        with self.assertRaises(client.ControlError) as caught:
            await self.call(commands.Remove, service="nope")
        self.assertEqual(str(caught.exception), "service not found")
        with self.assertRaises(client.ControlError) as caught:
            await self.call(
                commands.Deploy,
                service="bad",
                targets=["a b"],
                readers=[],
                deploy_timeout=0,
                drain_timeout=0,
                force=False,
                service_options=json.dumps(ServiceOptions().to_json()),
                target_options=json.dumps(TargetOptions().to_json()),
            )
        self.assertEqual(str(caught.exception), "a b :invalid host pattern")

    async def test_list_beyond_one_amp_value(self):
        # Four services of 1,000 hosts: each deploy (and its log line) stays below AMP's 64 KiB
        # per value, the list answer does not.
        hosts = {
            f"s{n}": [f"host-{i}.service-{n}.example.com" for i in range(1000)] for n in range(4)
        }
        for name, names in hosts.items():
            await self.call(
                commands.Deploy,
                service=name,
                targets=["127.0.0.1:9"],
                readers=[],
                deploy_timeout=1_000_000_000,
                drain_timeout=0,
                force=True,
                service_options=json.dumps(ServiceOptions(hosts=names).to_json()),
                target_options=json.dumps(TargetOptions().to_json()),
            )
            self.addCleanup(self.router.remove, name)
        reply = (await self.call(commands.List))["services"]
        self.assertGreater(len(reply), 65535)
        services = json.loads(reply)
        self.assertEqual(
            {name: services[name]["host"] for name in hosts},
            {name: ",".join(names) for name, names in hosts.items()},
        )

    def _upstream(self, failures: int) -> str:
        """An HTTP app on loopback whose ``/up`` answers 503 ``failures`` times, then 200."""
        left = [failures]

        class Up(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                if left[0] > 0:
                    left[0] -= 1
                    request.setResponseCode(503)
                return b"ok"

        port = reactor.listenTCP(0, server.Site(Up()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}"

    def _deploy(self, target: str, progress: bool | None, events: list) -> Any:
        checks = TargetOptions(
            health_check_config=HealthCheckConfig(interval=50_000_000, timeout=10**9)
        )
        return self.call(
            commands.Deploy,
            on_notification={commands.DeployProgress: events.append},
            service="web",
            targets=[target],
            readers=[],
            deploy_timeout=10 * 10**9,
            drain_timeout=10**9,
            force=False,
            service_options=json.dumps(ServiceOptions().to_json()),
            target_options=json.dumps(checks.to_json()),
            progress=progress,
        )

    async def test_progress_before_the_answer_only_when_asked(self):
        """Issue 12 §3: a deploy that asks gets each health check and the drain on its
        connection before the answer; one that does not ask gets nothing new."""
        self.addCleanup(self.router.remove, "web")
        quiet: list[dict[str, Any]] = []
        first = self._upstream(failures=0)
        await self._deploy(first, None, quiet)
        second = self._upstream(failures=2)
        events: list[dict[str, Any]] = []
        await self._deploy(second, True, events)
        self.assertEqual(
            [(e["event"], e["target"], e["reason"]) for e in events[:3]],
            [
                ("health", second, "unexpected status (503)"),
                ("health", second, "unexpected status (503)"),
                ("health", second, ""),
            ],
        )
        self.assertEqual(
            [(e["event"], e["targets"], e["timeout"]) for e in events[3:]],
            [("drain", [first], 10**9), ("drained", [first], None)],
        )
        third = self._upstream(failures=1)
        await self._deploy(third, False, quiet)
        self.assertEqual(quiet, [])

    async def test_calls_leave_no_line_in_the_log(self):
        """Issue 12 §2: AMP's "connection established/lost" lines, two per CLI call, are not
        written to twistd's log."""
        from twisted.logger import formatEvent, globalLogPublisher

        seen: list[str] = []

        def observe(event: dict) -> None:
            if "kp_msg" not in event:  # Twisted's own lines
                seen.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for _ in range(3):
            await self.call(commands.List)
        with self.assertRaises(client.ControlError):
            await self.call(commands.Remove, service="nope")
        await deferLater(reactor, 0.05, lambda: None)  # the server sees each hang-up
        self.assertEqual(seen, [])
