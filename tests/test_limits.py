"""The proxy raises its soft open-files limit to the hard one at start-up, as Go's runtime does."""

from __future__ import annotations

import resource

from twisted.trial import unittest

from kamal_proxy.limits import raise_open_files_limit

NOFILE = resource.RLIMIT_NOFILE


class OpenFilesLimitTests(unittest.TestCase):
    def setUp(self):
        self.soft, self.hard = resource.getrlimit(NOFILE)
        self.addCleanup(resource.setrlimit, NOFILE, (self.soft, self.hard))
        if self.hard == resource.RLIM_INFINITY or self.hard <= 256:
            raise unittest.SkipTest(f"needs a finite hard limit above 256, not {self.hard}")

    def test_soft_limit_is_raised_to_the_hard_one(self):
        resource.setrlimit(NOFILE, (256, self.hard))
        self.assertEqual(raise_open_files_limit(), (256, self.hard))
        self.assertEqual(resource.getrlimit(NOFILE), (self.hard, self.hard))

    def test_nothing_to_do_at_the_hard_limit(self):
        resource.setrlimit(NOFILE, (self.hard, self.hard))
        self.assertEqual(raise_open_files_limit(), (self.hard, self.hard))
        self.assertEqual(resource.getrlimit(NOFILE), (self.hard, self.hard))
