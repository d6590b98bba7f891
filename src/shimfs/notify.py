"""Notifications from the daemon to the kernel's page cache (refresh).

* ``inval_range`` sends FUSE_NOTIFY_INVAL_INODE for a byte range: the kernel
  writes the range's dirty pages back to the daemon (synchronous WRITEs), then
  unmaps and drops those pages in every process.  pyfuse3 only offers the
  whole file, so the message is written to the session's /dev/fuse fd, as
  libfuse's fuse_lowlevel_notify_inval_inode() does.
* ``store`` is pyfuse3.notify_store: bytes copied into the page cache, seen at
  once by every mapping.

Both block until the kernel is done and the first one calls back into the
daemon, so they must run in a worker thread, never on the trio thread that
serves requests (that would deadlock).
"""
from __future__ import annotations

import errno
import os
import struct

import pyfuse3

FUSE_NOTIFY_INVAL_INODE = 2
_HEADER = struct.Struct("=IiQ")          # fuse_out_header: len, error (= notify code), unique
_INVAL_INODE = struct.Struct("=Qqq")     # fuse_notify_inval_inode_out: ino, off, len
STORE_CHUNK = 1 << 20


def find_session_fd() -> int | None:
    """The daemon's open /dev/fuse descriptor (there is one per session)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name) == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


class KernelNotifier:
    def __init__(self, fd: int | None):
        self.fd = fd

    def inval_range(self, ino: int, off: int, length: int) -> None:
        """Write back and drop the kernel's pages of [off, off+length); off < 0: attributes only."""
        if self.fd is None:
            return
        msg = _INVAL_INODE.pack(ino, off, length)
        try:
            os.write(self.fd, _HEADER.pack(_HEADER.size + len(msg), FUSE_NOTIFY_INVAL_INODE, 0) + msg)
        except OSError as exc:
            if exc.errno != errno.ENOENT:     # the kernel holds no inode of that number
                raise

    def store(self, ino: int, off: int, data: bytes) -> None:
        """Copy ``data`` into the kernel's cache at ``off`` (in 1 MiB messages)."""
        view = memoryview(data)
        for pos in range(0, len(view), STORE_CHUNK):
            try:
                pyfuse3.notify_store(ino, off + pos, bytes(view[pos:pos + STORE_CHUNK]))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                return
