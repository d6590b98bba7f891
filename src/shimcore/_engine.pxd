# cython: language_level=3
"""The engine's C-level API, for compiled modules that cimport it.

``shimfs._notify`` uses :meth:`PageCache.record`, :meth:`PageCache.lend` and
:meth:`PageCache.give_back` to hand cached pages to the kernel straight from
the arena, with no Python in between; ``shimfs._wire`` answers READs with
:meth:`PageCache.lend_whole` (cached pages), :meth:`PageCache.lend_loaded`
(loading the missing ones) and :meth:`PageCache.give_back_read`, and takes
WRITEs that need no I/O with :meth:`PageCache.take_write`.
Everything else here is the engine's own state and helpers, declared once: the C declarations it needs, its
constants, its structs and the fields and C methods of :class:`PageCache`.
The rules for the mutex are at the top of _engine.pyx.
"""
cimport cython
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t, int32_t

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, long offset)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, long offset)
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from *:
    """
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23      /* Linux >= 5.14 */
    #endif
    """
    int MADV_POPULATE_WRITE

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *t)
    int CLOCK_REALTIME

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    ctypedef struct pthread_cond_t:
        pass
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *t)
    int pthread_cond_signal(pthread_cond_t *c)
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    int pthread_attr_init(pthread_attr_t *a)
    int pthread_attr_destroy(pthread_attr_t *a)
    int pthread_attr_setdetachstate(pthread_attr_t *a, int state)
    int PTHREAD_CREATE_DETACHED
    int pthread_create(pthread_t *t, const pthread_attr_t *attr,
                       void *(*fn)(void *) noexcept nogil, void *arg)

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, long offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, long offset)
    int ftruncate(int fd, long length)

cdef extern from "<sys/stat.h>" nogil:
    cdef struct struct_stat "stat":
        long st_size
    int fstat(int fd, struct_stat *st)

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_popcountll(unsigned long long) nogil

cdef extern from "<sys/vfs.h>" nogil:
    cdef struct struct_statfs "statfs":
        long f_type
    int fstatfs(int fd, struct_statfs *buf)


cdef enum:
    PAGE = 4096
    PAGE_SHIFT = 12
    # Longest run moved by one preadv/pwritev: IOV_MAX (1024) iovecs of one page.
    MAX_RUN = 1024
    # Evicted multiwrite pages remembered until the daemon drains them.
    LOST_MAX = 4096
    # Prefetches queued at most (each is at most a read-ahead chunk, 1 MiB).
    PQ_CAP = 4096
    # A prefetch thread with nothing to do for this long (seconds) exits.
    PF_IDLE_SEC = 2
    # Known-zero pages are tracked up to here (64 GiB per file: a 2 MiB bitmap);
    # pages past it are read from the backing file like any other.
    ZERO_MAX_PAGES = 1 << 24

# Slot states.
cdef enum:
    S_FREE = 0
    S_LOADING = 1
    S_VALID = 2

cdef struct Slot:
    int64_t file          # owning file id, -1 when free
    int64_t page          # page index within the file
    uint32_t pins         # threads copying in/out or writing back this slot
    uint8_t state
    uint8_t dirty
    uint8_t ref           # CLOCK reference bit
    uint8_t spent         # the kernel's page cache has these bytes (see _spend)
    uint8_t orphan        # dropped from the table while pinned: free on last unpin

cdef struct FileRec:
    int fd
    int64_t size          # the size this node believes the file has
    uint64_t *dirty       # one bit per page
    int64_t nwords
    # Known-zero pages: this node extended the backing file over them (a
    # truncate up, a write past the end), nobody has written them since, and
    # no refresh or reload has happened.  A miss there is filled with zeros,
    # no backing read.  One bit per page, grown on demand (see _zero_set).
    uint64_t *zero
    int64_t znwords
    int64_t ndirty        # pages set in the bitmap
    int64_t cached        # slots owned by this file
    int multiwrite        # keep a clean twin of every page; write back changed bytes only
    int64_t pf_pending    # prefetch_async items queued or running for this file
    int zombie            # unregistered while a prefetch ran: freed by the last one
    # counters
    uint64_t hits, misses, bytes_fetched, bytes_written, read_ops, write_ops, errors
    uint64_t bytes_pushed, push_ops
    uint64_t zero_fills, zero_fill_pages   # fetches answered with zeros, and their pages
    # Read-arounds of random page faults that a front end refused (shimfs's
    # FUSE wire counts them here, under its own mutex); the engine only keeps it.
    uint64_t read_arounds_refused


cdef struct PfItem:
    int64_t fid, off, size      # fid -1: cancelled (its file was unregistered)


@cython.final
cdef class PageCache:
    cdef pthread_mutex_t mu
    cdef pthread_cond_t loaded      # broadcast when LOADING slots become VALID or are dropped
    cdef char *arena
    cdef size_t arena_len
    cdef Slot *slots
    cdef int64_t nslots
    cdef int32_t *table
    cdef int64_t tmask
    cdef int64_t hand
    cdef int64_t *freelist
    cdef int64_t nfree
    # spent slots, oldest first: the first to evict (see _spend)
    cdef int32_t *spent
    cdef int64_t sp_head, sp_len
    cdef uint64_t spent_evictions
    cdef FileRec **files
    cdef int64_t nfiles_cap
    cdef uint64_t evictions, wait_spins
    cdef int64_t ndirty           # dirty pages of all files (the sum of their ndirty)
    cdef char *twins      # multiwrite: the page as last read from / written to the backing file
    # multiwrite pages evicted with their twins, for the kernel to drop its copies
    cdef int64_t lost[LOST_MAX][2]
    cdef int64_t nlost
    cdef uint64_t lost_overflow
    # prefetch_async: a ring of queued prefetches and the threads serving it
    cdef PfItem pq[PQ_CAP]
    cdef int64_t pq_head, pq_len
    cdef pthread_cond_t pq_ready
    cdef int pf_max, pf_threads, pf_idle
    cdef uint64_t pf_done, pf_errors, pf_refused
    cdef uint64_t zero_fills, zero_fill_pages    # all files, unregistered ones included

    cdef inline int64_t _find(self, int64_t f, int64_t p) noexcept nogil
    cdef inline void _insert(self, int64_t s) noexcept nogil
    cdef void _remove(self, int64_t s) noexcept nogil
    cdef void _release_slot(self, int64_t s) noexcept nogil
    cdef void _drop(self, int64_t s) noexcept nogil
    cdef inline void _unpin(self, int64_t s) noexcept nogil
    cdef int64_t _alloc(self, int64_t f, int64_t p) noexcept nogil
    cdef inline void _spend(self, int64_t s) noexcept nogil
    cdef int64_t _clock(self) noexcept nogil
    cdef int64_t _take_spent(self) noexcept nogil
    cdef void _note_twin_lost(self, int64_t f, int64_t p) noexcept nogil
    cdef int64_t _any_dirty_file(self) noexcept nogil
    cdef int _bitmap_fit(self, FileRec *fr, int64_t page) noexcept nogil
    cdef inline void _set_dirty(self, FileRec *fr, int64_t s) noexcept nogil
    cdef inline void _clear_dirty(self, FileRec *fr, int64_t p) noexcept nogil
    cdef int64_t _next_dirty(self, FileRec *fr, int64_t p) noexcept nogil
    cdef void _zero_set(self, FileRec *fr, int64_t p0, int64_t p1) noexcept nogil
    cdef void _zero_clear(self, FileRec *fr, int64_t p0, int64_t p1) noexcept nogil
    cdef inline void _count_zeros(self, FileRec *fr, int64_t pages) noexcept nogil
    cdef FileRec *record(self, int64_t fid) except NULL
    cdef void _drop_pages(self, int64_t fid) noexcept nogil
    cdef int _load(self, FileRec *fr, int64_t *slot_list, int64_t first_page,
                   int64_t n) noexcept nogil
    cdef int _store(self, FileRec *fr, int64_t *slot_list, int64_t first_page,
                    int64_t n, int64_t last_len) noexcept nogil
    cdef void _wait_loaded(self) noexcept nogil
    cdef void _discard(self, int64_t s) noexcept nogil
    cdef int _fault_in(self, int64_t fid, FileRec *fr, int64_t p0, int64_t p1,
                       int64_t *slot_of, bint for_write, int64_t w0, int64_t w1,
                       int64_t *loaded) noexcept nogil
    cdef int _load_run(self, FileRec *fr, int64_t *slot_of, int64_t *load,
                       int64_t a, int64_t b, int64_t p0) noexcept nogil
    cdef void _prefetch_loop(self) noexcept nogil
    cdef _write_piece(self, int64_t fid, int64_t offset, const char *src, int64_t length)
    cdef _writeback_changed(self, int64_t fid, FileRec *fr)
    cdef int64_t _pf_pending(self)
    cdef int64_t _known_zero_pages(self, FileRec *fr)

    # -- the C API for other compiled modules --------------------------------
    cdef int64_t lend(self, FileRec *fr, int64_t fid, int64_t offset, int64_t end,
                      int64_t *slot_of, iovec *iov) noexcept nogil
    cdef void give_back(self, FileRec *fr, int64_t *slot_of, iovec *iov, int64_t n,
                        bint delivered) noexcept nogil
    cdef int64_t lend_whole(self, FileRec *fr, int64_t fid, int64_t offset, int64_t size,
                            int64_t *slot_of, iovec *iov, char *zeros) noexcept nogil
    cdef int64_t lend_loaded(self, FileRec *fr, int64_t fid, int64_t offset, int64_t size,
                             int64_t *slot_of, iovec *iov, char *zeros) noexcept nogil
    cdef void _lent_iov(self, int64_t p0, int64_t n, int64_t offset, int64_t end,
                        int64_t *slot_of, iovec *iov, char *zeros) noexcept nogil
    cdef void give_back_read(self, FileRec *fr, int64_t *slot_of, iovec *iov,
                             int64_t n, bint hits) noexcept nogil
    cdef int64_t take_write(self, FileRec *fr, int64_t fid, int64_t offset, const char *src,
                            int64_t length) noexcept nogil
