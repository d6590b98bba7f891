# cython: language_level=3, boundscheck=False, wraparound=False
"""The FUSE wire in front of pyfuse3: READs the cache holds are answered in C.

:class:`Wire` sits between the kernel and pyfuse3's session loop:

* After ``pyfuse3.init``, the session's ``/dev/fuse`` descriptor is moved to
  a private number (``kernel_fd``), and one end of an ``AF_UNIX
  SOCK_SEQPACKET`` pair is put at the old number with ``dup2``.  pyfuse3
  reads and writes that socket as if it were the device: a datagram is one
  request or one reply, as on ``/dev/fuse``.
* Several *in* threads block in ``read`` on the device, as libfuse's
  workers do (the kernel wakes one per request; one thread alone made every
  request a wake-up across CPUs: 100 against 30 us per cached 4 KiB READ,
  measured on tmpfs).  A READ whose file handle is registered here
  (:meth:`add`) and whose pages are all in the engine's cache (or known to
  be zeros) is answered at once: the pages are pinned in the arena
  (``PageCache.lend_whole``, _engine.pxd), written to the device with one
  ``writev`` and handed back.  No GIL, no Python, no copy.  A random miss,
  and any miss of a handle whose read-ahead stream prefetches, is loaded
  by the same thread (``PageCache.lend_loaded``, which waits for pages a
  prefetch is loading) and answered.
  A WRITE of a handle registered for writes that needs no I/O is taken
  into the cache (``PageCache.take_write``) and answered; the first such
  WRITE since Python last looked is noted on the side pair (:meth:`take`).
  With ``sparse_faults`` (the kernel's read-around window), a random miss
  longer than a page is refused (EIO): that is the kernel's read-around of
  a page fault, which then asks for the faulting page alone.  A handle
  that turns out to be a read(2) reader is never refused again, and a
  reader walking into a refused range has the rest of it loaded at once
  (docs/design.md, "Sparse faults").
  A GETXATTR of a name outside the control prefix gets ENODATA, and a
  FLUSH of a registered handle whose file has no dirty page gets success:
  what Python would answer.  So does the RELEASE of a read-only handle of
  such a file, noted on the release pair for Python's bookkeeping
  (:meth:`take_released`).  An OPEN of an unopened ``-o mirror`` file,
  and a LOOKUP in a mirrored directory, have their backing call (the open,
  the lstat of the name) made by the in thread, as the requester, before
  they go on to pyfuse3, which takes the result (:meth:`expect`).  A
  LOOKUP of an unopened file whose lstat shows it unchanged since Python
  answered is answered here, with Python's entry (:meth:`enter`); the
  references it gives the kernel are counted for Python's FORGETs
  (:meth:`take_lookups`).  Every other request goes to pyfuse3 unchanged.
* The *out* thread copies what pyfuse3 writes (replies) to the device.
* Notifications do not take the pair: :class:`shimfs._notify.SessionKernel`
  writes them to ``kernel_fd`` itself, since they block until the kernel is
  done and their errors matter.

The daemon's read-ahead policy (readahead.Stream) lives in Python and must
keep seeing a sequential reader: each handle has a *trigger* offset
(:meth:`set_trigger`).  A READ that ends past it, or misses, is answered
here all the same, and the policy is told of it by a note on the side pair
(:meth:`take`): the handle's trigger becomes ``NOTED`` (nothing passes it)
until Python, having shown the READ to the policy, sets the next.  So the
policy sees one READ in each stretch it asked to see, and a scan's bytes
never cross the pair.  Only a handle without a prefetching stream sends
its misses that continue a run to Python, where the policy may see a scan
starting.

End of the session: a read of the device that fails with ENODEV (unmounted,
or the connection aborted) marks :attr:`ended_by_kernel` and makes
:attr:`ended_fd` readable; the daemon then stops pyfuse3's loop.
:meth:`close` stops both threads and closes the device, which aborts the
connection as closing libfuse's own descriptor would; only then may
pyfuse3 unmount (its unmount would otherwise wait on this daemon).

Concurrency: the handle table is guarded by the wire's mutex, which an in
thread holds from the lookup until a hit's pages are handed back, so a
handle (and its engine file record) is never removed under a reply being
written.  A miss is loaded without the mutex: its handle counts as busy
meanwhile, and :meth:`remove` waits for that.  To stop, the in threads are
sent SIGUSR2 (a handler that does nothing, installed without SA_RESTART)
until they leave their blocking ``read``.
"""

import os

from libc.stdint cimport int64_t, uint64_t, uint32_t, int32_t, uint16_t
from libc.errno cimport (errno, EIO, EINTR, ENOENT, EAGAIN, ENOBUFS, ENODATA, EACCES, EROFS,
                         EPERM, ETXTBSY, ENAMETOOLONG)
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset, memcpy, memcmp, strlen
from posix.unistd cimport read, write, close, pipe, dup, dup2
from posix.fcntl cimport open as c_open, O_RDWR, O_RDONLY, O_CLOEXEC
from posix.stat cimport struct_stat, fstat, lstat, S_ISREG

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

from shimcore._creds cimport Creds, MAX_GROUPS, own_creds, groups_of, take_creds, give_back
from shimcore._engine cimport (PageCache, FileRec, iovec, writev, MAX_RUN, PAGE, PAGE_SHIFT,
                               pthread_mutex_t, pthread_mutex_init, pthread_mutex_destroy,
                               pthread_mutex_lock, pthread_mutex_unlock, pthread_t,
                               pthread_create, pthread_cond_t, pthread_cond_init, timespec,
                               pthread_cond_destroy, pthread_cond_broadcast, pthread_cond_signal)

cdef extern from *:
    """
    #define SHIM_COUNT(p) __atomic_fetch_add((p), 1, __ATOMIC_RELAXED)
    """
    void SHIM_COUNT(uint64_t *p) nogil      # a counter nobody orders against

cdef extern from "<pthread.h>" nogil:
    int pthread_join(pthread_t t, void **ret)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long n, int timeout)
    short POLLIN, POLLOUT

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_GETFL, F_SETFL, F_DUPFD_CLOEXEC, O_NONBLOCK

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int socketpair(int domain, int type, int protocol, int *sv)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int AF_UNIX, SOCK_SEQPACKET, SOCK_CLOEXEC, SOL_SOCKET
    int SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE, MSG_NOSIGNAL, MSG_DONTWAIT


# <linux/fuse.h>
cdef struct InHeader:        # fuse_in_header
    uint32_t len
    uint32_t opcode
    uint64_t unique
    uint64_t nodeid
    uint32_t uid
    uint32_t gid
    uint32_t pid
    uint16_t total_extlen
    uint16_t padding

cdef struct ReadIn:          # fuse_read_in
    uint64_t fh
    uint64_t offset
    uint32_t size
    uint32_t read_flags
    uint64_t lock_owner
    uint32_t flags
    uint32_t padding

cdef struct FallocateIn:     # fuse_fallocate_in
    uint64_t fh
    uint64_t offset
    uint64_t length
    uint32_t mode
    uint32_t padding

cdef struct WriteIn:         # fuse_write_in; the data follows
    uint64_t fh
    uint64_t offset
    uint32_t size
    uint32_t write_flags
    uint64_t lock_owner
    uint32_t flags
    uint32_t padding

cdef struct WriteOut:        # fuse_write_out
    uint32_t size
    uint32_t padding

cdef struct GetxattrIn:      # fuse_getxattr_in; the name follows, NUL-terminated
    uint32_t size
    uint32_t padding

cdef struct ReleaseIn:       # fuse_release_in
    uint64_t fh
    uint32_t flags
    uint32_t release_flags
    uint64_t lock_owner

cdef struct FlushIn:         # fuse_flush_in
    uint64_t fh
    uint32_t unused
    uint32_t padding
    uint64_t lock_owner

cdef struct OutHeader:       # fuse_out_header
    uint32_t len
    int32_t error
    uint64_t unique

cdef enum:
    FUSE_LOOKUP = 1
    FUSE_OPEN = 14
    FUSE_READ = 15
    FUSE_WRITE = 16
    FUSE_WRITE_KILL_SUIDGID = 1 << 2
    FUSE_RELEASE = 18
    FUSE_GETXATTR = 22
    FUSE_FLUSH = 25
    FUSE_FALLOCATE = 43
    # One request: at most max_pages (256, the kernel's limit) of data and
    # its headers; the kernel refuses smaller read buffers.
    BUFSIZE = (256 + 2) * PAGE
    # Socket buffers (forced as root): a datagram must fit whole.
    SOCKBUF = 4 << 20
    # Handle slots: empty, in use, removed (a tombstone for the probe chain).
    H_EMPTY = 0
    H_USED = 1
    H_GONE = 2
    NO_TRIGGER = 0x7fffffffffffffff
    # A handle whose READ past its trigger was answered here and noted for
    # Python: nothing passes until Python sets the next trigger.
    NOTED = 0x7ffffffffffffffe
    MAX_THREADS = 64
    # The control xattrs' prefix (names.XATTR_PREFIX) fits in this.
    PREFIX_MAX = 32
    # A READ request: fuse_in_header and fuse_read_in (checked below).
    REQ_LEN = 80
    # A note on the side pair that WRITEs of a handle were taken: a
    # fuse_in_header (opcode FUSE_WRITE) and the handle.
    NOTE_LEN = 48
    # A note on the side pair of a READ answered past its trigger: a
    # fuse_in_header (opcode FUSE_READ), the handle, offset and size.
    NOTE_READ_LEN = 64
    # A READ this far from where the handle's last one ended does not
    # continue it, for refusing read-around: one request's span (1 MiB)
    # and the slack of READs in flight together.
    FAR = (256 << 12) + (64 << 10)
    # Work ahead of Python: the longest backing path, results kept for it.
    PATH_LEN = 4096
    AHEAD = 64

cdef struct Handle:           # a table slot (see Slot)
    uint64_t fh
    int state
    int64_t fid
    FileRec *fr
    int64_t trigger
    int64_t last_end        # end of the last READ of this handle
    int64_t grp_lo, grp_hi  # the last read-around refused (sparse faults)
    int grp_open            # refused, and no READ of the handle served since
    int64_t cand            # a READ here makes the handle a reader (-1: none)
    int reader              # read(2) seen, or asked at add: its READs are never refused
    int own_misses          # no read-ahead policy: every miss is served here
    int writes              # WRITEs that need no I/O are taken here
    int release             # its RELEASE is answered here while the file is clean
    int wrote               # one was, since Python last took note (Wire.written)
    int busy                # misses of this handle being loaded and answered


cdef enum:
    K_FILE = 1              # an unopened file: an OPEN of it opens its backing path
    K_DIR = 2               # a directory: a LOOKUP in it lstats the backing name

cdef struct FuseAttr:        # fuse_attr
    uint64_t ino, size, blocks, atime, mtime, ctime
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags

cdef struct EntryOut:        # fuse_entry_out
    uint64_t nodeid, generation, entry_valid, attr_valid
    uint32_t entry_valid_nsec, attr_valid_nsec
    FuseAttr attr

cdef struct Expected:         # a table slot (see Slot)
    uint64_t nodeid
    int state
    char *path
    int kind                # K_FILE, K_DIR
    # An unopened file's entry (Wire.enter): its name in its parent, what
    # the lstat of its backing path must show, and Python's answer.
    char *name              # NULL: no entry
    size_t name_len
    uint64_t parent, key
    uint64_t dev, ino
    int64_t size, mtime_ns
    EntryOut out
    uint64_t lookups        # LOOKUPs answered here, not yet taken by Python

cdef struct Named:           # the entries by (parent, name): a key and its node (a Slot)
    uint64_t key
    int state
    uint64_t nodeid

cdef struct Slot:
    # What the wire's three hash tables (handles, expected nodes, entries)
    # have in common: each slot starts with its key and its state (H_EMPTY,
    # H_USED, H_GONE), so one probe function and one rehash serve them all.
    # Open addressing, linear probing, tombstones; at most half full.
    uint64_t key
    int state

cdef struct Ahead:           # a backing file opened, or a name stat'ed, for Python
    uint64_t nodeid
    uint32_t uid, gid, pid
    int used                # 0: free; else the kind of the request (K_FILE: an OPEN)
    uint64_t seq
    int fd                  # -1 if the open failed
    int err                 # its errno
    int writable
    char *path
    struct_stat st


cdef inline int64_t _home(uint64_t key, int64_t cap) noexcept nogil:
    """Where a key's probe starts in a table of ``cap`` (a power of two) slots."""
    return <int64_t>(key * 0x9E3779B97F4A7C15ULL >> 40) & (cap - 1)


cdef int _regrow(void **table, int64_t *cap, int64_t *used, int64_t live,
                 size_t size) noexcept nogil:
    """Rehash ``table`` (``cap`` slots of ``size`` bytes, each a Slot first,
    ``live`` of them in use) into a new one with room for one more at most
    half full; ``used`` (slots not empty) becomes ``live``.  -1: out of
    memory, and the table is left as it was."""
    cdef int64_t c = 64, i, j
    cdef char *new
    cdef Slot *src
    while (live + 1) * 2 > c:
        c *= 2
    new = <char *>calloc(c, size)
    if new == NULL:
        return -1
    for i in range(cap[0]):
        src = <Slot *>(<char *>table[0] + i * size)
        if src.state == H_USED:
            j = _home(src.key, c)
            while (<Slot *>(new + j * size)).state != H_EMPTY:
                j = (j + 1) & (c - 1)
            memcpy(new + j * size, src, size)
    free(table[0])
    table[0] = new
    cap[0] = c
    used[0] = live
    return 0


cdef inline uint64_t _name_key(uint64_t parent, const char *name, size_t n) noexcept nogil:
    """An entry's key: FNV-1a of its name, seeded with its parent's node id."""
    cdef uint64_t h = 0xcbf29ce484222325ULL ^ (parent * 0x9E3779B97F4A7C15ULL)
    cdef size_t i
    for i in range(n):
        h = (h ^ <unsigned char>name[i]) * 0x100000001b3ULL
    return h


cdef void *_in_thread(void *arg) noexcept with gil:
    cdef Wire w = <Wire>arg
    with nogil:
        _only_wakeups()
        w._pump_in()
    return NULL


cdef void *_out_thread(void *arg) noexcept with gil:
    cdef Wire w = <Wire>arg
    with nogil:
        _only_wakeups()
        w._pump_out()
    return NULL


cdef void _nothing(int sig) noexcept nogil:
    pass


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    cdef struct sigaction_t "sigaction":
        void (*sa_handler)(int) noexcept nogil
        sigset_t sa_mask
        int sa_flags
    int sigaction(int sig, const sigaction_t *act, sigaction_t *old)
    int sigemptyset(sigset_t *s)
    int sigfillset(sigset_t *s)
    int sigdelset(sigset_t *s, int sig)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    int pthread_kill(pthread_t t, int sig)
    int SIGUSR2, SIG_SETMASK

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec *req, timespec *rem)

cdef extern from "<pthread.h>" nogil:
    int pthread_tryjoin_np(pthread_t t, void **ret)


cdef void _install_wakeup() noexcept nogil:
    """SIGUSR2 interrupts a blocking read and does nothing else."""
    cdef sigaction_t sa
    memset(&sa, 0, sizeof(sa))
    sa.sa_handler = _nothing
    sigemptyset(&sa.sa_mask)
    sa.sa_flags = 0                 # no SA_RESTART: read() returns EINTR
    sigaction(SIGUSR2, &sa, NULL)


cdef void _only_wakeups() noexcept nogil:
    """This thread takes no signal but SIGUSR2: the daemon's own (SIGTERM,
    SIGINT) go to its Python thread."""
    cdef sigset_t s
    sigfillset(&s)
    sigdelset(&s, SIGUSR2)
    pthread_sigmask(SIG_SETMASK, &s, NULL)


cdef int _wait(int fd, int stop) noexcept nogil:
    """Block until ``fd`` is readable (1) or ``stop`` is (0)."""
    return _wait_for(fd, POLLIN, stop)


cdef int _wait_writable(int fd, int stop) noexcept nogil:
    """Block until ``fd`` is writable (1) or ``stop`` is readable (0)."""
    return _wait_for(fd, POLLOUT, stop)


cdef int _wait_for(int fd, short events, int stop) noexcept nogil:
    cdef pollfd p[2]
    cdef int r
    p[0].fd = fd
    p[0].events = events
    p[1].fd = stop
    p[1].events = POLLIN
    while True:
        p[0].revents = 0
        p[1].revents = 0
        r = poll(p, 2, -1)
        if r < 0 and errno == EINTR:
            continue
        if p[1].revents:
            return 0
        if r > 0:
            return 1



cdef class Wire:
    """The compiled reader of one FUSE session (see the module docstring)."""

    cdef PageCache pc
    cdef readonly int kernel_fd
    cdef int pfd, stop_r, stop_w, end_w
    cdef readonly int ended_fd
    #: The kernel ended the session (ENODEV): the mount is gone already.
    cdef readonly bint ended_by_kernel
    cdef pthread_mutex_t mu
    cdef pthread_cond_t idle        # a miss was answered
    cdef int64_t inflight, slack    # misses being loaded
    cdef bint stopping
    cdef pthread_t t_in[MAX_THREADS]
    cdef int nin, nin_live
    cdef Handle *tab
    cdef int64_t cap, used, live
    cdef pthread_t t_out
    cdef int side_w
    cdef int rel_w
    cdef uint64_t rel_pending       # notes sent since take_released last looked
    #: Readable when RELEASEs answered here wait for :meth:`take_released`.
    cdef readonly int released_fd
    #: Readable when requests that pyfuse3 cannot handle (FALLOCATE) wait
    #: for :meth:`take`.
    cdef readonly int side_fd
    cdef bint running
    cdef char *zeros
    cdef char *outbuf
    # counters (read under the mutex)
    cdef uint64_t fast_reads, fast_read_bytes, forwarded, forward_errors, reply_errors
    cdef uint64_t pass_missing, fast_misses, miss_fallbacks
    cdef uint64_t noted, notes_dropped
    cdef uint64_t fast_getxattrs, fast_flushes, fast_writes, fast_write_bytes, fast_releases
    cdef uint64_t refused, refused_bytes, readers, group_loads, centre_loads
    cdef int64_t sparse             # the kernel's read-around, when refused (0: never)
    cdef char prefix[PREFIX_MAX]    # control xattrs: GETXATTRs of other names get ENODATA here
    cdef int prefix_len             # 0: every GETXATTR goes to Python
    # requests by opcode (the last slot: any larger); this and the forward
    # counters are relaxed atomics (SHIM_COUNT), the rest under the mutex
    cdef uint64_t ops[64]
    # opens ahead (see expect): unopened files by node id, and results
    cdef Expected *exp
    cdef int64_t exp_cap, exp_used, exp_live
    cdef Named *nam
    cdef int64_t nam_cap, nam_used, nam_live
    cdef uint64_t fast_lookups
    cdef Ahead ahead[AHEAD]
    cdef int ahead_next
    cdef uint64_t ahead_seq
    cdef bint ahead_off             # a credential could not be given back: no more
    cdef uint64_t opens_ahead, ahead_dropped, stats_ahead
    cdef Creds own                  # the in threads' own credentials

    def __cinit__(self):
        cdef int i
        self.kernel_fd = -1
        self.pfd = -1
        self.stop_r = self.stop_w = -1
        self.ended_fd = self.end_w = -1
        self.side_fd = self.side_w = -1
        self.released_fd = self.rel_w = -1
        pthread_mutex_init(&self.mu, NULL)
        pthread_cond_init(&self.idle, NULL)
        for i in range(AHEAD):
            self.ahead[i].fd = -1

    def __init__(self, PageCache engine, int session_fd, int64_t slack=32 << 10,
                 int threads=8, bytes control_prefix=b"", int64_t sparse_faults=0):
        """Take over ``session_fd`` (pyfuse3's /dev/fuse descriptor).  Raises
        OSError, changing nothing, when the socket pair cannot carry a whole
        request (its buffers are capped for users without CAP_NET_ADMIN).

        ``slack``: a READ that starts this close to where the handle's last
        one ended (either side: READs in flight arrive in any order) may
        continue a run, which the read-ahead policy must see;
        ``threads``: in threads, which are also how many random misses are
        loaded at once; ``control_prefix``: the only xattr names the daemon
        answers (``user.shimfs.``): a GETXATTR of any other name gets
        ENODATA here, as Python would answer it; ``sparse_faults``: the
        kernel's read-around window in bytes (``read_ahead_kb``), which is
        then refused for random page faults (see the module's docstring);
        0 serves it."""
        cdef int sv[2]
        cdef int fds[2]
        cdef int val = SOCKBUF, got = 0, i, opt, force
        cdef socklen_t sl = sizeof(int)
        cdef Handle hs
        cdef Expected es
        cdef Named ns
        cdef Slot ss
        if <char *>&hs.state - <char *>&hs != <char *>&ss.state - <char *>&ss or \
                <char *>&es.state - <char *>&es != <char *>&ss.state - <char *>&ss or \
                <char *>&ns.state - <char *>&ns != <char *>&ss.state - <char *>&ss:
            raise SystemError("a table slot does not start as Slot does")
        self.pc = engine
        self.cap = 64
        self.tab = <Handle *>calloc(self.cap, sizeof(Handle))
        self.exp_cap = 64
        self.exp = <Expected *>calloc(self.exp_cap, sizeof(Expected))
        self.nam_cap = 64
        self.nam = <Named *>calloc(self.nam_cap, sizeof(Named))
        if own_creds(&self.own) < 0:
            self.ahead_off = True
        self.zeros = <char *>calloc(1, PAGE)
        self.outbuf = <char *>malloc(BUFSIZE)
        self.slack = slack
        self.sparse = sparse_faults
        if threads < 1 or threads > MAX_THREADS:
            raise ValueError("threads: 1 to %d" % MAX_THREADS)
        if len(control_prefix) >= PREFIX_MAX:
            raise ValueError("control_prefix: at most %d bytes" % (PREFIX_MAX - 1))
        memcpy(self.prefix, <const char *>control_prefix, len(control_prefix))
        self.prefix_len = len(control_prefix)
        if not self.tab or not self.zeros or not self.outbuf or not self.exp or not self.nam:
            raise MemoryError()
        if socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0:
            raise OSError(errno, "socketpair: " + os.strerror(errno))
        for i in range(2):
            for opt, force in ((SO_SNDBUF, SO_SNDBUFFORCE), (SO_RCVBUF, SO_RCVBUFFORCE)):
                if setsockopt(sv[i], SOL_SOCKET, force, &val, sizeof(int)) < 0:
                    setsockopt(sv[i], SOL_SOCKET, opt, &val, sizeof(int))
            getsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &got, &sl)
            if got < 2 * BUFSIZE:
                close(sv[0])
                close(sv[1])
                raise OSError(ENOBUFS, "socket buffers capped at %d bytes" % got)
        if pipe(fds) < 0:
            close(sv[0])
            close(sv[1])
            raise OSError(errno, "pipe: " + os.strerror(errno))
        self.stop_r, self.stop_w = fds[0], fds[1]
        if pipe(fds) < 0:
            raise OSError(errno, "pipe: " + os.strerror(errno))
        self.ended_fd, self.end_w = fds[0], fds[1]
        if socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) < 0:
            raise OSError(errno, "socketpair: " + os.strerror(errno))
        self.side_fd, self.side_w = fds[0], fds[1]
        fcntl(self.side_fd, F_SETFL, fcntl(self.side_fd, F_GETFL) | O_NONBLOCK)
        if socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) < 0:
            raise OSError(errno, "socketpair: " + os.strerror(errno))
        self.released_fd, self.rel_w = fds[0], fds[1]
        for i in range(2):
            fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK)
        self.kernel_fd = fcntl(session_fd, F_DUPFD_CLOEXEC, 3)
        if self.kernel_fd < 0 or dup2(sv[0], session_fd) < 0:
            raise OSError(errno, "moving the session descriptor: " + os.strerror(errno))
        close(sv[0])
        self.pfd = sv[1]
        fcntl(self.pfd, F_SETFL, fcntl(self.pfd, F_GETFL) | O_NONBLOCK)
        _install_wakeup()
        if pthread_create(&self.t_out, NULL, _out_thread, <void *>self) != 0:
            raise OSError(errno, "pthread_create")
        self.running = True
        for i in range(threads):
            if pthread_create(&self.t_in[i], NULL, _in_thread, <void *>self) != 0:
                if not self.nin:
                    raise OSError(errno, "pthread_create")
                break
            self.nin += 1
        self.nin_live = self.nin

    def __dealloc__(self):
        self._drop_ahead()
        self._drop_expected()
        free(self.exp)
        free(self.nam)
        free(self.tab)
        free(self.zeros)
        free(self.outbuf)
        for fd in (self.kernel_fd, self.pfd, self.stop_r, self.stop_w, self.ended_fd, self.end_w,
                   self.side_fd, self.side_w, self.released_fd, self.rel_w):
            if fd >= 0:
                close(fd)
        pthread_cond_destroy(&self.idle)
        pthread_mutex_destroy(&self.mu)

    # -- the handle table (called by the daemon, with the GIL) --------------

    cdef Handle *_find(self, uint64_t fh) noexcept nogil:
        """The slot of ``fh``, or NULL (mu held)."""
        cdef int64_t i = _home(fh, self.cap)
        while self.tab[i].state != H_EMPTY:
            if self.tab[i].state == H_USED and self.tab[i].fh == fh:
                return &self.tab[i]
            i = (i + 1) & (self.cap - 1)
        return NULL

    def add(self, uint64_t fh, int64_t fid, bint own_misses=False, bint writes=False,
            bint release=False, bint asked=False):
        """Answer READs of handle ``fh`` (a file of the engine) from the cache.
        ``own_misses``: the handle has no read-ahead policy, so its misses
        are all served here; else a miss that continues a run goes to Python.
        ``writes``: its WRITEs that need no I/O (``PageCache.take_write``)
        are taken here too; the first after each :meth:`written` is also
        reported on the side pair (:meth:`take`).  ``release``: a RELEASE of
        the handle while its file has no dirty page here is answered here
        (the handle is forgotten, as by :meth:`remove`) and reported on the
        release pair (:meth:`take_released`).  ``asked``: its READs are
        served as asked, never refused as a read-around (it was opened with
        a small read-around window: ``OpenFiles.open_handle``)."""
        cdef FileRec *fr = self.pc.record(fid)
        cdef int64_t i
        cdef int err = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            if self._find(fh) == NULL and (self.used + 1) * 2 > self.cap:
                err = _regrow(<void **>&self.tab, &self.cap, &self.used, self.live,
                              sizeof(Handle))
            if not err:
                h = self._find(fh)
                if h == NULL:
                    i = _home(fh, self.cap)
                    while self.tab[i].state == H_USED:
                        i = (i + 1) & (self.cap - 1)
                    if self.tab[i].state == H_EMPTY:
                        self.used += 1
                    h = &self.tab[i]
                    self.live += 1
                h.fh = fh
                h.fid = fid
                h.fr = fr
                h.trigger = NO_TRIGGER
                h.last_end = 0
                h.grp_lo = h.grp_hi = -1
                h.grp_open = 0
                h.reader = asked
                h.cand = -1
                h.own_misses = own_misses
                h.writes = writes
                h.release = release
                h.wrote = 0
                h.busy = 0
                h.state = H_USED
            pthread_mutex_unlock(&self.mu)
        if err:
            raise MemoryError()

    def remove(self, uint64_t fh) -> bool:
        """Forget handle ``fh``; once this returns no reply of it is being
        written.  True if a WRITE was taken here since the last
        :meth:`written`."""
        cdef bint wrote = False
        with nogil:
            pthread_mutex_lock(&self.mu)
            h = self._find(fh)
            if h != NULL:
                while h.busy:
                    pthread_cond_wait(&self.idle, &self.mu)
                wrote = h.wrote
                h.state = H_GONE
                h.fr = NULL
                self.live -= 1
            pthread_mutex_unlock(&self.mu)
        return wrote

    def written(self, uint64_t fh) -> bool:
        """Whether a WRITE of ``fh`` was taken here since the last call (or
        since :meth:`add`); the next one is reported on the side pair again."""
        cdef bint wrote = False
        with nogil:
            pthread_mutex_lock(&self.mu)
            h = self._find(fh)
            if h != NULL:
                wrote = h.wrote
                h.wrote = 0
            pthread_mutex_unlock(&self.mu)
        return wrote

    def clear(self):
        """Forget every handle: the session is ending, and the engine may
        forget its files once this returns."""
        cdef int64_t i
        with nogil:
            pthread_mutex_lock(&self.mu)
            while self.inflight:
                pthread_cond_wait(&self.idle, &self.mu)
            for i in range(self.cap):
                self.tab[i].state = H_EMPTY
                self.tab[i].fr = NULL
            self.used = self.live = 0
            pthread_mutex_unlock(&self.mu)

    def set_trigger(self, uint64_t fh, int64_t offset):
        """READs of ``fh`` that end past ``offset`` go to Python (negative: none)."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            h = self._find(fh)
            if h != NULL:
                h.trigger = offset if offset >= 0 else NO_TRIGGER
            pthread_mutex_unlock(&self.mu)

    def counters(self) -> dict:
        """READs answered here and their bytes, and among them misses the
        workers loaded, and READs noted for the read-ahead policy (and notes
        the side pair had no room for); requests passed to pyfuse3, and among
        them misses that continue a run, and misses a worker could
        not serve (a full cache, a backing error: Python retries them);
        writes to the pair or the device that failed; GETXATTRs and FLUSHes
        answered here; WRITEs taken here and their bytes."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            r, b, f = self.fast_reads, self.fast_read_bytes, self.forwarded
            fe, re = self.forward_errors, self.reply_errors
            pm = self.pass_missing
            nt, nd = self.noted, self.notes_dropped
            fm, mf = self.fast_misses, self.miss_fallbacks
            fx, ff, fr = self.fast_getxattrs, self.fast_flushes, self.fast_releases
            fw, fwb = self.fast_writes, self.fast_write_bytes
            rf, rfb, rd, gl = self.refused, self.refused_bytes, self.readers, self.group_loads
            cl = self.centre_loads
            oa, od, sa = self.opens_ahead, self.ahead_dropped, self.stats_ahead
            fl = self.fast_lookups
            pthread_mutex_unlock(&self.mu)
        return {"fast_reads": r, "fast_read_bytes": b, "forwarded_requests": f,
                "fast_read_misses": fm, "fast_read_miss_fallbacks": mf,
                "fast_read_passed_missing": pm,
                "fast_reads_noted": nt, "read_notes_dropped": nd,
                "forward_errors": fe, "reply_errors": re,
                "fast_getxattrs": fx, "fast_flushes": ff, "fast_releases": fr,
                "fast_writes": fw, "fast_write_bytes": fwb,
                "read_arounds_refused": rf, "read_around_bytes_refused": rfb,
                "reader_handles": rd, "refused_range_loads": gl,
                "refused_centre_loads": cl, "opens_ahead": oa, "stats_ahead": sa,
                "ahead_dropped": od, "fast_lookups": fl}

    def take(self) -> tuple:
        """What waits on the side pair: the FALLOCATE requests (pyfuse3 has
        no handler for them), as (unique, fh, offset, length, mode, uid,
        gid, pid), each to be answered with :meth:`reply_error`; the
        handles whose WRITEs were taken here (see :meth:`written`); and the
        READs answered here past their handle's trigger, as (fh, offset,
        size), for the read-ahead policy, whose trigger stays ``NOTED``
        until :meth:`set_trigger`."""
        cdef char msg[256]
        cdef ssize_t n
        cdef InHeader *h = <InHeader *>msg
        cdef FallocateIn *f = <FallocateIn *>(msg + sizeof(InHeader))
        cdef uint64_t *wfh = <uint64_t *>(msg + sizeof(InHeader))
        out, wrote, seen = [], [], []
        while True:
            n = recv(self.side_fd, msg, sizeof(msg), 0)
            if n < 0:
                break
            if h.opcode == FUSE_WRITE and n == NOTE_LEN:
                wrote.append(wfh[0])
                continue
            if h.opcode == FUSE_READ and n == NOTE_READ_LEN:
                seen.append((wfh[0], wfh[1], wfh[2]))
                continue
            if n < <ssize_t>(sizeof(InHeader) + sizeof(FallocateIn)):
                continue
            out.append((h.unique, f.fh, f.offset, f.length, f.mode, h.uid, h.gid, h.pid))
        return out, wrote, seen

    def reply_error(self, uint64_t unique, int err):
        """Answer request ``unique`` with errno ``err`` (0: success, no data)."""
        cdef int e
        with nogil:
            e = self._status(unique, err)
        if e and e != ENOENT:
            raise OSError(e, os.strerror(e))

    def opcodes(self) -> dict:
        """Requests the kernel sent, by FUSE opcode (63: 63 and above)."""
        return {i: self.ops[i] for i in range(64) if self.ops[i]}

    def close(self):
        """Stop both threads and close the device (the kernel aborts the
        connection).  pyfuse3 may unmount after this."""
        cdef char c = b"x"
        cdef int i
        cdef timespec pause
        pause.tv_sec = 0
        pause.tv_nsec = 2000000
        if self.running:
            with nogil:
                pthread_mutex_lock(&self.mu)
                self.stopping = True
                pthread_mutex_unlock(&self.mu)
                write(self.stop_w, &c, 1)
                pthread_join(self.t_out, NULL)
                for i in range(self.nin):
                    # the signal may land just before the thread blocks
                    # again: repeat it until the thread is gone
                    while True:
                        pthread_kill(self.t_in[i], SIGUSR2)
                        if pthread_tryjoin_np(self.t_in[i], NULL) == 0:
                            break
                        nanosleep(&pause, NULL)
            self.running = False
            self._drop_ahead()
        if self.kernel_fd >= 0:
            close(self.kernel_fd)
            self.kernel_fd = -1
        if self.pfd >= 0:
            close(self.pfd)
            self.pfd = -1

    # -- opens ahead (called by the daemon, with the GIL) --------------------

    cdef Expected *_exp_find(self, uint64_t nodeid) noexcept nogil:
        """The slot of ``nodeid`` in the table of unopened files, or NULL (mu held)."""
        cdef int64_t i = _home(nodeid, self.exp_cap)
        while self.exp[i].state != H_EMPTY:
            if self.exp[i].state == H_USED and self.exp[i].nodeid == nodeid:
                return &self.exp[i]
            i = (i + 1) & (self.exp_cap - 1)
        return NULL

    def expect(self, uint64_t nodeid, bytes path, bint directory=False):
        """Work an in thread does before it passes a request on, so that
        Python need not hand it to a worker thread and back (two wake-ups,
        ~150 us here); Python takes the result with :meth:`take_ahead`.

        A file (``directory`` false) is unopened, its backing file at
        ``path``: an in thread that reads an OPEN of it opens ``path`` first,
        as the requester (read/write if allowed, else read-only, O_NONBLOCK
        for the open: as ``namespace._open_backing``) and fstats it.  A
        directory's backing directory is ``path``: a LOOKUP in it has the
        name lstat'ed there, as the requester.  Again for the same node:
        the new path replaces the old."""
        cdef Py_ssize_t n = len(path)
        cdef char *copy
        cdef Expected *e
        cdef int64_t i
        cdef int kind = K_DIR if directory else K_FILE
        if n >= PATH_LEN:
            return
        copy = <char *>malloc(n + 1)
        if copy == NULL:
            raise MemoryError()
        memcpy(copy, <const char *>path, n)
        copy[n] = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            e = self._exp_find(nodeid)
            if e != NULL:
                free(e.path)
                e.path = copy
                e.kind = kind
                copy = NULL
            elif (self.exp_used + 1) * 2 <= self.exp_cap or \
                    _regrow(<void **>&self.exp, &self.exp_cap, &self.exp_used, self.exp_live,
                            sizeof(Expected)) == 0:
                i = _home(nodeid, self.exp_cap)
                while self.exp[i].state == H_USED:
                    i = (i + 1) & (self.exp_cap - 1)
                if self.exp[i].state == H_EMPTY:
                    self.exp_used += 1
                self.exp[i].state = H_USED
                self.exp[i].nodeid = nodeid
                self.exp[i].path = copy
                self.exp[i].kind = kind
                self.exp_live += 1
                copy = NULL
            pthread_mutex_unlock(&self.mu)
        free(copy)

    def unexpect(self, uint64_t nodeid) -> int:
        """Node ``nodeid`` is opened, or gone: its requests are left to Python.
        Returns the LOOKUPs of its entry answered here that Python has not
        taken (:meth:`take_lookups`): references the kernel holds."""
        cdef Expected *e
        cdef uint64_t n = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            e = self._exp_find(nodeid)
            if e != NULL:
                n = e.lookups
                self._unname(e)
                free(e.path)
                e.path = NULL
                e.state = H_GONE
                self.exp_live -= 1
            pthread_mutex_unlock(&self.mu)
        return n

    def enter(self, uint64_t nodeid, uint64_t parent, bytes name, tuple ident, tuple seen,
              tuple attr, uint32_t blksize) -> bool:
        """Let the in threads answer a LOOKUP of the unopened file ``nodeid``
        (expected: :meth:`expect`), called ``name`` in directory ``parent``,
        with what Python would answer: ``attr`` (nodes.Attr's fields, in
        its order; ``blksize`` as the adapter sets it).  An in thread
        answers only after its lstat of the name, as the requester, shows
        the very file Python saw: ``ident`` (st_dev, st_ino), and ``seen``
        (size, mtime in ns).  Anything else goes to Python, which may call
        this again.  Again for the same node: the new entry replaces the
        old, and the LOOKUPs answered stay counted.  False: not expected."""
        cdef Py_ssize_t n = len(name)
        cdef char *copy
        cdef Expected *e
        cdef EntryOut out
        cdef bint done = False
        ino, mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, timeout = attr
        memset(&out, 0, sizeof(out))
        out.nodeid = nodeid
        out.entry_valid = out.attr_valid = <uint64_t>int(timeout)
        out.entry_valid_nsec = out.attr_valid_nsec = \
            min(<uint32_t>((timeout - int(timeout)) * 1e9), 999999999)
        out.attr.ino, out.attr.size, out.attr.blocks = ino, size, (size + 511) // 512
        out.attr.atime, out.attr.atimensec = divmod(atime_ns, 1000000000)
        out.attr.mtime, out.attr.mtimensec = divmod(mtime_ns, 1000000000)
        out.attr.ctime, out.attr.ctimensec = divmod(ctime_ns, 1000000000)
        out.attr.mode, out.attr.nlink, out.attr.uid, out.attr.gid = mode, nlink, uid, gid
        out.attr.blksize = blksize
        if n == 0 or n > 255:
            return False
        copy = <char *>malloc(n + 1)
        if copy == NULL:
            raise MemoryError()
        memcpy(copy, <const char *>name, n)
        copy[n] = 0
        cdef uint64_t dev = ident[0], bino = ident[1]
        cdef int64_t ssize = seen[0], smtime = seen[1]
        with nogil:
            pthread_mutex_lock(&self.mu)
            e = self._exp_find(nodeid)
            if e != NULL and e.kind == K_FILE:
                self._unname(e)
                e.name, e.name_len, e.parent = copy, n, parent
                e.key = _name_key(parent, copy, n)
                if self._name(e) == 0:
                    copy = NULL
                    e.dev, e.ino, e.size, e.mtime_ns = dev, bino, ssize, smtime
                    e.out = out
                    done = True
                else:
                    e.name = NULL
            pthread_mutex_unlock(&self.mu)
        free(copy)
        return done

    def take_lookups(self, uint64_t nodeid) -> int:
        """The LOOKUPs of ``nodeid`` answered here since Python last took
        them: references the kernel holds, which its FORGETs (to Python)
        count; the entry stays."""
        cdef Expected *e
        cdef uint64_t n = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            e = self._exp_find(nodeid)
            if e != NULL:
                n = e.lookups
                e.lookups = 0
            pthread_mutex_unlock(&self.mu)
        return n

    cdef Expected *_entry_find(self, uint64_t parent, const char *name, size_t n) noexcept nogil:
        """The file called ``name`` in ``parent`` with an entry, or NULL (mu held)."""
        cdef uint64_t key = _name_key(parent, name, n)
        cdef int64_t i = _home(key, self.nam_cap)
        cdef Expected *e
        while self.nam[i].state != H_EMPTY:
            if self.nam[i].state == H_USED and self.nam[i].key == key:
                e = self._exp_find(self.nam[i].nodeid)
                if e != NULL and e.name != NULL and e.parent == parent and \
                        e.name_len == n and memcmp(e.name, name, n) == 0:
                    return e
            i = (i + 1) & (self.nam_cap - 1)
        return NULL

    cdef int _name(self, Expected *e) noexcept nogil:
        """Index ``e``'s entry by its key (mu held); -1: out of memory."""
        cdef int64_t i
        if (self.nam_used + 1) * 2 > self.nam_cap and \
                _regrow(<void **>&self.nam, &self.nam_cap, &self.nam_used, self.nam_live,
                        sizeof(Named)) < 0:
            return -1
        i = _home(e.key, self.nam_cap)
        while self.nam[i].state == H_USED:
            i = (i + 1) & (self.nam_cap - 1)
        if self.nam[i].state == H_EMPTY:
            self.nam_used += 1
        self.nam[i].state = H_USED
        self.nam[i].key = e.key
        self.nam[i].nodeid = e.nodeid
        self.nam_live += 1
        return 0

    cdef void _unname(self, Expected *e) noexcept nogil:
        """Drop ``e``'s entry, if it has one (mu held); its count stays."""
        cdef int64_t i
        if e.name == NULL:
            return
        i = _home(e.key, self.nam_cap)
        while self.nam[i].state != H_EMPTY:
            if self.nam[i].state == H_USED and self.nam[i].key == e.key and \
                    self.nam[i].nodeid == e.nodeid:
                self.nam[i].state = H_GONE
                self.nam_live -= 1
                break
            i = (i + 1) & (self.nam_cap - 1)
        free(e.name)
        e.name = NULL

    def take_ahead(self, int kind, uint64_t nodeid, uint32_t uid, uint32_t gid, uint32_t pid):
        """What an in thread did ahead of this requester's request on
        ``nodeid``: for an OPEN (``kind`` 1) of the file, the open; for a
        LOOKUP (``kind`` 2) in the directory, the lstat of the name.  None,
        or (path, fd, writable, errno, stat fields): ``fd`` is the file
        opened (-1 for a LOOKUP, or when the call failed with ``errno``),
        and the caller owns it; the stat fields are those of
        ``os.stat_result``, in its order (None when the call failed).
        Older results of the same key are dropped."""
        cdef int i, best = -1
        cdef Ahead a
        a.used = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            for i in range(AHEAD):
                if self.ahead[i].used == kind and self.ahead[i].nodeid == nodeid and \
                        self.ahead[i].uid == uid and self.ahead[i].gid == gid and \
                        self.ahead[i].pid == pid:
                    if best >= 0 and self.ahead[best].seq > self.ahead[i].seq:
                        self._free_ahead(i)
                        continue
                    if best >= 0:
                        self._free_ahead(best)
                    best = i
            if best >= 0:
                a = self.ahead[best]
                self.ahead[best].used = 0
                self.ahead[best].fd = -1
                self.ahead[best].path = NULL
            pthread_mutex_unlock(&self.mu)
        if not a.used:
            return None
        path = <bytes>a.path
        free(a.path)
        st = a.st
        fields = (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                  st.st_size, st.st_atim.tv_sec, st.st_mtim.tv_sec, st.st_ctim.tv_sec,
                  st.st_atim.tv_sec + st.st_atim.tv_nsec * 1e-9,
                  st.st_mtim.tv_sec + st.st_mtim.tv_nsec * 1e-9,
                  st.st_ctim.tv_sec + st.st_ctim.tv_nsec * 1e-9,
                  st.st_atim.tv_sec * 1000000000 + st.st_atim.tv_nsec,
                  st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec,
                  st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec,
                  st.st_blksize, st.st_blocks, st.st_rdev) if a.err == 0 else None
        return path, a.fd, bool(a.writable), a.err, fields

    cdef void _free_ahead(self, int i) noexcept nogil:
        """Drop result ``i``, unused (mu held)."""
        if self.ahead[i].fd >= 0:
            close(self.ahead[i].fd)
        free(self.ahead[i].path)
        self.ahead[i].used = 0
        self.ahead[i].fd = -1
        self.ahead[i].path = NULL
        self.ahead_dropped += 1

    cdef void _drop_ahead(self) noexcept nogil:
        cdef int i
        for i in range(AHEAD):
            if self.ahead[i].used:
                self._free_ahead(i)

    cdef void _drop_expected(self) noexcept nogil:
        cdef int64_t i
        if self.exp == NULL:
            return
        for i in range(self.exp_cap):
            if self.exp[i].state == H_USED:
                free(self.exp[i].path)
                free(self.exp[i].name)
            self.exp[i].state = H_EMPTY
            self.exp[i].path = NULL
            self.exp[i].name = NULL
        self.exp_used = self.exp_live = 0
        if self.nam != NULL:
            memset(self.nam, 0, self.nam_cap * sizeof(Named))
        self.nam_used = self.nam_live = 0

    cdef bint _ahead(self, InHeader *h, ssize_t n, int kind) noexcept nogil:
        """An OPEN of an expected file, or a LOOKUP in an expected
        directory: open the backing file, or lstat the backing name, as the
        requester, and keep the result for Python (see :meth:`expect`).
        A LOOKUP of a file with an entry (:meth:`enter`) whose lstat shows
        the file as Python saw it is answered here instead (True).
        Anything unusual (no such node, a name too long, groups that cannot
        be read, a credential that does not take) leaves it to Python."""
        cdef char path[PATH_LEN]
        cdef unsigned int groups[MAX_GROUPS]
        cdef int ng, fd = -1, err = 0, writable = 0, i
        cdef size_t dl, nl
        cdef bint switched = False
        cdef struct_stat st
        cdef Expected *e
        cdef char *copy
        cdef const char *name = <const char *>h + sizeof(InHeader)
        cdef Ahead *a
        path[0] = 0
        if kind == K_DIR:
            nl = strnlen(name, n - sizeof(InHeader))
            if nl == 0 or nl == <size_t>(n - sizeof(InHeader)):
                return False        # no name, or not NUL-terminated
        pthread_mutex_lock(&self.mu)
        if not self.ahead_off:
            e = self._exp_find(h.nodeid)
            if e != NULL and e.kind == kind:
                dl = strlen(e.path)
                if kind == K_FILE:
                    memcpy(path, e.path, dl + 1)
                elif dl + nl + 2 <= PATH_LEN:
                    memcpy(path, e.path, dl)
                    if dl == 0 or path[dl - 1] != 47:       # '/'
                        path[dl] = 47
                        dl += 1
                    memcpy(path + dl, name, nl + 1)
        pthread_mutex_unlock(&self.mu)
        if path[0] == 0:
            return False
        if h.uid != 0:
            ng = groups_of(h.pid, groups, MAX_GROUPS)
            if ng < 0:
                return False
            switched = True
            if not take_creds(h.uid, h.gid, groups, ng):
                self._creds_give_back()
                return False
        if kind == K_FILE:
            writable = 1
            fd = c_open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK)
            if fd < 0 and (errno == EACCES or errno == EROFS or errno == EPERM or
                           errno == ETXTBSY):
                writable = 0
                fd = c_open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
            if fd < 0:
                err = errno
        elif lstat(path, &st) < 0:
            err = errno
        if switched and not self._creds_give_back():
            if fd >= 0:
                close(fd)
            return False
        if kind == K_DIR and err == 0 and S_ISREG(st.st_mode) and \
                self._answer_lookup(h, name, nl, &st):
            return True
        if fd >= 0:
            if fstat(fd, &st) < 0:
                err = errno
                close(fd)
                fd = -1
            else:
                fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        copy = <char *>malloc(strlen(path) + 1)
        if copy == NULL:
            if fd >= 0:
                close(fd)
            return False
        memcpy(copy, path, strlen(path) + 1)
        pthread_mutex_lock(&self.mu)
        a = NULL
        for i in range(AHEAD):
            if not self.ahead[i].used:
                a = &self.ahead[i]
                break
        if a == NULL:
            # Python never took these (a request interrupted, a handler
            # that failed first): the oldest slot goes.
            i = self.ahead_next
            self.ahead_next = (self.ahead_next + 1) % AHEAD
            self._free_ahead(i)
            a = &self.ahead[i]
        self.ahead_seq += 1
        a.used = kind
        a.seq = self.ahead_seq
        a.nodeid = h.nodeid
        a.uid, a.gid, a.pid = h.uid, h.gid, h.pid
        a.fd, a.err, a.writable = fd, err, writable
        a.path = copy
        if err == 0:
            a.st = st
        if kind == K_FILE:
            self.opens_ahead += 1
        else:
            self.stats_ahead += 1
        pthread_mutex_unlock(&self.mu)
        return False

    cdef bint _answer_lookup(self, InHeader *h, const char *name, size_t nl,
                             struct_stat *st) noexcept nogil:
        """Answer a LOOKUP of ``name`` with the entry Python left
        (:meth:`enter`) if ``st``, the lstat of its backing path just now as
        the requester, shows the file Python saw; False to leave it to
        Python.  The kernel holds a reference for each entry it gets: they
        are counted (under the mutex, which is held until the reply is
        written, so Python never takes a count that misses one)."""
        cdef Expected *e
        cdef iovec iov[2]
        cdef int64_t total
        cdef int r
        pthread_mutex_lock(&self.mu)
        e = self._entry_find(h.nodeid, name, nl)
        if e == NULL or e.kind != K_FILE or e.dev != <uint64_t>st.st_dev or \
                e.ino != <uint64_t>st.st_ino or e.size != st.st_size or \
                e.mtime_ns != st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec:
            pthread_mutex_unlock(&self.mu)
            return False
        iov[1].iov_base = &e.out
        iov[1].iov_len = sizeof(EntryOut)
        r = self._reply(h.unique, 0, iov, 1, &total)
        if r == 0:
            e.lookups += 1
        self.reply_errors += r != 0 and r != ENOENT
        self.fast_lookups += 1
        pthread_mutex_unlock(&self.mu)
        return True

    cdef bint _creds_give_back(self) noexcept nogil:
        """Give an in thread its own credentials back; if that fails, no
        more work ahead (the thread keeps its READ work, which checks no
        credential)."""
        if give_back(&self.own):
            return True
        pthread_mutex_lock(&self.mu)
        self.ahead_off = True
        pthread_mutex_unlock(&self.mu)
        return False

    # -- the threads ------------------------------------------------------------

    cdef int _reply(self, uint64_t unique, int err, iovec *iov, int64_t k,
                    int64_t *total) noexcept nogil:
        """writev a reply with errno ``err`` (0: success) whose data is
        ``iov[1..k]`` (``total`` gets its bytes); 0 or the write's errno
        (ENOENT: the request was interrupted and is gone)."""
        cdef OutHeader out
        cdef int64_t i
        total[0] = 0
        for i in range(k):
            total[0] += iov[i + 1].iov_len
        out.len = sizeof(OutHeader) + total[0]
        out.error = -err
        out.unique = unique
        iov[0].iov_base = &out
        iov[0].iov_len = sizeof(OutHeader)
        while True:
            w = writev(self.kernel_fd, iov, k + 1)
            if w < 0 and errno == EINTR:
                continue
            return errno if w < 0 else 0

    cdef void _sent(self, int64_t k, iovec *iov, int64_t *slot_of, int err,
                    int64_t total) noexcept nogil:
        """Count a reply of ``total`` bytes (mu held); if it failed, keep the
        pages unspent."""
        cdef int64_t i
        if err:
            # ENOENT: the request was interrupted and is gone.  Nothing
            # reached the kernel's cache: the slots are only unpinned.
            self.reply_errors += err != ENOENT
            for i in range(k):
                if slot_of[i] >= 0:
                    iov[i + 1].iov_len = 0
        else:
            self.fast_read_bytes += total
        self.fast_reads += 1

    cdef bint _answer(self, InHeader *h, ssize_t n) noexcept nogil:
        """Answer a READ from the cache, or load a random miss and answer
        it; False to pass it on to Python."""
        cdef ReadIn *r
        cdef Handle *hd
        cdef FileRec *fr
        cdef int64_t slot_of[MAX_RUN]
        cdef iovec iov[MAX_RUN + 1]
        cdef int64_t k, m, i, off, end, fid, total = 0, prev_end, bulk_end
        cdef bint run, far, passed, streamed
        cdef int err = 0
        if n != REQ_LEN or sizeof(InHeader) + sizeof(ReadIn) != REQ_LEN:
            return False
        r = <ReadIn *>(<char *>h + sizeof(InHeader))
        off = r.offset
        end = off + r.size
        pthread_mutex_lock(&self.mu)
        hd = self._find(r.fh)
        if hd == NULL:
            pthread_mutex_unlock(&self.mu)
            return False
        # READs in flight together reach the in threads in any order
        run = hd.last_end - self.slack <= off <= hd.last_end + self.slack
        prev_end = hd.last_end
        hd.last_end = end
        if hd.cand >= 0:
            if off == hd.cand:
                hd.reader = 1
                self.readers += 1
            hd.cand = -1
        passed = end > hd.trigger
        k = self.pc.lend_whole(hd.fr, hd.fid, off, r.size, slot_of, &iov[1], self.zeros)
        if k >= 0:
            if hd.grp_open:
                self._after_refusal(hd, off, end)
            if passed:
                hd.trigger = NOTED      # until Python has shown it to the policy
                self.noted += 1
            err = self._reply(h.unique, 0, iov, k, &total)
            self._sent(k, iov, slot_of, err, total)
            self.pc.give_back_read(hd.fr, slot_of, &iov[1], k, True)
            pthread_mutex_unlock(&self.mu)
            if passed:
                self._note_read(r.fh, off, r.size)
            return True
        bulk_end = end
        if self.sparse and hd.trigger == NO_TRIGGER and not self.stopping:
            # the READs of one read-around reach the in threads in any
            # order, some even after the faulting page's own READ
            # a read-around begins half a window before the faulting page;
            # a sequential reader's next READ begins about where its last
            # ended (``run`` allows 8 MiB, for the policy's streams; once a
            # stream prefetches it has a trigger and nothing is refused)
            far = off > prev_end + FAR or off < prev_end - FAR
            if not hd.reader and r.size > PAGE and end < hd.fr.size and (far or (
                    hd.grp_hi >= 0 and off >= hd.grp_hi - self.sparse
                    and end <= hd.grp_lo + self.sparse)):
                self._refuse(h, hd, off, end, prev_end)     # lets the mutex go
                return True
            if hd.grp_open:
                self._after_refusal(hd, off, end)
            # A reader walking into a refused range (read(2), or a mapped
            # scan that began inside it) asks for it a page at a time: load
            # the rest of the range at once, answer the page, keep the rest.
            if (off == prev_end and hd.grp_lo <= off < hd.grp_hi and end < hd.grp_hi
                    and off % PAGE == 0 and r.size % PAGE == 0):
                bulk_end = hd.grp_hi
                if bulk_end - off > MAX_RUN * PAGE:
                    bulk_end = off + MAX_RUN * PAGE
                self.group_loads += 1
        elif hd.grp_open:
            hd.grp_open = 0
        # A miss.  One of a handle without a prefetching stream that
        # continues a run goes to the read-ahead policy (a scan starting),
        # unless it reaches the end of the file (a small file read whole:
        # nothing to read ahead).
        streamed = hd.trigger != NO_TRIGGER
        if self.stopping or (not streamed and
                run and not hd.own_misses and end < hd.fr.size and bulk_end == end):
            self.pass_missing += 1
            pthread_mutex_unlock(&self.mu)
            return False
        # A random miss, or one of a stream that prefetches (noted for its
        # policy, as a READ past the trigger is): loaded here, without the
        # mutex; the handle is busy meanwhile, so it stays (Wire.remove waits).
        passed = streamed and hd.trigger != NOTED
        if passed:
            hd.trigger = NOTED      # counted once the note goes (a failed load: Python's)
        fr, fid = hd.fr, hd.fid
        self._hold(hd)
        k = self.pc.lend_loaded(fr, fid, off, bulk_end - off, slot_of, &iov[1], self.zeros)
        m = k
        if k >= 0 and bulk_end != end:
            # only the READ's own pages go out; the others stay cached, unspent
            m = r.size >> PAGE_SHIFT
            if m > k:
                m = k
            for i in range(m, k):
                iov[i + 1].iov_len = 0
        if k >= 0:
            err = self._reply(h.unique, 0, iov, m, &total)
        pthread_mutex_lock(&self.mu)
        if k >= 0:
            self._sent(m, iov, slot_of, err, total)
            self.fast_misses += 1
            if passed:
                self.noted += 1
        else:
            self.miss_fallbacks += 1
        self._unhold(r.fh)
        pthread_mutex_unlock(&self.mu)
        if k < 0:
            return False                # Python reads it, and reports errors
        self.pc.give_back_read(fr, slot_of, &iov[1], k, False)
        if passed:
            self._note_read(r.fh, off, r.size)
        return True

    cdef void _note_read(self, uint64_t fh, int64_t off, uint32_t size) noexcept nogil:
        """Tell Python of a READ answered past its handle's trigger (see
        :meth:`take`).  Never blocks: a note the pair has no room for is
        dropped and counted; the handle's next miss reaches Python anyway."""
        cdef char msg[NOTE_READ_LEN]
        cdef InHeader *nh = <InHeader *>msg
        cdef uint64_t *p = <uint64_t *>(msg + sizeof(InHeader))
        memset(msg, 0, sizeof(msg))
        nh.len = sizeof(msg)
        nh.opcode = FUSE_READ
        p[0], p[1], p[2] = fh, <uint64_t>off, size
        if send(self.side_w, msg, sizeof(msg), MSG_NOSIGNAL | MSG_DONTWAIT) != sizeof(msg):
            pthread_mutex_lock(&self.mu)
            self.notes_dropped += 1
            pthread_mutex_unlock(&self.mu)

    cdef void _refuse(self, InHeader *h, Handle *hd, int64_t off, int64_t end,
                      int64_t prev_end) noexcept nogil:
        """Answer a random miss longer than a page with EIO (the mutex held on
        entry, let go here): the kernel's read-around of a page fault.  The
        folios it asked for stay in its cache, not up to date, and the
        faulting page comes back as a READ of its own (mm/filemap.c,
        ``filemap_fault``: ``page_not_uptodate``); read-ahead errors reach
        no caller.  The READs of one read-around arrive together: they make
        one refused range.  A window refused whole in one READ is centred on
        the faulting page: that page is loaded here once the answer is out,
        so that its own READ, on its way meanwhile, finds it cached or
        loading."""
        cdef int64_t slot_of[1]
        cdef iovec iov[1]
        cdef int64_t k, centre = off + self.sparse // 2
        cdef uint64_t fh = hd.fh
        cdef FileRec *fr = hd.fr
        cdef int64_t fid = hd.fid
        cdef bint whole = end - off == self.sparse and centre % PAGE == 0
        if hd.grp_open:
            if off < hd.grp_lo:
                hd.grp_lo = off
            if end > hd.grp_hi:
                hd.grp_hi = end
        else:
            hd.grp_lo, hd.grp_hi, hd.grp_open = off, end, 1
        hd.last_end = prev_end              # a refused READ moves no run
        self.refused += 1
        hd.fr.read_arounds_refused += 1     # the file's next open goes by it
        self.refused_bytes += end - off
        if not whole:
            pthread_mutex_unlock(&self.mu)
            self._status(h.unique, EIO)
            return
        self._hold(hd)                      # lets the mutex go
        self._status(h.unique, EIO)
        k = self.pc.lend_loaded(fr, fid, centre, PAGE, slot_of, iov, self.zeros)
        if k > 0:
            iov[0].iov_len = 0              # not sent: stays cached, unspent
            self.pc.give_back_read(fr, slot_of, iov, k, False)
        pthread_mutex_lock(&self.mu)
        self.centre_loads += k > 0
        self._unhold(fh)
        pthread_mutex_unlock(&self.mu)

    cdef void _after_refusal(self, Handle *hd, int64_t off, int64_t end) noexcept nogil:
        """The first READ of ``hd`` served after a refused range (mu held).
        A page fault's read-around is centred on the faulting page, which
        comes back alone from inside the range; read(2) asks again from the
        range's first page, then for the next one.  A handle whose next
        READ follows such a first page is a reader (``cand``), whose READs
        are served as asked from then on.  (A fault's read-around starts at
        the faulting page too when the pages before it are in the kernel's
        cache: the next READ then lands elsewhere.)"""
        hd.grp_open = 0
        if off == hd.grp_lo:
            hd.cand = end

    cdef void _hold(self, Handle *hd) noexcept nogil:
        """Mark ``hd`` busy and let the mutex go (held on entry): its file
        record stays while the caller works without the mutex."""
        hd.busy += 1
        self.inflight += 1
        pthread_mutex_unlock(&self.mu)

    cdef Handle *_unhold(self, uint64_t fh) noexcept nogil:
        """The end of :meth:`_hold` (the mutex held again); the handle."""
        cdef Handle *hd = self._find(fh)
        hd.busy -= 1
        self.inflight -= 1
        pthread_cond_broadcast(&self.idle)
        return hd

    cdef int _status(self, uint64_t unique, int err) noexcept nogil:
        """Answer request ``unique`` with no data: errno ``err``, or 0
        (:meth:`_reply`'s result)."""
        cdef iovec iov[1]
        cdef int64_t total
        return self._reply(unique, err, iov, 0, &total)

    cdef bint _answer_getxattr(self, InHeader *h, ssize_t n) noexcept nogil:
        """ENODATA for an xattr that is not a control one (``ls -l`` asks
        for two per file, and a write for ``security.capability``); False
        to pass a control name on."""
        cdef const char *name = <const char *>h + sizeof(InHeader) + sizeof(GetxattrIn)
        cdef ssize_t room = n - <ssize_t>(sizeof(InHeader) + sizeof(GetxattrIn))
        if self.prefix_len == 0 or h.total_extlen != 0 or room < 1 or name[room - 1] != 0:
            return False
        if room > self.prefix_len and memcmp(name, self.prefix, self.prefix_len) == 0:
            return False
        self._status(h.unique, ENODATA)
        SHIM_COUNT(&self.fast_getxattrs)
        return True

    cdef bint _answer_flush(self, InHeader *h, ssize_t n) noexcept nogil:
        """Success for the FLUSH of a registered handle whose file has no
        dirty page here: the kernel has written its dirty pages back (as
        WRITEs, answered) before it flushes, so Python would find nothing to
        write (WriteBack.writeback_if_dirty).  False to pass it on."""
        cdef FlushIn *f
        cdef Handle *hd
        cdef bint clean
        if n < <ssize_t>(sizeof(InHeader) + sizeof(FlushIn)):
            return False
        f = <FlushIn *>(<char *>h + sizeof(InHeader))
        pthread_mutex_lock(&self.mu)
        hd = self._find(f.fh)
        clean = hd != NULL and hd.fr.ndirty == 0 and not self.stopping
        pthread_mutex_unlock(&self.mu)
        if not clean:
            return False
        self._status(h.unique, 0)
        SHIM_COUNT(&self.fast_flushes)
        return True

    cdef bint _answer_release(self, InHeader *h, ssize_t n) noexcept nogil:
        """Success for the RELEASE of a handle registered for it (read-only,
        of a file off coherence) while its file has no dirty page here:
        Python's release would write nothing back, and what is left of it
        (the handle's bookkeeping) it does when it takes the note sent here
        first (:meth:`take_released`).  False to pass it on."""
        cdef ReleaseIn *r
        cdef Handle *hd
        cdef char msg[NOTE_LEN]
        cdef InHeader *note = <InHeader *>msg
        cdef bint done = False
        if n < <ssize_t>(sizeof(InHeader) + sizeof(ReleaseIn)):
            return False
        r = <ReleaseIn *>(<char *>h + sizeof(InHeader))
        memset(msg, 0, NOTE_LEN)
        note.len = NOTE_LEN
        note.opcode = FUSE_RELEASE
        (<uint64_t *>(msg + sizeof(InHeader)))[0] = r.fh
        pthread_mutex_lock(&self.mu)
        hd = self._find(r.fh)
        # A miss of this handle may still be finishing in another in thread:
        # its reply is out (which is how the reader got to close), its hold
        # not yet let go.  Wait for it (the table may regrow meanwhile).
        while hd != NULL and hd.busy and not self.stopping:
            pthread_cond_wait(&self.idle, &self.mu)
            hd = self._find(r.fh)
        if hd != NULL and hd.release and not hd.busy and hd.fr.ndirty == 0 \
                and not self.stopping and send(self.rel_w, msg, NOTE_LEN, MSG_NOSIGNAL) == NOTE_LEN:
            self.rel_pending += 1
            hd.state = H_GONE
            hd.fr = NULL
            self.live -= 1
            done = True
        pthread_mutex_unlock(&self.mu)
        if not done:
            return False
        self._status(h.unique, 0)
        SHIM_COUNT(&self.fast_releases)
        return True

    def take_released(self) -> list:
        """The handles whose RELEASE was answered here since the last call
        (see :meth:`add`): each is gone from the wire already."""
        cdef char msg[NOTE_LEN]
        cdef ssize_t k
        cdef uint64_t pending
        with nogil:
            pthread_mutex_lock(&self.mu)
            pending, self.rel_pending = self.rel_pending, 0
            pthread_mutex_unlock(&self.mu)
        out = []
        if not pending:
            return out              # no system call: every OPEN asks
        while True:
            k = recv(self.released_fd, msg, NOTE_LEN, 0)
            if k != NOTE_LEN:
                break
            out.append((<uint64_t *>(msg + sizeof(InHeader)))[0])
        return out

    cdef bint _answer_write(self, InHeader *h, ssize_t n) noexcept nogil:
        """Take a WRITE of a handle registered for it into the cache when
        that needs no I/O (every page it covers in part cached, no growth:
        ``PageCache.take_write``) and answer it; False to pass it on.  The
        first such WRITE since Python last looked is reported to it on the
        side pair (mtime bookkeeping, background write-back), before the
        reply."""
        cdef WriteIn *r
        cdef Handle *hd
        cdef FileRec *fr
        cdef int64_t fid, got
        cdef bint note
        cdef char msg[NOTE_LEN]
        cdef InHeader *nh = <InHeader *>msg
        cdef WriteOut wo
        cdef iovec iov[2]
        cdef int64_t total
        if n < <ssize_t>(sizeof(InHeader) + sizeof(WriteIn)) or \
                sizeof(InHeader) + sizeof(uint64_t) != NOTE_LEN:
            return False
        r = <WriteIn *>(<char *>h + sizeof(InHeader))
        if h.total_extlen != 0 or r.write_flags & FUSE_WRITE_KILL_SUIDGID or \
                n != <ssize_t>(sizeof(InHeader) + sizeof(WriteIn) + r.size):
            return False
        pthread_mutex_lock(&self.mu)
        hd = self._find(r.fh)
        if hd == NULL or not hd.writes or self.stopping:
            pthread_mutex_unlock(&self.mu)
            return False
        fr, fid = hd.fr, hd.fid
        self._hold(hd)
        got = self.pc.take_write(fr, fid, r.offset,
                                 <const char *>r + sizeof(WriteIn), r.size)
        pthread_mutex_lock(&self.mu)
        hd = self._unhold(r.fh)
        note = got >= 0 and not hd.wrote
        if got >= 0:
            hd.wrote = 1
            self.fast_writes += 1
            self.fast_write_bytes += got
        pthread_mutex_unlock(&self.mu)
        if got < 0:
            return False
        if note:
            memset(msg, 0, sizeof(msg))
            nh.len = sizeof(msg)
            nh.opcode = FUSE_WRITE
            (<uint64_t *>(msg + sizeof(InHeader)))[0] = r.fh
            send(self.side_w, msg, sizeof(msg), MSG_NOSIGNAL)
        wo.size = <uint32_t>got
        wo.padding = 0
        iov[1].iov_base = &wo
        iov[1].iov_len = sizeof(WriteOut)
        self._reply(h.unique, 0, iov, 1, &total)
        return True

    cdef void _forward(self, const char *msg, ssize_t n) noexcept nogil:
        """Pass a request on to pyfuse3."""
        cdef ssize_t s
        while True:
            s = send(self.pfd, msg, n, MSG_NOSIGNAL)
            if s < 0 and errno == EAGAIN:
                if not _wait_writable(self.pfd, self.stop_r):
                    return
                continue
            if s < 0 and errno == EINTR:
                continue
            break
        SHIM_COUNT(&self.forward_errors if s < 0 else &self.forwarded)

    cdef void _pump_in(self) noexcept nogil:
        """An in thread: read requests until the session ends or the wire stops."""
        cdef ssize_t n
        cdef char c = b"x"
        cdef char *buf = <char *>malloc(BUFSIZE)
        cdef InHeader *h = <InHeader *>buf
        if buf == NULL:
            return
        while not self.stopping:
            n = read(self.kernel_fd, buf, BUFSIZE)
            if n < 0:
                if errno == EINTR or errno == ENOENT or errno == EAGAIN:
                    continue        # SIGUSR2 (see close), or an interrupted request
                # ENODEV: unmounted or aborted; anything else ends it too.
                pthread_mutex_lock(&self.mu)
                if not self.ended_by_kernel:
                    self.ended_by_kernel = True
                    write(self.end_w, &c, 1)
                pthread_mutex_unlock(&self.mu)
                break
            if n < <ssize_t>sizeof(InHeader):
                self._forward(buf, n)
                continue
            SHIM_COUNT(&self.ops[h.opcode if h.opcode < 63 else 63])
            if h.opcode == FUSE_READ and self._answer(h, n):
                continue
            if h.opcode == FUSE_WRITE and self._answer_write(h, n):
                continue
            if h.opcode == FUSE_GETXATTR and self._answer_getxattr(h, n):
                continue
            if h.opcode == FUSE_FLUSH and self._answer_flush(h, n):
                continue
            if h.opcode == FUSE_RELEASE and self._answer_release(h, n):
                continue
            if h.opcode == FUSE_FALLOCATE and send(self.side_w, buf, n, MSG_NOSIGNAL) == n:
                continue            # for the daemon's Python (Wire.take)
            if h.opcode == FUSE_OPEN and self.exp_live:
                self._ahead(h, n, K_FILE)
            elif h.opcode == FUSE_LOOKUP and self.exp_live and self._ahead(h, n, K_DIR):
                continue
            self._forward(buf, n)
        free(buf)

    cdef void _pump_out(self) noexcept nogil:
        cdef ssize_t n, w
        while True:
            n = recv(self.pfd, self.outbuf, BUFSIZE, 0)
            if n < 0:
                if errno == EAGAIN:
                    if not _wait(self.pfd, self.stop_r):
                        return
                    continue
                if errno == EINTR:
                    continue
                return
            if n == 0:
                return              # pyfuse3 closed its end
            while True:
                w = write(self.kernel_fd, self.outbuf, n)
                if w < 0 and errno == EINTR:
                    continue
                break
            if w < 0 and errno != ENOENT:
                pthread_mutex_lock(&self.mu)
                self.reply_errors += 1
                pthread_mutex_unlock(&self.mu)


