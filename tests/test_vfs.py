"""The VFS core driven in-process, with no kernel: namespace rules and data calls."""
from __future__ import annotations

import errno
import os
import stat
import time

import pytest
import trio

from shimfs.config import Config
from shimfs.errors import FsError
from shimfs.names import ROOT_INODE
from shimfs.nodes import Ctx
from shimfs.vfs import Vfs


def run(fn):
    return trio.run(fn)


@pytest.fixture
def vfs(tmp_path):
    (tmp_path / "b").mkdir()
    return Vfs(Config(backing=str(tmp_path / "b"), cache_size=16 << 20))


def test_symlink_answers_link_then_lookup_finds_regular_file(vfs, tmp_path):
    target = tmp_path / "t"
    target.write_bytes(b"hello world")

    async def go():
        link = await vfs.symlink(ROOT_INODE, b"s", os.fsencode(target), Ctx())
        assert stat.S_ISLNK(link.mode) and link.timeout == 0
        assert vfs.readlink(link.ino) == os.fsencode(target)
        attr = await vfs.lookup(ROOT_INODE, b"s")
        assert stat.S_ISREG(attr.mode) and attr.ino != link.ino and attr.size == 11
        fh = await vfs.open(attr.ino, os.O_RDWR, Ctx())
        assert await vfs.read(fh, 6, 100) == b"world"
        await vfs.write(fh, 0, b"HELLO")
        await vfs.fsync(fh)
        await vfs.release(fh)
        await vfs.unlink(ROOT_INODE, b"s")
        vfs.forget(attr.ino, 1)
        vfs.forget(link.ino, 1)
        assert attr.ino not in vfs.inodes and link.ino not in vfs.links
    run(go)
    assert target.read_bytes() == b"HELLO world"


def test_namespace_errors(vfs, tmp_path):
    async def go():
        with pytest.raises(FsError) as e:
            await vfs.lookup(ROOT_INODE, b"x")
        assert e.value.errno == errno.ENOENT
        await vfs.mkdir(ROOT_INODE, b"d", 0o755, Ctx())
        d = (await vfs.lookup(ROOT_INODE, b"d")).ino
        fh, _ = await vfs.create(d, b"f", stat.S_IFREG | 0o644, os.O_RDWR, Ctx())
        await vfs.release(fh)
        for call, err in [
            (vfs.rmdir(ROOT_INODE, b"d"), errno.ENOTEMPTY),
            (vfs.unlink(ROOT_INODE, b"d"), errno.EISDIR),
            (vfs.mkdir(ROOT_INODE, b"d", 0o755, Ctx()), errno.EEXIST),
            (vfs.rename(ROOT_INODE, b"d", d, b"inside"), errno.EINVAL),
            (vfs.symlink(ROOT_INODE, b"s", os.fsencode(tmp_path), Ctx()), errno.EISDIR),
            (vfs.link(ROOT_INODE, ROOT_INODE, b"h"), errno.EPERM),
        ]:
            with pytest.raises(FsError) as e:
                await call
            assert e.value.errno == err
    run(go)
    assert (tmp_path / "b" / "d" / "f").exists()


def test_rename_never_clobbers_a_hidden_backing_file(vfs, tmp_path):
    (tmp_path / "b" / "hidden").write_bytes(b"keep me")

    async def go():
        fh, _ = await vfs.create(ROOT_INODE, b"new", stat.S_IFREG | 0o644, os.O_RDWR, Ctx())
        await vfs.release(fh)
        with pytest.raises(FsError) as e:
            await vfs.rename(ROOT_INODE, b"new", ROOT_INODE, b"hidden")
        assert e.value.errno == errno.EEXIST
    run(go)
    assert (tmp_path / "b" / "hidden").read_bytes() == b"keep me"


def test_files_in_memory_are_read_inline_without_read_ahead(tmp_path):
    """A backing file on tmpfs: READs that miss are served on the calling
    (trio) thread and nothing is prefetched; elsewhere the usual path."""
    import shimcore
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    fd = os.open(shm, os.O_RDONLY)
    try:
        if shimcore.fs_magic(fd) not in shimcore.MEMORY_FS_MAGIC:
            pytest.skip("/dev/shm is not tmpfs")
    finally:
        os.close(fd)
    (tmp_path / "b").mkdir()
    data = os.urandom(3 << 20)
    targets = {b"mem": os.path.join(shm, "shimfs-test-%d" % os.getpid()), b"disk": str(tmp_path / "t")}
    for t in targets.values():
        with open(t, "wb") as f:
            f.write(data)
    vfs = Vfs(Config(backing=str(tmp_path / "b"), cache_size=16 << 20, read_ahead=16))
    c = vfs.cache.counters

    async def scan(name):
        await vfs.symlink(ROOT_INODE, name, os.fsencode(targets[name]), Ctx())
        attr = await vfs.lookup(ROOT_INODE, name)
        fh = await vfs.open(attr.ino, os.O_RDONLY, Ctx())
        for off in range(0, len(data), 1 << 20):
            assert bytes(await vfs.read(fh, off, 1 << 20)) == data[off:off + (1 << 20)]
        while vfs.cache.prefetches_in_flight:
            await trio.sleep(0.01)
        st = vfs.stats(vfs.inodes[attr.ino])
        await vfs.release(fh)
        return st

    async def go():
        async with trio.open_nursery() as nursery:
            vfs.cache.nursery = nursery
            st = await scan(b"mem")
            assert st["file"]["backing_in_memory"] is True
            assert c["reads_inline"] == 3 and c["prefetches"] == 0
            st = await scan(b"disk")
            on_disk_in_memory = st["file"]["backing_in_memory"]
            vfs.cache.nursery = None
        if not on_disk_in_memory:              # tmp_path on a real disk: the usual path
            assert c["reads_inline"] == 3 and c["prefetches"] > 0
    try:
        run(go)
    finally:
        os.unlink(targets[b"mem"])


def test_sequential_handles_share_the_read_ahead_budget(tmp_path):
    """Two handles reading sequentially split the mount's read-ahead budget
    (stats: read_ahead_streams); releasing them gives it back, and the
    bytes read are exact."""
    (tmp_path / "b").mkdir()
    data = os.urandom(8 << 20)
    for name in ("x", "y"):
        (tmp_path / name).write_bytes(data)
    vfs = Vfs(Config(backing=str(tmp_path / "b"), cache_size=16 << 20, read_ahead=256))
    total = vfs.cache.budget.total                      # a quarter of the cache: 4 MiB
    assert vfs.cache.max_window == total                # one stream alone could take it all

    async def go():
        async with trio.open_nursery() as nursery:
            vfs.cache.nursery = nursery
            fhs = []
            for name in (b"x", b"y"):
                await vfs.symlink(ROOT_INODE, name, os.fsencode(str(tmp_path / name.decode())),
                                  Ctx())
                fhs.append(await vfs.open((await vfs.lookup(ROOT_INODE, name)).ino, os.O_RDONLY, Ctx()))
            node = vfs.handles[fhs[0]].node
            if node.in_memory:
                pytest.skip("tmp_path is in memory: no read-ahead there")
            for off in range(0, 4 << 20, 256 << 10):     # both sequential, interleaved
                for fh in fhs:
                    assert bytes(await vfs.read(fh, off, 256 << 10)) == data[off:off + (256 << 10)]
            st = vfs.stats(node)
            assert st["mount"]["read_ahead_budget"] == total
            assert st["mount"]["read_ahead_streams"] == 2
            assert st["file"]["read_ahead_window"] == total // 2
            for fh in fhs:
                await vfs.release(fh)
            assert vfs.stats(node)["mount"]["read_ahead_streams"] == 0
            while vfs.cache.prefetches_in_flight:
                await trio.sleep(0.01)
            vfs.cache.nursery = None
    run(go)


class _SlowPrefetchEngine:
    """The real engine, with prefetches that take a while and a log of calls."""

    def __init__(self, real):
        self.real = real
        self.log: list[str] = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def prefetch_async(self, fid, off, n):
        return False        # refused: prefetches take the trio path, whose lifetime is tested here

    def prefetch(self, fid, off, n):
        time.sleep(0.05)
        done = self.real.prefetch(fid, off, n)
        self.log.append("prefetch")
        return done

    def unregister(self, fid):
        self.log.append("unregister")
        return self.real.unregister(fid)


def test_removed_file_is_forgotten_only_after_its_prefetches(tmp_path):
    """A prefetch outlives the handle that started it; the engine must not
    forget the file (nor its fd be closed) while the prefetch reads into it."""
    (tmp_path / "b").mkdir()
    target = tmp_path / "t"
    data = os.urandom(2 << 20)
    target.write_bytes(data)
    vfs = Vfs(Config(backing=str(tmp_path / "b"), cache_size=16 << 20, read_ahead=16))
    engine = vfs.cache.engine = _SlowPrefetchEngine(vfs.cache.engine)

    async def go():
        async with trio.open_nursery() as nursery:
            vfs.cache.nursery = nursery
            await vfs.symlink(ROOT_INODE, b"s", os.fsencode(target), Ctx())
            attr = await vfs.lookup(ROOT_INODE, b"s")
            fh = await vfs.open(attr.ino, os.O_RDONLY, Ctx())
            for off in range(0, 512 << 10, 64 << 10):       # a sequential run
                assert await vfs.read(fh, off, 64 << 10) == data[off:off + (64 << 10)]
            assert vfs.cache.prefetches_in_flight > 0
            await vfs.release(fh)
            await vfs.unlink(ROOT_INODE, b"s")
            vfs.forget(attr.ino, 1)
            assert attr.ino in vfs.inodes          # kept while prefetches run
            while vfs.cache.prefetches_in_flight:
                await trio.sleep(0.01)
            assert attr.ino not in vfs.inodes      # and freed right after
            vfs.cache.nursery = None
    run(go)
    assert engine.log.count("unregister") == 1 and engine.log[-1] == "unregister"
    assert "prefetch" in engine.log and vfs.cache.prefetch_errors == 0


def test_removed_file_is_forgotten_only_after_its_background_writeback(tmp_path):
    """The flusher's write-back outlives every handle too: a file removed
    meanwhile is freed once it ends, not under it."""
    (tmp_path / "b").mkdir()
    vfs = Vfs(Config(backing=str(tmp_path / "b"), cache_size=16 << 20))

    class SlowWriteback(_SlowPrefetchEngine):
        def writeback(self, fid):
            time.sleep(0.1)
            self.log.append("writeback")
            return self.real.writeback(fid)
    engine = vfs.cache.engine = SlowWriteback(vfs.cache.engine)

    async def go():
        async with trio.open_nursery() as nursery:
            vfs.cache.nursery = nursery
            fh, attr = await vfs.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, os.O_RDWR, Ctx())
            await vfs.write(fh, 0, b"x" * 10000)
            node = vfs.inodes[attr.ino]
            vfs.cache.engine.real.writeback(node.fid)         # release has nothing to do
            await vfs.release(fh)
            vfs.cache.engine.real.write(node.fid, 0, b"y" * 100)   # dirty again, no handle
            vfs.writeback.start_background(node)                       # what the flusher does
            await trio.sleep(0.02)
            await vfs.unlink(ROOT_INODE, b"f")
            vfs.forget(attr.ino, 1)
            assert attr.ino in vfs.inodes                     # kept while it writes back
            while node.background:
                await trio.sleep(0.01)
            assert attr.ino not in vfs.inodes
            vfs.cache.nursery = None
    run(go)
    assert engine.log == ["writeback", "unregister"]


def test_mtime_moves_when_the_last_writer_is_released(vfs, tmp_path):
    """A new mtime makes the kernel drop the file's whole page cache, so
    writes move ctime at once, and mtime when no handle writes any more or
    at the flusher's next tick."""
    target = tmp_path / "t"
    target.write_bytes(b"x" * 10000)

    async def go():
        await vfs.symlink(ROOT_INODE, b"s", os.fsencode(target), Ctx())
        ino = (await vfs.lookup(ROOT_INODE, b"s")).ino
        before = vfs.getattr(ino)
        w1 = await vfs.open(ino, os.O_RDWR, Ctx())
        w2 = await vfs.open(ino, os.O_WRONLY, Ctx())
        r = await vfs.open(ino, os.O_RDONLY, Ctx())
        await vfs.write(w1, 0, b"new")
        during = vfs.getattr(ino)
        assert during.mtime_ns == before.mtime_ns
        assert during.ctime_ns > before.ctime_ns
        await vfs.release(w1)
        assert vfs.getattr(ino).mtime_ns == before.mtime_ns     # w2 still writes
        vfs.publish_mtimes()                                    # the flusher's tick
        ticked = vfs.getattr(ino).mtime_ns
        assert ticked > before.mtime_ns
        await vfs.release(w2)
        assert vfs.getattr(ino).mtime_ns == ticked              # no write since
        await vfs.write(w2 := await vfs.open(ino, os.O_WRONLY, Ctx()), 3, b"more")
        assert vfs.getattr(ino).mtime_ns == ticked
        await vfs.release(w2)
        after = vfs.getattr(ino)
        assert after.mtime_ns > ticked
        assert after.mtime_ns <= after.ctime_ns
        await vfs.release(r)
        # an explicit mtime (touch -m) during a write stays
        w = await vfs.open(ino, os.O_RDWR, Ctx())
        await vfs.write(w, 0, b"again")
        await vfs.setattr(ino, Ctx(), mtime_ns=123_000_000_000)
        await vfs.release(w)
        assert vfs.getattr(ino).mtime_ns == 123_000_000_000
        assert await vfs.read(await vfs.open(ino, os.O_RDONLY, Ctx()), 0, 5) == b"again"
    run(go)
