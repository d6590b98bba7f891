"""Benchmark helpers: sizes, cache dropping, timing, CPU accounting, the results table."""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import statistics
import subprocess
import threading
import time

import psutil

MIB = 1 << 20
#: The published run's sizes and rounds (a run below them is partial).
FULL_SCAN_MIB, FULL_WRITE_MIB, FULL_ROUNDS = 2048, 1024, 3
SCAN_MIB = int(os.environ.get("SHIMFS_BENCH_MIB", FULL_SCAN_MIB))
WRITE_MIB = int(os.environ.get("SHIMFS_BENCH_WRITE_MIB", FULL_WRITE_MIB))
RSS_MIB = int(os.environ.get("SHIMFS_BENCH_RSS_MIB", "4096"))
ROUNDS = int(os.environ.get("SHIMFS_BENCH_ROUNDS", FULL_ROUNDS))
RESULTS: list[dict] = []


#: ``client`` (default): drop the client's page cache only -- the stand-in's
#: brick (the "server") keeps the file cached, as a file server with plenty of
#: memory would, and as the peer figures of the engine issue were measured.
#: ``all``: the brick's cache is dropped too, so reads run at the speed of the
#: brick's disk.
COLD = os.environ.get("SHIMFS_BENCH_COLD", "client")


def results_stem(partial: bool = False) -> str:
    """Where a run's table and chart go, by how cold it ran: ``results``
    (.md, .png) for every cache cold, the headline; ``results-brick-warm``
    with the brick's cache kept warm (``client``).  Each run replaces only
    its own pair.  A ``partial`` run (some workloads, smaller sizes, fewer
    rounds) gets ``-partial`` added, which git ignores, so that it never
    replaces a published run's files."""
    return ("results" if COLD == "all" else "results-brick-warm") + ("-partial" if partial else "")


def is_partial(keyword: str, markexpr: str) -> bool:
    """A run that is not the whole bench at its published sizes: pytest's
    ``-k``/``-m``, or sizes or rounds below the defaults."""
    return (bool(keyword or markexpr) or SCAN_MIB < FULL_SCAN_MIB or WRITE_MIB < FULL_WRITE_MIB
            or ROUNDS < FULL_ROUNDS)


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
        brick = os.path.join(standin.BRICK, real[len(base):])
        if real.startswith(base) and os.path.exists(brick):    # not a file yet to create
            with open(brick, "rb") as f:
                while f.read(8 * MIB):
                    pass


#: Free page reporting (virtio-balloon): a VM that has it hands every free
#: 2 MiB block back to its host within seconds, and the next touch of that
#: memory costs a fault in the host.  A mapped scan fills the page cache
#: with such memory; native ``pread`` into a reused buffer never does.  On the
#: machine of 2026-11-23 this doubled the daemon's CPU per byte and moved the
#: scan between 0.6x and 1.1x (docs/performance.md, "Why runs vary").
#: ``SHIMFS_BENCH_PAGE_REPORTING``: ``keep`` (default) leaves the machine as
#: it is; ``off`` stops the reporting for the run (and touches the free
#: memory once, so that it is backed again), then restores it.
PAGE_REPORTING = os.environ.get("SHIMFS_BENCH_PAGE_REPORTING", "keep")
_REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
#: Above the largest buddy order: no free block qualifies, nothing is reported.
_NO_REPORTING_ORDER = "11"


def page_reporting_state() -> str:
    """What the results header says about free page reporting."""
    try:
        with open(_REPORTING_ORDER) as f:
            order = f.read().strip()
    except OSError:
        return "free page reporting: not in this kernel"
    if order == _NO_REPORTING_ORDER:
        state = "free page reporting: stopped for the run"
    else:
        state = "free page reporting: on (blocks of order %s)" % order
    return state + "; " + damon_state() + "; " + fuse_wake_state()


#: A FUSE module parameter of some kernels (this VM's 6.18 build has it,
#: off): on, cached READs cost the daemon less CPU (docs/performance.md,
#: "Threads, the GIL and wake-ups").  Machine-wide: shimfs never sets it.
FUSE_WAKE_HERE = "/sys/module/fuse/parameters/wake_here"


def fuse_wake_state() -> str:
    """What the results header says about ``wake_here``."""
    try:
        with open(FUSE_WAKE_HERE) as f:
            return "fuse wake_here: " + f.read().strip()
    except OSError:
        return "fuse wake_here: not in this kernel"


def damon_state() -> str:
    """What scripts/run-env.sh did with DAMON page-out (it says so in
    ``SHIMFS_DAMON_STATE``)."""
    return "DAMON page-out: " + os.environ.get("SHIMFS_DAMON_STATE",
                                               "not checked (run outside scripts/bench.sh)")


@contextlib.contextmanager
def page_reporting(mode: str = PAGE_REPORTING):
    """Run the block with free page reporting as ``mode`` says (see above)."""
    if mode not in ("keep", "off"):
        raise ValueError("SHIMFS_BENCH_PAGE_REPORTING must be keep or off, not %r" % mode)
    if mode == "keep" or not os.path.exists(_REPORTING_ORDER):
        yield
        return
    with open(_REPORTING_ORDER) as f:
        old = f.read().strip()
    with open(_REPORTING_ORDER, "w") as f:
        f.write(_NO_REPORTING_ORDER)
    try:
        _touch_free_memory()
        yield
    finally:
        with open(_REPORTING_ORDER, "w") as f:
            f.write(old)


def _touch_free_memory(keep_free: int = 2 << 30) -> None:
    """Write to (almost) all free memory once, so the host backs it again."""
    size = psutil.virtual_memory().available - keep_free
    if size <= 0:
        return
    size &= ~(64 * MIB - 1)
    zeros = bytes(64 * MIB)
    with mmap.mmap(-1, size) as m:
        for _ in range(size // len(zeros)):
            m.write(zeros)


class Rate(tuple):
    """(median, min, max) MB/s of some runs; ``runs``: the rates in run order;
    ``cpu``: median CPU seconds per process over those runs (see :class:`CpuMeter`)."""
    cpu: dict[str, float]
    runs: list[float]

    def __new__(cls, rates: list[float], cpu_runs: list[dict[str, float]]):
        self = super().__new__(cls, (statistics.median(rates), min(rates), max(rates)))
        self.runs = list(rates)
        names = {k for run in cpu_runs for k in run}
        self.cpu = {k: statistics.median(run.get(k, 0.0) for run in cpu_runs) for k in names}
        return self


class CpuMeter:
    """CPU seconds (user + system) spent by each process that moves the bytes:
    the benchmark itself ("app": page faults, copies), the FUSE daemon, and
    the stand-in's GlusterFS client and brick.  On 2 cores these add up to
    the wall time's ceiling, which is why the table reports them."""

    def __init__(self, daemon_pid: int | None = None):
        self.procs = {"app": psutil.Process()}
        if daemon_pid:
            self.procs["daemon"] = psutil.Process(daemon_pid)
        from shimfs import standin
        # The stand-in's own brick and client, by pid: the machine may run
        # other GlusterFS volumes.
        for name, pid in (("brick", standin.brick_pid()),
                          ("gluster client", standin.client_pid(0))):
            if pid:
                self.procs[name] = psutil.Process(pid)
        self.start()

    def _read(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = 0.0
        return out

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self) -> dict[str, float]:
        t1 = self._read()
        return {k: t1[k] - self.t0[k] for k in t1}


def median_rate(fn, nbytes: int, rounds: int = ROUNDS, setup=None) -> Rate:
    """(median, min, max) MB/s of ``fn`` over ``rounds`` cold runs, with CPU."""
    rates, cpu = [], []
    for _ in range(rounds):
        if setup:
            setup()
        meter = CpuMeter()
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t) / 1e6)
        cpu.append(meter.stop())
    return Rate(rates, cpu)


def record(workload: str, where: str, fs: str, mine, native, note: str = "",
           nbytes: int = 0, ratios: list[float] | None = None) -> None:
    """One row of the table; with ``nbytes``, also CPU seconds per GiB moved.
    ``ratios``: per-round ratios to the same round's native run (interleaved
    rounds); without them the ratio is median over median."""
    RESULTS.append(dict(workload=workload, where=where, fs=fs, mine=mine, native=native,
                        note=note, gib=nbytes / (1 << 30), ratios=ratios))


CPU_COLUMNS = ["app", "daemon", "gluster client", "brick"]


def cpu_table() -> str:
    """CPU seconds per GiB moved, per process, for the rows that measured it."""
    lines = ["| workload | backing | path | " + " | ".join(CPU_COLUMNS) +
             " | total | native total |", "| --- " * (len(CPU_COLUMNS) + 5) + "|"]
    for r in RESULTS:
        mine, nat = getattr(r["mine"], "cpu", None), getattr(r["native"], "cpu", None)
        if not r["gib"] or mine is None:
            continue
        per = {k: v / r["gib"] for k, v in mine.items()}
        native_total = sum(nat.values()) / r["gib"] if nat else float("nan")
        lines.append("| %s | %s | %s | %s | %.2f | %.2f |" % (
            r["workload"], r["where"], r["fs"],
            " | ".join("%.2f" % per[k] if k in per else "–" for k in CPU_COLUMNS),
            sum(per.values()), native_total))
    return "\n".join(lines) if len(lines) > 2 else ""


def split(offsets: list[int], threads: int) -> list[list[int]]:
    """``offsets`` dealt out to ``threads`` parts."""
    return [offsets[k::threads] for k in range(threads)]


def in_threads(fn, parts: list[list[int]]) -> None:
    """``fn(part)`` for each part, each in a thread of its own (one part: here)."""
    if len(parts) == 1:
        fn(parts[0])
        return
    ts = [threading.Thread(target=fn, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def touch_pages(m: mmap.mmap, parts: list[list[int]]) -> None:
    """Read one byte at each offset of ``parts`` in a mapping, a thread per
    part (:func:`in_threads`), each touch with the GIL released (a ctypes
    ``memmove`` from the mapping's address), as ``os.pread`` releases it for
    native reads.  ``m[off]`` takes the page fault with the GIL held, so
    threads would fault one at a time."""
    import numpy
    base = numpy.frombuffer(m, dtype=numpy.uint8).ctypes.data

    def touch(part: list[int]) -> None:
        one = ctypes.create_string_buffer(1)
        move = ctypes.memmove
        for off in part:
            move(one, base + off, 1)
    in_threads(touch, parts)


def touch_file(path: str, parts: list[list[int]]) -> None:
    """Open ``path``, map it and :func:`touch_pages` it at ``parts``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            touch_pages(m, parts)
    finally:
        os.close(fd)


def make_file(path: str, mib: int) -> str:
    if os.path.exists(path) and os.path.getsize(path) == mib * MIB:
        return path
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(chunk[i % 251:] + chunk[:i % 251])
    return path


def source_state() -> str:
    """Which code a run measured: the commit, and whether the tree had
    changes of its own (for the results header and the chart)."""
    top = os.path.join(os.path.dirname(__file__), "..")
    try:
        head = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "commit unknown"
    if head.returncode != 0:
        return "commit unknown"
    return "commit %s%s" % (head.stdout.strip(),
                            " with uncommitted changes" if dirty.stdout.strip() else "")


def chart(results: list[dict], path: str, title: str = "") -> None:
    """A PNG of every row's ratio to native (median of its rounds), one bar
    per path, grouped by workload and backing; skipped (with a line) when
    matplotlib is missing (``pip install -e '.[bench]'``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed")
        return
    import statistics
    rows = [r for r in results if r["ratios"] or r["native"][0]]
    if not rows:
        return
    labels, values, colors = [], [], []
    palette = {}
    for r in rows:
        ratio = statistics.median(r["ratios"]) if r["ratios"] else r["mine"][0] / r["native"][0]
        name = r["workload"].split(" vs ")[0]
        labels.append("%s [%s] %s" % (name[:58], r["where"], r["fs"]))
        values.append(ratio)
        colors.append(palette.setdefault(r["fs"], "C%d" % len(palette)))
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.2))
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ratio to native access in the same rounds (median)")
    if title:
        ax.set_title(title, fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, " %.2f" % v, va="center", fontsize=6)
    fig.tight_layout()
    fig.subplots_adjust(left=0.45)
    fig.savefig(path, dpi=110)
    plt.close(fig)
