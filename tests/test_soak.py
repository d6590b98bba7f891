"""A soak: several processes hammer one mount for a few minutes.

SHIMFS_SOAK_SECONDS sets the length (default 120).  Each writer owns a file
and keeps a model of it; a reader scans a shadow of a fixed file and checks
its checksum.  At the end every file must equal its model byte for byte and,
once everything is unlinked, the daemon must hold no cache slot.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import shimfs
from mounting import wait_until

SECONDS = int(os.environ.get("SHIMFS_SOAK_SECONDS", "120"))

WRITER = r"""
import mmap, os, random, sys, time
path, seed, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rnd = random.Random(seed)
model = bytearray()
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
end = time.monotonic() + seconds
ops = 0
while time.monotonic() < end:
    op = rnd.random()
    if op < 0.4:
        off = rnd.randrange(0, 3 << 20); n = rnd.randrange(1, 200000)
        data = bytes([rnd.randrange(256)]) * n
        os.pwrite(fd, data, off)
        if off > len(model): model.extend(bytes(off - len(model)))
        model[off:off + n] = data
    elif op < 0.6 and model:
        with mmap.mmap(fd, 0) as m:
            for _ in range(20):
                i = rnd.randrange(len(m)); v = rnd.randrange(256)
                m[i] = v; model[i] = v
            m.flush()
    elif op < 0.7:
        size = rnd.randrange(0, 3 << 20)
        os.ftruncate(fd, size)
        del model[size:]; model.extend(bytes(size - len(model)))
    elif op < 0.8:
        os.fsync(fd)
    else:
        off = rnd.randrange(0, len(model) + 1); n = rnd.randrange(0, 300000)
        got = os.pread(fd, n, off)
        assert got == bytes(model[off:off + n]), ("read mismatch", off, n)
    ops += 1
os.fsync(fd)
os.close(fd)
with open(path + ".model", "wb") as f:
    f.write(model)
print(ops)
"""

READER = r"""
import mmap, os, sys, time, zlib
path, want, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
scans = 0
while time.monotonic() < end:
    fd = os.open(path, os.O_RDONLY)
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
        assert zlib.crc32(m) == want
    os.close(fd)
    scans += 1
print(scans)
"""


def test_soak(mnt, backing, tmp_path):
    big = tmp_path / "big"
    blob = os.urandom(48 << 20)                 # more than the mount's 32 MiB cache
    big.write_bytes(blob)
    os.symlink(str(big), os.path.join(mnt, "big"))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, os.path.join(mnt, "w%d" % k), str(k),
                               str(SECONDS)], stdout=subprocess.PIPE, text=True)
             for k in range(3)]
    procs.append(subprocess.Popen([sys.executable, "-c", READER, os.path.join(mnt, "big"),
                                   str(zlib.crc32(blob)), str(SECONDS)],
                                  stdout=subprocess.PIPE, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=SECONDS + 180)
        assert p.returncode == 0
        assert int(out.strip()) > 0
    for k in range(3):
        with open(os.path.join(mnt, "w%d.model" % k), "rb") as f:
            model = f.read()
        with open(os.path.join(backing, "w%d" % k), "rb") as f:
            assert f.read() == model
    assert big.read_bytes() == blob
    for name in os.listdir(mnt):
        os.unlink(os.path.join(mnt, name))
    def released():                             # the kernel forgets unlinked inodes
        st = shimfs.stats(mnt)["mount"]
        return st["used_bytes"] == 0 and st["files"] == 0
    wait_until(released, 30, "the daemon to free every slot and file", interval=0.2)
