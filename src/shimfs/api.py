"""The Python API: control a mount through its xattrs (any language can too).

* ``sync(path)``: write the file's (or, for the mount root, every file's)
  dirty pages back and fsync them, like msync(MS_SYNC).
* ``stats(path)``: the cache counters of a file and its mount, as a dict.
* ``refresh(path, offset=0, length=None)``: the reverse msync; reload a byte
  range (default: the whole file) from the backing file into the daemon's
  cache and every mapping of the file.
* ``prefetch(path, offset=0, length=None)``: read a byte range (default:
  the whole file) with large parallel reads and push it into the kernel's
  page cache, so that later touches of a mapping are minor faults; returns
  once the range is in.
* ``set_multiwrite(path, on)``: byte-granular write-back for one file.

A path that is missing or not in a shimfs mount raises :class:`ShimfsError`;
an operation the daemon refused raises ``OSError`` with its errno.
"""
from __future__ import annotations

import errno
import json
import os

from .errors import ShimfsError
from .names import (FSTYPE, XATTR_MULTIWRITE, XATTR_PREFETCH, XATTR_REFRESH, XATTR_STATS,
                    XATTR_SYNC)


def mount_table():
    """(mount point, file system type) of every mount, in mount order."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            yield fields[1].replace("\\040", " "), fields[2]


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding ``path``."""
    real = os.path.realpath(path)
    best = ("/", "")
    for mnt, fstype in mount_table():
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    return best


def _path(path_or_fd) -> str | int:
    """Check that the target is in a shimfs mount (a stray xattr elsewhere would stick)."""
    if isinstance(path_or_fd, int):
        path = os.readlink("/proc/self/fd/%d" % path_or_fd)
        target: str | int = path_or_fd
    else:
        path = target = os.fspath(path_or_fd)
        if not os.path.exists(path):
            raise ShimfsError("%s does not exist" % path)
    if mount_of(path)[1] != FSTYPE:
        raise ShimfsError("%s is not in a shimfs mount" % (path,))
    return target


def _not_shimfs(path, exc: OSError):
    if exc.errno in (errno.ENOTSUP, errno.ENODATA, errno.EOPNOTSUPP):
        raise ShimfsError("%s is not in a shimfs mount" % (path,)) from None
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


def refresh(path_or_fd, offset: int = 0, length: int | None = None) -> None:
    """Reload [offset, offset+length) (to the end if length is None) from the backing file."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must be non-negative")
    p = _path(path_or_fd)
    try:
        os.setxattr(p, XATTR_REFRESH, _range_value(offset, length))
    except OSError as exc:
        _not_shimfs(path_or_fd, exc)


def _range_value(offset: int, length: int | None) -> bytes:
    return ("" if (offset == 0 and length is None) else (
        str(offset) if length is None else "%d %d" % (offset, length))).encode()


def _checked_range(path_or_fd, offset: int, length: int | None):
    p = _path(path_or_fd)
    if offset < 0 or (length is not None and length < 0):
        raise OSError(errno.EINVAL, "offset and length must be non-negative")
    size = os.fstat(p).st_size if isinstance(p, int) else os.stat(p).st_size
    end = size if length is None else offset + length
    if offset > size or end > size:
        raise OSError(errno.EINVAL, "bytes %d-%d are past the end of %s (%d bytes)"
                      % (offset, end, path_or_fd, size))
    return p, offset, end


def prefetch_range(path_or_fd, offset: int = 0, length: int | None = None) -> tuple[int, int]:
    """The byte range ``prefetch`` would take, as (offset, end); OSError
    (EINVAL) for negative values or a range past the end of the file,
    ShimfsError for a path that is missing or not in a shimfs mount."""
    return _checked_range(path_or_fd, offset, length)[1:]


def prefetch(path_or_fd, offset: int = 0, length: int | None = None) -> None:
    """Read [offset, offset+length) (to the end if length is None) into the
    kernel's page cache, so that touches of a mapping there send no request;
    returns once it is in.  Pages that may be dirty are never overwritten:
    while the file is open for writing, the range goes into the daemon's
    cache only.  The kernel may drop pages again under memory pressure.
    Bad input: see :func:`prefetch_range`."""
    p = _checked_range(path_or_fd, offset, length)[0]
    try:
        os.setxattr(p, XATTR_PREFETCH, _range_value(offset, length))
    except OSError as exc:
        _not_shimfs(path_or_fd, exc)


def set_multiwrite(path_or_fd, on: bool = True) -> None:
    """Turn multiwrite on or off for one file (its dirty pages are written back first)."""
    p = _path(path_or_fd)
    try:
        os.setxattr(p, XATTR_MULTIWRITE, b"1" if on else b"0")
    except OSError as exc:
        _not_shimfs(path_or_fd, exc)
