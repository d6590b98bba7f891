# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled page cache: the data path between requests and backing files.

One :class:`PageCache` owns a fixed arena of page slots (``cache_size`` bytes
of anonymous memory), an open-addressing table from (file, page) to slot, a
dirty bitmap per file, and the ``preadv``/``pwritev`` loops that move pages
between the arena and the backing file descriptors.

Concurrency (see docs/design.md): every public method may be called from any
thread.  All metadata (table, slot states, bitmaps, sizes, counters) is guarded
by one pthread mutex that is only ever taken with the GIL released, and never
held across a system call.  Slots are *pinned* while a thread copies into or
out of them outside the mutex, and a pinned or LOADING slot is never evicted
or reused.  The engine knows nothing of FUSE or trio: it lends pinned pages
to other compiled modules through the C API in _engine.pxd (``lend`` and
``give_back``), and shimfs._notify writes them to the kernel.
"""

import os

from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t, int32_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EINTR, EIO, EBUSY, ENOMEM
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.ref cimport Py_INCREF, Py_DECREF
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

# The C declarations, constants, structs and PageCache's fields and C methods
# are in _engine.pxd.


cdef inline uint64_t _hash(int64_t f, int64_t p) nogil:
    cdef uint64_t h = <uint64_t>p * 0x9E3779B97F4A7C15ULL
    h ^= <uint64_t>f * 0xC2B2AE3D27D4EB4FULL
    h ^= h >> 29
    return h


cdef inline void _clip(int64_t page, int64_t offset, int64_t end,
                       int64_t *a, int64_t *b) noexcept nogil:
    """The part [a, b) of byte range [offset, end) that falls in ``page``."""
    a[0] = page * PAGE
    b[0] = a[0] + PAGE
    if a[0] < offset:
        a[0] = offset
    if b[0] > end:
        b[0] = end


cdef int64_t _span(FileRec *fr, int64_t offset, int64_t size,
                   int64_t *p0, int64_t *p1) except -1:
    """Clamp [offset, offset+size) to the cached size; return its end and its pages [p0, p1)."""
    cdef int64_t end
    if offset < 0 or size < 0:
        raise ValueError("negative offset or size")
    end = offset + size
    if end > fr.size:
        end = fr.size
    p0[0] = offset >> PAGE_SHIFT
    p1[0] = (end + PAGE - 1) >> PAGE_SHIFT
    return end


cdef int _pread_full(int fd, char *buf, int64_t n, int64_t off) noexcept nogil:
    """Read n bytes at off, retrying short reads; bytes past EOF read as zeros.
    Returns 0 or an errno."""
    cdef int64_t got = 0
    cdef ssize_t r
    while got < n:
        r = pread(fd, buf + got, n - got, off + got)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        if r == 0:
            memset(buf + got, 0, n - got)
            break
        got += r
    return 0


class EngineError(OSError):
    """An OSError raised by the engine; ``errno`` says what failed."""




cdef inline bint _is_zero(FileRec *fr, int64_t p) noexcept nogil:
    """Whether page p is known to be zeros in the backing file (mu held)."""
    return (p >> 6) < fr.znwords and (fr.zero[p >> 6] >> (p & 63)) & 1


cdef void _free_rec(FileRec *fr) noexcept nogil:
    free(fr.dirty)
    free(fr.zero)
    free(fr)


cdef void *_prefetch_thread(void *arg) noexcept with gil:
    """Body of an engine prefetch thread: holds a reference to its PageCache
    (taken over from prefetch_async, which took it before starting the
    thread), so the engine outlives it; runs without the GIL until idle."""
    cdef PageCache pc = <PageCache>arg
    Py_DECREF(pc)                       # the creator's reference; pc holds its own
    with nogil:
        pc._prefetch_loop()
    return NULL


cdef class PageCache:
    """A bounded cache of 4 KiB pages of many backing files.

    ``cache_size`` bytes are reserved as anonymous memory (touched lazily, so
    resident memory grows with use).  Files are registered with
    :meth:`register` and addressed by the returned integer id.
    """

    def __cinit__(self, size_t cache_size):
        pthread_mutex_init(&self.mu, NULL)
        pthread_cond_init(&self.loaded, NULL)
        pthread_cond_init(&self.pq_ready, NULL)
        self.nslots = max(<int64_t>(cache_size // PAGE), 16)
        self.arena_len = <size_t>self.nslots * PAGE
        self.arena = <char *>mmap(NULL, self.arena_len, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if <void *>self.arena == MAP_FAILED:
            self.arena = NULL
            raise MemoryError("cannot reserve %d bytes for the page cache" % self.arena_len)
        # Fault the whole arena in now, at mount, rather than one page at a
        # time under the first cache_size bytes of I/O: that cost the daemon
        # ~65,000 page faults per 256 MiB inside its first reads (a 2 GiB
        # scan: 85-115k faults -> 20-40k, daemon CPU 1.64-1.78 -> 1.49-1.54 s,
        # mount +0.1 s; docs/performance.md).  Only a hint: a kernel without
        # MADV_POPULATE_WRITE, or short of memory, faults pages on demand.
        with nogil:
            madvise(self.arena, self.arena_len, MADV_POPULATE_WRITE)
        self.slots = <Slot *>calloc(self.nslots, sizeof(Slot))
        cdef int64_t tsize = 1
        while tsize < 2 * self.nslots:
            tsize <<= 1
        self.table = <int32_t *>malloc(tsize * sizeof(int32_t))
        self.freelist = <int64_t *>malloc(self.nslots * sizeof(int64_t))
        self.spent = <int32_t *>malloc(self.nslots * sizeof(int32_t))
        self.nfiles_cap = 64
        self.files = <FileRec **>calloc(self.nfiles_cap, sizeof(FileRec *))
        if not self.slots or not self.table or not self.freelist or not self.spent \
                or not self.files:
            raise MemoryError()
        self.tmask = tsize - 1
        cdef int64_t i
        for i in range(tsize):
            self.table[i] = -1
        for i in range(self.nslots):
            self.slots[i].file = -1
            self.freelist[i] = self.nslots - 1 - i
        self.nfree = self.nslots

    def __dealloc__(self):
        cdef int64_t i
        if self.files:
            for i in range(self.nfiles_cap):
                if self.files[i]:
                    _free_rec(self.files[i])
            free(self.files)
        free(self.slots)
        free(self.table)
        free(self.freelist)
        free(self.spent)
        if self.arena:
            munmap(self.arena, self.arena_len)
        if self.twins:
            munmap(self.twins, self.arena_len)
        pthread_mutex_destroy(&self.mu)
        pthread_cond_destroy(&self.loaded)
        pthread_cond_destroy(&self.pq_ready)

    # ------------------------------------------------------------------
    # table (caller holds mu)
    cdef inline int64_t _find(self, int64_t f, int64_t p) noexcept nogil:
        cdef int64_t i = _hash(f, p) & self.tmask
        cdef int32_t s
        while True:
            s = self.table[i]
            if s < 0:
                return -1
            if self.slots[s].file == f and self.slots[s].page == p:
                return s
            i = (i + 1) & self.tmask

    cdef inline void _insert(self, int64_t s) noexcept nogil:
        cdef int64_t i = _hash(self.slots[s].file, self.slots[s].page) & self.tmask
        while self.table[i] >= 0:
            i = (i + 1) & self.tmask
        self.table[i] = <int32_t>s

    cdef void _remove(self, int64_t s) noexcept nogil:
        """Take slot s out of the table (backward-shift deletion)."""
        cdef int64_t i = _hash(self.slots[s].file, self.slots[s].page) & self.tmask
        cdef int64_t j, k
        cdef int32_t t
        while self.table[i] != s:
            i = (i + 1) & self.tmask
        j = i
        while True:
            j = (j + 1) & self.tmask
            t = self.table[j]
            if t < 0:
                break
            k = _hash(self.slots[t].file, self.slots[t].page) & self.tmask
            # move t into the hole at i unless its home k lies cyclically in (i, j]
            if (j > i and (k <= i or k > j)) or (j < i and (k <= i and k > j)):
                self.table[i] = t
                i = j
        self.table[i] = -1

    cdef void _release_slot(self, int64_t s) noexcept nogil:
        """Forget slot s entirely and put it on the free list."""
        cdef FileRec *fr
        if self.slots[s].file >= 0 and self.slots[s].file < self.nfiles_cap:
            fr = self.files[self.slots[s].file]
            if fr:
                fr.cached -= 1
        self.slots[s].file = -1
        self.slots[s].state = S_FREE
        self.slots[s].dirty = 0
        self.slots[s].orphan = 0
        self.slots[s].pins = 0
        self.freelist[self.nfree] = s
        self.nfree += 1

    cdef void _drop(self, int64_t s) noexcept nogil:
        """Remove s from the table; free it now or on its last unpin."""
        self._remove(s)
        if self.slots[s].pins:
            self.slots[s].orphan = 1
        else:
            self._release_slot(s)

    cdef inline void _unpin(self, int64_t s) noexcept nogil:
        self.slots[s].pins -= 1
        if self.slots[s].pins == 0 and self.slots[s].orphan:
            self._release_slot(s)

    cdef int64_t _alloc(self, int64_t f, int64_t p) noexcept nogil:
        """A pinned LOADING slot for (f, p), or -1 if every slot is busy or dirty.

        The victim is a free slot, else the oldest spent one that is still
        clean and idle, else whatever CLOCK finds.
        """
        cdef int64_t s
        if self.nfree:
            self.nfree -= 1
            s = self.freelist[self.nfree]
        else:
            s = self._take_spent()
            if s < 0:
                s = self._clock()
                if s < 0:
                    return -1
        self.slots[s].file = f
        self.slots[s].page = p
        self.slots[s].state = S_LOADING
        self.slots[s].dirty = 0
        self.slots[s].orphan = 0
        self.slots[s].ref = 1
        self.slots[s].spent = 0
        self.slots[s].pins = 1
        self._insert(s)
        self.files[f].cached += 1
        return s

    cdef inline void _spend(self, int64_t s) noexcept nogil:
        """Slot s has gone to the kernel, or came from it and is written back.

        Then the kernel's own page cache holds the same bytes, and it asks
        for them again only after it dropped its copy.  Pages prefetched but
        not asked for yet are worth more: evicting one costs a second backing
        read.  CLOCK alone does not tell them apart; with few clean pages (a
        mapped write keeps most of the cache dirty) its hand goes round
        faster than the reader advances and evicted a fifth of the
        prefetched pages before their READ came (measured 2026-11-23).  So
        spent slots queue up here, oldest first, and _alloc takes
        them before asking CLOCK.  A slot is queued once per use; an entry
        whose slot was reused, dirtied or pinned since is skipped.
        """
        if self.slots[s].spent:
            return
        self.slots[s].spent = 1
        self.slots[s].ref = 0
        if self.sp_len < self.nslots:
            self.spent[(self.sp_head + self.sp_len) % self.nslots] = <int32_t>s
            self.sp_len += 1

    cdef int64_t _clock(self) noexcept nogil:
        """Evict the next clean, idle slot whose reference bit is clear; return it free, or -1."""
        cdef int64_t s, n = 0
        while n < 2 * self.nslots:
            n += 1
            s = self.hand
            self.hand += 1
            if self.hand == self.nslots:
                self.hand = 0
            if self.slots[s].pins or self.slots[s].state != S_VALID or self.slots[s].dirty:
                continue
            if self.slots[s].ref:
                self.slots[s].ref = 0
                continue
            self.evictions += 1
            if self.files[self.slots[s].file].multiwrite:
                self._note_twin_lost(self.slots[s].file, self.slots[s].page)
            self._drop(s)
            self.nfree -= 1
            return self.freelist[self.nfree]
        return -1

    cdef int64_t _take_spent(self) noexcept nogil:
        """Drop the oldest spent slot that is clean and idle; return it free, or -1."""
        cdef int64_t s
        while self.sp_len:
            s = self.spent[self.sp_head]
            self.sp_head = (self.sp_head + 1) % self.nslots
            self.sp_len -= 1
            if self.slots[s].file < 0 or not self.slots[s].spent:
                continue            # freed, or reused since it was queued
            if self.slots[s].pins or self.slots[s].dirty or self.slots[s].state != S_VALID \
                    or self.slots[s].orphan or self.files[self.slots[s].file].multiwrite:
                # in use again (or multiwrite, whose evictions CLOCK notes as lost
                # twins): out of the queue until it is spent once more
                self.slots[s].spent = 0
                continue
            self.slots[s].spent = 0
            self.evictions += 1
            self.spent_evictions += 1
            self._drop(s)
            self.nfree -= 1
            return self.freelist[self.nfree]
        return -1

    cdef void _note_twin_lost(self, int64_t f, int64_t p) noexcept nogil:
        if self.nlost < LOST_MAX:
            self.lost[self.nlost][0] = f
            self.lost[self.nlost][1] = p
            self.nlost += 1
        else:
            self.lost_overflow += 1
            self.lost[LOST_MAX - 1][0] = f
            self.lost[LOST_MAX - 1][1] = -1      # -1: the whole file

    cdef int64_t _any_dirty_file(self) noexcept nogil:
        cdef int64_t i
        for i in range(self.nfiles_cap):
            if self.files[i] != NULL and self.files[i].ndirty != 0 and self.files[i].zombie == 0:
                return i
        return -1

    # ------------------------------------------------------------------
    # dirty bitmap (caller holds mu)
    cdef int _bitmap_fit(self, FileRec *fr, int64_t page) noexcept nogil:
        cdef int64_t need = page // 64 + 1, n
        cdef uint64_t *nb
        if need <= fr.nwords:
            return 0
        n = max(need, 2 * fr.nwords)
        nb = <uint64_t *>realloc(fr.dirty, n * sizeof(uint64_t))
        if not nb:
            return -1
        memset(nb + fr.nwords, 0, (n - fr.nwords) * sizeof(uint64_t))
        fr.dirty = nb
        fr.nwords = n
        return 0

    cdef inline void _set_dirty(self, FileRec *fr, int64_t s) noexcept nogil:
        cdef int64_t p = self.slots[s].page
        cdef uint64_t bit = 1ULL << (p & 63)
        if not self.slots[s].dirty:
            self.slots[s].dirty = 1
        if not (fr.dirty[p >> 6] & bit):
            fr.dirty[p >> 6] |= bit
            fr.ndirty += 1
            self.ndirty += 1
        # written here: once written back, the backing file holds these bytes
        if p >> 6 < fr.znwords:
            fr.zero[p >> 6] &= ~bit

    cdef inline void _clear_dirty(self, FileRec *fr, int64_t p) noexcept nogil:
        cdef uint64_t bit = 1ULL << (p & 63)
        if p >> 6 < fr.nwords and fr.dirty[p >> 6] & bit:
            fr.dirty[p >> 6] &= ~bit
            fr.ndirty -= 1
            self.ndirty -= 1

    cdef int64_t _next_dirty(self, FileRec *fr, int64_t p) noexcept nogil:
        """First dirty page >= p, or -1."""
        cdef int64_t w = p >> 6
        cdef uint64_t word
        if w >= fr.nwords:
            return -1
        word = fr.dirty[w] & (~0ULL << (p & 63))
        while True:
            if word:
                return (w << 6) + __builtin_ctzll(word)
            w += 1
            if w >= fr.nwords:
                return -1
            word = fr.dirty[w]

    # ------------------------------------------------------------------
    # known-zero bitmap (caller holds mu)
    cdef void _zero_set(self, FileRec *fr, int64_t p0, int64_t p1) noexcept nogil:
        """Mark pages [p0, p1) known zeros.  Pages past ZERO_MAX_PAGES, or all
        of them when memory is short, stay unmarked: they are then read from
        the backing file, which is slower but never wrong."""
        cdef int64_t need, n, p
        cdef uint64_t *nb
        p1 = min(p1, <int64_t>ZERO_MAX_PAGES)
        if p0 >= p1:
            return
        need = (p1 + 63) >> 6
        if need > fr.znwords:
            n = min(max(need, 2 * fr.znwords), (<int64_t>ZERO_MAX_PAGES) >> 6)
            nb = <uint64_t *>realloc(fr.zero, n * sizeof(uint64_t))
            if not nb:
                return
            memset(nb + fr.znwords, 0, (n - fr.znwords) * sizeof(uint64_t))
            fr.zero = nb
            fr.znwords = n
        p = p0
        while p < p1 and p & 63:
            fr.zero[p >> 6] |= 1ULL << (p & 63)
            p += 1
        while p + 64 <= p1:
            fr.zero[p >> 6] = ~0ULL
            p += 64
        while p < p1:
            fr.zero[p >> 6] |= 1ULL << (p & 63)
            p += 1

    cdef inline void _count_zeros(self, FileRec *fr, int64_t pages) noexcept nogil:
        """One fetch answered with ``pages`` pages of zeros instead of a backing read."""
        if pages:
            fr.zero_fills += 1
            fr.zero_fill_pages += pages
            self.zero_fills += 1
            self.zero_fill_pages += pages

    cdef void _zero_clear(self, FileRec *fr, int64_t p0, int64_t p1) noexcept nogil:
        """Forget that pages [p0, p1) are zeros (p1 < 0: up to the end)."""
        cdef int64_t p
        if p1 < 0 or p1 > fr.znwords * 64:
            p1 = fr.znwords * 64
        p = max(p0, 0)
        while p < p1 and p & 63:
            fr.zero[p >> 6] &= ~(1ULL << (p & 63))
            p += 1
        while p + 64 <= p1:
            fr.zero[p >> 6] = 0
            p += 64
        while p < p1:
            fr.zero[p >> 6] &= ~(1ULL << (p & 63))
            p += 1

    # ------------------------------------------------------------------
    cdef FileRec *record(self, int64_t fid) except NULL:
        if fid < 0 or fid >= self.nfiles_cap or self.files[fid] == NULL or self.files[fid].zombie != 0:
            raise KeyError("no such file id %d" % fid)
        return self.files[fid]

    def register(self, int fd, int64_t size):
        """Start caching backing file descriptor ``fd`` of ``size`` bytes; return its id."""
        cdef int64_t i, fid = -1
        cdef FileRec **nf
        cdef FileRec *fr = <FileRec *>calloc(1, sizeof(FileRec))
        if not fr:
            raise MemoryError()
        fr.fd = fd
        fr.size = size
        with nogil:
            pthread_mutex_lock(&self.mu)
            for i in range(self.nfiles_cap):
                if not self.files[i]:
                    fid = i
                    break
            if fid < 0:
                nf = <FileRec **>realloc(self.files, 2 * self.nfiles_cap * sizeof(FileRec *))
                if nf:
                    memset(nf + self.nfiles_cap, 0, self.nfiles_cap * sizeof(FileRec *))
                    fid = self.nfiles_cap
                    self.files = nf
                    self.nfiles_cap *= 2
            if fid >= 0:
                self.files[fid] = fr
            pthread_mutex_unlock(&self.mu)
        if fid < 0:
            free(fr)
            raise MemoryError()
        return fid

    def unregister(self, int64_t fid):
        """Forget a file and all its pages, dirty ones included (flush first).

        Queued prefetch_async items of the file are cancelled.  If one is
        running, the record stays (a *zombie*: unknown to every call, its id
        not reused) until that prefetch ends; the caller may close the fd at
        once -- the running read then fails or reads into pages nobody can
        see, which are dropped with the zombie.
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t i, k
        with nogil:
            pthread_mutex_lock(&self.mu)
            for k in range(self.pq_len):
                i = (self.pq_head + k) % PQ_CAP
                if self.pq[i].fid == fid:
                    self.pq[i].fid = -1
                    fr.pf_pending -= 1
            self._drop_pages(fid)
            self.ndirty -= fr.ndirty
            if fr.pf_pending:
                fr.zombie = 1
                fr.multiwrite = 0
                fr.ndirty = 0
                if fr.dirty:
                    memset(fr.dirty, 0, fr.nwords * sizeof(uint64_t))
                fr.znwords = 0
                fr = NULL
            else:
                self.files[fid] = NULL
            pthread_mutex_unlock(&self.mu)
        if fr:
            _free_rec(fr)

    cdef void _drop_pages(self, int64_t fid) noexcept nogil:
        """Drop every page of fid from the table (mutex held)."""
        cdef int64_t s
        for s in range(self.nslots):
            if self.slots[s].file == fid and not self.slots[s].orphan:
                self._drop(s)
        # orphans still pinned by other threads keep pointing at fid; detach them
        for s in range(self.nslots):
            if self.slots[s].file == fid:
                self.slots[s].file = -2

    def size(self, int64_t fid):
        """The size the cache holds for the file."""
        return self.record(fid).size

    def set_size(self, int64_t fid, int64_t size):
        """Record a new size without touching cached pages (see :meth:`truncate`)."""
        cdef FileRec *fr = self.record(fid)
        with nogil:
            pthread_mutex_lock(&self.mu)
            # someone else changed the size: nothing is known of the bytes
            # past the shorter end
            self._zero_clear(fr, (min(size, fr.size) + PAGE - 1) >> PAGE_SHIFT, -1)
            fr.size = size
            pthread_mutex_unlock(&self.mu)

    def dirty_bytes(self, int64_t fid):
        """Bytes in dirty pages of the file (whole pages)."""
        return self.record(fid).ndirty * PAGE

    def clean_bytes(self):
        """Bytes of the cache that dirty pages do not hold (free or clean slots).

        One read of a counter, no lock: the read-ahead policy asks on every
        READ, and a value a page or two stale does not matter to it.
        """
        return (self.nslots - self.ndirty) * PAGE

    # ------------------------------------------------------------------
    cdef int _load(self, FileRec *fr, int64_t *slot_list, int64_t first_page,
                   int64_t n) noexcept nogil:
        """preadv pages [first_page, first_page+n) into the given slots (mu not held).

        Bytes past the backing file's end read as zeros.  Returns 0 or an errno.
        """
        cdef iovec iov[MAX_RUN]
        cdef int64_t i, done = 0, total = n * PAGE, off
        cdef ssize_t r
        cdef int64_t k, skip
        while done < total:
            # (re)build the iovec list from `done` onwards
            k = 0
            i = done // PAGE
            skip = done - i * PAGE
            while i < n:
                iov[k].iov_base = self.arena + slot_list[i] * PAGE + skip
                iov[k].iov_len = PAGE - skip
                skip = 0
                k += 1
                i += 1
            off = first_page * PAGE + done
            r = preadv(fr.fd, iov, <int>k, off)
            if r < 0:
                if errno == EINTR:
                    continue
                return errno
            if r == 0:
                break
            done += r
        # zero the tail beyond the backing end
        while done < total:
            i = done // PAGE
            skip = done - i * PAGE
            memset(self.arena + slot_list[i] * PAGE + skip, 0, PAGE - skip)
            done += PAGE - skip
        return 0

    cdef int _store(self, FileRec *fr, int64_t *slot_list, int64_t first_page,
                    int64_t n, int64_t last_len) noexcept nogil:
        """pwritev n slots to pages starting at first_page; the last one only last_len bytes."""
        cdef iovec iov[MAX_RUN]
        cdef int64_t i, done = 0, total = (n - 1) * PAGE + last_len, k, skip
        cdef ssize_t r
        while done < total:
            k = 0
            i = done // PAGE
            skip = done - i * PAGE
            while i < n:
                iov[k].iov_base = self.arena + slot_list[i] * PAGE + skip
                iov[k].iov_len = (PAGE if i < n - 1 else last_len) - skip
                skip = 0
                k += 1
                i += 1
            r = pwritev(fr.fd, iov, <int>k, first_page * PAGE + done)
            if r < 0:
                if errno == EINTR:
                    continue
                return errno
            done += r
        return 0

    cdef void _wait_loaded(self) noexcept nogil:
        """Wait (mu held, released while waiting) until some load finishes."""
        cdef timespec t
        clock_gettime(CLOCK_REALTIME, &t)
        t.tv_nsec += 2000000
        if t.tv_nsec >= 1000000000:
            t.tv_sec += 1
            t.tv_nsec -= 1000000000
        pthread_cond_timedwait(&self.loaded, &self.mu, &t)

    cdef void _discard(self, int64_t s) noexcept nogil:
        """Give back a slot this thread allocated but never filled."""
        pthread_cond_broadcast(&self.loaded)
        if self.slots[s].orphan:
            self._unpin(s)
        else:
            self.slots[s].pins -= 1
            self._drop(s)

    cdef int _fault_in(self, int64_t fid, FileRec *fr, int64_t p0, int64_t p1,
                       int64_t *slot_of, bint for_write, int64_t w0, int64_t w1,
                       int64_t *loaded) noexcept nogil:
        """Pin a slot for every page in [p0, p1) and fill it from the backing file.

        slot_of[i] receives the pinned slot of page p0+i, or -1 when the cache
        is full and a read has to fetch that page uncached.  A missing page
        known to be zeros (_is_zero) gets no slot when reading (-3: the caller
        copies zeros, a prefetch skips it), so zeros never crowd the cache;
        when writing, its slot is filled with zeros instead of read.  For writes, pages
        wholly inside the byte range [w0, w1) are not read: their slots are
        left LOADING (so no reader sees them) until the caller copies the new
        bytes in and marks them VALID.  Returns 0, an errno, or -1 when a write
        found no free or clean slot -- the caller then writes back and retries.
        """
        cdef int64_t i, s, n = p1 - p0, j, run0, err = 0, runs = 0
        cdef int64_t *load = <int64_t *>malloc(n * sizeof(int64_t))
        # 1: this thread took the slot; 2: and fills it with zeros
        cdef char *fresh = <char *>calloc(n, 1)
        cdef int64_t nload, nzero, zeroed = 0
        cdef bint waiting
        loaded[0] = 0
        if not load or not fresh:
            free(load)
            free(fresh)
            return ENOMEM
        pthread_mutex_lock(&self.mu)
        for i in range(n):
            slot_of[i] = -2   # not resolved yet
        while True:
            waiting = False
            nload = 0
            nzero = 0
            for i in range(n):
                if slot_of[i] != -2:
                    continue
                s = self._find(fid, p0 + i)
                if s >= 0:
                    if self.slots[s].state == S_LOADING:
                        waiting = True      # another thread fills it: wait below
                        continue
                    self.slots[s].pins += 1
                    self.slots[s].ref = 1
                    fr.hits += 1
                    slot_of[i] = s
                    continue
                if not for_write and _is_zero(fr, p0 + i):
                    slot_of[i] = -3
                    continue
                s = self._alloc(fid, p0 + i)
                if s < 0:
                    if for_write:
                        err = -1
                        break
                    slot_of[i] = -1
                    continue
                fr.misses += 1
                slot_of[i] = s
                fresh[i] = 1
                # multiwrite needs the backing bytes of every page as its twin
                if fr.multiwrite or not (for_write and (p0 + i) * PAGE >= w0
                                         and (p0 + i + 1) * PAGE <= w1):
                    if _is_zero(fr, p0 + i):
                        fresh[i] = 2
                        nzero += 1
                    else:
                        load[nload] = i
                        nload += 1
            if err:
                break
            pthread_mutex_unlock(&self.mu)
            if nzero:
                for i in range(n):
                    if fresh[i] == 2:
                        memset(self.arena + slot_of[i] * PAGE, 0, PAGE)
            # read the missing pages in contiguous runs, mu not held
            j = 0
            while j < nload and not err:
                run0 = j
                j += 1
                while j < nload and load[j] == load[j - 1] + 1 and j - run0 < MAX_RUN:
                    j += 1
                err = self._load_run(fr, slot_of, load, run0, j, p0)
                runs += 1
            pthread_mutex_lock(&self.mu)
            if err:
                break
            for i in range(nload):
                s = slot_of[load[i]]
                if fr.multiwrite:
                    memcpy(self.twins + s * PAGE, self.arena + s * PAGE, PAGE)
                self.slots[s].state = S_VALID
                fresh[load[i]] = 0
            if nzero:
                for i in range(n):
                    if fresh[i] == 2:
                        s = slot_of[i]
                        if fr.multiwrite:
                            memset(self.twins + s * PAGE, 0, PAGE)
                        self.slots[s].state = S_VALID
                        fresh[i] = 0
                zeroed += nzero
            fr.bytes_fetched += nload * PAGE
            loaded[0] += nload
            if nload or nzero:
                pthread_cond_broadcast(&self.loaded)
            if not waiting:
                break
            # another thread is loading some of these pages: sleep until a load
            # finishes (the timeout only guards against a missed wake-up)
            self.wait_spins += 1
            self._wait_loaded()
        fr.read_ops += runs
        if not err:
            self._count_zeros(fr, zeroed)
        if err:
            if err > 0:
                fr.errors += 1
            for i in range(n):
                if slot_of[i] >= 0:
                    if fresh[i]:
                        self._discard(slot_of[i])
                    else:
                        self._unpin(slot_of[i])
                slot_of[i] = -1
        pthread_mutex_unlock(&self.mu)
        free(load)
        free(fresh)
        return <int>err

    cdef int _load_run(self, FileRec *fr, int64_t *slot_of, int64_t *load,
                       int64_t a, int64_t b, int64_t p0) noexcept nogil:
        cdef int64_t tmp[MAX_RUN]
        cdef int64_t i
        for i in range(a, b):
            tmp[i - a] = slot_of[load[i]]
        return self._load(fr, tmp, p0 + load[a], b - a)

    # ------------------------------------------------------------------
    def read(self, int64_t fid, int64_t offset, int64_t size):
        """Return ``size`` bytes at ``offset`` (fewer only at the cached end of file)."""
        cdef FileRec *fr = self.record(fid)
        cdef int64_t end, p0, p1, i, s, n, a, b, loaded, zeros
        cdef int err = 0
        cdef char *out
        cdef int64_t *slot_of
        end = _span(fr, offset, size, &p0, &p1)
        if end <= offset:
            return b""
        res = PyBytes_FromStringAndSize(NULL, end - offset)
        out = PyBytes_AS_STRING(res)
        n = p1 - p0
        slot_of = <int64_t *>malloc(n * sizeof(int64_t))
        if not slot_of:
            raise MemoryError()
        with nogil:
            err = self._fault_in(fid, fr, p0, p1, slot_of, False, 0, 0, &loaded)
            if not err:
                pthread_mutex_lock(&self.mu)
                zeros = 0
                for i in range(n):
                    _clip(p0 + i, offset, end, &a, &b)
                    s = slot_of[i]
                    if s >= 0:
                        memcpy(out + (a - offset), self.arena + s * PAGE + (a - (p0 + i) * PAGE), b - a)
                        if b - a == PAGE:
                            self._spend(s)
                        self._unpin(s)
                    elif s == -3:
                        zeros += 1
                self._count_zeros(fr, zeros)
                pthread_mutex_unlock(&self.mu)
                # pages the full cache could not hold: read them straight
                # through, or zeros for the pages known to be zeros
                for i in range(n):
                    if slot_of[i] >= 0 or err:
                        continue
                    _clip(p0 + i, offset, end, &a, &b)
                    if slot_of[i] == -3:
                        memset(out + (a - offset), 0, b - a)
                    else:
                        err = _pread_full(fr.fd, out + (a - offset), b - a, a)
        free(slot_of)
        if err:
            raise EngineError(err, "backing read failed")
        return res

    def read_cached(self, int64_t fid, int64_t offset, int64_t size):
        """Like :meth:`read`, but only if every page is cached: never does I/O.

        Returns None when a page is missing or being loaded.  Cheap enough to
        call on the thread that serves FUSE requests, which saves the hop to a
        worker thread for reads that the prefetcher already served.  A
        missing page known to be zeros counts as cached: it reads as zeros.
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t end, p0, p1, i, s, a, b, zeros = 0
        cdef bint ok = True
        cdef char *out
        end = _span(fr, offset, size, &p0, &p1)
        if end <= offset:
            return b""
        res = PyBytes_FromStringAndSize(NULL, end - offset)
        out = PyBytes_AS_STRING(res)
        with nogil:
            pthread_mutex_lock(&self.mu)
            for i in range(p0, p1):
                s = self._find(fid, i)
                if s < 0 and _is_zero(fr, i):
                    continue
                if s < 0 or self.slots[s].state != S_VALID:
                    ok = False
                    break
            if ok:
                for i in range(p0, p1):
                    s = self._find(fid, i)
                    _clip(i, offset, end, &a, &b)
                    if s < 0:
                        memset(out + (a - offset), 0, b - a)
                        zeros += 1
                        continue
                    memcpy(out + (a - offset), self.arena + s * PAGE + (a - i * PAGE), b - a)
                    if b - a == PAGE:
                        self._spend(s)
                    else:
                        self.slots[s].ref = 1
                fr.hits += p1 - p0 - zeros
                self._count_zeros(fr, zeros)
            pthread_mutex_unlock(&self.mu)
        return res if ok else None

    def set_prefetchers(self, int n):
        """Serve prefetch_async with up to ``n`` threads of the engine's own
        (started when needed, gone after a while idle); 0 refuses it."""
        if n < 0:
            raise ValueError("negative thread count")
        self.pf_max = n

    def prefetch_async(self, int64_t fid, int64_t offset, int64_t size):
        """Queue a :meth:`prefetch` for the engine's threads and return at once.

        No Python and no GIL on the way: the threads take the queue under the
        mutex and load the pages as prefetch does.  Returns False (nothing
        queued) when there are no prefetch threads or the queue is full.
        Errors are counted (stats: prefetch_errors), never raised: the read
        that needs the pages fetches them itself and reports them.
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t i
        cdef bint ok, spawn = False
        cdef pthread_t t
        cdef pthread_attr_t attr
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        with nogil:
            pthread_mutex_lock(&self.mu)
            ok = self.pf_max > 0 and self.pq_len < PQ_CAP
            if ok:
                i = (self.pq_head + self.pq_len) % PQ_CAP
                self.pq[i].fid = fid
                self.pq[i].off = offset
                self.pq[i].size = size
                self.pq_len += 1
                fr.pf_pending += 1
                if self.pf_idle:
                    pthread_cond_signal(&self.pq_ready)
                # idle threads already woken still count in pf_idle until they
                # run: start another thread only if they cannot take it all
                if self.pq_len > self.pf_idle and self.pf_threads < self.pf_max:
                    self.pf_threads += 1
                    spawn = True
            else:
                self.pf_refused += 1
            pthread_mutex_unlock(&self.mu)
        if spawn:
            pthread_attr_init(&attr)
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED)
            Py_INCREF(self)             # until the thread holds its own
            if pthread_create(&t, &attr, _prefetch_thread, <void *>self) != 0:
                Py_DECREF(self)
                with nogil:
                    pthread_mutex_lock(&self.mu)
                    self.pf_threads -= 1
                    pthread_mutex_unlock(&self.mu)
            pthread_attr_destroy(&attr)
        return ok

    cdef void _prefetch_loop(self) noexcept nogil:
        """Take queued prefetches until none comes for PF_IDLE_SEC."""
        cdef PfItem it
        cdef FileRec *fr
        cdef int64_t p0, p1, n, end, i, loaded
        cdef int64_t *slot_of
        cdef int err, r
        cdef timespec t
        pthread_mutex_lock(&self.mu)
        while True:
            if self.pq_len == 0:
                clock_gettime(CLOCK_REALTIME, &t)
                t.tv_sec += PF_IDLE_SEC
                self.pf_idle += 1
                r = 0
                while self.pq_len == 0 and r == 0:
                    r = pthread_cond_timedwait(&self.pq_ready, &self.mu, &t)
                self.pf_idle -= 1
                if self.pq_len == 0:
                    break                       # idle: leave
            it = self.pq[self.pq_head]
            self.pq_head = (self.pq_head + 1) % PQ_CAP
            self.pq_len -= 1
            if it.fid < 0:
                continue                        # cancelled
            fr = self.files[it.fid]             # kept alive by its pf_pending
            end = min(it.off + it.size, fr.size)
            err = 0
            if end > it.off:
                p0 = it.off >> PAGE_SHIFT
                p1 = (end + PAGE - 1) >> PAGE_SHIFT
                n = p1 - p0
                pthread_mutex_unlock(&self.mu)
                slot_of = <int64_t *>malloc(n * sizeof(int64_t))
                if slot_of:
                    err = self._fault_in(it.fid, fr, p0, p1, slot_of, False, 0, 0, &loaded)
                else:
                    err = ENOMEM
                pthread_mutex_lock(&self.mu)
                if slot_of and not err:
                    for i in range(n):
                        if slot_of[i] >= 0:
                            self._unpin(slot_of[i])
                free(slot_of)
            self.pf_done += 1
            if err and not fr.zombie:
                self.pf_errors += 1
            fr.pf_pending -= 1
            if fr.zombie and fr.pf_pending == 0:
                self._drop_pages(it.fid)
                self.files[it.fid] = NULL
                _free_rec(fr)
        self.pf_threads -= 1
        pthread_mutex_unlock(&self.mu)

    def prefetch(self, int64_t fid, int64_t offset, int64_t size):
        """Load the pages of [offset, offset+size) into the cache; return bytes fetched."""
        cdef FileRec *fr = self.record(fid)
        cdef int64_t end, p0, p1, i, n, loaded = 0
        cdef int err = 0
        cdef int64_t *slot_of
        end = _span(fr, offset, size, &p0, &p1)
        if end <= offset:
            return 0
        n = p1 - p0
        slot_of = <int64_t *>malloc(n * sizeof(int64_t))
        if not slot_of:
            raise MemoryError()
        with nogil:
            err = self._fault_in(fid, fr, p0, p1, slot_of, False, 0, 0, &loaded)
            if not err:
                pthread_mutex_lock(&self.mu)
                for i in range(n):
                    if slot_of[i] >= 0:
                        self._unpin(slot_of[i])
                pthread_mutex_unlock(&self.mu)
        free(slot_of)
        if err:
            raise EngineError(err, "backing read failed")
        return loaded * PAGE

    # -- lending pages to other compiled modules (_engine.pxd) ---------------
    cdef int64_t lend(self, FileRec *fr, int64_t fid, int64_t offset, int64_t end,
                      int64_t *slot_of, iovec *iov) noexcept nogil:
        """Pin the cached prefix of [offset, end) for a reader outside the engine.

        ``offset`` is page aligned; at most MAX_RUN pages are lent, and the
        range is clipped to the size.  Fills ``slot_of[i]`` and ``iov[i]``
        (the page in the arena, its length clipped to the range) for each
        page lent and returns how many: 0 when the first page is not
        cached.  The pages stay pinned, so never evicted or reused, until
        :meth:`give_back`.  Takes the mutex: call without the GIL.
        """
        cdef int64_t p0 = offset >> PAGE_SHIFT, p1, i, s, n = 0, a, b
        pthread_mutex_lock(&self.mu)
        if end > fr.size:
            end = fr.size
        p1 = (end + PAGE - 1) >> PAGE_SHIFT
        if p1 - p0 > MAX_RUN:
            p1 = p0 + MAX_RUN
        for i in range(p0, p1):
            s = self._find(fid, i)
            if s < 0 or self.slots[s].state != S_VALID:
                break
            self.slots[s].pins += 1
            self.slots[s].ref = 1
            slot_of[n] = s
            n += 1
        pthread_mutex_unlock(&self.mu)
        if end > (p0 + n) * PAGE:
            end = (p0 + n) * PAGE
        for i in range(n):
            _clip(p0 + i, offset, end, &a, &b)
            iov[i].iov_base = self.arena + slot_of[i] * PAGE
            iov[i].iov_len = b - a
        return n

    cdef void give_back(self, FileRec *fr, int64_t *slot_of, iovec *iov, int64_t n,
                        bint delivered) noexcept nogil:
        """Unpin the ``n`` pages :meth:`lend` lent.  ``delivered``: the reader
        put the bytes into the kernel's page cache (a push), so whole pages
        are spent (see _spend) and the bytes count as pushed."""
        cdef int64_t i
        pthread_mutex_lock(&self.mu)
        for i in range(n):
            if delivered:
                if iov[i].iov_len == PAGE:
                    self._spend(slot_of[i])
                fr.bytes_pushed += iov[i].iov_len
            self._unpin(slot_of[i])
        if delivered and n:
            fr.push_ops += 1
        pthread_mutex_unlock(&self.mu)

    cdef int64_t lend_whole(self, FileRec *fr, int64_t fid, int64_t offset, int64_t size,
                            int64_t *slot_of, iovec *iov, char *zeros) noexcept nogil:
        """Pin every page of [offset, offset+size), clipped to the size, for a
        reader outside the engine that answers a read in full or not at all.

        Returns -1, pinning nothing, when a page is neither cached nor known
        to be zeros, or the range is longer than MAX_RUN pages; else the
        number of pages, each with ``iov[i]`` (its bytes in the range) and
        ``slot_of[i]`` (-1 for a known-zero page, whose ``iov`` points at
        ``zeros``, a page of zeros).  0 at or past the end of the file.
        Hand the pages back with :meth:`give_back_read`.  Takes the mutex:
        call without the GIL.
        """
        cdef int64_t end = offset + size, p0 = offset >> PAGE_SHIFT, p1, i, s, n, a, b
        cdef bint whole = True
        pthread_mutex_lock(&self.mu)
        if end > fr.size:
            end = fr.size
        if end <= offset:
            pthread_mutex_unlock(&self.mu)
            return 0
        p1 = (end + PAGE - 1) >> PAGE_SHIFT
        n = p1 - p0
        if n > MAX_RUN:
            pthread_mutex_unlock(&self.mu)
            return -1
        for i in range(n):
            s = self._find(fid, p0 + i)
            if s < 0:
                if not _is_zero(fr, p0 + i):
                    whole = False
                    break
            elif self.slots[s].state != S_VALID:
                whole = False
                break
            slot_of[i] = s
        if whole:
            for i in range(n):
                if slot_of[i] >= 0:
                    self.slots[slot_of[i]].pins += 1
        pthread_mutex_unlock(&self.mu)
        if not whole:
            return -1
        self._lent_iov(p0, n, offset, end, slot_of, iov, zeros)
        return n

    cdef void _lent_iov(self, int64_t p0, int64_t n, int64_t offset, int64_t end,
                        int64_t *slot_of, iovec *iov, char *zeros) noexcept nogil:
        """The iovecs of lent pages p0..p0+n, clipped to [offset, end); a
        negative slot (a known-zero page) becomes -1 and points at ``zeros``."""
        cdef int64_t i, a, b
        for i in range(n):
            _clip(p0 + i, offset, end, &a, &b)
            if slot_of[i] >= 0:
                iov[i].iov_base = self.arena + slot_of[i] * PAGE + (a - (p0 + i) * PAGE)
            else:
                slot_of[i] = -1
                iov[i].iov_base = zeros
            iov[i].iov_len = b - a

    cdef int64_t lend_loaded(self, FileRec *fr, int64_t fid, int64_t offset, int64_t size,
                             int64_t *slot_of, iovec *iov, char *zeros) noexcept nogil:
        """:meth:`lend_whole` for a range with missing pages: they are read
        from the backing file first (blocking I/O, as :meth:`read` does).
        Returns -1, pinning nothing, when the range is longer than MAX_RUN
        pages, the full cache could not take a page, or the backing read
        failed: the caller then leaves the read to :meth:`read`, which reads
        such pages straight through and reports errors.  Hand the pages
        back with :meth:`give_back_read` (``hits`` False: the fault-in
        counted them)."""
        cdef int64_t end = offset + size, p0 = offset >> PAGE_SHIFT, p1, i, n, a, b, loaded
        cdef int64_t zeros_n = 0
        cdef int err
        pthread_mutex_lock(&self.mu)
        if end > fr.size:
            end = fr.size
        pthread_mutex_unlock(&self.mu)
        if end <= offset:
            return 0
        p1 = (end + PAGE - 1) >> PAGE_SHIFT
        n = p1 - p0
        if n > MAX_RUN:
            return -1
        err = self._fault_in(fid, fr, p0, p1, slot_of, False, 0, 0, &loaded)
        if err:
            return -1
        for i in range(n):
            if slot_of[i] == -1:
                # the cache is full of busy pages: give back what was taken
                pthread_mutex_lock(&self.mu)
                for i in range(n):
                    if slot_of[i] >= 0:
                        self._unpin(slot_of[i])
                pthread_mutex_unlock(&self.mu)
                return -1
        self._lent_iov(p0, n, offset, end, slot_of, iov, zeros)   # -3: a known-zero page
        return n

    cdef void give_back_read(self, FileRec *fr, int64_t *slot_of, iovec *iov,
                             int64_t n, bint hits) noexcept nogil:
        """Unpin the pages :meth:`lend_whole` or :meth:`lend_loaded` lent,
        once their bytes reached the kernel's page cache: whole pages are
        spent, as :meth:`read_cached` does, and (``hits``) the pages count
        as hits or zero fills."""
        cdef int64_t i, s, zeros = 0
        pthread_mutex_lock(&self.mu)
        for i in range(n):
            s = slot_of[i]
            if s < 0:
                zeros += 1
                continue
            if iov[i].iov_len == PAGE:
                self._spend(s)
            else:
                self.slots[s].ref = 1
            self._unpin(s)
        if hits:
            fr.hits += n - zeros
            self._count_zeros(fr, zeros)
        pthread_mutex_unlock(&self.mu)

    def cached_prefix(self, int64_t fid, int64_t offset, int64_t size):
        """A copy of the cached prefix of [offset, offset+size) (at most
        MAX_RUN pages, clipped to the size); b"" if its first page is not
        cached.  ``offset`` must be page aligned.  Never does I/O."""
        cdef FileRec *fr = self.record(fid)
        cdef int64_t slot_of[MAX_RUN]
        cdef iovec iov[MAX_RUN]
        cdef int64_t n, i, total = 0, end
        if offset & (PAGE - 1):
            raise ValueError("offset must be page aligned")
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = offset + size
        with nogil:
            n = self.lend(fr, fid, offset, end, slot_of, iov)
        for i in range(n):
            total += iov[i].iov_len
        out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *dst = PyBytes_AS_STRING(out)
        with nogil:
            for i in range(n):
                memcpy(dst, iov[i].iov_base, iov[i].iov_len)
                dst += iov[i].iov_len
            self.give_back(fr, slot_of, iov, n, False)
        return out

    def delivered(self, int64_t fid, int64_t offset, int64_t length):
        """The bytes of [offset, offset+length) went into the kernel's page
        cache (a push): its whole cached pages are spent, and the bytes count
        as pushed."""
        cdef FileRec *fr = self.record(fid)
        cdef int64_t slot_of[MAX_RUN]
        cdef iovec iov[MAX_RUN]
        cdef int64_t n
        if offset & (PAGE - 1):
            raise ValueError("offset must be page aligned")
        if offset < 0 or length < 0:
            raise ValueError("negative offset or size")
        with nogil:
            n = self.lend(fr, fid, offset, offset + length, slot_of, iov)
            self.give_back(fr, slot_of, iov, n, True)

    def write(self, int64_t fid, int64_t offset, data):
        """Copy ``data`` into the cache at ``offset``, marking the pages dirty.

        Extends the cached size when the write ends past it.  When every slot
        is dirty, dirty pages are written back first (and errors raised).
        Large writes go in pieces of at most a quarter of the cache, so any
        write fits.  Returns the number of bytes taken.
        """
        cdef Py_buffer view
        cdef int64_t done = 0, piece, step
        if offset < 0:
            raise ValueError("negative offset")
        self.record(fid)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            step = max(min(<int64_t>MAX_RUN, self.nslots // 4), 1) * PAGE
            while done < view.len:
                # pieces end on page boundaries so each page is written whole or once
                piece = min(view.len - done, step - ((offset + done) & (PAGE - 1)))
                self._write_piece(fid, offset + done, <const char *>view.buf + done, piece)
                done += piece
            return view.len
        finally:
            PyBuffer_Release(&view)

    def write_cached(self, int64_t fid, int64_t offset, data):
        """Like :meth:`write`, but only if it needs no I/O.

        Every page the write covers in part must be cached already; a page it
        covers whole gets a fresh slot if it is missing, as long as one is
        free or clean (evicting a clean page is no I/O).  Returns the number
        of bytes taken, or None (nothing written) when a page is missing or
        being loaded, no clean slot is left, the write would extend the
        file, or it spans more than 4 MiB (no FUSE WRITE does).  Cheap enough for the thread that serves FUSE requests: a
        mapped write faults each page in (a READ) before the kernel writes it
        back, so its WRITEs skip the hop to a worker thread, even when the
        page was evicted in between (spent pages go first, see _spend).
        The same as :meth:`take_write`, which the compiled wire calls.
        """
        cdef FileRec *fr = self.record(fid)
        cdef Py_buffer view
        cdef int64_t n
        if offset < 0:
            raise ValueError("negative offset")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                n = self.take_write(fr, fid, offset, <const char *>view.buf, view.len)
            return n if n >= 0 else None
        finally:
            PyBuffer_Release(&view)

    cdef int64_t take_write(self, FileRec *fr, int64_t fid, int64_t offset, const char *src,
                            int64_t length) noexcept nogil:
        """:meth:`write_cached` in C: the bytes taken, or -1 (nothing written)."""
        cdef int64_t end, p0, p1, i, s, a, b, n, fresh = 0
        cdef bint ok = True
        cdef int64_t slot_of[MAX_RUN]
        end = offset + length
        if length <= 0 or offset < 0:
            return -1
        p0 = offset >> PAGE_SHIFT
        p1 = (end + PAGE - 1) >> PAGE_SHIFT
        n = p1 - p0
        if n > MAX_RUN:
            return -1               # larger than any FUSE WRITE: the long way
        pthread_mutex_lock(&self.mu)
        # growing the file is left to write(): it may have to evict
        ok = end <= fr.size and self._bitmap_fit(fr, p1 - 1) == 0
        # pin the cached pages first, so that taking slots for the
        # missing ones cannot evict them
        for i in range(n):
            s = -1
            if ok:
                s = self._find(fid, p0 + i)
                if s >= 0:
                    ok = self.slots[s].state == S_VALID
                    if ok:
                        self.slots[s].pins += 1
                    else:
                        s = -1
                else:
                    # a page written whole needs no old bytes; multiwrite
                    # needs them (its twin), so it goes the long way
                    ok = not fr.multiwrite and (p0 + i) * PAGE >= offset \
                        and (p0 + i + 1) * PAGE <= end
            slot_of[i] = s
        for i in range(n):
            if ok and slot_of[i] < 0:
                s = self._alloc(fid, p0 + i)
                if s < 0:
                    ok = False
                else:
                    slot_of[i] = s
                    fresh += 1
                    fr.misses += 1
        for i in range(n):
            s = slot_of[i]
            if s < 0:
                continue
            if ok:
                _clip(p0 + i, offset, end, &a, &b)
                memcpy(self.arena + s * PAGE + (a - (p0 + i) * PAGE), src + (a - offset), b - a)
                self.slots[s].state = S_VALID
                self.slots[s].ref = 1
                self._set_dirty(fr, s)
                self._unpin(s)
            elif self.slots[s].state == S_LOADING:
                self._discard(s)
            else:
                self._unpin(s)
        if ok:
            fr.hits += n - fresh
            fr.bytes_written += end - offset
        pthread_mutex_unlock(&self.mu)
        return length if ok else -1

    cdef _write_piece(self, int64_t fid, int64_t offset, const char *src, int64_t length):
        cdef FileRec *fr = self.record(fid)
        cdef int64_t end, p0, p1, i, s, n, a, b, victim, loaded
        cdef int err = 0
        cdef int64_t *slot_of
        if length == 0:
            return 0
        end = offset + length
        p0 = offset >> PAGE_SHIFT
        p1 = (end + PAGE - 1) >> PAGE_SHIFT
        n = p1 - p0
        slot_of = <int64_t *>malloc(n * sizeof(int64_t))
        if not slot_of:
            raise MemoryError()
        try:
            while True:
                with nogil:
                    pthread_mutex_lock(&self.mu)
                    err = self._bitmap_fit(fr, p1 - 1)
                    if end > fr.size:
                        # this write extends the file: the pages wholly past
                        # the old end hold zeros in the backing file, so the
                        # ones it covers in part need no read
                        self._zero_set(fr, (fr.size + PAGE - 1) >> PAGE_SHIFT, p1)
                    pthread_mutex_unlock(&self.mu)
                    if not err:
                        err = self._fault_in(fid, fr, p0, p1, slot_of, True, offset, end, &loaded)
                if err != -1:
                    break
                # the cache is full of dirty or busy pages: write some back
                with nogil:
                    pthread_mutex_lock(&self.mu)
                    victim = self._any_dirty_file()
                    pthread_mutex_unlock(&self.mu)
                if victim < 0:
                    raise EngineError(EBUSY, "page cache too small for this write")
                self.writeback(victim)
            if err:
                raise EngineError(err, "backing read failed")
            with nogil:
                pthread_mutex_lock(&self.mu)
                for i in range(n):
                    s = slot_of[i]
                    _clip(p0 + i, offset, end, &a, &b)
                    memcpy(self.arena + s * PAGE + (a - (p0 + i) * PAGE), src + (a - offset), b - a)
                    self.slots[s].state = S_VALID
                    if not self.slots[s].orphan:
                        self._set_dirty(fr, s)
                    self._unpin(s)
                pthread_cond_broadcast(&self.loaded)
                if end > fr.size:
                    fr.size = end
                fr.bytes_written += end - offset
                pthread_mutex_unlock(&self.mu)
        finally:
            free(slot_of)
        return length

    def writeback(self, int64_t fid):
        """Write every dirty page of the file to its backing fd in coalesced runs.

        Does not fsync.  On error the pages that were not written stay dirty
        and an OSError carrying the errno is raised.  Returns bytes written.
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t run[MAX_RUN]
        cdef int64_t p, q, n, i, s, last_len, written = 0
        cdef int err = 0
        if fr.multiwrite:
            return self._writeback_changed(fid, fr)
        with nogil:
            p = 0
            while not err:
                pthread_mutex_lock(&self.mu)
                p = self._next_dirty(fr, p)
                if p < 0 or p * PAGE >= fr.size:
                    # dirty pages wholly past the end are stale after a truncate
                    while p >= 0:
                        self._clear_dirty(fr, p)
                        s = self._find(fid, p)
                        if s >= 0:
                            self.slots[s].dirty = 0
                        p = self._next_dirty(fr, p + 1)
                    pthread_mutex_unlock(&self.mu)
                    break
                n = 0
                q = p
                while n < MAX_RUN and q * PAGE < fr.size and q >> 6 < fr.nwords \
                        and fr.dirty[q >> 6] & (1ULL << (q & 63)):
                    s = self._find(fid, q)
                    if s < 0:
                        break
                    run[n] = s
                    self.slots[s].pins += 1
                    self.slots[s].dirty = 0
                    self._clear_dirty(fr, q)
                    n += 1
                    q += 1
                last_len = fr.size - (q - 1) * PAGE
                if last_len > PAGE:
                    last_len = PAGE
                pthread_mutex_unlock(&self.mu)
                if n == 0:
                    # bitmap says dirty but no slot: cannot happen; clear it
                    pthread_mutex_lock(&self.mu)
                    self._clear_dirty(fr, p)
                    pthread_mutex_unlock(&self.mu)
                    p += 1
                    continue
                err = self._store(fr, run, p, n, last_len)
                pthread_mutex_lock(&self.mu)
                for i in range(n):
                    s = run[i]
                    if err and not self.slots[s].orphan:
                        self._set_dirty(fr, s)     # keep it for a retry
                    elif not self.slots[s].dirty:
                        self._spend(s)              # the kernel wrote it: it has the bytes
                    self._unpin(s)
                if err:
                    fr.errors += 1
                else:
                    fr.write_ops += 1
                    written += (n - 1) * PAGE + last_len
                pthread_mutex_unlock(&self.mu)
                p = q
        if err:
            raise EngineError(err, "backing write failed")
        return written

    cdef _writeback_changed(self, int64_t fid, FileRec *fr):
        """Multiwrite write-back: only the bytes that differ from the twin.

        Each dirty page is copied out under the mutex, compared with its twin
        and its changed runs written with pwrite; runs closer than GAP bytes
        are merged (one syscall is dearer than a few unchanged bytes, which the
        twin says the backing file already holds).  On success the twin takes
        the written bytes.  On error the page is dirty again.
        """
        cdef char tmp[PAGE]
        cdef int64_t p = 0, s, limit, i, j, k, written = 0, GAP = 32
        cdef char *tw
        cdef ssize_t r
        cdef int err = 0
        cdef int64_t writes = 0       # pwrites not yet counted (counters change under mu)
        cdef struct_stat st
        with nogil:
            while not err:
                pthread_mutex_lock(&self.mu)
                p = self._next_dirty(fr, p)
                if p >= 0 and p * PAGE >= fr.size:
                    self._clear_dirty(fr, p)
                    s = self._find(fid, p)
                    if s >= 0:
                        self.slots[s].dirty = 0
                    pthread_mutex_unlock(&self.mu)
                    p += 1
                    continue
                s = self._find(fid, p) if p >= 0 else -1
                if p < 0 or s < 0:
                    if p >= 0:
                        self._clear_dirty(fr, p)
                    pthread_mutex_unlock(&self.mu)
                    if p < 0:
                        break
                    p += 1
                    continue
                self.slots[s].pins += 1
                self.slots[s].dirty = 0
                self._clear_dirty(fr, p)
                memcpy(tmp, self.arena + s * PAGE, PAGE)
                limit = fr.size - p * PAGE
                if limit > PAGE:
                    limit = PAGE
                pthread_mutex_unlock(&self.mu)
                tw = self.twins + s * PAGE
                i = 0
                while i < limit and not err:
                    if tmp[i] == tw[i]:
                        i += 1
                        continue
                    j = i + 1
                    k = j
                    while k < limit and k - j < GAP:
                        if tmp[k] != tw[k]:
                            j = k + 1
                        k += 1
                    while True:
                        r = pwrite(fr.fd, tmp + i, j - i, p * PAGE + i)
                        if r < 0 and errno == EINTR:
                            continue
                        break
                    if r < 0:
                        err = errno
                    elif r < j - i:
                        err = EIO   # a short pwrite on a regular file
                    else:
                        written += j - i
                        writes += 1
                    i = j
                pthread_mutex_lock(&self.mu)
                fr.write_ops += writes
                writes = 0
                if err:
                    fr.errors += 1
                    if not self.slots[s].orphan:
                        self._set_dirty(fr, s)
                else:
                    memcpy(tw, tmp, limit)
                self._unpin(s)
                pthread_mutex_unlock(&self.mu)
                p += 1
            if not err and fstat(fr.fd, &st) == 0 and st.st_size < fr.size:
                # an extension whose new bytes are all zeros differs from no twin
                if ftruncate(fr.fd, fr.size) != 0:
                    err = errno
        if err:
            raise EngineError(err, "backing write failed")
        return written

    def take_lost_twins(self):
        """Drain the (file id, page) pairs of multiwrite pages evicted since the
        last call (page -1: the whole file).  The daemon must make the kernel
        drop its copies of them: a twin has to describe what the kernel's copy
        of a page was read from, and an evicted twin describes nothing."""
        cdef int64_t i, n
        cdef int64_t (*copy)[2]
        if self.nlost == 0:          # a racy peek is fine: the next call drains it
            return []
        copy = <int64_t (*)[2]>malloc(LOST_MAX * 2 * sizeof(int64_t))
        if not copy:
            raise MemoryError()
        with nogil:
            pthread_mutex_lock(&self.mu)
            n = self.nlost
            memcpy(copy, self.lost, n * 2 * sizeof(int64_t))
            self.nlost = 0
            pthread_mutex_unlock(&self.mu)
        out = [(copy[i][0], copy[i][1]) for i in range(n)]
        free(copy)
        return out

    def set_multiwrite(self, int64_t fid, bint on):
        """Turn multiwrite on or off for a file; write back its dirty pages first.

        Cached clean pages are dropped so that every page is read again with
        its twin.  Raises EBUSY if the file still has dirty pages.
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t s
        cdef int busy = 0
        if on and self.twins == NULL:
            self.twins = <char *>mmap(NULL, self.arena_len, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if <void *>self.twins == MAP_FAILED:
                self.twins = NULL
                raise MemoryError("cannot reserve memory for multiwrite twins")
        with nogil:
            pthread_mutex_lock(&self.mu)
            if fr.ndirty:
                busy = 1
            elif (fr.multiwrite != 0) != on:
                for s in range(self.nslots):
                    if self.slots[s].file == fid and not self.slots[s].orphan \
                            and self.slots[s].state == S_VALID and not self.slots[s].pins:
                        self._drop(s)
                fr.multiwrite = 1 if on else 0
            pthread_mutex_unlock(&self.mu)
        if busy:
            raise EngineError(EBUSY, "write back dirty pages before switching multiwrite")

    def refresh(self, int64_t fid, int64_t offset, int64_t length):
        """Reload the pages covering [offset, offset+length) from the backing file.

        Clean pages (cached or not, as far as the cache has room) take the
        backing bytes.  Dirty pages keep the local writes: with multiwrite,
        byte for byte (bytes equal to the twin take the backing value); without
        it, the whole dirty page stays as written locally.  Twins take the
        backing bytes.  Returns the number of pages reloaded.
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t p0, p1, cp0, cp1, i, s, k, reloaded = 0
        cdef int64_t CH = 256     # pages per backing read: 1 MiB
        cdef char *buf
        cdef char *pg
        cdef char *tw
        cdef int err = 0
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        p0 = offset >> PAGE_SHIFT
        p1 = (offset + length + PAGE - 1) >> PAGE_SHIFT
        buf = <char *>malloc(CH * PAGE)
        if not buf:
            raise MemoryError()
        with nogil:
            pthread_mutex_lock(&self.mu)
            self._zero_clear(fr, p0, p1)        # the backing file says what is there now
            pthread_mutex_unlock(&self.mu)
            cp0 = p0
            while cp0 < p1 and not err:
                cp1 = min(cp0 + CH, p1)
                err = _pread_full(fr.fd, buf, (cp1 - cp0) * PAGE, cp0 * PAGE)
                if err:
                    break
                pthread_mutex_lock(&self.mu)
                fr.bytes_fetched += (cp1 - cp0) * PAGE
                fr.read_ops += 1
                for i in range(cp0, cp1):
                    s = self._find(fid, i)
                    if s >= 0 and self.slots[s].state != S_VALID:
                        continue            # being loaded: it reads the backing file anyway
                    if s < 0:
                        s = self._alloc(fid, i)
                        if s < 0:
                            continue
                        self.slots[s].pins -= 1
                        self.slots[s].state = S_VALID
                        memcpy(self.arena + s * PAGE, buf + (i - cp0) * PAGE, PAGE)
                    elif not self.slots[s].dirty:
                        memcpy(self.arena + s * PAGE, buf + (i - cp0) * PAGE, PAGE)
                    elif fr.multiwrite:
                        pg = self.arena + s * PAGE
                        tw = self.twins + s * PAGE
                        for k in range(PAGE):
                            if pg[k] == tw[k]:
                                pg[k] = buf[(i - cp0) * PAGE + k]
                    if fr.multiwrite:
                        memcpy(self.twins + s * PAGE, buf + (i - cp0) * PAGE, PAGE)
                    reloaded += 1
                pthread_mutex_unlock(&self.mu)
                cp0 = cp1
        free(buf)
        if err:
            raise EngineError(err, "backing read failed")
        return reloaded

    def truncate(self, int64_t fid, int64_t size, int64_t zeros_from=-1):
        """Set the cached size; drop pages past it and zero the tail of the last one.

        ``zeros_from`` >= 0: this node has just extended the backing file from
        that size to ``size`` (ftruncate), so the pages wholly past it are
        known zeros (see FileRec.zero) and the clean pages cached there are
        dropped.  Without it, a size that grows says nothing of the new bytes
        (someone else wrote them).
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t s, lastp, tail, zp = -1, pg
        if zeros_from > size:
            zeros_from = -1
        with nogil:
            pthread_mutex_lock(&self.mu)
            lastp = (size + PAGE - 1) >> PAGE_SHIFT
            self._zero_clear(fr, lastp, -1)
            if zeros_from >= 0:
                zp = (zeros_from + PAGE - 1) >> PAGE_SHIFT
                self._zero_set(fr, zp, lastp)
            for s in range(self.nslots):
                if self.slots[s].file != fid or self.slots[s].orphan:
                    continue
                pg = self.slots[s].page
                if pg >= lastp:
                    self._clear_dirty(fr, pg)
                    self.slots[s].dirty = 0
                    self._drop(s)
                elif 0 <= zp <= pg:
                    if self.slots[s].dirty:
                        self._zero_clear(fr, pg, pg + 1)     # written here: keep it
                    elif self.slots[s].state == S_VALID:
                        self._drop(s)
            tail = size & (PAGE - 1)
            if tail:
                s = self._find(fid, size >> PAGE_SHIFT)
                if s >= 0 and self.slots[s].state == S_VALID:
                    memset(self.arena + s * PAGE + tail, 0, PAGE - tail)
            fr.size = size
            pthread_mutex_unlock(&self.mu)

    def punch(self, int64_t fid, int64_t offset, int64_t length):
        """The backing file's [offset, offset+length) has just become a hole
        (fallocate PUNCH_HOLE): cached pages wholly inside it are dropped,
        dirty or not (their writes were punched away), and become known
        zeros; the punched bytes of the pages at its edges are zeroed in
        their slots (and twins), which keep their other bytes and their
        dirty bits.  The size does not change."""
        cdef FileRec *fr = self.record(fid)
        cdef int64_t s, pg, end, f0, f1, a, b
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with nogil:
            pthread_mutex_lock(&self.mu)
            end = offset + length
            if end > fr.size:
                end = fr.size
            if end > offset:
                f0 = (offset + PAGE - 1) >> PAGE_SHIFT      # the whole pages inside
                f1 = end >> PAGE_SHIFT
                if end == fr.size:
                    f1 = (end + PAGE - 1) >> PAGE_SHIFT     # the last page, to EOF
                for s in range(self.nslots):
                    if self.slots[s].file != fid or self.slots[s].orphan:
                        continue
                    pg = self.slots[s].page
                    if f0 <= pg < f1:
                        if self.slots[s].dirty:
                            self._clear_dirty(fr, pg)
                            self.slots[s].dirty = 0
                        self._drop(s)
                    elif pg * PAGE < end and (pg + 1) * PAGE > offset \
                            and self.slots[s].state == S_VALID:
                        _clip(pg, offset, end, &a, &b)
                        memset(self.arena + s * PAGE + (a - pg * PAGE), 0, b - a)
                        if fr.multiwrite and self.twins:
                            memset(self.twins + s * PAGE + (a - pg * PAGE), 0, b - a)
                if f1 > f0:
                    self._zero_set(fr, f0, f1)
            pthread_mutex_unlock(&self.mu)

    def invalidate(self, int64_t fid, int64_t offset, int64_t length):
        """Drop clean cached pages overlapping [offset, offset+length); return how many.

        What was known of the range's zeros is forgotten too: the next miss
        reads the backing file.
        """
        cdef FileRec *fr = self.record(fid)
        cdef int64_t s, p0, p1, dropped = 0
        p0 = offset >> PAGE_SHIFT
        p1 = (offset + length + PAGE - 1) >> PAGE_SHIFT
        with nogil:
            pthread_mutex_lock(&self.mu)
            self._zero_clear(fr, p0, p1)
            for s in range(self.nslots):
                if self.slots[s].file == fid and not self.slots[s].orphan \
                        and self.slots[s].state == S_VALID and not self.slots[s].dirty \
                        and p0 <= self.slots[s].page < p1:
                    self._drop(s)
                    dropped += 1
            pthread_mutex_unlock(&self.mu)
        return dropped

    def file_stats(self, int64_t fid):
        """Counters of one file, as a dict."""
        cdef FileRec *fr = self.record(fid)
        return dict(size=fr.size, cached_bytes=fr.cached * PAGE, dirty_bytes=fr.ndirty * PAGE,
                    multiwrite=bool(fr.multiwrite),
                    twin_bytes=fr.cached * PAGE if fr.multiwrite else 0,
                    hits=fr.hits, misses=fr.misses, bytes_fetched=fr.bytes_fetched,
                    bytes_written=fr.bytes_written, backing_reads=fr.read_ops,
                    backing_writes=fr.write_ops, errors=fr.errors,
                    bytes_pushed=fr.bytes_pushed, pushes=fr.push_ops,
                    zero_fills=fr.zero_fills, zero_fill_bytes=fr.zero_fill_pages * PAGE,
                    known_zero_bytes=self._known_zero_pages(fr) * PAGE,
                    prefetch_pending=fr.pf_pending,
                    read_arounds_refused=fr.read_arounds_refused)

    def read_arounds_refused(self, int64_t fid) -> int:
        """How many read-arounds of random faults a front end refused for
        file ``fid`` (``FileRec.read_arounds_refused``), without the rest
        of :meth:`file_stats`."""
        return self.record(fid).read_arounds_refused

    cdef int64_t _known_zero_pages(self, FileRec *fr):
        cdef int64_t w, n = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            for w in range(fr.znwords):
                if fr.zero[w]:
                    n += __builtin_popcountll(fr.zero[w])
            pthread_mutex_unlock(&self.mu)
        return n

    cdef int64_t _pf_pending(self):
        cdef int64_t f, n = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            for f in range(self.nfiles_cap):
                if self.files[f]:
                    n += self.files[f].pf_pending
            pthread_mutex_unlock(&self.mu)
        return n

    def stats(self):
        """Counters of the whole cache, as a dict."""
        return dict(capacity_bytes=self.nslots * PAGE, used_bytes=(self.nslots - self.nfree) * PAGE,
                    evictions=self.evictions, spent_evictions=self.spent_evictions, wait_spins=self.wait_spins,
                    twins_lost=self.nlost, twins_lost_overflow=self.lost_overflow,
                    prefetch_threads=self.pf_threads, prefetch_queued=self.pq_len,
                    prefetch_pending=self._pf_pending(), prefetches_done=self.pf_done,
                    prefetch_errors=self.pf_errors, prefetches_refused=self.pf_refused,
                    zero_fills=self.zero_fills, zero_fill_bytes=self.zero_fill_pages * PAGE,
                    page_size=PAGE)

    def check(self):
        """Verify the internal invariants (for tests); raise AssertionError if broken."""
        cdef int64_t s, used = 0, ndirty
        cdef int64_t f
        counts = {}
        dirty = {}
        for s in range(self.nslots):
            if self.slots[s].file == -1:
                continue
            used += 1
            assert self.slots[s].pins == 0, "slot %d still pinned" % s
            assert self.slots[s].state == S_VALID, "slot %d state %d" % (s, self.slots[s].state)
            f = self.slots[s].file
            assert self._find(f, self.slots[s].page) == s, "slot %d not in table" % s
            counts[f] = counts.get(f, 0) + 1
            if self.slots[s].dirty:
                dirty[f] = dirty.get(f, 0) + 1
        assert used == self.nslots - self.nfree, "free list out of step"
        ndirty = 0
        for f in range(self.nfiles_cap):
            if self.files[f]:
                assert self.files[f].cached == counts.get(f, 0), "file %d cached count" % f
                assert self.files[f].ndirty == dirty.get(f, 0), "file %d dirty count" % f
                ndirty += self.files[f].ndirty
        assert self.ndirty == ndirty, "total dirty count %d, files say %d" % (self.ndirty, ndirty)




def fs_magic(int fd):
    """The type of the file system holding open file ``fd`` (statfs ``f_type``)."""
    cdef struct_statfs sf
    cdef int r
    with nogil:
        r = fstatfs(fd, &sf)
    if r != 0:
        raise OSError(errno, os.strerror(errno))
    return <unsigned long>sf.f_type & 0xFFFFFFFF


cdef extern from "<fcntl.h>" nogil:
    int c_fallocate "fallocate" (int fd, int mode, long offset, long length)


def fallocate(int fd, int mode, int64_t offset, int64_t length):
    """fallocate(2) of open file ``fd``, without the GIL; raises OSError."""
    cdef int r
    with nogil:
        r = c_fallocate(fd, mode, offset, length)
    if r != 0:
        raise OSError(errno, os.strerror(errno))


PAGE_SIZE = PAGE
