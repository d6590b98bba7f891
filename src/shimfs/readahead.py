"""Read-ahead policy: pure code that decides what to prefetch after each read.

One :class:`Stream` per open file handle.  A read that starts where the last
one ended (give or take ``SLACK``) is sequential: the window doubles from
``MIN_WINDOW`` up to ``max_window``, and the policy asks for the part of
``[end, end + window)`` not requested yet.  Any other read is random: the
window drops to zero and nothing is prefetched, so random page touches cost
the backing file only the pages the kernel asks for.

Why these numbers:

* ``MIN_WINDOW`` = 1 MiB: one FUSE request carries at most 1 MiB (max_pages
  256), so a smaller first prefetch would not run ahead of the kernel at all.
* ``SLACK`` = 256 KiB: the kernel's async read-ahead and mmap read-around
  issue requests a little out of order; jumps this small do not reset a
  stream.
* Prefetches are cut into ``CHUNK`` = 1 MiB pieces so that several backing
  reads are in flight at once (the stand-in serves 2 streams at ~1.6x one).
"""
from __future__ import annotations

MIN_WINDOW = 1 << 20
SLACK = 256 << 10
CHUNK = 1 << 20


class Stream:
    """Sequential-stream detector of one open file."""

    __slots__ = ("max_window", "next_off", "window", "issued_until")

    def __init__(self, max_window: int):
        self.max_window = max_window
        self.next_off = -1
        self.window = 0
        self.issued_until = 0

    def on_read(self, off: int, size: int) -> tuple[int, int] | None:
        """Record a read; return (offset, length) to prefetch, or None."""
        end = off + size
        sequential = self.next_off >= 0 and abs(off - self.next_off) <= SLACK
        self.next_off = end
        if not sequential or self.max_window <= 0:
            self.window = 0
            self.issued_until = end
            return None
        self.window = min(max(self.window * 2, MIN_WINDOW), self.max_window)
        start = max(self.issued_until, end)
        target = end + self.window
        # Ask again only once half a window has been consumed: fewer, larger reads.
        if target - start < min(self.window // 2, CHUNK) and start > end:
            return None
        if target <= start:
            return None
        self.issued_until = target
        return start, target - start


def chunks(off: int, length: int, chunk: int = CHUNK):
    """Split a prefetch into pieces that can be fetched in parallel."""
    end = off + length
    while off < end:
        n = min(chunk, end - off)
        yield off, n
        off += n
