"""The README's demo: map a file that lives on a file system that refuses mmap.

1. start (or reuse) the GlusterFS stand-in for pvfs2;
2. write a dataset onto it (SHIMFS_DEMO_MIB, default 512 MiB);
3. show that mmap(MAP_SHARED) fails there;
4. mount shimfs, ln -s the dataset in, map it and scan every page;
5. print the throughput next to native pread of the same file; unmount.
"""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import time
import zlib

from shimfs import standin

MIB = 1 << 20


def drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def native_pread(path: str, block: int, limit: int) -> tuple[float, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        crc, off, t = 0, 0, time.perf_counter()
        while off < limit:
            b = os.pread(fd, block, off)
            if not b:
                break
            crc = zlib.crc32(b, crc) if block > 4096 else crc
            off += len(b)
        return off / (time.perf_counter() - t) / 1e6, crc
    finally:
        os.close(fd)


def mapped_scan(path: str) -> tuple[float, int]:
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            crc, t = 0, time.perf_counter()
            for off in range(0, size, 4 * MIB):
                crc = zlib.crc32(m[off:off + 4 * MIB], crc)   # touches every page
            return size / (time.perf_counter() - t) / 1e6, crc
    finally:
        os.close(fd)


def main() -> int:
    mib = int(os.environ.get("SHIMFS_DEMO_MIB", "512"))
    why = standin.available()
    if why:
        print("demo: %s" % why, file=sys.stderr)
        return 1
    was_up = os.path.ismount(standin.client_dir(0))
    root = standin.up()
    print("pvfs2 stand-in: GlusterFS volume on 127.0.0.2, mounted direct-io at %s" % root)
    data = os.path.join(root, "demo-dataset.bin")
    if not os.path.exists(data) or os.path.getsize(data) != mib * MIB:
        with open(data, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MIB))
    print("dataset: %s (%d MiB)" % (data, mib))
    fd = os.open(data, os.O_RDWR)
    try:
        mmap.mmap(fd, 0, mmap.MAP_SHARED)
        print("mmap(MAP_SHARED) on the stand-in: unexpectedly worked")
    except OSError as e:
        print("mmap(MAP_SHARED) on the stand-in: fails, errno %d (%s)" % (e.errno, e.strerror))
    finally:
        os.close(fd)

    drop_caches()
    native4m, crc_native = native_pread(data, 4 * MIB, mib * MIB)
    native4k, _ = native_pread(data, 4096, min(mib, 32) * MIB)
    mnt = tempfile.mkdtemp(prefix="shimfs-demo-")
    shimfs = [sys.executable, "-m", "shimfs"]
    subprocess.run(shimfs + ["mount", mnt], check=True)
    try:
        subprocess.run(["ln", "-s", data, mnt], check=True)
        shadow = os.path.join(mnt, os.path.basename(data))
        drop_caches()
        cold, crc_shim = mapped_scan(shadow)
        warm, _ = mapped_scan(shadow)
    finally:
        subprocess.run(shimfs + ["umount", mnt], check=True)
        os.rmdir(mnt)
        if not was_up and os.environ.get("SHIMFS_KEEP_STANDIN") != "1":
            standin.down()
    print("bytes identical through shimfs: %s" % ("yes" if crc_shim == crc_native else "NO"))
    print("native pread 4 KiB      : %8.1f MB/s" % native4k)
    print("native pread 4 MiB      : %8.1f MB/s" % native4m)
    print("shimfs mmap scan (cold) : %8.1f MB/s  (%.2fx native 4 MiB pread)" % (cold, cold / native4m))
    print("shimfs mmap scan (warm) : %8.1f MB/s" % warm)
    return 0 if crc_shim == crc_native else 1


if __name__ == "__main__":
    sys.exit(main())
