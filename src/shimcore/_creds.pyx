# cython: language_level=3
"""Per-thread file-system credentials: act on files as the requesting user.

Linux keeps fsuid, fsgid and the supplementary groups per thread at the
system-call level; glibc's setgroups() changes every thread of the process
(it signals them all), so the raw system calls are used here.  The daemon's
worker threads take a user's credentials for one call and give them back
before the thread serves anything else.
"""
from libc.stdlib cimport malloc, free

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)
    int getgroups(int size, unsigned int *list)

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_setfsuid
    long SYS_setfsgid
    long SYS_setgroups


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
