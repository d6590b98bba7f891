"""Coherence across nodes: the daemon's half of the grant protocol.

A mount with ``-o coherence=etcd://...`` enters every file it opens or
creates in the cluster's book of grants (:mod:`shimfs.grants`), named by
the backing file's inode number, so that every node agrees which file is
which whatever path it mounts the shared file system at.  Grants are of
extents: ``EXTENT`` bytes of data each, and one more (``META``) for the
file's size and attributes.  While this node holds an extent it caches it
(in the kernel and in the daemon) as it always does; without one, nothing
of it is cached here, and a READ or WRITE of it waits (in a worker thread)
for a grant: Shared if no handle on this node is writable, else
Exclusive.  GETATTR, LOOKUP and open take the size Shared; a WRITE past the
end, truncate and fallocate take it Exclusive.  An open for writing turns
what this node holds Shared into Exclusive before it returns, because the
first store to a mapped page never reaches the daemon.

Giving a range up (asked by the book's thread, carried out here on the trio
thread):

1. waits of requests that touch the range are cancelled, and the compiled
   READ path (which answers only files this node holds whole) lets go;
2. ranged NOTIFY_INVAL_INODE of the range, from a worker: the kernel
   writes its dirty pages back as WRITEs, and drops the rest.  Requests
   that touch the range meanwhile are served from the daemon's cache,
   which is still the latest copy: a READ holds its page locked, and the
   invalidation waits for that lock, so a READ that waited for a grant
   here would deadlock.  The invalidation repeats until a pass saw no READ
   start;
3. the range counts as gone here (new requests wait for a new grant);
4. write-back and fsync of the backing file;
5. the daemon's pages of the range are dropped; then the book rewrites
   the keys and the asking node is granted.

An Exclusive holder with no writable handle left that is asked for Shared
writes back and keeps everything Shared, and its caches.  Runs on the trio
thread; the book's calls block and run in threads (docs/coherence.md).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import time

import trio

from .cache import AsyncCache
from .errors import FsError
from .grants import END, E, S, GiveUpFailed, GrantError, Grants, covers, cut, norm
from .nodes import File

log = logging.getLogger(__name__)

#: Longest wait for the file's prefetches to end before its pages are dropped.
PREFETCH_DRAIN = 5.0

_AT_EMPTY_PATH, _AT_STATX_FORCE_SYNC = 0x1000, 0x2000
_STATX_MTIME, _STATX_SIZE = 0x40, 0x200
_libc = None


def backing_stat(fd: int) -> tuple[int, int]:
    """(size, mtime_ns) of a backing file as its server has them now.

    A network file system's client caches attributes (GlusterFS's FUSE
    client for a second, NFS for longer), and another node's write is what
    a new grant must see: statx(AT_STATX_FORCE_SYNC) asks the server.
    Blocking: call it in a worker."""
    global _libc
    import ctypes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_FORCE_SYNC,
                   _STATX_SIZE | _STATX_MTIME, buf) != 0:
        e = ctypes.get_errno()
        if e != errno.ENOSYS:
            raise OSError(e, os.strerror(e))
        st = os.fstat(fd)
        return st.st_size, st.st_mtime_ns
    size = int.from_bytes(buf.raw[40:48], "little")
    sec = int.from_bytes(buf.raw[112:120], "little", signed=True)
    nsec = int.from_bytes(buf.raw[120:124], "little")
    return size, sec * 1_000_000_000 + nsec


#: Bytes of data per extent, the grain of a grant.  4 MiB: a kernel READ
#: (at most 1 MiB) and the kernel's read-around window stay inside one or
#: two extents, and a GB of data written elsewhere in the file is a few
#: hundred handoffs at most; finer extents would make a node sweeping
#: through a file another node holds pay a handoff (about 25 ms) per few
#: hundred KiB (docs/coherence.md, "Extents").
EXTENT = 4 << 20
#: The last extent is not data: it is the file's size and attributes.
#: GETATTR and LOOKUP take it Shared; a WRITE past the end, truncate and
#: fallocate take it Exclusive.
META = END - 1
#: (a, b) of the whole file, and of the size alone.
WHOLE, SIZE = (0, END), (META, END)


def extents(off: int, size: int) -> tuple[int, int]:
    """The data extents [a, b) that bytes [off, off+size) fall in."""
    a = min(off // EXTENT, META - 1)
    return a, min(max((off + max(size, 1) - 1) // EXTENT + 1, a + 1), META)


def byte_range(a: int, b: int) -> tuple[int, int]:
    """The bytes (offset, length) of data extents [a, b); length 0: to the end."""
    return a * EXTENT, 0 if b >= META else (b - a) * EXTENT


def describe(ivs: list) -> str:
    """A grant's ranges for ``shimfs stat``: "E" or "S" for the whole file,
    else e.g. "E 0-8M, S 8M-end, S size"."""
    if not ivs:
        return "none"
    if len(ivs) == 1 and (ivs[0][0], ivs[0][1]) == WHOLE:
        return ivs[0][2]
    parts = []
    for a, b, m in ivs:
        if a < META:
            end = "end" if b >= META else "%dM" % (b * EXTENT >> 20)
            parts.append("%s %dM-%s" % (m, a * EXTENT >> 20, end))
        if b > META:
            parts.append("%s size" % m)
    return ", ".join(parts)


class Grant:
    """This node's view of one backing file's grant, shared by every File
    node of that backing file in the mount.  Trio-thread data."""
    __slots__ = ("key", "nodes", "fresh", "giving", "strays", "reads", "reading", "lock",
                 "gen", "waiting", "pending_writers")

    def __init__(self, key: str):
        self.key = key
        self.nodes: list[File] = []
        # What this node may serve by: the book's grants once the daemon
        # has taken them in (_fresh), [(a, b, mode)] of extents.
        self.fresh: list = []
        self.giving: list = []           # (a, b) a give-up is dropping: served from the cache
        self.strays: list = []           # (a, b) served meanwhile outside any grant
        self.reads = 0                   # READs started (a give-up repeats while they come)
        self.reading = 0                 # READs under way
        self.lock = trio.Lock()          # one acquire at a time
        self.gen = 0                     # give-ups so far
        self.waiting: dict[trio.CancelScope, list] = {}    # waits a give-up cancels
        self.pending_writers = 0         # writable opens not counted in File.writers yet

    def writers(self) -> int:
        return sum(n.writers for n in self.nodes) + self.pending_writers

    def whole(self) -> bool:
        """Does this node hold all of the file (the compiled READ path may
        answer it)?"""
        return not self.giving and covers(self.fresh, 0, END, S)


class Cluster:
    """What a coherent mount does with its grants."""

    def __init__(self, grants: Grants, cache: AsyncCache, files, wb, coherence):
        self.grants = grants
        self.cache = cache
        self.files = files
        self.wb = wb
        self.coherence = coherence
        self.by_key: dict[str, Grant] = {}
        # Waits for grants may last up to coherence_wait: keep them out of
        # the foreground workers.
        self.limiter = trio.CapacityLimiter(64)
        self.token: trio.lowlevel.TrioToken | None = None
        self.failing: dict[str, str] = {}   # give-ups that failed, and why (logged once)
        self.counters = dict(give_up_bytes_written=0, give_up_seconds=0.0,
                             give_up_inval_passes=0, give_up_failures=0, grant_errors=0)
        grants.give_up_cb = self._give_up_thread
        grants.on_lost = self._lost_thread

    def start(self) -> None:
        """On the trio thread, before the first request."""
        self.token = trio.lowlevel.current_trio_token()

    async def close(self) -> None:
        """Unmount, once everything is written back: the grants go with the
        lease.  In a thread: a give-up under way needs the trio thread."""
        await trio.to_thread.run_sync(self.grants.close)

    # -- joining -----------------------------------------------------------
    async def join(self, node: File, write: bool) -> Grant:
        """Enter an opened file in the protocol (once), and hold its size
        grant (Shared at least).  An open for writing makes what this node holds Shared Exclusive before it
        returns: a writable mapping dirties cached pages without telling
        the daemon, so a node with a writable handle holds no data Shared."""
        g = node.grant
        if g is None:
            key = str(node.ident[1])
            g = self.by_key.get(key)
            if g is None:
                g = self.by_key[key] = Grant(key)
            g.nodes.append(node)
            node.grant = g
            # Pushes would put pages into the kernel outside any grant.
            await self.cache.close_gate(node.fid)
        # The size: the kernel keeps the attributes it is given, and a node
        # holding the size grant is asked (and drops them) before another
        # changes it.
        if self.state(g, self.for_size()) is None:
            await self.need(g, self.for_size())
        if write:
            g.pending_writers += 1
            try:
                while True:
                    shared = [(a, min(b, META), E) for a, b, m in g.fresh if m == S and a < META]
                    if not shared:
                        break
                    await self.need(g, shared)
            finally:
                g.pending_writers -= 1
        return g

    def leave(self, node: File) -> None:
        """The file is freed: its grant goes back to the book."""
        g = node.grant
        if g is None:
            return
        node.grant = None
        self.cache.open_gate(node.fid)
        g.nodes.remove(node)
        if not g.nodes:
            del self.by_key[g.key]
            if self.cache.nursery is not None:
                self.cache.nursery.start_soon(self._release, g.key)

    async def _release(self, key: str) -> None:
        try:
            await trio.to_thread.run_sync(self.grants.release, key, limiter=self.limiter)
        except GrantError as exc:           # it goes with the lease
            log.debug("release of %s: %s", key, exc)

    # -- what a request needs ------------------------------------------------
    def for_read(self, g: Grant, off: int, size: int) -> list:
        a, b = extents(off, size)
        return [(a, b, E if g.writers() else S), (META, END, S)]

    @staticmethod
    def for_write(off: int, size: int, grows: bool) -> list:
        a, b = extents(off, size)
        return [(a, b, E), (META, END, E if grows else S)]

    @staticmethod
    def for_size(write: bool = False) -> list:
        return [(META, END, E if write else S)]

    @staticmethod
    def for_truncate(size: int, known: int) -> list:
        """Everything from the new end on (the pages past it go on every
        node), and the size."""
        return [(extents(min(size, known), 1)[0], END, E)]

    def state(self, g: Grant, req: list) -> str | None:
        """"held": serve ``req`` now; "giving": a give-up of part of it is
        under way, serve it from the cache without read-ahead (see need());
        None: wait for a grant."""
        if g.giving and any(x < b and a < y for a, b, _ in req for x, y in g.giving):
            for a, b, m in req:
                if not any(x <= a and b <= y for x, y in g.giving) \
                        and not covers(g.fresh, a, b, m):
                    g.strays.append((a, b))
            return "giving"
        if all(covers(g.fresh, a, b, m) for a, b, m in req):
            return "held"
        return None

    async def need(self, g: Grant, req: list) -> str:
        """Return once ``req`` ([(a, b, mode)] of extents) may be served here
        (``state``); FsError with the book's errno (ETIMEDOUT, ENOTCONN,
        EACCES) if it cannot.

        A give-up of an overlapping range that starts meanwhile cancels the
        wait, also a wait for ``g.lock``: the request may hold a kernel page
        lock that the give-up's invalidation waits for, and is served from
        the cache instead.  The abandoned thread finishes on its own."""
        while True:
            s = self.state(g, req)
            if s is not None:
                return s
            with trio.CancelScope() as scope:
                g.waiting[scope] = req
                try:
                    async with g.lock:
                        if self.state(g, req) is None:
                            await self._acquire(g, req)
                finally:
                    del g.waiting[scope]

    async def _acquire(self, g: Grant, req: list) -> None:
        gen = g.gen
        try:
            await trio.to_thread.run_sync(
                functools.partial(self.grants.acquire, g.key, ranges=req),
                limiter=self.limiter, abandon_on_cancel=True)
        except GrantError as exc:
            self.counters["grant_errors"] += 1
            raise FsError(exc.errno, "no grant of %s: %s"
                          % (g.nodes[0].path if g.nodes else g.key, exc)) from None
        if g.gen != gen:
            return                          # a give-up came between: look again
        runs = self.grants.runs(g.key)
        await self._fresh(g, runs)
        if g.gen == gen:
            g.fresh = runs
            if g.whole():
                self._wire_add(g)

    async def _fresh(self, g: Grant, runs: list) -> None:
        """Granted what this node did not hold: what it knew of those
        ranges may be old.  The daemon's pages there go (none should be
        left, but a prefetch of a neighbouring range may have read them),
        and a new size grant takes the size and mtime from the backing
        file, as a close-to-open reload does (the kernel's attributes went
        at the give-up; invalidating them again here would make it throw
        away the GETATTR reply this grant may be taken for, since
        fuse_change_attributes drops a reply older than the last
        invalidation)."""
        cache = self.cache
        new = [(a, b) for a, b, _ in runs]
        for a, b, _ in g.fresh:
            new = [(x, y) for x, y, _ in cut([(x, y, "") for x, y in new], a, b)]
        if not new:
            return
        data = [(a, min(b, META)) for a, b in new if a < META]
        if data:
            await self._drain(g)
            for node in list(g.nodes):
                for a, b in data:
                    off, n = byte_range(a, b)
                    cache.invalidate(node.fid, off, n or max(cache.size(node.fid) + 1 - off, 0))
        if any(b > META for _, b in new):
            for node in list(g.nodes):
                size, mtime_ns = await cache.run(backing_stat, node.fd)
                self.coherence.adopt_size(node, size, mtime_ns)

    def _wire_add(self, g: Grant) -> None:
        wire = self.cache.wire
        for h in self.files.handles.values():
            if h.node.grant is g:
                wire.add(h.fh, h.node.fid, h.stream is None, asked=h.narrow)
                if h.stream is not None:
                    wire.set_trigger(h.fh, self.cache.trigger(h.stream))

    def _wire_remove(self, g: Grant) -> None:
        wire = self.cache.wire
        for h in list(self.files.handles.values()):
            if h.node.grant is g:
                wire.remove(h.fh)

    # -- giving up ------------------------------------------------------------
    def _give_up_thread(self, key: str, ranges: list, wanted: str) -> str | None:
        """The book's callback, on its thread.  A give-up that fails (its
        write-back met ENOSPC, EIO, a lost backing file) keeps the grant,
        the pages and the dirty data: GiveUpFailed has the book serve the
        ask again at its next round, and the asker times out if it never
        succeeds.  Logged once per kind of failure."""
        if self.token is None:
            return None
        try:
            kept = trio.from_thread.run(self._give_up, key, ranges, wanted, trio_token=self.token)
        except Exception as exc:
            g = self.by_key.get(key)
            what = "%s: %s" % (type(exc).__name__, exc)
            if self.failing.get(key) != what:
                self.failing[key] = what
                log.warning("could not give up the grant of %s (%s): it is kept, with the "
                            "dirty data, and given up once the write-back succeeds",
                            g.nodes[0].path if g is not None and g.nodes else key, what)
            raise GiveUpFailed(what) from None
        if self.failing.pop(key, None) is not None:
            log.info("gave up the grant of %s after all", key)
        return kept

    async def _give_up(self, key: str, ranges: list, wanted: str | None) -> str | None:
        """Let go of extents ``ranges`` [(a, b)] (``wanted``: what the
        askers want there; None: the lease was lost)."""
        g = self.by_key.get(key)
        if g is None:
            return None
        start = time.monotonic()
        old = list(g.fresh)
        g.gen += 1
        for scope, req in list(g.waiting.items()):      # see need()
            if any(x < b and a < y for a, b, _ in req for x, y in ranges):
                scope.cancel()
        try:
            if wanted == S and not g.writers():
                # Downgrade: nobody here can dirty a page any more, so what
                # is cached stays true once it is in the backing file.
                await self._write_back(g)
                g.fresh = norm([(a, b, S) for a, b, _ in g.fresh])
                return S
            was_whole = g.whole()
            g.giving = list(ranges)
            for a, b in ranges:
                g.fresh = cut(g.fresh, a, b)
            if was_whole:
                self._wire_remove(g)
            try:
                await self._invalidate_kernel(g, ranges)
            finally:
                g.giving = []
                g.strays = []
            await self._write_back(g)
            await self._drop(g, ranges)
            return None
        except BaseException:
            self.counters["give_up_failures"] += 1
            if wanted is not None:
                # Asked: the grant stays this node's, and so does the data.
                g.fresh = old
                if g.whole():
                    self._wire_add(g)
            # (A lost lease: the grants are gone in the book whatever
            # happened here.  The dirty data stays for a retry, and the
            # next request waits for a new grant.)
            raise
        finally:
            self.counters["give_up_seconds"] += time.monotonic() - start

    async def _invalidate_kernel(self, g: Grant, ranges: list) -> None:
        """Ranged NOTIFY_INVAL_INODE of ``ranges`` (and of what was served
        outside any grant meanwhile) until a pass saw no READ start; the
        size extent invalidates the kernel's attributes."""
        cache = self.cache
        while True:
            before = g.reads
            todo, g.strays = list(ranges) + g.strays, []
            spans = set()
            for a, b in todo:
                if a < META:
                    spans.add(byte_range(a, min(b, META)))
                if b > META:
                    spans.add((-1, 0))
            for node in list(g.nodes):
                for off, n in sorted(spans):
                    try:
                        await cache.run(cache.kernel.inval_range, node.ino, off, n)
                    except OSError as exc:      # ENOENT: the kernel forgot the inode
                        log.debug("invalidation of %s: %s", node.path, exc)
            self.counters["give_up_inval_passes"] += 1
            if g.reads == before and not g.reading and not g.strays:
                return

    async def _write_back(self, g: Grant) -> None:
        for node in list(g.nodes):
            dirty = self.cache.dirty_bytes(node.fid)
            await self.wb.writeback(node, durable=True)
            self.counters["give_up_bytes_written"] += dirty

    async def _drain(self, g: Grant) -> None:
        """Until no prefetch of the file can still land pages read before
        another node's writes (at most PREFETCH_DRAIN)."""
        cache = self.cache
        deadline = trio.current_time() + PREFETCH_DRAIN
        while any(cache.prefetches_of(n.fid) for n in g.nodes) \
                and trio.current_time() < deadline:
            await trio.sleep(0.005)

    async def _drop(self, g: Grant, ranges: list) -> None:
        """Drop the daemon's pages of the data extents given up."""
        cache = self.cache
        await self._drain(g)
        for node in list(g.nodes):
            for a, b in ranges:
                if a < META:
                    off, n = byte_range(a, min(b, META))
                    cache.invalidate(node.fid, off, n or max(cache.size(node.fid) + 1 - off, 0))

    # -- losing the lease ------------------------------------------------------
    def _lost_thread(self, keys: list[str]) -> None:
        if self.token is None:
            return
        for key in keys:
            try:
                trio.from_thread.run(self._give_up, key, [WHOLE], None, trio_token=self.token)
            except Exception as exc:
                log.error("dropping the caches of %s after the lease was lost: %s", key, exc)

    def stats(self) -> dict:
        return dict(self.grants.stats(), **self.counters,
                    coherent_files=len(self.by_key), coherence_node=self.grants.node)


def from_config(config) -> Grants:
    """The book a mount's options describe, started (lease taken, presence
    written), or a one-line UserError: a bad address, a refused user, etcd
    not answering."""
    from .errors import UserError
    from .grants import Security
    password = None
    if config.coherence_password_file:
        try:
            with open(config.coherence_password_file) as f:
                password = f.read().strip("\r\n")
        except OSError as exc:
            raise UserError("coherence_password_file: %s" % exc.strerror, 1) from None
    security = Security(ca=config.coherence_ca, cert=config.coherence_cert,
                        key=config.coherence_key, user=config.coherence_user, password=password)
    grants = Grants(config.coherence, prefix=config.coherence_prefix,
                    node=config.coherence_node, ttl=config.coherence_ttl,
                    wait=config.coherence_wait, security=security)
    try:
        grants.start()
    except GrantError as exc:
        raise UserError("coherence=%s: %s" % (config.coherence, exc.strerror or exc), 1) from None
    return grants
