"""Throughput of mapped access through shimfs, as ratios to native access.

Run with ``bash scripts/bench.sh`` (see README).  Each workload measures the
native path and the mapped path on the same file in the same run; cold runs
drop the kernel's page cache and use a fresh mount (empty daemon cache).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import random
import statistics
import threading
import time

import psutil
import pytest

from mounting import daemon_pid
from benchlib import (MIB, ROUNDS, RSS_MIB, SCAN_MIB, WRITE_MIB, CpuMeter, Rate, drop_caches,
                      in_threads, make_file, median_rate, record, split, touch_file)

PAGE = 4096


def rates(benchmark, nbytes: int, cpu_runs=()) -> Rate:
    """MB/s (median, min, max) from the benchmark's timings."""
    return Rate([nbytes / t / 1e6 for t in benchmark.stats.stats.data], list(cpu_runs))


def timed_cold(fn, path: str, nbytes: int, daemon: int | None, drop: str) -> tuple[float, dict]:
    """MB/s and CPU seconds of one cold ``fn(path)``."""
    drop_caches(drop)
    meter = CpuMeter(daemon)
    t = time.perf_counter()
    fn(path)
    return nbytes / (time.perf_counter() - t) / 1e6, meter.stop()


def interleaved(benchmark, mounts, peers, workload: str, where: str, target: str, nbytes: int,
                native_fn, fn, *opts: str, cpu: bool = True, backing_dir: bool = False,
                before=None, shim_fn=None, note=None, opened=None, label="") -> None:
    """ROUNDS rounds of: native ``native_fn()``, ``fn`` through each peer, then
    ``fn`` through shimfs (timed by pytest-benchmark), each cold (client cache
    dropped, fresh mount).  Machines drift between minutes; in one round all
    paths see the same machine, and each row's ratio is the median of the
    per-round ratios to that round's native run.

    ``backing_dir``: shimfs mounts ``target``'s directory as its backing
    directory instead of shadowing ``target`` (for workloads that create the
    file).  ``before()`` runs ahead of every path's run, untimed.
    ``shim_fn`` replaces ``fn`` for shimfs; ``note()`` gives the shimfs row's
    note once the rounds are done.  ``opened(path)`` runs on the fresh shimfs
    mount before its caches are dropped, untimed (an earlier open of the
    file); ``label`` is added to the shimfs row's name."""
    before = before or (lambda: None)
    shim_fn = shim_fn or fn
    native: list[tuple[float, dict]] = []
    peer_runs: dict[str, list[tuple[float, dict]]] = {fs: [] for fs in peers}
    cpu_runs: list[dict] = []
    meter = [None]

    def setup():
        before()
        native.append(timed_cold(lambda _: native_fn(), target, nbytes, None, target))
        for fs in peers:
            before()
            path = mounts.mount(fs, target)
            peer_runs[fs].append(timed_cold(fn, path, nbytes, mounts.pid, target))
            mounts.close()
        before()
        if backing_dir:
            path = mounts.shimfs_dir(os.path.dirname(target), *opts)
            path = os.path.join(path, os.path.basename(target))
        else:
            path = mounts.shimfs(target, *opts)
        if opened:
            opened(path)
        drop_caches(target)
        meter[0] = CpuMeter(mounts.pid)
        return (path,), {}

    def run(path):
        meter[0].start()
        shim_fn(path)
        cpu_runs.append(meter[0].stop())
    if benchmark is not None:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
        mine = rates(benchmark, nbytes, cpu_runs)
    else:           # a second shimfs variant in the same test: timed here
        times = []
        for _ in range(ROUNDS):
            args, _ = setup()
            t = time.perf_counter()
            run(*args)
            times.append(time.perf_counter() - t)
        mine = Rate([nbytes / t / 1e6 for t in times], list(cpu_runs))
    mounts.close()
    nat_rates = [r for r, _ in native]
    nat = Rate(nat_rates, [c for _, c in native])
    ratios = [m / n for m, n in zip(mine.runs, nat_rates)]
    if benchmark is not None:
        benchmark.extra_info.update(native_MBps=nat[0], MBps=mine[0],
                                    ratio=statistics.median(ratios))
    name = "shimfs" + "".join(" `-o %s`" % o for o in opts) + label
    record(workload, where, name, mine, nat, nbytes=nbytes if cpu else 0, ratios=ratios,
           note=note() if note else "")
    for fs, runs in peer_runs.items():
        r = Rate([x for x, _ in runs], [c for _, c in runs])
        record(workload, where, fs, r, nat, nbytes=nbytes if cpu else 0,
               ratios=[x / n for (x, _), n in zip(runs, nat_rates)])


def native_scan(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            b = os.pread(fd, 4 * MIB, off)
            if not b:
                break
            off += len(b)
    finally:
        os.close(fd)


def mapped_scan(path: str, writable: bool = False) -> None:
    """Touch every page of a shared mapping (read-only unless ``writable``), in order."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED,
                       access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ) as m:
            mv = memoryview(m)
            for off in range(0, len(m), 64 * MIB):
                bytes(mv[off:off + 64 * MIB:PAGE])       # one byte of every page
            mv.release()
    finally:
        os.close(fd)


def test_sequential_mapped_scan(benchmark, where, bigfile, mounts, peers):
    size = os.path.getsize(bigfile)
    interleaved(benchmark, mounts, peers, "sequential mmap scan vs pread(4 MiB)", where[0],
                bigfile, size, lambda: native_scan(bigfile), mapped_scan)


def mapped_copy(path: str) -> None:
    """Copy the whole mapping out with memcpy, 1 MiB at a time (as
    ``bytes(m[a:b])`` and numpy copies do): glibc may walk each copy
    downwards, so the faults within a MiB come in descending order."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, access=mmap.ACCESS_READ) as m:
            keep = []
            for off in range(0, len(m), MIB):
                keep.append(m[off:off + MIB])
                if len(keep) > 64:
                    keep.clear()
    finally:
        os.close(fd)


def test_mapped_copy(benchmark, where, bigfile, mounts, peers):
    size = os.path.getsize(bigfile)
    interleaved(benchmark, mounts, peers,
                "mapping copied out by memcpy (1 MiB) vs pread(4 MiB)", where[0],
                bigfile, size, lambda: native_scan(bigfile), mapped_copy)


@pytest.mark.parametrize("touches,threads", [(2000, 1), (20000, 1), (20000, 8)],
                         ids=["sparse", "dense", "8-threads"])
def test_random_page_touches(benchmark, where, bigfile, mounts, peers, touches, threads):
    """Random 4 KiB page touches of a shared mapping against native
    ``pread(4 KiB)`` at the same offsets with the same thread count, through
    every daemon (the C peer also with the kernel's default 128 KiB
    read-ahead), and shimfs at its defaults (sparse faults: the kernel's
    read-around refused), with ``sparse_faults=0`` (the kernel's 1 MiB
    read-around served) and, for the sparse touches, in the file's second
    open of the mount (a narrow open).  Touches, like native reads, leave the GIL free
    (``touch_file``), so that threads fault at once.  The shimfs rows'
    note: bytes fetched from the backing file per byte touched, and the
    daemon's CPU per READ request."""
    from conftest import C_PEER_DEFAULT_RA
    import shimfs
    size = os.path.getsize(bigfile)
    rnd = random.Random(touches * 10 + threads)
    offsets = [rnd.randrange(size // PAGE) * PAGE for _ in range(touches)]
    parts = split(offsets, threads)

    def native():
        fd = os.open(bigfile, os.O_RDONLY)
        try:
            in_threads(lambda part: [os.pread(fd, PAGE, off) for off in part], parts)
        finally:
            os.close(fd)

    def touch(path, probe=None):
        if probe:
            daemon = psutil.Process(mounts.pid)
            cpu0 = sum(daemon.cpu_times()[:2])
            st0 = shimfs.stats(path)
            reqs0 = st0["mount"]["read_requests"]
            fetched0 = st0["file"].get("bytes_fetched", 0)
        touch_file(path, parts)
        if probe:
            st = shimfs.stats(path)
            probe(st["file"]["bytes_fetched"] - fetched0, sum(daemon.cpu_times()[:2]) - cpu0,
                  st["mount"]["read_requests"] - reqs0)
    name = "%s random 4 KiB touches%s" % (format(touches, ","),
                                          ", %d threads" % threads if threads > 1 else "")
    variants = [((), None, ""), (("sparse_faults=0",), None, "")]
    if touches == 2000 and threads == 1:
        # The file's second open in the mount: an earlier open touched 200
        # other pages at random, so this one is narrow (docs/design.md,
        # "Sparse faults", item 5).
        earlier = [rnd.randrange(size // PAGE) * PAGE for _ in range(200)]

        def opened(path):
            touch_file(path, [earlier])
        variants.append(((), opened, ", second open"))
    for opts, opened, label in variants:
        seen: list[str] = []

        def probe(fetched, cpu, reqs, seen=seen):
            seen.append("%.1f B/B %.0f µs/READ" % (
                fetched / (touches * PAGE), cpu / max(reqs, 1) * 1e6))
        first = not opts and not opened
        interleaved(benchmark if first else None, mounts,
                    (peers + [C_PEER_DEFAULT_RA]) if first else [],
                    name + " vs pread(4 KiB), same offsets", where[0], bigfile,
                    touches * PAGE, native, touch, *opts, cpu=False,
                    shim_fn=lambda p, probe=probe: touch(p, probe),
                    note=lambda seen=seen: "fetched per touched, daemon CPU per READ: "
                    + ", ".join(seen), opened=opened, label=label)


#: The stretch of the file that ``test_cached_random_reads`` touches: it fits
#: the daemon's cache at its default size (256 MiB).
CACHED_MIB = 128


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _warm_backing(path: str, span: int) -> None:
    """Drop the client's caches, then read ``span`` bytes of ``path``
    natively: on the stand-in (direct I/O on the client) that leaves them in
    the brick's cache only."""
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, span, 4 * MIB):
            os.pread(fd, 4 * MIB, off)
    finally:
        os.close(fd)


def _touch_randomly(path: str, offsets: list[int]) -> float:
    """Seconds to touch ``offsets`` of a ``MADV_RANDOM`` mapping: the
    kernel sends one 4 KiB READ per page not in its cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            m.madvise(mmap.MADV_RANDOM)
            t = time.perf_counter()
            for off in offsets:
                m[off]
            return time.perf_counter() - t
    finally:
        os.close(fd)


def test_cached_random_reads(where, bigfile, mounts, peers):
    """Daemon CPU per READ served from the daemon's cache: 20,000 random
    4 KiB touches of a ``MADV_RANDOM`` mapping (one 4 KiB READ per page)
    over a 128 MiB stretch that shimfs's cache holds (``shimfs prefetch``)
    and the kernel's does not (``POSIX_FADV_DONTNEED``), against native
    ``pread(4 KiB)`` at the same offsets with the backing warm (the brick's
    cache, on the stand-in), and through each peer, which reads the backing
    for every READ.  Notes: daemon CPU (user + system, every thread) per
    READ, and READs the compiled path answered without loading."""
    import shimfs
    span = min(CACHED_MIB * MIB, os.path.getsize(bigfile))
    rnd = random.Random(5)
    offsets = [rnd.randrange(span // PAGE) * PAGE for _ in range(20000)]
    pages = len(set(offsets))
    nbytes = len(offsets) * PAGE
    native, mine, ratios = [], [], []
    peer_runs: dict[str, list[float]] = {fs: [] for fs in peers}
    peer_cpu: dict[str, list[float]] = {fs: [] for fs in peers}
    cpu_per_read, hits = [], []
    for _ in range(ROUNDS):
        _warm_backing(bigfile, span)
        fd = os.open(bigfile, os.O_RDONLY)
        try:
            t = time.perf_counter()
            for off in offsets:
                os.pread(fd, PAGE, off)
            native.append(nbytes / (time.perf_counter() - t) / 1e6)
        finally:
            os.close(fd)
        for fs in peers:
            _warm_backing(bigfile, span)
            path = mounts.mount(fs, bigfile)
            cpu0 = _cpu(mounts.pid)
            peer_runs[fs].append(nbytes / _touch_randomly(path, offsets) / 1e6)
            peer_cpu[fs].append((_cpu(mounts.pid) - cpu0) / pages * 1e6)
            mounts.close()
        _warm_backing(bigfile, span)
        path = mounts.shimfs(bigfile)
        shimfs.prefetch(path, 0, span)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, span, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        st0 = shimfs.stats(path)["mount"]
        cpu0 = _cpu(mounts.pid)
        mine.append(nbytes / _touch_randomly(path, offsets) / 1e6)
        cpu = _cpu(mounts.pid) - cpu0
        st1 = shimfs.stats(path)["mount"]
        reqs = st1["read_requests"] - st0["read_requests"]
        cpu_per_read.append(cpu / max(reqs, 1) * 1e6)
        hits.append("%d/%d" % (st1["reads_from_cache"] - st0["reads_from_cache"], reqs))
        mounts.close()
        ratios.append(mine[-1] / native[-1])
    workload = ("20,000 random 4 KiB touches (MADV_RANDOM) of 128 MiB in the daemon's cache "
                "vs pread(4 KiB), backing warm")
    nat = Rate(native, [])
    record(workload, where[0], "shimfs", Rate(mine, []), nat, ratios=ratios,
           note="daemon CPU per READ: %s µs; from cache: %s" % (
               " ".join("%.1f" % c for c in cpu_per_read), " ".join(hits)))
    for fs in peers:
        record(workload, where[0], fs, Rate(peer_runs[fs], []), nat,
               ratios=[m / n for m, n in zip(peer_runs[fs], native)],
               note="daemon CPU per READ: %s µs" % " ".join("%.1f" % c for c in peer_cpu[fs]))


def test_prefetch_call_whole_file(where, bigfile, mounts):
    """``shimfs prefetch`` of the whole file (parallel preads, pushed into the
    kernel's page cache) against one native ``pread(4 MiB)`` pass, cold, in
    interleaved rounds; only the call is timed.  The note gives the READs
    that a full mapped scan sent afterwards (the target is none)."""
    import shimfs
    size = os.path.getsize(bigfile)
    native, mine, ratios, after = [], [], [], []
    for _ in range(ROUNDS):
        native.append(timed_cold(native_scan, bigfile, size, None, bigfile))
        path = mounts.shimfs(bigfile)
        mine.append(timed_cold(shimfs.prefetch, path, size, mounts.pid, bigfile))
        before = shimfs.stats(path)["mount"]["read_requests"]
        mapped_scan(path)
        after.append(shimfs.stats(path)["mount"]["read_requests"] - before)
        mounts.close()
        ratios.append(mine[-1][0] / native[-1][0])
    record("`shimfs prefetch` of the whole file vs pread(4 MiB)", where[0], "shimfs",
           Rate([r for r, _ in mine], [c for _, c in mine]),
           Rate([r for r, _ in native], [c for _, c in native]), nbytes=size, ratios=ratios,
           note="READs in a mapped scan afterwards: %s" % " ".join(map(str, after)))


def native_write(path: str, block: bytes) -> None:
    """Overwrite the whole file with ``block`` by pwrite, then fsync."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, os.path.getsize(path), len(block)):
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def mapped_write(path: str, block: bytes) -> None:
    """Overwrite every page of a shared mapping of the file with ``block``, then msync."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED) as m:
            for off in range(0, len(m), len(block)):
                m[off:off + len(block)] = block
            m.flush()
    finally:
        os.close(fd)


def test_write_every_page_then_msync(benchmark, where, mounts, peers):
    path = make_file(os.path.join(where[1], "write-%d.bin" % WRITE_MIB), WRITE_MIB)
    block = os.urandom(4 * MIB)
    interleaved(benchmark, mounts, peers,
                "write every page of a mapping + msync vs pwrite(4 MiB)+fsync", where[0],
                path, WRITE_MIB * MIB, lambda: native_write(path, block),
                lambda p: mapped_write(p, block))


def native_checkpoint(path: str, size: int, block: bytes) -> None:
    """A new file written by pwrite(4 MiB), then fsync."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        for off in range(0, size, len(block)):
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def mapped_checkpoint(path: str, size: int, block: bytes, probe=None) -> None:
    """Create, ftruncate to ``size``, fill every page through a shared
    mapping, msync; ``probe(path)`` runs after the msync, before the close."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED) as m:
            for off in range(0, size, len(block)):
                m[off:off + len(block)] = block
            m.flush()
        if probe:
            probe(path)
    finally:
        os.close(fd)


def numpy_checkpoint(path: str, size: int, block, probe=None) -> None:
    """The same through numpy.memmap(mode="w+") (a write past the end sizes it)."""
    import numpy as np
    a = np.memmap(path, dtype=np.uint8, mode="w+", shape=(size,))
    for off in range(0, size, len(block)):
        a[off:off + len(block)] = block
    a.flush()
    if probe:
        probe(path)
    del a


@pytest.mark.parametrize("how", ["mmap", "numpy"])
def test_checkpoint_new_file(benchmark, where, mounts, peers, how):
    """A checkpoint: a new file filled through a mapping, against pwrite of a
    new file.  The shimfs row's note gives the bytes the daemon fetched from
    the backing file per byte written (issue target: <= 0.01)."""
    import numpy as np
    import shimfs
    size = WRITE_MIB * MIB
    target = os.path.join(where[1], "ckpt-%d.bin" % WRITE_MIB)
    raw = os.urandom(4 * MIB)
    block = np.frombuffer(raw, dtype=np.uint8) if how == "numpy" else raw
    fill = numpy_checkpoint if how == "numpy" else mapped_checkpoint
    fetched: list[float] = []

    def unlink():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)

    def probe(path):
        fetched.append(shimfs.stats(path)["file"]["bytes_fetched"] / size)
    workload = ("checkpoint: new file, ftruncate + fill a mapping + msync"
                if how == "mmap" else "checkpoint: numpy.memmap(mode=\"w+\") + flush")
    try:
        interleaved(benchmark, mounts, peers, workload + " vs pwrite(4 MiB)+fsync of a new file",
                    where[0], target, size, lambda: native_checkpoint(target, size, raw),
                    lambda p: fill(p, size, block), backing_dir=True, before=unlink,
                    shim_fn=lambda p: fill(p, size, block, probe),
                    note=lambda: "fetched/written %s" % " ".join("%.3f" % f for f in fetched))
    finally:
        unlink()


def test_warm_second_scan(benchmark, where, bigfile, mounts, tmp_path):
    size = os.path.getsize(bigfile)
    ref = "/dev/shm/shimfs-warm-ref"
    make_file(ref, SCAN_MIB)
    try:
        mapped_scan(ref)
        nat = median_rate(lambda: mapped_scan(ref), size)
    finally:
        os.unlink(ref)
    p = mounts.shimfs(bigfile)
    mapped_scan(p)                                   # warm it
    benchmark.pedantic(mapped_scan, args=(p,), rounds=ROUNDS, iterations=1)
    mine = rates(benchmark, size)
    record("second (warm) scan vs mmap of tmpfs", where[0], "shimfs", mine, nat)


def test_daemon_rss_bounded(where, mounts):
    if where[0] != "tmpfs":
        pytest.skip("measured once, on tmpfs")
    path = make_file(os.path.join(where[1], "rss-%d.bin" % RSS_MIB), RSS_MIB)
    try:
        p = mounts.shimfs(path, "cache_size=256M")
        pid = daemon_pid(os.path.dirname(p))
        proc = psutil.Process(pid)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)
        t = threading.Thread(target=sample)
        t.start()
        drop_caches()
        mapped_scan(p)
        done.set()
        t.join()
        limit = (256 + 64) * MIB
        print("daemon peak RSS %.0f MiB (limit %.0f MiB)" % (peak[0] / MIB, limit / MIB))
        record("daemon peak RSS during %d MiB scan, cache_size=256M (MiB, limit 320)" % RSS_MIB,
               where[0], "shimfs", (peak[0] / MIB,) * 3, (limit / MIB,) * 3,
               "(≤ 1 meets it)")
        # The cache bounds the daemon's data memory: the whole 256 MiB arena
        # plus the interpreter and reply buffers stay within 320 MiB.
        assert peak[0] <= limit, "daemon peak RSS %.0f MiB > %.0f MiB" % (peak[0] / MIB,
                                                                          limit / MIB)
    finally:
        mounts.close()
        os.unlink(path)
