"""shimcore: the page-cache engine of shimfs, independent of FUSE.

``PageCache`` is the compiled engine (``shimcore._engine``).  Setting the
environment variable ``SHIMCORE_FALLBACK=1`` selects the pure-Python
implementation in :mod:`shimcore.fallback` instead; it has the same API and
serves as the test oracle.
"""
import os

from .fallback import PageCache as FallbackPageCache

if os.environ.get("SHIMCORE_FALLBACK") == "1":
    PageCache = FallbackPageCache
    IMPLEMENTATION = "fallback"
else:
    from ._engine import PageCache  # noqa: F401
    IMPLEMENTATION = "compiled"

PAGE_SIZE = 4096
EngineError = OSError

__all__ = ["PageCache", "FallbackPageCache", "PAGE_SIZE", "IMPLEMENTATION"]
