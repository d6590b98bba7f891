"""The obvious baseline: a minimal pass-through in the style of pyfuse3's
examples/passthroughfs.py.  Every request does its blocking os call on the
trio thread; the kernel's page cache is used (no direct_io) so it can be
mapped.  Only what the benchmarks need: a flat directory of files, which
may be created and resized.

    python bench/passthrough.py SOURCE_DIR MOUNTPOINT
"""
from __future__ import annotations

import os
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str):
        super().__init__()
        self.source = source
        self.names: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.fds: dict[int, int] = {}

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        e = pyfuse3.EntryAttributes()
        for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
                  "st_mtime_ns", "st_ctime_ns"):
            setattr(e, k, getattr(st, k))
        e.st_ino = st.st_ino if path != self.source else pyfuse3.ROOT_INODE
        e.st_blksize = 4096
        e.st_blocks = st.st_blocks
        e.entry_timeout = e.attr_timeout = 1
        self.names[e.st_ino] = path
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        path = os.path.join(self.names[parent_inode], os.fsdecode(name))
        try:
            return self._attr(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)

    async def getattr(self, inode, ctx=None):
        return self._attr(self.names[inode])

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        names = sorted(os.listdir(self.names[fh]))
        for i, name in enumerate(names[start_id:], start_id):
            attr = self._attr(os.path.join(self.names[fh], name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def open(self, inode, flags, ctx):
        fd = os.open(self.names[inode], flags & ~os.O_CREAT)
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = os.path.join(self.names[parent_inode], os.fsdecode(name))
        try:
            fd = os.open(path, flags | os.O_CREAT, mode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno)
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._attr(path)

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self.names[inode]
        if fields.update_size:
            os.truncate(path, attr.st_size)
        return self._attr(path)

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh, datasync):
        os.fsync(fh)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(self.fds.pop(fh))

    async def statfs(self, ctx):
        return pyfuse3.StatvfsData()


def main(source: str, mountpoint: str) -> None:
    pyfuse3.init(Passthrough(os.path.abspath(source)), mountpoint,
                 set(pyfuse3.default_options) | {"fsname=passthrough"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
