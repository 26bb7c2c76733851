"""The test suite: ``python -m twisted.trial tests`` (``make test``).

Hypothesis runs its examples without the per-example deadline (200 ms by default): the suite
runs beside others on shared CPUs, where one example can take far longer for no reason of the
code's, and Hypothesis then reports the test as failed or flaky.  Tests that set their own
``@settings`` already said ``deadline=None``.
"""

from hypothesis import settings

settings.register_profile("suite", deadline=None)
settings.load_profile("suite")
