"""twistd's pid file across upgrades: it names whichever process serves now.

twistd writes the pid file of the process it starts and removes it when that process exits.
After an upgrade the process that serves is another one, started without twistd's own pid file
handling (``--pidfile=``, see ``process/relaunch.py``): it writes its own pid into the same
file once it has taken over, and removes the file when it stops, unless it has handed over in
turn.  The process it replaced tells twistd to leave the file alone (``release``).

The file is replaced atomically (a temporary file renamed over it), so a reader sees the old
pid or the new one, never an empty file.  Whether that can be done is checked before the new
process reports that it serves (``prepare``): an upgrade that could not move the pid file fails
instead of leaving it naming a process that is gone.
"""

from __future__ import annotations

import os
from collections.abc import Callable


class PidFileError(Exception):
    """The pid file cannot be written; ``str()`` says why."""


class PidFile:
    """The pid file at ``path``; ``on_release`` keeps the file's original owner (twistd) from
    removing it when that process exits."""

    def __init__(self, path: str, on_release: Callable[[], None] | None = None) -> None:
        self.path = path
        self._on_release = on_release
        self._temp: str | None = None
        self.owned = False

    def prepare(self) -> None:
        """Write this process's pid into a temporary file beside the pid file (so that
        :meth:`claim` cannot fail for want of permission or space)."""
        directory = os.path.dirname(self.path) or "."
        temp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}")
        try:
            with open(temp, "w") as f:
                f.write(f"{os.getpid()}")
        except OSError as e:
            raise PidFileError(f"pid file {self.path}: {e.strerror or e}") from None
        self._temp = temp

    def claim(self) -> None:
        """Make the pid file name this process (after :meth:`prepare`)."""
        if self._temp is None:
            self.prepare()
        try:
            os.replace(self._temp, self.path)
        except OSError as e:
            raise PidFileError(f"pid file {self.path}: {e.strerror or e}") from None
        self._temp = None
        self.owned = True

    def discard(self) -> None:
        """Forget a prepared file that will not be claimed (the upgrade was called off)."""
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except OSError:
                pass
            self._temp = None

    def release(self) -> None:
        """The next process owns the file now: do not remove it at exit."""
        self.owned = False
        if self._on_release is not None:
            self._on_release()
            self._on_release = None

    def remove(self) -> None:
        """At exit: remove the file if it still names this process."""
        self.discard()
        if not self.owned:
            return
        self.owned = False
        try:
            with open(self.path) as f:
                if f.read().strip() != str(os.getpid()):
                    return
            os.unlink(self.path)
        except OSError:
            pass
