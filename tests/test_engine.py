"""shimcore: the compiled engine and the pure-Python fallback against a model.

Hypothesis drives random sequences of read/write/write_cached/writeback/
truncate/resize/invalidate/prefetch/prefetch_async on both implementations
and a plain bytearray; after each step every read must agree to the byte and
the engine's invariants must hold.  ``resize`` is a truncate as the daemon
does it (no write-back first, growth marks known zeros), so reads of grown
files are answered with zeros that must agree with the backing file's.
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engines import IMPLS, cache_over
from shimcore._engine import PageCache as CompiledPageCache
AWKWARD = [0, 1, 4095, 4096, 4097, (1 << 20) + 1]

offsets = st.one_of(st.sampled_from(AWKWARD), st.integers(0, 300_000))
lengths = st.one_of(st.sampled_from(AWKWARD), st.integers(0, 70_000))
ops = st.lists(st.one_of(
    st.tuples(st.just("read"), offsets, lengths),
    st.tuples(st.just("write"), offsets, st.integers(1, 70_000)),
    st.tuples(st.just("write_cached"), offsets, st.integers(0, 70_000)),
    st.tuples(st.just("writeback"), st.just(0), st.just(0)),
    st.tuples(st.just("truncate"), offsets, st.just(0)),
    st.tuples(st.just("resize"), offsets, st.just(0)),
    st.tuples(st.just("invalidate"), offsets, lengths),
    st.tuples(st.just("prefetch"), offsets, lengths),
    st.tuples(st.just("prefetch_async"), offsets, lengths),
), max_size=40)


def resize(pc, fid, fd, size):
    """A truncate as files.OpenFiles.truncate makes it: growth from the
    larger end is known zeros."""
    before = os.fstat(fd).st_size
    os.ftruncate(fd, size)
    pc.truncate(fid, size, max(before, pc.size(fid)))


class Model:
    def __init__(self, tmp, impl, init: bytes, cache_size: int):
        self.path = os.path.join(tmp, "%s-%d" % (impl.__name__, id(self)))
        with open(self.path, "wb") as f:
            f.write(init)
        self.fd = os.open(self.path, os.O_RDWR)
        self.pc = impl(cache_size)
        self.fid = self.pc.register(self.fd, len(init))
        self.data = bytearray(init)

    def step(self, op, a, b, seed):
        pc, fid = self.pc, self.fid
        if op == "read":
            assert pc.read(fid, a, b) == bytes(self.data[a:a + b])
        elif op == "write":
            chunk = (seed.to_bytes(8, "little") * (b // 8 + 1))[:b]
            assert pc.write(fid, a, chunk) == b
            if a > len(self.data):
                self.data.extend(bytes(a - len(self.data)))
            self.data[a:a + b] = chunk
        elif op == "write_cached":
            chunk = (seed.to_bytes(8, "little") * (b // 8 + 1))[:b]
            n = pc.write_cached(fid, a, chunk)
            if n is not None:           # taken whole, or not at all
                assert n == b and b > 0 and a + b <= len(self.data)
                self.data[a:a + b] = chunk
        elif op == "writeback":
            pc.writeback(fid)
            assert pc.dirty_bytes(fid) == 0
            with open(self.path, "rb") as f:
                assert f.read() == bytes(self.data)
        elif op == "truncate":
            pc.writeback(fid)
            os.ftruncate(self.fd, a)
            pc.truncate(fid, a)
            del self.data[a:]
            self.data.extend(bytes(a - len(self.data)))
        elif op == "resize":
            resize(pc, fid, self.fd, a)
            del self.data[a:]
            self.data.extend(bytes(a - len(self.data)))
        elif op == "invalidate":
            pc.invalidate(fid, a, b)
        elif op == "prefetch":
            pc.prefetch(fid, a, b)
        elif op == "prefetch_async":
            pc.set_prefetchers(2)
            pc.prefetch_async(fid, a, b)
            _wait_prefetches(pc)
        pc.check()
        assert pc.size(fid) == len(self.data)
        assert pc.clean_bytes() == pc.stats()["capacity_bytes"] - pc.dirty_bytes(fid)

    def close(self):
        self.pc.writeback(self.fid)
        with open(self.path, "rb") as f:
            assert f.read() == bytes(self.data)
        self.pc.unregister(self.fid)
        os.close(self.fd)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(init=st.sampled_from(AWKWARD[:5] + [100_000]), cache=st.sampled_from([64 << 10, 1 << 20]),
       seq=ops)
def test_random_sequences_match_model(tmp_path, impl, init, cache, seq):
    m = Model(str(tmp_path), impl, bytes(range(256)) * (init // 256) + bytes(init % 256), cache)
    for i, (op, a, b) in enumerate(seq):
        m.step(op, a, b, i + 1)
    m.close()


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_write_error_keeps_dirty_data_for_retry(tmp_path, impl):
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(b"x" * 10000)
    ro = os.open(path, os.O_RDONLY)
    pc = impl(1 << 20)
    fid = pc.register(ro, 10000)
    pc.write(fid, 5000, b"new")
    with pytest.raises(OSError):
        pc.writeback(fid)              # EBADF: the fd is read-only
    assert pc.dirty_bytes(fid) == 4096
    assert pc.read(fid, 5000, 3) == b"new"
    pc.check()
    pc.unregister(fid)
    os.close(ro)


def test_full_cache_of_dirty_pages_writes_back_to_make_room(tmp_path):
    path = str(tmp_path / "f")
    open(path, "wb").close()
    fd = os.open(path, os.O_RDWR)
    pc = CompiledPageCache(64 << 10)        # 16 slots
    fid = pc.register(fd, 0)
    blob = os.urandom(1 << 20)
    for off in range(0, 1 << 20, 32 << 10):
        pc.write(fid, off, blob[off:off + (32 << 10)])
    pc.check()
    pc.writeback(fid)
    with open(path, "rb") as f:
        assert f.read() == blob
    assert pc.stats()["evictions"] > 0
    pc.unregister(fid)
    os.close(fd)


def test_threads_on_one_cache_lose_nothing(tmp_path):
    """Readers, writers and prefetchers on shared and private files at once."""
    pc = CompiledPageCache(2 << 20)
    files = []
    for i in range(4):
        path = str(tmp_path / ("f%d" % i))
        with open(path, "wb") as f:
            f.write(bytes(4 << 20))
        fd = os.open(path, os.O_RDWR)
        files.append((path, fd, pc.register(fd, 4 << 20)))
    errors = []

    def writer(k):
        try:
            path, fd, fid = files[k]
            for off in range(0, 4 << 20, 20000):
                pc.write(fid, off, bytes([k + 1]) * 5000)
                pc.read(fid, off, 5000) == bytes([k + 1]) * 5000 or errors.append("w%d" % k)
            pc.writeback(fid)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    def reader():
        try:
            for _ in range(3):
                for _, _, fid in files:
                    pc.prefetch(fid, 0, 1 << 20)
                    pc.read(fid, 12345, 300000)
        except Exception as e:  # pragma: no cover
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    pc.check()
    for k, (path, fd, fid) in enumerate(files):
        with open(path, "rb") as f:
            data = f.read()
        for off in range(0, 4 << 20, 20000):
            assert data[off:off + 5000] == bytes([k + 1]) * 5000
        pc.unregister(fid)
        os.close(fd)


ext_ops = st.lists(st.one_of(
    st.tuples(st.just("read"), offsets, lengths),
    st.tuples(st.just("write"), offsets, st.integers(1, 9000)),
    st.tuples(st.just("writeback"), st.just(0), st.just(0)),
    st.tuples(st.just("external"), offsets, st.integers(1, 9000)),
    st.tuples(st.just("refresh"), offsets, lengths),
    st.tuples(st.just("invalidate"), offsets, lengths),
    st.tuples(st.just("prefetch"), offsets, lengths),
    st.tuples(st.just("resize"), offsets, st.just(0)),
), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(multiwrite=st.booleans(), small=st.booleans(), seq=ext_ops)
def test_refresh_and_multiwrite_agree_with_fallback(tmp_path, multiwrite, small, seq):
    """Both engines must see the same bytes and leave the same file.

    With a 4 MiB cache nothing is evicted, and another node also writes the
    backing file directly.  With a 64 KiB cache (16 slots for a 100 KiB
    file) pages, dirty ones' neighbours and multiwrite twins are evicted all
    along; the engines evict differently (CLOCK, LRU), so a stale page one
    keeps and the other reloads would differ legitimately: no external
    writes then."""
    init = bytes(range(256)) * 400
    engines = []
    for impl in IMPLS:
        path = str(tmp_path / ("%s-%d" % (impl.__name__, len(os.listdir(tmp_path)))))
        with open(path, "wb") as f:
            f.write(init)
        fd = os.open(path, os.O_RDWR)
        pc = impl(64 << 10 if small else 4 << 20)
        fid = pc.register(fd, len(init))
        pc.set_multiwrite(fid, multiwrite)
        engines.append((pc, fid, fd, path))
    for i, (op, a, b) in enumerate(seq):
        if small and op == "external":
            continue
        results = []
        for pc, fid, fd, path in engines:
            if op == "read":
                results.append(pc.read(fid, a, b))
            elif op == "write":
                pc.write(fid, a, bytes([i % 250 + 1]) * b)
            elif op == "writeback":
                pc.writeback(fid)
            elif op == "external":
                os.pwrite(fd, bytes([255 - i % 250]) * b, a)
            elif op == "refresh":
                pc.refresh(fid, a, b)
                if os.fstat(fd).st_size > pc.size(fid):
                    pc.set_size(fid, os.fstat(fd).st_size)
            elif op == "invalidate":
                pc.invalidate(fid, a, b)
            elif op == "prefetch":          # pages not spent: eviction falls to CLOCK/LRU
                pc.prefetch(fid, a, b)
            elif op == "resize":
                resize(pc, fid, fd, a)
            pc.check()
        if results:
            assert results[0] == results[1], (i, op, a, b)
        # the same pages are known zeros; without evictions, the same are filled
        zs = [pc.file_stats(fid) for pc, fid, _, _ in engines]
        assert zs[0]["known_zero_bytes"] == zs[1]["known_zero_bytes"], (i, op, a, b)
        if not small:
            assert zs[0]["zero_fill_bytes"] == zs[1]["zero_fill_bytes"], (i, op, a, b)
            assert zs[0]["bytes_fetched"] == zs[1]["bytes_fetched"], (i, op, a, b)
    files = []
    for pc, fid, fd, path in engines:
        pc.writeback(fid)
        with open(path, "rb") as f:
            files.append(f.read())
        pc.unregister(fid)
        os.close(fd)
    assert files[0] == files[1]


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_multiwrite_writes_only_changed_bytes(tmp_path, impl):
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(bytes(8192))
    fd = os.open(path, os.O_RDWR)
    pc = impl(1 << 20)
    fid = pc.register(fd, 8192)
    pc.set_multiwrite(fid, True)
    pc.write(fid, 0, b"\x01" * 8192)          # loads the twins first
    os.pwrite(fd, b"\x01" * 8192, 0)         # ... another node wrote the same
    pc.write(fid, 100, b"A")                 # local change: one byte
    os.pwrite(fd, b"B", 200)                 # remote change in the same page
    # The twin says page 0 held zeros, so every byte we set to 1 differs from
    # it too: write-back must send those and our A, and leave byte 200 alone
    # only if we never touched it -- we did (set to 1), so it is rewritten.
    pc.writeback(fid)
    with open(path, "rb") as f:
        data = f.read()
    assert data[100:101] == b"A" and data[200:201] == b"\x01"
    # Now twins match the backing file: a further one-byte change writes one byte.
    os.pwrite(fd, b"C", 300)
    pc.write(fid, 400, b"D")
    before = pc.file_stats(fid)["backing_writes"]
    pc.writeback(fid)
    with open(path, "rb") as f:
        data = f.read()
    assert data[300:301] == b"C" and data[400:401] == b"D"
    assert pc.file_stats(fid)["backing_writes"] == before + 1
    assert pc.file_stats(fid)["twin_bytes"] == 8192
    pc.unregister(fid)
    os.close(fd)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_read_cached_never_does_io(tmp_path, impl):
    path = str(tmp_path / "f")
    data = os.urandom(20000)
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR)
    pc = impl(1 << 20)
    fid = pc.register(fd, len(data))
    assert pc.read_cached(fid, 100, 5000) is None
    assert pc.file_stats(fid)["bytes_fetched"] == 0
    pc.prefetch(fid, 0, 8192)
    assert pc.read_cached(fid, 100, 5000) == data[100:5100]
    assert pc.read_cached(fid, 4000, 5000) is None        # page 2 missing
    assert pc.read_cached(fid, 19990, 100) is None
    pc.read(fid, 0, 20000)
    assert pc.read_cached(fid, 19990, 100) == data[19990:]
    pc.unregister(fid)
    os.close(fd)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_write_cached_takes_only_cached_pages_and_never_does_io(tmp_path, impl):
    path = str(tmp_path / "f")
    data = bytearray(os.urandom(20000))
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR)
    pc = impl(1 << 20)
    fid = pc.register(fd, len(data))
    assert pc.write_cached(fid, 100, b"x" * 5000) is None          # nothing cached
    pc.prefetch(fid, 0, 8192)
    fetched = pc.file_stats(fid)["bytes_fetched"]
    assert pc.write_cached(fid, 4000, b"y" * 5000) is None         # page 2 missing
    assert pc.write_cached(fid, 8000, b"y" * 200) is None          # reaches page 2
    assert pc.write_cached(fid, 100, b"x" * 5000) == 5000
    data[100:5100] = b"x" * 5000
    assert pc.dirty_bytes(fid) == 8192
    pc.read(fid, 0, 20000)
    assert pc.write_cached(fid, 19990, b"z" * 11) is None          # would grow the file
    assert pc.size(fid) == 20000
    assert pc.write_cached(fid, 19990, b"z" * 10) == 10
    data[19990:] = b"z" * 10
    assert pc.file_stats(fid)["bytes_fetched"] == fetched + 3 * 4096
    assert pc.read(fid, 0, 20000) == bytes(data)
    pc.writeback(fid)
    with open(path, "rb") as f:
        assert f.read() == bytes(data)
    pc.check()
    pc.unregister(fid)
    os.close(fd)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_cached_prefix_and_delivered(tmp_path, impl):
    """What a push takes from the engine: the cached prefix of a range (no
    I/O, clipped to the size), and afterwards whole delivered pages are
    spent and counted as pushed."""
    data = os.urandom(5 * 4096 + 100)
    with cache_over(tmp_path, impl, data) as (pc, fid, fd):
        assert pc.cached_prefix(fid, 0, 8192) == b""            # nothing cached
        pc.prefetch(fid, 4096, 2 * 4096)                        # pages 1 and 2
        pc.write(fid, 3 * 4096, b"X" * 10)                      # page 3: dirty, also cached
        model = bytearray(data)
        model[3 * 4096:3 * 4096 + 10] = b"X" * 10
        fetched = pc.file_stats(fid)["bytes_fetched"]
        assert pc.cached_prefix(fid, 4096, 1 << 20) == bytes(model[4096:4 * 4096])
        assert pc.file_stats(fid)["bytes_fetched"] == fetched   # no I/O
        assert pc.file_stats(fid)["bytes_pushed"] == 0          # a copy is no delivery
        pc.delivered(fid, 4096, 3 * 4096)
        pc.read(fid, 0, len(data))
        assert pc.cached_prefix(fid, 4 * 4096, 1 << 20) == bytes(model[4 * 4096:])
        pc.delivered(fid, 4 * 4096, 1 << 20)                    # clipped to the size
        st = pc.file_stats(fid)
        assert (st["bytes_pushed"], st["pushes"]) == (4 * 4096 + 100, 2)
        for bad in (lambda: pc.cached_prefix(fid, 100, 4096), lambda: pc.delivered(fid, 1, 1),
                    lambda: pc.cached_prefix(fid, 0, -1)):
            with pytest.raises(ValueError):
                bad()


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_concurrent_writebacks_of_one_file_split_the_runs(tmp_path, impl):
    """AsyncCache runs several write-backs of one file at once: each run is
    written by exactly one of them, and a failure keeps every failed page."""
    path = str(tmp_path / "f")
    size = 24 << 20
    with open(path, "wb") as f:
        f.truncate(size)
    data = os.urandom(size)
    for fd_flags, ok in ((os.O_RDONLY, False), (os.O_RDWR, True)):
        fd = os.open(path, fd_flags)
        pc = impl(64 << 20)
        fid = pc.register(fd, size)
        # dirty runs separated by clean pages, so there are many runs to share
        for off in range(0, size, 1 << 20):
            pc.write(fid, off, data[off:off + (1 << 20) - 8192])
        dirty = pc.dirty_bytes(fid)
        errors, written = [], []

        def wb():
            try:
                written.append(pc.writeback(fid))
            except OSError as exc:
                errors.append(exc.errno)
        threads = [threading.Thread(target=wb) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        pc.check()
        if ok:
            assert not errors and sum(written) == dirty and pc.dirty_bytes(fid) == 0
            with open(path, "rb") as f:
                got = f.read()
            for off in range(0, size, 1 << 20):
                n = (1 << 20) - 8192
                assert got[off:off + n] == data[off:off + n]
                assert got[off + n:off + (1 << 20)] == bytes(8192)
        else:
            assert errors and set(errors) == {errno.EBADF}
            assert pc.dirty_bytes(fid) == dirty      # all kept for a retry
        pc.unregister(fid)
        os.close(fd)


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
def test_fs_magic_names_the_file_system(tmp_path, impl):
    import subprocess
    from shimcore import MEMORY_FS_MAGIC, _engine, fallback
    fs_magic = _engine.fs_magic if impl == "compiled" else fallback.fs_magic
    for path in [str(tmp_path), "/dev/shm"]:
        if not os.path.isdir(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            want = int(subprocess.run(["stat", "-f", "-c", "%t", path], check=True,
                                      capture_output=True, text=True).stdout, 16)
            assert fs_magic(fd) == want
            if path == "/dev/shm" and want == 0x01021994:
                assert fs_magic(fd) in MEMORY_FS_MAGIC
        finally:
            os.close(fd)
    with pytest.raises(OSError) as e:
        fs_magic(fd)                        # closed
    assert e.value.errno == errno.EBADF


def _wait_prefetches(pc, timeout=30.0):
    import time
    deadline = time.monotonic() + timeout
    while pc.stats()["prefetch_pending"]:
        assert time.monotonic() < deadline, "prefetches never finished"
        time.sleep(0.002)


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_prefetch_async_loads_pages_off_the_callers_thread(tmp_path, impl):
    path = str(tmp_path / "f")
    data = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    pc = impl(8 << 20)
    fid = pc.register(fd, len(data))
    assert pc.prefetch_async(fid, 0, 1 << 20) is False          # no threads yet: refused
    pc.set_prefetchers(2)
    for off in range(0, len(data), 1 << 20):
        assert pc.prefetch_async(fid, off, 1 << 20) is True
    _wait_prefetches(pc)
    st = pc.stats()
    assert st["prefetches_done"] == 3 and st["prefetch_errors"] == 0
    assert st["prefetches_refused"] == 1
    assert pc.file_stats(fid)["bytes_fetched"] == len(data)
    assert pc.read_cached(fid, 0, len(data)) == data             # all cached, no I/O
    with pytest.raises(KeyError):
        pc.prefetch_async(fid + 1, 0, 4096)
    pc.check()
    pc.unregister(fid)
    os.close(fd)


def test_file_removed_under_a_running_prefetch_lives_until_it_ends(tmp_path):
    """unregister cancels queued prefetches; a running one keeps the file's
    record (a zombie: its id is not reused) and frees it when it ends, even
    though the caller closed the fd at once.  (Whether the new file gets the
    old id depends on whether the zombie is gone by then: the bytes tell.)"""
    import time
    big = str(tmp_path / "big")
    with open(big, "wb") as f:
        f.write(os.urandom(64 << 20))
    small = str(tmp_path / "small")
    other = os.urandom(1 << 20)
    with open(small, "wb") as f:
        f.write(other)
    pc = CompiledPageCache(48 << 20)
    pc.set_prefetchers(2)
    zombies = 0
    for i in range(50):
        fd = os.open(big, os.O_RDONLY)
        fid = pc.register(fd, 64 << 20)
        for off in range(0, 64 << 20, 16 << 20):
            pc.prefetch_async(fid, off, 16 << 20)
        time.sleep(0.001 if i < 25 else 0.01)    # let the threads start reading
        pc.unregister(fid)
        os.close(fd)
        running = pc.stats()["prefetch_pending"]
        assert running <= 2                  # the queued ones were cancelled
        fd2 = os.open(small, os.O_RDONLY)
        fid2 = pc.register(fd2, len(other))
        zombies += running > 0
        # Had the new file been given the id while the zombie's pages were
        # still filed under it, these reads would return the old file's bytes.
        assert pc.read(fid2, 0, len(other)) == other
        assert pc.read_cached(fid2, 0, len(other)) == other
        with pytest.raises(KeyError):
            pc.file_stats(fid if fid != fid2 else -1)
        _wait_prefetches(pc)
        pc.check()
        assert pc.stats()["used_bytes"] == len(other)   # the zombie's pages are gone
        pc.unregister(fid2)
        os.close(fd2)
        if zombies >= 5:
            break
    assert zombies, "no prefetch was ever running at unregister: the test proves nothing"


PAGE_ = 4096


@contextlib.contextmanager
def _cache_over(tmp_path, impl, pages: int, cache_pages: int = 16):
    """A cache of ``cache_pages`` slots over a file of ``pages`` distinct pages;
    its invariants are checked at the end."""
    data = b"".join(bytes([p % 251]) * PAGE_ for p in range(pages))
    with cache_over(tmp_path, impl, data, cache_pages * PAGE_) as (pc, fid, fd):
        yield pc, fid, fd, data


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_pages_served_are_evicted_before_pages_prefetched(tmp_path, impl):
    # 16 slots: 8 pages prefetched and not asked for yet, then 8 pages served
    # (read), then 8 more served.  The kernel holds what was served, so those
    # go first; the prefetched pages stay (plain CLOCK or LRU evicted them).
    with _cache_over(tmp_path, impl, 32) as (pc, fid, fd, data):
        pc.prefetch(fid, 8 * PAGE_, 8 * PAGE_)
        assert pc.read(fid, 0, 8 * PAGE_) == data[:8 * PAGE_]
        assert pc.read(fid, 16 * PAGE_, 8 * PAGE_) == data[16 * PAGE_:24 * PAGE_]
        assert pc.read_cached(fid, 8 * PAGE_, 8 * PAGE_) == data[8 * PAGE_:16 * PAGE_]
        assert pc.read_cached(fid, 0, PAGE_) is None
        assert pc.stats()["spent_evictions"] == 8
        assert pc.file_stats(fid)["bytes_fetched"] == 24 * PAGE_


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_written_back_pages_are_evicted_before_pages_prefetched(tmp_path, impl):
    with _cache_over(tmp_path, impl, 32) as (pc, fid, fd, data):
        pc.prefetch(fid, 8 * PAGE_, 8 * PAGE_)
        new = os.urandom(8 * PAGE_)
        pc.write(fid, 0, new)
        pc.writeback(fid)                   # the kernel wrote these: it has them
        assert pc.read(fid, 16 * PAGE_, 8 * PAGE_) == data[16 * PAGE_:24 * PAGE_]
        assert pc.read_cached(fid, 8 * PAGE_, 8 * PAGE_) == data[8 * PAGE_:16 * PAGE_]
        assert pc.read(fid, 0, 8 * PAGE_) == new


@pytest.mark.parametrize("impl", IMPLS, ids=["compiled", "fallback"])
def test_write_cached_takes_fresh_slots_for_whole_pages_only(tmp_path, impl):
    with _cache_over(tmp_path, impl, 8) as (pc, fid, fd, data):
        # a page it covers in part would need its old bytes (I/O): refused
        assert pc.write_cached(fid, 100, b"x" * PAGE_) is None
        assert pc.file_stats(fid)["bytes_fetched"] == 0
        # whole pages need no old bytes: taken, without reading the backing file
        blob = os.urandom(2 * PAGE_)
        assert pc.write_cached(fid, 2 * PAGE_, blob) == 2 * PAGE_
        assert pc.file_stats(fid)["bytes_fetched"] == 0
        assert pc.dirty_bytes(fid) == 2 * PAGE_
        assert pc.read(fid, PAGE_, 4 * PAGE_) == \
            data[PAGE_:2 * PAGE_] + blob + data[4 * PAGE_:5 * PAGE_]
        pc.writeback(fid)
        assert os.pread(fd, 2 * PAGE_, 2 * PAGE_) == blob


def test_write_cached_refuses_when_every_slot_is_dirty(tmp_path):
    with _cache_over(tmp_path, CompiledPageCache, 32) as (pc, fid, fd, data):
        pc.write(fid, 0, os.urandom(16 * PAGE_))       # all 16 slots dirty
        assert pc.write_cached(fid, 20 * PAGE_, b"y" * PAGE_) is None    # needs a write-back
        assert pc.dirty_bytes(fid) == 16 * PAGE_
        pc.writeback(fid)
        assert pc.write_cached(fid, 20 * PAGE_, b"y" * PAGE_) == PAGE_
