"""What the namespace is made of: directories, files, open handles, and the
plain values (attributes, the requester) that cross the adapter.

These are data, shared by every room of the VFS; they do no I/O.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import trio

from .names import TIMEOUT


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
    """A regular file: a shadow of some backing file, one created here, or
    (``-o mirror``) one found in the backing tree.

    A file found in the backing tree is *unopened* until its first open
    (``fd`` and ``fid`` are -1, its attributes come from the backing
    file's stat): listing a large tree opens nothing.
    """

    def __init__(self, ino, parent, name, st, fd: int, fid: int, path: str,
                 shadow: bool, writable: bool, in_memory: bool = False):
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
        # The backing file was removed or replaced behind the daemon's back:
        # the name was taken from this node (Namespace.still_bound), its open
        # handles keep it, and its write-backs answer ESTALE (WriteBack).
        self.lost = False
        self.fresh = False          # opened just now by ensure_open (no revalidate needed)
        # The backing file's stat taken by the open under way (Files.open,
        # Namespace.still_bound), and ``seen`` then, for Coherence.revalidate:
        # it stands in for an fstat while ``seen`` is unchanged (nothing the
        # daemon did to the file since, such as a truncate or a write-back).
        self.checked: tuple | None = None
        self.seen = (st.st_size, st.st_mtime_ns)   # backing state last seen
        self.ident = (st.st_dev, st.st_ino)        # to reopen the very same file
        # tmpfs or ramfs: no read-ahead, misses read inline (cache.AsyncCache.read)
        self.in_memory = in_memory
        self.grant = None           # cluster.Grant, on a coherent mount once opened
        # Touched at random: opens get the narrow read-around window
        # (OpenFiles.open_handle), until a narrow handle is seen scanning.
        self.random_faults = False
        self.refused_seen = 0       # the engine's read_arounds_refused at the last open

    def backing_path(self) -> str:
        return self.path

    @property
    def opened(self) -> bool:
        return self.fid >= 0

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
        at the flusher's next tick (``WriteBack.publish_mtimes``), so a file
        kept open shows its writes within ``writeback_interval`` seconds.
        ctime does not invalidate anything and moves at once.
        """
        self.ctime_ns = self.written_ns = time.time_ns()
        self.mtime_due = True
        if not self.writers:
            self.publish_mtime()

    def publish_mtime(self) -> bool:
        """Show the time of the last write as mtime, if it is not shown yet;
        True if the mtime changed."""
        if self.mtime_due:
            self.mtime_due = False
            self.mtime_ns = self.written_ns
            return True
        return False


class DirHandle:
    """One opendir: whose it is, and the entries it has shown or will show
    (taken when reading starts, so that later pages do not shift).  With
    ``-o mirror`` they grow as the backing directory is read (``listing``,
    a listing.Listing; ``seen``, the names it gave so far)."""
    __slots__ = ("node", "ctx", "entries", "listing", "seen")

    def __init__(self, node, ctx):
        self.node = node
        self.ctx = ctx
        self.entries = None
        self.listing = None
        self.seen = None


class Handle:
    """One open file description: its node, read-ahead stream and access;
    ``narrow``: opened with the narrow read-around window (files.py)."""
    __slots__ = ("fh", "node", "stream", "writable", "narrow")

    def __init__(self, fh, node, stream, writable, narrow=False):
        self.fh = fh
        self.node = node
        self.stream = stream
        self.writable = writable
        self.narrow = narrow
