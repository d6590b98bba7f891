"""Coherence with the backing file: close-to-open reloads, the reverse msync
(refresh), multiwrite, and dropping the kernel's copies of evicted twins.

Other nodes write the backing files too.  This room decides when the
daemon's pages and the kernel's pages must be dropped or reloaded, and tells
the kernel through the :class:`~shimfs.kernel.Kernel` interface that the
adapter supplies (ranged NOTIFY_INVAL_INODE and NOTIFY_STORE).  Those calls
block until the kernel is done, and INVAL_INODE writes dirty pages back to
this very daemon first, so they always run in worker threads, never on the
trio thread (docs/design.md, "Coherence").  The rest runs on the trio thread.
"""
from __future__ import annotations

import errno
import logging
import os

import trio

from .cache import AsyncCache
from .errors import FsError
from .kernel import Kernel, NullKernel
from .names import PAGE, REFRESH_CHUNK
from .namespace import Namespace
from .nodes import File

log = logging.getLogger(__name__)


class Coherence:
    """What keeps cached pages true to the backing file, here and in the kernel."""

    def __init__(self, cache: AsyncCache, ns: Namespace, kernel: Kernel | None = None):
        self.cache = cache
        self.ns = ns
        self.kernel: Kernel = kernel or NullKernel()
        self.kernel_drops = 0                   # pages dropped from the kernel for lost twins
        self.kernel_drops_pending = 0
        cache.on_lost_twins = self._drop_kernel_copies

    async def revalidate(self, ino: int) -> bool:
        """Close-to-open consistency; True if the kernel may keep its cached pages.

        When nobody has the file open and no data is dirty, a backing file
        changed by someone else (size or mtime differ from what this node last
        saw) is re-read: the daemon drops its clean pages and tells the kernel
        to drop its own.
        """
        node = self.ns.file(ino)
        cache = self.cache
        if node.fresh:                      # opened from the backing file just now
            node.fresh = False
            return True
        checked, node.checked = node.checked, None
        if node.opens > 1 or cache.dirty_bytes(node.fid):
            return True
        if checked is not None and checked[1] == node.seen:
            st = checked[0]     # this open's check (still_bound), nothing done since
        else:
            st = await cache.run(os.fstat, node.fd)
        if (st.st_size, st.st_mtime_ns) == node.seen:
            return True
        log.debug("%s changed under us: reloading", node.path)
        async with cache.pushes_paused(node.fid):     # no stale pages land late
            self.adopt(node, st.st_size, st.st_mtime_ns)
        return False

    def adopt(self, node: File, size: int, mtime_ns: int) -> None:
        """Forget the daemon's clean pages (and known zeros) of ``node`` and
        take the backing file's size and mtime; nothing of it is dirty.
        For close-to-open reloads."""
        cache = self.cache
        node.seen = (size, mtime_ns)
        cache.invalidate(node.fid, 0, max(size, cache.size(node.fid)))
        cache.truncate(node.fid, size)
        node.mtime_ns = mtime_ns

    def adopt_size(self, node: File, size: int, mtime_ns: int) -> None:
        """Take the backing file's size and mtime, keeping the pages: for a
        node given the size grant again (cluster.py).  Every page another
        node's change touched was in an extent that node held Exclusive, so
        this one dropped it then; what is left here is still true."""
        cache = self.cache
        cur = cache.size(node.fid)
        if size > cur:
            cache.set_size(node.fid, size)
        elif size < cur:
            cache.truncate(node.fid, size)
        node.seen = (size, mtime_ns)
        node.mtime_ns = mtime_ns

    async def refresh(self, node: File, offset: int, length: int | None) -> int:
        """See :meth:`_refresh`; prefetch pushes wait until it is done."""
        async with self.cache.pushes_paused(node.fid):
            return await self._refresh(node, offset, length)

    async def _refresh(self, node: File, offset: int, length: int | None) -> int:
        """The reverse msync: reload [offset, offset+length) from the backing file.

        1. The kernel writes the range's dirty mapped pages back to us and
           drops its copies (ranged NOTIFY_INVAL_INODE, from a worker thread).
        2. The engine re-reads the range: clean pages take the backing bytes;
           locally dirty pages keep the local writes (byte-exact with
           multiwrite, whole pages without).  The size follows the backing
           file unless local dirty data would be cut off.
        3. The new bytes are pushed into the kernel's cache (NOTIFY_STORE), so
           live mappings see them at once.  Pages outside the range are not
           touched.  Returns the number of bytes refreshed.
        """
        cache, kernel = self.cache, self.kernel
        st = await cache.run(os.fstat, node.fd)
        size = cache.size(node.fid)
        limit = max(st.st_size, size)
        if offset < 0 or (length is not None and length < 0):
            raise FsError(errno.EINVAL, "negative offset or length")
        if offset > limit:
            raise FsError(errno.EINVAL, "offset %d is past the end of the file (%d)" % (offset, limit))
        end = limit if length is None else min(offset + length, limit)
        spans = [(offset, end)]
        tail = size - size % PAGE
        if st.st_size > size and size % PAGE and not offset <= tail < end:
            # The backing file grew: the page that held the old end of file
            # holds zeros past it, here and in the kernel, where the backing
            # file now has bytes.  The new size exposes them: reload it too.
            spans.append((tail, min(tail + PAGE, st.st_size)))
        for a, b in spans:
            a, b = a & ~(PAGE - 1), (b + PAGE - 1) & ~(PAGE - 1)
            if b > a:
                await cache.run(kernel.inval_range, node.ino, a, b - a)
        async with node.io_lock:
            st = await cache.run(os.fstat, node.fd)
            for a, b in spans:
                await cache.reload(node.fid, a, b - a)
            old_size = cache.size(node.fid)
            if st.st_size > old_size:
                cache.set_size(node.fid, st.st_size)
            elif st.st_size < old_size and not cache.dirty_bytes(node.fid):
                cache.truncate(node.fid, st.st_size)
            new_size = cache.size(node.fid)
            node.seen = (st.st_size, st.st_mtime_ns)
            if new_size != old_size:
                node.mtime_ns = st.st_mtime_ns
                await cache.run(kernel.inval_range, node.ino, -1, 0)

        def push():
            for a, b in spans:
                for pos in range(a, min(b, new_size), REFRESH_CHUNK):
                    kernel.store(node.ino, pos, cache.read_blocking(
                        node.fid, pos, min(REFRESH_CHUNK, min(b, new_size) - pos)))
        await cache.run(push)
        return max(min(end, new_size) - offset, 0)

    def _drop_kernel_copies(self, lost: list[tuple[int, int]]) -> None:
        """The daemon evicted multiwrite pages (and their twins): make the
        kernel drop its copies too, so the next touch reads the page -- and
        its new twin -- through the daemon.  Runs in the background."""
        nursery = self.cache.nursery
        targets = []
        for fid, page in lost:
            node = self.ns.by_fid.get(fid)
            if node is not None:
                targets.append((node.ino, 0, 0) if page < 0 else (node.ino, page * 4096, 4096))
        if nursery is None or not targets:
            return
        kernel = self.kernel

        def work():
            for ino, off, length in targets:
                try:
                    kernel.inval_range(ino, off, length)
                finally:
                    self.kernel_drops += 1
                    self.kernel_drops_pending -= 1
        self.kernel_drops_pending += len(targets)
        nursery.start_soon(trio.to_thread.run_sync, work)

    async def set_multiwrite(self, node: File, on: bool) -> None:
        """Switch multiwrite for one file.

        A twin must describe the bytes the kernel's copy of a page was read
        from.  So the kernel first writes back and drops every cached page of
        the file (whole-file NOTIFY_INVAL_INODE), the daemon writes back and
        drops its own; pages are then read again, each with its twin.
        """
        async with self.cache.pushes_paused(node.fid):
            await self.cache.run(self.kernel.inval_range, node.ino, 0, 0)
            async with node.io_lock:
                await self.cache.writeback(node.fid, node.fd)
                self.cache.set_multiwrite(node.fid, on)
