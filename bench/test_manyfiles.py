"""A many-file dataset through ``-o mirror``, as ratios to native access.

* ``ls -l`` of a directory of ``SHIMFS_BENCH_FILES`` (10,000) files, against
  ``ls -l`` of the backing directory itself;
* open, map, read and close of ``SHIMFS_BENCH_SMALL`` (1,000) small files,
  against open, ``pread`` and close of each natively.

Each round is cold (client caches dropped, a fresh mount) and runs native
first; the ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import mmap
import os
import statistics
import subprocess
import time

import pytest

from benchlib import ROUNDS, Rate, drop_caches, record
from mounting import shim_mount

FILES = int(os.environ.get("SHIMFS_BENCH_FILES", "10000"))
SMALL = int(os.environ.get("SHIMFS_BENCH_SMALL", "1000"))
SMALL_SIZE = 16 << 10


@pytest.fixture(scope="session")
def tree(where):
    """A directory of FILES small files and one of SMALL files of 16 KiB."""
    top = os.path.join(where[1], "manyfiles")
    if not os.path.isdir(top):
        os.makedirs(os.path.join(top, "listing"))
        os.makedirs(os.path.join(top, "small"))
        for i in range(FILES):
            with open(os.path.join(top, "listing", "f%05d" % i), "wb") as f:
                f.write(b"x" * (i % 100))
        blob = os.urandom(SMALL_SIZE)
        for i in range(SMALL):
            with open(os.path.join(top, "small", "s%04d" % i), "wb") as f:
                f.write(blob)
    return top


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ls(path: str) -> None:
    subprocess.run(["ls", "-l", path], stdout=subprocess.DEVNULL, check=True)


def _read_all_native(d: str) -> None:
    for name in sorted(os.listdir(d)):
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            os.pread(fd, SMALL_SIZE, 0)
        finally:
            os.close(fd)


def _map_all(d: str) -> None:
    for name in sorted(os.listdir(d)):
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                bytes(m[::4096])
        finally:
            os.close(fd)


def _rounds(tmp_path, backing: str, native_fn, mine_fn, count: int):
    nat, mine = [], []
    for r in range(ROUNDS):
        drop_caches()
        nat.append(count / _timed(native_fn))
        with shim_mount(str(tmp_path / ("m%d" % r)), backing, "mirror") as m:
            drop_caches()
            mine.append(count / _timed(lambda: mine_fn(m)))
    return Rate(mine, []), Rate(nat, []), [a / b for a, b in zip(mine, nat)]


def test_ls_l_of_a_large_directory(tree, where, tmp_path):
    backing = os.path.join(tree, "listing")
    mine, nat, ratios = _rounds(tmp_path, backing, lambda: _ls(backing), _ls, FILES)
    record("ls -l of %d files through -o mirror vs ls -l of the backing dir (files/s)" % FILES,
           where[0], "shimfs `-o mirror`", mine, nat, ratios=ratios)
    print("ls -l: %.2fx" % statistics.median(ratios))


def test_open_map_read_close_small_files(tree, where, tmp_path):
    backing = os.path.join(tree, "small")
    mine, nat, ratios = _rounds(tmp_path, backing, lambda: _read_all_native(backing),
                                _map_all, SMALL)
    record("open+map+read+close of %d 16 KiB files vs open+pread+close (files/s)" % SMALL,
           where[0], "shimfs `-o mirror`", mine, nat, ratios=ratios)
    print("many files: %.2fx" % statistics.median(ratios))
