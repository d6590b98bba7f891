"""The pyfuse3 adapter: one thin method per FUSE operation.

Each method converts pyfuse3 arguments into plain values, calls the VFS core
(:mod:`shimfs.vfs`) and converts the answer back.  Errors become
``FUSEError`` in exactly one place, :func:`_errors`.
"""
from __future__ import annotations

import functools
import logging
import os

import pyfuse3

from .errors import fs_error
from .names import BLKSIZE
from .nodes import Attr, Ctx
from .vfs import Vfs

log = logging.getLogger(__name__)


def _errors(fn):
    """Turn whatever the VFS raises into a FUSEError with the right errno."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            err = fs_error(exc)
            if self.verbose:
                log.debug("%s%r -> %s", fn.__name__, args[:3], err)
            raise pyfuse3.FUSEError(err.errno) from None
    return wrapper


def _entry(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = a.timeout
    e.attr_timeout = a.timeout
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = 0
    e.st_size = a.size
    e.st_blksize = BLKSIZE
    e.st_blocks = (a.size + 511) // 512
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


def _ctx(ctx) -> Ctx:
    if ctx is None:
        return Ctx()
    return Ctx(ctx.uid, ctx.gid, ctx.pid, ctx.umask)


class ShimOperations(pyfuse3.Operations):
    """FUSE operations of a shimfs mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False   # writes reach the daemon; mmap write-back batches them
    enable_acl = False

    def __init__(self, vfs: Vfs):
        super().__init__()
        self.vfs = vfs
        self.verbose = vfs.config.verbose

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        return _entry(await self.vfs.lookup(parent_inode, name, _ctx(ctx)))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.vfs.forget(ino, n)

    @_errors
    async def getattr(self, inode, ctx=None):
        return _entry(await self.vfs.stat(inode))

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        return _entry(await self.vfs.setattr(
            inode, _ctx(ctx),
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None))

    @_errors
    async def readlink(self, inode, ctx):
        return self.vfs.readlink(inode)

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return _entry(await self.vfs.symlink(parent_inode, name, target, _ctx(ctx)))

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return _entry(await self.vfs.mknod(parent_inode, name, mode, _ctx(ctx)))

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return _entry(await self.vfs.mkdir(parent_inode, name, mode, _ctx(ctx)))

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.vfs.unlink(parent_inode, name, _ctx(ctx))

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.vfs.rmdir(parent_inode, name, _ctx(ctx))

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags,
                              _ctx(ctx))

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return _entry(await self.vfs.link(inode, new_parent_inode, new_name))

    @_errors
    async def opendir(self, inode, ctx):
        return self.vfs.opendir(inode, _ctx(ctx))

    @_errors
    async def readdir(self, fh, start_id, token):
        for name, attr, nxt in await self.vfs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, _entry(attr), nxt):
                break
            self.vfs.note_lookup(attr.ino)

    async def releasedir(self, fh):
        self.vfs.releasedir(fh)

    @_errors
    async def statfs(self, ctx):
        st = await self.vfs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = st.f_files
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = 255
        return s

    @_errors
    async def open(self, inode, flags, ctx):
        fh = await self.vfs.open(inode, flags, _ctx(ctx))
        try:
            keep = await self.vfs.revalidate(inode)
        except BaseException:
            await self.vfs.release(fh)
            raise
        # keep_cache: without it every open() drops the file's page cache,
        # even pages that another process has mapped.  Never direct_io: it
        # makes MAP_SHARED fail with ENODEV, the very thing shimfs fixes.
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, attr = await self.vfs.create(parent_inode, name, mode, flags, _ctx(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False), _entry(attr)

    @_errors
    async def read(self, fh, off, size):
        return await self.vfs.read(fh, off, size)

    @_errors
    async def write(self, fh, off, buf):
        return await self.vfs.write(fh, off, buf)

    @_errors
    async def flush(self, fh):
        await self.vfs.flush(fh)

    @_errors
    async def release(self, fh):
        await self.vfs.release(fh)

    @_errors
    async def fsync(self, fh, datasync):
        await self.vfs.fsync(fh, datasync)

    @_errors
    async def fallocate(self, fh, offset, length, mode):
        """Not a pyfuse3 handler (it has none): the compiled reader hands
        FALLOCATE requests over (mount._side_requests)."""
        await self.vfs.fallocate(fh, offset, length, mode)

    @_errors
    async def getxattr(self, inode, name, ctx):
        return self.vfs.getxattr(inode, os.fsdecode(name))

    @_errors
    async def listxattr(self, inode, ctx):
        return self.vfs.listxattr(inode)

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        await self.vfs.setxattr(inode, os.fsdecode(name), value, _ctx(ctx))

    @_errors
    async def removexattr(self, inode, name, ctx):
        await self.vfs.removexattr(inode, os.fsdecode(name))
