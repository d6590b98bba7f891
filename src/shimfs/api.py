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


def _path(path_or_fd) -> str | int:
    if isinstance(path_or_fd, int):
        return path_or_fd
    path = os.fspath(path_or_fd)
    if not os.path.exists(path):
        raise UserError("%s does not exist" % path)
    return path


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
