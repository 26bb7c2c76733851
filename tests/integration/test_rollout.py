"""rollout deploy / set / stop against the real process (SPEC §3.7, §12.3, §13.5-§13.7, §15.2;
scenarios 38-43, 167)."""

from __future__ import annotations

from tests.integration.support import shared_upstream
from tests.integration.traffic_support import TrafficTestCase, fnv1a32, in_group, split_point


class RolloutTests(TrafficTestCase):
    shared = True

    def setUp(self):
        super().setUp()
        self.first = shared_upstream("first")
        self.second = shared_upstream("second")

    def served_by(self, client, host: str, cookie: str | None) -> str:
        headers = {"Cookie": f"kamal-rollout={cookie}"} if cookie is not None else None
        resp = client.request("GET", "/", host=host, headers=headers)
        self.assertEqual(resp.status, 200, repr(resp))
        return resp.text

    def test_reference_hashes(self):
        """§12.3 example hashes (checks the test's own reference implementation)."""
        self.assertEqual(fnv1a32(b"1"), 873244444)
        self.assertEqual(fnv1a32(b"2"), 923577301)
        self.assertEqual(fnv1a32(b"00001"), 1231224044)

    def test_allowlist_set_and_stop(self):
        """Scenarios 38, 167: no traffic before `set`, allowlist in and out, `stop`, `list`."""
        self.deploy("ro-basic", self.first.addr, "--host", "basic.rollout")
        mark = self.proxy.log_mark()
        self.assertEqual(
            self.proxy.cli_ok("rollout", "deploy", "ro-basic", "--target", self.second.addr), ""
        )
        self.proxy.wait_for_log("Deployed for rollout", since=mark, service="ro-basic")
        self.assertEqual(self.list_state(self.proxy, "ro-basic")[3], self.first.addr)
        client = self.proxy.client()
        for cookie in (None, "1", "2", "anything"):
            self.assertEqual(self.served_by(client, "basic.rollout", cookie), "first")

        self.proxy.cli_ok("rollout", "set", "ro-basic", "--list", "1")
        log = self.proxy.wait_for_log("Set rollout split", since=mark, service="ro-basic")
        self.assertEqual((log["percentage"], log["allowlist"]), (0, ["1"]))
        self.assertEqual(self.served_by(client, "basic.rollout", "1"), "second")
        self.assertEqual(self.served_by(client, "basic.rollout", '"1"'), "second")
        self.assertEqual(self.served_by(client, "basic.rollout", "2"), "first")
        self.assertEqual(self.served_by(client, "basic.rollout", None), "first")
        # Host routing still applies: the rollout never leaks to other hosts.
        self.assertEqual(
            self.proxy.request(
                "GET", "/", host="elsewhere.rollout", headers={"Cookie": "kamal-rollout=1"}
            ).status,
            404,
        )
        state = self.state_service(self.proxy, "ro-basic")
        self.assertEqual(state["rollout_targets"], [self.second.addr])
        self.assertEqual(
            state["rollout_controller"],
            {"percentage": 0, "percentage_split_point": 0, "allowlist": ["1"]},
        )

        self.proxy.cli_ok("rollout", "set", "ro-basic", "--list", "alpha", "--list", "beta,gamma")
        for cookie, want in (
            ("1", "first"),
            ("alpha", "second"),
            ("beta", "second"),
            ("gamma", "second"),
            ("delta", "first"),
        ):
            self.assertEqual(self.served_by(client, "basic.rollout", cookie), want, cookie)

        self.assertEqual(self.proxy.cli_ok("rollout", "stop", "ro-basic"), "")
        self.proxy.wait_for_log("Stopped rollout", since=mark, service="ro-basic")
        self.assertEqual(self.served_by(client, "basic.rollout", "alpha"), "first")
        state = self.state_service(self.proxy, "ro-basic")
        self.assertIsNone(state["rollout_controller"])
        self.assertEqual(state["rollout_targets"], [self.second.addr], "targets stay installed")
        # `set` after `stop` works without a new `rollout deploy`.
        self.proxy.cli_ok("rollout", "set", "ro-basic", "--list", "alpha")
        self.assertEqual(self.served_by(client, "basic.rollout", "alpha"), "second")
        client.close()

    def test_percentage_shares_match_fnv1a_and_are_sticky(self):
        """Scenarios 40, 41, 167: membership of 300 distinct cookies matches FNV-1a exactly at
        60 % and at 10 % + allowlist; the same cookie always lands on the same side; 100 %."""
        self.deploy("ro-pct", self.first.addr, "--host", "pct.rollout")
        self.proxy.cli_ok("rollout", "deploy", "ro-pct", "--target", self.second.addr)
        values = [f"{i:05d}" for i in range(1000)]
        client = self.proxy.client()

        for percentage, allow, low, high in ((60, (), 580, 620), (10, ("00001", "00002"), 80, 120)):
            args = ["rollout", "set", "ro-pct", "--percent", str(percentage)]
            if allow:
                args += ["--list", ",".join(allow)]
            self.proxy.cli_ok(*args)
            controller = self.state_service(self.proxy, "ro-pct")["rollout_controller"]
            self.assertEqual(controller["percentage"], percentage)
            self.assertEqual(controller["percentage_split_point"], split_point(percentage))
            self.assertEqual(controller["allowlist"] or [], list(allow))
            seen = {v: self.served_by(client, "pct.rollout", v) for v in values}
            wrong = [v for v in values if (seen[v] == "second") != in_group(v, percentage, allow)]
            self.assertEqual(wrong, [], f"{percentage}%: cookies on the wrong side")
            in_rollout = sum(1 for v in values if seen[v] == "second")
            self.assertTrue(low <= in_rollout <= high, f"{percentage}%: {in_rollout}/1000")
            for v in allow:
                self.assertEqual(seen[v], "second")
            for v in values[:40]:
                self.assertEqual(self.served_by(client, "pct.rollout", v), seen[v], "sticky")
            self.assertEqual(self.served_by(client, "pct.rollout", None), "first")

        self.proxy.cli_ok("rollout", "set", "ro-pct", "--percent", "100")
        for v in values[:30] + ["x"]:
            self.assertEqual(self.served_by(client, "pct.rollout", v), "second")
        self.assertEqual(self.served_by(client, "pct.rollout", None), "first")
        self.assertEqual(self.served_by(client, "pct.rollout", ""), "first")
        client.close()

    def test_rollout_errors_change_nothing(self):
        """Scenarios 42, 43, 127 and bad --percent values: clear errors, state untouched."""
        self.deploy("ro-err", self.first.addr, "--host", "err.rollout")
        with open(self.proxy.state_path, "rb") as f:
            before = f.read()
        cases = [
            (("rollout", "set", "ro-err", "--percent", "10"), "Error: rollout target not set"),
            (
                ("rollout", "deploy", "missing", "--target", self.second.addr),
                "Error: service not found",
            ),
            (("rollout", "set", "missing", "--percent", "1"), "Error: service not found"),
            (("rollout", "stop", "missing"), "Error: service not found"),
            (
                ("rollout", "set", "ro-err", "--percent", "abc"),
                'Error: invalid argument "abc" for "--percent" flag: '
                'strconv.ParseInt: parsing "abc": invalid syntax',
            ),
            (
                ("rollout", "set", "ro-err", "--percent", "12.5"),
                'Error: invalid argument "12.5" for "--percent" flag: '
                'strconv.ParseInt: parsing "12.5": invalid syntax',
            ),
            (
                ("rollout", "set", "ro-err"),
                "Error: at least one of the flags in the group [percent list] is required",
            ),
        ]
        for args, message in cases:
            self.assertEqual(self.cli_error(self.proxy, *args), message, args)
        with open(self.proxy.state_path, "rb") as f:
            self.assertEqual(f.read(), before)
        state = self.state_service(self.proxy, "ro-err")
        self.assertIsNone(state["rollout_controller"])
        self.assertIsNone(state["rollout_targets"])
        self.assertEqual(
            self.get("err.rollout", headers={"Cookie": "kamal-rollout=1"}).text, "first"
        )

    def test_redeploys_keep_or_replace_the_rollout(self):
        """Scenario 167: a failed `rollout deploy` keeps the previous rollout, a normal deploy
        keeps the rollout, a new `rollout deploy` replaces the rollout targets; rollout readers
        get the rollout group's reads."""
        third = shared_upstream("third")
        self.deploy("ro-keep", self.first.addr, "--host", "keep.rollout")
        self.proxy.cli_ok("rollout", "deploy", "ro-keep", "--target", self.second.addr)
        self.proxy.cli_ok("rollout", "set", "ro-keep", "--list", "vip")
        client = self.proxy.client()

        line = self.cli_error(
            self.proxy,
            "rollout",
            "deploy",
            "ro-keep",
            "--target",
            "127.0.0.1:9",
            "--deploy-timeout",
            "300ms",
        )
        self.assertEqual(
            line, "Error: target failed to become healthy within configured timeout (300ms)"
        )
        self.assertEqual(self.served_by(client, "keep.rollout", "vip"), "second")

        self.proxy.cli_ok("deploy", "ro-keep", "--target", third.addr, "--host", "keep.rollout")
        self.assertEqual(self.served_by(client, "keep.rollout", None), "third")
        self.assertEqual(self.served_by(client, "keep.rollout", "vip"), "second")

        reader = self.upstream("rollout-reader")
        self.proxy.cli_ok(
            "rollout",
            "deploy",
            "ro-keep",
            "--target",
            self.first.addr,
            "--read-target",
            reader.addr,
        )
        self.assertEqual(self.served_by(client, "keep.rollout", "vip"), "rollout-reader")
        resp = client.request(
            "POST", "/", host="keep.rollout", headers={"Cookie": "kamal-rollout=vip"}
        )
        self.assertEqual(resp.text, "first")
        self.assertEqual(self.served_by(client, "keep.rollout", "other"), "third")
        state = self.state_service(self.proxy, "ro-keep")
        self.assertEqual(
            (state["rollout_targets"], state["rollout_readers"]),
            ([self.first.addr], [reader.addr]),
        )
        client.close()
