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
from kamal_proxy.proxy.descriptors import DescriptorBudget, socket_number
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
    def test_every_client_keeps_room_for_its_upstream_and_the_reserve(self) -> None:
        budget = DescriptorBudget(limit=64, reserve=16)
        # Descriptor 40 in use, this client (1) and its upstream: 40 + 1 + 16 < 64.
        self.assertTrue(budget.admit(40))
        # A second client at 46: 46 + 2 + 16 = 64, no room left for both upstreams.
        self.assertFalse(budget.admit(46))
        self.assertEqual(budget.clients, 2)
        budget.release()
        budget.release()
        self.assertEqual(budget.clients, 0)
        self.assertTrue(budget.admit(46))

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
        self.budget = DescriptorBudget(limit=64, reserve=16)
        self.patch(channel_module, "budget", self.budget)
        self.handler = Handler()
        self.site = make_site(self.handler, Clock())

    def connect(self, number: int) -> tuple[Any, SocketTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        transport = SocketTransport(number)
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
