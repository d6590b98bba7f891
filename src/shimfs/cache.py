"""The façade: the only way from the VFS to the shimcore engine.

Nothing else in shimfs imports shimcore.  Calls that may do I/O are async
and run in worker threads; calls that never do I/O (sizes, dirty counts,
cache lookups) are plain methods, fine on the trio thread.

The engine releases the GIL for its copies and backing I/O, so these threads
run in parallel with each other and with the trio thread that serves FUSE.
Nothing here blocks the trio thread.  Prefetches are queued to the engine's
own threads (``PageCache.prefetch_async``, at most
``ReadAheadConfig.prefetch_threads``),
which never need the GIL: against a trio task and a worker hop per 1 MiB
chunk that took the daemon's CPU per GiB scanned 0.97 -> 0.68 s and the scan
582 -> 711 MB/s (measured 2026-11-23).  The engine keeps a file's
record alive while its prefetches run.  Prefetches that push, and any the
engine's queue refuses, run as background tasks in the mount's nursery,
bounded by their own limiter so that they never starve the reads a process
is waiting for.

Pushing (``-o push``, off by default): a prefetched chunk is also copied
into the kernel's page cache (``Kernel.push``: a FUSE_NOTIFY_STORE written
by shimfs._notify straight from the engine's pinned slots, GIL released),
so the kernel need not send
READs for it, which pyfuse3 would answer on the trio thread with the GIL
held.  NOTIFY_STORE overwrites
whatever the kernel holds, dirty pages included, and grows the kernel's idea
of the size, so a file is only pushed to while its :class:`PushGate` is
open: no writable handle, no truncate, refresh or reload in progress.  Those
close the gate and wait until pushes already under way have finished.  The
gate's counters are only touched on the trio thread.

The prefetch call (``load_and_push``, ``shimfs prefetch``): a byte range is
read with up to ``prefetch_threads`` parallel engine prefetches of
``PREFETCH_CHUNK`` and pushed into the kernel's page cache under the same
gate as ``-o push``, in pieces of at most a quarter of the cache (and
``PREFETCH_PIECE``), pushing one piece while the next is read.  Pushed
pages are spent (evicted first), so a range larger than the cache passes
through it.  Pages the cache no longer holds when their piece is pushed
(evicted, or known zeros, which are never cached) are read again and
stored from a copy.  While the gate is closed nothing is pushed: the pages
stay in the daemon's cache only.

Backing files in memory (tmpfs, ramfs; ``shimcore.MEMORY_FS_MAGIC``) get no
read-ahead, and a READ that misses the cache is served on the trio thread:
their reads never wait for a device, and a 1 MiB read costs less than the
hop to a worker.  ``engine.read`` never writes back (a full cache reads
through), so it cannot block on some other, slow file.  A mapped scan of a
file in /dev/shm (the default backing directory): 1858 -> 2490 MB/s, daemon
0.57 -> 0.39 s per GiB (docs/performance.md).  Writes still go to workers:
``engine.write`` may write back another file's pages to make room.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os

import trio

import shimcore

from .kernel import Kernel, NullKernel, NullWire, Wire
from .readahead import DEFAULT as READ_AHEAD, Budget, ReadAheadConfig, Stream, chunks, hole

try:
    from shimcore._creds import run_as as _run_as
except ImportError:    # pragma: no cover - the extension is always built
    _run_as = None

PAGE = shimcore.PAGE_SIZE
#: The prefetch call: bytes per engine prefetch, and the largest piece read
#: before it is pushed (also at most a quarter of the cache).
PREFETCH_CHUNK = 4 << 20
PREFETCH_PIECE = 64 << 20
#: Bytes per NOTIFY_STORE of the prefetch call.
PUSH_CHUNK = 1 << 20
#: Concurrent write-back streams for one file once it has this much dirty data.
WRITEBACK_STREAMS = 4
WRITEBACK_PARALLEL_MIN = 8 << 20


class PushGate:
    """Whether prefetched pages of one file may be pushed into the kernel."""

    __slots__ = ("closed", "pushing", "idle")

    def __init__(self):
        self.closed = 0         # writable handles + operations that need pushes stopped
        self.pushing = 0        # pushes under way
        self.idle: trio.Event | None = None

log = logging.getLogger(__name__)


#: st_dev -> whether that file system lives in memory (AsyncCache.in_memory).
_IN_MEMORY: dict[int, bool] = {}


class AsyncCache:
    """One engine, two thread pools (foreground and prefetch)."""

    def __init__(self, cache_size: int, read_ahead_bytes: int, threads: int = 8,
                 push: bool = False, read_ahead: ReadAheadConfig = READ_AHEAD):
        self.engine = shimcore.PageCache(cache_size)
        # Prefetches without pushing run on the engine's own threads
        # (prefetch_async): no trio task, no worker hop, no GIL per chunk.
        self.engine.set_prefetchers(read_ahead.prefetch_threads)
        self.push = push
        self.kernel: Kernel = NullKernel()      # the mount's, once it exists
        self.wire: Wire = NullWire()            # its compiled READ path, if any
        self.gates: dict[int, PushGate] = {}
        # Prefetches in flight per file, and what to call once there are none:
        # a prefetch outlives the handle that started it, and the engine must
        # not forget a file (nor its fd be closed) while one is using it.
        self.prefetching: dict[int, int] = {}
        self.idle_callbacks: dict[int, list] = {}
        # The windows of all streams together may not exceed a share of the
        # cache: streams that prefetch more than that evict their own pages
        # before they are read.  A stream alone may take all of it.
        self.budget = Budget(read_ahead.budget(cache_size), self.engine.clean_bytes)
        self.max_window = read_ahead.max_window(read_ahead_bytes, cache_size)
        self.min_run = read_ahead.min_run(read_ahead_bytes)
        self.slack = read_ahead.stream_slack(read_ahead_bytes)
        self.near = max(self.slack, read_ahead.reorder)     # see attach_wire
        self.read_ahead_bytes = read_ahead_bytes
        self.limiter = trio.CapacityLimiter(threads)
        self.prefetch_limiter = trio.CapacityLimiter(read_ahead.prefetch_threads)
        self.nursery: trio.Nursery | None = None
        self.prefetch_errors = 0
        self.on_lost_twins = None
        # request counters (shimfs stat): FUSE reads and writes, those served
        # without a worker thread, and prefetches started (in flight: see
        # prefetches_in_flight)
        self.counters = dict(read_requests=0, read_request_bytes=0, reads_from_cache=0, reads_inline=0,
                             write_requests=0, writes_to_cache=0, prefetches=0,
                             pushes_skipped=0, prefetch_calls=0, prefetch_call_bytes=0,
                             prefetch_call_pushed_bytes=0)
        self.cache_size = cache_size

    @property
    def compiled(self) -> bool:
        """Whether the engine is the compiled one (compiled modules may
        cimport it: shimfs._notify, shimfs._wire)."""
        return shimcore.IMPLEMENTATION == "compiled"

    def attach_wire(self, session_fd: int, threads: int = 8, control_prefix: bytes = b"",
                    sparse_faults: int = 0):
        """Put the compiled READ path (shimfs._wire) in front of pyfuse3 on
        ``session_fd``; returns it, or None where it cannot run (the fallback
        engine, socket buffers capped for a daemon that is not root).
        ``control_prefix``: the xattr names the daemon answers; GETXATTRs of
        others get ENODATA in the wire; ``sparse_faults``: the kernel's
        read-around window (bytes), which the wire refuses for random page
        faults (Config.sparse_faults); 0: never."""
        if not self.compiled:
            return None
        from ._wire import Wire as CompiledWire
        try:
            wire = CompiledWire(self.engine, session_fd, self.near, threads, control_prefix,
                                sparse_faults)
        except OSError as exc:
            log.info("READs go through Python only: %s", exc)
            return None
        self.wire = wire
        return wire

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

    async def run_as(self, uid: int, gid: int, groups: list[int], fn, *args):
        """``run`` with the worker thread's fs credentials switched to the user's."""
        if _run_as is None:     # pragma: no cover
            raise OSError(errno.ENOSYS, "no credential switch")
        return await self.run(_run_as, uid, gid, groups, fn, *args)

    def stream(self) -> Stream:
        return Stream(self.max_window, self.min_run, self.budget, self.slack)

    # -- the engine's file records (no I/O: fine on any thread) --------------
    def register(self, fd: int, size: int, multiwrite: bool = False) -> int:
        """Start caching backing file ``fd``; returns its file id."""
        fid = self.engine.register(fd, size)
        if multiwrite:
            self.engine.set_multiwrite(fid, True)
        return fid

    def unregister(self, fid: int) -> None:
        """Forget the file and its pages (write back first)."""
        self.engine.unregister(fid)
        self.gates.pop(fid, None)

    @staticmethod
    def in_memory(fd: int, dev: int) -> bool:
        """Whether backing file ``fd``, on device ``dev`` (its ``st_dev``),
        lives in memory (tmpfs, ramfs).  Kept per device: an fstatfs is a
        round trip to the server on a network file system (~260 us over the
        stand-in, a tenth of opening a small file through -o mirror)."""
        known = _IN_MEMORY.get(dev)
        if known is None:
            known = _IN_MEMORY[dev] = shimcore.fs_magic(fd) in shimcore.MEMORY_FS_MAGIC
        return known

    @staticmethod
    def in_memory_known(dev: int) -> bool | None:
        """:meth:`in_memory` of a device already seen, else None (no I/O)."""
        return _IN_MEMORY.get(dev)

    def size(self, fid: int) -> int:
        return self.engine.size(fid)

    def set_size(self, fid: int, size: int) -> None:
        self.engine.set_size(fid, size)

    def dirty_bytes(self, fid: int) -> int:
        return self.engine.dirty_bytes(fid)

    def truncate(self, fid: int, size: int, zeros_from: int = -1) -> None:
        """The cached size and pages follow a truncate of the backing file;
        ``zeros_from``: this node grew it from there, so the new pages are
        known zeros (filled without a backing read); ignored unless the
        file grew."""
        self.engine.truncate(fid, size, zeros_from)

    def punch(self, fid: int, offset: int, length: int) -> None:
        """The backing range became a hole: the cache follows (PageCache.punch)."""
        self.engine.punch(fid, offset, length)

    @staticmethod
    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) of a backing file (blocking: call from a worker)."""
        shimcore.fallocate(fd, mode, offset, length)

    def invalidate(self, fid: int, offset: int, length: int) -> int:
        """Drop the clean cached pages of a range."""
        return self.engine.invalidate(fid, offset, length)

    def set_multiwrite(self, fid: int, on: bool) -> None:
        self.engine.set_multiwrite(fid, on)

    def file_stats(self, fid: int) -> dict:
        return self.engine.file_stats(fid)

    def read_arounds_refused(self, fid: int) -> int:
        return self.engine.read_arounds_refused(fid)

    def pushing(self, fid: int) -> bool:
        """Whether prefetched pages of ``fid`` are pushed into the kernel now."""
        return self.gate(fid).closed == 0 and self.push and self.kernel.live

    def stats(self) -> dict:
        """The mount's counters: the engine's, the requests', read-ahead's."""
        wire = self.wire.counters()
        c = dict(self.counters)
        # READs the compiled path answered are READs like any other
        c["read_requests"] += wire["fast_reads"]
        c["read_request_bytes"] += wire["fast_read_bytes"]
        c["reads_from_cache"] += wire["fast_reads"] - wire["fast_read_misses"]
        c["write_requests"] += wire["fast_writes"]
        c["writes_to_cache"] += wire["fast_writes"]
        return dict(self.engine.stats(), **c, **wire,
                    prefetch_errors=self.prefetch_failures,
                    prefetches_in_flight=self.prefetches_in_flight,
                    read_ahead_max_window=self.max_window,
                    read_ahead_budget=self.budget.total,
                    read_ahead_streams=self.budget.active)

    # -- the push gate -------------------------------------------------------
    def gate(self, fid: int) -> PushGate:
        g = self.gates.get(fid)
        if g is None:
            g = self.gates[fid] = PushGate()
        return g

    async def close_gate(self, fid: int) -> None:
        """Stop pushes to ``fid`` and wait for those under way; pair with open_gate."""
        g = self.gate(fid)
        g.closed += 1
        while g.pushing:
            if g.idle is None:
                g.idle = trio.Event()
            await g.idle.wait()

    def open_gate(self, fid: int) -> None:
        self.gate(fid).closed -= 1

    def start_push(self, fid: int) -> PushGate | None:
        """Count a push of ``fid`` in, on this (the trio) thread, before it
        leaves for its worker; None (counted as skipped) while the gate is
        closed or no kernel is there.  Pair with :meth:`end_push`."""
        g = self.gate(fid)
        if g.closed or not self.kernel.live:
            self.counters["pushes_skipped"] += 1
            return None
        g.pushing += 1
        return g

    @staticmethod
    def end_push(g: PushGate) -> None:
        """The push is over: wake a ``close_gate`` waiting for the last one."""
        g.pushing -= 1
        if not g.pushing and g.idle is not None:
            g.idle.set()
            g.idle = None

    @contextlib.asynccontextmanager
    async def pushes_paused(self, fid: int):
        """No pushes to ``fid`` inside the block (none under way either)."""
        await self.close_gate(fid)
        try:
            yield
        finally:
            self.open_gate(fid)

    @property
    def prefetches_in_flight(self) -> int:
        """Trio-task prefetches under way plus the engine's queued and running ones."""
        return sum(self.prefetching.values()) + self.engine.stats()["prefetch_pending"]

    @property
    def prefetch_failures(self) -> int:
        """Failed prefetches of either kind (they are retried by the read that needs them)."""
        return self.prefetch_errors + self.engine.stats()["prefetch_errors"]

    def prefetches_of(self, fid: int) -> int:
        """Prefetches of ``fid`` queued or under way, of either kind."""
        return self.prefetching.get(fid, 0) + self.engine.file_stats(fid)["prefetch_pending"]

    def when_idle(self, fid: int, callback) -> bool:
        """Call ``callback()`` once no prefetch of ``fid`` is in flight; False
        (and no call) if none is in flight now."""
        if not self.prefetching.get(fid):
            return False
        self.idle_callbacks.setdefault(fid, []).append(callback)
        return True

    # -- data --------------------------------------------------------------
    async def read(self, fid: int, ino: int, stream: Stream | None, off: int,
                   size: int, inline: bool = False) -> bytes:
        """A FUSE READ.  ``inline``: the backing file lives in memory (tmpfs),
        so a miss is read on this thread; a hop to a worker would cost more
        than the read (see the module docstring)."""
        c = self.counters
        c["read_requests"] += 1
        c["read_request_bytes"] += size
        if stream is not None:
            self.observe(fid, ino, stream, off, size)
        data = self.engine.read_cached(fid, off, size)   # no I/O: fine on this thread
        if data is not None:
            c["reads_from_cache"] += 1
            return data
        if inline:
            c["reads_inline"] += 1
            try:
                return self.engine.read(fid, off, size)
            finally:
                self.check_lost_twins()
        return await self.run(self.engine.read, fid, off, size)

    def observe(self, fid: int, ino: int, stream: Stream, off: int, size: int) -> None:
        """Show a READ of [off, off+size) to ``stream``'s read-ahead policy
        and start the prefetches it asks for: every READ that reaches
        Python, and those the compiled path answered past their trigger
        (Wire.take)."""
        if self.nursery is None:
            return
        plan = stream.on_read(off, size)
        if plan is None:
            return
        engine = self.engine
        pushing = self.push and self.kernel.live
        for c_off, c_len in chunks(*plan):
            # Pushes need the gate, which lives on this thread: they,
            # and whatever the engine's queue refuses, take a trio task.
            if not pushing and engine.prefetch_async(fid, c_off, c_len):
                self.counters["prefetches"] += 1
            else:
                self.nursery.start_soon(self._prefetch, fid, ino, stream, c_off, c_len)

    def trigger(self, stream: Stream) -> int:
        """Where the compiled path hands ``stream``'s READs back to Python
        (shimfs._wire; -1: never).  While pushing, every READ past the
        furthest one seen: the pushes leave holes so that the policy sees
        where the reader is (see the module docstring)."""
        if self.push and self.kernel.live:
            return stream.next_off if stream.window else -1
        return stream.trigger()

    async def load_and_push(self, fid: int, ino: int, offset: int, length: int) -> int:
        """The prefetch call: read [offset, offset+length) into the cache and
        push it into the kernel's page cache; returns the bytes pushed (0
        while the file's push gate is closed).  See the module docstring."""
        c = self.counters
        c["prefetch_calls"] += 1
        c["prefetch_call_bytes"] += length
        end = offset + length
        piece = max(PREFETCH_CHUNK, min(PREFETCH_PIECE, self.cache_size // 4 // PREFETCH_CHUNK
                                        * PREFETCH_CHUNK))
        pieces = [(a, min(a + piece, end)) for a in range(offset & ~(PAGE - 1), end, piece)]
        pushed = 0
        engine = self.engine

        errors: list[OSError] = []

        async def fetch(pos: int, n: int) -> None:
            try:
                await trio.to_thread.run_sync(engine.prefetch, fid, pos, n,
                                              limiter=self.prefetch_limiter)
            except OSError as exc:
                errors.append(exc)

        async def load(a: int, b: int) -> None:
            async with trio.open_nursery() as n:
                for pos in range(a, b, PREFETCH_CHUNK):
                    n.start_soon(fetch, pos, min(PREFETCH_CHUNK, b - pos))

        async def push(a: int, b: int) -> None:
            nonlocal pushed
            kernel, g = self.kernel, self.start_push(fid)
            if g is None:
                return

            def work() -> int:
                done = 0
                for pos in range(a, b, PUSH_CHUNK):
                    want = min(PUSH_CHUNK, b - pos)
                    n = kernel.push(engine, fid, ino, pos, want)
                    if n < want:        # evicted meanwhile, or known zeros: from a copy
                        data = engine.read(fid, pos + n, want - n)
                        kernel.store(ino, pos + n, data)
                        n += len(data)
                    done += n
                return done
            try:
                pushed += await trio.to_thread.run_sync(work, limiter=self.prefetch_limiter)
            except OSError as exc:
                errors.append(exc)
            finally:
                self.end_push(g)
                self.check_lost_twins()
        prev = None
        for cur in pieces + [None]:
            async with trio.open_nursery() as n:
                if cur is not None:
                    n.start_soon(load, *cur)
                if prev is not None:
                    n.start_soon(push, *prev)
            if errors:
                raise errors[0]
            prev = cur
        c["prefetch_call_pushed_bytes"] += pushed
        return pushed

    async def _prefetch(self, fid: int, ino: int, stream: Stream, off: int, length: int) -> None:
        self.counters["prefetches"] += 1
        self.prefetching[fid] = self.prefetching.get(fid, 0) + 1
        kernel = self.kernel
        g = self.start_push(fid) if self.push and kernel.live else None
        engine = self.engine

        def work():
            engine.prefetch(fid, off, length)
            if g is None or g.closed:
                return
            # Pages the kernel has asked for already come back in its READ
            # replies: pushing them too would copy them twice.
            start = max(off + (PAGE if hole(off) else 0),
                        (stream.asked_until + PAGE - 1) & ~(PAGE - 1))
            if start < off + length:
                kernel.push(engine, fid, ino, start, off + length - start)
        try:
            await trio.to_thread.run_sync(work, limiter=self.prefetch_limiter)
        except (OSError, KeyError) as exc:
            # The read that needs these pages will fetch them and report errors.
            self.prefetch_errors += 1
            log.debug("prefetch of file %d at %d failed: %s", fid, off, exc)
        finally:
            if g is not None:
                self.end_push(g)
            self.check_lost_twins()
            self.prefetching[fid] -= 1
            if not self.prefetching[fid]:
                del self.prefetching[fid]
                for callback in self.idle_callbacks.pop(fid, ()):
                    try:
                        callback()
                    except Exception:       # never let it take the mount's nursery down
                        log.exception("after the last prefetch of file %d", fid)

    async def write(self, fid: int, off: int, data: bytes) -> int:
        c = self.counters
        c["write_requests"] += 1
        n = self.engine.write_cached(fid, off, data)     # no I/O: fine on this thread
        if n is not None:
            c["writes_to_cache"] += 1
            return n
        return await self.run(self.engine.write, fid, off, data)

    def read_blocking(self, fid: int, off: int, size: int) -> bytes:
        """A read that may do I/O on the calling thread: worker threads only."""
        return self.engine.read(fid, off, size)

    async def reload(self, fid: int, offset: int, length: int) -> int:
        """Re-read a range from the backing file, keeping local dirty bytes."""
        return await self.run(self.engine.refresh, fid, offset, length)

    async def writeback(self, fid: int, fd: int | None = None) -> int:
        """Write dirty pages back; with ``fd``, fsync it afterwards (durable).

        Large write-backs run as ``WRITEBACK_STREAMS`` concurrent engine
        write-backs of the same file: each claims the next dirty run (up to
        4 MiB) under the engine's mutex, so the runs are split among them and
        several pwritev are in flight.  The first error is raised after all
        have stopped; every run that failed is dirty again.
        """
        engine = self.engine
        streams = 1
        if engine.dirty_bytes(fid) >= WRITEBACK_PARALLEL_MIN:
            streams = WRITEBACK_STREAMS
        total = 0
        errors: list[BaseException] = []

        async def one():
            nonlocal total
            try:
                total += await self.run(engine.writeback, fid)
            except OSError as exc:
                errors.append(exc)
        if streams == 1:
            await one()
        else:
            async with trio.open_nursery() as n:
                for _ in range(streams):
                    n.start_soon(one)
        if errors:
            raise errors[0]
        if fd is not None:
            await self.run(os.fsync, fd)
        return total
