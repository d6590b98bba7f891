"""``-o mirror`` on real mounts, over a local directory and over the stand-in:
the backing tree is the mount's, and real programs work on files that
already exist in it."""
from __future__ import annotations

import mmap
import os
import sqlite3

import pytest

from mounting import read_file, shim_mount


@pytest.fixture
def tree(tmp_path, data_dir):
    """A backing tree made before the mount, and a mirror of it."""
    os.makedirs(os.path.join(data_dir, "runs", "r1"))
    with open(os.path.join(data_dir, "runs", "r1", "log.txt"), "wb") as f:
        f.write(b"existing log\n")
    with shim_mount(str(tmp_path / "mnt"), data_dir, "mirror") as m:
        yield m, data_dir


def test_the_tree_is_there_and_writable(tree):
    mnt, data = tree
    assert sorted(os.listdir(mnt)) == ["runs"]
    assert os.listdir(os.path.join(mnt, "runs")) == ["r1"]
    path = os.path.join(mnt, "runs", "r1", "log.txt")
    assert read_file(path) == b"existing log\n"
    with open(path, "ab") as f:
        f.write(b"appended\n")
    assert read_file(os.path.join(data, "runs", "r1", "log.txt")) == b"existing log\nappended\n"
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as m:                    # MAP_SHARED, which the stand-in refuses
            m[0:8] = b"EXISTING"
            m.flush()
    finally:
        os.close(fd)
    assert read_file(os.path.join(data, "runs", "r1", "log.txt")).startswith(b"EXISTING log")
    with open(os.path.join(data, "made-elsewhere"), "wb") as f:
        f.write(b"hello")
    assert "made-elsewhere" in os.listdir(mnt)        # readdir lists the backing directory
    os.unlink(os.path.join(data, "made-elsewhere"))
    assert "made-elsewhere" not in os.listdir(mnt)


def test_sqlite_opens_an_existing_database(tmp_path, data_dir):
    db = os.path.join(data_dir, "existing.db")
    con = sqlite3.connect(db)
    con.execute("create table t (k integer primary key, v text)")
    con.executemany("insert into t values (?, ?)", [(i, "v%d" % i) for i in range(2000)])
    con.commit()
    con.close()
    with shim_mount(str(tmp_path / "mnt"), data_dir, "mirror") as m:
        con = sqlite3.connect(os.path.join(m, "existing.db"))
        try:
            con.execute("pragma mmap_size = 268435456")        # reads through a mapping
            assert con.execute("select count(*), max(v) from t").fetchone() == (2000, "v999")
            con.execute("update t set v = 'changed' where k = 7")
            con.commit()
        finally:
            con.close()
    con = sqlite3.connect(db)
    try:
        assert con.execute("select v from t where k = 7").fetchone() == ("changed",)
    finally:
        con.close()


def test_numpy_memmap_maps_an_existing_array(tmp_path, data_dir):
    import numpy as np             # a test dependency (pyproject: test)
    arr = np.arange(300_000, dtype=np.float64)
    path = os.path.join(data_dir, "array.npy")
    np.save(path, arr)
    with shim_mount(str(tmp_path / "mnt"), data_dir, "mirror") as m:
        a = np.load(os.path.join(m, "array.npy"), mmap_mode="r+")
        assert float(a[123_456]) == 123456.0 and a.shape == (300_000,)
        a[::1000] = -1.0
        a.flush()
        del a
    b = np.load(path)
    assert float(b[5000]) == -1.0 and float(b[5001]) == 5001.0


def test_a_large_directory_lists_whole_across_replies(tmp_path, data_dir):
    """A listing longer than one READDIRPLUS reply (names.READDIR_ENTRIES)
    comes back whole, each name once, with each file's own size, as a
    reader that stats as it goes (ls -l) sees it; a shadow beside the
    backing files is listed once too."""
    big = os.path.join(data_dir, "big")
    os.makedirs(big)
    want = {}
    for i in range(1000):
        name = "f%04d" % i
        with open(os.path.join(big, name), "wb") as f:
            f.write(b"x" * (i % 97))
        want[name] = i % 97
    other = tmp_path / "elsewhere.bin"
    other.write_bytes(b"shadowed")
    with shim_mount(str(tmp_path / "mnt"), data_dir, "mirror") as m:
        os.symlink(str(other), os.path.join(m, "big", "zz-shadow"))
        want["zz-shadow"] = 8
        seen = []
        with os.scandir(os.path.join(m, "big")) as it:
            for entry in it:
                seen.append((entry.name, entry.stat(follow_symlinks=False).st_size))
        assert sorted(n for n, _ in seen) == sorted(want)        # each name once
        assert dict(seen) == want
        assert read_file(os.path.join(m, "big", "f0996")) == b"x" * (996 % 97)
