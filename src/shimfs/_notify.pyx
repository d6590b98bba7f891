# cython: language_level=3, boundscheck=False, wraparound=False
"""Talking to the kernel: FUSE notifications written to a session's /dev/fuse fd.

:class:`SessionKernel` is the :class:`shimfs.kernel.Kernel` of a real mount:

* ``inval_range``: FUSE_NOTIFY_INVAL_INODE for a byte range.  The kernel
  writes the range's dirty pages back to the daemon (synchronous WRITEs),
  then unmaps and drops those pages in every process.  pyfuse3 only offers
  the whole file, so the message is written here, as libfuse's
  fuse_lowlevel_notify_inval_inode() does.
* ``store``: FUSE_NOTIFY_STORE of a buffer: bytes copied into the kernel's
  page cache, seen at once by every mapping (in 1 MiB messages).
* ``push``: FUSE_NOTIFY_STORE of the engine's cached pages, written straight
  from the pinned arena slots (``PageCache.lend``, _engine.pxd) with one GIL
  release for the whole message.  A pure-Python engine (the fallback) gets
  the same through its ``cached_prefix`` and ``delivered``.

Every call blocks until the kernel is done, and INVAL_INODE makes the kernel
call back into the daemon: call them from worker threads, never from the
thread that serves requests (that would deadlock).  A kernel that no longer
knows an inode answers ENOENT, which is not an error here.
"""

import os

from libc.stdint cimport int64_t, uint64_t, uint32_t, int32_t
from libc.errno cimport errno, EINTR, ENOENT
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

from shimcore._engine cimport PageCache, FileRec, iovec, writev, MAX_RUN, PAGE

# <linux/fuse.h>: every message starts with fuse_out_header; a notification
# carries its code in ``error`` and 0 in ``unique``.
cdef struct OutHeader:
    uint32_t len
    int32_t error
    uint64_t unique

cdef struct InvalInode:      # fuse_notify_inval_inode_out
    OutHeader h
    uint64_t ino
    int64_t off
    int64_t len

cdef struct Store:           # fuse_notify_store_out, then the data
    OutHeader h
    uint64_t nodeid
    uint64_t offset
    uint32_t size
    uint32_t padding

cdef enum:
    FUSE_NOTIFY_INVAL_INODE = 2
    FUSE_NOTIFY_STORE = 4
    # Bytes of one NOTIFY_STORE from a buffer.
    STORE_CHUNK = 1 << 20


cdef int _send(int fd, iovec *iov, int n) noexcept nogil:
    """writev the whole message; 0 or an errno."""
    cdef ssize_t r
    while True:
        r = writev(fd, iov, n)
        if r < 0 and errno == EINTR:
            continue
        return errno if r < 0 else 0


cdef inline void _store_header(Store *msg, uint64_t ino, uint64_t off, uint32_t size) noexcept nogil:
    msg.h.len = sizeof(Store) + size
    msg.h.error = FUSE_NOTIFY_STORE
    msg.h.unique = 0
    msg.nodeid = ino
    msg.offset = off
    msg.size = size
    msg.padding = 0


cdef class SessionKernel:
    """The kernel of one FUSE session, reached through its /dev/fuse fd."""

    cdef readonly int fd
    #: Notifications reach a kernel (shimfs.kernel.Kernel.live).
    cdef public bint live

    def __cinit__(self, int fd):
        self.fd = fd
        self.live = True

    def inval_range(self, uint64_t ino, int64_t off, int64_t length):
        """Write back and drop the kernel's pages of [off, off+length) (length
        0: to the end); off < 0: attributes only."""
        cdef InvalInode msg
        cdef iovec iov[1]
        cdef int err
        msg.h.len = sizeof(InvalInode)
        msg.h.error = FUSE_NOTIFY_INVAL_INODE
        msg.h.unique = 0
        msg.ino = ino
        msg.off = off
        msg.len = length
        iov[0].iov_base = &msg
        iov[0].iov_len = sizeof(InvalInode)
        with nogil:
            err = _send(self.fd, iov, 1)
        if err and err != ENOENT:
            raise OSError(err, os.strerror(err))

    def store(self, uint64_t ino, uint64_t off, data):
        """Copy ``data`` (any buffer) into the kernel's cache of ``ino`` at ``off``."""
        cdef Py_buffer view
        cdef Store msg
        cdef iovec iov[2]
        cdef int err = 0
        cdef Py_ssize_t pos = 0, n
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                while pos < view.len:
                    n = view.len - pos
                    if n > STORE_CHUNK:
                        n = STORE_CHUNK
                    _store_header(&msg, ino, off + pos, <uint32_t>n)
                    iov[0].iov_base = &msg
                    iov[0].iov_len = sizeof(Store)
                    iov[1].iov_base = <char *>view.buf + pos
                    iov[1].iov_len = n
                    err = _send(self.fd, iov, 2)
                    if err:
                        break
                    pos += n
        finally:
            PyBuffer_Release(&view)
        if err and err != ENOENT:
            raise OSError(err, os.strerror(err))

    def push(self, engine, int64_t fid, uint64_t ino, int64_t off, int64_t length):
        """Copy the engine's cached prefix of [off, off+length) of file ``fid``
        (at most 4 MiB less a page, page-aligned ``off``) into the kernel's cache of
        ``ino``; return its bytes, 0 if none is cached or the kernel no longer
        knows the inode.  The caller makes sure the kernel holds no dirty
        page in the range (NOTIFY_STORE overwrites dirty pages) and that the
        size cannot shrink meanwhile (cache.PushGate)."""
        if off & (PAGE - 1):
            raise ValueError("push offset must be page aligned")
        if off < 0 or length < 0:
            raise ValueError("negative offset or size")
        if isinstance(engine, PageCache):
            return self._push_pinned(<PageCache>engine, fid, ino, off, length)
        data = engine.cached_prefix(fid, off, length)
        if not data:
            return 0
        cdef Store msg
        cdef iovec iov[2]
        cdef const unsigned char[:] buf = data
        cdef int err
        _store_header(&msg, ino, off, <uint32_t>len(data))
        iov[0].iov_base = &msg
        iov[0].iov_len = sizeof(Store)
        iov[1].iov_base = <void *>&buf[0]
        iov[1].iov_len = len(data)
        with nogil:
            err = _send(self.fd, iov, 2)
        if err == ENOENT:
            return 0
        if err:
            raise OSError(err, "notify store failed: " + os.strerror(err))
        engine.delivered(fid, off, len(data))
        return len(data)

    cdef int64_t _push_pinned(self, PageCache pc, int64_t fid, uint64_t ino, int64_t off,
                              int64_t length) except -1:
        cdef FileRec *fr = pc.record(fid)
        cdef int64_t slot_of[MAX_RUN]
        cdef iovec iov[MAX_RUN + 1]
        cdef Store msg
        cdef int64_t n, i, total = 0
        cdef int err = 0
        # one writev takes at most IOV_MAX (MAX_RUN) iovecs: the header and
        # MAX_RUN - 1 pages
        if length > (MAX_RUN - 1) * PAGE:
            length = (MAX_RUN - 1) * PAGE
        with nogil:
            n = pc.lend(fr, fid, off, off + length, slot_of, &iov[1])
            if n:
                for i in range(n):
                    total += iov[i + 1].iov_len
                _store_header(&msg, ino, off, <uint32_t>total)
                iov[0].iov_base = &msg
                iov[0].iov_len = sizeof(Store)
                err = _send(self.fd, iov, n + 1)
                pc.give_back(fr, slot_of, &iov[1], n, err == 0)
        if err == ENOENT:
            return 0
        if err:
            raise OSError(err, "notify store failed: " + os.strerror(err))
        return total
