"""Faults and lifecycle: full disks, vanished files, signals, kill -9.

Nothing acknowledged is lost, errors reach the caller as errnos, dirty data
is kept for a retry, and no process hangs.
"""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import subprocess
import sys

import pytest

from mounting import (daemon_pid, fill, is_mounted, read_file, shim_mount, shimfs_cmd,
                      small_tmpfs, wait_gone, wait_until)


def test_enospc_msync_fails_keeps_data_and_retries(tmp_path, backing):
    with small_tmpfs(str(tmp_path / "small")) as small:
        src = os.path.join(small, "data")
        with open(src, "wb") as f:
            f.truncate(256 * 1024)                     # sparse: no blocks yet
        filler = None
        with shim_mount(str(tmp_path / "mnt"), backing, "verbose",
                        log=str(tmp_path / "log")) as mnt:
            os.symlink(src, os.path.join(mnt, "d"))
            fd = os.open(os.path.join(mnt, "d"), os.O_RDWR)
            try:
                m = mmap.mmap(fd, 0)
                blob = os.urandom(256 * 1024)
                m[:] = blob
                filler = fill(small)
                with pytest.raises(OSError) as info:
                    m.flush()                          # msync(MS_SYNC)
                assert info.value.errno == errno.ENOSPC
                assert shimfs_dirty(mnt + "/d") > 0    # kept for a retry
                res = shimfs_cmd("umount", mnt, check=False)   # refuses to drop it
                assert res.returncode != 0 and "cannot write back" in res.stderr
                assert is_mounted(mnt)
                os.unlink(filler)
                m.flush()                              # the retry succeeds
                assert read_file(src) == blob
                m.close()
            finally:
                os.close(fd)


def shimfs_dirty(path):
    import shimfs
    return shimfs.stats(path)["file"]["dirty_bytes"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_back_and_unmounts(tmp_path, backing, sig):
    data = tmp_path / "data"
    data.write_bytes(bytes(10000))
    mnt = str(tmp_path / "mnt")
    with shim_mount(mnt, backing) as m:
        pid = daemon_pid(m)
        os.symlink(str(data), os.path.join(m, "f"))
        fd = os.open(os.path.join(m, "f"), os.O_RDWR)
        os.pwrite(fd, b"not yet synced", 5000)        # dirty in the daemon only
        os.kill(pid, sig)
        assert wait_gone(pid)
        assert not is_mounted(mnt)
        assert read_file(str(data))[5000:5014] == b"not yet synced"
        with contextlib.suppress(OSError):
            os.close(fd)


def test_kill9_leaves_dead_mount_that_umount_cleans(tmp_path, backing):
    data = tmp_path / "data"
    data.write_bytes(bytes(8192))
    mnt = str(tmp_path / "mnt")
    with shim_mount(mnt, backing) as m:
        pid = daemon_pid(m)
        os.symlink(str(data), os.path.join(m, "f"))
        fd = os.open(os.path.join(m, "f"), os.O_RDWR)
        os.pwrite(fd, b"durable", 0)
        os.fsync(fd)
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        with pytest.raises(OSError) as info:
            os.stat(m)
        assert info.value.errno == errno.ENOTCONN
        with contextlib.suppress(OSError):
            os.close(fd)
        res = shimfs_cmd("umount", m)
        assert "gone" in res.stderr
        assert not is_mounted(m)
        assert read_file(str(data))[:7] == b"durable"
    with shim_mount(mnt, backing) as m:                # a fresh mount works
        os.symlink(str(data), os.path.join(m, "f"))
        assert read_file(os.path.join(m, "f"))[:7] == b"durable"


@pytest.mark.daemon_logs(r"keeping .*: its unwritten data is retried",      # not dropped
                         r"could not write back .* at unmount: .* was removed")  # silently
def test_backing_removed_under_live_shadow(mnt, tmp_path):
    src = tmp_path / "gone"
    src.write_bytes(b"x" * 9000)
    os.symlink(str(src), os.path.join(mnt, "g"))
    fd = os.open(os.path.join(mnt, "g"), os.O_RDWR)
    try:
        os.unlink(str(src))
        assert os.pread(fd, 4, 0) == b"xxxx"          # the open file still reads
        os.pwrite(fd, b"y", 0)
        with pytest.raises(OSError) as info:
            os.fsync(fd)                              # no home for the data: say so
        assert info.value.errno == errno.ESTALE
        assert os.listdir(mnt) == ["g"]               # the daemon is fine
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.unlink(os.path.join(mnt, "g"))


def test_backing_truncated_by_another_node(mnt, tmp_path):
    src = tmp_path / "shrink"
    size = 64 * 4096
    data = os.urandom(size)
    src.write_bytes(data)
    os.symlink(str(src), os.path.join(mnt, "s"))
    path = os.path.join(mnt, "s")
    code = """
import mmap, os, sys, shimfs
fd = os.open(%r, os.O_RDWR)
m = mmap.mmap(fd, 0)
head = m[:4096]
os.truncate(%r, 4096)                 # another node truncates the backing file
assert m[:4096] == head               # cached pages: unchanged until refresh
# a page not cached yet reads the backing file, now zeros past its end; one
# the kernel's read-around brought in still shows the old bytes
assert m[40 * 4096:40 * 4096 + 4] in (bytes(4), %r)
shimfs.refresh(fd)                    # adopt the backing file's new size
assert os.fstat(fd).st_size == 4096
print("ok", flush=True)
m[10 * 4096]                          # past the new end: SIGBUS, as for any file
print("no SIGBUS", flush=True)
""" % (path, str(src), data[40 * 4096:40 * 4096 + 4])
    res = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.stdout.strip() == "ok", res.stderr
    assert res.returncode == -signal.SIGBUS
    assert os.listdir(mnt) == ["s"]


def test_processes_mapping_one_file_lose_nothing(mnt, tmp_path):
    """Four processes write disjoint stripes of one mapped file at once."""
    src = tmp_path / "shared"
    size = 4_000_000                       # whole stripes; not a multiple of the page size
    src.write_bytes(bytes(size))
    os.symlink(str(src), os.path.join(mnt, "shared"))
    code = """
import mmap, os, sys
k = int(sys.argv[1])
fd = os.open(%r, os.O_RDWR)
m = mmap.mmap(fd, 0)
for rnd in range(3):
    for off in range(k * 1000, len(m), 4000):
        m[off:off + 1000] = bytes([k + 1 + rnd]) * 1000
    m.flush()
""" % os.path.join(mnt, "shared")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)]) for k in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    data = read_file(str(src))
    for k in range(4):
        for off in range(k * 1000, size, 4000):
            assert data[off:off + 1000] == bytes([k + 3]) * 1000


def _bounded(fn, timeout=90.0):
    """Run fn in a thread; fail if it does not finish in time (a hang)."""
    import threading
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:       # noqa: B902 - reported to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung for more than %ds" % timeout
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_brick_killed_mid_scan_and_write_back(gluster, tmp_path, backing):
    from shimfs import standin
    d = os.path.join(gluster, "brick-fault-%d" % os.getpid())
    os.mkdir(d)
    src = os.path.join(d, "f")
    blob = os.urandom(16 << 20)
    with open(src, "wb") as f:
        f.write(blob)
    try:
        with shim_mount(str(tmp_path / "mnt"), backing, "read_ahead=0") as m:
            os.symlink(src, os.path.join(m, "f"))
            fd = os.open(os.path.join(m, "f"), os.O_RDWR)
            try:
                assert os.pread(fd, 1 << 20, 0) == blob[:1 << 20]
                os.pwrite(fd, b"dirty", 100)                 # not yet written back
                standin.kill_brick()
                try:
                    with pytest.raises(OSError) as info:     # mid-scan: an errno, no hang
                        _bounded(lambda: os.pread(fd, 1 << 20, 8 << 20))
                    assert info.value.errno in (errno.ENOTCONN, errno.EIO)
                    with pytest.raises(OSError) as info:     # mid write-back
                        _bounded(lambda: os.fsync(fd))
                    assert info.value.errno in (errno.ENOTCONN, errno.EIO)
                finally:
                    standin.start_brick()
                # the same mount works again, and the dirty bytes were kept
                assert _bounded(lambda: os.pread(fd, 1 << 20, 8 << 20)) == blob[8 << 20:9 << 20]
                _bounded(lambda: os.fsync(fd))
                with open(src, "rb") as f:
                    data = f.read()
                assert data[100:105] == b"dirty"
                assert data[:100] == blob[:100] and data[105:] == blob[105:]
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.daemon_logs(r"could not write back .* at unmount: \[Errno 28\]")
def test_umount_force_when_the_backing_is_gone(tmp_path, backing):
    with small_tmpfs(str(tmp_path / "small")) as small:
        src = os.path.join(small, "data")
        with open(src, "wb") as f:
            f.truncate(64 * 1024)
        mnt = str(tmp_path / "mnt")
        with shim_mount(mnt, backing) as m:
            pid = daemon_pid(m)
            os.symlink(src, os.path.join(m, "d"))
            fd = os.open(os.path.join(m, "d"), os.O_RDWR)
            os.pwrite(fd, os.urandom(64 * 1024), 0)          # dirty in the daemon
            fill(small)
            res = shimfs_cmd("umount", m, check=False)
            assert res.returncode != 0 and "--force" in res.stderr
            with contextlib.suppress(OSError):
                os.close(fd)                                 # close: ENOSPC too
            res = shimfs_cmd("umount", "--force", m)
            assert not is_mounted(m)
            assert wait_gone(pid)


@pytest.mark.daemon_logs(r"keeping .*: its unwritten data is retried")
def test_unlinked_shadow_keeps_unwritten_data_until_it_lands(tmp_path, backing):
    """rm of a shadow whose last close could not write back (disk full) must
    not throw the data away: the daemon keeps it and the flusher retries."""
    with small_tmpfs(str(tmp_path / "small")) as small:
        src = os.path.join(small, "data")
        with open(src, "wb") as f:
            f.truncate(128 * 1024)
        blob = os.urandom(128 * 1024)
        with shim_mount(str(tmp_path / "mnt"), backing, "writeback_interval=1") as m:
            os.symlink(src, os.path.join(m, "d"))
            fd = os.open(os.path.join(m, "d"), os.O_RDWR)
            os.pwrite(fd, blob, 0)                           # dirty in the daemon
            filler = fill(small)
            os.unlink(os.path.join(m, "d"))
            with pytest.raises(OSError) as info:
                os.close(fd)                                 # write-back fails
            assert info.value.errno == errno.ENOSPC
            import shimfs
            os.listdir(m)                     # lets the kernel's FORGET of the inode through
            os.listdir(m)
            assert shimfs.stats(m)["mount"]["files"] == 1    # still held, with its data
            os.unlink(filler)
            wait_until(lambda: read_file(src) == blob, 30,       # the flusher retries
                       "the kept data to land", interval=0.1)
            wait_until(lambda: not shimfs.stats(m)["mount"]["files"], 30,   # and frees it
                       "the shadow to be freed", interval=0.1)
