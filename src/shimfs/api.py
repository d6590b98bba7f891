"""The Python API: control a mount through its xattrs (any language can too).

* ``sync(path)``: write the file's (or, for the mount root, every file's)
  dirty pages back and fsync them, like msync(MS_SYNC).
* ``stats(path)``: the cache counters of a file and its mount, as a dict.
"""
from __future__ import annotations

import errno
import json
import os

from .errors import UserError

XATTR_SYNC = "user.shimfs.sync"
XATTR_STATS = "user.shimfs.stats"


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding ``path``."""
    real = os.path.realpath(path)
    best = ("/", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fields[2])
    return best


def _path(path_or_fd) -> str | int:
    """Check that the target is in a shimfs mount (a stray xattr elsewhere would stick)."""
    if isinstance(path_or_fd, int):
        path = os.readlink("/proc/self/fd/%d" % path_or_fd)
        target: str | int = path_or_fd
    else:
        path = target = os.fspath(path_or_fd)
        if not os.path.exists(path):
            raise UserError("%s does not exist" % path)
    if mount_of(path)[1] != "fuse.shimfs":
        raise UserError("%s is not in a shimfs mount" % (path,))
    return target


def _not_shimfs(path, exc: OSError):
    if exc.errno in (errno.ENOTSUP, errno.ENODATA, errno.EOPNOTSUPP):
        raise UserError("%s is not in a shimfs mount" % (path,)) from None
    raise exc


def control_get(path_or_fd, name: str) -> bytes:
    p = _path(path_or_fd)
    try:
        return os.getxattr(p, name)
    except OSError as exc:
        _not_shimfs(path_or_fd, exc)


def sync(path_or_fd) -> None:
    """Write dirty pages back and fsync the backing file (or all files of a mount)."""
    p = _path(path_or_fd)
    try:
        os.setxattr(p, XATTR_SYNC, b"")
    except OSError as exc:
        _not_shimfs(path_or_fd, exc)


def stats(path_or_fd) -> dict:
    """Per-file ("file") and per-mount ("mount") counters."""
    return json.loads(control_get(path_or_fd, XATTR_STATS))
