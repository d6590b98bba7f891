# cython: language_level=3
"""Per-thread file-system credentials: act on files as the requesting user.

Linux keeps fsuid, fsgid and the supplementary groups per thread at the
system-call level; glibc's setgroups() changes every thread of the process
(it signals them all), so the raw system calls are used here.  The daemon's
worker threads take a user's credentials for one call and give them back
before the thread serves anything else: :func:`run_as` from Python, and the
C API of ``_creds.pxd`` (``take_creds``, ``give_back``, ``groups_of``) for
the FUSE wire's threads, without the GIL.
"""
from libc.stdlib cimport malloc, free, strtoul
from libc.string cimport strstr
from libc.stdio cimport snprintf
from posix.unistd cimport read, close
from posix.fcntl cimport open as c_open, O_RDONLY, O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)
    int getgroups(int size, unsigned int *list)

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_setfsuid
    long SYS_setfsgid
    long SYS_setgroups


cdef int own_creds(Creds *c) noexcept nogil:
    """This thread's fs credentials into ``c``; -1 if they cannot be read."""
    c.uid = syscall(SYS_setfsuid, <long>-1)
    c.gid = syscall(SYS_setfsgid, <long>-1)
    c.ngroups = getgroups(MAX_GROUPS, c.groups)
    return -1 if c.ngroups < 0 else 0


cdef int groups_of(uint32_t pid, unsigned int *out, int cap) noexcept nogil:
    """The supplementary groups of process ``pid`` (its /proc status), or
    -1 if they cannot be read or are more than ``cap``."""
    cdef char path[48]
    cdef char buf[4096]
    cdef char *p
    cdef char *end
    cdef int fd, k = 0
    cdef ssize_t n
    snprintf(path, sizeof(path), "/proc/%u/status", pid)
    fd = c_open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0:
        return -1
    n = read(fd, buf, sizeof(buf) - 1)
    close(fd)
    if n <= 0:
        return -1
    buf[n] = 0
    p = strstr(buf, "\nGroups:")
    if p == NULL:
        return -1
    p += 8
    while True:
        while p[0] == 32 or p[0] == 9:
            p += 1
        if p[0] < 48 or p[0] > 57:
            break
        if k == cap:
            return -1
        out[k] = <unsigned int>strtoul(p, &end, 10)
        k += 1
        p = end
    if p[0] != 10:
        return -1           # the line was cut off
    return k


cdef bint take_creds(uint32_t uid, uint32_t gid, const unsigned int *groups, int n) noexcept nogil:
    """Take a user's fs credentials in this thread; False if any did not
    take (the caller gives its own back with :func:`give_back`)."""
    if syscall(SYS_setgroups, n, groups) != 0:
        return False
    syscall(SYS_setfsgid, <long>gid)
    syscall(SYS_setfsuid, <long>uid)
    return syscall(SYS_setfsuid, <long>-1) == uid and syscall(SYS_setfsgid, <long>-1) == gid


cdef bint give_back(const Creds *c) noexcept nogil:
    """Give this thread the credentials ``c`` back; False if it cannot."""
    syscall(SYS_setfsuid, c.uid)
    syscall(SYS_setfsgid, c.gid)
    if syscall(SYS_setgroups, c.ngroups, c.groups) != 0:
        return False
    return syscall(SYS_setfsuid, <long>-1) == c.uid and syscall(SYS_setfsgid, <long>-1) == c.gid


cdef int _setgroups(list groups) except -1:
    cdef int n = len(groups), i
    cdef unsigned int *buf = <unsigned int *>malloc(max(n, 1) * sizeof(unsigned int))
    if not buf:
        raise MemoryError()
    try:
        for i in range(n):
            buf[i] = groups[i]
        if syscall(SYS_setgroups, n, buf) != 0:
            raise PermissionError("setgroups failed (is the daemon root?)")
    finally:
        free(buf)
    return 0


def run_as(unsigned int uid, unsigned int gid, groups, fn, *args):
    """Call ``fn(*args)`` in this thread with fsuid/fsgid/groups of a user."""
    cdef int n = getgroups(0, NULL)
    cdef unsigned int *saved = <unsigned int *>malloc(max(n, 1) * sizeof(unsigned int))
    cdef long old_uid, old_gid
    if not saved:
        raise MemoryError()
    n = getgroups(n, saved)
    old_groups = [saved[i] for i in range(n)]
    free(saved)
    _setgroups(list(groups))
    old_gid = syscall(SYS_setfsgid, gid)
    old_uid = syscall(SYS_setfsuid, uid)
    try:
        if syscall(SYS_setfsuid, <long>-1) != uid or syscall(SYS_setfsgid, <long>-1) != gid:
            raise PermissionError("cannot take the credentials of uid %d" % uid)
        return fn(*args)
    finally:
        syscall(SYS_setfsuid, old_uid)
        syscall(SYS_setfsgid, old_gid)
        _setgroups(old_groups)
