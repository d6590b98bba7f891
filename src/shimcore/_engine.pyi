"""Typed signatures of the compiled page cache (see _engine.pyx for the design;
the C-level API for other compiled modules is in _engine.pxd)."""
from typing import Any, Dict, List, Optional, Tuple

PAGE_SIZE: int

def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) of an open file, without the GIL."""
def fs_magic(fd: int) -> int:
    """The type of the file system holding open file ``fd`` (statfs ``f_type``)."""

class EngineError(OSError):
    """An OSError raised by the engine; ``errno`` says what failed."""

class PageCache:
    """A bounded cache of 4 KiB pages of many backing files; thread-safe, GIL released for I/O."""

    def __init__(self, cache_size: int) -> None: ...
    def register(self, fd: int, size: int) -> int:
        """Start caching backing fd ``fd`` of ``size`` bytes; return the file id."""
    def unregister(self, fid: int) -> None:
        """Forget the file and all its pages, dirty ones included (write back first);
        queued prefetches are cancelled, a running one keeps the record until it ends."""
    def size(self, fid: int) -> int:
        """The size this node believes the file has."""
    def set_size(self, fid: int, size: int) -> None:
        """Record a size someone else gave the file, without touching pages (use
        truncate to shrink); known zeros past the shorter end are forgotten."""
    def dirty_bytes(self, fid: int) -> int:
        """Bytes of dirty pages, in whole pages."""
    def clean_bytes(self) -> int:
        """Bytes of the cache not held by dirty pages, of any file (free or clean slots)."""
    def read(self, fid: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``, fewer only at the cached end of file; misses are preadv'd."""
    def read_cached(self, fid: int, offset: int, size: int) -> Optional[bytes]:
        """Like read, but None unless every page is cached; never does I/O."""
    def set_prefetchers(self, n: int) -> None:
        """Serve prefetch_async with up to n engine threads (started on demand); 0 refuses it."""
    def prefetch_async(self, fid: int, offset: int, size: int) -> bool:
        """Queue a prefetch for the engine's threads (no GIL); False if refused. Errors only counted."""
    def prefetch(self, fid: int, offset: int, size: int) -> int:
        """Load the pages of the range into the cache; return the bytes read from the backing file."""
    def cached_prefix(self, fid: int, offset: int, size: int) -> bytes:
        """A copy of the cached prefix of the range (page-aligned offset, at most 4 MiB,
        clipped to the size); b"" if its first page is not cached. Never does I/O."""
    def delivered(self, fid: int, offset: int, length: int) -> None:
        """The range's cached bytes went into the kernel's page cache (a push): whole
        pages are spent (evicted first) and the bytes count as pushed."""
    def write(self, fid: int, offset: int, data: Any) -> int:
        """Copy a buffer into the cache, mark it dirty, extend the size; return its length.
        Pages wholly past the old size become known zeros (filled, never read)."""
    def write_cached(self, fid: int, offset: int, data: Any) -> Optional[int]:
        """Like write, but None (nothing written) unless every page is cached and the size holds."""
    def writeback(self, fid: int) -> int:
        """pwritev all dirty runs (no fsync); on error keep them dirty and raise OSError."""
    def truncate(self, fid: int, size: int, zeros_from: int = -1) -> None:
        """Set the size, drop pages past it and zero the tail of the last page; with
        zeros_from >= 0 (this node extended the backing file from there), the pages
        wholly past zeros_from become known zeros."""
    def punch(self, fid: int, offset: int, length: int) -> None:
        """The backing range became a hole: whole pages in it are dropped (dirty
        or not) and become known zeros; the edge pages' punched bytes are zeroed."""
    def invalidate(self, fid: int, offset: int, length: int) -> int:
        """Drop clean pages overlapping the range and forget its known zeros;
        return how many pages were dropped."""
    def take_lost_twins(self) -> List[Tuple[int, int]]:
        """Drain (fid, page) of multiwrite pages evicted since the last call; page -1: whole file."""
    def set_multiwrite(self, fid: int, on: bool) -> None:
        """Keep twins and write back changed bytes only (EBUSY while pages are dirty)."""
    def refresh(self, fid: int, offset: int, length: int) -> int:
        """Reload the range from the backing file, keeping local dirty bytes, and forget
        its known zeros; return pages."""
    def file_stats(self, fid: int) -> Dict[str, Any]: ...
    def read_arounds_refused(self, fid: int) -> int:
        """Read-arounds of random faults a front end refused for the file."""
    def stats(self) -> Dict[str, int]: ...
    def check(self) -> None:
        """Assert the internal invariants (tests only)."""
