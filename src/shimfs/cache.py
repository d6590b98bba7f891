"""Async facade over the shimcore engine: every call runs in a worker thread.

The engine releases the GIL for its copies and backing I/O, so these threads
run in parallel with each other and with the trio thread that serves FUSE.
Nothing here blocks the trio thread.  Prefetches run as background tasks in
the mount's nursery, bounded by their own limiter so that they never starve
the reads a process is waiting for.
"""
from __future__ import annotations

import logging
import os

import trio

import shimcore

from .readahead import Stream, chunks

log = logging.getLogger(__name__)


class AsyncCache:
    """One engine, two thread pools (foreground and prefetch)."""

    def __init__(self, cache_size: int, read_ahead_bytes: int, threads: int = 8,
                 prefetch_threads: int = 4):
        self.engine = shimcore.PageCache(cache_size)
        # The window may not exceed a quarter of the cache: a stream that
        # prefetches more than that evicts its own pages before they are read.
        self.max_window = min(read_ahead_bytes, cache_size // 4)
        self.limiter = trio.CapacityLimiter(threads)
        self.prefetch_limiter = trio.CapacityLimiter(prefetch_threads)
        self.nursery: trio.Nursery | None = None
        self.prefetch_errors = 0
        self.on_lost_twins = None
        # request counters (shimfs stat): FUSE reads, those served without a
        # worker thread, writes, and prefetches started / in flight
        self.counters = dict(read_requests=0, read_request_bytes=0, reads_from_cache=0,
                             write_requests=0, prefetches=0, prefetches_in_flight=0)

    async def run(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self.check_lost_twins()

    def check_lost_twins(self) -> None:
        """Hand evicted multiwrite pages to ``on_lost_twins`` (set by the VFS)."""
        lost = self.engine.take_lost_twins()
        if lost and self.on_lost_twins is not None:
            self.on_lost_twins(lost)

    def stream(self) -> Stream:
        return Stream(self.max_window)

    # -- data --------------------------------------------------------------
    async def read(self, fid: int, stream: Stream | None, off: int, size: int) -> bytes:
        c = self.counters
        c["read_requests"] += 1
        c["read_request_bytes"] += size
        if stream is not None and self.nursery is not None:
            plan = stream.on_read(off, size)
            if plan is not None:
                for c_off, c_len in chunks(*plan):
                    self.nursery.start_soon(self._prefetch, fid, c_off, c_len)
        data = self.engine.read_cached(fid, off, size)   # no I/O: fine on this thread
        if data is not None:
            c["reads_from_cache"] += 1
            return data
        return await self.run(self.engine.read, fid, off, size)

    async def _prefetch(self, fid: int, off: int, length: int) -> None:
        self.counters["prefetches"] += 1
        self.counters["prefetches_in_flight"] += 1
        try:
            await trio.to_thread.run_sync(self.engine.prefetch, fid, off, length,
                                          limiter=self.prefetch_limiter)
        except (OSError, KeyError) as exc:
            # The read that needs these pages will fetch them and report errors.
            self.prefetch_errors += 1
            log.debug("prefetch of file %d at %d failed: %s", fid, off, exc)
        finally:
            self.counters["prefetches_in_flight"] -= 1
            self.check_lost_twins()

    async def write(self, fid: int, off: int, data: bytes) -> int:
        self.counters["write_requests"] += 1
        return await self.run(self.engine.write, fid, off, data)

    async def writeback(self, fid: int, fd: int | None = None) -> int:
        """Write dirty pages back; with ``fd``, fsync it afterwards (durable)."""
        def work():
            n = self.engine.writeback(fid)
            if fd is not None:
                os.fsync(fd)
            return n
        return await self.run(work)
