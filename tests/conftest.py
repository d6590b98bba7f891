"""Fixtures: real shimfs mounts over a local directory and the GlusterFS stand-in.

Every mount is torn down in a finally block, even when the test fails.  A
test that cannot run here (no /dev/fuse, not root for gluster) is skipped,
except under CI=true, where a skip would hide a broken machine: it fails.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from shimfs import standin

CI = os.environ.get("CI") == "true"


def unavailable(why: str):
    if CI:
        pytest.fail("cannot run under CI: " + why)
    pytest.skip(why)


def shimfs_cmd(*args, check=True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "shimfs", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=120, **kw)
    if check and res.returncode:
        raise AssertionError("shimfs %s failed (%d): %s%s" % (" ".join(args), res.returncode,
                                                             res.stdout, res.stderr))
    return res


def _is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


@contextlib.contextmanager
def shim_mount(mnt: str, backing: str, *opts: str, log: str | None = None):
    """Mount shimfs on ``mnt`` with the CLI; always unmount afterwards."""
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        unavailable("/dev/fuse or fusermount3 missing")
    os.makedirs(mnt, exist_ok=True)
    options = ["backing=" + backing] + list(opts)
    if log:
        options.append("log=" + log)
    shimfs_cmd("mount", "-o", ",".join(options), mnt)
    pid = None
    try:
        pid = int(os.getxattr(mnt, "user.shimfs.pid"))
        yield mnt
    finally:
        if _is_mounted(mnt):
            res = shimfs_cmd("umount", mnt, check=False)
            if res.returncode:
                subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        if pid:
            for _ in range(200):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, 9)


@pytest.fixture
def backing(tmp_path):
    d = tmp_path / "backing"
    d.mkdir()
    return str(d)


@pytest.fixture
def mnt(tmp_path, backing):
    """A shimfs mount over a local backing directory (cache 32M: eviction happens)."""
    with shim_mount(str(tmp_path / "mnt"), backing, "cache_size=32M",
                    log=str(tmp_path / "shimfs.log")) as m:
        yield m


@pytest.fixture(scope="session")
def gluster():
    """The stand-in's first client mount dir (started once per session)."""
    why = standin.available()
    if why:
        unavailable(why)
    d = standin.up(clients=2)
    try:
        yield d
    finally:
        if os.environ.get("SHIMFS_KEEP_STANDIN") != "1":
            standin.down()


@pytest.fixture(params=["local", "gluster"])
def data_dir(request, tmp_path):
    """Where backing data lives: a local directory, or a fresh dir on the stand-in."""
    if request.param == "local":
        d = tmp_path / "data"
        d.mkdir()
        yield str(d)
        return
    root = request.getfixturevalue("gluster")
    d = os.path.join(root, "t-" + uuid.uuid4().hex[:12])
    os.mkdir(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
