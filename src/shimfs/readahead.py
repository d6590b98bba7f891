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

Every number the policy uses, and why it has its value, is a field of
:class:`ReadAheadConfig` below.

The streams of one mount share a :class:`Budget`: a stream's window is at
most ``max_window``, and at most the budget divided among the streams that
are prefetching at the time.  One stream alone may run far ahead, which
keeps every backing read slot busy.  Many streams together never prefetch
more than the budget (a quarter of the cache), so their pages are not
evicted before they are read.  Nor more than half of what dirty pages leave
of the cache: a mapped write dirties pages faster than they can be written
back, and with the whole budget in flight the cache then evicted prefetched
pages before the kernel asked for them (a 1 GiB mapped write fetched 1.3-1.45
GiB from the backing file, measured 2026-11-23).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ReadAheadConfig:
    """Every constant of the daemon's read-ahead, with the reason for its value.

    The mount option ``read_ahead`` (pages) sets the rest: the kernel's own
    read-ahead (``read_ahead_kb``, tuning.py) and the run length after which
    a stream starts prefetching.  Measurements: docs/performance.md.
    """

    #: The first window: one FUSE request carries at most 1 MiB (max_pages
    #: 256), so a smaller first prefetch would not run ahead of the kernel.
    min_window: int = 1 << 20
    #: The kernel's async read-ahead and mmap read-around issue requests a
    #: little out of order; jumps this small do not reset a stream.  With a
    #: small kernel window the disorder is small too: the slack is at most
    #: twice the window (``stream_slack``), so random touches a few pages
    #: apart are not taken for a scan.
    slack: int = 256 << 10
    #: A run of reads starts prefetching once it is longer than the kernel's
    #: window, and never before it is this long: with ``read_ahead=4`` two
    #: neighbouring random touches are 32 KiB of reads, not a scan (200 sparse
    #: touches of a 64 MiB file fetched 7.6 pages each without it, 4 with it).
    run_floor: int = 128 << 10
    #: Prefetches are cut into pieces this long, on multiples of it, so that
    #: several backing reads are in flight at once (the stand-in serves 2
    #: streams at ~1.6x one).
    chunk: int = 1 << 20
    #: With ``-o push``, every this-many-th chunk is pushed without its
    #: first page: one 4 KiB READ round trip per 2 MiB pushed tells the
    #: policy where the reader is; the window is several holes long, so the
    #: reader finds pushed pages ahead of it while the next chunks load.
    hole_every: int = 2
    #: A stream's window may grow to this many times ``read_ahead`` (at
    #: least ``window_floor``: 64 MiB at the defaults).  Four times kept ~16
    #: backing reads queued (1.0x -> 1.3x native on the stand-in); sixteen
    #: keeps the prefetch threads busy (2 GiB scan, 10 pairs: +5% and +8%,
    #: less daemon CPU).
    window_factor: int = 16
    #: All the streams of a mount together prefetch at most 1/this of the
    #: cache ahead of their readers (:class:`Budget`); more, and they evict
    #: their own pages before they are read.
    budget_share: int = 4
    #: Backing reads in flight for prefetches (the engine's prefetch threads).
    #: A network file system is latency bound: on the stand-in 1 MiB preads
    #: from 1/2/4/8 threads gave 265/484/644/680 MB/s, and a mapped scan went
    #: from ~210 to ~400 MB/s going from 4 to 12 threads (16: no better).
    prefetch_threads: int = 12

    #: ...but never less than this: with a small kernel window (a small
    #: ``read_ahead``, for random access) a sequential stream still keeps
    #: the prefetch threads busy (2 GiB cold scan at ``read_ahead=4 -o push``:
    #: 0.34x -> 1.15x native with the floor, measured 2026-12-01).
    window_floor: int = 64 << 20

    #: The compiled path (shimfs._wire) reads requests with several threads,
    #: so READs in flight together reach it in any order: a miss this close
    #: to its handle's previous READ may belong to a scan and goes to the
    #: policy; a random touch lands this close to the previous one rarely
    #: (0.8% of uniform touches of a 2 GiB file).
    reorder: int = 8 << 20

    def stream_slack(self, read_ahead_bytes: int) -> int:
        return min(self.slack, max(2 * read_ahead_bytes, 32 << 10))

    def min_run(self, read_ahead_bytes: int) -> int:
        return max(read_ahead_bytes, self.run_floor)

    def max_window(self, read_ahead_bytes: int, cache_size: int) -> int:
        """The largest window of one stream."""
        return min(max(read_ahead_bytes * self.window_factor, self.window_floor),
                   self.budget(cache_size))

    def budget(self, cache_size: int) -> int:
        """The read-ahead bytes all the streams of a mount share."""
        return cache_size // self.budget_share


DEFAULT = ReadAheadConfig()
PAGE = 4096
# The policy's hot path reads these as module constants.
MIN_WINDOW = DEFAULT.min_window
SLACK = DEFAULT.slack
CHUNK = DEFAULT.chunk
HOLE_EVERY = DEFAULT.hole_every


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
        """The window each open stream may have now (at least MIN_WINDOW), in
        whole pages: prefetches and pushes start where windows end."""
        total = self.total
        if self.clean is not None:
            total = min(total, self.clean() // 2)
        return max(MIN_WINDOW, total // max(1, self.active) & ~(PAGE - 1))


class Stream:
    """Sequential-stream detector of one open file."""

    __slots__ = ("max_window", "min_run", "run_low", "next_off", "window",
                 "issued_until", "sequential", "random", "asked_until", "budget", "slack")

    def __init__(self, max_window: int, min_run: int = 0, budget: Budget | None = None,
                 slack: int = SLACK):
        self.max_window = max_window
        self.budget = budget
        self.slack = slack
        # A mapped page fault makes the kernel read up to its read-ahead size
        # around the page, as several back-to-back READs.  Such a cluster
        # looks sequential but is one random touch: prefetching starts only
        # once a run of reads is longer than ``min_run`` (the kernel's window).
        self.min_run = min_run
        self.run_low = 0            # lowest offset of the run (copies may walk down)
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
        slack = self.slack
        # A large memcpy may walk each stretch it copies downwards (glibc
        # does, to avoid 4K aliasing): a read just below the lowest one of
        # the run continues it too.
        sequential = (self.next_off >= 0
                      and min(self.next_off - max(slack, self.window), self.run_low - slack)
                      <= off <= max(self.next_off, self.issued_until) + slack)
        if not sequential or self.max_window <= 0:
            self.random += 1
            self.run_low = off
            self.next_off = end
            self._set_window(0)
            self.issued_until = end
            return None
        self.sequential += 1
        self.next_off = max(self.next_off, end)
        if off < self.run_low:
            self.run_low = off
        end = self.next_off
        if end - self.run_low <= self.min_run:
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

    def trigger(self) -> int:
        """The end offset past which the policy wants to see the next read
        (-1: none).  Cached reads before it are answered without Python (the
        compiled path, shimfs._wire), so a stream that prefetches is shown
        one read per ``CHUNK`` consumed, which is when it asks again."""
        if not self.window:
            return -1
        return max(0, self.issued_until - self.window + min(self.window // 2, CHUNK))

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
