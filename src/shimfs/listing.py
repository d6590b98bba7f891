"""A backing directory read in chunks ahead of its reader (``-o mirror``).

Listing a directory of a network file system costs about as much as the
reader's own work on it: ``getdents`` over the stand-in gives 10,000 names
in ~1.3 s, and ``ls -l`` then spends about as long on its ``statx`` and
xattr calls.  Natively the two overlap, since ls stats each batch as it
arrives.  A listing taken whole before the first READDIRPLUS reply makes
the reader wait for all of it first.

So one worker thread (with the user's credentials, as every backing access)
reads the directory from start to end, handing over one reply's worth
of entries at a time (``names.READDIR_ENTRIES``); the trio thread takes
what has arrived when a reply needs more.  The names keep the backing
order, so the offsets given to the kernel only ever grow into entries
that are already known.

Threads: the producer touches only the scandir iterator, its own list and
``closed``; it hands chunks over under ``_lock`` and wakes the trio thread
with ``TrioToken.run_sync_soon``.  Everything else runs on the trio thread.
"""
from __future__ import annotations

import os
import stat
import threading

import trio

from .names import READDIR_ENTRIES


class Listing:
    """The regular files and directories of one backing directory, as they
    arrive: ``await next()`` gives the next chunks, ``None`` at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False         # set by the reader: the producer stops at its next chunk
        self._lock = threading.Lock()
        self._ready: list[list[tuple[bytes, os.stat_result]]] = []
        self._done = False
        self._error: BaseException | None = None
        self._event: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    async def start(self, run_as, nursery: trio.Nursery | None) -> None:
        """Begin reading: ``run_as(fn)`` runs ``fn`` in a worker thread with
        the user's credentials.  With a nursery the read goes on in the
        background; without one (the VFS driven by tests) it is read whole
        before this returns."""
        self._token = trio.lowlevel.current_trio_token()
        if nursery is None:
            await self._run(run_as)
        else:
            nursery.start_soon(self._run, run_as)

    async def _run(self, run_as) -> None:
        try:
            await run_as(self._produce)
        except Exception as e:          # given to the reader by next()
            with self._lock:
                self._error = e
        finally:
            with self._lock:
                self._done = True
            self._wake()

    def _produce(self) -> None:
        """In the worker thread: the whole directory, a chunk at a time."""
        chunk: list[tuple[bytes, os.stat_result]] = []
        with os.scandir(os.fsencode(self.path)) as it:
            for entry in it:
                if self.closed:
                    return
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                    chunk.append((entry.name, st))
                    if len(chunk) >= READDIR_ENTRIES:
                        self._hand_over(chunk)
                        chunk = []
        if chunk:
            self._hand_over(chunk)

    def _hand_over(self, chunk) -> None:
        with self._lock:
            self._ready.append(chunk)
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._wake)
            except trio.RunFinishedError:
                self.closed = True

    def _wake(self) -> None:
        """On the trio thread (or at the end of ``_run``)."""
        ev = self._event
        if ev is not None:
            self._event = None
            ev.set()

    async def next(self) -> list[tuple[bytes, os.stat_result]] | None:
        """The entries that arrived since the last call (waiting for at
        least one chunk), or None once the directory has been read whole.
        A failure to read it (EACCES, ENOENT...) is raised here."""
        while True:
            with self._lock:
                if self._ready:
                    out = [e for chunk in self._ready for e in chunk]
                    self._ready.clear()
                    return out
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return None
            self._event = ev = trio.Event()
            await ev.wait()

    def close(self) -> None:
        self.closed = True
