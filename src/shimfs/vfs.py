"""The shimfs file system without FUSE: the rooms of the VFS, composed.

:class:`Vfs` builds one of each room and hands every room what it works on:

* :mod:`~shimfs.namespace`: names, inodes, shadows, directories;
* :mod:`~shimfs.credentials`: acting as the requesting user;
* :mod:`~shimfs.files`: open handles, READ, WRITE, truncate, attributes;
* :mod:`~shimfs.writeback`: the flusher, background and durable write-back;
* :mod:`~shimfs.coherence`: close-to-open reloads, refresh, multiwrite;
* :mod:`~shimfs.control`: the ``user.shimfs.*`` xattrs and the stats;
* :mod:`~shimfs.cluster` (``-o coherence``): grants across nodes.

Its attributes named after FUSE operations are the rooms' own methods, bound
once here, so a request costs no extra call.  Every method takes plain
Python values and returns :class:`~shimfs.nodes.Attr` objects; the pyfuse3
adapter (:mod:`shimfs.fuseops`) converts.  The engine is reached only
through the façade (:class:`~shimfs.cache.AsyncCache`), and the kernel only
through the :class:`~shimfs.kernel.Kernel` the adapter supplies
(:meth:`attach_kernel`), so this module imports no FUSE binding.  See
docs/design.md for who runs where.
"""
from __future__ import annotations

import errno
import os
import stat

from .cache import AsyncCache
from .coherence import Coherence
from .config import Config
from .control import Control
from .credentials import Credentials
from .errors import FsError
from .files import OpenFiles
from .kernel import Kernel
from .namespace import Namespace
from .nodes import Attr, Ctx
from .writeback import WriteBack


class Vfs:
    """All file-system operations, kernel-free; the adapter calls these."""

    def __init__(self, config: Config, cache: AsyncCache | None = None):
        self.config = config
        self.cache = cache or AsyncCache(config.cache_size, config.read_ahead_bytes,
                                         push=config.push)
        self.creds = Credentials(self.cache, config.allowed_roots)
        self.namespace = ns = Namespace(config, self.cache, self.creds)
        self.writeback = wb = WriteBack(config, self.cache, ns)
        self.files = files = OpenFiles(config, self.cache, ns, self.creds, wb)
        self.coherence = coh = Coherence(self.cache, ns)
        self.control = ctl = Control(self.cache, ns, files, wb, coh)
        # The operations, straight to the room that owns each.
        self.lookup, self.forget, self.getattr = ns.lookup, ns.forget, ns.getattr
        self.readlink, self.symlink, self.mkdir = ns.readlink, ns.symlink, ns.mkdir
        self.unlink, self.rmdir, self.rename, self.link = ns.unlink, ns.rmdir, ns.rename, ns.link
        self.opendir, self.readdir, self.note_lookup = ns.opendir, ns.readdir, ns.note_lookup
        self.releasedir = ns.releasedir
        self.statfs = ns.statfs
        self.open, self.read, self.write = files.open, files.read, files.write
        self.flush, self.fsync, self.release = files.flush, files.fsync, files.release
        self.setattr, self.fallocate = files.setattr, files.fallocate
        self.revalidate = coh.revalidate
        self.listxattr, self.getxattr = ctl.listxattr, ctl.getxattr
        self.setxattr, self.removexattr = ctl.setxattr, ctl.removexattr
        self.stats = ctl.stats
        self.flusher, self.sync_all, self.close_all = wb.flusher, wb.sync_all, wb.close_all
        self.publish_mtimes = wb.publish_mtimes
        self.cluster = None                 # attach_cluster

    # Tables the tests and the stats look at.
    @property
    def inodes(self):
        return self.namespace.inodes

    @property
    def links(self):
        return self.namespace.links

    @property
    def handles(self):
        return self.files.handles

    def attach_cluster(self, grants) -> None:
        """Coherence across nodes (``-o coherence``): every file opened or
        created from now on is kept under the book ``grants`` (cluster.py)."""
        from .cluster import Cluster
        self.cluster = cl = Cluster(grants, self.cache, self.files, self.writeback,
                                     self.coherence)
        self.files.cluster = cl
        self.namespace.on_free = cl.leave
        self.lookup = self._lookup_coherent
        self.control.cluster = cl

    async def stat(self, ino: int) -> Attr:
        """GETATTR.  A coherent file's size and times are those of the
        latest write on any node: they are answered under its grant."""
        node = self.namespace.inodes.get(ino)
        if self.cluster is not None:
            g = getattr(node, "grant", None)
            if g is not None and self.cluster.state(g, self.cluster.for_size()) is None:
                await self.cluster.need(g, self.cluster.for_size())
        if getattr(node, "writers", 0):
            self.files.take_written(node)   # ctime of WRITEs the wire took
        return self.namespace.getattr(ino)

    async def _lookup_coherent(self, parent_ino: int, name: bytes, ctx: Ctx = Ctx()) -> Attr:
        attr = await self.namespace.lookup(parent_ino, name, ctx)
        g = getattr(self.namespace.inodes.get(attr.ino), "grant", None)
        if g is not None and self.cluster.state(g, self.cluster.for_size()) is None:
            await self.cluster.need(g, self.cluster.for_size())
            attr = self.namespace.getattr(attr.ino)
        return attr

    def attach_kernel(self, kernel: Kernel) -> None:
        """The mount's kernel: notifications and pushes go to it from now on."""
        self.coherence.kernel = kernel
        self.cache.kernel = kernel

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
                     ctx: Ctx) -> tuple[int, Attr]:
        """Open ``name``, making it first unless it exists; returns (handle, attr)."""
        node, made = await self.namespace.create(parent_ino, name, mode, flags, ctx)
        if made:
            await self.files.join(node, True)
            fh = await self.files.open_handle(node, True)
        else:
            fh = await self.files.open(node.ino, flags, ctx)
        return fh, self.namespace.attr(node)

    async def mknod(self, parent_ino: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        if not stat.S_ISREG(mode):
            raise FsError(errno.EPERM, "shimfs holds only regular files and directories")
        fh, attr = await self.create(parent_ino, name, mode, os.O_EXCL, ctx)
        await self.files.release(fh)
        return attr
