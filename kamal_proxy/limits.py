"""Process limits the proxy raises for itself at start-up.

A proxy holds two descriptors per proxied request (client and upstream) plus the idle pool, so
the usual soft limit of 1024 open files is reached long before the machine's.  Go's runtime
raises the soft ``RLIMIT_NOFILE`` to the hard limit when a program starts, so the Go original
never sees the soft one; this does the same.
"""

from __future__ import annotations


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; return (soft before, soft now).

    Best effort: where there are no such limits, or the hard limit cannot be taken (an
    unlimited hard limit is more than the kernel allows for files), the soft one stays.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return (soft, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return (soft, soft)
    return (soft, hard)
