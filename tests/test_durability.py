"""Durability, seen from outside the daemon.

The backing directory lives on ``tests/fsyncfs.py``, a FUSE pass-through of
the suite's own that logs every WRITE and FSYNC that reaches it, in order,
and fails FSYNC with EIO while a flag file exists.  So a test sees whether
each way of asking for durability (msync, fsync, ``shimfs sync``, the sync
xattr of a file or of the mount) had the backing file fsynced after its
last write *before it returned*, and that a failed fsync reaches the caller
as an errno while the data stays for a retry.
"""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import sys

import pytest

from mounting import (is_mounted, process_gone, read_file, shim_mount, shimfs_cmd,
                      unavailable, wait_until)
from shimfs.names import XATTR_STATS, XATTR_SYNC

FSYNCFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsyncfs.py")


class Recorded:
    """A running fsyncfs: its mount, its source dir and its event log."""

    def __init__(self, root: str):
        self.source = os.path.join(root, "source")
        self.mnt = os.path.join(root, "recorded")
        self.events_path = os.path.join(root, "events")
        self.flag = os.path.join(root, "fail-fsync")
        os.makedirs(self.source)
        os.makedirs(self.mnt)
        open(self.events_path, "w").close()
        self.proc = subprocess.Popen([sys.executable, FSYNCFS, self.source, self.mnt,
                                      self.events_path, self.flag],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: is_mounted(self.mnt) or self.proc.poll() is not None, 30,
                       "fsyncfs to mount")
        except AssertionError:
            self.close()
            raise
        if self.proc.poll() is not None:
            raise AssertionError("fsyncfs did not start: %s" % self.proc.stderr.read())

    def events(self, name: str) -> list[str]:
        """The events of backing file ``name`` so far: write, fsync, fsync-failed..."""
        with open(self.events_path) as f:
            return [line.split()[0] for line in f if line.split()[1:2] == [name]]

    def close(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def synced_after_last_write(events: list[str]) -> bool:
    """An fsync came after the last write, and no failed one after it."""
    if "write" not in events:
        return False
    last_write = len(events) - 1 - events[::-1].index("write")
    return events[last_write + 1:].count("fsync") >= 1 and \
        events[-1] == "fsync"


@pytest.fixture
def recorded(tmp_path):
    if not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"):
        unavailable("/dev/fuse or fusermount3 missing")
    r = Recorded(str(tmp_path / "fsyncfs"))
    try:
        yield r
    finally:
        r.close()
        assert process_gone(r.proc.pid)


@pytest.fixture
def shim(tmp_path, recorded):
    """shimfs with its backing directory on fsyncfs (writeback_interval=0:
    no background write-back in the middle of a test)."""
    with shim_mount(str(tmp_path / "mnt"), recorded.mnt, "writeback_interval=0") as m:
        yield m


def _dirty(path: str) -> int:
    import json
    return json.loads(os.getxattr(path, XATTR_STATS))["file"]["dirty_bytes"]


SIZE = 3 * 4096 + 5


def _mapped_write(path: str, data: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, len(data)) as m:
            m[:] = data
            if sync:
                m.flush()               # msync(MS_SYNC)
    finally:
        os.close(fd)


def _make(shim: str, name: str) -> str:
    path = os.path.join(shim, name)
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


# Each way to ask for durability, after dirty data reached the daemon by a
# mapped write or a plain write.
def _via_msync(shim, path, data):
    _mapped_write(path, data)


def _via_fsync(shim, path, data):
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _via_cli(shim, path, data):
    _mapped_write(path, data, sync=False)      # dirty in the daemon, no msync
    shimfs_cmd("sync", path)


def _via_xattr(shim, path, data):
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.setxattr(path, XATTR_SYNC, b"")
    finally:
        os.close(fd)


def _via_root_xattr(shim, path, data):
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.setxattr(shim, XATTR_SYNC, b"")     # every file of the mount
    finally:
        os.close(fd)


WAYS = {"msync": _via_msync, "fsync": _via_fsync, "shimfs sync": _via_cli,
        "sync xattr": _via_xattr, "sync xattr of the mount": _via_root_xattr}


@pytest.mark.parametrize("way", list(WAYS))
def test_every_sync_fsyncs_the_backing_file_before_it_returns(shim, recorded, way):
    path = _make(shim, "f")
    data = os.urandom(SIZE)
    WAYS[way](shim, path, data)
    # Read straight after the call returned: the fsync must be there already.
    events = recorded.events("f")
    assert synced_after_last_write(events), events
    assert read_file(os.path.join(recorded.source, "f")) == data


def test_a_shadow_is_fsynced_too(shim, recorded):
    target = os.path.join(recorded.mnt, "target")
    with open(target, "wb") as f:
        f.write(bytes(SIZE))
    os.symlink(target, os.path.join(shim, "s"))
    data = os.urandom(SIZE)
    _mapped_write(os.path.join(shim, "s"), data)
    assert synced_after_last_write(recorded.events("target"))
    assert read_file(os.path.join(recorded.source, "target")) == data


def test_failed_fsync_reaches_the_caller_and_a_retry_makes_it_durable(shim, recorded):
    path = _make(shim, "f")
    data = os.urandom(SIZE)
    open(recorded.flag, "w").close()             # the backing store's fsync now fails
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, SIZE) as m:
            m[:] = data
            with pytest.raises(OSError) as e:
                m.flush()
            assert e.value.errno == errno.EIO
            res = shimfs_cmd("sync", path, check=False)
            assert res.returncode == 1 and "Input/output error" in res.stderr
            with pytest.raises(OSError) as e:
                os.setxattr(path, XATTR_SYNC, b"")
            assert e.value.errno == errno.EIO
            events = recorded.events("f")
            assert events[-1] == "fsync-failed" and "fsync" not in events
            os.unlink(recorded.flag)             # the fault clears
            m.flush()                            # the retry succeeds
        assert synced_after_last_write(recorded.events("f"))
        assert _dirty(path) == 0
    finally:
        os.close(fd)
    assert read_file(os.path.join(recorded.source, "f")) == data


def test_close_writes_back_without_claiming_durability(shim, recorded):
    """close() writes dirty data back, and only a sync makes it durable."""
    path = _make(shim, "f")
    data = os.urandom(SIZE)
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, data, 0)
    os.close(fd)
    events = recorded.events("f")
    assert "write" in events and read_file(os.path.join(recorded.source, "f")) == data
    os.setxattr(path, XATTR_SYNC, b"")
    assert synced_after_last_write(recorded.events("f"))
