"""At the open-files limit new clients get 503, upstreams keep their descriptors (issue 12 §5)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from kamal_proxy.proxy import channel as channel_module
from kamal_proxy.proxy.channel import make_site
from kamal_proxy.proxy.descriptors import RETRY_SECONDS, DescriptorBudget, socket_number
from tests.test_channel import GET, Handler, parse_responses


class SocketTransport(StringTransport):
    """A transport whose socket is descriptor ``number``."""

    def __init__(self, number: int) -> None:
        super().__init__(
            peerAddress=IPv4Address("TCP", "192.0.2.1", 1234),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
        )
        self.number = number

    def fileno(self) -> int:
        return self.number


class BudgetTests(unittest.TestCase):
    def budget(self, limit: int, in_use: list[int]) -> DescriptorBudget:
        return DescriptorBudget(limit=limit, reserve=16, count_open=lambda: in_use[0])

    def test_every_client_keeps_room_for_its_upstream_and_the_reserve(self) -> None:
        in_use = [41]
        budget = self.budget(64, in_use)
        # 41 in use, this client's upstream (1) and the reserve: 41 + 1 + 16 <= 64.
        self.assertTrue(budget.admit(40))
        # A second client: 47 in use + 2 upstreams + 16 > 64.
        in_use[0] = 47
        self.assertFalse(budget.admit(46))
        self.assertEqual(budget.clients, 2)
        budget.release()
        budget.release()
        self.assertEqual(budget.clients, 0)
        self.assertTrue(budget.admit(46))

    def test_a_low_number_below_many_open_descriptors_is_counted(self) -> None:
        # Descriptor 12 was free (a hole), but 50 are open with 10 clients: 50 + 10 + 16 > 64.
        budget = self.budget(64, [50])
        budget.clients = 9
        self.assertFalse(budget.admit(12))

    def test_far_from_the_limit_nothing_is_counted(self) -> None:
        def count() -> int:
            raise AssertionError("counted far from the limit")

        budget = DescriptorBudget(limit=4096, reserve=64, count_open=count)
        self.assertTrue(all(budget.admit(20 + n) for n in range(100)))

    def test_counts_this_process(self) -> None:
        self.assertGreater(DescriptorBudget().count_open(), 2)

    def test_no_limit_or_no_socket_admits(self) -> None:
        self.assertTrue(DescriptorBudget(limit=-1).admit(10**6))
        self.assertTrue(DescriptorBudget(limit=64).admit(-1))

    def test_reserve_grows_with_the_limit(self) -> None:
        self.assertEqual(DescriptorBudget(limit=256).reserve, 16)
        self.assertEqual(DescriptorBudget(limit=65536).reserve, 1024)

    def test_socket_number_through_a_wrapper(self) -> None:
        class Wrapper:
            transport = SocketTransport(7)

        self.assertEqual(socket_number(SocketTransport(9)), 9)
        self.assertEqual(socket_number(Wrapper()), 7)
        self.assertEqual(socket_number(StringTransport()), -1)


class ChannelTests(unittest.TestCase):
    def setUp(self) -> None:
        # In use: the socket's number + 1 (no holes below it).
        self.budget = DescriptorBudget(limit=64, reserve=16, count_open=lambda: self.last + 1)
        self.last = -1
        self.patch(channel_module, "budget", self.budget)
        self.handler = Handler()
        self.site = make_site(self.handler, Clock())

    def connect(self, number: int) -> tuple[Any, SocketTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        transport = SocketTransport(number)
        self.last = max(self.last, number)
        proto.makeConnection(transport)
        return proto, transport

    def test_under_the_limit_requests_are_served(self) -> None:
        proto, transport = self.connect(10)
        proto.dataReceived(GET)
        self.assertEqual(len(self.handler.requests), 1)
        self.assertEqual(parse_responses(transport.value())[0][0], 200)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.budget.clients, 0)

    def test_at_the_limit_the_request_gets_503_and_the_connection_closes(self) -> None:
        proto, transport = self.connect(50)
        proto.dataReceived(GET)
        self.assertEqual(self.handler.requests, [])
        (status, headers, body), *more = parse_responses(transport.value())
        self.assertEqual((status, more), (503, []))
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(body, b"503 Service Unavailable")
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.budget.clients, 0)

    def test_room_comes_back_when_clients_leave(self) -> None:
        first, _ = self.connect(30)
        second, _ = self.connect(31)
        third, transport = self.connect(46)  # 46 + 3 + 16 > 64
        third.dataReceived(GET)
        self.assertEqual(parse_responses(transport.value())[0][0], 503)
        for proto in (first, second, third):
            proto.connectionLost(Failure(ConnectionDone()))
        fourth, transport = self.connect(46)  # 46 + 1 + 16 < 64
        fourth.dataReceived(GET)
        self.assertEqual(parse_responses(transport.value())[0][0], 200)
        self.assertEqual(len(self.handler.requests), 1)


class FakePort:
    """A listening port: whether it accepts, and its accept batch."""

    def __init__(self, batch: int = 4) -> None:
        self.reading = True
        self.connected = True
        self.numberAccepts = batch

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class HoldTests(unittest.TestCase):
    """A listener stops accepting while clients would take the upstreams' descriptors."""

    def setUp(self) -> None:
        self.in_use = [60]
        self.budget = DescriptorBudget(limit=64, reserve=16, count_open=lambda: self.in_use[0])
        self.clock = Clock()
        self.port = FakePort()

    def test_held_until_clients_leave(self) -> None:
        self.assertFalse(self.budget.admit(59))
        self.budget.hold(self.port, self.clock.callLater)
        self.assertFalse(self.port.reading)
        self.in_use[0] = 20
        self.budget.release()
        self.assertTrue(self.port.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_held_until_descriptors_come_back_without_clients(self) -> None:
        self.budget.hold(self.port, self.clock.callLater)
        self.clock.advance(RETRY_SECONDS)
        self.assertFalse(self.port.reading)  # still 60 in use
        self.in_use[0] = 30
        self.clock.advance(RETRY_SECONDS)
        self.assertTrue(self.port.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_closed_port_is_not_resumed(self) -> None:
        self.budget.hold(self.port, self.clock.callLater)
        self.port.connected = False
        self.in_use[0] = 10
        self.clock.advance(RETRY_SECONDS)
        self.assertFalse(self.port.reading)

    def test_crowded_counts_the_next_accept_batch(self) -> None:
        self.in_use[0] = 40
        # 40 in use, a batch of 8 and the reserve: 40 + 8 + 16 > 64; a batch of 4 fits.
        self.assertTrue(self.budget.crowded(39, 8))
        self.assertFalse(self.budget.crowded(39, 4))

    def test_the_channel_holds_its_listener_when_it_starves(self) -> None:
        self.patch(channel_module, "budget", self.budget)
        site = make_site(Handler(), self.clock)
        proto = site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        transport = SocketTransport(59)
        transport.server = self.port
        proto.makeConnection(transport)
        self.assertFalse(self.port.reading)
        proto.dataReceived(GET)
        self.assertEqual(parse_responses(transport.value())[0][0], 503)
        self.in_use[0] = 20
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.port.reading)
