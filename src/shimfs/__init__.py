"""shimfs: read/write mmap for files on file systems that cannot map them.

A FUSE file system (pyfuse3 + trio) over the :mod:`shimcore` page-cache engine.
The Python API: :func:`sync`, :func:`refresh`, :func:`prefetch`,
:func:`set_multiwrite` and :func:`stats`; the command line: ``shimfs``.
"""
from .api import prefetch, refresh, set_multiwrite, stats, sync
from .errors import ShimfsError

from .names import VERSION as __version__
__all__ = ["ShimfsError", "prefetch", "refresh", "set_multiwrite", "stats", "sync", "__version__"]
