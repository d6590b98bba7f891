"""Typed signatures of the kernel notifications (see _notify.pyx)."""
from typing import Any

class SessionKernel:
    """The kernel of one FUSE session, reached through its /dev/fuse fd
    (a :class:`shimfs.kernel.Kernel`); call from worker threads only."""

    fd: int
    live: bool

    def __init__(self, fd: int) -> None: ...
    def inval_range(self, ino: int, off: int, length: int) -> None:
        """NOTIFY_INVAL_INODE: write back and drop the kernel's pages of the range
        (length 0: to the end); off < 0: attributes only."""
    def store(self, ino: int, off: int, data: Any) -> None:
        """NOTIFY_STORE of a buffer, in 1 MiB messages."""
    def push(self, engine: Any, fid: int, ino: int, off: int, length: int) -> int:
        """NOTIFY_STORE of the engine's cached prefix of the range (page-aligned off,
        at most 4 MiB); returns its bytes, 0 if none or the inode is forgotten."""
