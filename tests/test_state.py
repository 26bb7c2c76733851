"""Tests for kamal_proxy.routing.state: the state file format, legacy reading, atomic saving."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from kamal_proxy.routing.state import (
    PAUSE_PAUSED,
    PAUSE_RUNNING,
    PAUSE_STOPPED,
    ServiceState,
    StateError,
    StateReadError,
    decode,
    encode,
    load,
    save,
)
from kamal_proxy.routing.table import RoutingTable
from kamal_proxy.service_options import (
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
    normalize_hosts,
    normalize_path_prefixes,
)
from tests.spec_keys import OPTION_KEYS, TARGET_OPTION_KEYS
from tests.spec_keys import SERVICE_KEYS as TOP_KEYS

# The §15.2 example, as the Go original writes it (with its own whitespace removed).
GO_EXAMPLE = b"""[
  {
    "name": "app-web",
    "options": {
      "hosts": ["example.com"],
      "path_prefixes": ["/"],
      "tls_enabled": true,
      "tls_certificate_path": "",
      "tls_private_key_path": "",
      "tls_on_demand_url": "",
      "tls_redirect": true,
      "canonical_host": "",
      "acme_directory": "",
      "acme_cache_path": "/home/app/.config/kamal-proxy/certs",
      "error_page_path": "",
      "strip_prefix": true,
      "writer_affinity_timeout": 1000000000,
      "read_targets_accept_websockets": false,
      "exclude_metrics_paths": null,
      "client_ip_header": ""
    },
    "target_options": {
      "health_check_config": {"path": "/up", "port": 0, "interval": 1000000000,
                              "timeout": 5000000000, "host": ""},
      "response_timeout": 30000000000,
      "buffer_requests": true,
      "buffer_responses": true,
      "max_memory_buffer_size": 1048576,
      "max_request_body_size": 0,
      "max_response_body_size": 0,
      "log_request_headers": ["Cache-Control", "Last-Modified", "User-Agent"],
      "log_response_headers": null,
      "forward_headers": false,
      "scope_cookie_paths": false
    },
    "active_targets": ["172.1.0.2:80"],
    "active_readers": [],
    "rollout_targets": null,
    "rollout_readers": null,
    "pause_controller": {"state": 0, "stop_message": "", "fail_after": 0},
    "rollout_controller": null
  }
]
"""


def ordered(data: bytes):
    """Parse keeping key order, to compare layouts."""
    return json.loads(data, object_pairs_hook=lambda pairs: pairs)


class FormatTests(unittest.TestCase):
    def test_go_example_restores_faithfully(self) -> None:
        [state] = decode(GO_EXAMPLE)
        self.assertEqual(state.name, "app-web")
        self.assertEqual(state.options.hosts, ["example.com"])
        self.assertEqual(state.options.path_prefixes, ["/"])
        self.assertTrue(state.options.tls_enabled)
        self.assertTrue(state.options.tls_redirect)
        self.assertTrue(state.options.strip_prefix)
        self.assertEqual(state.options.acme_cache_path, "/home/app/.config/kamal-proxy/certs")
        self.assertEqual(state.options.writer_affinity_timeout, 1_000_000_000)
        self.assertEqual(state.options.exclude_metrics_paths, [])
        self.assertEqual(
            state.target_options.health_check_config,
            HealthCheckConfig("/up", 0, 1_000_000_000, 5_000_000_000, ""),
        )
        self.assertEqual(state.target_options.response_timeout, 30_000_000_000)
        self.assertTrue(state.target_options.buffer_requests)
        self.assertEqual(state.target_options.max_memory_buffer_size, 1 << 20)
        self.assertEqual(
            state.target_options.log_request_headers,
            ["Cache-Control", "Last-Modified", "User-Agent"],
        )
        self.assertFalse(state.target_options.forward_headers)
        self.assertEqual(state.active_targets, ["172.1.0.2:80"])
        self.assertEqual(state.active_readers, [])
        self.assertIsNone(state.rollout_targets)
        self.assertIsNone(state.rollout_readers)
        self.assertEqual(
            (state.pause_state, state.stop_message, state.fail_after), (PAUSE_RUNNING, "", 0)
        )
        self.assertIsNone(state.rollout)

    def test_encoding_reproduces_go_layout(self) -> None:
        out = encode(decode(GO_EXAMPLE))
        self.assertTrue(out.endswith(b"]\n"))
        self.assertEqual(out.count(b"\n"), 1)
        self.assertEqual(json.loads(out), json.loads(GO_EXAMPLE))
        [service] = ordered(out)
        self.assertEqual([key for key, _ in service], TOP_KEYS)
        body = dict(service)
        self.assertEqual([key for key, _ in body["options"]], OPTION_KEYS)
        self.assertEqual([key for key, _ in body["target_options"]], TARGET_OPTION_KEYS)
        health = dict(body["target_options"])["health_check_config"]
        self.assertEqual([k for k, _ in health], ["path", "port", "interval", "timeout", "host"])
        self.assertEqual(
            [k for k, _ in body["pause_controller"]], ["state", "stop_message", "fail_after"]
        )

    def test_go_stopped_with_reader(self) -> None:
        # Scenario 143: a Go-written file with a writer, a reader and a stopped service.
        doc = json.loads(GO_EXAMPLE)
        doc[0]["options"]["tls_enabled"] = False
        doc[0]["active_targets"] = ["127.0.0.1:3001"]
        doc[0]["active_readers"] = ["127.0.0.1:3002"]
        doc[0]["pause_controller"] = {"state": 2, "stop_message": "Back at noon", "fail_after": 0}
        [state] = decode(json.dumps(doc).encode())
        self.assertEqual(state.active_targets, ["127.0.0.1:3001"])
        self.assertEqual(state.active_readers, ["127.0.0.1:3002"])
        self.assertEqual((state.pause_state, state.stop_message), (PAUSE_STOPPED, "Back at noon"))

    def test_legacy_object(self) -> None:
        # §15.2's legacy example
        legacy = (
            b'[{"name": "old", "active_target": "127.0.0.1:3000", '
            b'"hosts": ["legacy.example.com"], "options": {}, "target_options": '
            b'{"health_check_config": {"path": "/up", "interval": 1000000000, '
            b'"timeout": 5000000000}}, "pause_controller": {"state": 0}}]'
        )
        [state] = decode(legacy)
        self.assertEqual(state.name, "old")
        self.assertEqual(state.active_targets, ["127.0.0.1:3000"])
        self.assertEqual(state.options.hosts, ["legacy.example.com"])
        self.assertEqual(state.options.path_prefixes, ["/"])
        self.assertEqual(state.target_options.health_check_config.path, "/up")
        self.assertEqual(state.target_options.health_check_config.interval, 1_000_000_000)
        self.assertEqual(state.target_options.response_timeout, 0)  # missing: no timeout
        self.assertEqual(state.pause_state, PAUSE_RUNNING)
        self.assertFalse(state.options.tls_enabled)
        table = RoutingTable.build([state])
        self.assertIs(table.lookup("legacy.example.com", "/").service, state)

    def test_scenario_47(self) -> None:
        legacy = json.dumps(
            [
                {
                    "name": "app",
                    "hosts": ["app.example.com"],
                    "active_target": "localhost:3000",
                    "options": {},
                    "target_options": {"response_timeout": 3_000_000_000},
                }
            ]
        ).encode()
        [state] = decode(legacy)
        self.assertEqual(state.active_targets, ["localhost:3000"])
        self.assertEqual(state.options.hosts, ["app.example.com"])
        self.assertEqual(state.options.path_prefixes, ["/"])
        self.assertEqual(state.target_options.response_timeout, 3_000_000_000)

    def test_legacy_keys_only_fill_empty_values(self) -> None:
        doc = [
            {
                "name": "s",
                "active_targets": ["new:1"],
                "active_target": "old:1",
                "rollout_targets": [],
                "rollout_target": "roll:1",
                "options": {"hosts": ["new.example.com"], "path_prefixes": None},
                "hosts": ["old.example.com"],
                "path_prefixes": ["api/"],
            }
        ]
        [state] = decode(json.dumps(doc).encode())
        self.assertEqual(state.active_targets, ["new:1"])
        self.assertEqual(state.rollout_targets, ["roll:1"])
        self.assertEqual(state.options.hosts, ["new.example.com"])
        self.assertEqual(state.options.path_prefixes, ["/api"])

    def test_scenario_46_stopped_with_rollout(self) -> None:
        split = 4294967295.0 * (20 / 100.0)
        state = ServiceState(
            name="service1",
            options=ServiceOptions(hosts=["example.com"]).normalized(),
            target_options=TargetOptions(response_timeout=10_000_000_000, buffer_requests=True),
            active_targets=["first:80"],
            active_readers=[],
            rollout_targets=["second:80"],
            rollout_readers=[],
            pause_state=PAUSE_STOPPED,
            stop_message="Down for maintenance",
            rollout={"percentage": 20, "percentage_split_point": split, "allowlist": ["first"]},
        )
        data = encode([state])
        [restored] = decode(data)
        self.assertEqual(restored, state)
        self.assertEqual(restored.name, "service1")
        self.assertEqual(restored.active_targets, ["first:80"])
        self.assertEqual(restored.target_options, state.target_options)
        self.assertEqual((restored.pause_state, restored.stop_message), (2, "Down for maintenance"))
        self.assertEqual(restored.rollout["percentage"], 20)
        self.assertEqual(restored.rollout["allowlist"], ["first"])
        self.assertEqual(restored.rollout["percentage_split_point"], split)
        # Written like Go writes a float64 with an integral value.
        rollout = json.loads(data)[0]["rollout_controller"]
        self.assertEqual(
            rollout, {"percentage": 20, "percentage_split_point": 858993459, "allowlist": ["first"]}
        )

    def test_split_point_used_as_stored(self) -> None:
        doc = [{"name": "s", "rollout_controller": {"percentage": 50, "percentage_split_point": 7}}]
        [state] = decode(json.dumps(doc).encode())
        self.assertEqual(
            state.rollout, {"percentage": 50, "percentage_split_point": 7.0, "allowlist": []}
        )

    def test_paused_state(self) -> None:
        doc = [{"name": "s", "pause_controller": {"state": 1, "fail_after": 300_000_000}}]
        [state] = decode(json.dumps(doc).encode())
        self.assertEqual((state.pause_state, state.fail_after), (PAUSE_PAUSED, 300_000_000))

    def test_missing_keys_take_zero_values(self) -> None:
        [state] = decode(b'[{"name": "bare"}]')
        self.assertEqual(
            state,
            ServiceState(
                name="bare",
                options=ServiceOptions.from_json({}).normalized(),
                target_options=TargetOptions.from_json({}),
            ),
        )
        self.assertEqual(state.options.hosts, [""])
        self.assertFalse(state.options.tls_redirect)
        self.assertFalse(state.options.strip_prefix)
        self.assertEqual(state.target_options.response_timeout, 0)

    def test_unknown_keys_ignored_and_nulls(self) -> None:
        doc = [
            {
                "name": "s",
                "future": {"x": [1, 2]},
                "options": {"hosts": ["a.com", None], "brand_new": True, "tls_enabled": None},
                "target_options": {"health_check_config": None},
                "active_targets": None,
                "pause_controller": None,
                "rollout_controller": None,
            }
        ]
        [state] = decode(json.dumps(doc).encode())
        self.assertEqual(state.options.hosts, ["a.com", ""])
        self.assertFalse(state.options.tls_enabled)
        self.assertEqual(state.active_targets, [])
        self.assertEqual(state.target_options.health_check_config, HealthCheckConfig.from_json({}))

    def test_empty_and_null_documents(self) -> None:
        self.assertEqual(decode(b"[]\n"), [])
        self.assertEqual(decode(b"null"), [])
        self.assertEqual(encode([]), b"[]\n")

    def test_trailing_data_ignored_like_go_decoder(self) -> None:
        self.assertEqual(decode(b'  [{"name": "a"}]\n garbage').pop().name, "a")

    def test_go_escaping_and_unicode(self) -> None:
        state = ServiceState(name="a<b>&c\u2028 é \u2603", stop_message="<b>bye</b>")
        data = encode([state])
        self.assertIn(b"a\\u003cb\\u003e\\u0026c\\u2028", data)
        self.assertIn("é ☃".encode(), data)
        self.assertEqual(decode(data)[0].name, state.name)
        self.assertEqual(decode(data)[0].stop_message, "<b>bye</b>")

    def test_lone_surrogate_round_trips(self) -> None:
        state = ServiceState(name="bad\udcff")
        self.assertEqual(decode(encode([state]))[0].name, "bad\udcff")

    def test_invalid_utf8_is_replaced(self) -> None:
        self.assertEqual(decode(b'[{"name": "a\xffb"}]')[0].name, "a\ufffdb")

    def test_encode_failure_is_state_error(self) -> None:
        with self.assertRaises(StateError):
            encode([ServiceState(name="x", rollout={"percentage": None})])
        with self.assertRaises(StateError):
            encode([ServiceState(name=object())])  # type: ignore[arg-type]


class WrongShapeTests(unittest.TestCase):
    def assertBad(self, data: bytes | str) -> StateError:
        if isinstance(data, str):
            data = data.encode()
        with self.assertRaises(StateError) as ctx:
            decode(data)
        self.assertTrue(str(ctx.exception))
        return ctx.exception

    def test_invalid_json(self) -> None:
        for data in [b"", b"   ", b"{ this is not json", b"[", b"[{]", b"\xef\xbb\xbf[]"]:
            self.assertBad(data)

    def test_non_standard_literals(self) -> None:
        self.assertBad('[{"name": "a", "pause_controller": {"fail_after": NaN}}]')
        self.assertBad(
            '[{"name": "a", "rollout_controller": {"percentage_split_point": Infinity}}]'
        )

    def test_wrong_shapes(self) -> None:
        bad = [
            "{}",
            '"text"',
            "1",
            "[1]",
            "[null]",
            "[[]]",
            '[{"name": 1}]',
            '[{"name": "a", "options": []}]',
            '[{"name": "a", "options": {"hosts": "example.com"}}]',
            '[{"name": "a", "options": {"hosts": [1]}}]',
            '[{"name": "a", "options": {"tls_enabled": "yes"}}]',
            '[{"name": "a", "options": {"tls_enabled": 1}}]',
            '[{"name": "a", "options": {"writer_affinity_timeout": 1.5}}]',
            '[{"name": "a", "options": {"writer_affinity_timeout": 1e9}}]',
            '[{"name": "a", "options": {"writer_affinity_timeout": true}}]',
            '[{"name": "a", "target_options": {"health_check_config": []}}]',
            '[{"name": "a", "target_options": {"health_check_config": {"port": "80"}}}]',
            '[{"name": "a", "target_options": {"response_timeout": 9223372036854775808}}]',
            '[{"name": "a", "active_targets": "x:1"}]',
            '[{"name": "a", "active_readers": {}}]',
            '[{"name": "a", "active_target": ["x:1"]}]',
            '[{"name": "a", "hosts": "x"}]',
            '[{"name": "a", "pause_controller": 2}]',
            '[{"name": "a", "pause_controller": {"state": 3}}]',
            '[{"name": "a", "pause_controller": {"state": -1}}]',
            '[{"name": "a", "pause_controller": {"stop_message": 5}}]',
            '[{"name": "a", "rollout_controller": []}]',
            '[{"name": "a", "rollout_controller": {"percentage": "20"}}]',
            '[{"name": "a", "rollout_controller": {"percentage_split_point": "1"}}]',
            '[{"name": "a", "rollout_controller": {"percentage_split_point": 1e400}}]',
            '[{"name": "a", "rollout_controller": {"allowlist": "first"}}]',
        ]
        for data in bad:
            error = self.assertBad(data)
            self.assertIsNone(error.kept_at)

    def test_one_bad_service_fails_the_whole_file(self) -> None:
        # §21.1 item 8: restore is all or nothing.
        self.assertBad('[{"name": "good"}, {"name": "bad", "options": {"hosts": 7}}]')

    def test_error_names_the_place(self) -> None:
        error = self.assertBad('[{"name": "a"}, {"name": "b", "options": {"hosts": "x"}}]')
        self.assertIn("service[1].options.hosts", str(error))

    def test_resource_exhaustion_inputs(self) -> None:
        self.assertBad(b"[" * 100_000)
        self.assertBad(
            b'[{"name": "a", "target_options": {"response_timeout": 1' + b"0" * 5000 + b"}}]"
        )

    def test_non_bytes_input(self) -> None:
        with self.assertRaises(StateError):
            decode("[]")  # type: ignore[arg-type]


# -- hypothesis -------------------------------------------------------------------------------

_INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
_TEXT = st.text(max_size=12)
_STRS = st.lists(_TEXT, max_size=3)


@st.composite
def service_options(draw) -> ServiceOptions:
    options = ServiceOptions(
        hosts=normalize_hosts(draw(_STRS)),
        path_prefixes=normalize_path_prefixes(draw(_STRS)),
        tls_enabled=draw(st.booleans()),
        tls_certificate_path=draw(_TEXT),
        tls_private_key_path=draw(_TEXT),
        tls_on_demand_url=draw(_TEXT),
        tls_redirect=draw(st.booleans()),
        canonical_host=draw(_TEXT),
        acme_directory=draw(_TEXT),
        acme_cache_path=draw(_TEXT),
        error_page_path=draw(_TEXT),
        strip_prefix=draw(st.booleans()),
        writer_affinity_timeout=draw(_INT64),
        read_targets_accept_websockets=draw(st.booleans()),
        exclude_metrics_paths=draw(_STRS),
        client_ip_header=draw(_TEXT),
    )
    return options


@st.composite
def target_options(draw) -> TargetOptions:
    return TargetOptions(
        health_check_config=HealthCheckConfig(
            path=draw(_TEXT),
            port=draw(_INT64),
            interval=draw(_INT64),
            timeout=draw(_INT64),
            host=draw(_TEXT),
        ),
        response_timeout=draw(_INT64),
        buffer_requests=draw(st.booleans()),
        buffer_responses=draw(st.booleans()),
        max_memory_buffer_size=draw(_INT64),
        max_request_body_size=draw(_INT64),
        max_response_body_size=draw(_INT64),
        log_request_headers=draw(_STRS),
        log_response_headers=draw(_STRS),
        forward_headers=draw(st.booleans()),
        scope_cookie_paths=draw(st.booleans()),
    )


_ROLLOUT = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "percentage": _INT64,
            "percentage_split_point": st.floats(allow_nan=False, allow_infinity=False),
            "allowlist": _STRS,
        }
    ),
)

service_states = st.builds(
    ServiceState,
    name=_TEXT,
    options=service_options(),
    target_options=target_options(),
    active_targets=_STRS,
    active_readers=_STRS,
    rollout_targets=st.one_of(st.none(), _STRS),
    rollout_readers=st.one_of(st.none(), _STRS),
    pause_state=st.sampled_from([PAUSE_RUNNING, PAUSE_PAUSED, PAUSE_STOPPED]),
    stop_message=_TEXT,
    fail_after=_INT64,
    rollout=_ROLLOUT,
)

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                TOP_KEYS
                + OPTION_KEYS
                + TARGET_OPTION_KEYS
                + ["state", "stop_message", "fail_after", "percentage", "percentage_split_point"]
                + ["allowlist", "active_target", "rollout_target", "path", "port", "x"]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.lists(service_states, max_size=3))
    def test_round_trip(self, states) -> None:
        data = encode(states)
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(decode(data), states)
        # Encoding is stable: what we read back encodes to the same bytes.
        self.assertEqual(encode(decode(data)), data)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_only_state_error(self, data) -> None:
        try:
            decode(data)
        except StateError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(_JSON)
    def test_arbitrary_json_only_state_error(self, value) -> None:
        for doc in (value, [value], [{"name": "a", "options": value}]):
            try:
                decode(json.dumps(doc).encode())
            except StateError:
                pass

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_mutated_go_example_only_state_error(self, data) -> None:
        doc = json.loads(GO_EXAMPLE)
        node = doc[0]
        # Walk down a random path and replace what is found there with arbitrary JSON.
        while isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            if isinstance(node[key], dict) and data.draw(st.booleans()):
                node = node[key]
                continue
            node[key] = data.draw(_JSON)
            break
        try:
            states = decode(json.dumps(doc).encode())
        except StateError:
            return
        # Whatever decodes also encodes and decodes again to the same thing.
        self.assertEqual(decode(encode(states)), states)


# -- the file ---------------------------------------------------------------------------------


def _fixed_now() -> datetime:
    return datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


class FileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "kamal-proxy.state")

    def test_missing_file(self) -> None:
        self.assertIsNone(load(self.path))

    def test_save_and_load(self) -> None:
        states = [ServiceState(name="a", active_targets=["a:1"]), ServiceState(name="b")]
        save(self.path, states)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), encode(states))
        self.assertEqual(
            load(self.path),
            [
                ServiceState(
                    name="a", options=ServiceOptions().normalized(), active_targets=["a:1"]
                ),
                ServiceState(name="b", options=ServiceOptions().normalized()),
            ],
        )
        self.assertEqual(os.listdir(self.dir), ["kamal-proxy.state"])

    def test_mode_0600_whatever_the_umask(self) -> None:
        old = os.umask(0)
        try:
            save(self.path, [])
            save(self.path, [ServiceState(name="x")])
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_replaces_existing_file_without_temp_leftovers(self) -> None:
        for i in range(5):
            save(self.path, [ServiceState(name=f"s{i}")])
        self.assertEqual(os.listdir(self.dir), ["kamal-proxy.state"])
        self.assertEqual(load(self.path)[0].name, "s4")

    def test_save_into_missing_directory(self) -> None:
        with self.assertRaises(StateError):
            save(os.path.join(self.dir, "nope", "state"), [])
        self.assertEqual(os.listdir(self.dir), [])

    def test_failed_rename_leaves_no_temp_file(self) -> None:
        os.makedirs(self.path)  # a directory where the file should be: rename fails
        with self.assertRaises(StateError):
            save(self.path, [ServiceState(name="x")])
        self.assertEqual(os.listdir(self.dir), ["kamal-proxy.state"])

    def test_save_encoding_failure(self) -> None:
        with self.assertRaises(StateError):
            save(self.path, [ServiceState(name=object())])  # type: ignore[arg-type]
        self.assertEqual(os.listdir(self.dir), [])

    def test_corrupt_file_is_kept_aside(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"{ this is not json")
        with self.assertRaises(StateError) as ctx:
            load(self.path, now=_fixed_now)
        kept = self.path + ".corrupt-20250102T030405Z"
        self.assertEqual(ctx.exception.kept_at, kept)
        self.assertIn(kept, str(ctx.exception))
        self.assertIn("invalid JSON", str(ctx.exception))
        self.assertFalse(os.path.exists(self.path))
        with open(kept, "rb") as f:
            self.assertEqual(f.read(), b"{ this is not json")
        # The next start finds no state, and a save does not touch the kept copy.
        self.assertIsNone(load(self.path))
        save(self.path, [])
        with open(kept, "rb") as f:
            self.assertEqual(f.read(), b"{ this is not json")

    def test_second_corrupt_file_in_the_same_second(self) -> None:
        for content in (b"first", b'[{"name": 1}]'):
            with open(self.path, "wb") as f:
                f.write(content)
            with self.assertRaises(StateError):
                load(self.path, now=_fixed_now)
        base = self.path + ".corrupt-20250102T030405Z"
        with open(base, "rb") as f:
            self.assertEqual(f.read(), b"first")
        with open(base + ".1", "rb") as f:
            self.assertEqual(f.read(), b'[{"name": 1}]')

    def test_unreadable_path(self) -> None:
        os.makedirs(self.path)  # reading a directory fails
        with self.assertRaises(StateReadError) as ctx:
            load(self.path, now=_fixed_now)
        self.assertEqual(ctx.exception.kept_at, self.path + ".corrupt-20250102T030405Z")
        self.assertFalse(os.path.exists(self.path))
