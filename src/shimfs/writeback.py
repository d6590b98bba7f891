"""Write-back: dirty pages to the backing files, durable when asked.

* ``writeback(node, durable)`` writes a file's dirty pages back; durable
  (msync, fsync, ``shimfs sync``, the sync xattr, unmount) also fsyncs the
  backing file before it returns, and refuses with ESTALE a file that was
  removed behind the daemon's back.
* The background: a WRITE that leaves half the cache dirty starts a
  write-back of its file, and the ``flusher`` starts one for every dirty file
  each ``writeback_interval`` seconds.
* ``with_reopen``: a backing descriptor that went bad (EBADFD, a GlusterFS
  server that went away and came back) is reopened once and the call retried.

Runs on the trio thread; the I/O runs in the façade's worker threads.  One
file's write-back, fsync and truncate are serialized by its ``io_lock``
(docs/design.md, "Write-back").
"""
from __future__ import annotations

import errno
import logging
import os

import trio

from .cache import AsyncCache
from .config import Config
from .errors import FsError
from .namespace import Namespace
from .nodes import File

log = logging.getLogger(__name__)

_REOPEN_ERRNOS = {errno.EBADFD}


class WriteBack:
    """Durable and background write-back of the files of a namespace."""

    def __init__(self, config: Config, cache: AsyncCache, ns: Namespace):
        self.config = config
        self.cache = cache
        self.ns = ns

    async def writeback(self, node: File, durable: bool) -> None:
        log.debug("write-back of %s (durable=%s), %d dirty bytes", node.path, durable,
                  self.cache.dirty_bytes(node.fid))
        async with node.io_lock:
            if node.parent is not None or node.lost:
                st = await self.cache.run(os.fstat, node.fd)
                if st.st_nlink == 0:
                    # Removed behind our back (not unlinked through the mount):
                    # data written now would vanish with the inode.  Say so,
                    # and keep it (dirty) in the cache.
                    node.lost = True
                    raise FsError(errno.ESTALE, "backing file %s was removed" % node.path)
            await self.with_reopen(node, self.cache.writeback, node.fid,
                                   node.fd if durable else None)
            st = await self.cache.run(os.fstat, node.fd)
            node.seen = (st.st_size, st.st_mtime_ns)

    async def writeback_if_dirty(self, node: File) -> None:
        """Write back (not durably) if the file can have dirty pages."""
        if node.writable and self.cache.dirty_bytes(node.fid):
            await self.writeback(node, durable=False)

    async def with_reopen(self, node: File, fn, *args):
        """Call ``fn``; if the backing fd went bad, reopen the file once and retry.

        A network file system can invalidate open descriptors when its
        server goes away and comes back (GlusterFS answers EBADFD from then
        on).  The file is reopened by path, accepted only if it is the same
        inode, and put in place of the old descriptor with dup2(), so the
        engine and concurrent callers keep using the same fd number.
        """
        try:
            return await fn(*args)
        except OSError as exc:
            if exc.errno not in _REOPEN_ERRNOS or not await self.cache.run(_reopen, node):
                raise
            log.info("reopened %s after %s", node.path, errno.errorcode.get(exc.errno))
            return await fn(*args)

    def start_background(self, node: File) -> None:
        if self.cache.nursery is not None:
            node.background = True
            self.cache.nursery.start_soon(self._background, node)

    def note_written(self, node: File) -> None:
        """After a WRITE: once half the cache is dirty, write back now, in
        parallel streams, so that WRITEs do not end up evicting (writing
        back) synchronously.  A quarter was slower, and 32 MiB slower still:
        on 2 cores the write-back competes with the writer."""
        if not node.background and \
                self.cache.dirty_bytes(node.fid) >= self.config.cache_size // 2:
            self.start_background(node)

    async def _background(self, node: File) -> None:
        """Write back without fsync; errors stay for fsync/msync to report."""
        try:
            await self.writeback(node, durable=False)
        except (OSError, FsError) as exc:
            log.debug("background write-back of %s failed: %s", node.path, exc)
        finally:
            node.background = False
            self.ns.maybe_free(node)      # an unlinked shadow kept for its data

    async def flusher(self) -> None:
        """Every ``writeback_interval`` seconds, start writing back dirty files.

        Like the kernel's dirty_expire: a daemon crash loses at most that
        much of what was never msync'd.
        """
        if not self.config.writeback_interval:
            return
        while True:
            await trio.sleep(self.config.writeback_interval)
            for node in self.ns.files():
                if not node.background and node.writable \
                        and self.cache.dirty_bytes(node.fid):
                    self.start_background(node)
            self.publish_mtimes()

    def publish_mtimes(self) -> None:
        """Files written while open show those writes in their mtime now (see
        :meth:`File.wrote`): at most one drop of a file's page cache per tick."""
        for node in self.ns.files():
            node.publish_mtime()

    async def sync_all(self) -> list[tuple[str, Exception]]:
        """Write back and fsync every file; return the failures."""
        failed = []
        for node in self.ns.files():
            if node.writable and self.cache.dirty_bytes(node.fid):
                try:
                    await self.writeback(node, durable=True)
                except (OSError, FsError) as exc:
                    failed.append((node.path, exc))
        return failed

    async def close_all(self, written=None) -> None:
        """Unmount: write everything back, await ``written()`` if given (a
        coherent mount lets its grants go there), then close every backing
        file."""
        failed = await self.sync_all()
        for path, exc in failed:
            log.error("could not write back %s at unmount: %s", path, exc)
        if written is not None:
            await written()
        self.ns.close_all()


def _reopen(node: File) -> bool:
    flags = (os.O_RDWR if node.writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = os.open(node.path, flags)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != node.ident:
            return False
        os.dup2(fd, node.fd)
        return True
    finally:
        os.close(fd)
