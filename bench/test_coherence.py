"""What coherence across nodes (``-o coherence``) costs: a read-only mapped
scan with and without it, in the same rounds on the same file, and the time
a page takes to go from one node's writer to the other's.

The scan rounds run native ``pread(4 MiB)``, then shimfs without coherence
and shimfs with it (taking turns going first), each cold.  The handoff runs two coherent mounts over the
stand-in's two GlusterFS clients, as two nodes, with an etcd server started
here on loopback.
"""
from __future__ import annotations

import mmap
import os
import statistics
import struct
import time
import uuid

import pytest

from benchlib import MIB, ROUNDS, Rate, record
from mounting import shim_mount
from shimfs import standin
from shimfs.etcdserver import EtcdServer
from test_throughput import mapped_scan, native_scan, timed_cold

HANDOFFS = int(os.environ.get("SHIMFS_BENCH_HANDOFFS", "200"))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with EtcdServer(str(tmp_path_factory.mktemp("etcd"))) as srv:
        yield srv


def _coherence(etcd) -> tuple[str, ...]:
    return ("coherence=" + etcd.url, "coherence_prefix=/bench/%s/" % uuid.uuid4().hex[:8])


def test_read_only_scan_with_and_without_coherence(where, bigfile, mounts, etcd):
    """Readers share a file with one grant per node: the scan should cost
    what it costs without coherence (target: at least 0.95x)."""
    size = os.path.getsize(bigfile)
    native, plain, coherent = [], [], []
    for i in range(ROUNDS):
        native.append(timed_cold(lambda _: native_scan(bigfile), bigfile, size, None, bigfile))
        # the two mounts take turns going first, so that neither gains by its place
        order = [(plain, ()), (coherent, _coherence(etcd))]
        for runs, opts in order if i % 2 == 0 else order[::-1]:
            path = mounts.shimfs(bigfile, *opts)
            runs.append(timed_cold(mapped_scan, path, size, mounts.pid, bigfile))
        mounts.close()
    nat = Rate([r for r, _ in native], [c for _, c in native])
    on_off = [c / p for (c, _), (p, _) in zip(coherent, plain)]
    workload = "read-only mmap scan, coherence on/off, vs pread(4 MiB)"
    for name, runs in (("shimfs", plain), ("shimfs `-o coherence`", coherent)):
        record(workload, where[0], name, Rate([r for r, _ in runs], [c for _, c in runs]), nat,
               nbytes=size, ratios=[r / n for (r, _), n in zip(runs, nat.runs)],
               note="on/off %.2f× (%.2f–%.2f)" % (statistics.median(on_off), min(on_off),
                                                  max(on_off)) if "coherence" in name else "")
    print("\ncoherence on/off, scan of %d MiB on %s: %s" % (
        size // MIB, where[0], " ".join("%.2f" % r for r in on_off)))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


@pytest.fixture
def two_nodes(etcd, tmp_path):
    why = standin.available()
    if why:
        pytest.skip(why)
    standin.up(clients=2)
    rel = "coh-bench-" + uuid.uuid4().hex[:8]
    a_dir, b_dir = (os.path.join(standin.client_dir(i), rel) for i in (0, 1))
    os.mkdir(a_dir)
    opts = ("mirror",) + _coherence(etcd)
    try:
        with shim_mount(str(tmp_path / "a"), a_dir, *opts) as a, \
                shim_mount(str(tmp_path / "b"), b_dir, *opts) as b:
            yield a, b
    finally:
        import shutil
        shutil.rmtree(a_dir, ignore_errors=True)


def test_page_handoff_between_two_writers(two_nodes, benchmark):
    """One page, written on A then on B, again and again: each store on the
    node that does not hold the grant waits for the other to give it up
    (write back, fsync, drop) and for etcd to grant it.  The time of that
    store is the handoff."""
    a, b = two_nodes
    with open(a + "/page", "wb") as f:
        f.write(bytes(4096))
    fa, fb = os.open(a + "/page", os.O_RDWR), os.open(b + "/page", os.O_RDWR)
    ma, mb = mmap.mmap(fa, 4096), mmap.mmap(fb, 4096)
    maps = (ma, mb)
    step = [0]

    def store():
        i = step[0]
        step[0] += 1
        struct.pack_into("<Q", maps[i % 2], 0, i)
    ma[0:8] = bytes(8)                       # A holds the grant first
    benchmark.pedantic(store, rounds=HANDOFFS, iterations=1)
    data = benchmark.stats.stats.data
    assert struct.unpack_from("<Q", ma, 0)[0] == HANDOFFS - 1
    benchmark.extra_info.update(median_ms=statistics.median(data) * 1e3,
                                p99_ms=_pct(data, 0.99) * 1e3)
    print("\npage handoff between two writers, %d handoffs: median %.1f ms, p99 %.1f ms"
          % (len(data), statistics.median(data) * 1e3, _pct(data, 0.99) * 1e3))
    ma.close()
    mb.close()
    os.close(fa)
    os.close(fb)


def test_write_visible_on_the_other_node(two_nodes, benchmark):
    """A stores a new value in its mapping (no msync); B's mapping is read
    until it shows it.  The time from the store to B's read of it."""
    a, b = two_nodes
    with open(a + "/vis", "wb") as f:
        f.write(bytes(4096))
    fa, fb = os.open(a + "/vis", os.O_RDWR), os.open(b + "/vis", os.O_RDONLY)
    ma = mmap.mmap(fa, 4096)
    mb = mmap.mmap(fb, 4096, prot=mmap.PROT_READ)
    step = [0]

    def publish():
        step[0] += 1
        v = step[0]
        struct.pack_into("<Q", ma, 0, v)
        deadline = time.monotonic() + 60
        while struct.unpack_from("<Q", mb, 0)[0] != v:
            if time.monotonic() > deadline:
                raise AssertionError("B never saw %d" % v)
    benchmark.pedantic(publish, rounds=max(20, HANDOFFS // 4), iterations=1)
    data = benchmark.stats.stats.data
    benchmark.extra_info.update(median_ms=statistics.median(data) * 1e3,
                                p99_ms=_pct(data, 0.99) * 1e3)
    print("\na mapped write on A read on B: median %.1f ms, p99 %.1f ms"
          % (statistics.median(data) * 1e3, _pct(data, 0.99) * 1e3))
    ma.close()
    mb.close()
    os.close(fa)
    os.close(fb)
