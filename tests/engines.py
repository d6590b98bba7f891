"""Helpers for the engine tests: both implementations, and a cache over a
file of known bytes whose invariants are checked at the end."""
from __future__ import annotations

import contextlib
import os

from shimcore import FallbackPageCache
from shimcore._engine import PageCache as CompiledPageCache

IMPLS = [CompiledPageCache, FallbackPageCache]
IDS = ["compiled", "fallback"]


@contextlib.contextmanager
def cache_over(tmp_path, impl, data: bytes, cache_size: int = 1 << 20):
    """(engine, file id, fd) of a cache of ``cache_size`` bytes over a file
    holding ``data``; ``check()`` runs when the block ends without error."""
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR)
    pc = impl(cache_size)
    fid = pc.register(fd, len(data))
    try:
        yield pc, fid, fd
        pc.check()
    finally:
        pc.unregister(fid)
        os.close(fd)
