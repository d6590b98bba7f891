"""A FUSE pass-through that records what reaches the backing store, for the
durability tests: every WRITE, truncate and FSYNC of a file, in order, one
line each in an event log; and, while a flag file exists, FSYNC fails with
EIO (the data stays in the source file, unsynced).

    python tests/fsyncfs.py SOURCE MOUNTPOINT EVENTS FAIL_FLAG

shimfs mounted with ``backing=`` inside MOUNTPOINT then keeps its backing
files here, so a test sees from outside the daemon whether an msync, fsync,
``shimfs sync`` or sync xattr fsynced the backing file after its last write
before it returned.  Requests are served on the trio thread with plain
blocking calls: this is a probe, not a file system to measure.
"""
from __future__ import annotations

import errno
import os
import sys

import pyfuse3
import trio


class Recorder(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False      # every write() is a WRITE, in order

    def __init__(self, source: str, events: str, fail_flag: str):
        super().__init__()
        self.source = source
        self.fail_flag = fail_flag
        self.events = open(events, "a", buffering=1)
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.fh_path: dict[int, str] = {}

    def _log(self, *words) -> None:
        self.events.write(" ".join(str(w) for w in words) + "\n")

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.source)

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        e = pyfuse3.EntryAttributes()
        for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
                  "st_mtime_ns", "st_ctime_ns", "st_blocks"):
            setattr(e, k, getattr(st, k))
        e.st_ino = pyfuse3.ROOT_INODE if path == self.source else st.st_ino
        e.st_blksize = 4096
        e.entry_timeout = e.attr_timeout = 0
        self.paths[e.st_ino] = path
        return e

    @staticmethod
    def _oserror(fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    def _child(self, parent, name) -> str:
        return os.path.join(self.paths[parent], os.fsdecode(name))

    async def lookup(self, parent_inode, name, ctx=None):
        return self._oserror(self._attr, self._child(parent_inode, name))

    async def getattr(self, inode, ctx=None):
        return self._oserror(self._attr, self.paths[inode])

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self.paths[inode]
        if fields.update_size:
            self._oserror(os.truncate, path, attr.st_size)
            self._log("truncate", self._rel(path), attr.st_size)
        if fields.update_mode:
            self._oserror(os.chmod, path, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            self._oserror(os.chown, path, attr.st_uid if fields.update_uid else -1,
                          attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            self._oserror(os.utime, path, None, (
                attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attr(path)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        names = sorted(os.listdir(self.paths[fh]))
        for i, name in enumerate(names[start_id:], start_id):
            attr = self._attr(os.path.join(self.paths[fh], name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        self._oserror(os.mkdir, path, mode & 0o7777)
        return self._attr(path)

    async def rmdir(self, parent_inode, name, ctx):
        self._oserror(os.rmdir, self._child(parent_inode, name))

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        self._oserror(os.unlink, path)
        self._log("unlink", self._rel(path))

    async def rename(self, p_old, name_old, p_new, name_new, flags, ctx):
        self._oserror(os.rename, self._child(p_old, name_old), self._child(p_new, name_new))

    def _open_fd(self, path: str, flags: int, mode: int = 0o644) -> pyfuse3.FileInfo:
        fd = self._oserror(os.open, path, (flags & ~os.O_APPEND) | os.O_CLOEXEC, mode)
        self.fh_path[fd] = path
        return pyfuse3.FileInfo(fh=fd, keep_cache=False)

    async def open(self, inode, flags, ctx):
        return self._open_fd(self.paths[inode], flags & ~os.O_CREAT)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        info = self._open_fd(path, flags | os.O_CREAT, mode & 0o7777)
        self._log("create", self._rel(path))
        return info, self._attr(path)

    async def read(self, fh, off, size):
        return self._oserror(os.pread, fh, size, off)

    async def write(self, fh, off, buf):
        n = self._oserror(os.pwrite, fh, buf, off)
        self._log("write", self._rel(self.fh_path[fh]), off, n)
        return n

    async def fsync(self, fh, datasync):
        rel = self._rel(self.fh_path[fh])
        if os.path.exists(self.fail_flag):
            self._log("fsync-failed", rel)
            raise pyfuse3.FUSEError(errno.EIO)
        self._oserror(os.fsync, fh)
        self._log("fsync", rel)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self.fh_path.pop(fh, None)
        os.close(fh)

    async def statfs(self, ctx):
        st = os.statvfs(self.source)
        s = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail"):
            setattr(s, k, getattr(st, k))
        s.f_namemax = 255
        return s


def main(source: str, mountpoint: str, events: str, fail_flag: str) -> None:
    ops = Recorder(os.path.abspath(source), events, fail_flag)
    pyfuse3.init(ops, mountpoint, set(pyfuse3.default_options) | {"fsname=fsyncfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
