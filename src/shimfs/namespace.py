"""The namespace: directories, shadows and created files, by name and inode.

The namespace lives in memory, like the original module's (a ramfs whose
files point at backing files), and starts empty at every mount:

* ``symlink(name -> target)`` opens the target and makes a *shadow*: a regular
  file whose bytes are the target's.  Removing it closes the backing file and
  never deletes it.
* ``create`` and ``mkdir`` create the backing file or directory under the
  backing directory, at the same relative path; removing them removes it.
* ``rename`` moves entries; for created files and directories it renames the
  backing path too, so the backing tree mirrors the mount.

Everything here runs on the trio thread.  A change to the tables happens
between awaits, and each operation that awaited looks its names up again
before it changes them (docs/design.md, "Namespace").
"""
from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from typing import NamedTuple

from .cache import AsyncCache
from .kernel import AHEAD_LOOKUP
from .config import Config
from .credentials import Credentials
from .errors import FsError
from .listing import Listing
from .names import BLKSIZE, READDIR_ENTRIES, ROOT_INODE
from .nodes import Attr, Ctx, Dir, DirHandle, File, Node

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


#: ``_stat_ahead``: no stat to go by, take one.
_UNKNOWN = object()


class Namespace:
    """The inode and name tables, and every operation that changes them."""

    def __init__(self, config: Config, cache: AsyncCache, creds: Credentials):
        self.config = config
        self.cache = cache
        self.creds = creds
        self.inodes: dict[int, Node] = {}
        self.links: dict[int, tuple[bytes, Attr]] = {}     # transient S_IFLNK replies
        self.by_fid: dict[int, File] = {}           # opened files
        self.dirhandles: dict[int, DirHandle] = {}
        self._ino = itertools.count(ROOT_INODE + 1)
        self._dh = itertools.count(1)
        st = os.stat(config.backing)
        self.root = Dir(ROOT_INODE, None, b"", st, root_path=config.backing)
        self.root.mode = stat.S_IFDIR | 0o755 | (0o1000 if config.allow_other else 0)
        self.root.uid, self.root.gid = os.getuid(), os.getgid()
        if config.allow_other:
            self.root.mode |= 0o777
        self.inodes[ROOT_INODE] = self.root
        #: Called with a File whose engine file is about to go (cluster.py).
        self.on_free = lambda node: None

    def wire_attached(self) -> None:
        """The compiled wire is in front of pyfuse3 (``AsyncCache.wire``):
        with ``-o mirror``, LOOKUPs in the root have their name lstat'ed by
        the wire (``Wire.expect``); found directories and files are
        entered as they are found."""
        if self.config.mirror:
            self.cache.wire.expect(ROOT_INODE, os.fsencode(self.config.backing), directory=True)

    # -- finding nodes -----------------------------------------------------
    def node(self, ino: int) -> Node:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def dir(self, ino: int) -> Dir:
        node = self.node(ino)
        if not isinstance(node, Dir):
            raise FsError(errno.ENOTDIR)
        return node

    def file(self, ino: int) -> File:
        node = self.node(ino)
        if isinstance(node, Dir):
            raise FsError(errno.EISDIR)
        return node

    def files(self) -> list[File]:
        """Every file the daemon holds open, unlinked ones included."""
        return list(self.by_fid.values())

    def attr(self, node: Node) -> Attr:
        if isinstance(node, File):
            size = self.cache.size(node.fid) if node.opened else node.seen[0]
            nlink = 1 if node.parent is not None else 0
        else:
            size = 4096
            nlink = 2 + sum(isinstance(c, Dir) for c in node.children.values())
        return Attr(node.ino, node.mode, nlink, node.uid, node.gid, size,
                    node.atime_ns, node.mtime_ns, node.ctime_ns)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if b"/" in name or name in (b"", b".", b".."):
            raise FsError(errno.EINVAL)
        if len(name) > 255:
            raise FsError(errno.ENAMETOOLONG)

    # -- adding and freeing ------------------------------------------------
    def _add_file(self, parent: Dir, name: bytes, b: Opened, path: str, shadow: bool) -> File:
        fid = self.cache.register(b.fd, b.st.st_size, multiwrite=self.config.multiwrite)
        node = File(next(self._ino), parent, name, b.st, b.fd, fid, path, shadow, b.writable,
                    in_memory=b.in_memory)
        self.inodes[node.ino] = node
        self.by_fid[fid] = node
        parent.children[name] = node
        parent.touch()
        return node

    def _add_found(self, parent: Dir, name: bytes, st: os.stat_result) -> Node:
        """A name found in the backing tree (``-o mirror``): a directory, or
        an unopened file; nothing is opened, and the parent's times stay."""
        path = os.path.join(parent.backing_path(), os.fsdecode(name))
        if stat.S_ISDIR(st.st_mode):
            node: Node = Dir(next(self._ino), parent, name, st)
            self.cache.wire.expect(node.ino, os.fsencode(path), directory=True)
        else:
            node = File(next(self._ino), parent, name, st, -1, -1, path, shadow=False,
                        writable=False)
            self.cache.wire.expect(node.ino, os.fsencode(path))
            self._enter(node)
        self.inodes[node.ino] = node
        parent.children[name] = node
        return node

    def _enter(self, node: File) -> None:
        """Let the wire answer LOOKUPs of the unopened file ``node`` with what
        :meth:`lookup` would answer while its backing file is as seen
        (``Wire.enter``); the references they give the kernel come back
        through :meth:`forget` and ``Wire.unexpect``."""
        a = self.attr(node)
        self.cache.wire.enter(node.ino, node.parent.ino, node.name, node.ident, node.seen,
                              (a.ino, a.mode, a.nlink, a.uid, a.gid, a.size, a.atime_ns,
                               a.mtime_ns, a.ctime_ns, a.timeout), BLKSIZE)

    async def ensure_open(self, node: File, ctx: Ctx, ahead: tuple | None = None) -> int:
        """Open an unopened file (found by ``-o mirror``) as the user, and hand
        it to the engine; a no-op for every other file.  ``ahead``: what the
        wire opened for this OPEN already (``Wire.take_ahead``), used when
        it opened the node's path as it stands; it is closed otherwise.

        Returns the access modes (``os.R_OK``, ``os.W_OK``) that the open
        just proved the user has on the backing file (0: nothing opened)."""
        if node.opened:
            _close_ahead(ahead)
            return 0
        b = self._opened_ahead(node, ahead)
        if b is False:
            try:
                b = await self.creds.as_user(ctx, _open_backing, node.path)
            except FileNotFoundError:
                b = None
        if node.opened:                     # another open won the race
            if b is not None:
                os.close(b.fd)
            return 0
        if b is None or (b.st.st_dev, b.st.st_ino) != node.ident:
            # Removed or replaced since it was found: take the name from it
            # (the open answers ESTALE, and the kernel looks the name up again).
            if b is not None:
                os.close(b.fd)
            if node.parent is not None:
                await self.still_bound(node, ctx)
            raise FsError(errno.ESTALE, "backing file %s was removed or replaced" % node.path)
        st = b.st
        node.fd, node.writable = b.fd, b.writable
        node.fid = self.cache.register(b.fd, st.st_size, multiwrite=self.config.multiwrite)
        node.in_memory = b.in_memory
        node.seen = (st.st_size, st.st_mtime_ns)
        node.fresh = True                   # just read from the backing file: see revalidate
        self.by_fid[node.fid] = node
        node.nlookup += self.cache.wire.unexpect(node.ino)
        return os.R_OK | (os.W_OK if b.writable else 0)

    def _opened_ahead(self, node: File, ahead: tuple | None):
        """``ahead`` as ``_open_backing`` would have returned it: an Opened,
        None (no such file), or False when it cannot stand in (none, another
        path, a device not seen yet); raises as ``_open_backing`` does."""
        if ahead is None:
            return False
        path, fd, writable, err, fields = ahead
        if path != os.fsencode(node.path):
            _close_ahead(ahead)
            return False
        if fd < 0:
            if err == errno.ENOENT:
                return None
            if err == errno.EISDIR:
                raise FsError(errno.EISDIR, "%s is a directory" % node.path)
            raise OSError(err, os.strerror(err), node.path)
        st = os.stat_result(fields)
        in_memory = AsyncCache.in_memory_known(st.st_dev)
        if in_memory is None:               # its fstatfs is I/O: once per device, in a worker
            os.close(fd)
            return False
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise FsError(errno.EINVAL, "%s is not a regular file" % node.path)
        return Opened(fd, writable, st, in_memory)

    def maybe_free(self, node: Node) -> None:
        """Close an unlinked file once nothing refers to it any more."""
        if node.parent is not None or node.nlookup > 0:
            return
        if isinstance(node, File) and node.opened:
            if node.opens or node.background or self.by_fid.get(node.fid) is not node:
                return      # in use (the background write-back frees it after), or freed
            if (node.shadow or node.lost) and self.cache.dirty_bytes(node.fid):
                # Nothing dropped silently: an unlinked shadow's dirty pages
                # still belong to its backing file, which release() failed to
                # write; a lost file's cannot reach any file.  Keep them: the
                # flusher and unmount retry, and unmount refuses while they
                # fail (``shimfs umount --force`` drops them, with an error).
                log.warning("keeping %s: its unwritten data is retried", node.path)
                return
            if self.cache.when_idle(node.fid, lambda: self.maybe_free(node)):
                return      # a prefetch still reads into this file: free it after
            self.on_free(node)
            self.cache.unregister(node.fid)
            self.by_fid.pop(node.fid, None)
            os.close(node.fd)
        else:
            n = self.cache.wire.unexpect(node.ino)
            if n:           # (none: an unopened file's entry went at _detach)
                node.nlookup += n
                return
        self.inodes.pop(node.ino, None)

    def close_all(self) -> None:
        """Unmount: forget every file and close its backing descriptor."""
        for node in list(self.by_fid.values()):
            self.cache.unregister(node.fid)
            os.close(node.fd)
        self.inodes.clear()
        self.by_fid.clear()

    def _detach(self, node: Node) -> None:
        parent = node.parent
        if parent is not None:
            del parent.children[node.name]
            parent.touch()
        node.parent = None
        node.ctime_ns = time.time_ns()
        if isinstance(node, File) and not node.opened:
            # no more LOOKUPs of it in the wire; those it answered are references
            node.nlookup += self.cache.wire.unexpect(node.ino)
        self.maybe_free(node)

    # -- names shared with other nodes ----------------------------------------
    async def still_bound(self, node: File, ctx: Ctx = Ctx(), st=_UNKNOWN) -> File | None:
        """The file that ``node``'s name stands for now.

        Other nodes and scripts remove and replace files in a shared backing
        directory.  While the backing path still leads to the file ``node``
        opened, that is ``node``.  Otherwise the name is taken from ``node``
        (``File.lost``): its open handles keep it, as a local file system
        keeps an unlinked file, but nothing new reaches it.  If the path now
        holds another regular file that the user can open, the name is bound
        to that one (a shadow follows its target's path, as a symlink does);
        else the name is gone (None).  Runs on every lookup and open of a
        file, so a name the kernel caches is checked again at least every
        ``TIMEOUT`` seconds (its entry and attr timeouts).  ``st``: what a
        stat of ``node.path`` just now gave (``_stat_ahead``: a result, or
        None for nothing there); ``_UNKNOWN``: one is taken.
        """
        if st is _UNKNOWN:
            st = await self.cache.run(_stat_or_none, node.path)
        if st is not None and (st.st_dev, st.st_ino) == node.ident:
            node.checked = (st, node.seen)
            await self._follow(node, st)
            return node
        parent, name = node.parent, node.name
        if parent is None or parent.children.get(name) is not node:
            return parent.children.get(name) if parent is not None else None
        log.info("%s was %s behind the mount's back", node.path,
                 "removed" if st is None else "replaced")
        node.lost = True
        self._detach(node)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        if not node.opened:                 # found by -o mirror: found again, unopened
            return self._add_found(parent, name, st) if name not in parent.children \
                else parent.children[name]
        try:
            b = await self.creds.as_user(ctx, _open_backing, node.path)
        except (OSError, FsError):
            return None                     # not the user's to see: the name is gone
        if name in parent.children:         # raced with another lookup
            os.close(b.fd)
            return parent.children[name]
        return self._add_file(parent, name, b, node.path, shadow=node.shadow)

    async def _follow(self, node: File, st: os.stat_result) -> None:
        """The backing file changed in place (another node wrote it): while
        nobody here has it open and nothing is dirty, the attributes, and
        the daemon's cached pages, follow it.  The kernel drops its own
        pages when a reply shows it the new mtime (auto_inval_data); an open
        still compares with ``seen`` (Coherence.revalidate), which is left
        as it was for that."""
        if (st.st_size, st.st_mtime_ns) == node.seen:
            return
        if not node.opened:
            node.seen = (st.st_size, st.st_mtime_ns)
            node.mtime_ns, node.ctime_ns = st.st_mtime_ns, st.st_ctime_ns
            return
        if node.opens or self.cache.dirty_bytes(node.fid) or \
                node.mtime_ns == st.st_mtime_ns and self.cache.size(node.fid) == st.st_size:
            return
        async with self.cache.pushes_paused(node.fid):
            if node.opens or self.cache.dirty_bytes(node.fid):
                return
            self.cache.invalidate(node.fid, 0, max(st.st_size, self.cache.size(node.fid)))
            self.cache.truncate(node.fid, st.st_size)
            node.mtime_ns, node.ctime_ns = st.st_mtime_ns, st.st_ctime_ns

    async def _child(self, parent: Dir, name: bytes, ctx: Ctx,
                     ahead: tuple | None = None) -> Node | None:
        """The node called ``name`` in ``parent`` now: files are checked
        against their backing path; with ``-o mirror`` a name the namespace
        does not hold is looked for in the backing directory, and a
        directory that is gone there (and holds nothing of the namespace's)
        goes here too.  ``ahead``: the wire's lstat of the name as the user
        (``Wire.take_ahead``), which stands in for these stats of the same
        path."""
        node = parent.children.get(name)
        if isinstance(node, File):
            node = await self.still_bound(node, ctx, _stat_ahead(ahead, node.path, follow=True))
        if not self.config.mirror:
            return node
        if isinstance(node, Dir) and not node.children:
            path = node.backing_path()
            st = _stat_ahead(ahead, path)
            if st is _UNKNOWN:
                st = await self.creds.as_user(ctx, _lstat_or_none, path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                if parent.children.get(name) is node:
                    self._detach(node)
                node = None
        if node is None:
            self._check_name(name)
            path = os.path.join(parent.backing_path(), os.fsdecode(name))
            st = _stat_ahead(ahead, path)
            if st is _UNKNOWN:
                st = await self.creds.as_user(ctx, _lstat_or_none, path)
            if st is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                node = parent.children.get(name) or self._add_found(parent, name, st)
        return node

    # -- the kernel's references ---------------------------------------------
    async def lookup(self, parent_ino: int, name: bytes, ctx: Ctx = Ctx()) -> Attr:
        # the wire's lstat of the name, as this user, if it made one (Wire.expect)
        ahead = self.cache.wire.take_ahead(AHEAD_LOOKUP, parent_ino, ctx.uid, ctx.gid, ctx.pid)
        parent = self.dir(parent_ino)
        node = await self._child(parent, name, ctx, ahead)
        if node is None:
            raise FsError(errno.ENOENT)
        node.nlookup += 1
        if isinstance(node, File) and not node.opened and node.parent is parent:
            self._enter(node)       # its attributes may have followed the backing file
        return self.attr(node)

    def forget(self, ino: int, n: int) -> None:
        if ino in self.links:
            del self.links[ino]
            return
        node = self.inodes.get(ino)
        if node is None or node is self.root:
            return
        if isinstance(node, File) and not node.opened:
            node.nlookup += self.cache.wire.take_lookups(ino)
        node.nlookup = max(0, node.nlookup - n)
        self.maybe_free(node)

    def note_lookup(self, ino: int) -> None:
        """readdir_reply accepted an entry: the kernel now holds a reference."""
        node = self.inodes.get(ino)
        if node is not None:
            node.nlookup += 1

    def getattr(self, ino: int) -> Attr:
        if ino in self.links:
            return self.links[ino][1]
        return self.attr(self.node(ino))

    def readlink(self, ino: int) -> bytes:
        if ino in self.links:
            return self.links[ino][0]
        raise FsError(errno.EINVAL)

    def opendir(self, ino: int, ctx: Ctx = Ctx()) -> int:
        fh = next(self._dh)
        self.dirhandles[fh] = DirHandle(self.dir(ino), ctx)
        return fh

    def releasedir(self, fh: int) -> None:
        h = self.dirhandles.pop(fh, None)
        if h is not None and h.listing is not None:
            h.listing.close()

    async def readdir(self, fh: int, start: int):
        """Entries after index ``start``, as an iterator of (name, attr, next
        index), at most ``READDIR_ENTRIES`` of them (names.py says why).  The
        adapter stops at a full reply buffer too, and attributes are made
        only for the entries it sends (making them all for every reply made
        ``ls`` of 10,000 files quadratic).

        The listing is taken when reading starts (``start`` 0) and kept in
        the handle, so its later pages do not shift.  With ``-o mirror`` it
        is the backing directory's, read as the user in backing order while
        the reader goes through the first replies (listing.py), and then the
        names the namespace holds that the backing directory did not show
        (shadows, files made since)."""
        h = self.dirhandles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        node = h.node
        if h.entries is None or start == 0:
            if h.listing is not None:
                h.listing.close()
                h.listing = None
            if self.config.mirror and (node.parent is not None or node is self.root):
                h.entries, h.seen = [], set()
                h.listing = Listing(node.backing_path())
                await h.listing.start(functools.partial(self.creds.as_user, h.ctx),
                                      self.cache.nursery)
            else:
                h.entries = sorted(node.children.items())
        while h.listing is not None and len(h.entries) < start + READDIR_ENTRIES:
            found = await h.listing.next()
            if found is None:
                h.listing = None
                await self._listed_rest(h)
            else:
                await self._listed(h, found)
        return self._entries(h.entries, start)

    async def _listed(self, h: DirHandle, found) -> None:
        """Entries that the backing directory listing gave: new names join
        the namespace; a file the namespace holds is followed if it is the
        same file, else checked (rebound or taken) as on lookup."""
        node = h.node
        for name, st in found:
            if name in h.seen or not self._name_ok(name):
                continue
            h.seen.add(name)
            child = node.children.get(name)
            if child is None:
                child = self._add_found(node, name, st)
            elif isinstance(child, File) and not child.shadow:     # shadows point elsewhere
                if (st.st_dev, st.st_ino) == child.ident:
                    await self._follow(child, st)       # written in place elsewhere
                else:
                    child = await self.still_bound(child, h.ctx)
            if child is not None:
                h.entries.append((name, child))

    async def _listed_rest(self, h: DirHandle) -> None:
        """After the backing listing: the names it did not show.  Shadows
        stay; a file is kept only if its backing path still leads to it (it
        was made after the listing passed its name), else it is gone."""
        rest = []
        for name, child in list(h.node.children.items()):
            if name in h.seen:
                continue
            if isinstance(child, File) and not child.shadow:
                child = await self.still_bound(child, h.ctx)
                if child is None:
                    continue
            rest.append((name, child))
        rest.sort(key=lambda e: e[0])
        h.entries.extend(rest)

    def _entries(self, entries, start: int):
        for i in range(start, min(len(entries), start + READDIR_ENTRIES)):
            name, child = entries[i]
            yield name, self.attr(child), i + 1

    @staticmethod
    def _name_ok(name: bytes) -> bool:
        return b"/" not in name and name not in (b"", b".", b"..") and len(name) <= 255

    async def statfs(self) -> os.statvfs_result:
        return await self.cache.run(os.statvfs, self.config.backing)

    # -- changes -------------------------------------------------------------
    async def symlink(self, parent_ino: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        """Make ``name`` a shadow of the file ``target`` points at.

        FUSE insists that the reply to SYMLINK is a symlink, so the reply is a
        transient S_IFLNK inode that the kernel may not cache (timeout 0); the
        next lookup of the name finds the shadow, a regular file.
        """
        parent = self.dir(parent_ino)
        self._check_name(name)
        if name in parent.children:
            raise FsError(errno.EEXIST)
        path = await self.creds.check_target(_resolve_target(os.fsdecode(target), ctx), ctx)
        b = await self.creds.as_user(ctx, _open_backing, path)
        try:
            if name in parent.children:        # raced with another create
                raise FsError(errno.EEXIST)
            node = self._add_file(parent, name, b, path, shadow=True)
        except BaseException:
            os.close(b.fd)
            raise
        log.debug("shadow %s -> %s (%s)", name, path, "rw" if b.writable else "ro")
        ino = next(self._ino)
        link = Attr(ino, stat.S_IFLNK | 0o777, 1, node.uid, node.gid, len(target),
                    node.atime_ns, node.mtime_ns, node.ctime_ns, timeout=0)
        self.links[ino] = (target, link)
        return link

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
                     ctx: Ctx) -> tuple[File, bool]:
        """The file ``name``, made (backing file included) unless it exists;
        returns it, and whether it was made.  The kernel holds one more
        reference to it either way."""
        parent = self.dir(parent_ino)
        self._check_name(name)
        node = await self._child(parent, name, ctx)
        if node is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            if isinstance(node, Dir):
                raise FsError(errno.EISDIR)
            node.nlookup += 1
            return node, False
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise FsError(errno.EPERM)
        path = os.path.join(parent.backing_path(), os.fsdecode(name))
        perm = stat.S_IMODE(mode) & ~ctx.umask

        def work():
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm)
            except FileExistsError:
                if flags & os.O_EXCL:
                    return None
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (flags & os.O_TRUNC))
            return _probe(fd, True)
        b = await self.creds.as_user(ctx, work)
        if b is None:
            # Another node made it first.  Show it, so that ls, stat and
            # O_EXCL agree that the name exists, and refuse.
            await self._adopt(parent, name, path, ctx)
            raise FsError(errno.EEXIST, "%s exists in the backing directory" % path)
        if name in parent.children:          # raced with another create
            os.close(b.fd)
            node = parent.children[name]
            if flags & os.O_EXCL or isinstance(node, Dir):
                raise FsError(errno.EEXIST)
            node.nlookup += 1
            return node, False
        try:
            node = self._add_file(parent, name, b, path, shadow=False)
        except BaseException:
            os.close(b.fd)
            raise
        node.nlookup += 1
        return node, True

    async def _adopt(self, parent: Dir, name: bytes, path: str, ctx: Ctx) -> None:
        """Add the backing file ``path``, which another node made, as ``name``
        (if it is a regular file the user can open)."""
        try:
            b = await self.creds.as_user(ctx, _open_backing, path)
        except (OSError, FsError):
            return
        if name in parent.children:
            os.close(b.fd)
            return
        self._add_file(parent, name, b, path, shadow=False)

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        parent = self.dir(parent_ino)
        self._check_name(name)
        if name in parent.children:
            raise FsError(errno.EEXIST)
        path = os.path.join(parent.backing_path(), os.fsdecode(name))

        def work():
            try:
                os.mkdir(path, stat.S_IMODE(mode) & ~ctx.umask)
            except FileExistsError:
                # Left from an earlier mount: adopt it (the namespace is not
                # persistent, the backing tree is).
                if not os.path.isdir(path) or os.path.islink(path):
                    raise
            return os.lstat(path)
        st = await self.creds.as_user(ctx, work)
        if name in parent.children:
            raise FsError(errno.EEXIST)
        node = Dir(next(self._ino), parent, name, st)
        self.inodes[node.ino] = node
        parent.children[name] = node
        if self.config.mirror:
            self.cache.wire.expect(node.ino, os.fsencode(path), directory=True)
        parent.touch()
        node.nlookup += 1
        return self.attr(node)

    async def unlink(self, parent_ino: int, name: bytes, ctx: Ctx = Ctx()) -> None:
        parent = self.dir(parent_ino)
        node = parent.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if isinstance(node, Dir):
            raise FsError(errno.EISDIR)
        if not node.shadow:
            try:
                await self.creds.as_user(ctx, os.unlink, node.path)
            except FileNotFoundError:
                pass
        if parent.children.get(name) is node:
            self._detach(node)

    async def rmdir(self, parent_ino: int, name: bytes, ctx: Ctx = Ctx()) -> None:
        parent = self.dir(parent_ino)
        node = parent.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if not isinstance(node, Dir):
            raise FsError(errno.ENOTDIR)
        if node.children:
            raise FsError(errno.ENOTEMPTY)
        try:
            await self.creds.as_user(ctx, os.rmdir, node.backing_path())
        except FileNotFoundError:
            pass
        if node.children:
            raise FsError(errno.ENOTEMPTY)
        if parent.children.get(name) is node:
            self._detach(node)

    async def rename(self, old_ino: int, old: bytes, new_ino: int, new: bytes,
                     flags: int = 0, ctx: Ctx = Ctx()) -> None:
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        src_dir, dst_dir = self.dir(old_ino), self.dir(new_ino)
        self._check_name(new)
        node = src_dir.children.get(old)
        if node is None:
            raise FsError(errno.ENOENT)
        victim = dst_dir.children.get(new)
        if victim is node:
            return
        if victim is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if isinstance(node, Dir) != isinstance(victim, Dir):
                raise FsError(errno.EISDIR if isinstance(victim, Dir) else errno.ENOTDIR)
            if isinstance(victim, Dir) and victim.children:
                raise FsError(errno.ENOTEMPTY)
        if isinstance(node, Dir):
            d = dst_dir
            while d is not None:               # no directory into itself
                if d is node:
                    raise FsError(errno.EINVAL)
                d = d.parent
        new_path = os.path.join(dst_dir.backing_path(), os.fsdecode(new))
        moves_backing = isinstance(node, Dir) or not node.shadow
        if moves_backing:
            old_path = node.backing_path()
            victim_path = None
            if victim is not None and (isinstance(victim, Dir) or not victim.shadow):
                victim_path = victim.backing_path()

            def work():
                if victim_path is None and os.path.lexists(new_path):
                    # A backing file the namespace does not show: never clobber it.
                    raise FsError(errno.EEXIST, "backing path %s exists" % new_path)
                os.rename(old_path, new_path)
            await self.creds.as_user(ctx, work)
        elif victim is not None and not isinstance(victim, Dir) and not victim.shadow:
            # A shadow replaces a created file: that file goes, as with unlink.
            try:
                await self.creds.as_user(ctx, os.unlink, victim.path)
            except FileNotFoundError:
                pass
        if victim is not None and dst_dir.children.get(new) is victim:
            self._detach(victim)
        if src_dir.children.get(old) is node:
            del src_dir.children[old]
        node.parent = dst_dir
        node.name = new
        dst_dir.children[new] = node
        if isinstance(node, File) and not node.shadow:
            node.path = new_path
            if not node.opened:
                self.cache.wire.expect(node.ino, os.fsencode(new_path))
        if isinstance(node, Dir):
            if self.config.mirror:
                for d in _walk_dirs(node):
                    self.cache.wire.expect(d.ino, os.fsencode(d.backing_path()), directory=True)
            for f in _walk_files(node):
                if not f.shadow:
                    f.path = os.path.join(f.parent.backing_path(), os.fsdecode(f.name))
                    if not f.opened:
                        self.cache.wire.expect(f.ino, os.fsencode(f.path))
        src_dir.touch()
        dst_dir.touch()
        node.ctime_ns = time.time_ns()
        if isinstance(node, File) and not node.opened:
            self._enter(node)       # by its new name

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        raise FsError(errno.EPERM, "hard links are not supported")


def _resolve_target(target: str, ctx: Ctx) -> str:
    if not target:
        raise FsError(errno.ENOENT)
    if not os.path.isabs(target):
        # Relative to the process that ran ln, as the kernel module did.
        try:
            cwd = os.readlink("/proc/%d/cwd" % ctx.pid)
        except OSError:
            raise FsError(errno.EINVAL, "relative link target and unknown cwd") from None
        target = os.path.join(cwd, target)
    return os.path.normpath(target)


def _stat_ahead(ahead: tuple | None, path: str, follow: bool = False):
    """The wire's lstat of a name (``Wire.take_ahead``) as ``_lstat_or_none``
    of ``path`` would have returned it: a stat result or None; ``_UNKNOWN``
    if it was of another path, or failed otherwise than with ENOENT or
    ENOTDIR (the call is then made again, and fails or not by itself).
    ``follow``: for ``_stat_or_none``, which follows a symlink: a symlink is
    ``_UNKNOWN``."""
    if ahead is None or ahead[0] != os.fsencode(path):
        return _UNKNOWN
    err, fields = ahead[3], ahead[4]
    if err in (errno.ENOENT, errno.ENOTDIR):
        return None
    if err:
        return _UNKNOWN
    st = os.stat_result(fields)
    if follow and stat.S_ISLNK(st.st_mode):
        return _UNKNOWN
    return st


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _walk_dirs(d: Dir):
    yield d
    for child in d.children.values():
        if isinstance(child, Dir):
            yield from _walk_dirs(child)


def _walk_files(d: Dir):
    for child in d.children.values():
        if isinstance(child, Dir):
            yield from _walk_files(child)
        else:
            yield child


class Opened(NamedTuple):
    """A backing file just opened, with what the daemon needs to know of it,
    all found in the worker thread that opened it (each is a round trip on
    a network file system)."""
    fd: int
    writable: bool
    st: os.stat_result
    in_memory: bool         # tmpfs or ramfs (AsyncCache.in_memory)


def _close_ahead(ahead: tuple | None) -> None:
    """Close what the wire opened ahead (``Wire.take_ahead``), unused."""
    if ahead is not None and ahead[1] >= 0:
        os.close(ahead[1])


def _probe(fd: int, writable: bool) -> Opened:
    """fstat and fstatfs of a backing file just opened (closed on error)."""
    try:
        st = os.fstat(fd)
        return Opened(fd, writable, st, AsyncCache.in_memory(fd, st.st_dev))
    except BaseException:
        os.close(fd)
        raise


def _open_backing(path: str) -> Opened:
    """Open a link target for a shadow: read/write if allowed, else read-only.

    O_NONBLOCK keeps a FIFO from blocking the open; anything but a regular
    file is refused.
    """
    base = os.O_CLOEXEC | os.O_NONBLOCK
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | base)
    except IsADirectoryError:
        raise FsError(errno.EISDIR, "%s is a directory" % path) from None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ETXTBSY):
            raise
        fd = os.open(path, os.O_RDONLY | base)
        writable = False
    b = _probe(fd, writable)
    try:
        if not stat.S_ISREG(b.st.st_mode):
            raise FsError(errno.EINVAL, "%s is not a regular file" % path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return b
