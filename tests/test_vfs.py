"""The VFS core driven in-process, with no kernel: namespace rules and data calls."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from shimfs.config import Config
from shimfs.errors import FsError
from shimfs.vfs import ROOT_INODE, Ctx, Vfs


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
        attr = vfs.lookup(ROOT_INODE, b"s")
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
            vfs.lookup(ROOT_INODE, b"x")
        assert e.value.errno == errno.ENOENT
        await vfs.mkdir(ROOT_INODE, b"d", 0o755, Ctx())
        d = vfs.lookup(ROOT_INODE, b"d").ino
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
