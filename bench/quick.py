"""Interleaved A/B runs of one workload, outside pytest: for deciding a change.

    .venv/bin/python bench/quick.py scan  --rounds 4 [--b-opt push] [--b-env NAME=VALUE]
                                           [--page-reporting keep|off]
    .venv/bin/python bench/quick.py write --rounds 4 ...
    .venv/bin/python bench/quick.py checkpoint --rounds 4 ...   # a new file (ftruncate + fill)
    .venv/bin/python bench/quick.py random --touches 2000 ...  # random 4 KiB touches vs pread
    .venv/bin/python bench/quick.py random --madvise ...  # the same, MADV_RANDOM (one READ each)
    .venv/bin/python bench/quick.py random --threads 8 ...  # touches and preads from 8 threads
    .venv/bin/python bench/quick.py random --opened-before ...  # the file was touched at random
                                                                # in an earlier open of the mount
    .venv/bin/python bench/quick.py copy ...      # the mapping copied out in 1 MiB memcpys
    .venv/bin/python bench/quick.py random --b-sys /sys/module/fuse/parameters/wake_here=Y

Each round runs native, then variant A (the mount with ``--a-opt``
options, defaults without), then variant B (A plus ``--b-opt`` mount options
and ``--b-env`` variables in the daemon's environment), each cold (client cache dropped, fresh mount), and
prints MB/s and CPU seconds per GiB per process.  ``--b-sys FILE=VALUE``
writes a kernel setting (sysfs or procfs) for variant B and puts the old
value back after it; such a setting may speed up native access as well
(a machine-wide FUSE parameter also reaches the stand-in's own client), so
each round then also runs native under it (``native-B``), and B's ratio is
to that.  On a 2-core VM whose speed
drifts (docs/performance.md, "Why runs vary"), only such interleaved pairs
compare; the bench (``scripts/bench.sh``) is what publishes figures.  Needs
the stand-in up (``python -m shimfs.standin up``) unless ``--dir`` says where
the files are.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from benchlib import (MIB, PAGE_REPORTING, in_threads, make_file,  # noqa: E402
                      page_reporting, page_reporting_state, split, touch_file,
                      touch_pages)
from mounting import daemon_pid, shim_mount  # noqa: E402
from test_throughput import (mapped_checkpoint, mapped_copy, mapped_scan,  # noqa: E402
                             mapped_write, native_checkpoint, native_scan, native_write,
                             timed_cold)


@contextlib.contextmanager
def environ(extra: dict[str, str]):
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def kernel_settings(values: dict[str, str]):
    """Write each FILE=VALUE (sysfs, procfs) and put the old values back."""
    old = {}
    try:
        for f, v in values.items():
            with open(f) as fh:
                old[f] = fh.read().strip()
            with open(f, "w") as fh:
                fh.write(v)
        yield
    finally:
        for f, v in old.items():
            with open(f, "w") as fh:
                fh.write(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=["scan", "copy", "write", "checkpoint", "random"])
    ap.add_argument("--touches", type=int, default=2000, help="random: pages touched")
    ap.add_argument("--threads", type=int, default=1,
                    help="random: touches (and native preads) split over this many threads")
    ap.add_argument("--opened-before", action="store_true",
                    help="random: each mount first opens the file and touches other pages "
                         "at random (untimed), so that the timed open is the file's second")
    ap.add_argument("--madvise", action="store_true",
                    help="random: MADV_RANDOM on the mapping (no read-around at all)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--mib", type=int, default=0, help="file size (scan 2048, write 1024)")
    ap.add_argument("--dir", help="where the file lives (default: the stand-in's client)")
    ap.add_argument("--a-opt", action="append", default=[],
                    help="mount option for variant A (and B, which adds --b-opt)")
    ap.add_argument("--b-opt", action="append", default=[], help="mount option for variant B")
    ap.add_argument("--b-env", action="append", default=[], help="NAME=VALUE for variant B")
    ap.add_argument("--b-sys", action="append", default=[],
                    help="FILE=VALUE: a kernel setting written for variant B (and native-B)")
    ap.add_argument("--page-reporting", choices=["keep", "off"], default=PAGE_REPORTING,
                    help="the VM's free page reporting during the runs (see benchlib)")
    args = ap.parse_args()

    if args.dir is None:
        from shimfs import standin
        args.dir = os.path.join(standin.client_dir(0), "bench")
    os.makedirs(args.dir, exist_ok=True)
    mib = args.mib or (2048 if args.workload in ("scan", "copy", "random") else 1024)
    name = "%s-%d.bin" % (args.workload, mib)
    path = os.path.join(args.dir, name)
    if args.workload != "checkpoint":
        make_file(path, mib)
    block = os.urandom(4 * MIB)

    def fresh():
        """A checkpoint writes a new file each time."""
        if args.workload == "checkpoint" and os.path.exists(path):
            os.unlink(path)
    fetched: dict[str, list[float]] = {"A": [], "B": []}
    if args.workload == "random":
        import mmap
        import random
        rnd = random.Random(1)
        offsets = [rnd.randrange(mib * MIB // 4096) * 4096 for _ in range(args.touches)]
        parts = split(offsets, args.threads)
        earlier = [rnd.randrange(mib * MIB // 4096) * 4096 for _ in range(200)]

        def before_fn(p):
            touch_file(p, [earlier])

        def nat_fn(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                in_threads(lambda part: [os.pread(fd, 4096, off) for off in part], parts)
            finally:
                os.close(fd)

        def map_fn(p):
            import shimfs
            before = shimfs.stats(p)["file"].get("bytes_fetched", 0)
            fd = os.open(p, os.O_RDONLY)
            try:
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
                    if args.madvise:
                        m.madvise(mmap.MADV_RANDOM)
                    touch_pages(m, parts)
            finally:
                os.close(fd)
            fetched[current[0]].append((shimfs.stats(p)["file"]["bytes_fetched"] - before)
                                       / (len(offsets) * 4096))
    elif args.workload == "checkpoint":
        def nat_fn(p):
            native_checkpoint(p, mib * MIB, block)

        def map_fn(p):
            mapped_checkpoint(p, mib * MIB, block)
    elif args.workload == "scan":
        nat_fn, map_fn = native_scan, mapped_scan
    elif args.workload == "copy":
        nat_fn, map_fn = native_scan, mapped_copy
    else:
        def nat_fn(p):
            native_write(p, block)

        def map_fn(p):
            mapped_write(p, block)
    b_env = dict(kv.split("=", 1) for kv in args.b_env)
    b_sys = dict(kv.rsplit("=", 1) for kv in args.b_sys)
    variants = {"A": (args.a_opt, {}), "B": (args.a_opt + args.b_opt, b_env)}
    rows: dict[str, list[tuple[float, dict[str, float]]]] = {"native": [], "A": [], "B": []}
    if b_sys:
        rows["native-B"] = []
    gib = mib / 1024
    nbytes = mib * MIB if args.workload != "random" else args.touches * 4096
    current = [""]
    with page_reporting(args.page_reporting), \
            tempfile.TemporaryDirectory(prefix="shimfs-quick-") as tmp:
        print(page_reporting_state())
        for r in range(args.rounds):
            fresh()
            rows["native"].append(timed_cold(nat_fn, path, nbytes, None, path))
            for v, (opts, env) in variants.items():
                fresh()
                current[0] = v
                settings = contextlib.nullcontext()
                if v == "B" and b_sys:
                    settings = kernel_settings(b_sys)
                    with kernel_settings(b_sys):
                        rows["native-B"].append(timed_cold(nat_fn, path, nbytes, None, path))
                    fresh()
                mnt = os.path.join(tmp, "%s%d" % (v, r))
                if args.workload == "checkpoint":      # created in the mount
                    backing, shown = args.dir, name
                else:                                   # a shadow of the file
                    backing, shown = tmp, "f"
                with settings, environ(env), shim_mount(mnt, backing, *opts) as m:
                    if shown == "f":
                        os.symlink(path, os.path.join(m, "f"))
                    pid = daemon_pid(m)
                    if args.workload == "random" and args.opened_before:
                        before_fn(os.path.join(m, shown))
                    rows[v].append(timed_cold(map_fn, os.path.join(m, shown), nbytes, pid,
                                              path))
            print("round %d: %s" % (r + 1, "  ".join(
                "%s %.0f MB/s" % (k, v[-1][0]) for k, v in rows.items())), flush=True)
        fresh()
    for v, runs in rows.items():
        rates = [rate for rate, _ in runs]
        base = rows["native-B"] if v == "B" and b_sys else rows["native"]
        ratio = statistics.median(rate / n for (rate, _), (n, _) in zip(runs, base))
        cpu = {k: statistics.median(c.get(k, 0.0) for _, c in runs) / gib for k in runs[0][1]}
        print("%-8s %5.0f MB/s (%.0f-%.0f)  %.2fx native  CPU s/GiB: %s" % (
            v, statistics.median(rates), min(rates), max(rates),
            ratio,
            ", ".join("%s %.2f" % kv for kv in sorted(cpu.items()))))
        if fetched.get(v):
            print("       bytes fetched per byte touched: %s" % " ".join(
                "%.1f" % f for f in fetched[v]))


if __name__ == "__main__":
    main()
