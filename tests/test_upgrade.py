"""The parts of an upgrade (issue 10) one by one: listening sockets by role, the Unix port that
keeps its file, the relaunch command, the pid file, systemd notifications, the hand-over
environment, the old process's steps (with a clock and a fake new process), the control
socket's quiesce and the drain's end.  Real sockets on loopback; no server process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, error, reactor, task
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from kamal_proxy import app
from kamal_proxy.process import handover, notify, relaunch, upgrade
from kamal_proxy.process.listening import BindError, ListeningSockets, adopt_unix_port, bind_tcp
from kamal_proxy.process.pidfile import PidFile, PidFileError


class TempDir(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kp-upgrade-")
        self.addCleanup(shutil.rmtree, self.dir, True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


def _accepts(address, family=socket.AF_INET) -> bool:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)
        return True
    except OSError:
        return False
    finally:
        s.close()


class ListeningSocketsTests(TempDir):
    def test_a_role_is_bound_once_and_handed_over_by_descriptor(self):
        sockets = ListeningSockets()
        self.addCleanup(sockets.close_all)
        first = sockets.tcp("http", 0)
        self.assertIs(sockets.tcp("http", 0), first)
        port = first.getsockname()[1]
        self.assertTrue(_accepts(("127.0.0.1", port)))

        # What the next process gets: a descriptor per role (here, duplicates of ours).
        fds = {role: os.dup(fd) for role, fd in sockets.fds().items()}
        inherited = ListeningSockets.inherit(fds)
        self.addCleanup(inherited.close_all)
        self.assertTrue(inherited.inherited("http"))
        again = inherited.tcp("http", port)
        self.assertEqual(again.getsockname()[1], port)
        self.assertFalse(inherited.inherited("http"))
        # The old process closes its copy: the port stays open in the new one.
        sockets.close("http")
        self.assertTrue(_accepts(("127.0.0.1", port)))

    def test_an_inherited_socket_that_does_not_fit_is_replaced(self):
        sockets = ListeningSockets()
        self.addCleanup(sockets.close_all)
        old = sockets.tcp("http", 0)
        inherited = ListeningSockets.inherit({"http": os.dup(old.fileno())})
        self.addCleanup(inherited.close_all)
        wanted = _free_port()
        new = inherited.tcp("http", wanted)
        self.assertEqual(new.getsockname()[1], wanted)

    def test_unclaimed_sockets_are_closed(self):
        sockets = ListeningSockets()
        extra = sockets.udp("udp.1", 0, reuse_port=True)
        inherited = ListeningSockets.inherit({"udp.1": os.dup(extra.fileno())})
        sockets.close_all()
        inherited.close_unclaimed()
        self.assertFalse(inherited.inherited("udp.1"))
        self.assertEqual(inherited.fds(), {})

    def test_ports_bound_early_queue_connections_and_are_used_later(self):
        taken = bind_tcp(0)
        self.addCleanup(taken.close)
        busy = taken.getsockname()[1]
        free = _free_port()
        early = ListeningSockets.bound_early({"http": free, "https": busy, "unused": _free_port()})
        self.addCleanup(early.close_all)
        # A connection made before the server runs waits in the backlog.
        self.assertTrue(_accepts(("127.0.0.1", free)))
        self.assertTrue(early.inherited("http"))
        self.assertFalse(early.inherited("https"))  # left to the usual bind and its error
        sock = early.tcp("http", free)
        self.assertEqual(sock.getsockname()[1], free)
        self.assertFalse(early.inherited("http"))
        with self.assertRaises(BindError):
            early.tcp("https", busy)
        early.close_unclaimed()
        self.assertFalse(early.inherited("unused"))

    def test_bind_errors_say_why_as_go_does(self):
        taken = bind_tcp(0)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        with self.assertRaises(BindError) as caught:
            ListeningSockets().tcp("http", port)
        self.assertEqual(caught.exception.reason, "address already in use")
        self.assertEqual(caught.exception.errno, errno.EADDRINUSE)

    def test_the_control_socket_is_private_and_inherited_only_while_its_file_exists(self):
        path = os.path.join(self.dir, "control.sock")
        sockets = ListeningSockets()
        self.addCleanup(sockets.close_all)
        sock = sockets.unix("control", path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        handed = os.dup(sock.fileno())
        inherited = ListeningSockets.inherit({"control": handed})
        self.addCleanup(inherited.close_all)
        self.assertEqual(inherited.unix("control", path).fileno(), handed)
        # A file removed meanwhile: clients could not reach that socket any more.
        other = ListeningSockets.inherit({"control": os.dup(sock.fileno())})
        self.addCleanup(other.close_all)
        os.unlink(path)
        fresh = other.unix("control", path)
        self.assertTrue(os.path.exists(path))
        self.assertNotEqual(fresh.fileno(), sock.fileno())


class PortsTests(TempDir):
    """Serving a registry socket and stopping leaves it to whoever else holds it."""

    def test_a_stopped_unix_port_keeps_its_file_its_mode_and_the_socket(self):
        path = os.path.join(self.dir, "control.sock")
        sockets = ListeningSockets()
        self.addCleanup(sockets.close_all)
        sock = sockets.unix("control", path)
        port = adopt_unix_port(reactor, sock, Factory.forProtocol(Protocol))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

        def stopped(_: object) -> None:
            # Twisted's own Unix port would remove the file and shut the socket down.
            self.assertTrue(os.path.exists(path))
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            self.assertTrue(_accepts(path, socket.AF_UNIX))

        return defer.maybeDeferred(port.stopListening).addCallback(stopped)

    def test_a_stopped_listener_leaves_the_tcp_socket_listening_for_the_others(self):
        sockets = ListeningSockets()
        listener = app.Listener(reactor, 0, Factory.forProtocol(Protocol), sockets, "http")
        listener.privilegedStartService()
        listener.startService()
        port = listener.bound_port
        kept = os.dup(sockets.fds()["http"])  # another process's copy
        self.addCleanup(os.close, kept)

        def stopped(_: object) -> None:
            self.assertEqual(sockets.fds(), {})
            self.assertTrue(_accepts(("127.0.0.1", port)))

        return defer.maybeDeferred(listener.stopService).addCallback(stopped)


class RelaunchTests(unittest.TestCase):
    def test_run_is_started_again_with_its_own_command_line(self):
        command = relaunch.run_relaunch(["python3", "-X", "dev", "/v/bin/kamal-proxy", "run"])
        self.assertEqual(command.argv, [sys.executable, "-X", "dev", "/v/bin/kamal-proxy", "run"])
        self.assertEqual(command.executable, sys.executable)
        self.assertIsNone(command.pidfile)

    def twistd(self, config: dict[str, Any], orig=None, argv=None) -> relaunch.Relaunch:
        orig = orig or ["python3", "/v/bin/twistd", "-n", "kamal-proxy"]
        argv = argv or ["/v/bin/twistd", "-n", "kamal-proxy"]
        return relaunch.twistd_relaunch(
            config, ["--http-port=80"], "/srv", orig_argv=orig, argv=argv, release=None
        )

    def test_twistd_is_started_again_in_the_foreground_without_its_pid_file(self):
        def observer(event):
            pass

        command = self.twistd(
            {"nodaemon": True, "pidfile": "/run/kp.pid", "logger": observer, "uid": 1001}
        )
        self.assertEqual(
            command.argv,
            [
                sys.executable,
                "/v/bin/twistd",
                "--nodaemon",
                "--pidfile=",
                f"--logger={__name__}.{observer.__qualname__}",
                "kamal-proxy",
                "--http-port=80",
            ],
        )
        self.assertEqual(command.pidfile.path, "/run/kp.pid")

    def test_a_daemon_keeps_logging_to_its_file(self):
        command = self.twistd({"nodaemon": False, "pidfile": "twistd.pid"})
        self.assertIn("--logfile=/srv/twistd.log", command.argv)
        command = self.twistd({"nodaemon": False, "logfile": "logs/kp.log"})
        self.assertIn("--logfile=/srv/logs/kp.log", command.argv)
        self.assertIsNone(command.pidfile)
        command = self.twistd({"nodaemon": False, "syslog": True, "prefix": "kp"})
        self.assertEqual(command.argv[4:6], ["--syslog", "--prefix=kp"])

    def test_twistd_as_a_module(self):
        command = self.twistd(
            {"nodaemon": True},
            orig=["python3", "-m", "twisted.scripts.twistd", "-n", "kamal-proxy"],
            argv=["/lib/twisted/scripts/twistd.py", "-n", "kamal-proxy"],
        )
        self.assertEqual(command.argv[:3], [sys.executable, "-m", "twisted.scripts.twistd"])

    def test_the_plugin_gives_every_option_explicitly(self):
        from twisted.plugins.kamal_proxy_plugin import Options

        options = Options()
        options.parseOptions(["--http-port", "8080", "--http3", "--workers", "2"])
        args = options.as_args()
        self.assertIn("--http-port=8080", args)
        self.assertIn("--workers=2", args)
        self.assertIn("--http3", args)
        self.assertNotIn("--debug", args)
        reparsed = Options()
        reparsed.parseOptions(args)
        self.assertEqual(reparsed.run_options(), options.run_options())


class PidFileTests(TempDir):
    def test_the_pid_file_moves_atomically_and_is_removed_only_by_its_process(self):
        path = os.path.join(self.dir, "twistd.pid")
        with open(path, "w") as f:
            f.write("1")
        released = []
        pidfile = PidFile(path, on_release=lambda: released.append(True))
        pidfile.prepare()
        with open(path) as f:
            self.assertEqual(f.read(), "1")
        pidfile.claim()
        with open(path) as f:
            self.assertEqual(f.read(), str(os.getpid()))
        self.assertEqual(os.listdir(self.dir), ["twistd.pid"])
        pidfile.release()
        self.assertEqual(released, [True])
        pidfile.remove()
        self.assertTrue(os.path.exists(path))

        mine = PidFile(path)
        mine.claim()
        mine.remove()
        self.assertFalse(os.path.exists(path))

    def test_another_process_s_pid_is_left_alone(self):
        path = os.path.join(self.dir, "twistd.pid")
        pidfile = PidFile(path)
        pidfile.claim()
        with open(path, "w") as f:
            f.write("12345")
        pidfile.remove()
        self.assertTrue(os.path.exists(path))

    def test_an_unwritable_place_is_found_out_before_the_upgrade_commits(self):
        pidfile = PidFile(os.path.join(self.dir, "missing", "twistd.pid"))
        with self.assertRaises(PidFileError) as caught:
            pidfile.prepare()
        self.assertIn("No such file or directory", str(caught.exception))
        pidfile.discard()


class NotifyTests(TempDir):
    def listen(self, abstract: bool = False) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = f"kp-notify-{os.getpid()}-{id(sock)}"
            sock.bind("\0" + name)
            return sock, "@" + name
        path = os.path.join(self.dir, "notify")
        sock.bind(path)
        return sock, path

    def test_messages_reach_the_socket_systemd_gives(self):
        for abstract in (False, True):
            sock, address = self.listen(abstract)
            self.assertTrue(notify.notify("READY=1", {"NOTIFY_SOCKET": address}))
            self.assertEqual(sock.recv(100), b"READY=1")

    def test_nothing_happens_outside_systemd(self):
        self.assertFalse(notify.notify("READY=1", {}))
        missing = os.path.join(self.dir, "nobody")
        self.assertFalse(notify.notify("READY=1", {"NOTIFY_SOCKET": missing}))

    def test_workers_do_not_get_the_socket(self):
        env = notify.without_notify({"NOTIFY_SOCKET": "/run/x", "HOME": "/h"})
        self.assertEqual(env, {"HOME": "/h"})


class HandoverEnvironmentTests(unittest.TestCase):
    def test_the_variable_round_trips_and_is_taken_out_of_the_environment(self):
        info = handover.HandoverInfo(sockets={"http": 5, "control": 6}, pidfile="/p", parent=42)
        environ = handover.handover_environment({"HOME": "/h"}, info)
        self.assertEqual(json.loads(environ[handover.ENV])["sockets"], {"http": 5, "control": 6})
        # Descriptors 5 and 6 are not sockets here: inherit() skips them.
        successor = handover.Successor.from_environ(reactor, environ)
        self.addCleanup(successor.sockets.close_all)
        self.assertNotIn(handover.ENV, environ)
        self.assertEqual(successor.info, info)
        self.assertEqual(successor.pidfile.path, "/p")
        self.assertIsNone(handover.Successor.from_environ(reactor, environ))


# -- the old process's steps --------------------------------------------------------------------


class FakeControl:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def release(self) -> None:
        self.calls.append("release")

    def quiesce(self, exclude: Any, timeout: float) -> defer.Deferred:
        self.calls.append("quiesce")
        return defer.succeed(None)


class FakeProcess:
    def __init__(self) -> None:
        self.pid = 4321
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:  # noqa: N802 - Twisted's name
        self.signals.append(name)


class SpawnlessUpgrader(upgrade.Upgrader):
    """The real steps, with a new process that is a fake (its fate set by the test)."""

    def _spawn(self) -> upgrade.NewProcess:
        new = upgrade.NewProcess(self.reactor)
        new.passthrough = None  # its output would go to our stderr
        new.process = FakeProcess()
        new.pid = new.process.pid
        self.spawned = new
        return new


class UpgraderTests(TempDir):
    def setUp(self) -> None:
        super().setUp()
        self.clock = task.Clock()
        self.control = FakeControl()
        self.stopped: list[float] = []
        self.state = os.path.join(self.dir, "kamal-proxy.state")
        self.router = SimpleNamespace(state_path=self.state, snapshot=lambda: [])
        self.acme = SimpleNamespace(issuing=lambda: False)
        self.released: list[bool] = []
        pidfile = PidFile(os.path.join(self.dir, "p.pid"), lambda: self.released.append(True))
        self.upgrader = SpawnlessUpgrader(
            self.clock,
            control=self.control,
            router=self.router,
            acme=self.acme,
            sockets=ListeningSockets(),
            relaunch=relaunch.Relaunch(["kamal-proxy", "run"], pidfile=pidfile),
            stop=self.stopped.append,
        )

    def test_commit(self):
        sock, address = NotifyTests.listen(self)
        self.patch(os, "environ", {**os.environ, "NOTIFY_SOCKET": address})
        d = self.upgrader.upgrade(drain_timeout=5_000_000_000)
        new = self.upgrader.spawned
        self.assertEqual(self.control.calls, ["pause", "quiesce"])
        self.assertTrue(os.path.exists(self.state))  # written before the spawn
        answer = new._serving(4321)
        self.assertEqual(self.successResultOf(d), 4321)
        self.assertEqual(self.successResultOf(answer), {})
        self.assertEqual(self.control.calls, ["pause", "quiesce", "release"])
        self.assertIsNone(self.router.state_path)
        self.assertEqual(self.released, [True])
        self.assertEqual(sock.recv(100), b"MAINPID=4321")
        self.assertEqual(self.stopped, [])
        self.clock.advance(0)  # after the answer is written
        self.assertEqual(self.stopped, [5.0])
        self.failureResultOf(self.upgrader.upgrade(), upgrade.UpgradeError)

    def test_a_new_process_that_exits_calls_it_off(self):
        d = self.upgrader.upgrade()
        new = self.upgrader.spawned
        new.childDataReceived(2, b"Traceback...\nError: listen tcp :80: bind: permission denied\n")
        new.processEnded(Failure(error.ProcessTerminated(exitCode=1)))
        failure = self.failureResultOf(d, upgrade.UpgradeError)
        self.assertEqual(
            str(failure.value),
            "new process exited with status 1 before serving: "
            "listen tcp :80: bind: permission denied",
        )
        self.assertEqual(self.control.calls, ["pause", "quiesce", "resume"])
        self.assertEqual(self.upgrader.state, "idle")
        self.assertEqual(self.router.state_path, self.state)
        self.assertEqual(self.stopped, [])

    def test_a_new_process_that_does_not_serve_in_time_is_stopped(self):
        d = self.upgrader.upgrade()
        new = self.upgrader.spawned
        self.clock.advance(upgrade.START_TIMEOUT)
        self.assertEqual(new.process.signals, ["TERM"])
        self.assertNoResult(d)
        self.clock.advance(upgrade.STOP_TIMEOUT)
        self.assertEqual(new.process.signals, ["TERM", "KILL"])
        new.processEnded(Failure(error.ProcessTerminated(signal=signal.SIGKILL)))
        failure = self.failureResultOf(d, upgrade.UpgradeError)
        self.assertEqual(str(failure.value), "new process did not serve within 30s")
        # It says it serves after all: it is told the upgrade was called off.
        self.failureResultOf(new._serving(4321), handover.HandoverRefused)
        self.assertEqual(self.control.calls[-1], "resume")

    def test_one_at_a_time_and_never_as_a_container_s_init(self):
        self.upgrader.upgrade()
        failure = self.failureResultOf(self.upgrader.upgrade(), upgrade.UpgradeError)
        self.assertEqual(str(failure.value), "an upgrade is already in progress")
        other = SpawnlessUpgrader(
            self.clock,
            control=FakeControl(),
            router=self.router,
            acme=None,
            sockets=ListeningSockets(),
            relaunch=relaunch.Relaunch(["x"]),
            stop=self.stopped.append,
        )
        self.patch(os, "getpid", lambda: 1)
        failure = self.failureResultOf(other.upgrade(), upgrade.UpgradeError)
        self.assertIn("PID 1", str(failure.value))

    def test_certificates_being_issued_are_waited_for(self):
        issuing = [True]
        self.acme.issuing = lambda: issuing[0]
        self.upgrader.upgrade()
        self.assertFalse(hasattr(self.upgrader, "spawned"))
        self.clock.advance(1)
        issuing[0] = False
        self.clock.advance(0.1)
        self.assertTrue(hasattr(self.upgrader, "spawned"))

    def test_a_state_that_cannot_be_written_calls_it_off(self):
        self.router.state_path = os.path.join(self.dir, "missing", "kamal-proxy.state")
        failure = self.failureResultOf(self.upgrader.upgrade(), upgrade.UpgradeError)
        self.assertIn("unable to save state", str(failure.value))
        self.assertFalse(hasattr(self.upgrader, "spawned"))
        self.assertEqual(self.control.calls, ["pause", "quiesce", "resume"])

    def test_reasons(self):
        new = upgrade.NewProcess(self.clock)
        new.passthrough = None
        new.exit = error.ProcessTerminated(exitCode=3)
        self.assertEqual(
            new.failure_reason(),
            "new process exited with status 3 before serving (its output is in the server's log)",
        )
        new.exit = error.ProcessTerminated(signal=signal.SIGSEGV)
        new.childDataReceived(2, b"\n  boom  \n\n")
        self.assertEqual(
            new.failure_reason(),
            "new process was killed by signal 11 (SIGSEGV) before serving: boom",
        )


# -- the control socket and the drain ------------------------------------------------------------


class FakeConnection:
    def __init__(self, opened_at: float, pending: int = 0, answered: int = 0) -> None:
        self.opened_at = opened_at
        self.pending = pending
        self.answered = answered
        self.transport = SimpleNamespace(loseConnection=self.lose)
        self.lost = False

    def lose(self) -> None:
        self.lost = True


class QuiesceTests(unittest.TestCase):
    def test_commands_in_progress_are_waited_for_and_finished_connections_closed(self):
        clock = task.Clock()
        control = app.ControlSocket(clock, "/nowhere", None)
        requester = FakeConnection(0, pending=1)
        busy = FakeConnection(0, pending=1)
        done = FakeConnection(0, answered=1)
        fresh = FakeConnection(0)
        control.connections = {requester, busy, done, fresh}
        d = defer.ensureDeferred(control.quiesce(requester, 10))
        self.assertTrue(done.lost)
        self.assertFalse(fresh.lost)
        self.assertNoResult(d)
        busy.pending, busy.answered = 0, 1
        clock.advance(0.05)
        self.assertTrue(busy.lost)
        self.assertNoResult(d)  # ``fresh``'s command may be on its way
        clock.advance(app.IDLE_CONTROL_GRACE)
        self.assertTrue(fresh.lost)
        self.successResultOf(d)
        self.assertFalse(requester.lost)

    def test_a_command_that_never_ends_fails_the_upgrade(self):
        clock = task.Clock()
        control = app.ControlSocket(clock, "/nowhere", None)
        control.connections = {FakeConnection(0, pending=1)}
        d = defer.ensureDeferred(control.quiesce(None, 2))
        clock.pump([0.05] * 41)
        failure = self.failureResultOf(d, upgrade.UpgradeError)
        self.assertEqual(str(failure.value), "commands still in progress after 2s")


class FakeTransport:
    def __init__(self, port: Any, tls: bool = False) -> None:
        self.server = port
        self.connected = 1
        self.calls: list[str] = []
        self.protocol: Any = TLSProtocol(self) if tls else Protocol()

    def loseWriteConnection(self) -> None:  # noqa: N802 - Twisted's name
        self.calls.append("half-close")

    def abortConnection(self) -> None:  # noqa: N802
        self.calls.append("abort")
        self.connected = 0


@implementer(ISSLTransport)
class TLSProtocol(Protocol):
    def __init__(self, transport: FakeTransport) -> None:
        self.raw = transport

    def loseConnection(self) -> None:  # noqa: N802
        self.raw.calls.append("close_notify")
        self.raw.connected = 0


class FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []

    def getReaders(self) -> list[Any]:  # noqa: N802
        return [r for r in self.readers if r.connected]

    def getWriters(self) -> list[Any]:  # noqa: N802
        return []


class Tracker:
    def wait_idle(self) -> defer.Deferred:
        return defer.succeed(None)

    def abort_all(self) -> None:
        raise AssertionError("nothing was in flight")


class DrainTests(unittest.TestCase):
    def test_after_an_upgrade_tunnels_run_until_the_bound_then_close_cleanly(self):
        clock = FakeReactor()
        port, other_port = object(), object()
        plain = FakeTransport(port)
        secure = FakeTransport(port, tls=True)
        stubborn = FakeTransport(port)
        elsewhere = FakeTransport(other_port)
        clock.readers = [plain, secure, stubborn, elsewhere]
        site = SimpleNamespace(close_idle=lambda: None)
        shutdown = app.GracefulShutdown(clock, Tracker(), [site], ports=lambda: [port])
        d = defer.ensureDeferred(shutdown.drain(handover_drain=5.0))
        clock.pump([0.05] * 99)  # 4.95 s: still running
        self.assertNoResult(d)
        self.assertEqual(plain.calls + secure.calls, [])
        clock.pump([0.1] * 2)
        self.assertEqual(plain.calls, ["half-close"])
        self.assertEqual(secure.calls, ["close_notify"])
        plain.connected = 0  # the client closed its side
        clock.pump([0.05] * int(app.CLOSE_GRACE / 0.05 + 2))
        self.assertEqual(stubborn.calls, ["half-close", "abort"])
        self.assertEqual(elsewhere.calls, [])
        clock.advance(app.FLUSH_GRACE)
        self.successResultOf(d)

    def test_a_plain_stop_of_an_idle_server_does_not_wait(self):
        clock = FakeReactor()
        site = SimpleNamespace(close_idle=lambda: None)
        shutdown = app.GracefulShutdown(clock, Tracker(), [site], ports=lambda: [object()])
        self.successResultOf(defer.ensureDeferred(shutdown.drain()))
