# cython: language_level=3
"""The C API of shimcore._creds: a thread takes a user's file-system
credentials and gives its own back (raw system calls, this thread only).
Used by the FUSE wire (shimfs._wire) to make backing calls as the
requester without the GIL."""
from libc.stdint cimport uint32_t

cdef enum:
    MAX_GROUPS = 256        # supplementary groups of a requester, at most

cdef struct Creds:          # a thread's fs credentials
    long uid
    long gid
    int ngroups
    unsigned int groups[MAX_GROUPS]

cdef int own_creds(Creds *c) noexcept nogil
cdef int groups_of(uint32_t pid, unsigned int *out, int cap) noexcept nogil
cdef bint take_creds(uint32_t uid, uint32_t gid, const unsigned int *groups, int n) noexcept nogil
cdef bint give_back(const Creds *c) noexcept nogil
