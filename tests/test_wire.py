"""The compiled READ path (shimfs._wire) on real mounts: READs the daemon's
cache holds are answered without Python, with exact bytes at awkward sizes
and at the end of the file, for known zeros, under a concurrent truncate
and under eviction; everything else still reaches pyfuse3; ``-o
fast_reads=0`` turns it off; unmounting ends both threads.  GETXATTRs of
names outside the control prefix and FLUSHes of clean files are answered
there too, with what Python would answer, and WRITEs that need no I/O."""
from __future__ import annotations

import errno
import mmap
import os
import random
import threading
import time

import pytest

import shimfs
from shimfs.files import RANDOM_REFUSALS
from shimfs.names import TIMEOUT, XATTR_BACKING, XATTR_MULTIWRITE, XATTR_PREFIX, XATTR_STATS
from shimfs.tuning import NARROW_PAGES
from mounting import (daemon_pid, make_file, read_file, shim_mount, shimfs_cmd, wait_gone,
                      wait_until)

PAGE = 4096


def mount_stats(path: str) -> dict:
    """The mount's counters, and the file's ``bytes_fetched``."""
    st = shimfs.stats(path)
    return dict(st["mount"], bytes_fetched=st["file"]["bytes_fetched"])


def drop_kernel_pages(path: str) -> None:
    """Drop the kernel's clean pages of ``path``: the next reads are READs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mapped_bytes(path: str) -> bytes:
    """The whole file, read through a shared mapping 1 MiB at a time, in order."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            return b"".join(m[i:i + (1 << 20)] for i in range(0, len(m), 1 << 20))
    finally:
        os.close(fd)


def linked(mnt: str, backing: str, name: str, size: int) -> tuple[str, bytes]:
    data = make_file(os.path.join(backing, name), size)
    os.symlink(os.path.join(backing, name), os.path.join(mnt, name))
    return os.path.join(mnt, name), data


@pytest.fixture
def wired(tmp_path, data_dir):
    with shim_mount(str(tmp_path / "mnt"), data_dir, "cache_size=64M") as m:
        yield m, data_dir


@pytest.mark.parametrize("size", [1, PAGE - 1, PAGE + 1, 3 * (1 << 20) + 123, 5 << 20])
def test_cached_reads_are_answered_without_python(wired, size):
    mnt, backing = wired
    path, data = linked(mnt, backing, "a.bin", size)
    with open(path, "rb") as f:
        assert f.read() == data                 # into the daemon's cache
    drop_kernel_pages(path)
    before = mount_stats(path)
    with open(path, "rb") as f:
        assert f.read() == data                 # from the cache, through the wire
    after = mount_stats(path)
    assert after["fast_reads"] > before["fast_reads"]
    assert after["fast_read_bytes"] - before["fast_read_bytes"] >= size - size % PAGE
    assert after["bytes_fetched"] == before["bytes_fetched"]
    assert after["read_requests"] - before["read_requests"] >= \
        after["fast_reads"] - before["fast_reads"]
    assert after["reply_errors"] == after["forward_errors"] == 0


def test_unaligned_reads_and_the_end_of_file(wired):
    mnt, backing = wired
    size = 2 * (1 << 20) + 777
    path, data = linked(mnt, backing, "e.bin", size)
    with open(path, "rb") as f:
        f.read()
    rng = random.Random(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off = rng.choice([rng.randrange(size + 2 * PAGE), size - 1, size, size + 1,
                              size - PAGE - 3])
            n = rng.choice([1, 100, PAGE, 3 * PAGE + 5, 1 << 20])
            assert os.pread(fd, n, off) == data[off:off + n]
    finally:
        os.close(fd)
    assert mount_stats(path)["fast_reads"] > 0


def test_a_mapped_scan_is_exact_and_mostly_compiled(wired):
    mnt, backing = wired
    path, data = linked(mnt, backing, "m.bin", 24 << 20)
    assert mapped_bytes(path) == data
    drop_kernel_pages(path)
    before = mount_stats(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            assert m[:] == data
    finally:
        os.close(fd)
    after = mount_stats(path)
    reads = after["read_requests"] - before["read_requests"]
    fast = after["fast_reads"] - before["fast_reads"]
    assert reads > 0 and fast * 2 > reads       # the cached file: mostly compiled



def test_a_cold_scan_is_answered_in_c_and_the_policy_still_reads_ahead(tmp_path, data_dir):
    """A scan of a file the daemon does not hold: once its stream
    prefetches, READs past the trigger and misses are answered by the wire
    and only noted for the policy (shimfs._wire, ``NOTED``), which still
    reads ahead: nearly every READ is compiled, the file is fetched once,
    the bytes are exact."""
    with shim_mount(str(tmp_path / "mnt"), data_dir, "cache_size=64M", "push=0") as mnt:
        path, data = linked(mnt, data_dir, "cold.bin", 48 << 20)
        if shimfs.stats(path)["file"]["backing_in_memory"]:
            pytest.skip("no read-ahead for files in memory")
        assert mapped_bytes(path) == data
        st = mount_stats(path)
    assert st["fast_reads_noted"] >= 1 and st["read_notes_dropped"] == 0
    assert st["prefetches"] > 0                 # the policy saw the reader
    assert st["forwarded_requests"] < 0.1 * st["read_requests"] + 20
    assert st["fast_reads"] >= 0.9 * st["read_requests"]
    assert st["bytes_fetched"] <= len(data) + (1 << 20)

def test_known_zeros_are_answered_as_zeros(wired):
    mnt, backing = wired
    path = os.path.join(mnt, "z.bin")
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(3 << 20)
    drop_kernel_pages(path)
    before = mount_stats(path)
    with open(path, "rb") as f:
        assert f.read() == b"head" + bytes((3 << 20) - 4)
    after = mount_stats(path)
    assert after["fast_reads"] > before["fast_reads"]
    assert after["bytes_fetched"] == before["bytes_fetched"]   # nothing read back


def test_reads_under_a_concurrent_truncate(wired):
    """Every byte a READ returns is the file's byte or a zero of the regrown
    part, never another page's bytes, while the file shrinks and regrows."""
    mnt, backing = wired
    size = 4 << 20
    path, data = linked(mnt, backing, "t.bin", size)
    with open(path, "rb") as f:
        f.read()
    half = size // 2
    stop = threading.Event()
    bad: list = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                off = rng.randrange(half - 8 * PAGE, size - 4 * PAGE) & ~(PAGE - 1)
                got = os.pread(fd, 4 * PAGE, off)
                for i in range(0, len(got), PAGE):        # a page comes from one READ
                    piece = got[i:i + PAGE]
                    want = data[off + i:off + i + len(piece)]
                    if piece != want and (off + i < half or piece.strip(b"\0")):
                        bad.append((off + i, piece[:16], want[:16]))
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            for _ in range(30):
                os.ftruncate(fd, half)
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []
    drop_kernel_pages(path)
    with open(path, "rb") as f:
        assert f.read() == data[:half] + bytes(size - half)


def test_eviction_under_the_readers(tmp_path, data_dir):
    """A cache of 16M under 48M read at random by four threads: pages are
    evicted while the wire lends others; every byte stays exact."""
    with shim_mount(str(tmp_path / "mnt"), data_dir, "cache_size=16M") as mnt:
        path, data = linked(mnt, data_dir, "v.bin", 48 << 20)
        bad: list = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            fd = os.open(path, os.O_RDONLY)
            try:
                for _ in range(300):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    off = rng.randrange(len(data)) & ~(PAGE - 1)
                    n = rng.choice([PAGE, 16 * PAGE, 1 << 20])
                    got = os.pread(fd, n, off)
                    if got != data[off:off + n]:
                        first = next(i for i in range(0, n, PAGE)
                                     if got[i:i + PAGE] != data[off + i:off + i + PAGE])
                        bad.append((off, n, len(got), first, data.find(got[first:first + 64])))
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bad == []
        st = mount_stats(path)
        assert st["evictions"] > 0 and st["fast_reads"] > 0


def test_fast_reads_off(tmp_path, backing):
    with shim_mount(str(tmp_path / "mnt"), backing, "fast_reads=0") as mnt:
        path, data = linked(mnt, backing, "o.bin", 1 << 20)
        for _ in range(2):
            drop_kernel_pages(path)
            with open(path, "rb") as f:
                assert f.read() == data
        st = mount_stats(path)
        assert st["fast_reads"] == 0 and st["forwarded_requests"] == 0
        assert st["read_requests"] > 0


def test_other_requests_still_reach_python(wired):
    """Metadata, writes, xattrs and fsync go through the pair to pyfuse3."""
    mnt, backing = wired
    d = os.path.join(mnt, "dir")
    os.mkdir(d)
    p = os.path.join(d, "w.bin")
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
        f.flush()
        os.fsync(f.fileno())
    os.rename(p, p + ".2")
    assert sorted(os.listdir(d)) == ["w.bin.2"]
    assert os.stat(p + ".2").st_size == 10000
    with open(os.path.join(backing, "dir", "w.bin.2"), "rb") as f:
        assert f.read() == b"x" * 10000
    st = mount_stats(p + ".2")
    assert st["forwarded_requests"] > 0 and st["forward_errors"] == 0


#: names getxattr asks a mount for: outside the control prefix, and in it
OTHER_NAMES = (XATTR_PREFIX[:-1], XATTR_PREFIX[:-1] + "x", "security.selinux",
               "security.capability", "system.posix_acl_access", "user.other", "trusted.t")
CONTROL_NAMES = (XATTR_BACKING, XATTR_MULTIWRITE, XATTR_PREFIX + "nope")


def _xattr_answers(path: str) -> dict:
    """What getxattr answers for control and other names: value or errno."""
    out = {}
    for name in OTHER_NAMES + CONTROL_NAMES:
        try:
            out[name] = os.getxattr(path, name)
        except OSError as exc:
            out[name] = exc.errno
    return out


@pytest.mark.parametrize("fast", ["1", "0"])
def test_getxattr_answers_are_the_same_with_and_without_the_wire(tmp_path, backing, fast):
    """GETXATTRs of names outside the control prefix are answered ENODATA
    by the wire (ls -l asks for two per file): exactly what Python answers,
    and the control names still reach Python."""
    with shim_mount(str(tmp_path / "mnt"), backing, "fast_reads=" + fast) as mnt:
        path, _ = linked(mnt, backing, "x.bin", 100)
        before = mount_stats(path)["fast_getxattrs"]
        got = _xattr_answers(path)
        assert got == dict({n: errno.ENODATA for n in OTHER_NAMES + CONTROL_NAMES},
                           **{XATTR_BACKING: os.fsencode(os.path.join(backing, "x.bin")),
                              XATTR_MULTIWRITE: b"0"})
        assert os.listxattr(path) == [XATTR_BACKING, XATTR_MULTIWRITE, XATTR_STATS]
        answered = mount_stats(path)["fast_getxattrs"] - before
        # the control names went to Python
        assert answered == (0 if fast == "0" else len(OTHER_NAMES))


def test_clean_flushes_are_answered_and_dirty_ones_write_back(wired):
    """close() of a handle whose file has no dirty page is answered by the
    wire; one with dirty pages still reaches Python, which writes them back
    before close returns."""
    mnt, backing = wired
    path, data = linked(mnt, backing, "f.bin", 3 * PAGE + 5)
    before = mount_stats(path)["fast_flushes"]
    for _ in range(3):
        with open(path, "rb") as f:
            assert f.read() == data
    assert mount_stats(path)["fast_flushes"] - before == 3
    # another file, which no other handle has: a reader's RELEASE (which the
    # kernel sends after close returns) writes back dirty pages too
    path, data = linked(mnt, backing, "g.bin", 3 * PAGE + 5)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"new bytes", PAGE)
        assert shimfs.stats(path)["file"]["dirty_bytes"] > 0
        before = mount_stats(path)["fast_flushes"]
    finally:
        os.close(fd)                                # FLUSH: write-back in Python
    assert mount_stats(path)["fast_flushes"] == before
    assert shimfs.stats(path)["file"]["dirty_bytes"] == 0
    with open(os.path.join(backing, "g.bin"), "rb") as f:
        assert f.read() == data[:PAGE] + b"new bytes" + data[PAGE + 9:]
    # a mapped write: the kernel writes the page back (a WRITE) before it flushes
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as m:
            m[7:12] = b"MAPPD"
    finally:
        os.close(fd)
    with open(os.path.join(backing, "g.bin"), "rb") as f:
        assert f.read(12) == data[:7] + b"MAPPD"


def test_a_readers_release_is_answered_in_c_and_opens_stay_counted(wired):
    """The RELEASE of a read-only handle whose file is clean is answered by
    the wire and noted for Python, which takes the notes before each open:
    an open right after a change behind the mount still reloads the file
    (close-to-open), and the backing file of a name removed while a reader
    had it open is closed once that reader's RELEASE is taken."""
    mnt, backing = wired
    path, data = linked(mnt, backing, "r.bin", 3 * PAGE)
    before = mount_stats(path)["fast_releases"]
    for i in range(3):
        with open(path, "rb") as f:
            assert f.read() == data
        new = bytes([i + 1]) * (2 * PAGE + i)        # another size: seen as a change
        with open(os.path.join(backing, "r.bin"), "r+b") as f:
            f.write(new)
            f.truncate(len(new))
        data = new
    with open(path, "rb") as f:
        assert f.read() == data
    assert mount_stats(path)["fast_releases"] - before >= 3
    made = os.path.join(mnt, "made.bin")
    with open(made, "wb") as f:
        f.write(b"x" * 100)
    pid = daemon_pid(mnt)

    def holds_made() -> bool:
        fds = os.listdir("/proc/%d/fd" % pid)
        return any(os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith(
            os.path.join(backing, "made.bin")) for fd in fds if _readable_link(pid, fd))
    f = open(made, "rb")
    assert f.read() == b"x" * 100
    os.unlink(made)
    assert holds_made()                             # the reader keeps it
    f.close()
    wait_until(lambda: not holds_made(), what="the removed file's backing descriptor closed")


def test_a_mirror_lookup_is_answered_in_c_as_python_would(tmp_path, data_dir):
    """-o mirror: once a listed file's entry has expired, the kernel's
    LOOKUP of it is answered by the wire, after an lstat of its backing
    path, with exactly what Python answered (the listing's attributes); a
    file changed, replaced or removed on the backing side goes to Python,
    which sees the change; and the references the wire gave the kernel are
    all counted: once the files are gone and the kernel forgets them, the
    daemon holds no node of them."""
    names = ["f%02d" % i for i in range(20)]
    for i, name in enumerate(names):
        with open(os.path.join(data_dir, name), "wb") as f:
            f.write(name.encode() * (i + 1))
    fields = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
              "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks")

    def stat_all(mnt):
        return {n: tuple(getattr(os.stat(os.path.join(mnt, n)), k) for k in fields)
                for n in os.listdir(mnt) if n in names}

    with shim_mount(str(tmp_path / "mnt"), data_dir, "mirror") as mnt:
        listed = stat_all(mnt)                      # READDIRPLUS: Python's attributes
        assert sorted(listed) == names
        before = shimfs.stats(mnt)["mount"]
        time.sleep(TIMEOUT + 0.2)                   # the entries expire: LOOKUPs
        assert {n: tuple(getattr(os.stat(os.path.join(mnt, n)), k) for k in fields)
                for n in names} == listed
        after = shimfs.stats(mnt)["mount"]
        assert after["fast_lookups"] - before["fast_lookups"] >= len(names), after

        with open(os.path.join(data_dir, "f00"), "ab") as f:
            f.write(b"+more")                       # changed in place by another node
        with open(os.path.join(data_dir, "f01.new"), "wb") as f:
            f.write(b"replaced")
        os.rename(os.path.join(data_dir, "f01.new"), os.path.join(data_dir, "f01"))
        os.unlink(os.path.join(data_dir, "f02"))
        time.sleep(TIMEOUT + 0.2)
        assert os.stat(os.path.join(mnt, "f00")).st_size == len(b"f00+more")
        assert os.stat(os.path.join(mnt, "f01")).st_size == len(b"replaced")
        assert os.stat(os.path.join(mnt, "f01")).st_ino != listed["f01"][0]
        assert not os.path.exists(os.path.join(mnt, "f02"))
        seen = shimfs.stats(mnt)["mount"]["fast_lookups"]
        time.sleep(TIMEOUT + 0.2)                   # Python's new answers, now from the wire
        assert os.stat(os.path.join(mnt, "f00")).st_size == len(b"f00+more")
        assert os.stat(os.path.join(mnt, "f01")).st_size == len(b"replaced")
        assert shimfs.stats(mnt)["mount"]["fast_lookups"] - seen >= 2
        assert read_file(os.path.join(mnt, "f00")) == b"f00+more"
        assert read_file(os.path.join(mnt, "f01")) == b"replaced"
        assert read_file(os.path.join(mnt, "f03")) == b"f03" * 4

        for name in names:
            if name != "f02":
                os.unlink(os.path.join(data_dir, name))
        time.sleep(TIMEOUT + 0.2)
        assert not any(os.path.exists(os.path.join(mnt, n)) for n in names)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")                            # the kernel forgets the inodes

        def nodes() -> int:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            return shimfs.stats(mnt)["mount"]["nodes"]
        wait_until(lambda: nodes() == 1, what="every node of the removed files freed", interval=0.5)


def _readable_link(pid: int, fd: str) -> bool:
    try:
        os.readlink("/proc/%d/fd/%s" % (pid, fd))
        return True
    except OSError:
        return False


def test_a_small_file_read_whole_is_loaded_in_the_wire(wired):
    """A READ that reaches the end of the file has nothing after it to read
    ahead: the wire loads it, even when it starts a run; a larger file's
    first READ still goes to the read-ahead policy."""
    mnt, backing = wired
    small, sdata = linked(mnt, backing, "s.bin", 16 << 10)
    big, bdata = linked(mnt, backing, "b.bin", 8 << 20)
    before = mount_stats(small)
    with open(small, "rb") as f:
        assert f.read() == sdata
    mid = mount_stats(small)
    assert mid["fast_read_misses"] - before["fast_read_misses"] == 1
    assert mid["fast_read_passed_missing"] == before["fast_read_passed_missing"]
    with open(big, "rb") as f:
        assert f.read() == bdata
    assert mount_stats(big)["fast_read_passed_missing"] > mid["fast_read_passed_missing"]


def test_writes_of_cached_pages_are_taken_in_c(wired):
    """WRITEs that need no I/O (pages cached, or covered whole; no growth)
    are taken by the wire, exact to the byte at awkward offsets and sizes;
    those that do need I/O or grow the file still reach Python; a stat
    right after them shows their ctime (OpenFiles.take_written)."""
    mnt, backing = wired
    size = 3 * (1 << 20) + 1234
    path, data = linked(mnt, backing, "w.bin", size)
    model = bytearray(data)
    with open(path, "rb") as f:
        assert f.read() == data                 # every page cached
    before = mount_stats(path)
    st0 = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        rng = random.Random(7)
        for _ in range(200):
            off = rng.randrange(size)
            n = min(rng.choice([1, 7, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 5, 1 << 20]),
                    size - off)
            chunk = rng.randbytes(n)
            assert os.pwrite(fd, chunk, off) == n
            model[off:off + n] = chunk
        mid = mount_stats(path)
        assert mid["fast_writes"] - before["fast_writes"] >= 200   # an unaligned MiB is two
        assert mid["fast_write_bytes"] > before["fast_write_bytes"]
        assert mid["write_requests"] - before["write_requests"] >= 200
        assert os.stat(path).st_ctime_ns > st0.st_ctime_ns
        assert os.pread(fd, size, 0) == bytes(model)
        # growing the file: Python's write
        assert os.pwrite(fd, b"tail", size) == 4
        model += b"tail"
        assert mount_stats(path)["fast_writes"] == mid["fast_writes"]
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(os.path.join(backing, "w.bin"), "rb") as f:
        assert f.read() == bytes(model)


def test_a_write_into_an_uncached_page_goes_to_python(wired):
    mnt, backing = wired
    path, data = linked(mnt, backing, "u.bin", 8 * PAGE)
    before = mount_stats(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"part", PAGE + 100)      # a part of a page never read
        os.pwrite(fd, b"P" * PAGE, 4 * PAGE)    # a whole page: no old bytes needed
        after = mount_stats(path)
        assert after["fast_writes"] - before["fast_writes"] == 1
        assert after["write_requests"] - before["write_requests"] == 2
        os.fsync(fd)
    finally:
        os.close(fd)
    want = data[:PAGE + 100] + b"part" + data[PAGE + 104:4 * PAGE] + b"P" * PAGE + data[5 * PAGE:]
    with open(os.path.join(backing, "u.bin"), "rb") as f:
        assert f.read() == want


def test_a_checkpoint_through_the_wire_is_exact(wired):
    """A new file sized with ftruncate and filled through a mapping: the
    fault-in READs are known zeros, the write-back WRITEs are taken in C."""
    mnt, backing = wired
    path = os.path.join(mnt, "ck.bin")
    size = 4 * (1 << 20) + 3 * PAGE + 17
    blob = random.Random(3).randbytes(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            m[:] = blob
            m.flush()
    finally:
        os.close(fd)
    st = mount_stats(path)
    assert st["fast_writes"] > 0 and st["bytes_fetched"] == 0
    with open(os.path.join(backing, "ck.bin"), "rb") as f:
        assert f.read() == blob


def test_unmount_ends_the_daemon(tmp_path, backing):
    mnt = str(tmp_path / "mnt")
    with shim_mount(mnt, backing) as m:
        path, data = linked(m, backing, "u.bin", 1 << 20)
        with open(path, "rb") as f:
            assert f.read() == data
        pid = daemon_pid(m)
        shimfs_cmd("umount", m)
        assert wait_gone(pid, 20.0)


# -- sparse faults: the kernel's read-around of random faults is refused ------

BIG = 256 << 20             # 256 read-around windows of 1 MiB


def touch_pages(path: str, pages: list[int], data: bytes, write: bool = False) -> None:
    """Fault each page of a mapping of ``path`` in (and with ``write``
    change its first byte, then msync), checking whole pages."""
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        access = mmap.ACCESS_WRITE if write else mmap.ACCESS_READ
        with mmap.mmap(fd, 0, access=access) as mp:
            for p in pages:
                off = p * PAGE
                assert mp[off:off + PAGE] == data[off:off + PAGE], "page %d" % p
                if write:
                    mp[off] = data[off] ^ 0xFF
            if write:
                mp.flush()
    finally:
        os.close(fd)


@pytest.mark.parametrize("sparse", [True, False])
def test_random_faults_fetch_only_the_touched_pages(tmp_path, data_dir, sparse):
    """Defaults: a random page fault of a mapping costs the backing file the
    page, not the kernel's 4 MiB read-around; ``sparse_faults=0`` restores
    the read-around (and its fetches).  Bytes exact either way."""
    path_b = os.path.join(data_dir, "sparse.bin")
    data = make_file(path_b, BIG)
    opts = () if sparse else ("sparse_faults=0",)
    with shim_mount(str(tmp_path / "mnt"), data_dir, *opts) as m:
        os.symlink(path_b, os.path.join(m, "s"))
        path = os.path.join(m, "s")
        pages = random.Random(3).sample(range(BIG // PAGE), 150)
        touch_pages(path, pages, data)
        st = mount_stats(path)
    touched = len(pages) * PAGE
    if sparse:
        assert st["read_arounds_refused"] >= len(pages) // 2    # some land in a refused window
        assert st["reader_handles"] == 0
        assert st["bytes_fetched"] <= 4 * touched
    else:
        assert st["read_arounds_refused"] == 0
        assert st["bytes_fetched"] >= 32 * touched


@pytest.mark.parametrize("size", [8 << 10, 64 << 10, 1 << 20, 4 << 20])
def test_random_read_calls_are_served_as_asked(tmp_path, data_dir, size):
    """read(2) at random offsets is not a page fault: its first READ may be
    refused, the handle is then known as a reader, and from then on every
    READ is served whole.  Bytes exact, nothing fetched twice over."""
    path_b = os.path.join(data_dir, "reads.bin")
    data = make_file(path_b, BIG)
    with shim_mount(str(tmp_path / "mnt"), data_dir) as m:
        os.symlink(path_b, os.path.join(m, "r"))
        path = os.path.join(m, "r")
        rnd = random.Random(size)
        offs = [rnd.randrange((BIG - size) // PAGE) * PAGE + rnd.choice([0, 17])
                for _ in range(40)]
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in offs:
                assert os.pread(fd, size, off) == data[off:off + size], off
        finally:
            os.close(fd)
        st = mount_stats(path)
    assert st["read_arounds_refused"] <= 4          # the first read's READs at most
    assert st["reader_handles"] <= 1
    assert st["bytes_fetched"] <= 2 * 40 * (size + 2 * PAGE) + (4 << 20)


def test_a_mapped_scan_that_starts_inside_a_refused_window(tmp_path, data_dir):
    """A scan that begins mid-file is a random fault first: the pages of its
    refused window come back one by one, and the wire loads the rest of the
    window at once.  Bytes exact; the scan is still one stream."""
    path_b = os.path.join(data_dir, "mid.bin")
    data = make_file(path_b, 64 << 20)
    with shim_mount(str(tmp_path / "mnt"), data_dir) as m:
        os.symlink(path_b, os.path.join(m, "s"))
        path = os.path.join(m, "s")
        start = (37 << 20) + 5 * PAGE
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mp:
                for off in range(start, len(data), PAGE):
                    assert mp[off:off + 8] == data[off:off + 8], off
                assert mp[start:] == data[start:]
        finally:
            os.close(fd)
        st = mount_stats(path)
    assert st["read_arounds_refused"] >= 1
    assert st["refused_range_loads"] >= 1
    assert st["bytes_fetched"] <= len(data) - start + (8 << 20)


def test_refused_read_arounds_leave_no_error_behind(tmp_path, data_dir):
    """Random mapped writes after refused read-arounds: every msync, fsync
    and close succeeds and the backing file gets exactly the new bytes;
    read(2) of the refused pages returns the file's bytes."""
    path_b = os.path.join(data_dir, "w.bin")
    data = make_file(path_b, 64 << 20)
    with shim_mount(str(tmp_path / "mnt"), data_dir) as m:
        os.symlink(path_b, os.path.join(m, "w"))
        path = os.path.join(m, "w")
        pages = random.Random(5).sample(range((64 << 20) // PAGE), 60)
        touch_pages(path, pages, data, write=True)
        expect = bytearray(data)
        for p in pages:
            expect[p * PAGE] ^= 0xFF
        fd = os.open(path, os.O_RDWR)
        try:
            os.fsync(fd)
            for p in pages:             # neighbours of touched pages: refused ones
                off = (p + 3) * PAGE
                assert os.pread(fd, PAGE, off) == bytes(expect[off:off + PAGE])
        finally:
            os.close(fd)
        assert mount_stats(path)["read_arounds_refused"] >= 1
    with open(path_b, "rb") as f:
        assert f.read() == bytes(expect)


def test_a_file_touched_at_random_reopens_with_a_narrow_window(tmp_path, data_dir):
    """A file whose mapping was touched at random (its read-arounds refused)
    is opened next with the narrow read-around window: each fault sends one
    small READ, served as asked (nothing refused), fetching at most
    ``NARROW_PAGES`` pages, and the mount's own window is back once the open
    is done.  A narrow open that reads the file in sequence gives it the
    mount's window back at its next open.  Bytes exact throughout."""
    path_b = os.path.join(data_dir, "narrow.bin")
    data = make_file(path_b, BIG)
    with shim_mount(str(tmp_path / "mnt"), data_dir) as m:
        os.symlink(path_b, os.path.join(m, "n"))
        path = os.path.join(m, "n")
        dev = os.stat(m).st_dev
        bdi = "/sys/class/bdi/%d:%d/read_ahead_kb" % (os.major(dev), os.minor(dev))

        def window() -> str:
            with open(bdi) as f:
                return f.read().strip()
        wide = window()
        rnd = random.Random(11)
        touch_pages(path, rnd.sample(range(BIG // PAGE), 100), data)
        st = shimfs.stats(path)
        assert st["file"]["read_arounds_refused"] >= RANDOM_REFUSALS
        assert st["mount"]["narrow_opens"] == 0
        pages = rnd.sample(range(BIG // PAGE), 100)
        touch_pages(path, pages, data)                  # the narrow open
        after = shimfs.stats(path)
        assert after["mount"]["narrow_opens"] == 1
        assert after["file"]["read_arounds_refused"] == st["file"]["read_arounds_refused"]
        fetched = after["file"]["bytes_fetched"] - st["file"]["bytes_fetched"]
        assert fetched <= len(pages) * NARROW_PAGES * PAGE
        wait_until(lambda: window() == wide, what="the mount's read-around window put back")
        with open(path, "rb") as f:                     # narrow too: read in sequence
            for off in range(0, 16 << 20, 1 << 20):
                assert f.read(1 << 20) == data[off:off + (1 << 20)], off
        before = shimfs.stats(path)
        touch_pages(path, rnd.sample(range(BIG // PAGE), 100), data)
        st = shimfs.stats(path)
        assert st["mount"]["narrow_opens"] == 2         # the reader's, not this one
        assert st["file"]["read_arounds_refused"] > before["file"]["read_arounds_refused"]
        assert window() == wide
