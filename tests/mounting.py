"""The suite's helpers, in one place: mounting shimfs with a guaranteed
unmount, the daemon's pid and log, files with known bytes, waiting for a
condition with a deadline, and TLS certificates for etcd."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from shimfs.names import XATTR_PID

CI = os.environ.get("CI") == "true"

#: Log files of the daemons mounted during the current test, and whether
#: shim_mount made the file itself; tests/checklogs.py reads them when the
#: test ends.
DAEMON_LOGS: list[tuple[str, bool]] = []


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


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def daemon_pid(mnt: str) -> int:
    return int(os.getxattr(mnt, XATTR_PID))


def wait_until(cond, timeout: float = 30.0, what: str = "the condition",
               interval: float = 0.05):
    """Poll ``cond()`` until it is true (returns its value); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    """True once process ``pid`` has exited, False if it still runs after ``timeout``."""
    try:
        wait_until(lambda: process_gone(pid), timeout, "pid %d to exit" % pid)
    except AssertionError:
        return False
    return True


def make_file(path: str, size: int, seed: int = 0) -> bytes:
    """Write ``size`` bytes that differ by ``seed`` to ``path``; return them."""
    if size > 8192:
        data = os.urandom(size)
    else:
        data = bytes((b + seed) & 0xFF for b in (bytes(range(256)) * (size // 256 + 1))[:size])
    with open(path, "wb") as f:
        f.write(data)
    return data


def mount_stats(mnt: str) -> dict:
    """The mount's counters (``shimfs stat --json``)."""
    return json.loads(shimfs_cmd("stat", "--json", mnt).stdout)["mount"]


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def shim_mount(mnt: str, backing: str, *opts: str, log: str | None = None):
    """Mount shimfs on ``mnt`` with the CLI; always unmount afterwards.

    The daemon always logs to a file (``log``, or a new one), which the
    checklogs plugin reads when the test ends."""
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        unavailable("/dev/fuse or fusermount3 missing")
    os.makedirs(mnt, exist_ok=True)
    own = log is None
    if own:
        fd, log = tempfile.mkstemp(prefix="shimfs-", suffix=".log")
        os.close(fd)
    DAEMON_LOGS.append((log, own))
    options = ["backing=" + backing] + list(opts) + ["log=" + log]
    shimfs_cmd("mount", "-o", ",".join(options), mnt)
    pid = None
    try:
        pid = daemon_pid(mnt)
        yield mnt
    finally:
        if is_mounted(mnt):
            res = shimfs_cmd("umount", mnt, check=False)
            if res.returncode:
                subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        if pid and not wait_gone(pid, 10.0):
            os.kill(pid, 9)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (Python's os has posix_fallocate only)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: str) -> dict:
    """A CA, a certificate for the server (and etcdctl) and one for a node
    signed by it, and a node certificate from another CA."""
    ext = os.path.join(d, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=" + ca, "-keyout", ca + ".key", "-out", ca + ".pem", cwd=d)
    for name, ca in (("server", "ca"), ("node", "ca"), ("rogue", "rogue-ca")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + name,
                 "-keyout", name + ".key", "-out", name + ".csr", cwd=d)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
                 "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", name + ".pem", cwd=d)
    return {n: (os.path.join(d, n + ".pem"), os.path.join(d, n + ".key"))
            for n in ("ca", "rogue-ca", "server", "node", "rogue")}


@contextlib.contextmanager
def small_tmpfs(path, size="1m"):
    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def fill(directory):
    """Fill a file system; return the filler's path."""
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler
