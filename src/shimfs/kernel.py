"""What the VFS may ask of the kernel's page cache, as an interface.

The VFS core never talks to ``/dev/fuse`` itself: the adapter that mounts it
supplies an object with these methods (:class:`shimfs._notify.SessionKernel`
for a real mount), and in-process use gets :class:`NullKernel`, a kernel that
caches nothing.  So ``import shimfs.vfs`` needs no FUSE binding.  Likewise the
compiled READ path (:class:`Wire`): a real mount supplies
:class:`shimfs._wire.Wire`, anything else :class:`NullWire`.

Every method but ``live`` blocks until the kernel is done, and
``inval_range`` makes the kernel call back into the daemon (it writes dirty
pages back with synchronous WRITEs): call them from worker threads only.
"""
from __future__ import annotations

from typing import Any, Protocol


class Kernel(Protocol):
    #: True if notifications reach a kernel (pushing makes sense).
    live: bool

    def inval_range(self, ino: int, off: int, length: int) -> None:
        """Write back and drop the kernel's pages of [off, off+length) of
        inode ``ino`` (length 0: to the end); off < 0: attributes only."""

    def store(self, ino: int, off: int, data: Any) -> None:
        """Copy ``data`` into the kernel's cache of ``ino`` at ``off``."""

    def push(self, engine: Any, fid: int, ino: int, off: int, length: int) -> int:
        """Copy the engine's cached prefix of [off, off+length) of file
        ``fid`` into the kernel's cache of ``ino``; return its bytes."""


class Wire(Protocol):
    """The compiled reader in front of pyfuse3 (:class:`shimfs._wire.Wire`):
    it answers READs of registered handles whose pages the engine holds."""

    def add(self, fh: int, fid: int, own_misses: bool = False, writes: bool = False,
            release: bool = False, asked: bool = False) -> None:
        """Answer READs of handle ``fh`` (of engine file ``fid``) from the
        cache, and its random misses with compiled workers (all its misses:
        ``own_misses``, for a handle with no read-ahead policy); with
        ``writes``, take its WRITEs that need no I/O too; with ``release``,
        answer its RELEASE while the file is clean (:meth:`take_released`);
        with ``asked``, never refuse its READs as read-arounds."""

    def take_released(self) -> list[int]:
        """The handles whose RELEASE was answered since the last call."""

    def remove(self, fh: int) -> bool:
        """Stop; once this returns, no reply of ``fh`` is being written.
        True if WRITEs were taken since the last :meth:`written`."""

    def written(self, fh: int) -> bool:
        """Whether WRITEs of ``fh`` were taken since the last call."""

    def set_trigger(self, fh: int, offset: int) -> None:
        """READs of ``fh`` ending past ``offset`` go to Python (negative: none)."""

    def clear(self) -> None:
        """Forget every handle (the session is ending)."""

    def expect(self, nodeid: int, path: bytes, directory: bool = False) -> None:
        """``nodeid`` is an unopened file at backing ``path`` (an OPEN of it
        has the file opened, as the requester, by the thread that reads the
        request), or a directory at ``path`` (a LOOKUP in it has the name
        lstat'ed there); see :meth:`take_ahead`."""

    def unexpect(self, nodeid: int) -> int:
        """``nodeid`` is opened or gone: nothing more is done ahead of it.
        Returns the LOOKUPs of it answered by the wire and not yet taken
        (:meth:`take_lookups`): references the kernel holds."""

    def enter(self, nodeid: int, parent: int, name: bytes, ident: tuple, seen: tuple,
              attr: tuple, blksize: int) -> bool:
        """The expected file ``nodeid`` is ``name`` in directory ``parent``:
        a LOOKUP of it may be answered with ``attr`` (nodes.Attr's fields)
        by the wire, after an lstat of its backing path as the requester
        shows ``ident`` (st_dev, st_ino) and ``seen`` (size, mtime_ns).
        False if ``nodeid`` is not expected."""

    def take_lookups(self, nodeid: int) -> int:
        """The LOOKUPs of ``nodeid`` the wire answered since the last call:
        references the kernel holds, which its FORGETs count."""

    def take_ahead(self, kind: int, nodeid: int, uid: int, gid: int, pid: int
                   ) -> tuple | None:
        """What was done ahead of this requester's OPEN (``kind`` AHEAD_OPEN)
        of ``nodeid`` or LOOKUP (AHEAD_LOOKUP) in it: None, or (path, fd,
        writable, errno, stat fields or None); the caller owns ``fd`` (-1:
        none, or the call failed with ``errno``)."""

    def counters(self) -> dict:
        """``fast_reads``, ``fast_read_bytes``, ``forwarded_requests``,
        ``fast_read_misses``, ``fast_read_miss_fallbacks``,
        ``fast_read_passed_missing``, ``fast_reads_noted``, ``read_notes_dropped``,
        ``forward_errors``, ``reply_errors``, ``fast_getxattrs``,
        ``fast_flushes``, ``fast_releases``, ``fast_writes``, ``fast_write_bytes``,
        ``read_arounds_refused``, ``read_around_bytes_refused``,
        ``reader_handles``, ``refused_range_loads``, ``refused_centre_loads``,
        ``opens_ahead``, ``stats_ahead``, ``ahead_dropped``, ``fast_lookups``."""


#: Wire.take_ahead: what the wire did ahead of an OPEN, or of a LOOKUP.
AHEAD_OPEN, AHEAD_LOOKUP = 1, 2


class NullWire:
    """No compiled reader: every READ reaches Python."""

    def add(self, fh: int, fid: int, own_misses: bool = False, writes: bool = False,
            release: bool = False, asked: bool = False) -> None:
        pass

    def take_released(self) -> list[int]:
        return []

    def remove(self, fh: int) -> bool:
        return False

    def written(self, fh: int) -> bool:
        return False

    def set_trigger(self, fh: int, offset: int) -> None:
        pass

    def clear(self) -> None:
        pass

    def expect(self, nodeid: int, path: bytes, directory: bool = False) -> None:
        pass

    def unexpect(self, nodeid: int) -> int:
        return 0

    def enter(self, nodeid: int, parent: int, name: bytes, ident: tuple, seen: tuple,
              attr: tuple, blksize: int) -> bool:
        return False

    def take_lookups(self, nodeid: int) -> int:
        return 0

    def take_ahead(self, kind: int, nodeid: int, uid: int, gid: int, pid: int) -> None:
        return None

    def counters(self) -> dict:
        return dict(fast_reads=0, fast_read_bytes=0, forwarded_requests=0,
                    fast_read_misses=0, fast_read_miss_fallbacks=0,
                    fast_read_passed_missing=0,
                    fast_reads_noted=0, read_notes_dropped=0, forward_errors=0, reply_errors=0,
                    fast_getxattrs=0, fast_flushes=0, fast_releases=0,
                    fast_writes=0, fast_write_bytes=0, read_arounds_refused=0,
                    read_around_bytes_refused=0, reader_handles=0, refused_range_loads=0,
                    refused_centre_loads=0, opens_ahead=0, stats_ahead=0,
                    ahead_dropped=0, fast_lookups=0)


class NullKernel:
    """No kernel: nothing is cached outside the daemon, so nothing to do."""

    live = False

    def inval_range(self, ino: int, off: int, length: int) -> None:
        pass

    def store(self, ino: int, off: int, data: Any) -> None:
        pass

    def push(self, engine: Any, fid: int, ino: int, off: int, length: int) -> int:
        return 0
