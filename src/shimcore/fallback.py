"""Pure-Python page cache with the same API as :mod:`shimcore._engine`.

It is the executable specification of the engine and the oracle that the
differential tests compare the compiled engine against.  It is correct but
slow: one ``os.preadv``/``os.pwritev`` per run, one ``threading.Lock`` held
across everything, I/O included.
"""
from __future__ import annotations

import errno
import os
import struct
import threading
from collections import OrderedDict

PAGE = 4096
MAX_RUN = 1024
#: Known-zero pages are tracked below this page index only (the engine's bitmap bound).
ZERO_MAX_PAGES = 1 << 24


class EngineError(OSError):
    """An OSError raised by the engine; ``errno`` says what failed."""


def fs_magic(fd: int) -> int:
    """The type of the file system holding open file ``fd`` (statfs ``f_type``)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)        # struct statfs; f_type comes first
    if libc.fstatfs(fd, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return struct.unpack_from("=Q" if ctypes.sizeof(ctypes.c_long) == 8 else "=I",
                              buf.raw)[0] & 0xFFFFFFFF


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) of open file ``fd``; raises OSError."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _Ranges:
    """Disjoint sorted half-open page ranges: the pages known to be zeros."""
    __slots__ = ("spans",)

    def __init__(self):
        self.spans: list[tuple[int, int]] = []

    def add(self, a: int, b: int) -> None:
        b = min(b, ZERO_MAX_PAGES)
        if a >= b:
            return
        keep = []
        for x, y in self.spans:
            if y < a or x > b:
                keep.append((x, y))
            else:
                a, b = min(a, x), max(b, y)
        keep.append((a, b))
        self.spans = sorted(keep)

    def remove(self, a: int, b: int | None = None) -> None:
        keep = []
        for x, y in self.spans:
            if b is not None and x >= b or y <= a:
                keep.append((x, y))
                continue
            if x < a:
                keep.append((x, a))
            if b is not None and y > b:
                keep.append((b, y))
        self.spans = keep

    def __contains__(self, p: int) -> bool:
        return any(x <= p < y for x, y in self.spans)

    def pages(self) -> int:
        return sum(y - x for x, y in self.spans)


class _File:
    __slots__ = ("fd", "size", "dirty", "counters", "multiwrite", "twins", "zeros")

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self.dirty: set[int] = set()
        self.multiwrite = False
        self.twins: dict[int, bytes] = {}
        # pages this node extended the file over and nobody wrote since (the
        # engine's FileRec.zero): a miss there is zeros, no backing read
        self.zeros = _Ranges()
        self.counters = dict(hits=0, misses=0, bytes_fetched=0, bytes_written=0,
                             backing_reads=0, backing_writes=0, errors=0,
                             bytes_pushed=0, pushes=0, zero_fills=0, zero_fill_bytes=0,
                             read_arounds_refused=0)


class PageCache:
    """A bounded LRU cache of 4 KiB pages of many backing files."""

    def __init__(self, cache_size: int):
        self._lock = threading.RLock()
        self._nslots = max(cache_size // PAGE, 16)
        self._pages: OrderedDict[tuple[int, int], bytearray] = OrderedDict()
        self._files: dict[int, _File] = {}
        self._next = 0
        self._evictions = 0
        # pages whose bytes the kernel has (served, or written back), oldest
        # first: evicted before any other (the engine's spent queue)
        self._spent: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._spent_evictions = 0
        self._lost: list[tuple[int, int]] = []
        self._pf_max = 0
        self._pf_pool = None
        self._pf = dict(pending=0, done=0, errors=0, refused=0)
        self._pf_files: dict[int, int] = {}     # queued or running prefetches per file
        self._zero = dict(zero_fills=0, zero_fill_bytes=0)
        self._zero_call = False     # the current call has filled a page with zeros

    # -- files -------------------------------------------------------------
    def _file(self, fid: int) -> _File:
        try:
            return self._files[fid]
        except KeyError:
            raise KeyError("no such file id %d" % fid) from None

    def register(self, fd: int, size: int) -> int:
        with self._lock:
            fid = 0
            while fid in self._files:
                fid += 1
            self._files[fid] = _File(fd, size)
            return fid

    def unregister(self, fid: int) -> None:
        with self._lock:
            self._file(fid)
            for key in [k for k in self._pages if k[0] == fid]:
                self._forget(key)
            del self._files[fid]

    def size(self, fid: int) -> int:
        return self._file(fid).size

    def set_size(self, fid: int, size: int) -> None:
        with self._lock:
            f = self._file(fid)
            f.zeros.remove(-(-min(size, f.size) // PAGE))
            f.size = size

    def dirty_bytes(self, fid: int) -> int:
        return len(self._file(fid).dirty) * PAGE

    def clean_bytes(self) -> int:
        with self._lock:
            return (self._nslots - sum(len(f.dirty) for f in self._files.values())) * PAGE

    # -- pages -------------------------------------------------------------
    def _load(self, f: _File, page: int) -> bytearray:
        try:
            data = os.pread(f.fd, PAGE, page * PAGE)
        except OSError as e:
            f.counters["errors"] += 1
            raise EngineError(e.errno, "backing read failed") from None
        f.counters["backing_reads"] += 1
        f.counters["bytes_fetched"] += PAGE
        return bytearray(data.ljust(PAGE, b"\0"))

    def _fill(self, f: _File, page: int) -> bytearray:
        """A missing page's bytes: zeros if known to be zeros, else read."""
        if page in f.zeros:
            f.counters["zero_fill_bytes"] += PAGE
            self._zero["zero_fill_bytes"] += PAGE
            if not self._zero_call:
                self._zero_call = True
                f.counters["zero_fills"] += 1
                self._zero["zero_fills"] += 1
            return bytearray(PAGE)
        return self._load(f, page)

    def _room(self) -> bool:
        """Evict the oldest spent page, else the least recently used clean
        page; False if all are dirty."""
        while self._spent:
            key = next(iter(self._spent))
            del self._spent[key]
            if key in self._pages and key[1] not in self._files[key[0]].dirty:
                self._forget(key)
                self._files[key[0]].twins.pop(key[1], None)
                self._evictions += 1
                self._spent_evictions += 1
                return True
        for key in self._pages:
            if key[1] not in self._files[key[0]].dirty:
                self._forget(key)
                if self._files[key[0]].multiwrite:
                    self._lost.append(key)
                self._files[key[0]].twins.pop(key[1], None)
                self._evictions += 1
                return True
        return False

    def _page(self, fid: int, page: int, fill: bool, must_cache: bool):
        f = self._files[fid]
        key = (fid, page)
        buf = self._pages.get(key)
        if buf is not None:
            self._pages.move_to_end(key)
            f.counters["hits"] += 1
            return buf
        f.counters["misses"] += 1
        if len(self._pages) >= self._nslots and not self._room():
            if must_cache:
                return None
            return self._fill(f, page) if fill else bytearray(PAGE)
        buf = self._fill(f, page) if (fill or f.multiwrite) else bytearray(PAGE)
        if f.multiwrite:
            f.twins[page] = bytes(buf)
        self._pages[key] = buf
        self._spent.pop(key, None)
        return buf

    def _forget(self, key: tuple[int, int]) -> None:
        """Take a page out of the cache (and out of the spent queue)."""
        del self._pages[key]
        self._spent.pop(key, None)

    def _spend(self, fid: int, page: int) -> None:
        """The kernel has this page's bytes: queue it to be evicted first
        (multiwrite pages stay in LRU order, as in the engine)."""
        key = (fid, page)
        if key in self._pages and not self._files[fid].multiwrite:
            self._spent.setdefault(key)

    def read(self, fid: int, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        with self._lock:
            f = self._file(fid)
            end = min(offset + size, f.size)
            if end <= offset:
                return b""
            self._zero_call = False
            out = bytearray()
            for p in range(offset // PAGE, (end + PAGE - 1) // PAGE):
                if (fid, p) not in self._pages and p in f.zeros:
                    buf = self._fill(f, p)          # zeros, not cached
                else:
                    buf = self._page(fid, p, True, False)
                a, b = max(offset, p * PAGE), min(end, (p + 1) * PAGE)
                out += buf[a - p * PAGE:b - p * PAGE]
                if b - a == PAGE:
                    self._spend(fid, p)
            return bytes(out)

    def read_cached(self, fid: int, offset: int, size: int):
        with self._lock:
            f = self._file(fid)
            end = min(offset + size, f.size)
            if all((fid, p) in self._pages or p in f.zeros
                   for p in range(offset // PAGE, (end + PAGE - 1) // PAGE)):
                return self.read(fid, offset, size)
            return None

    def set_prefetchers(self, n: int) -> None:
        if n < 0:
            raise ValueError("negative thread count")
        self._pf_max = n

    def prefetch_async(self, fid: int, offset: int, size: int) -> bool:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        with self._lock:
            f = self._file(fid)
            if not self._pf_max:
                self._pf["refused"] += 1
                return False
            if self._pf_pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pf_pool = ThreadPoolExecutor(self._pf_max, "shimcore-prefetch")
            self._pf["pending"] += 1
            self._pf_files[fid] = self._pf_files.get(fid, 0) + 1

        def work():
            ok = True
            try:
                if self._files.get(fid) is f:       # not unregistered meanwhile
                    self.prefetch(fid, offset, size)
            except (OSError, KeyError):
                ok = False
            with self._lock:
                self._pf["pending"] -= 1
                self._pf_files[fid] -= 1
                if not self._pf_files[fid]:
                    del self._pf_files[fid]
                self._pf["done"] += 1
                self._pf["errors"] += not ok
        self._pf_pool.submit(work)
        return True

    def prefetch(self, fid: int, offset: int, size: int) -> int:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        with self._lock:
            f = self._file(fid)
            end = min(offset + size, f.size)
            if offset < 0 or end <= offset:
                return 0
            self._zero_call = False
            before = f.counters["bytes_fetched"]
            for p in range(offset // PAGE, (end + PAGE - 1) // PAGE):
                if (fid, p) not in self._pages and p not in f.zeros:
                    self._page(fid, p, True, False)
            fetched = f.counters["bytes_fetched"] - before
            return fetched

    def _prefix(self, fid: int, offset: int, size: int) -> tuple[int, int]:
        """The cached prefix [offset, end) of a range, as the engine's lend()."""
        if offset % PAGE:
            raise ValueError("offset must be page aligned")
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        f = self._file(fid)
        end = min(offset + size, f.size, offset + MAX_RUN * PAGE)
        p = offset // PAGE
        while p * PAGE < end and (fid, p) in self._pages:
            self._pages.move_to_end((fid, p))
            p += 1
        return offset, max(offset, min(end, p * PAGE))

    def cached_prefix(self, fid: int, offset: int, size: int) -> bytes:
        with self._lock:
            a, b = self._prefix(fid, offset, size)
            return b"".join(bytes(self._pages[(fid, p)][:min(PAGE, b - p * PAGE)])
                            for p in range(a // PAGE, (b + PAGE - 1) // PAGE))

    def delivered(self, fid: int, offset: int, length: int) -> None:
        with self._lock:
            a, b = self._prefix(fid, offset, length)
            for p in range(a // PAGE, (b + PAGE - 1) // PAGE):
                if min(b, (p + 1) * PAGE) - p * PAGE == PAGE:
                    self._spend(fid, p)
            if b > a:
                f = self._files[fid]
                f.counters["bytes_pushed"] += b - a
                f.counters["pushes"] += 1

    def write(self, fid: int, offset: int, data) -> int:
        if offset < 0:
            raise ValueError("negative offset")
        data = memoryview(data).cast("B")
        if not len(data):
            return 0
        with self._lock:
            f = self._file(fid)
            end = offset + len(data)
            self._zero_call = False
            if end > f.size:
                # the pages wholly past the old end are zeros in the backing file
                f.zeros.add(-(-f.size // PAGE), -(-end // PAGE))
            f.size = max(f.size, end)   # before any write-back below clamps to it
            for p in range(offset // PAGE, (end + PAGE - 1) // PAGE):
                a, b = max(offset, p * PAGE), min(end, (p + 1) * PAGE)
                whole = a == p * PAGE and b == (p + 1) * PAGE
                while True:
                    buf = self._page(fid, p, not whole, True)
                    if buf is not None:
                        break
                    victim = next((i for i, g in self._files.items() if g.dirty), None)
                    if victim is None:
                        raise EngineError(errno.EBUSY, "page cache too small for this write")
                    self.writeback(victim)
                buf[a - p * PAGE:b - p * PAGE] = data[a - offset:b - offset]
                f.dirty.add(p)
                f.zeros.remove(p, p + 1)
            f.counters["bytes_written"] += len(data)
            return len(data)

    def write_cached(self, fid: int, offset: int, data):
        if offset < 0:
            raise ValueError("negative offset")
        n = len(memoryview(data).cast("B"))
        with self._lock:
            f = self._file(fid)
            end = offset + n
            if not n or end > f.size:
                return None
            pages = range(offset // PAGE, (end + PAGE - 1) // PAGE)
            missing = [p for p in pages if (fid, p) not in self._pages]
            # a page written whole needs no old bytes, only a free or clean slot
            if missing and (f.multiwrite or any(p * PAGE < offset or (p + 1) * PAGE > end
                                                for p in missing)):
                return None
            clean = sum(1 for k in self._pages
                        if k[1] not in self._files[k[0]].dirty and not (k[0] == fid and k[1] in pages))
            if len(missing) > self._nslots - len(self._pages) + clean:
                return None
            return self.write(fid, offset, data)

    def writeback(self, fid: int) -> int:
        with self._lock:
            f = self._file(fid)
            if f.multiwrite:
                return self._writeback_changed(fid, f)
            f.dirty = {p for p in f.dirty if p * PAGE < f.size}
            pages = sorted(f.dirty)
            written = 0
            i = 0
            while i < len(pages):
                j = i + 1
                while j < len(pages) and pages[j] == pages[j - 1] + 1 and j - i < MAX_RUN:
                    j += 1
                run = pages[i:j]
                data = b"".join(bytes(self._pages[(fid, p)]) for p in run)
                data = data[:f.size - run[0] * PAGE]
                try:
                    done = 0
                    while done < len(data):
                        done += os.pwrite(f.fd, data[done:], run[0] * PAGE + done)
                except OSError as e:
                    f.counters["errors"] += 1
                    raise EngineError(e.errno, "backing write failed") from None
                f.counters["backing_writes"] += 1
                f.dirty.difference_update(run)
                for p in run:
                    self._spend(fid, p)
                written += len(data)
                i = j
            return written

    def _writeback_changed(self, fid: int, f: _File) -> int:
        """Multiwrite: write only the byte runs that differ from the twin."""
        written = 0
        for p in sorted(f.dirty):
            if p * PAGE >= f.size:
                f.dirty.discard(p)
                continue
            page = bytes(self._pages[(fid, p)][:min(PAGE, f.size - p * PAGE)])
            twin = f.twins[p]
            i = 0
            while i < len(page):
                if page[i] == twin[i]:
                    i += 1
                    continue
                j = i + 1
                k = j
                while k < len(page) and k - j < 32:
                    if page[k] != twin[k]:
                        j = k + 1
                    k += 1
                try:
                    os.pwrite(f.fd, page[i:j], p * PAGE + i)
                except OSError as e:
                    f.counters["errors"] += 1
                    raise EngineError(e.errno, "backing write failed") from None
                f.counters["backing_writes"] += 1
                written += j - i
                i = j
            f.twins[p] = page + twin[len(page):]
            f.dirty.discard(p)
        if os.fstat(f.fd).st_size < f.size:
            os.ftruncate(f.fd, f.size)
        return written

    def take_lost_twins(self) -> list:
        with self._lock:
            out, self._lost = self._lost, []
            return out

    def set_multiwrite(self, fid: int, on: bool) -> None:
        with self._lock:
            f = self._file(fid)
            if f.dirty:
                raise EngineError(errno.EBUSY, "write back dirty pages before switching multiwrite")
            if f.multiwrite != bool(on):
                for key in [k for k in self._pages if k[0] == fid]:
                    self._forget(key)
                f.twins.clear()
                f.multiwrite = bool(on)

    def refresh(self, fid: int, offset: int, length: int) -> int:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self._lock:
            f = self._file(fid)
            reloaded = 0
            f.zeros.remove(offset // PAGE, (offset + length + PAGE - 1) // PAGE)
            for p in range(offset // PAGE, (offset + length + PAGE - 1) // PAGE):
                try:
                    fresh = os.pread(f.fd, PAGE, p * PAGE).ljust(PAGE, b"\0")
                except OSError as e:
                    raise EngineError(e.errno, "backing read failed") from None
                f.counters["bytes_fetched"] += PAGE
                key = (fid, p)
                buf = self._pages.get(key)
                if buf is None:
                    if len(self._pages) >= self._nslots and not self._room():
                        continue
                    buf = self._pages[key] = bytearray(fresh)
                    self._spent.pop(key, None)
                elif p not in f.dirty:
                    buf[:] = fresh
                elif f.multiwrite:
                    twin = f.twins[p]
                    for k in range(PAGE):
                        if buf[k] == twin[k]:
                            buf[k] = fresh[k]
                if f.multiwrite:
                    f.twins[p] = fresh
                reloaded += 1
            return reloaded

    def truncate(self, fid: int, size: int, zeros_from: int = -1) -> None:
        with self._lock:
            f = self._file(fid)
            last = (size + PAGE - 1) // PAGE
            f.zeros.remove(last)
            zp = -(-zeros_from // PAGE) if 0 <= zeros_from <= size else None
            if zp is not None:
                f.zeros.add(zp, last)
            for key in [k for k in self._pages if k[0] == fid and k[1] >= last]:
                self._forget(key)
                f.dirty.discard(key[1])
                f.twins.pop(key[1], None)
            if zp is not None:
                for key in [k for k in self._pages if k[0] == fid and zp <= k[1] < last]:
                    if key[1] in f.dirty:
                        f.zeros.remove(key[1], key[1] + 1)
                    else:
                        self._forget(key)
                        f.twins.pop(key[1], None)
            tail = size % PAGE
            buf = self._pages.get((fid, size // PAGE))
            if tail and buf is not None:
                buf[tail:] = bytes(PAGE - tail)
            f.size = size

    def punch(self, fid: int, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self._lock:
            f = self._file(fid)
            end = min(offset + length, f.size)
            if end <= offset:
                return
            f0, f1 = -(-offset // PAGE), end // PAGE
            if end == f.size:
                f1 = -(-end // PAGE)
            for key in [k for k in self._pages if k[0] == fid]:
                pg = key[1]
                if f0 <= pg < f1:
                    self._forget(key)
                    f.dirty.discard(pg)
                    f.twins.pop(pg, None)
                elif pg * PAGE < end and (pg + 1) * PAGE > offset:
                    a, b = max(offset, pg * PAGE) - pg * PAGE, min(end, (pg + 1) * PAGE) - pg * PAGE
                    self._pages[key][a:b] = bytes(b - a)
                    twin = f.twins.get(pg)
                    if twin is not None:
                        f.twins[pg] = twin[:a] + bytes(b - a) + twin[b:]
            if f1 > f0:
                f.zeros.add(f0, f1)

    def invalidate(self, fid: int, offset: int, length: int) -> int:
        with self._lock:
            f = self._file(fid)
            p0, p1 = offset // PAGE, (offset + length + PAGE - 1) // PAGE
            f.zeros.remove(p0, p1)
            keys = [k for k in self._pages
                    if k[0] == fid and p0 <= k[1] < p1 and k[1] not in f.dirty]
            for key in keys:
                self._forget(key)
                f.twins.pop(key[1], None)
            return len(keys)

    # -- introspection -----------------------------------------------------
    def file_stats(self, fid: int) -> dict:
        with self._lock:
            f = self._file(fid)
            cached = sum(1 for k in self._pages if k[0] == fid)
            return dict(size=f.size, cached_bytes=cached * PAGE, dirty_bytes=len(f.dirty) * PAGE,
                        multiwrite=f.multiwrite, twin_bytes=cached * PAGE if f.multiwrite else 0,
                        known_zero_bytes=f.zeros.pages() * PAGE,
                        prefetch_pending=self._pf_files.get(fid, 0), **f.counters)

    def read_arounds_refused(self, fid: int) -> int:
        """Always 0 here: no front end refuses read-arounds of this engine."""
        with self._lock:
            return self._file(fid).counters["read_arounds_refused"]

    def stats(self) -> dict:
        return dict(capacity_bytes=self._nslots * PAGE, used_bytes=len(self._pages) * PAGE,
                    evictions=self._evictions, spent_evictions=self._spent_evictions, wait_spins=0, twins_lost=len(self._lost),
                    twins_lost_overflow=0, page_size=PAGE,
                    prefetch_threads=self._pf_max if self._pf_pool else 0,
                    prefetch_queued=0, prefetch_pending=self._pf["pending"],
                    prefetches_done=self._pf["done"], prefetch_errors=self._pf["errors"],
                    prefetches_refused=self._pf["refused"], **self._zero)

    def check(self) -> None:
        with self._lock:
            assert len(self._pages) <= self._nslots
            for fid, f in self._files.items():
                for p in f.dirty:
                    assert (fid, p) in self._pages, "dirty page %d of %d not cached" % (p, fid)
