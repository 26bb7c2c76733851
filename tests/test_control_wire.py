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
from twisted.protocols import amp
from twisted.trial import unittest

from kamal_proxy.control import client, commands, wire
from kamal_proxy.control.server import ControlProtocol
from kamal_proxy.routing.options import ServiceOptions, TargetOptions
from kamal_proxy.routing.router import Router

COMMANDS = [
    value
    for value in vars(commands).values()
    if inspect.isclass(value) and issubclass(value, wire.Command) and value is not wire.Command
]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def values_for(arguments: list[tuple[bytes, wire.Argument]]) -> st.SearchStrategy[dict[str, Any]]:
    """A strategy for keyword values that fit an argument list."""

    def strategy(argument: wire.Argument) -> st.SearchStrategy[Any]:
        if isinstance(argument, wire.ListOf):
            return st.lists(strategy(argument.element), max_size=5)
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
            sorted(c.__name__ for c in COMMANDS),
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
                ]
            ),
        )

    def test_the_server_side_is_twisted_amp(self):
        for command in COMMANDS:
            twin = command.amp()
            self.assertTrue(issubclass(twin, amp.Command))
            self.assertIs(command.amp(), twin)
            self.assertEqual(twin.commandName, command.__name__.encode())
            self.assertEqual(
                [name for name, _ in twin.arguments], [name for name, _ in command.arguments]
            )
            self.assertEqual(twin.errors, {commands.CommandFailed: b"COMMAND_FAILED"})


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
            box[amp.ASK] = b"1"
            self.assertEqual(ours, box.serialize())
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
        self.router = Router(reactor, os.path.join(self.dir, "state.json"))
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
