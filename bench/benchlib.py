"""Benchmark helpers: sizes, cache dropping, timing, the results table."""
from __future__ import annotations

import os
import statistics
import time

MIB = 1 << 20
SCAN_MIB = int(os.environ.get("SHIMFS_BENCH_MIB", "2048"))
WRITE_MIB = int(os.environ.get("SHIMFS_BENCH_WRITE_MIB", "1024"))
RSS_MIB = int(os.environ.get("SHIMFS_BENCH_RSS_MIB", "4096"))
ROUNDS = int(os.environ.get("SHIMFS_BENCH_ROUNDS", "3"))
RESULTS: list[dict] = []


#: ``client`` (default): drop the client's page cache only -- the stand-in's
#: brick (the "server") keeps the file cached, as a file server with plenty of
#: memory would, and as the peer figures of the engine issue were measured.
#: ``all``: the brick's cache is dropped too, so reads run at the speed of the
#: brick's disk.
COLD = os.environ.get("SHIMFS_BENCH_COLD", "client")


def drop_caches(*paths: str) -> None:
    """Empty the client's page cache; with COLD=client, re-warm the brick's
    copies of ``paths`` (files on the stand-in) by reading them on the brick."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    if COLD == "all":
        return
    from shimfs import standin
    for p in paths:
        base = os.path.realpath(standin.client_dir(0)) + "/"
        real = os.path.realpath(p)
        if real.startswith(base):
            with open(os.path.join(standin.BRICK, real[len(base):]), "rb") as f:
                while f.read(8 * MIB):
                    pass


def median_rate(fn, nbytes: int, rounds: int = ROUNDS, setup=None) -> tuple[float, float, float]:
    """(median, min, max) MB/s of ``fn`` over ``rounds`` cold runs."""
    rates = []
    for _ in range(rounds):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t) / 1e6)
    return statistics.median(rates), min(rates), max(rates)


def record(workload: str, where: str, fs: str, mine, native, note: str = "") -> None:
    RESULTS.append(dict(workload=workload, where=where, fs=fs, mine=mine, native=native,
                        note=note))


def make_file(path: str, mib: int) -> str:
    if os.path.exists(path) and os.path.getsize(path) == mib * MIB:
        return path
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(chunk[i % 251:] + chunk[:i % 251])
    return path
