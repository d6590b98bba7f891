"""Coherence across nodes: the daemon's half of the grant protocol.

A mount with ``-o coherence=etcd://...`` enters every file it opens or
creates in the cluster's book of grants (:mod:`shimfs.grants`), named by
the backing file's inode number, so that every node agrees which file is
which whatever path it mounts the shared file system at.  While this node
holds a grant of a file it caches the file (in the kernel and in the
daemon) as it always does; without one, nothing of the file is cached here,
and a READ, WRITE, truncate or stat of it waits (in a worker thread) for a
grant: Shared if no handle on this node is writable, else Exclusive.  An
open for writing takes Exclusive before it returns, because the first store
to a mapped page never reaches the daemon.

Giving a grant up (asked by the book's thread, carried out here on the trio
thread):

1. the compiled READ path stops answering the file's READs;
2. ranged NOTIFY_INVAL_INODE of the whole file, from a worker: the kernel
   writes its dirty pages back as WRITEs, and drops the rest.  READs that
   arrive meanwhile are served from the daemon's cache, which is still the
   latest copy: a READ holds its page locked, and the invalidation waits
   for that lock, so a READ that waited for a grant here would deadlock.
   The invalidation repeats until a pass saw no READ start;
3. the grant counts as gone here (new READs wait for a new one);
4. write-back and fsync of the backing file;
5. the daemon's pages of the file are dropped; then the book deletes the
   keys and the asking node is granted.

An Exclusive holder with no writable handle left that is asked for Shared
writes back and keeps a Shared grant, and its caches.  Runs on the trio
thread; the book's calls block and run in threads (docs/coherence.md).
"""
from __future__ import annotations

import errno
import logging
import os
import time

import trio

from .cache import AsyncCache
from .errors import FsError
from .grants import E, S, GiveUpFailed, GrantError, Grants
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


class Grant:
    """This node's view of one backing file's grant, shared by every File
    node of that backing file in the mount.  Trio-thread data."""
    __slots__ = ("key", "nodes", "mode", "invalidating", "reads", "reading", "lock",
                 "given", "waiting")

    def __init__(self, key: str):
        self.key = key
        self.nodes: list[File] = []
        self.mode: str | None = None     # what this node may cache by
        self.invalidating = False        # a give-up is dropping the kernel's pages
        self.reads = 0                   # READs started (a give-up repeats while they come)
        self.reading = 0                 # READs under way
        self.lock = trio.Lock()          # one acquire at a time
        self.given = 0                   # the newest grant serial a give-up took away
        self.waiting: set[trio.CancelScope] = set()    # waits a give-up cancels

    def covers(self, write: bool) -> bool:
        """May a READ (or a WRITE) of the file be served now?"""
        return self.invalidating or self.mode == E or (self.mode == S and not write)

    def writers(self) -> int:
        return sum(n.writers for n in self.nodes)


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
    async def join(self, node: File) -> Grant:
        """Enter an opened file in the protocol (once)."""
        g = node.grant
        if g is not None:
            return g
        key = str(node.ident[1])
        g = self.by_key.get(key)
        if g is None:
            g = self.by_key[key] = Grant(key)
        g.nodes.append(node)
        node.grant = g
        # Pushes would put pages into the kernel outside any grant.
        await self.cache.close_gate(node.fid)
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

    # -- taking ------------------------------------------------------------
    async def need(self, g: Grant, write: bool) -> None:
        """Return once ``g`` covers a READ (``write``: a WRITE) here; FsError
        with the book's errno (ETIMEDOUT, ENOTCONN, EACCES) if it cannot.

        A give-up that starts meanwhile cancels the wait: the request may
        hold a kernel page lock that the give-up's invalidation waits for,
        and is served from the cache instead (``Grant.covers``).  The
        abandoned thread finishes on its own."""
        async with g.lock:
            while not g.covers(write):
                mode = E if write or g.writers() else S
                was = g.mode
                with trio.CancelScope() as scope:
                    g.waiting.add(scope)
                    try:
                        serial = await trio.to_thread.run_sync(
                            self.grants.acquire, g.key, mode, limiter=self.limiter,
                            abandon_on_cancel=True)
                    except GrantError as exc:
                        self.counters["grant_errors"] += 1
                        raise FsError(exc.errno, "no grant of %s: %s"
                                      % (g.nodes[0].path if g.nodes else g.key, exc)) from None
                    finally:
                        g.waiting.discard(scope)
                if scope.cancelled_caught:
                    continue
                held = self.grants.held(g.key)
                if not serial or serial <= g.given or held is None:
                    continue                # taken away again before we got here
                if held == S and (write or g.writers()):
                    continue                # a give-up downgraded it meanwhile
                if was is None:
                    await self._fresh(g)
                    if serial <= g.given:
                        continue
                g.mode = held
                self._wire_add(g)

    async def _fresh(self, g: Grant) -> None:
        """Granted after holding nothing: what this node knew of the file
        may be old.  Take it again from the backing file, as a close-to-open
        reload does (the kernel's pages and attributes went at the give-up;
        invalidating its attributes again here would make it throw away the
        GETATTR reply this grant may be taken for, since
        fuse_change_attributes drops a reply older than the last
        invalidation, and a mapping would keep the old size)."""
        cache = self.cache
        for node in list(g.nodes):
            size, mtime_ns = await cache.run(backing_stat, node.fd)
            if not cache.dirty_bytes(node.fid):
                self.coherence.adopt(node, size, mtime_ns)

    def _wire_add(self, g: Grant) -> None:
        wire = self.cache.wire
        for h in self.files.handles.values():
            if h.node.grant is g:
                wire.add(h.fh, h.node.fid, h.stream is None)
                if h.stream is not None:
                    wire.set_trigger(h.fh, self.cache.trigger(h.stream))

    def _wire_remove(self, g: Grant) -> None:
        wire = self.cache.wire
        for h in list(self.files.handles.values()):
            if h.node.grant is g:
                wire.remove(h.fh)

    # -- giving up ------------------------------------------------------------
    def _give_up_thread(self, key: str, wanted: str) -> str | None:
        """The book's callback, on its thread.  A give-up that fails (its
        write-back met ENOSPC, EIO, a lost backing file) keeps the grant,
        the pages and the dirty data: GiveUpFailed has the book serve the
        ask again at its next round, and the asker times out if it never
        succeeds.  Logged once per kind of failure."""
        serial = self.grants.serial(key)
        if self.token is None:
            return None
        try:
            kept = trio.from_thread.run(self._give_up, key, wanted, serial, trio_token=self.token)
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

    async def _give_up(self, key: str, wanted: str | None, serial: int) -> str | None:
        g = self.by_key.get(key)
        if g is None:
            return None
        start = time.monotonic()
        mode = g.mode
        given = g.given
        g.given = max(g.given, serial)
        for scope in list(g.waiting):       # see need()
            scope.cancel()
        try:
            if mode == E and wanted == S and not g.writers():
                # Downgrade: nobody here can dirty a page any more, so what
                # is cached stays true once it is in the backing file.
                await self._write_back(g)
                g.mode = S
                return S
            g.invalidating = True
            self._wire_remove(g)
            try:
                await self._invalidate_kernel(g)
            finally:
                g.invalidating = False
            g.mode = None
            await self._write_back(g)
            await self._drop(g)
            return None
        except BaseException:
            self.counters["give_up_failures"] += 1
            g.mode, g.given = mode, given
            if mode is not None:
                self._wire_add(g)
            raise
        finally:
            self.counters["give_up_seconds"] += time.monotonic() - start

    async def _invalidate_kernel(self, g: Grant) -> None:
        """Whole-file NOTIFY_INVAL_INODE until a pass saw no READ start."""
        cache = self.cache
        while True:
            before = g.reads
            for node in list(g.nodes):
                try:
                    await cache.run(cache.kernel.inval_range, node.ino, 0, 0)
                except OSError as exc:      # ENOENT: the kernel forgot the inode
                    log.debug("invalidation of %s: %s", node.path, exc)
            self.counters["give_up_inval_passes"] += 1
            if g.reads == before and not g.reading:
                return

    async def _write_back(self, g: Grant) -> None:
        for node in list(g.nodes):
            dirty = self.cache.dirty_bytes(node.fid)
            await self.wb.writeback(node, durable=True)
            self.counters["give_up_bytes_written"] += dirty

    async def _drop(self, g: Grant) -> None:
        """Drop the daemon's pages, once no prefetch of the file can still
        land pages read before the other node's writes."""
        cache = self.cache
        deadline = trio.current_time() + PREFETCH_DRAIN
        while any(cache.prefetches_of(n.fid) for n in g.nodes) \
                and trio.current_time() < deadline:
            await trio.sleep(0.005)
        for node in list(g.nodes):
            cache.invalidate(node.fid, 0, cache.size(node.fid) + 1)

    # -- losing the lease ------------------------------------------------------
    def _lost_thread(self, keys: list[str]) -> None:
        if self.token is None:
            return
        serial = self.grants.last_serial
        for key in keys:
            try:
                trio.from_thread.run(self._give_up, key, None, serial, trio_token=self.token)
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
