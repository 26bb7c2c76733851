"""kamal-proxy for Python: a Twisted HTTP proxy for zero-downtime deployments.

The version follows the Go kamal-proxy release whose command line this one implements, because
Kamal reads it from the image tag and refuses a proxy older than it needs (compared as a
RubyGems version: a letter makes a pre-release, so a Python-only fix adds a fourth number,
``0.9.2.1``, never ``0.9.2.post1``).
"""

__version__ = "0.9.2"
