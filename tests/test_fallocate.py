"""fallocate through a mount, over a local backing directory and over the
stand-in: posix_fallocate before mapping, KEEP_SIZE, a punched hole under a
live mapping and over dirty pages, refused modes; the daemon's cache, the
kernel's pages and the backing file agree byte for byte."""
from __future__ import annotations

import errno
import mmap
import os

import pytest

import shimfs
from mounting import fallocate, make_file, shim_mount

PAGE = 4096
MIB = 1 << 20
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10


@pytest.fixture
def fa(tmp_path, data_dir):
    with shim_mount(str(tmp_path / "mnt"), data_dir, "cache_size=32M") as m:
        yield m, data_dir


def backing_bytes(backing: str, name: str) -> bytes:
    with open(os.path.join(backing, name), "rb") as f:
        return f.read()


def test_posix_fallocate_before_mapping(fa):
    mnt, backing = fa
    path = os.path.join(mnt, "pre.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 6 * MIB + 5)
        assert os.fstat(fd).st_size == 6 * MIB + 5
        with mmap.mmap(fd, 6 * MIB + 5) as m:
            assert m[:PAGE] == bytes(PAGE)
            m[3 * MIB:3 * MIB + 5] = b"hello"
            m.flush()
    finally:
        os.close(fd)
    want = bytearray(6 * MIB + 5)
    want[3 * MIB:3 * MIB + 5] = b"hello"
    assert backing_bytes(backing, "pre.bin") == want
    assert shimfs.stats(path)["file"]["bytes_fetched"] == 0      # known zeros


def test_keep_size_allocates_without_growing(fa):
    mnt, backing = fa
    path = os.path.join(mnt, "k.bin")
    with open(path, "wb") as f:
        f.write(b"abc")
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, KEEP_SIZE, 0, 4 * MIB)
        assert os.fstat(fd).st_size == 3
        assert os.pread(fd, 10, 0) == b"abc"
    finally:
        os.close(fd)
    assert os.stat(os.path.join(backing, "k.bin")).st_size == 3


def test_a_punched_hole_reads_as_zeros_in_a_live_mapping(fa):
    mnt, backing = fa
    data = make_file(os.path.join(backing, "h.bin"), 4 * MIB)
    os.symlink(os.path.join(backing, "h.bin"), os.path.join(mnt, "h.bin"))
    path = os.path.join(mnt, "h.bin")
    a, b = MIB + 100, 3 * MIB               # unaligned start: an edge page keeps its head
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            assert m[:] == data                             # in every cache
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, a, b - a)
            want = data[:a] + bytes(b - a) + data[b:]
            assert m[:] == want                             # the live mapping
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data), 0) == want
    finally:
        os.close(fd)
    assert backing_bytes(backing, "h.bin") == want


def test_a_punch_over_dirty_pages_wins_where_it_punched(fa):
    mnt, backing = fa
    make_file(os.path.join(backing, "d.bin"), 2 * MIB)
    os.symlink(os.path.join(backing, "d.bin"), os.path.join(mnt, "d.bin"))
    path = os.path.join(mnt, "d.bin")
    a, b = 100 * PAGE + 7, MIB + 5 * PAGE
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as m:
            m[:] = b"A" * len(m)                            # every page dirty in the kernel
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, a, b - a)
            want = b"A" * a + bytes(b - a) + b"A" * (2 * MIB - b)
            assert m[:] == want
            m.flush()
    finally:
        os.close(fd)
    assert backing_bytes(backing, "d.bin") == want
    with open(path, "rb") as f:
        assert f.read() == want


def test_other_modes_are_refused(fa):
    mnt, backing = fa
    path = os.path.join(mnt, "r.bin")
    with open(path, "wb") as f:
        f.write(b"x" * (2 * MIB))
    fd = os.open(path, os.O_RDWR)
    try:
        for mode in (ZERO_RANGE, PUNCH_HOLE):               # PUNCH_HOLE needs KEEP_SIZE
            with pytest.raises(OSError) as exc:
                fallocate(fd, mode, 0, MIB)
            assert exc.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as exc:
            fallocate(fd, 0, 0, 0)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    ro = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            fallocate(ro, 0, 0, MIB)
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(ro)
    assert backing_bytes(backing, "r.bin") == b"x" * (2 * MIB)


def test_without_the_compiled_reader_fallocate_is_not_supported(tmp_path, backing):
    """pyfuse3 has no fallocate handler: with ``fast_reads=0`` the kernel
    answers EOPNOTSUPP, and nothing changes."""
    with shim_mount(str(tmp_path / "mnt"), backing, "fast_reads=0") as mnt:
        path = os.path.join(mnt, "n.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with pytest.raises(OSError) as exc:
                fallocate(fd, 0, 0, MIB)
            assert exc.value.errno == errno.EOPNOTSUPP
            assert os.fstat(fd).st_size == 0
        finally:
            os.close(fd)
