import re
import uuid

from twisted.trial import unittest

from kamal_proxy.proxy.request_id import new_request_id

UUID4 = re.compile(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class RequestIdTests(unittest.TestCase):
    def test_canonical_uuid4_and_distinct(self):
        ids = [new_request_id() for _ in range(1000)]
        self.assertEqual(len(set(ids)), 1000)
        for rid in ids:
            self.assertRegex(rid, UUID4)
            self.assertEqual(uuid.UUID(rid.decode()).version, 4)
