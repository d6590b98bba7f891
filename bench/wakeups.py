"""Where the daemon's threads wake, and what a cached READ costs, for each
setting of the fuse module's ``wake_here`` (a parameter of some kernels,
docs/performance.md, "Threads, the GIL and wake-ups"):

    .venv/bin/python bench/wakeups.py [--app-cpu N] [--touches N] [--settings N,Y,N,Y]

A 128 MiB file on ``/dev/shm`` is mounted through shimfs (``mirror``), read
once at random so that the daemon's cache holds it, and then, for each
setting in turn, touched ``--touches`` times at random through a fresh
``MADV_RANDOM`` mapping (one 4 KiB READ per touch, each answered by the wire
from the cache) by this process pinned to one CPU.  Printed per run: µs per
touch, the daemon's CPU µs per touch, its threads' migrations, and (with
``perf``) how many of the wake-ups of the daemon's threads landed on the
app's CPU.  The parameter is machine-wide: the old value is put back at the
end.  Root.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from benchlib import FUSE_WAKE_HERE  # noqa: E402
from mounting import daemon_pid, shim_mount  # noqa: E402

PAGE = 4096
SIZE = 128 << 20


def threads(pid: int) -> dict[str, tuple[int, int]]:
    """CPU ticks and migrations of each of ``pid``'s threads."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open("/proc/%d/task/%s/sched" % (pid, tid)) as f:
                mig = next((int(line.split()[-1]) for line in f
                            if line.startswith("se.nr_migrations")), 0)
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[tid] = (int(fields[11]) + int(fields[12]), mig)
    return out


def touch(path: str, offsets: list[int]) -> None:
    """One byte of each page at ``offsets``, through a fresh MADV_RANDOM
    mapping; the kernel's copies are dropped afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            m.madvise(mmap.MADV_RANDOM)
            for off in offsets:
                m[off]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def wakeups_by_cpu(data: str, tids: set[str]) -> dict[int, int]:
    """Wake-ups of ``tids`` in a ``perf record -e sched:sched_wakeup`` file,
    by the CPU they were placed on."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "trace"],
                         capture_output=True, text=True).stdout
    counts: dict[int, int] = {}
    for line in out.splitlines():
        if "target_cpu=" not in line or "pid=" not in line:
            continue
        if line.split("pid=", 1)[1].split()[0] in tids:
            cpu = int(line.split("target_cpu=", 1)[1].split()[0])
            counts[cpu] = counts.get(cpu, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app-cpu", type=int, default=1)
    ap.add_argument("--touches", type=int, default=20000)
    ap.add_argument("--settings", default="N,Y,N,Y")
    args = ap.parse_args()
    if not os.path.exists(FUSE_WAKE_HERE):
        sys.exit("wakeups: this kernel's fuse module has no wake_here parameter")
    settings = args.settings.split(",")
    if any(s not in ("N", "Y") for s in settings):
        sys.exit("wakeups: --settings takes N and Y, comma-separated")
    perf = shutil.which("perf")
    with open(FUSE_WAKE_HERE) as f:
        old = f.read().strip()
    work = tempfile.mkdtemp(prefix="shimfs-wakeups-")
    backing = tempfile.mkdtemp(prefix="shimfs-wakeups-", dir="/dev/shm")
    try:
        with open(os.path.join(backing, "f"), "wb") as f:
            f.write(os.urandom(SIZE))
        mnt = os.path.join(work, "m")
        with shim_mount(mnt, backing, "mirror"):
            pid = daemon_pid(mnt)
            path = os.path.join(mnt, "f")
            os.sched_setaffinity(0, {args.app_cpu})
            offsets = list(range(0, SIZE, PAGE))
            random.shuffle(offsets)
            touch(path, offsets)                # the daemon's cache now holds it all
            for setting in settings:
                with open(FUSE_WAKE_HERE, "w") as f:
                    f.write(setting)
                random.shuffle(offsets)
                rec = None
                data = os.path.join(work, "perf.data")
                if perf:
                    rec = subprocess.Popen([perf, "record", "-q", "-a", "-e", "sched:sched_wakeup",
                                            "-o", data], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                    time.sleep(1.5)             # perf is recording
                before = threads(pid)
                t = time.perf_counter()
                touch(path, offsets[:args.touches])
                took = time.perf_counter() - t
                after = threads(pid)
                ticks = sum(c - before.get(tid, (0, 0))[0] for tid, (c, _) in after.items())
                migrations = sum(m - before.get(tid, (0, 0))[1] for tid, (_, m) in after.items())
                line = "wake_here=%s: %.1f µs per touch, daemon %.1f µs CPU per touch, " \
                       "%d migrations of its threads" % (
                           setting, took / args.touches * 1e6,
                           ticks / os.sysconf("SC_CLK_TCK") / args.touches * 1e6, migrations)
                if rec:
                    rec.send_signal(signal.SIGINT)
                    rec.wait()
                    by_cpu = wakeups_by_cpu(data, set(after))
                    total = sum(by_cpu.values()) or 1
                    line += "; wake-ups of its threads: %d, %.0f%% on the app's CPU %d" % (
                        total, 100 * by_cpu.get(args.app_cpu, 0) / total, args.app_cpu)
                print(line, flush=True)
    finally:
        with open(FUSE_WAKE_HERE, "w") as f:
            f.write(old)
        shutil.rmtree(backing, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
