"""Random namespace and data operations through a real mount vs a plain directory.

Hypothesis drives the same operations on a directory inside a shimfs mount
and on an ordinary directory (the oracle); every result -- bytes read, sizes,
listings and errnos -- must match, and after each example the backing tree
must hold exactly the oracle's files.  Over ``-o mirror`` a second actor,
another node, also creates, replaces, appends to and removes files in the
backing directory directly (and in the oracle); the mount must show its
changes within the entry and attr timeout.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
import uuid

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mounting import fallocate, shim_mount
from shimfs.names import TIMEOUT

NAMES = st.sampled_from(["a", "b", "c", "d/x", "d/y", "e/z"])
DIRS = st.sampled_from(["d", "e"])
OFFSETS = st.sampled_from([0, 1, 4095, 4096, 4097, 70000])
SIZES = st.sampled_from([0, 1, 4095, 4097, 65536 + 1])

_state = {}


@pytest.fixture(scope="module", params=["local", "gluster", "local-mirror", "gluster-mirror"])
def stateful_mount(request, tmp_path_factory):
    """A mount whose backing directory is local, or on the stand-in; plain
    or ``-o mirror``."""
    where, _, mirror = request.param.partition("-")
    top = tmp_path_factory.mktemp("stateful")
    if where == "local":
        backing = str(top / "backing")
    else:
        backing = os.path.join(request.getfixturevalue("gluster"), "st-" + uuid.uuid4().hex[:10])
    os.mkdir(backing)
    opts = ["cache_size=16M"] + (["mirror"] if mirror else [])
    try:
        with shim_mount(str(top / "mnt"), backing, *opts) as mnt:
            _state.update(mnt=mnt, backing=backing, mirror=bool(mirror))
            yield mnt
    finally:
        _state.clear()
        if where == "gluster":
            shutil.rmtree(backing, ignore_errors=True)


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", e.errno)


class MountVsOracle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        sub = "s-" + uuid.uuid4().hex[:10]
        self.mine = os.path.join(_state["mnt"], sub)
        self.back = os.path.join(_state["backing"], sub)
        self.oracle = tempfile.mkdtemp(prefix="oracle-")
        os.mkdir(self.mine)

    def both(self, fn, *args):
        a = outcome(fn, self.mine, *args)
        b = outcome(fn, self.oracle, *args)
        assert a == b, (fn.__name__, args, a, b)
        return a

    def both_fd(self, name, flags, fn):
        """``both`` for ``fn(fd)`` on ``name`` opened with ``flags`` (an
        error from the open is an outcome too)."""
        def op(root, name):
            fd = os.open(os.path.join(root, name), flags)
            try:
                return fn(fd)
            finally:
                os.close(fd)
        op.__name__ = fn.__name__
        return self.both(op, name)

    @rule(d=DIRS)
    def mkdir(self, d):
        self.both(lambda root, d: os.mkdir(os.path.join(root, d)), d)

    @rule(d=DIRS)
    def rmdir(self, d):
        self.both(lambda root, d: os.rmdir(os.path.join(root, d)), d)

    @rule(name=NAMES, size=SIZES)
    def create(self, name, size):
        data = bytes((i * 7 + size) & 0xFF for i in range(size))

        def op(root, name):
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
        self.both(op, name)

    @rule(name=NAMES, off=OFFSETS, size=SIZES)
    def write(self, name, off, size):
        data = bytes((i * 13 + off) & 0xFF for i in range(size))

        def pwrite(fd):
            return os.pwrite(fd, data, off)
        self.both_fd(name, os.O_WRONLY, pwrite)

    @rule(name=NAMES, off=OFFSETS)
    def mapped_write(self, name, off):
        def store(fd):
            size = os.fstat(fd).st_size
            if size == 0:
                return 0
            with mmap.mmap(fd, 0) as m:
                m[off % size] = (off * 3 + 1) & 0xFF
                m.flush()
            return size
        self.both_fd(name, os.O_RDWR, store)

    @rule(name=NAMES, size=OFFSETS)
    def truncate(self, name, size):
        self.both(lambda root, name: os.truncate(os.path.join(root, name), size), name)

    @rule(name=NAMES, off=OFFSETS, size=SIZES,
          mode=st.sampled_from([0, 0x01, 0x02 | 0x01]))   # allocate, KEEP_SIZE, punch a hole
    def fallocate(self, name, off, size, mode):
        def allocate(fd):
            fallocate(fd, mode, off, size)
            return os.fstat(fd).st_size
        self.both_fd(name, os.O_RDWR, allocate)

    @rule(name=NAMES, off=OFFSETS)
    def mapped_read(self, name, off):
        """A punched hole must read as zeros through a mapping too."""
        def load(fd):
            if os.fstat(fd).st_size == 0:
                return b""
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
                return m[off % len(m):off % len(m) + 8192]
        self.both_fd(name, os.O_RDONLY, load)

    @rule(name=NAMES)
    def read(self, name):
        def op(root, name):
            with open(os.path.join(root, name), "rb") as f:
                return f.read()
        self.both(op, name)

    @rule(name=NAMES)
    def unlink(self, name):
        self.both(lambda root, name: os.unlink(os.path.join(root, name)), name)

    @rule(a=NAMES, b=NAMES)
    def rename(self, a, b):
        self.both(lambda root, a: os.rename(os.path.join(root, a), os.path.join(root, b)), a)

    @invariant()
    def same_listing(self):
        def tree(root):
            out = []
            for dirpath, dirs, files in os.walk(root):
                rel = os.path.relpath(dirpath, root)
                out += [(rel, d, "d") for d in sorted(dirs)]
                out += [(rel, f, os.path.getsize(os.path.join(dirpath, f))) for f in sorted(files)]
            return sorted(out)
        assert tree(self.mine) == tree(self.oracle)

    def teardown(self):
        try:
            # the backing tree mirrors the mount, byte for byte
            for dirpath, dirs, files in os.walk(self.oracle):
                rel = os.path.relpath(dirpath, self.oracle)
                for f in files:
                    with open(os.path.join(dirpath, f), "rb") as a, \
                            open(os.path.join(self.back, rel, f), "rb") as b:
                        assert a.read() == b.read(), (rel, f)
        finally:
            shutil.rmtree(self.mine, ignore_errors=True)
            shutil.rmtree(self.oracle, ignore_errors=True)


class MirrorWithAnotherNode(MountVsOracle):
    """The same, over ``-o mirror``, with another node working directly in
    the backing directory.  Each of its changes waits out the kernel's entry
    and attr timeout before the views are compared."""

    def other(self, fn, *args):
        a = outcome(fn, self.back, *args)
        b = outcome(fn, self.oracle, *args)
        assert a == b, (fn.__name__, args, a, b)
        time.sleep(TIMEOUT + 0.2)

    @rule(name=NAMES, size=SIZES)
    def other_node_replaces(self, name, size):
        data = bytes((i * 11 + size) & 0xFF for i in range(size))

        def op(root, name):
            tmp = os.path.join(root, name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, os.path.join(root, name))      # as rsync and editors do
        self.other(op, name)

    @rule(name=NAMES, size=SIZES)
    def other_node_appends(self, name, size):
        def op(root, name):
            with open(os.path.join(root, name), "r+b") as f:
                f.seek(0, 2)
                f.write(b"A" * size)
        self.other(op, name)

    @rule(name=NAMES)
    def other_node_removes(self, name):
        self.other(lambda root, name: os.unlink(os.path.join(root, name)), name)


MountVsOracle.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None,
    suppress_health_check=list(HealthCheck))
MirrorWithAnotherNode.TestCase.settings = settings(
    max_examples=8, stateful_step_count=20, deadline=None,
    suppress_health_check=list(HealthCheck))


def test_mount_matches_plain_directory(stateful_mount):
    if _state["mirror"]:
        MirrorWithAnotherNode.TestCase().runTest()
    else:
        MountVsOracle.TestCase().runTest()
