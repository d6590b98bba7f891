"""The prefetch call (``shimfs prefetch``, ``shimfs.prefetch``, the
``user.shimfs.prefetch`` xattr), on real mounts over a local directory and
over the stand-in: the range lands in the kernel's page cache with exact
bytes, later touches send no READ, dirty data is never overwritten, and
bad input is refused with one clear line or EINVAL."""
from __future__ import annotations

import errno
import mmap
import os

import pytest

import shimfs
from mounting import make_file, read_file, shim_mount, shimfs_cmd, wait_until
from shimfs.names import XATTR_PREFETCH

PAGE = 4096


@pytest.fixture
def pre(tmp_path, data_dir):
    """A mount over ``data_dir`` with a small cache (16M: a prefetch of more
    passes through it in pieces); returns (mount, backing)."""
    with shim_mount(str(tmp_path / "mnt"), data_dir, "cache_size=16M") as m:
        yield m, data_dir


def reads(path: str) -> int:
    return shimfs.stats(path)["mount"]["read_requests"]


def touch_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            return m[:]
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["cli", "api", "xattr"])
def test_a_prefetched_file_is_touched_without_a_read(pre, how):
    mnt, backing = pre
    data = make_file(os.path.join(backing, "d.bin"), 40 << 20)       # larger than the cache
    os.symlink(os.path.join(backing, "d.bin"), os.path.join(mnt, "d"))
    path = os.path.join(mnt, "d")
    if how == "cli":
        shimfs_cmd("prefetch", path)
    elif how == "api":
        shimfs.prefetch(path)
    else:
        os.setxattr(path, XATTR_PREFETCH, b"")
    st = shimfs.stats(path)["mount"]
    assert st["prefetch_call_pushed_bytes"] == len(data)
    before = reads(path)
    assert touch_all(path) == data
    # Every page was in the kernel's cache.  The kernel may still reclaim a
    # few pushed pages before the touch (DAMON page-out did, 3 and 11 READs,
    # until scripts/run-env.sh paused it; a touch without the prefetch takes
    # 40 or more, one per MiB at least), so a handful is allowed.
    assert reads(path) - before <= 4


def test_a_range_and_its_edges(pre):
    mnt, backing = pre
    data = make_file(os.path.join(backing, "r.bin"), 3 * (1 << 20) + 123)
    os.symlink(os.path.join(backing, "r.bin"), os.path.join(mnt, "r"))
    path = os.path.join(mnt, "r")
    shimfs.prefetch(path, 1 << 20, (2 << 20) + 123)      # to the very end, unaligned
    before = reads(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            assert m[1 << 20:] == data[1 << 20:]
            assert reads(path) == before
            assert m[:1 << 20] == data[:1 << 20]         # not prefetched: READs
            assert reads(path) > before
    finally:
        os.close(fd)
    shimfs.prefetch(path, len(data), 0)                  # empty, at the end: fine
    shimfs_cmd("prefetch", "--offset", str(len(data)), path)


def test_known_zeros_are_prefetched_too(pre):
    mnt, backing = pre
    path = os.path.join(mnt, "z.bin")
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(8 << 20)                              # known zeros past the head
    # the kernel sends RELEASE after close() returns: until the daemon has
    # it, the file counts as open for writing and nothing is pushed
    wait_until(lambda: shimfs.stats(path)["file"]["open_for_writing"] == 0, 10,
               "the writer's release")
    shimfs.prefetch(path)
    before = reads(path)
    assert touch_all(path) == b"head" + bytes((8 << 20) - 4)
    assert reads(path) == before


def test_prefetch_never_overwrites_dirty_pages(pre):
    mnt, backing = pre
    data = make_file(os.path.join(backing, "w.bin"), 4 << 20)
    os.symlink(os.path.join(backing, "w.bin"), os.path.join(mnt, "w"))
    path = os.path.join(mnt, "w")
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as m:
            m[PAGE:2 * PAGE] = b"N" * PAGE               # dirty in the kernel, not written back
            m[(3 << 20) + 5:(3 << 20) + 9] = b"mine"
            shimfs.prefetch(path)                        # a writer is open: no push
            res = shimfs_cmd("prefetch", path)
            assert "open for writing" in res.stderr and res.returncode == 0
            assert m[PAGE:2 * PAGE] == b"N" * PAGE
            assert m[(3 << 20) + 5:(3 << 20) + 9] == b"mine"
            assert shimfs.stats(path)["mount"]["prefetch_call_pushed_bytes"] == 0
            m.flush()
    finally:
        os.close(fd)
    want = bytearray(data)
    want[PAGE:2 * PAGE] = b"N" * PAGE
    want[(3 << 20) + 5:(3 << 20) + 9] = b"mine"
    assert read_file(os.path.join(backing, "w.bin")) == want
    # once no writer is left, a prefetch pushes the file as written
    wait_until(lambda: shimfs.stats(path)["file"]["open_for_writing"] == 0, 10,
               "the writer's release")
    shimfs.prefetch(path)
    assert shimfs.stats(path)["mount"]["prefetch_call_pushed_bytes"] == len(data)
    assert touch_all(path) == want


def test_bad_input_is_refused_cleanly(pre, tmp_path):
    mnt, backing = pre
    make_file(os.path.join(backing, "b.bin"), 10000)
    os.symlink(os.path.join(backing, "b.bin"), os.path.join(mnt, "b"))
    path = os.path.join(mnt, "b")
    for args in (["--offset", "-1"], ["--length", "-5"], ["--offset", "10001"],
                 ["--offset", "5000", "--length", "5001"]):
        res = shimfs_cmd("prefetch", *args, path, check=False)
        assert res.returncode != 0, args
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, args
    outside = str(tmp_path / "elsewhere")
    make_file(outside, 100)
    res = shimfs_cmd("prefetch", outside, check=False)
    assert res.returncode != 0 and "not in a shimfs mount" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = shimfs_cmd("prefetch", str(tmp_path / "missing"), check=False)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    for offset, length in ((-1, None), (0, -1), (10001, None), (9000, 2000)):
        with pytest.raises(OSError) as exc:
            shimfs.prefetch(path, offset, length)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(shimfs.ShimfsError):
        shimfs.prefetch(outside)
    # the xattr itself, as any language would set it: the daemon checks too
    for value in (b"-1 5", b"abc", b"1 2 3", b"10001", b"0 10001", b"9999 2"):
        with pytest.raises(OSError) as exc:
            os.setxattr(path, XATTR_PREFETCH, value)
        assert exc.value.errno == errno.EINVAL, value
    with pytest.raises(OSError) as exc:
        os.setxattr(mnt, XATTR_PREFETCH, b"")
    assert exc.value.errno == errno.EINVAL
