"""Benchmark fixtures: big files on the stand-in and on tmpfs, fresh mounts.

Cold workloads run in interleaved rounds: native, the naive pyfuse3
pass-through (bench/passthrough.py), libfuse's C passthrough_ll
(bench/cpeer.py), then shimfs, so that all of them see the machine as it
is in that minute.  Sizes come from the environment: SHIMFS_BENCH_MIB
(scan and random files, default 2048), SHIMFS_BENCH_WRITE_MIB (default
1024), SHIMFS_BENCH_RSS_MIB (default 4096).  SHIMFS_BENCH_PAGE_REPORTING=off
stops the VM's free page reporting for the run (benchlib.page_reporting).  Every figure is reported
as a ratio against the native path measured in the same run; the table is
printed at the end and written to bench/results.md with its chart
bench/results.png, or, with the brick warm (SHIMFS_BENCH_COLD=client, the
default), to bench/results-brick-warm.md and .png; a partial run (-k, -m,
smaller sizes, fewer rounds) to the same names with -partial added
(benchlib.results_stem).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from mounting import daemon_pid, shim_mount  # noqa: E402  (the tests' helpers)

from shimfs import standin  # noqa: E402

from benchlib import (COLD, RESULTS, ROUNDS, SCAN_MIB, WRITE_MIB, chart, cpu_table,  # noqa: E402
                      is_partial, make_file, page_reporting, page_reporting_state,
                      results_stem, source_state)


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    lines = ["| workload | backing | path | MB/s median (min–max) | native MB/s median | ratio median (min–max) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in RESULTS:
        m, n = r["mine"], r["native"]
        if r["ratios"]:
            q = r["ratios"]
            ratio = (statistics.median(q), min(q), max(q))
        else:
            ratio = (m[0] / n[0], m[1] / n[0], m[2] / n[0])
        lines.append("| %s | %s | %s | %.0f (%.0f–%.0f) | %.0f | **%.2f×** (%.2f–%.2f) %s |" % (
            r["workload"], r["where"], r["fs"], m[0], m[1], m[2], n[0], *ratio, r["note"]))
    table = "\n".join(lines)
    cpu = cpu_table()
    if cpu:
        table += ("\n\nCPU seconds per GiB moved (medians; the machine has 2 cores, so the"
                  " total over the run's wall time shows how busy it was):\n\n" + cpu)
    partial = is_partial(session.config.getoption("keyword"), session.config.getoption("markexpr"))
    stem = os.path.join(os.path.dirname(__file__), results_stem(partial))
    made = "%s, %s" % (time.strftime("%Y-%m-%d"), source_state())
    header = "%s; sizes: scan %d MiB, write %d MiB; %d rounds; %s; caches cold: %s." % (
        made, SCAN_MIB, WRITE_MIB, ROUNDS, STATE[0], COLD)
    with open(stem + ".md", "w") as f:
        f.write("%s\n\n%s\n" % (header, table))
    print("\n" + table)
    chart(RESULTS, stem + ".png", title="%s; caches cold: %s; %d rounds" % (made, COLD, ROUNDS))
    print("written to %s.md and .png" % os.path.relpath(stem))


STATE = ["free page reporting: not recorded"]


@pytest.fixture(scope="session", autouse=True)
def machine_memory():
    """SHIMFS_BENCH_PAGE_REPORTING (benchlib): keep or stop free page reporting."""
    with page_reporting():
        STATE[0] = page_reporting_state()
        yield


@pytest.fixture(scope="session")
def gluster_dir():
    why = standin.available()
    if why:
        pytest.skip(why)
    root = standin.up()
    d = os.path.join(root, "bench")
    os.makedirs(d, exist_ok=True)
    yield d


@pytest.fixture(scope="session", params=["gluster", "tmpfs"])
def where(request):
    if request.param == "gluster":
        return request.param, request.getfixturevalue("gluster_dir")
    d = tempfile.mkdtemp(prefix="shimfs-bench-", dir="/dev/shm")
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    return request.param, d


@pytest.fixture(scope="session")
def bigfile(where):
    return make_file(os.path.join(where[1], "scan-%d.bin" % SCAN_MIB), SCAN_MIB)


class Mounts:
    """Fresh mounts of shimfs or the naive pass-through, one per round."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.stack = contextlib.ExitStack()
        self.n = 0
        self.pid: int | None = None        # the current mount's daemon

    def shimfs(self, target: str, *opts: str) -> str:
        self.close()
        self.n += 1
        mnt = self.stack.enter_context(shim_mount(os.path.join(self.tmp, "m%d" % self.n),
                                                  self.tmp, *opts))
        os.symlink(target, os.path.join(mnt, "f"))
        self.pid = daemon_pid(mnt)
        return os.path.join(mnt, "f")

    def shimfs_dir(self, backing: str, *opts: str) -> str:
        """A fresh shimfs mount whose backing directory is ``backing``."""
        self.close()
        self.n += 1
        mnt = self.stack.enter_context(shim_mount(os.path.join(self.tmp, "m%d" % self.n),
                                                  backing, *opts))
        self.pid = daemon_pid(mnt)
        return mnt

    def _daemon(self, prefix: str, argv: list[str]) -> str:
        """Start a pass-through daemon (foreground) on a fresh mount point;
        it is unmounted and reaped when the mount is closed."""
        self.close()
        self.n += 1
        mnt = os.path.join(self.tmp, "%s%d" % (prefix, self.n))
        os.mkdir(mnt)
        proc = subprocess.Popen(argv + [mnt])
        for _ in range(200):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)

        def stop():
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
            proc.wait(30)
        self.stack.callback(stop)
        self.pid = proc.pid
        return mnt

    def passthrough(self, target: str) -> str:
        mnt = self._daemon("p", [sys.executable, os.path.join(os.path.dirname(__file__),
                                                               "passthrough.py"),
                                 os.path.dirname(target)])
        return os.path.join(mnt, os.path.basename(target))

    def c_peer(self, target: str, read_ahead_pages: int = 1024) -> str:
        """libfuse's C ``passthrough_ll`` (bench/cpeer.py) over ``target``'s
        directory, tuned for its best scan (kernel read-ahead 4 MiB,
        max_background 64): the issue's "best tuned C daemon".
        ``read_ahead_pages=32``: the kernel's default window (128 KiB)."""
        import cpeer
        from shimfs.tuning import tune
        exe = cpeer.binary()
        mnt = self._daemon("c", [exe, "-f", "-o", "source=" + os.path.dirname(target)])
        problems, _ = tune(mnt, read_ahead_pages)
        if problems:
            print("C peer not tuned: %s" % "; ".join(problems))
        return os.path.join(mnt, os.path.basename(target))

    def mount(self, fs: str, target: str, *opts: str) -> str:
        """A fresh mount of ``fs`` (shimfs, passthrough, passthrough_ll,
        passthrough_ll with the kernel's default read-ahead) showing ``target``."""
        if fs == "shimfs":
            return self.shimfs(target, *opts)
        if fs == "passthrough_ll":
            return self.c_peer(target)
        if fs == C_PEER_DEFAULT_RA:
            return self.c_peer(target, 32)
        return self.passthrough(target)

    def close(self):
        self.stack.close()
        self.stack = contextlib.ExitStack()


#: The C peer with the kernel's default read-ahead (128 KiB), for random access.
C_PEER_DEFAULT_RA = "passthrough_ll, read_ahead_kb=128"


@pytest.fixture(scope="session")
def peers() -> list[str]:
    """The other FUSE daemons each cold workload also runs through."""
    import cpeer
    out = ["passthrough"]
    try:
        cpeer.binary()
        out.append("passthrough_ll")
    except cpeer.Unavailable as exc:
        print("\nC peer left out: %s" % exc)
    return out


@pytest.fixture
def mounts(tmp_path):
    m = Mounts(str(tmp_path))
    yield m
    m.close()
