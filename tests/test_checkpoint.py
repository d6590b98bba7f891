"""Checkpoints through a mapping, on real mounts over a local directory and
over the stand-in: a file this node grows is never read back to be filled,
the bytes are exact, and zeros it knows of never hide bytes someone else
wrote once a refresh or a reopen has happened."""
from __future__ import annotations

import errno
import mmap
import os

import pytest

import shimfs
from mounting import fallocate, read_file, shim_mount

PAGE = 4096


@pytest.fixture
def ckpt(tmp_path, data_dir):
    """A mount whose backing directory is ``data_dir``; returns (mount, backing)."""
    with shim_mount(str(tmp_path / "mnt"), data_dir) as m:
        yield m, data_dir


def written(mnt: str, name: str, size: int) -> tuple[str, bytes]:
    """A file of ``size`` random bytes created through the mount: (path, bytes)."""
    path = os.path.join(mnt, name)
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def grown(mnt: str, name: str, size: int) -> tuple[str, int]:
    """A new file in the mount, grown to ``size`` by ftruncate (known zeros):
    (path, an open read/write descriptor)."""
    path = os.path.join(mnt, name)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    os.ftruncate(fd, size)
    return path, fd


def write_behind(backing: str, name: str, offset: int, data: bytes) -> None:
    """Another node (or a script) writes ``data`` into the backing file."""
    with open(os.path.join(backing, name), "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_mapped_fill_of_a_grown_file_reads_nothing_back(ckpt):
    mnt, backing = ckpt
    size = 4 << 20
    model = bytearray(size)
    path, fd = grown(mnt, "ckpt.bin", size)
    try:
        m = mmap.mmap(fd, size)
        for p in range(size // PAGE):
            if p % 7 == 3:
                continue                            # a page never touched
            if p % 5 == 1:                          # a page written in part
                off = p * PAGE + 100 + p % 300
                piece = bytes([p % 251 + 1]) * 50
            else:
                off, piece = p * PAGE, bytes([p % 253 + 1]) * PAGE
            m[off:off + len(piece)] = piece
            model[off:off + len(piece)] = piece
        m.flush()
        assert m[:] == model                        # the mapping reads them back exactly
        m.close()
        st = shimfs.stats(path)["file"]
    finally:
        os.close(fd)
    assert read_file(os.path.join(backing, "ckpt.bin")) == model
    assert st["bytes_fetched"] == 0
    assert st["zero_fills"] > 0 and st["zero_fill_bytes"] >= size // 2


def test_numpy_memmap_w_plus_reads_nothing_back(ckpt):
    import numpy as np                              # a test dependency (pyproject: test)
    mnt, backing = ckpt
    path = os.path.join(mnt, "a.f32")
    a = np.memmap(path, dtype=np.float32, mode="w+", shape=(1 << 20,))
    a[:] = np.arange(1 << 20, dtype=np.float32)
    a[12345] = -1.5
    a.flush()
    st = shimfs.stats(path)["file"]
    del a
    want = np.arange(1 << 20, dtype=np.float32)
    want[12345] = -1.5
    assert read_file(os.path.join(backing, "a.f32")) == want.tobytes()
    assert st["bytes_fetched"] == 0 and st["zero_fill_bytes"] > 0


def test_open_memmap_of_an_npy_file(ckpt):
    import numpy as np
    mnt, backing = ckpt
    path = os.path.join(mnt, "a.npy")
    a = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(300_000,))
    a[:] = np.arange(300_000) * 3
    a.flush()
    del a
    b = np.load(os.path.join(backing, "a.npy"))
    assert b.shape == (300_000,) and int(b[299_999]) == 899_997 and int(b[0]) == 0


def test_shrunk_and_regrown_through_the_mount(ckpt):
    mnt, backing = ckpt
    path, data = written(mnt, "s.bin", 10 * PAGE)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 3 * PAGE + 17)            # shrink into page 3
        os.ftruncate(fd, 12 * PAGE)                # and grow again
        with mmap.mmap(fd, 12 * PAGE) as m:
            want = data[:3 * PAGE + 17] + bytes(9 * PAGE - 17)
            assert m[:] == want
            m[8 * PAGE + 5:8 * PAGE + 9] = b"back"
            m.flush()
    finally:
        os.close(fd)
    want = bytearray(want)
    want[8 * PAGE + 5:8 * PAGE + 9] = b"back"
    assert read_file(os.path.join(backing, "s.bin")) == want


def test_a_hole_punched_in_the_backing_file_shows_after_refresh(ckpt):
    mnt, backing = ckpt
    path, data = written(mnt, "h.bin", 16 * PAGE)
    fd = os.open(path, os.O_RDWR)
    try:
        # (a punch through the mount: tests/test_fallocate.py)
        with mmap.mmap(fd, 16 * PAGE) as m:
            assert m[:] == data
            bfd = os.open(os.path.join(backing, "h.bin"), os.O_RDWR)
            try:
                fallocate(bfd, PUNCH, 4 * PAGE, 4 * PAGE)     # someone else punches it
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    pytest.skip("the backing file system cannot punch holes")
                raise
            finally:
                os.close(bfd)
            shimfs.refresh(path)
            assert m[:] == data[:4 * PAGE] + bytes(4 * PAGE) + data[8 * PAGE:]
    finally:
        os.close(fd)


def test_bytes_another_node_wrote_into_a_grown_range_show_after_refresh(ckpt):
    mnt, backing = ckpt
    path, fd = grown(mnt, "r.bin", 64 * PAGE)        # known zeros here...
    try:
        write_behind(backing, "r.bin", 40 * PAGE + 3, b"theirs")   # ...till someone writes
        shimfs.refresh(path)
        with mmap.mmap(fd, 64 * PAGE) as m:
            assert m[40 * PAGE:40 * PAGE + 12] == b"\0\0\0theirs\0\0\0"
            assert m[:40 * PAGE] == bytes(40 * PAGE)
    finally:
        os.close(fd)


def test_bytes_another_node_wrote_into_a_grown_range_show_after_reopen(ckpt):
    mnt, backing = ckpt
    path, fd = grown(mnt, "o.bin", 64 * PAGE)
    os.pwrite(fd, b"mine", 0)
    os.fsync(fd)
    os.close(fd)
    write_behind(backing, "o.bin", 50 * PAGE, b"theirs")
    fd = os.open(path, os.O_RDWR)                   # close-to-open: the file changed
    try:
        with mmap.mmap(fd, 64 * PAGE) as m:
            assert m[:4] == b"mine"
            assert m[50 * PAGE:50 * PAGE + 6] == b"theirs"
            assert m[4:50 * PAGE] == bytes(50 * PAGE - 4)
        assert shimfs.stats(path)["file"]["known_zero_bytes"] == 0
    finally:
        os.close(fd)


PUNCH = 0x02 | 0x01         # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def test_the_other_client_writes_into_a_grown_range(gluster, tmp_path):
    """Over the stand-in's two clients: node A grows a file; node B (its own
    mount over the second client, ``-o mirror`` so that it shows A's file)
    writes into the grown range; A sees B's
    bytes after a refresh, and its own mapped fill keeps them."""
    import uuid
    from shimfs import standin
    rel = "ckpt-" + uuid.uuid4().hex[:8]
    os.mkdir(os.path.join(standin.client_dir(0), rel))
    try:
        with shim_mount(str(tmp_path / "a"), os.path.join(standin.client_dir(0), rel)) as a, \
                shim_mount(str(tmp_path / "b"), os.path.join(standin.client_dir(1), rel),
                           "mirror") as b:
            fa = os.open(os.path.join(a, "c.bin"), os.O_CREAT | os.O_RDWR, 0o644)
            try:
                os.ftruncate(fa, 32 * PAGE)
                with open(os.path.join(b, "c.bin"), "r+b") as f:
                    f.seek(20 * PAGE)
                    f.write(b"B" * PAGE)
                    f.flush()
                    os.fsync(f.fileno())
                shimfs.refresh(os.path.join(a, "c.bin"))
                with mmap.mmap(fa, 32 * PAGE) as m:
                    assert m[20 * PAGE:21 * PAGE] == b"B" * PAGE
                    m[0:PAGE] = b"A" * PAGE
                    m.flush()
            finally:
                os.close(fa)
        got = read_file(os.path.join(standin.client_dir(1), rel, "c.bin"))
        assert got == b"A" * PAGE + bytes(19 * PAGE) + b"B" * PAGE + bytes(11 * PAGE)
    finally:
        import subprocess
        subprocess.run(["rm", "-rf", os.path.join(standin.client_dir(0), rel)], check=False)
