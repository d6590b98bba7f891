"""Real mounts: shadows, created files, mmap, msync, truncate, namespace ops.

Each data test runs over a local backing directory and over the GlusterFS
stand-in (where the backing file itself cannot be mapped), and compares bytes
with the backing file read directly.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat

import pytest

from mounting import make_file, read_file, shim_mount, wait_until
from shimfs.names import XATTR_BACKING

# Awkward sizes: empty, within one page, around page and 1 MiB (one READ)
# boundaries, and several READs whose last is short.
SIZES = [0, 1, 4095, 4097, (1 << 20) + 1, (3 << 20) - 1, (4 << 20) + 4095, (9 << 20) + 12345]


def test_standin_refuses_shared_mmap(gluster):
    path = os.path.join(gluster, "refuse-mmap")
    make_file(path, 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            mmap.mmap(fd, 0, mmap.MAP_SHARED)
        assert info.value.errno == errno.ENODEV
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.parametrize("size", SIZES)
def test_shadow_is_regular_file_with_backing_bytes(mnt, data_dir, size):
    src = os.path.join(data_dir, "file%d" % size)
    data = make_file(src, size)
    os.symlink(src, os.path.join(mnt, "shadow"))
    shadow = os.path.join(mnt, "shadow")
    st = os.lstat(shadow)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == size
    assert st.st_mtime_ns == os.stat(src).st_mtime_ns
    assert read_file(shadow) == data
    if size:
        fd = os.open(shadow, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:] == data                       # every page, the short last one too
        finally:
            os.close(fd)
    assert os.getxattr(shadow, XATTR_BACKING) == os.fsencode(src)


def test_ln_into_mountpoint_uses_basename_and_relative_targets(mnt, data_dir):
    src = os.path.join(data_dir, "dataset.bin")
    data = make_file(src, 10000)
    # `ln -s /data/file MOUNTPOINT`
    import subprocess
    subprocess.run(["ln", "-s", src, mnt], check=True)
    assert read_file(os.path.join(mnt, "dataset.bin")) == data
    # a relative target resolves against the cwd of the process that ran ln
    subprocess.run(["ln", "-s", "dataset.bin", os.path.join(mnt, "rel")], check=True,
                   cwd=data_dir)
    assert read_file(os.path.join(mnt, "rel")) == data


@pytest.mark.parametrize("size", [1, 4095, 4097, (1 << 20) + 1, (3 << 20) - 1, (4 << 20) + 4095])
def test_mapped_write_msync_reaches_backing(mnt, data_dir, size):
    src = os.path.join(data_dir, "m%d" % size)
    data = bytearray(make_file(src, size))
    os.symlink(src, os.path.join(mnt, "m"))
    fd = os.open(os.path.join(mnt, "m"), os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert m[:] == bytes(data)
        for off in sorted({0, size // 2, size - 1, 4095 % size, 4096 % size}):
            m[off] = (data[off] + 1) & 0xFF
            data[off] = (data[off] + 1) & 0xFF
        m.flush()        # msync(MS_SYNC)
        assert read_file(src) == bytes(data)
        assert os.path.getsize(src) == size
        m.close()
    finally:
        os.close(fd)
    assert read_file(src) == bytes(data)


def test_large_mapped_scan_and_rewrite_with_eviction(mnt, data_dir):
    """64 MiB through a 32 MiB daemon cache: pages are evicted and re-read."""
    size = 64 << 20
    src = os.path.join(data_dir, "big")
    data = bytearray(make_file(src, size))
    os.symlink(src, os.path.join(mnt, "big"))
    fd = os.open(os.path.join(mnt, "big"), os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED) as m:
            assert m[:] == bytes(data)
            pattern = os.urandom(4096)
            for off in range(0, size, 1 << 20):
                m[off + 100:off + 100 + 4096] = pattern
                data[off + 100:off + 100 + 4096] = pattern
            m.flush()
    finally:
        os.close(fd)
    assert read_file(src) == bytes(data)


def test_mapped_rewrite_is_absorbed_without_worker_hops(mnt, data_dir):
    """Every page of a mapping rewritten: the fault-in READs cached the pages,
    so the kernel's WRITEs land in them on the serving thread
    (``writes_to_cache``); the bytes still reach the backing file exactly."""
    import shimfs
    size = 8 << 20
    src = os.path.join(data_dir, "rewrite")
    make_file(src, size)
    os.symlink(src, os.path.join(mnt, "rewrite"))
    path = os.path.join(mnt, "rewrite")
    new = os.urandom(size)
    before = shimfs.stats(path)["mount"]
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED) as m:
            m[:] = new
            m.flush()
    finally:
        os.close(fd)
    assert read_file(src) == new
    after = shimfs.stats(path)["mount"]
    writes = after["write_requests"] - before["write_requests"]
    cached = after["writes_to_cache"] - before["writes_to_cache"]
    assert writes > 0 and 0 < cached <= writes
    assert shimfs.stats(path)["file"]["dirty_bytes"] == 0


def test_stat_during_a_mapped_write_keeps_the_page_cache(mnt, data_dir):
    """The kernel drops a file's whole page cache when a GETATTR reply shows
    it a new mtime.  A stat in the middle of a mapped write must not do that:
    the mapping's pages stay (no READ to fault them in again) and the mtime
    moves once the mapping and the file are closed."""
    import time
    import shimfs
    from shimfs.names import TIMEOUT
    size = 4 << 20
    src = os.path.join(data_dir, "statwrite")
    data = make_file(src, size)
    os.symlink(src, os.path.join(mnt, "statwrite"))
    path = os.path.join(mnt, "statwrite")
    before = os.stat(path).st_mtime_ns
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED) as m:
            assert m[:] == data                         # every page faulted in
            m[:4096] = b"w" * 4096
            m.flush()                                   # the WRITE reached the daemon
            reads = shimfs.stats(mnt)["mount"]["read_requests"]
            time.sleep(TIMEOUT + 0.2)                   # the kernel's attributes expired:
            assert os.stat(path).st_mtime_ns == before  # this stat asks the daemon
            assert m[4096:] == data[4096:]
            assert shimfs.stats(mnt)["mount"]["read_requests"] == reads
    finally:
        os.close(fd)
    time.sleep(TIMEOUT + 0.2)
    assert os.stat(path).st_mtime_ns > before
    assert read_file(src) == b"w" * 4096 + data[4096:]


def test_rm_shadow_keeps_backing(mnt, data_dir):
    src = os.path.join(data_dir, "keep")
    data = make_file(src, 5000)
    os.symlink(src, os.path.join(mnt, "keep"))
    with open(os.path.join(mnt, "keep"), "r+b") as f:
        f.write(b"Z")
    data = b"Z" + data[1:]
    os.unlink(os.path.join(mnt, "keep"))
    assert not os.path.exists(os.path.join(mnt, "keep"))
    assert read_file(src) == data


def test_write_and_truncate_pass_through(mnt, data_dir):
    src = os.path.join(data_dir, "wt")
    data = bytearray(make_file(src, 10000))
    os.symlink(src, os.path.join(mnt, "wt"))
    path = os.path.join(mnt, "wt")
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"middle")           # never changes the size
        data[5000:5006] = b"middle"
    assert os.path.getsize(src) == 10000
    assert read_file(src) == bytes(data)
    with open(path, "r+b") as f:
        f.seek(12000)
        f.write(b"tail")             # extends, with a hole of zeros
    data += bytes(2000) + b"tail"
    assert read_file(src) == bytes(data)
    os.truncate(path, 4097)
    assert os.path.getsize(src) == 4097
    assert os.path.getsize(path) == 4097
    assert read_file(path) == bytes(data[:4097])
    os.truncate(path, 9000)
    assert read_file(src) == bytes(data[:4097]) + bytes(9000 - 4097)
    assert read_file(path) == read_file(src)
    os.truncate(path, 0)
    assert os.path.getsize(src) == 0 and read_file(path) == b""


def test_fsync_and_close_flush(mnt, data_dir):
    src = os.path.join(data_dir, "fs")
    make_file(src, 0)
    os.symlink(src, os.path.join(mnt, "fs"))
    fd = os.open(os.path.join(mnt, "fs"), os.O_RDWR)
    try:
        os.write(fd, b"a" * 7000)
        os.fsync(fd)
        assert read_file(src) == b"a" * 7000
        os.pwrite(fd, b"b" * 10, 3)
    finally:
        os.close(fd)
    assert read_file(src) == b"aaa" + b"b" * 10 + b"a" * (7000 - 13)


@pytest.mark.parametrize("size", SIZES)
def test_created_file_gets_backing_file(mnt, backing, size):
    data = os.urandom(size)
    path = os.path.join(mnt, "created")
    with open(path, "wb") as f:
        f.write(data)
    assert read_file(os.path.join(backing, "created")) == data
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0) if size else None
        if m is not None:
            m[0:1] = b"!"
            m.flush()
            m.close()
            data = b"!" + data[1:]
    assert read_file(os.path.join(backing, "created")) == data
    os.truncate(path, size // 2)
    assert read_file(os.path.join(backing, "created")) == data[:size // 2]
    os.unlink(path)
    assert not os.path.exists(os.path.join(backing, "created"))


def test_directories_map_to_backing_subdirectories(mnt, backing):
    os.makedirs(os.path.join(mnt, "a", "b"))
    with open(os.path.join(mnt, "a", "b", "f"), "wb") as f:
        f.write(b"deep")
    assert read_file(os.path.join(backing, "a", "b", "f")) == b"deep"
    assert sorted(os.listdir(mnt)) == ["a"]
    assert os.listdir(os.path.join(mnt, "a")) == ["b"]
    with pytest.raises(OSError) as info:
        os.rmdir(os.path.join(mnt, "a"))
    assert info.value.errno == errno.ENOTEMPTY
    os.rename(os.path.join(mnt, "a"), os.path.join(mnt, "c"))
    assert read_file(os.path.join(backing, "c", "b", "f")) == b"deep"
    assert read_file(os.path.join(mnt, "c", "b", "f")) == b"deep"
    os.rename(os.path.join(mnt, "c", "b", "f"), os.path.join(mnt, "g"))
    assert read_file(os.path.join(backing, "g")) == b"deep"
    os.rmdir(os.path.join(mnt, "c", "b"))
    os.rmdir(os.path.join(mnt, "c"))
    assert not os.path.exists(os.path.join(backing, "c"))
    assert sorted(os.listdir(backing)) == ["g"]


def test_rename_shadow_keeps_backing_where_it_is(mnt, data_dir, backing):
    src = os.path.join(data_dir, "r")
    data = make_file(src, 4097)
    os.symlink(src, os.path.join(mnt, "r1"))
    os.mkdir(os.path.join(mnt, "d"))
    os.rename(os.path.join(mnt, "r1"), os.path.join(mnt, "d", "r2"))
    assert read_file(os.path.join(mnt, "d", "r2")) == data
    assert read_file(src) == data
    assert os.listdir(os.path.join(backing, "d")) == []


def test_errors_inside_the_mount(mnt, data_dir):
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mnt, "nope"))
    with pytest.raises(FileNotFoundError):
        os.symlink(os.path.join(data_dir, "missing"), os.path.join(mnt, "x"))
    with pytest.raises(IsADirectoryError):
        os.symlink(data_dir, os.path.join(mnt, "x"))
    with pytest.raises(OSError) as info:
        os.mkfifo(os.path.join(mnt, "fifo"))
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.symlink("/dev/null", os.path.join(mnt, "dev"))        # a device
    assert info.value.errno == errno.EINVAL
    fifo = os.path.join(data_dir, "fifo")
    if not data_dir.startswith("/run/"):
        os.mkfifo(fifo)
        with pytest.raises(OSError) as info:
            os.symlink(fifo, os.path.join(mnt, "x"))
        assert info.value.errno == errno.EINVAL
    with open(os.path.join(mnt, "f"), "wb"):
        pass
    with pytest.raises(OSError) as info:
        os.link(os.path.join(mnt, "f"), os.path.join(mnt, "y"))   # reaches the daemon
    assert info.value.errno == errno.EPERM
    os.unlink(os.path.join(mnt, "f"))
    os.mkdir(os.path.join(mnt, "d"))
    with pytest.raises(IsADirectoryError):
        os.unlink(os.path.join(mnt, "d"))
    assert os.listdir(mnt) == ["d"]      # the daemon is still serving


def test_statfs_reports_backing_space(mnt, backing):
    a, b = os.statvfs(mnt), os.statvfs(backing)
    assert a.f_blocks * a.f_frsize == b.f_blocks * b.f_frsize


def test_stats_and_sync_interfaces(mnt, data_dir):
    import json

    import shimfs
    from mounting import shimfs_cmd
    src = os.path.join(data_dir, "s")
    data = bytearray(make_file(src, 1 << 20))
    os.symlink(src, os.path.join(mnt, "s"))
    path = os.path.join(mnt, "s")
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, 1 << 20, 0) == data
        orig = bytes(data)
        os.pwrite(fd, b"x", 5)
        data[5:6] = b"x"
        st = shimfs.stats(path)
        assert st["file"]["backing"] == src and st["file"]["shadow"] is True
        assert st["file"]["size"] == 1 << 20
        assert st["file"]["bytes_fetched"] >= 1 << 20
        assert st["file"]["dirty_bytes"] == 4096          # one page written, not yet back
        assert st["mount"]["files"] == 1 and st["mount"]["write_requests"] >= 1
        assert read_file(src) == orig                      # in the daemon only, until a sync
        shimfs.sync(path)
        assert shimfs.stats(path)["file"]["dirty_bytes"] == 0
        assert read_file(src) == data
        out = json.loads(shimfs_cmd("stat", "--json", path).stdout)
        assert out["file"]["backing"] == src and out["file"]["dirty_bytes"] == 0
        assert out["mount"]["files"] == 1
        text = shimfs_cmd("stat", path).stdout.splitlines()
        assert "file:" in text and "mount:" in text
        assert any(line.split() == ["backing", src] for line in text)
        os.pwrite(fd, b"yz", 1000)
        data[1000:1002] = b"yz"
        shimfs_cmd("sync", path)
        assert read_file(src) == data
        assert shimfs.stats(path)["file"]["dirty_bytes"] == 0
    finally:
        os.close(fd)


def test_background_writeback_without_fsync(tmp_path, backing):
    """Dirty data reaches the backing file by itself within writeback_interval."""
    from mounting import shim_mount
    src = tmp_path / "bg"
    src.write_bytes(bytes(8192))
    with shim_mount(str(tmp_path / "m"), backing, "writeback_interval=1") as m:
        os.symlink(str(src), os.path.join(m, "bg"))
        fd = os.open(os.path.join(m, "bg"), os.O_RDWR)
        try:
            os.pwrite(fd, b"later", 10)           # no fsync, file stays open
            wait_until(lambda: read_file(str(src))[10:15] == b"later", 30,
                       "the background write-back", interval=0.1)
        finally:
            os.close(fd)


def test_a_small_read_ahead_fetches_only_what_random_touches_need(tmp_path, data_dir):
    """``read_ahead=4``: the kernel reads 16 KiB around a faulting page, and
    the daemon prefetches nothing for random touches, so sparse touches
    fetch at most 4 pages each; the daemon's own window stays deep."""
    import random
    import shimfs
    src = os.path.join(data_dir, "rnd.bin")
    data = make_file(src, 64 << 20)
    with shim_mount(str(tmp_path / "m"), data_dir, "read_ahead=4") as m:
        os.symlink(src, os.path.join(m, "r"))
        path = os.path.join(m, "r")
        dev = os.stat(m).st_dev
        with open("/sys/class/bdi/%d:%d/read_ahead_kb" % (os.major(dev), os.minor(dev))) as f:
            assert int(f.read()) == 16
        rnd = random.Random(7)
        pages = rnd.sample(range((64 << 20) // 4096), 200)
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mp:
                for p in pages:
                    assert mp[p * 4096:p * 4096 + 8] == data[p * 4096:p * 4096 + 8]
        finally:
            os.close(fd)
        st = shimfs.stats(path)
        assert st["file"]["bytes_fetched"] <= 4 * 4096 * len(pages)
        assert st["mount"]["read_ahead_max_window"] == 64 << 20


def test_a_scan_with_a_small_read_ahead_is_one_stream_served_from_the_cache(tmp_path, data_dir):
    """``read_ahead=4``: random detection does not cost a mapped scan its
    prefetch: its 16 KiB READs form one sequential stream, nearly all are
    answered from pages the daemon prefetched (most without Python), and
    no byte is fetched twice."""
    import shimfs
    src = os.path.join(data_dir, "seq.bin")
    data = make_file(src, 32 << 20)
    with shim_mount(str(tmp_path / "m"), data_dir, "read_ahead=4", "push=0") as m:
        os.symlink(src, os.path.join(m, "s"))
        path = os.path.join(m, "s")
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mp:
                # one touch per page, in order (a large memcpy out of a
                # mapping may walk each stretch backwards: see
                # docs/performance.md, "Random access")
                for off in range(0, len(data), 4096):
                    mp[off]
                st = shimfs.stats(path)
                assert mp[:] == data
        finally:
            os.close(fd)
    f, mount = st["file"], st["mount"]
    if f["backing_in_memory"]:
        pytest.skip("no read-ahead for files in memory")
    # the policy sees one READ per MiB consumed; the compiled path answers
    # the cached ones in between (shimfs._wire)
    assert f["random_reads"] <= 2
    assert f["sequential_reads"] + mount["fast_reads"] - mount["fast_read_misses"] >= 1000
    assert mount["reads_from_cache"] >= 0.9 * mount["read_requests"]
    assert f["bytes_fetched"] <= len(data) + (1 << 20)
