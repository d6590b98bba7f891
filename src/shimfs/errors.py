"""The one place where shimfs errors become errnos and user-facing messages.

* :class:`FsError` is what the VFS core raises for a failed file-system
  operation; the FUSE adapter turns it into ``pyfuse3.FUSEError``.
* :func:`fs_error` maps any exception met inside an operation to an
  :class:`FsError`: an ``OSError`` keeps its errno (EBADFD, a backing
  descriptor invalidated by a server restart, becomes EIO), anything else is
  a bug and becomes EIO (logged with its traceback).
* :class:`ShimfsError` is what the Python API (:mod:`shimfs.api`) raises
  when a path is not one it can control (missing, or not in a shimfs mount);
  failed operations raise ``OSError`` with the daemon's errno.
* :class:`UserError` is bad input from the command line: the CLI prints its
  message as one line and exits with its code, never with a traceback.
"""
from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)


class FsError(Exception):
    """A file-system operation failed with ``errno``."""

    def __init__(self, err: int, message: str | None = None):
        super().__init__(err, message or os.strerror(err))
        self.errno = err

    def __str__(self) -> str:
        return "%s (%s)" % (self.args[1], errno.errorcode.get(self.errno, self.errno))


class ShimfsError(Exception):
    """The Python API cannot act on a path: it is missing or not in a shimfs mount."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fs_error(exc: BaseException) -> FsError:
    """Translate an exception raised while serving an operation."""
    if isinstance(exc, FsError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.EBADFD:
        # GlusterFS and others invalidate open files when their server goes
        # away; the daemon reopens them once it is back.  Callers see EIO.
        return FsError(errno.EIO, "backing file unreachable (%s)" % exc.strerror)
    if isinstance(exc, OSError) and exc.errno:
        return FsError(exc.errno, exc.strerror)
    log.error("internal error, answering EIO", exc_info=exc)
    return FsError(errno.EIO, "internal error: %r" % (exc,))
