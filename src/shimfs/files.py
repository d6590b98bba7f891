"""Open files: handles, READ and WRITE, truncate and attribute changes,
flush, fsync and release.

Each open handle has a read-ahead stream (none for files in memory).  READ
and WRITE go straight to the façade, which serves what it can from the cache
on the trio thread and sends the rest to worker threads.  A writable handle
closes the file's push gate until it is released, because the kernel may
then hold dirty pages that a push would overwrite (cache.py).  A file whose
mapping was touched at random (the wire refused its page faults'
read-arounds) is opened with the narrow read-around window
(``tuning.Window``) until a handle of it is seen scanning.  Runs on the
trio thread.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time

import trio

from .cache import AsyncCache
from .config import Config
from .credentials import Credentials
from .errors import FsError
from .kernel import AHEAD_OPEN
from .names import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOCATE_MODES
from .namespace import Namespace, _close_ahead
from .nodes import Attr, Ctx, Dir, File, Handle
from .tuning import NARROW_HOLD
from .writeback import WriteBack

log = logging.getLogger(__name__)

#: Read-arounds refused for a file since its last open that make its next
#: opens narrow: a scan's first fault may be refused once, random touches
#: are refused about once each.
RANDOM_REFUSALS = 16
#: READs a narrow handle's read-ahead stream sees in sequence (a scan) that
#: give its file the mount's window back at the next open.
SCAN_READS = 8


class OpenFiles:
    """The handle table and the data operations on it."""

    def __init__(self, config: Config, cache: AsyncCache, ns: Namespace, creds: Credentials,
                 wb: WriteBack):
        self.config = config
        self.cache = cache
        self.ns = ns
        self.creds = creds
        self.wb = wb
        self.handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        #: cluster.Cluster on a coherent mount (Vfs.attach_cluster), else None
        self.cluster = None
        #: tuning.Window once the mount's read_ahead_kb is set (root), else None
        self.window = None
        self.narrow_opens = 0

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def streams(self, node: File) -> list:
        """The read-ahead streams of the handles open on ``node``."""
        return [h.stream for h in self.handles.values()
                if h.node is node and h.stream is not None]

    async def open_handle(self, node: File, writable: bool) -> int:
        if writable:
            # the kernel may now hold dirty pages: no more pushes (until release)
            await self.cache.close_gate(node.fid)
        fh = next(self._fh)
        stream = self.cache.stream() if self.config.read_ahead and not node.in_memory else None
        narrow = self._narrow(node)
        self.handles[fh] = Handle(fh, node, stream, writable, narrow)
        node.opens += 1
        node.writers += writable
        g = node.grant
        if g is None or g.whole():
            # WRITEs (and RELEASEs) in C only off coherence: a coherent WRITE
            # needs its grant
            self.cache.wire.add(fh, node.fid, stream is None,
                                writes=writable and node.writable and g is None,
                                release=not writable and g is None, asked=narrow)
        return fh

    def _narrow(self, node: File) -> bool:
        """Whether this open of ``node`` gets the narrow read-around window:
        its faults' read-arounds were refused since its last open (the
        wire counts them in the engine), or before and no scan was seen
        since.  The window stays narrow for ``NARROW_HOLD`` after the
        handler returns, long enough for the kernel to copy it into the
        file it opens; the wire then serves the handle's small READs as
        asked, one per fault."""
        refused = self.cache.read_arounds_refused(node.fid)
        if refused - node.refused_seen >= RANDOM_REFUSALS:
            node.random_faults = True
        node.refused_seen = refused
        nursery = self.cache.nursery
        if not node.random_faults or self.window is None or nursery is None \
                or not self.window.narrow():
            return False
        self.narrow_opens += 1
        nursery.start_soon(self._widen_later)
        return True

    async def _widen_later(self) -> None:
        try:
            await trio.sleep(NARROW_HOLD)
        finally:
            self.window.widen()

    @staticmethod
    def _close_stream(h: Handle) -> None:
        """A handle goes: its stream closes, and a narrow handle whose
        stream saw a scan gives its file the mount's window back."""
        if h.stream is None:
            return
        if h.narrow and h.stream.sequential >= SCAN_READS:
            h.node.random_faults = False
        h.stream.close()

    def released(self) -> None:
        """What :meth:`release` does for the handles whose RELEASE the wire
        answered (``Wire.take_released``: read-only, their file clean then):
        they go, and their node's count of opens with them.  Called before
        each open (so a node's ``opens`` counts no handle closed before it)
        and by a task soon after such RELEASEs (mount.py)."""
        for fh in self.cache.wire.take_released():
            h = self.handles.pop(fh, None)
            if h is None:
                continue
            self._close_stream(h)
            node = h.node
            node.opens -= 1
            self.ns.maybe_free(node)

    def written(self, fh: int) -> None:
        """The compiled wire took WRITEs of ``fh`` (Wire.take): what
        :meth:`write` does after each, done once for all of them."""
        h = self.handles.get(fh)
        if h is not None and self.cache.wire.written(fh):
            h.node.wrote()
            self.wb.note_written(h.node)

    def take_written(self, node: File) -> None:
        """:meth:`written` for every writable handle of ``node`` now,
        before its note arrives: a GETATTR shows the ctime of every WRITE
        answered before it."""
        for h in self.handles.values():
            if h.node is node and h.writable:
                self.written(h.fh)

    async def join(self, node: File, write: bool) -> None:
        """On a coherent mount: enter ``node`` in the protocol, and hold the
        grant an open needs (Exclusive for writing: a writable mapping
        dirties pages without telling the daemon)."""
        if self.cluster is not None:
            await self.cluster.join(node, write)

    async def open(self, ino: int, flags: int, ctx: Ctx) -> int:
        """Open a file; returns the handle.  See also ``Coherence.revalidate``."""
        # What the wire opened for this OPEN, if anything (Wire.expect):
        # ensure_open takes it, or closes it.
        ahead = self.cache.wire.take_ahead(AHEAD_OPEN, ino, ctx.uid, ctx.gid, ctx.pid)
        self.released()
        try:
            node = self.ns.file(ino)
        except BaseException:
            _close_ahead(ahead)
            raise
        if node.opened:             # nothing for it to stand in for
            _close_ahead(ahead)
            ahead = None
        # An unopened file (-o mirror) is checked by ensure_open, which opens
        # it and compares the inode: one backing round trip instead of two.
        # An opened one by still_bound, whose stat revalidate then uses.
        node.checked = None
        if node.opened and node.parent is not None \
                and await self.ns.still_bound(node, ctx) is not node:
            # The kernel retries a path open that fails with ESTALE once, after
            # a fresh LOOKUP (LOOKUP_REVAL): that finds the file now at the
            # name, or none, and O_CREAT then creates a new backing file.
            raise FsError(errno.ESTALE, "backing file %s was removed or replaced" % node.path)
        proven = await self.ns.ensure_open(node, ctx, ahead)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and not node.writable:
            raise FsError(errno.EACCES, "backing file %s is read-only" % node.path)
        want = os.R_OK if not writable else (os.W_OK if flags & os.O_ACCMODE == os.O_WRONLY
                                             else os.R_OK | os.W_OK)
        if want & ~proven:      # not shown by an open as this user just now
            await self.creds.check_reachable(node, ctx, want)
        await self.join(node, writable)
        if flags & os.O_TRUNC and writable:
            await self.truncate(node, 0)
        return await self.open_handle(node, writable)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handle(fh)
        node = h.node
        stream = h.stream
        g = node.grant
        if g is not None:
            # A coherent file: under its grant; during a give-up, from the
            # cache and without read-ahead, counted (cluster.py).
            cl = self.cluster
            req = cl.for_read(g, off, size)
            if (cl.state(g, req) or await cl.need(g, req)) == "giving":
                stream = None
            g.reads += 1
            g.reading += 1
        try:
            data = await self.wb.with_reopen(node, self.cache.read, node.fid, node.ino, stream,
                                             off, size, node.in_memory)
        finally:
            if g is not None:
                g.reading -= 1
        if stream is not None:
            # the compiled path answers cached READs until the policy wants
            # to see the reader again (readahead.Stream.trigger)
            self.cache.wire.set_trigger(fh, self.cache.trigger(stream))
        return data

    def noted(self, fh: int, off: int, size: int) -> None:
        """The compiled path answered a READ of ``fh`` past its trigger from
        the cache (Wire.take): show it to the read-ahead policy, as
        :meth:`read` does, and set the next trigger.  A coherent file's
        READ is shown only while its grant holds the range; otherwise the
        handle's next miss reaches :meth:`read`, which waits for it."""
        h = self.handles.get(fh)
        if h is None or h.stream is None:
            return
        g = h.node.grant
        if g is not None and self.cluster.state(g, self.cluster.for_read(g, off, size)) != "held":
            return
        self.cache.observe(h.node.fid, h.node.ino, h.stream, off, size)
        self.cache.wire.set_trigger(fh, self.cache.trigger(h.stream))

    async def write(self, fh: int, off: int, data: bytes) -> int:
        node = self.handle(fh).node
        if not node.writable:
            raise FsError(errno.EBADF)
        g = node.grant
        if g is not None:
            await self._need_write(g, node, off, len(data))
        n = await self.wb.with_reopen(node, self.cache.write, node.fid, off, data)
        node.wrote()
        self.wb.note_written(node)
        return n

    async def _need_write(self, g, node: File, off: int, size: int) -> None:
        """A coherent file: hold the extents of a write, and the size
        Exclusive if the write may grow the file (as the size stands once
        the size grant is held)."""
        cl = self.cluster
        while True:
            grows = off + size > self.cache.size(node.fid)
            await cl.need(g, cl.for_write(off, size, grows))
            if grows or off + size <= self.cache.size(node.fid):
                return

    async def fsync(self, fh: int, datasync: bool = False) -> None:
        await self.wb.writeback(self.handle(fh).node, durable=True)

    async def flush(self, fh: int) -> None:
        await self.wb.writeback_if_dirty(self.handle(fh).node)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if self.cache.wire.remove(fh):
            h.node.wrote()              # WRITEs the wire took that Python has not seen
        self._close_stream(h)
        node = h.node
        try:
            await self.wb.writeback_if_dirty(node)
            if h.writable and node.writers == 1 and node.publish_mtime():
                # The kernel drops a file's pages when it sees a new mtime
                # (auto_inval_data).  Have it ask at the next stat rather
                # than up to TIMEOUT later, so that pages pushed after that
                # stat (shimfs prefetch stats first) are not dropped.  This
                # is done before the last writer counts as gone: pushes wait
                # for that, and so does a caller watching open_for_writing.
                try:
                    await self.cache.run(self.cache.kernel.inval_range, node.ino, -1, 0)
                except OSError as exc:
                    log.debug("attribute invalidation of %s: %s", node.path, exc)
        finally:
            node.opens -= 1
            if h.writable:
                self.cache.open_gate(node.fid)
                node.writers -= 1
                if not node.writers:
                    node.publish_mtime()     # when the write-back above failed
            self.ns.maybe_free(node)

    async def truncate(self, node: File, size: int) -> None:
        if size < 0:
            raise FsError(errno.EINVAL)
        if not node.writable:
            raise FsError(errno.EACCES)
        g = node.grant
        if g is not None:
            cl = self.cluster
            await cl.need(g, cl.for_size())
            await cl.need(g, cl.for_truncate(size, self.cache.size(node.fid)))
        fd = node.fd

        def resize():
            before = os.fstat(fd).st_size
            os.ftruncate(fd, size)
            return before, os.fstat(fd)
        async with self.cache.pushes_paused(node.fid), node.io_lock:
            before, st = await self.cache.run(resize)
            # Growing the file from the larger of both ends (the backing file
            # may have grown elsewhere): what lies past it is zeros that this
            # node made, and a fault there need not read them (FileRec.zero).
            self.cache.truncate(node.fid, size, max(before, self.cache.size(node.fid)))
            node.seen = (st.st_size, st.st_mtime_ns)
        node.touch()

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        """FUSE FALLOCATE.  The modes a backing file system may support are
        passed on: 0 (allocate; the file grows to cover the range),
        KEEP_SIZE, and PUNCH_HOLE|KEEP_SIZE (the range reads as zeros: the
        kernel has written its dirty pages of it back and drops them after;
        the daemon's are punched too).  Any other mode is EOPNOTSUPP."""
        h = self.handle(fh)
        node = h.node
        if mode not in FALLOCATE_MODES:
            raise FsError(errno.EOPNOTSUPP, "fallocate mode %#x is not passed on" % mode)
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if not h.writable or not node.writable:
            raise FsError(errno.EBADF)
        g = node.grant
        if g is not None:
            await self._need_write(g, node, offset, length)
            req = self.cluster.for_size(True)
            if self.cluster.state(g, req) is None:
                await self.cluster.need(g, req)
        fd = node.fd

        def allocate():
            before = os.fstat(fd).st_size
            self.cache.fallocate(fd, mode, offset, length)
            return before, os.fstat(fd)
        async with self.cache.pushes_paused(node.fid), node.io_lock:
            before, st = await self.cache.run(allocate)
            if mode & FALLOC_FL_PUNCH_HOLE:
                self.cache.punch(node.fid, offset, length)
            elif not mode & FALLOC_FL_KEEP_SIZE and offset + length > self.cache.size(node.fid):
                # grown with zeros, as by a truncate up (known zeros)
                self.cache.truncate(node.fid, offset + length,
                                    max(before, self.cache.size(node.fid)))
            node.seen = (st.st_size, st.st_mtime_ns)
        node.touch()

    async def setattr(self, ino: int, ctx: Ctx, size=None, mode=None, uid=None, gid=None,
                      atime_ns=None, mtime_ns=None) -> Attr:
        node = self.ns.node(ino)
        if isinstance(node, File):
            await self.ns.ensure_open(node, ctx)
            if size is not None:
                await self.creds.check_reachable(node, ctx, os.W_OK)
                await self.truncate(node, size)
            if mode is not None:
                await self.cache.run(os.fchmod, node.fd, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                await self.cache.run(os.fchown, node.fd,
                                     -1 if uid is None else uid, -1 if gid is None else gid)
            if atime_ns is not None or mtime_ns is not None:
                a = node.atime_ns if atime_ns is None else atime_ns
                m = node.mtime_ns if mtime_ns is None else mtime_ns
                await self.cache.run(lambda: os.utime(node.fd, ns=(a, m)))
        elif isinstance(node, Dir) and node is not self.ns.root:
            path = node.backing_path()
            if mode is not None:
                await self.creds.as_user(ctx, os.chmod, path, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                await self.creds.as_user(ctx, os.chown, path,
                                         -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
            if isinstance(node, File):
                node.mtime_due = False      # set on purpose: release keeps it
        node.ctime_ns = time.time_ns()
        return self.ns.attr(node)
