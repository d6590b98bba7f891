"""Mounting shimfs for tests and benchmarks: the CLI, with a guaranteed unmount."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest

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
