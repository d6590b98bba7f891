"""Read-ahead policy: pure code that decides what to prefetch after each read.

One :class:`Stream` per open file handle.  A read that starts where the last
one ended, or anywhere inside the range already prefetched (give or take
``SLACK``), is sequential: the window doubles from ``MIN_WINDOW`` up to
``max_window``, and the policy asks for the part of ``[end, end + window)``
not requested yet.  Any other read is random: the window drops to zero and
nothing is prefetched, so random page touches cost the backing file only the
pages the kernel asks for.  The kernel's mmap read-around turns one random
fault into several back-to-back READs (up to its read-ahead size around the
page), so a run of reads starts prefetching only once it is longer than that
(``min_run``): that alone halved the bytes fetched for random touches.

With ``-o push``, prefetched chunks are also *pushed* into the kernel's page
cache (see cache.py), so the kernel stops asking for them.  To keep learning where
the reader is, every ``HOLE_EVERY``-th chunk is pushed without its first
page: the reader faults on that page, the kernel sends a 4 KiB READ, and the
READ moves the stream on.  The reads the policy sees then land inside the
prefetched range rather than at its end, which is why that range counts as
sequential.

Why these numbers:

* ``MIN_WINDOW`` = 1 MiB: one FUSE request carries at most 1 MiB (max_pages
  256), so a smaller first prefetch would not run ahead of the kernel at all.
* ``SLACK`` = 256 KiB: the kernel's async read-ahead and mmap read-around
  issue requests a little out of order; jumps this small do not reset a
  stream.
* Prefetches are cut into ``CHUNK`` = 1 MiB pieces, on 1 MiB boundaries,
  so that several backing reads are in flight at once (the stand-in serves 2
  streams at ~1.6x one).
* ``HOLE_EVERY`` = 2: one 4 KiB READ round trip per 2 MiB pushed; the window
  (up to ``max_window``) is several holes long, so the reader finds pushed
  pages ahead of it while the next chunks load.

The streams of one mount share a :class:`Budget`: a stream's window is at
most ``max_window``, and at most the budget divided among the streams that
are prefetching at the time.  One stream alone may run far ahead, which
keeps every backing read slot busy.  Many streams together never prefetch
more than the budget (a quarter of the cache), so their pages are not
evicted before they are read.  Nor more than half of what dirty pages leave
of the cache: a mapped write dirties pages faster than they can be written
back, and with the whole budget in flight the cache then evicted prefetched
pages before the kernel asked for them (a 1 GiB mapped write fetched 1.3-1.45
GiB from the backing file, docs/performance.md step 15).
"""
from __future__ import annotations

MIN_WINDOW = 1 << 20
SLACK = 256 << 10
CHUNK = 1 << 20
HOLE_EVERY = 2


class Budget:
    """Bytes of read-ahead that the prefetching streams of a mount share.

    ``clean`` (optional) returns how many bytes of the cache dirty pages do
    not hold.  Prefetched pages can only live there, next to the pages
    already served, which the kernel may still write to: the streams'
    windows together stay within half of it.
    """

    __slots__ = ("total", "active", "clean")

    def __init__(self, total: int, clean=None):
        self.total = total
        self.active = 0             # streams whose window is open (> 0)
        self.clean = clean

    def share(self) -> int:
        """The window each open stream may have now (at least MIN_WINDOW)."""
        total = self.total
        if self.clean is not None:
            total = min(total, self.clean() // 2)
        return max(MIN_WINDOW, total // max(1, self.active))


class Stream:
    """Sequential-stream detector of one open file."""

    __slots__ = ("max_window", "min_run", "run_start", "next_off", "window", "issued_until",
                 "sequential", "random", "asked_until", "budget")

    def __init__(self, max_window: int, min_run: int = 0, budget: Budget | None = None):
        self.max_window = max_window
        self.budget = budget
        # A mapped page fault makes the kernel read up to its read-ahead size
        # around the page, as several back-to-back READs.  Such a cluster
        # looks sequential but is one random touch: prefetching starts only
        # once a run of reads is longer than ``min_run`` (the kernel's window).
        self.min_run = min_run
        self.run_start = 0
        self.next_off = -1
        self.window = 0
        self.issued_until = 0
        self.sequential = 0         # reads seen in-stream / out of stream (shimfs stat)
        self.random = 0
        self.asked_until = 0        # furthest end of a read seen (the kernel has those pages)

    def on_read(self, off: int, size: int) -> tuple[int, int] | None:
        """Record a read; return (offset, length) to prefetch, or None."""
        end = off + size
        if end > self.asked_until:
            self.asked_until = end
        # Requests arrive a little out of order (the kernel has several in
        # flight): up to a window behind the furthest one is still in-stream.
        sequential = (self.next_off >= 0
                      and self.next_off - max(SLACK, self.window) <= off
                      <= max(self.next_off, self.issued_until) + SLACK)
        if not sequential or self.max_window <= 0:
            self.random += 1
            self.run_start = off
            self.next_off = end
            self._set_window(0)
            self.issued_until = end
            return None
        self.sequential += 1
        self.next_off = max(self.next_off, end)
        end = self.next_off
        if end - self.run_start <= self.min_run:
            return None
        cap = self.max_window
        if self.budget is not None:
            if not self.window:
                self.budget.active += 1     # count this stream before taking its share
            cap = min(cap, self.budget.share())
        self.window = min(max(self.window * 2, MIN_WINDOW), cap)
        start = max(self.issued_until, end)
        target = end + self.window
        # Ask again only once half a window has been consumed: fewer, larger reads.
        if target - start < min(self.window // 2, CHUNK) and start > end:
            return None
        if target <= start:
            return None
        self.issued_until = target
        return start, target - start


    def _set_window(self, window: int) -> None:
        if self.budget is not None and self.window and not window:
            self.budget.active -= 1
        self.window = window

    def close(self) -> None:
        """The handle is gone: give the stream's share back."""
        self._set_window(0)


def chunks(off: int, length: int, chunk: int = CHUNK):
    """Split a prefetch into pieces, cut on multiples of ``chunk``, that can be
    fetched in parallel."""
    end = off + length
    while off < end:
        n = min(chunk - off % chunk, end - off)
        yield off, n
        off += n


def hole(off: int) -> bool:
    """Whether the chunk at ``off`` is pushed without its first page."""
    return off % (CHUNK * HOLE_EVERY) == 0
