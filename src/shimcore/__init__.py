"""shimcore: the page-cache engine of shimfs, independent of FUSE.

``PageCache`` is the compiled engine (``shimcore._engine``).  Setting the
environment variable ``SHIMCORE_FALLBACK=1`` selects the pure-Python
implementation in :mod:`shimcore.fallback` instead; it has the same API and
serves as the test oracle.  ``fs_magic(fd)`` tells the type of the file
system holding a backing file (``MEMORY_FS_MAGIC``: the in-memory ones).
"""
import os

from .fallback import PageCache as FallbackPageCache

if os.environ.get("SHIMCORE_FALLBACK") == "1":
    from .fallback import fallocate, fs_magic
    PageCache = FallbackPageCache
    IMPLEMENTATION = "fallback"
else:
    from ._engine import PageCache, fallocate, fs_magic  # noqa: F401
    IMPLEMENTATION = "compiled"

#: statfs f_type of file systems that keep their files in memory (tmpfs,
#: ramfs): reading them never waits for a device or a server.
MEMORY_FS_MAGIC = frozenset({0x01021994, 0x858458F6})

PAGE_SIZE = 4096
EngineError = OSError

__all__ = ["PageCache", "FallbackPageCache", "PAGE_SIZE", "IMPLEMENTATION", "fs_magic", "fallocate",
           "MEMORY_FS_MAGIC"]
