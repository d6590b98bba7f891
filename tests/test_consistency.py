"""Two nodes on one machine: msync, refresh (the reverse msync) and multiwrite.

Each node is its own shimfs mount, with its own daemon, over its own
GlusterFS client mount of the one stand-in volume.  Both shadow the same
backing file; each maps it.  Bytes are checked in the live mappings and in
the backing file.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import random
import uuid

import pytest

import shimfs
from mounting import shim_mount, shimfs_cmd, wait_until
from shimfs import standin
from shimfs.names import XATTR_MULTIWRITE, XATTR_REFRESH

SIZE = 64 * 4096 + 123          # 65 pages, the last one partial


class Node:
    def __init__(self, name, mnt, backing_path):
        self.name = name
        self.path = os.path.join(mnt, "shared")
        os.symlink(backing_path, self.path)
        self.fd = os.open(self.path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, 0, mmap.MAP_SHARED)

    def close(self):
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def nodes(gluster, tmp_path, request):
    """Two nodes A and B sharing one backing file on the stand-in."""
    multiwrite = getattr(request, "param", False)
    rel = os.path.join("t-" + uuid.uuid4().hex[:12])
    d0 = os.path.join(standin.client_dir(0), rel)
    os.mkdir(d0)
    with open(os.path.join(d0, "data"), "wb") as f:
        f.write(bytes(SIZE))
    opts = ("multiwrite",) if multiwrite else ()
    made = []
    try:
        with contextlib.ExitStack() as stack:
            for i, name in enumerate("AB"):
                mnt = stack.enter_context(shim_mount(
                    str(tmp_path / ("mnt" + name)), str(tmp_path), *opts,
                    log=str(tmp_path / ("%s.log" % name))))
                node = Node(name, mnt, os.path.join(standin.client_dir(i), rel, "data"))
                made.append(node)
            a, b = made
            assert a.map[:] == b.map[:] == bytes(SIZE)
            yield a, b, os.path.join(d0, "data")
            for node in made:
                node.close()
            made.clear()
    finally:
        for node in made:
            node.close()
        import shutil
        shutil.rmtree(d0, ignore_errors=True)


def backing(path):
    with open(path, "rb") as f:
        return f.read()


def test_refresh_shows_remote_msync_in_live_mapping(nodes):
    a, b, path = nodes
    a.map[5000:5010] = b"from A....".ljust(10, b".")
    a.map[SIZE - 3:SIZE] = b"END"
    a.map.flush()                                  # msync(MS_SYNC) on node A
    assert backing(path)[5000:5010] == b"from A...."
    assert b.map[5000:5010] == bytes(10)           # B still has its cached view
    shimfs.refresh(b.path)                         # Python API, whole file
    assert b.map[5000:5010] == b"from A...."       # same mapping, no remap
    assert b.map[SIZE - 3:] == b"END"
    assert b.map[:] == backing(path)


def test_refresh_sub_range_leaves_other_pages_alone(nodes):
    a, b, path = nodes
    a.map[0:4] = b"AAAA"
    a.map[10 * 4096:10 * 4096 + 4] = b"BBBB"
    a.map.flush()
    # xattr interface: page 10 only
    os.setxattr(b.path, XATTR_REFRESH, b"%d %d" % (10 * 4096, 4096))
    assert b.map[10 * 4096:10 * 4096 + 4] == b"BBBB"
    assert b.map[0:4] == bytes(4)                  # outside the range: untouched
    shimfs_cmd("refresh", "--offset", "0", "--length", "1", b.path)   # CLI interface
    assert b.map[0:4] == b"AAAA"


@pytest.mark.parametrize("nodes", [True], indirect=True, ids=["multiwrite"])
def test_multiwrite_disjoint_bytes_of_same_pages_both_survive(nodes):
    a, b, path = nodes
    for page in range(4):
        base = page * 4096
        for k in range(0, 4096, 64):
            a.map[base + k] = 0xAA                 # A: bytes at k % 64 == 0
            b.map[base + k + 1] = 0xBB             # B: bytes at k % 64 == 1
    a.map.flush()
    b.map.flush()
    data = backing(path)
    for page in range(4):
        base = page * 4096
        for k in range(0, 4096, 64):
            assert data[base + k] == 0xAA and data[base + k + 1] == 0xBB
    assert shimfs.stats(a.path)["file"]["multiwrite"] is True
    assert shimfs.stats(a.path)["file"]["twin_bytes"] > 0


def test_without_multiwrite_last_writer_wins_per_page(nodes):
    a, b, path = nodes
    a.map[0] = 0xAA
    a.map[4096 + 7] = 0xAA                         # page 1: only A writes
    b.map[1] = 0xBB                                # page 0: both write
    a.map.flush()
    b.map.flush()                                  # B's whole page 0 lands last
    data = backing(path)
    assert data[0] == 0 and data[1] == 0xBB        # A's byte in page 0 is lost
    assert data[4096 + 7] == 0xAA                  # pages B did not dirty keep A's bytes


@pytest.mark.parametrize("nodes", [True], indirect=True, ids=["multiwrite"])
def test_refresh_keeps_local_dirty_bytes_with_multiwrite(nodes):
    a, b, path = nodes
    b.map[100:103] = b"bbb"                        # B: written, not msync'd
    a.map[200:203] = b"aaa"
    a.map.flush()
    shimfs.refresh(b.path, 0, 4096)
    assert b.map[100:103] == b"bbb"                # local bytes kept
    assert b.map[200:203] == b"aaa"                # remote bytes taken
    b.map.flush()
    data = backing(path)
    assert data[100:103] == b"bbb" and data[200:203] == b"aaa"


@pytest.mark.parametrize("nodes", [False, True], indirect=True, ids=["plain", "multiwrite"])
def test_alternating_rounds_lose_nothing(nodes):
    a, b, path = nodes
    rnd = random.Random(7)
    expect = bytearray(SIZE)
    for rnd_no in range(30):
        writer, reader = (a, b) if rnd_no % 2 == 0 else (b, a)
        off = rnd.randrange(0, SIZE - 1)
        n = rnd.randrange(1, min(20000, SIZE - off) + 1)
        blob = bytes(rnd.randrange(256) for _ in range(16)) * (n // 16 + 1)
        writer.map[off:off + n] = blob[:n]
        expect[off:off + n] = blob[:n]
        writer.map.flush()
        shimfs.refresh(reader.fd, off, n)          # by file descriptor
        assert reader.map[off:off + n] == blob[:n]
        assert backing(path) == bytes(expect)
    shimfs.refresh(a.path)
    shimfs.refresh(b.path)
    assert a.map[:] == b.map[:] == bytes(expect)


def test_refresh_bad_ranges(nodes):
    a, b, path = nodes
    with pytest.raises(OSError):
        os.setxattr(b.path, XATTR_REFRESH, b"%d 10" % (SIZE + 4096))
    with pytest.raises(OSError):
        os.setxattr(b.path, XATTR_REFRESH, b"-5 10")
    with pytest.raises(OSError):
        os.setxattr(b.path, XATTR_REFRESH, b"lots")
    res = shimfs_cmd("refresh", "--offset", "-1", b.path, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    res = shimfs_cmd("refresh", "--offset", str(SIZE + 4096), b.path, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_per_file_multiwrite_by_xattr(nodes):
    a, b, path = nodes
    os.setxattr(a.path, XATTR_MULTIWRITE, b"1")     # plain libc interface
    shimfs.set_multiwrite(b.path, True)                     # Python API
    assert os.getxattr(a.path, XATTR_MULTIWRITE) == b"1"
    a.map[10] = 0xAA
    b.map[11] = 0xBB
    a.map.flush()
    b.map.flush()
    data = backing(path)
    assert data[10] == 0xAA and data[11] == 0xBB
    with pytest.raises(OSError):
        os.setxattr(a.path, XATTR_MULTIWRITE, b"yes")


def test_multiwrite_survives_eviction_of_twins(gluster, tmp_path):
    """Node A's daemon cache is smaller than the file: scanning it evicts the
    early pages and their twins.  The kernel's copies must go too, or A's
    next write-back of such a page would undo B's bytes in it."""
    rel = "t-" + uuid.uuid4().hex[:12]
    d0 = os.path.join(standin.client_dir(0), rel)
    os.mkdir(d0)
    size = 40 << 20
    with open(os.path.join(d0, "data"), "wb") as f:
        f.truncate(size)
    try:
        with shim_mount(str(tmp_path / "mA"), str(tmp_path), "multiwrite", "cache_size=16M",
                        log=str(tmp_path / "A.log")) as ma, \
                shim_mount(str(tmp_path / "mB"), str(tmp_path), "multiwrite",
                           log=str(tmp_path / "B.log")) as mb:
            a = Node("A", ma, os.path.join(standin.client_dir(0), rel, "data"))
            b = Node("B", mb, os.path.join(standin.client_dir(1), rel, "data"))
            try:
                assert a.map[0] == 0 and b.map[1] == 0
                bytes(memoryview(a.map)[::4096])              # A touches every page
                def drops_done():                             # until every drop is done
                    st = shimfs.stats(a.path)["mount"]
                    return st["kernel_drops"] > 0 and st["kernel_drops_pending"] == 0
                wait_until(drops_done, 60, "the kernel's drops of lost twins")
                b.map[1] = 0xBB
                b.map.flush()
                a.map[0] = 0xAA
                a.map.flush()
                with open(os.path.join(d0, "data"), "rb") as f:
                    head = f.read(2)
                assert head == b"\xaa\xbb"
            finally:
                a.close()
                b.close()
    finally:
        import shutil
        shutil.rmtree(d0, ignore_errors=True)
