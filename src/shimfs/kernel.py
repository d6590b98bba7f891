"""What the VFS may ask of the kernel's page cache, as an interface.

The VFS core never talks to ``/dev/fuse`` itself: the adapter that mounts it
supplies an object with these methods (:class:`shimfs._notify.SessionKernel`
for a real mount), and in-process use gets :class:`NullKernel`, a kernel that
caches nothing.  So ``import shimfs.vfs`` needs no FUSE binding.

Every method but ``live`` blocks until the kernel is done, and
``inval_range`` makes the kernel call back into the daemon (it writes dirty
pages back with synchronous WRITEs): call them from worker threads only.
"""
from __future__ import annotations

from typing import Any, Protocol


class Kernel(Protocol):
    #: True if notifications reach a kernel (pushing makes sense).
    live: bool

    def inval_range(self, ino: int, off: int, length: int) -> None:
        """Write back and drop the kernel's pages of [off, off+length) of
        inode ``ino`` (length 0: to the end); off < 0: attributes only."""

    def store(self, ino: int, off: int, data: Any) -> None:
        """Copy ``data`` into the kernel's cache of ``ino`` at ``off``."""

    def push(self, engine: Any, fid: int, ino: int, off: int, length: int) -> int:
        """Copy the engine's cached prefix of [off, off+length) of file
        ``fid`` into the kernel's cache of ``ino``; return its bytes."""


class NullKernel:
    """No kernel: nothing is cached outside the daemon, so nothing to do."""

    live = False

    def inval_range(self, ino: int, off: int, length: int) -> None:
        pass

    def store(self, ino: int, off: int, data: Any) -> None:
        pass

    def push(self, engine: Any, fid: int, ino: int, off: int, length: int) -> int:
        return 0
