"""One place for the names that several parts of shimfs share.

The control xattrs are the public interface of a mount (the CLI, the Python
API, the daemon and the tests all spell them from here), and the few
constants of the namespace that more than one room needs.
"""
from __future__ import annotations

#: The version of shimfs (``shimfs --version``, ``shimfs stat``, the package's).
VERSION = "0.1.0"

#: The control interface: extended attributes of the files in a mount (and of
#: its root).  pyfuse3 has no ioctl handler, so control goes through xattrs.
XATTR_PREFIX = "user.shimfs."
XATTR_BACKING = XATTR_PREFIX + "backing"        # get: a file's backing path
XATTR_SYNC = XATTR_PREFIX + "sync"              # set: write back and fsync (file or mount)
XATTR_PID = XATTR_PREFIX + "pid"                # get, on the root: the daemon's pid
XATTR_STATS = XATTR_PREFIX + "stats"            # get: counters, as JSON
XATTR_REFRESH = XATTR_PREFIX + "refresh"        # set "OFFSET LENGTH": the reverse msync
XATTR_MULTIWRITE = XATTR_PREFIX + "multiwrite"  # get/set "0"/"1": byte-granular write-back
XATTR_PREFETCH = XATTR_PREFIX + "prefetch"      # set "OFFSET LENGTH": into the kernel's cache

#: The root directory's inode number (FUSE's FUSE_ROOT_ID).
ROOT_INODE = 1

#: How long the kernel may trust names and attributes (seconds): the entry
#: and attr timeouts of every reply but the transient symlink's (0).  Sizes
#: and mtimes are reported steadily, so caching them is safe.
TIMEOUT = 1.0

#: Entries per READDIRPLUS reply, at most.  The kernel asks with a buffer
#: that holds thousands (the reader's getdents size), and each entry it gets
#: is trusted for ``TIMEOUT`` from the reply.  A reader that stats every
#: entry as it goes (``ls -l``, ``find``, ``du``) took more than a second on
#: 3,300 entries over the stand-in, and every entry after the first second
#: was a LOOKUP: 12-19 s for 10,000 files instead of 2.  Smaller replies
#: keep each batch fresh until the reader has gone through it.
READDIR_ENTRIES = 256

#: The st_blksize of every file: tells cp and friends to move 1 MiB at a time.
BLKSIZE = 1 << 20

#: The page size of the daemon's cache and of FUSE's page cache.
PAGE = 4096

#: Pages refreshed into the kernel (NOTIFY_STORE) per message.
REFRESH_CHUNK = 4 << 20

#: The file system type of a shimfs mount in /proc/self/mounts.
FSTYPE = "fuse.shimfs"

#: fallocate(2) modes (<linux/falloc.h>), and those passed to backing files.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOCATE_MODES = frozenset({0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE})
