"""The shimfs file system, without FUSE: namespace, shadow links, handles, data.

The namespace lives in memory, like the original module's (a ramfs whose
files point at backing files), and starts empty at every mount:

* ``symlink(name -> target)`` opens the target and makes a *shadow*: a regular
  file whose bytes are the target's.  Removing it closes the backing file and
  never deletes it.
* ``create`` and ``mkdir`` create the backing file or directory under the
  backing directory, at the same relative path; removing them removes it.
* ``rename`` moves entries; for created files and directories it renames the
  backing path too, so the backing tree mirrors the mount.

Every method takes plain Python values and returns :class:`Attr` objects; the
pyfuse3 adapter (:mod:`shimfs.fuseops`) converts.  Blocking calls run in worker
threads through :class:`AsyncCache`.  See docs/design.md for the concurrency
rules (in short: namespace changes happen on the trio thread between awaits;
write-back and truncate of one file are serialized by its ``io_lock``).
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import time
from dataclasses import dataclass

import trio

import shimcore

from .cache import AsyncCache
from .config import Config
from .errors import FsError
from .notify import KernelNotifier

try:
    from shimcore._creds import run_as
except ImportError:    # pragma: no cover - the extension is always built
    run_as = None

log = logging.getLogger(__name__)

ROOT_INODE = 1
XATTR_BACKING = "user.shimfs.backing"
XATTR_SYNC = "user.shimfs.sync"
XATTR_PID = "user.shimfs.pid"
XATTR_STATS = "user.shimfs.stats"
XATTR_REFRESH = "user.shimfs.refresh"
XATTR_MULTIWRITE = "user.shimfs.multiwrite"
REFRESH_CHUNK = 4 << 20

#: How long the kernel may trust names and attributes (seconds).  Sizes and
#: mtimes are reported steadily, so caching them is safe.
TIMEOUT = 1.0


@dataclass
class Attr:
    """What stat() shows; converted to EntryAttributes by the adapter."""
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    timeout: float = TIMEOUT


@dataclass
class Ctx:
    """Who asks: the requesting process's credentials."""
    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


class Node:
    """A name in the namespace (a directory or a file)."""

    def __init__(self, ino: int, parent: "Dir | None", name: bytes, st: os.stat_result):
        self.ino = ino
        self.parent = parent
        self.name = name
        self.nlookup = 0
        self.mode = st.st_mode
        self.uid = st.st_uid
        self.gid = st.st_gid
        self.atime_ns = st.st_atime_ns
        self.mtime_ns = st.st_mtime_ns
        self.ctime_ns = st.st_ctime_ns

    def backing_path(self) -> str:
        raise NotImplementedError

    def touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()


class Dir(Node):
    """A directory; its backing directory is its parent's plus its name."""

    def __init__(self, ino, parent, name, st, root_path: str | None = None):
        super().__init__(ino, parent, name, st)
        self.children: dict[bytes, Node] = {}
        self._root_path = root_path

    def backing_path(self) -> str:
        if self.parent is None:
            return self._root_path
        return os.path.join(self.parent.backing_path(), os.fsdecode(self.name))


class File(Node):
    """A regular file: a shadow of some backing file, or one created here."""

    def __init__(self, ino, parent, name, st, fd: int, fid: int, path: str,
                 shadow: bool, writable: bool):
        super().__init__(ino, parent, name, st)
        self.fd = fd
        self.fid = fid
        self.path = path            # the backing file (absolute)
        self.shadow = shadow
        self.writable = writable
        self.opens = 0
        self.writers = 0            # handles open for writing
        self.mtime_due = False      # written since mtime last moved: see wrote()
        self.written_ns = 0         # when the last WRITE came
        self.io_lock = trio.Lock()  # serializes write-back, fsync and truncate
        self.background = False     # a background write-back is running
        self.seen = (st.st_size, st.st_mtime_ns)   # backing state last seen
        self.ident = (st.st_dev, st.st_ino)        # to reopen the very same file
        # tmpfs or ramfs: no read-ahead, misses read inline (cache.AsyncCache.read)
        self.in_memory = shimcore.fs_magic(fd) in shimcore.MEMORY_FS_MAGIC

    def backing_path(self) -> str:
        return self.path

    def wrote(self) -> None:
        """Data changed through the mount: ctime now, mtime a little later.

        The kernel drops the whole page cache of a file (mapped pages too,
        after writing dirty ones back synchronously) whenever a GETATTR or
        LOOKUP reply shows it a new mtime (auto_inval_data, fs/fuse/inode.c
        fuse_change_attributes).  Bumping mtime at every WRITE made a plain
        ``stat`` or ``ls -l`` during a mapped write stall for seconds and
        made the writer fault every page in again.  The pages came through
        this mount, so the kernel's copies are current: mtime takes the time
        of the last write when the last writable handle is released (for a
        mapping: after munmap, once every dirty page is written back), or
        at the flusher's next tick (``Vfs.publish_mtimes``), so a file kept
        open shows its writes within ``writeback_interval`` seconds.  ctime
        does not invalidate anything and moves at once.
        """
        self.ctime_ns = self.written_ns = time.time_ns()
        self.mtime_due = True
        if not self.writers:
            self.publish_mtime()

    def publish_mtime(self) -> None:
        """Show the time of the last write as mtime, if it is not shown yet."""
        if self.mtime_due:
            self.mtime_due = False
            self.mtime_ns = self.written_ns


class Handle:
    __slots__ = ("fh", "node", "stream", "writable")

    def __init__(self, fh, node, stream, writable):
        self.fh = fh
        self.node = node
        self.stream = stream
        self.writable = writable


def _now_stat(mode: int) -> os.stat_result:
    t = time.time_ns()
    return os.stat_result((mode, 0, 0, 1, os.getuid(), os.getgid(), 0,
                           t // 10**9, t // 10**9, t // 10**9, t, t, t))


class Vfs:
    """All file-system operations, kernel-free; the adapter calls these."""

    def __init__(self, config: Config, cache: AsyncCache | None = None):
        self.config = config
        self.cache = cache or AsyncCache(config.cache_size, config.read_ahead_bytes,
                                         push=config.push)
        self.inodes: dict[int, Node] = {}
        self.links: dict[int, tuple[bytes, Attr]] = {}     # transient S_IFLNK replies
        self.handles: dict[int, Handle] = {}
        self._ino = itertools.count(ROOT_INODE + 1)
        self._fh = itertools.count(1)
        self.is_root = os.geteuid() == 0
        self.kernel = KernelNotifier(None)      # set by the mount once the session exists
        self.by_fid: dict[int, File] = {}
        self.kernel_drops = 0                   # pages dropped from the kernel for lost twins
        self.kernel_drops_pending = 0
        self.cache.on_lost_twins = self._drop_kernel_copies
        st = os.stat(config.backing)
        self.root = Dir(ROOT_INODE, None, b"", st, root_path=config.backing)
        self.root.mode = stat.S_IFDIR | 0o755 | (0o1000 if config.allow_other else 0)
        self.root.uid, self.root.gid = os.getuid(), os.getgid()
        if config.allow_other:
            self.root.mode |= 0o777
        self.inodes[ROOT_INODE] = self.root

    # -- helpers -----------------------------------------------------------
    def _node(self, ino: int) -> Node:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Dir:
        node = self._node(ino)
        if not isinstance(node, Dir):
            raise FsError(errno.ENOTDIR)
        return node

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    @staticmethod
    def _check_name(name: bytes) -> None:
        if b"/" in name or name in (b"", b".", b".."):
            raise FsError(errno.EINVAL)
        if len(name) > 255:
            raise FsError(errno.ENAMETOOLONG)

    def attr(self, node: Node) -> Attr:
        if isinstance(node, File):
            size = self.cache.engine.size(node.fid)
            nlink = 1 if node.parent is not None else 0
        else:
            size = 4096
            nlink = 2 + sum(isinstance(c, Dir) for c in node.children.values())
        return Attr(node.ino, node.mode, nlink, node.uid, node.gid, size,
                    node.atime_ns, node.mtime_ns, node.ctime_ns)

    async def as_user(self, ctx: Ctx, fn, *args):
        """Run ``fn(*args)`` in a worker thread with the requester's credentials.

        The daemon often runs as root: every path it opens, creates or
        removes in a backing tree on a user's behalf is reached with that
        user's fsuid, fsgid and supplementary groups, so the kernel applies
        the very checks the user would meet (search permission on every
        directory on the way included).  New files and directories are owned
        by the user as a result.
        """
        if not self.is_root or ctx.uid == 0 or run_as is None:
            return await self.cache.run(fn, *args)

        def work():
            return run_as(ctx.uid, ctx.gid, _sup_groups(ctx.pid, ctx.gid), fn, *args)
        return await self.cache.run(work)

    def _check_root(self, path: str) -> None:
        roots = self.config.allowed_roots
        if roots and not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            raise FsError(errno.EACCES, "%s is outside allowed_roots" % path)

    def _add_file(self, parent: Dir, name: bytes, fd: int, path: str, shadow: bool,
                  writable: bool) -> File:
        st = os.fstat(fd)
        fid = self.cache.engine.register(fd, st.st_size)
        if self.config.multiwrite:
            self.cache.engine.set_multiwrite(fid, True)
        node = File(next(self._ino), parent, name, st, fd, fid, path, shadow, writable)
        self.inodes[node.ino] = node
        self.by_fid[fid] = node
        parent.children[name] = node
        parent.touch()
        return node

    def _maybe_free(self, node: Node) -> None:
        """Close an unlinked file once nothing refers to it any more."""
        if node.parent is not None or node.nlookup > 0:
            return
        if isinstance(node, File):
            if node.opens or node.background or self.by_fid.get(node.fid) is not node:
                return      # in use (the background write-back frees it after), or freed
            if node.shadow and self.cache.engine.dirty_bytes(node.fid):
                # Nothing lost: an unlinked shadow's dirty pages still belong
                # to its backing file, which release() failed to write.  Keep
                # the file; the flusher and unmount retry, and free it after.
                log.warning("keeping %s: its unwritten data is retried", node.path)
                return
            if self.cache.when_idle(node.fid, lambda: self._maybe_free(node)):
                return      # a prefetch still reads into this file: free it after
            self.cache.engine.unregister(node.fid)
            self.cache.forget(node.fid)
            self.by_fid.pop(node.fid, None)
            os.close(node.fd)
        self.inodes.pop(node.ino, None)

    def _detach(self, node: Node) -> None:
        parent = node.parent
        if parent is not None:
            del parent.children[node.name]
            parent.touch()
        node.parent = None
        node.ctime_ns = time.time_ns()
        self._maybe_free(node)

    # -- namespace ---------------------------------------------------------
    def lookup(self, parent_ino: int, name: bytes) -> Attr:
        parent = self._dir(parent_ino)
        node = parent.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        node.nlookup += 1
        return self.attr(node)

    def forget(self, ino: int, n: int) -> None:
        if ino in self.links:
            del self.links[ino]
            return
        node = self.inodes.get(ino)
        if node is None or node is self.root:
            return
        node.nlookup = max(0, node.nlookup - n)
        self._maybe_free(node)

    def getattr(self, ino: int) -> Attr:
        if ino in self.links:
            return self.links[ino][1]
        return self.attr(self._node(ino))

    def readlink(self, ino: int) -> bytes:
        if ino in self.links:
            return self.links[ino][0]
        raise FsError(errno.EINVAL)

    async def setattr(self, ino: int, ctx: Ctx, size=None, mode=None, uid=None, gid=None,
                      atime_ns=None, mtime_ns=None) -> Attr:
        node = self._node(ino)
        if isinstance(node, File):
            if size is not None:
                await self._check_reachable(node, ctx, os.W_OK)
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
        elif isinstance(node, Dir) and node is not self.root:
            path = node.backing_path()
            if mode is not None:
                await self.as_user(ctx, os.chmod, path, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                await self.as_user(ctx, os.chown, path,
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
        return self.attr(node)

    async def symlink(self, parent_ino: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        """Make ``name`` a shadow of the file ``target`` points at.

        FUSE insists that the reply to SYMLINK is a symlink, so the reply is a
        transient S_IFLNK inode that the kernel may not cache (timeout 0); the
        next lookup of the name finds the shadow, a regular file.
        """
        parent = self._dir(parent_ino)
        self._check_name(name)
        if name in parent.children:
            raise FsError(errno.EEXIST)
        path = self._resolve_target(os.fsdecode(target), ctx)
        if self.config.allowed_roots:
            path = await self.as_user(ctx, os.path.realpath, path)
            self._check_root(path)
        fd, writable = await self.as_user(ctx, _open_backing, path)
        try:
            if name in parent.children:        # raced with another create
                raise FsError(errno.EEXIST)
            node = self._add_file(parent, name, fd, path, shadow=True, writable=writable)
        except BaseException:
            os.close(fd)
            raise
        log.debug("shadow %s -> %s (%s)", name, path, "rw" if writable else "ro")
        ino = next(self._ino)
        link = Attr(ino, stat.S_IFLNK | 0o777, 1, node.uid, node.gid, len(target),
                    node.atime_ns, node.mtime_ns, node.ctime_ns, timeout=0)
        self.links[ino] = (target, link)
        return link

    @staticmethod
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

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
                     ctx: Ctx) -> tuple[int, Attr]:
        parent = self._dir(parent_ino)
        self._check_name(name)
        if name in parent.children:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            node = parent.children[name]
            node.nlookup += 1
            return await self.open(node.ino, flags, ctx), self.attr(node)
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise FsError(errno.EPERM)
        path = os.path.join(parent.backing_path(), os.fsdecode(name))
        perm = stat.S_IMODE(mode) & ~ctx.umask

        def work():
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (flags & os.O_TRUNC))
            return fd
        fd = await self.as_user(ctx, work)
        try:
            node = self._add_file(parent, name, fd, path, shadow=False, writable=True)
        except BaseException:
            os.close(fd)
            raise
        node.nlookup += 1
        return await self._open_handle(node, True), self.attr(node)

    async def mknod(self, parent_ino: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        if not stat.S_ISREG(mode):
            raise FsError(errno.EPERM, "shimfs holds only regular files and directories")
        fh, attr = await self.create(parent_ino, name, mode, os.O_EXCL, ctx)
        await self.release(fh)
        return attr

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        parent = self._dir(parent_ino)
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
        st = await self.as_user(ctx, work)
        if name in parent.children:
            raise FsError(errno.EEXIST)
        node = Dir(next(self._ino), parent, name, st)
        self.inodes[node.ino] = node
        parent.children[name] = node
        parent.touch()
        node.nlookup += 1
        return self.attr(node)

    async def unlink(self, parent_ino: int, name: bytes, ctx: Ctx = Ctx()) -> None:
        parent = self._dir(parent_ino)
        node = parent.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if isinstance(node, Dir):
            raise FsError(errno.EISDIR)
        if not node.shadow:
            try:
                await self.as_user(ctx, os.unlink, node.path)
            except FileNotFoundError:
                pass
        if parent.children.get(name) is node:
            self._detach(node)

    async def rmdir(self, parent_ino: int, name: bytes, ctx: Ctx = Ctx()) -> None:
        parent = self._dir(parent_ino)
        node = parent.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if not isinstance(node, Dir):
            raise FsError(errno.ENOTDIR)
        if node.children:
            raise FsError(errno.ENOTEMPTY)
        try:
            await self.as_user(ctx, os.rmdir, node.backing_path())
        except FileNotFoundError:
            pass
        if node.children:
            raise FsError(errno.ENOTEMPTY)
        if parent.children.get(name) is node:
            self._detach(node)

    async def rename(self, old_ino: int, old: bytes, new_ino: int, new: bytes,
                     flags: int = 0, ctx: Ctx = Ctx()) -> None:
        RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        src_dir, dst_dir = self._dir(old_ino), self._dir(new_ino)
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
            await self.as_user(ctx, work)
        elif victim is not None and not isinstance(victim, Dir) and not victim.shadow:
            # A shadow replaces a created file: that file goes, as with unlink.
            try:
                await self.as_user(ctx, os.unlink, victim.path)
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
        if isinstance(node, Dir):
            for f in _walk_files(node):
                if not f.shadow:
                    f.path = os.path.join(f.parent.backing_path(), os.fsdecode(f.name))
        src_dir.touch()
        dst_dir.touch()
        node.ctime_ns = time.time_ns()

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        raise FsError(errno.EPERM, "hard links are not supported")

    def readdir(self, ino: int, start: int) -> list[tuple[bytes, Attr, int]]:
        """Entries after index ``start``, as (name, attr, next index)."""
        node = self._dir(ino)
        items = sorted(node.children.items())
        return [(name, self.attr(child), i + 1) for i, (name, child) in enumerate(items)
                if i >= start]

    def note_lookup(self, ino: int) -> None:
        """readdir_reply accepted an entry: the kernel now holds a reference."""
        node = self.inodes.get(ino)
        if node is not None:
            node.nlookup += 1

    async def statfs(self) -> os.statvfs_result:
        return await self.cache.run(os.statvfs, self.config.backing)

    # -- data --------------------------------------------------------------
    def _file(self, ino: int) -> File:
        node = self._node(ino)
        if isinstance(node, Dir):
            raise FsError(errno.EISDIR)
        return node

    async def _open_handle(self, node: File, writable: bool) -> int:
        if writable:
            # the kernel may now hold dirty pages: no more pushes (until release)
            await self.cache.close_gate(node.fid)
        fh = next(self._fh)
        stream = self.cache.stream() if self.config.read_ahead and not node.in_memory else None
        self.handles[fh] = Handle(fh, node, stream, writable)
        node.opens += 1
        node.writers += writable
        return fh

    async def open(self, ino: int, flags: int, ctx: Ctx) -> int:
        """Open a file; returns the handle.  See also :meth:`revalidate`."""
        node = self._file(ino)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and not node.writable:
            raise FsError(errno.EACCES, "backing file %s is read-only" % node.path)
        want = os.R_OK if not writable else (os.W_OK if flags & os.O_ACCMODE == os.O_WRONLY
                                             else os.R_OK | os.W_OK)
        await self._check_reachable(node, ctx, want)
        if flags & os.O_TRUNC and writable:
            await self.truncate(node, 0)
        return await self._open_handle(node, writable)

    async def _check_reachable(self, node: File, ctx: Ctx, want: int) -> None:
        """The kernel checked the shadow's mode bits; a user must also be able
        to reach the backing file itself (every directory on the way)."""
        if self.is_root and ctx.uid != 0:
            if not await self.as_user(ctx, _reachable, node.path, want):
                raise FsError(errno.EACCES, "%s is not reachable by uid %d" % (node.path, ctx.uid))

    async def revalidate(self, ino: int) -> bool:
        """Close-to-open consistency; True if the kernel may keep its cached pages.

        When nobody has the file open and no data is dirty, a backing file
        changed by someone else (size or mtime differ from what this node last
        saw) is re-read: the daemon drops its clean pages and tells the kernel
        to drop its own.
        """
        node = self._file(ino)
        if node.opens > 1 or self.cache.engine.dirty_bytes(node.fid):
            return True
        st = await self.cache.run(os.fstat, node.fd)
        if (st.st_size, st.st_mtime_ns) == node.seen:
            return True
        log.debug("%s changed under us: reloading", node.path)
        async with self.cache.pushes_paused(node.fid):     # no stale pages land late
            node.seen = (st.st_size, st.st_mtime_ns)
            self.cache.engine.invalidate(node.fid, 0,
                                         max(st.st_size, self.cache.engine.size(node.fid)))
            self.cache.engine.truncate(node.fid, st.st_size)
            node.mtime_ns = st.st_mtime_ns
        return False

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        return await self._with_reopen(h.node, self.cache.read, h.node.fid, h.node.ino, h.stream,
                                       off, size, h.node.in_memory)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        h = self._handle(fh)
        node = h.node
        if not node.writable:
            raise FsError(errno.EBADF)
        n = await self._with_reopen(node, self.cache.write, node.fid, off, data)
        node.wrote()
        if not node.background and \
                self.cache.engine.dirty_bytes(node.fid) >= self.config.cache_size // 2:
            # Half the cache is dirty: write back now, in parallel streams, so
            # that WRITEs do not end up evicting (writing back) synchronously.
            self._start_background(node)
        return n

    async def _writeback(self, node: File, durable: bool) -> None:
        log.debug("write-back of %s (durable=%s), %d dirty bytes", node.path, durable,
                  self.cache.engine.dirty_bytes(node.fid))
        async with node.io_lock:
            if durable and node.parent is not None:
                st = await self.cache.run(os.fstat, node.fd)
                if st.st_nlink == 0:
                    # Removed behind our back: data written now would vanish with
                    # the inode.  Say so, and keep it (dirty) in the cache.
                    raise FsError(errno.ESTALE, "backing file %s was removed" % node.path)
            await self._with_reopen(node, self.cache.writeback, node.fid,
                                    node.fd if durable else None)
            st = await self.cache.run(os.fstat, node.fd)
            node.seen = (st.st_size, st.st_mtime_ns)

    async def _with_reopen(self, node: File, fn, *args):
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

    def _start_background(self, node: File) -> None:
        if self.cache.nursery is not None:
            node.background = True
            self.cache.nursery.start_soon(self._background_writeback, node)

    async def _background_writeback(self, node: File) -> None:
        """Write back without fsync; errors stay for fsync/msync to report."""
        try:
            await self._writeback(node, durable=False)
        except (OSError, FsError) as exc:
            log.debug("background write-back of %s failed: %s", node.path, exc)
        finally:
            node.background = False
            self._maybe_free(node)      # an unlinked shadow kept for its data

    async def flusher(self) -> None:
        """Every ``writeback_interval`` seconds, start writing back dirty files.

        Like the kernel's dirty_expire: a daemon crash loses at most that
        much of what was never msync'd.  Besides, :meth:`write` starts a
        write-back as soon as half the cache is dirty (a quarter was slower,
        and 32 MiB slower still: on 2 cores it competes with the writer).
        """
        if not self.config.writeback_interval:
            return
        while True:
            await trio.sleep(self.config.writeback_interval)
            for node in list(self.by_fid.values()):
                if not node.background and node.writable \
                        and self.cache.engine.dirty_bytes(node.fid):
                    self._start_background(node)
            self.publish_mtimes()

    def publish_mtimes(self) -> None:
        """Files written while open show those writes in their mtime now (see
        :meth:`File.wrote`): at most one drop of a file's page cache per tick."""
        for node in self.by_fid.values():
            node.publish_mtime()

    async def fsync(self, fh: int, datasync: bool = False) -> None:
        await self._writeback(self._handle(fh).node, durable=True)

    async def flush(self, fh: int) -> None:
        node = self._handle(fh).node
        if node.writable and self.cache.engine.dirty_bytes(node.fid):
            await self._writeback(node, durable=False)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.stream is not None:
            h.stream.close()
        node = h.node
        try:
            if node.writable and self.cache.engine.dirty_bytes(node.fid):
                await self._writeback(node, durable=False)
        finally:
            node.opens -= 1
            if h.writable:
                self.cache.open_gate(node.fid)
                node.writers -= 1
                if not node.writers:
                    node.publish_mtime()
            self._maybe_free(node)

    async def truncate(self, node: File, size: int) -> None:
        if size < 0:
            raise FsError(errno.EINVAL)
        if not node.writable:
            raise FsError(errno.EACCES)
        async with self.cache.pushes_paused(node.fid), node.io_lock:
            await self.cache.run(os.ftruncate, node.fd, size)
            self.cache.engine.truncate(node.fid, size)
            st = await self.cache.run(os.fstat, node.fd)
            node.seen = (st.st_size, st.st_mtime_ns)
        node.touch()

    async def sync_all(self) -> list[tuple[str, OSError]]:
        """Write back and fsync every file; return the failures."""
        failed = []
        for node in list(self.inodes.values()):
            if isinstance(node, File) and node.writable and self.cache.engine.dirty_bytes(node.fid):
                try:
                    await self._writeback(node, durable=True)
                except OSError as exc:
                    failed.append((node.path, exc))
        return failed

    async def close_all(self) -> None:
        """Unmount: write everything back, then close every backing file."""
        failed = await self.sync_all()
        for path, exc in failed:
            log.error("could not write back %s at unmount: %s", path, exc)
        for node in list(self.inodes.values()):
            if isinstance(node, File):
                self.cache.engine.unregister(node.fid)
                os.close(node.fd)
        self.inodes.clear()

    # -- consistency: refresh and multiwrite ---------------------------------
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
        eng = self.cache.engine
        st = await self.cache.run(os.fstat, node.fd)
        limit = max(st.st_size, eng.size(node.fid))
        if offset < 0 or (length is not None and length < 0):
            raise FsError(errno.EINVAL, "negative offset or length")
        if offset > limit:
            raise FsError(errno.EINVAL, "offset %d is past the end of the file (%d)" % (offset, limit))
        end = limit if length is None else min(offset + length, limit)
        a = offset & ~4095
        b = (end + 4095) & ~4095
        if b > a:
            await self.cache.run(self.kernel.inval_range, node.ino, a, b - a)
        async with node.io_lock:
            st = await self.cache.run(os.fstat, node.fd)
            await self.cache.run(eng.refresh, node.fid, offset, end - offset)
            old_size = eng.size(node.fid)
            if st.st_size > old_size:
                eng.set_size(node.fid, st.st_size)
            elif st.st_size < old_size and not eng.dirty_bytes(node.fid):
                eng.truncate(node.fid, st.st_size)
            new_size = eng.size(node.fid)
            node.seen = (st.st_size, st.st_mtime_ns)
            if new_size != old_size:
                node.mtime_ns = st.st_mtime_ns
                await self.cache.run(self.kernel.inval_range, node.ino, -1, 0)
        end = min(end, new_size)

        def push():
            for pos in range(offset, end, REFRESH_CHUNK):
                data = eng.read(node.fid, pos, min(REFRESH_CHUNK, end - pos))
                self.kernel.store(node.ino, pos, data)
        if end > offset:
            await self.cache.run(push)
        return max(end - offset, 0)

    def _drop_kernel_copies(self, lost: list[tuple[int, int]]) -> None:
        """The daemon evicted multiwrite pages (and their twins): make the
        kernel drop its copies too, so the next touch reads the page -- and
        its new twin -- through the daemon.  Runs in the background."""
        nursery = self.cache.nursery
        targets = []
        for fid, page in lost:
            node = self.by_fid.get(fid)
            if node is not None:
                targets.append((node.ino, 0, 0) if page < 0 else (node.ino, page * 4096, 4096))
        if nursery is None or not targets:
            return

        def work():
            for ino, off, length in targets:
                try:
                    self.kernel.inval_range(ino, off, length)
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
                self.cache.engine.set_multiwrite(node.fid, on)

    # -- xattrs: the control interface ---------------------------------------
    def listxattr(self, ino: int) -> list[bytes]:
        node = self._node(ino)
        names = [XATTR_STATS]
        if isinstance(node, File):
            names[:0] = [XATTR_BACKING, XATTR_MULTIWRITE]
        elif node is self.root:
            names.append(XATTR_PID)
        return [n.encode() for n in names]

    def getxattr(self, ino: int, name: str) -> bytes:
        node = self._node(ino)
        if name == XATTR_BACKING and isinstance(node, File):
            return os.fsencode(node.path)
        if name == XATTR_MULTIWRITE and isinstance(node, File):
            return b"1" if self.cache.engine.file_stats(node.fid)["multiwrite"] else b"0"
        if name == XATTR_PID and node is self.root:
            return str(os.getpid()).encode()
        if name == XATTR_STATS:
            return json.dumps(self.stats(node), sort_keys=True).encode()
        raise FsError(errno.ENODATA)

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        node = self._node(ino)
        if name == XATTR_SYNC:
            if isinstance(node, File):
                await self._writeback(node, durable=True)
                return
            failed = await self.sync_all()
            if failed:
                raise FsError(failed[0][1].errno or errno.EIO)
            return
        if name == XATTR_REFRESH and isinstance(node, File):
            offset, length = _parse_range(value)
            await self.refresh(node, offset, length)
            return
        if name == XATTR_MULTIWRITE and isinstance(node, File):
            if value.strip() not in (b"0", b"1"):
                raise FsError(errno.EINVAL, "multiwrite takes 0 or 1")
            await self.set_multiwrite(node, value.strip() == b"1")
            return
        if name.startswith("user.shimfs."):
            raise FsError(errno.EINVAL, "unknown control %s" % name)
        raise FsError(errno.ENOTSUP)

    def stats(self, node: Node) -> dict:
        eng = self.cache.engine
        out = {"mount": dict(eng.stats(), **self.cache.counters,
                             prefetch_errors=self.cache.prefetch_failures,
                             prefetches_in_flight=self.cache.prefetches_in_flight,
                             kernel_drops=self.kernel_drops,
                             kernel_drops_pending=self.kernel_drops_pending,
                             files=sum(isinstance(n, File) for n in self.inodes.values()),
                             read_ahead_max_window=self.cache.max_window,
                             read_ahead_budget=self.cache.budget.total,
                             read_ahead_streams=self.cache.budget.active)}
        if isinstance(node, File):
            streams = [h.stream for h in self.handles.values()
                       if h.node is node and h.stream is not None]
            out["file"] = dict(eng.file_stats(node.fid), backing=node.path, shadow=node.shadow,
                               backing_in_memory=node.in_memory,
                               read_ahead_window=max((s.window for s in streams), default=0),
                               sequential_reads=sum(s.sequential for s in streams),
                               random_reads=sum(s.random for s in streams),
                               pushing=self.cache.gate(node.fid).closed == 0 and
                               self.cache.push and self.cache.notify_fd is not None)
        return out


def _parse_range(value: bytes) -> tuple[int, int | None]:
    """``b"OFFSET LENGTH"``, ``b"OFFSET"`` or ``b""`` (the whole file)."""
    parts = value.decode("ascii", "replace").split()
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise FsError(errno.EINVAL, "refresh takes \"OFFSET LENGTH\"") from None
    if len(nums) > 2 or any(n < 0 for n in nums):
        raise FsError(errno.EINVAL, "refresh takes \"OFFSET LENGTH\", both non-negative")
    return (nums[0] if nums else 0), (nums[1] if len(nums) == 2 else None)


_REOPEN_ERRNOS = {errno.EBADFD}


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


def _reachable(path: str, mode: int) -> bool:
    """access() with the thread's fs credentials (AT_EACCESS), path walk included."""
    return os.access(path, mode, effective_ids=True)


def _sup_groups(pid: int, gid: int) -> list[int]:
    """The requesting process's supplementary groups (from /proc)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return [gid]


def _walk_files(d: Dir):
    for child in d.children.values():
        if isinstance(child, Dir):
            yield from _walk_files(child)
        else:
            yield child


def _open_backing(path: str) -> tuple[int, bool]:
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
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FsError(errno.EINVAL, "%s is not a regular file" % path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, writable
