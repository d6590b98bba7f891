"""The namespace rules and the control xattrs, driven in-process (no kernel).

Each test builds a :class:`Vfs` over a temporary backing directory and calls
its operations the way the adapter would.  What only a kernel can show
(mappings, the kernel's caches, permissions of a root daemon) stays in the
real-mount tests.
"""
from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import trio

from shimfs.config import Config
from shimfs.control import parse_range
from shimfs.errors import FsError, fs_error
from shimfs.names import (READDIR_ENTRIES, ROOT_INODE, XATTR_BACKING, XATTR_MULTIWRITE, XATTR_PID, XATTR_PREFIX,
                          XATTR_REFRESH, XATTR_STATS, XATTR_SYNC)
from shimfs.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE
from shimfs.nodes import Ctx
from shimfs.vfs import Vfs

REG = stat.S_IFREG | 0o644


@pytest.fixture
def fs(tmp_path):
    (tmp_path / "b").mkdir()
    return Vfs(Config(backing=str(tmp_path / "b"), cache_size=16 << 20))


def run(fn, *args):
    return trio.run(fn, *args)


async def fails(call) -> int:
    """The errno a VFS call fails with, 0 if it succeeds: ``call`` is a
    coroutine, or a function for the calls that do not await."""
    try:
        r = call() if callable(call) else call
        if hasattr(r, "__await__"):
            await r
    except Exception as exc:
        return fs_error(exc).errno      # as the adapter answers the kernel
    return 0


def errno_of(call) -> int:
    """``fails`` from outside trio."""
    return trio.run(fails, call)


async def listing(fs, ino) -> dict[bytes, object]:
    """What readdir shows in directory ``ino``, as ls would get it: name -> Attr."""
    fh = fs.opendir(ino)
    try:
        return {name: attr for name, attr, _ in await fs.readdir(fh, 0)}
    finally:
        fs.releasedir(fh)


async def made(fs, name: bytes, data: bytes):
    """Create ``name`` in the root through the VFS, write ``data``, close it;
    returns its attributes."""
    fh, attr = await fs.create(ROOT_INODE, name, REG, os.O_RDWR, Ctx())
    await fs.write(fh, 0, data)
    await fs.release(fh)
    return attr


async def listdir(fs, ino) -> list[bytes]:
    """The names readdir shows in directory ``ino``, sorted (with ``-o
    mirror`` readdir gives them in the backing directory's order)."""
    return sorted(await listing(fs, ino))


async def make(fs, parent, name, data=b""):
    fh, attr = await fs.create(parent, name, REG, os.O_RDWR, Ctx())
    if data:
        await fs.write(fh, 0, data)
    await fs.release(fh)
    return fs.getattr(attr.ino)


def test_created_files_and_directories_mirror_the_backing_tree(fs, tmp_path):
    b = tmp_path / "b"

    async def go():
        d = await fs.mkdir(ROOT_INODE, b"d", 0o755, Ctx())
        assert stat.S_ISDIR(d.mode) and (b / "d").is_dir()
        a = await make(fs, d.ino, b"f", b"12345")
        assert stat.S_ISREG(a.mode) and a.size == 5 and a.nlink == 1
        assert (b / "d" / "f").read_bytes() == b"12345"
        assert fs.getattr(d.ino).nlink == 2
        assert fs.getattr(ROOT_INODE).nlink == 3
        await fs.unlink(d.ino, b"f")
        assert not (b / "d" / "f").exists()
        await fs.rmdir(ROOT_INODE, b"d")
        assert not (b / "d").exists()
    run(go)


def test_mkdir_adopts_a_backing_directory_left_from_before(fs, tmp_path):
    (tmp_path / "b" / "old").mkdir()
    (tmp_path / "b" / "file").write_bytes(b"x")

    async def go():
        await fs.mkdir(ROOT_INODE, b"old", 0o755, Ctx())
        assert (tmp_path / "b" / "old").is_dir()
        assert await fails(fs.mkdir(ROOT_INODE, b"file", 0o755, Ctx())) == errno.EEXIST
    run(go)


def test_create_exclusive_and_reopen(fs, tmp_path):
    async def go():
        await make(fs, ROOT_INODE, b"f", b"abc")
        with pytest.raises(FsError) as e:
            await fs.create(ROOT_INODE, b"f", REG, os.O_RDWR | os.O_EXCL, Ctx())
        assert e.value.errno == errno.EEXIST
        fh, attr = await fs.create(ROOT_INODE, b"f", REG, os.O_RDWR, Ctx())
        assert attr.size == 3 and await fs.read(fh, 0, 10) == b"abc"
        await fs.release(fh)
        with pytest.raises(FsError) as e:
            await fs.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o644, Ctx())
        assert e.value.errno == errno.EPERM
        await fs.mknod(ROOT_INODE, b"plain", REG, Ctx())
    run(go)
    assert (tmp_path / "b" / "plain").read_bytes() == b""


@pytest.mark.parametrize("name, err", [(b"a/b", errno.EINVAL), (b".", errno.EINVAL),
                                       (b"..", errno.EINVAL), (b"", errno.EINVAL),
                                       (b"x" * 256, errno.ENAMETOOLONG)])
def test_bad_names(fs, name, err):
    assert errno_of(fs.mkdir(ROOT_INODE, name, 0o755, Ctx())) == err
    assert errno_of(fs.create(ROOT_INODE, name, REG, os.O_RDWR, Ctx())) == err


def test_shadows_keep_their_target_and_follow_the_caller_cwd(fs, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "t"
    target.write_bytes(b"target bytes")
    monkeypatch.chdir(tmp_path / "data")

    async def go():
        await fs.symlink(ROOT_INODE, b"s", b"t", Ctx(pid=os.getpid()))    # relative to cwd
        a = await fs.lookup(ROOT_INODE, b"s")
        assert fs.getxattr(a.ino, XATTR_BACKING) == os.fsencode(target)
        assert await fails(fs.symlink(ROOT_INODE, b"s", b"t", Ctx(pid=os.getpid()))) == errno.EEXIST
        await fs.rename(ROOT_INODE, b"s", ROOT_INODE, b"moved")
        await fs.unlink(ROOT_INODE, b"moved")
    run(go)
    assert target.read_bytes() == b"target bytes"         # never moved, never deleted
    assert os.listdir(tmp_path / "b") == []


def test_shadow_targets_must_be_regular_files(fs, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert errno_of(fs.symlink(ROOT_INODE, b"p", os.fsencode(fifo), Ctx())) == errno.EINVAL
    assert errno_of(fs.symlink(ROOT_INODE, b"d", os.fsencode(tmp_path), Ctx())) == errno.EISDIR
    assert errno_of(fs.symlink(ROOT_INODE, b"m", os.fsencode(tmp_path / "no"), Ctx())) \
        == errno.ENOENT
    assert errno_of(fs.symlink(ROOT_INODE, b"e", b"", Ctx())) == errno.ENOENT


def test_read_only_target_makes_a_read_only_shadow(fs, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root opens read-only files for writing anyway")
    target = tmp_path / "ro"
    target.write_bytes(b"ro")
    target.chmod(0o444)

    async def go():
        await fs.symlink(ROOT_INODE, b"s", os.fsencode(target), Ctx())
        ino = (await fs.lookup(ROOT_INODE, b"s")).ino
        assert await fails(fs.open(ino, os.O_RDWR, Ctx())) == errno.EACCES
        fh = await fs.open(ino, os.O_RDONLY, Ctx())
        assert await fs.read(fh, 0, 2) == b"ro"
        await fs.release(fh)
    run(go)


def test_rename_rules(fs, tmp_path):
    b = tmp_path / "b"
    (tmp_path / "t").write_bytes(b"shadowed")

    async def go():
        d = await fs.mkdir(ROOT_INODE, b"d", 0o755, Ctx())
        e = await fs.mkdir(ROOT_INODE, b"e", 0o755, Ctx())
        await make(fs, d.ino, b"f", b"in d")
        await make(fs, e.ino, b"g", b"in e")
        await make(fs, ROOT_INODE, b"top", b"top")
        # flags and kinds
        assert await fails(fs.rename(ROOT_INODE, b"top", d.ino, b"f", RENAME_NOREPLACE)) \
            == errno.EEXIST
        assert await fails(fs.rename(ROOT_INODE, b"top", d.ino, b"f", RENAME_EXCHANGE)) \
            == errno.EINVAL
        assert await fails(fs.rename(ROOT_INODE, b"top", ROOT_INODE, b"d")) == errno.EISDIR
        assert await fails(fs.rename(ROOT_INODE, b"d", ROOT_INODE, b"top")) == errno.ENOTDIR
        assert await fails(fs.rename(ROOT_INODE, b"d", ROOT_INODE, b"e")) == errno.ENOTEMPTY
        assert await fails(fs.rename(ROOT_INODE, b"nothing", ROOT_INODE, b"x")) == errno.ENOENT
        # a created file replaces another: the backing files follow
        await fs.rename(ROOT_INODE, b"top", d.ino, b"f")
        assert (b / "d" / "f").read_bytes() == b"top" and not (b / "top").exists()
        # a directory moves with its files, whose later writes land in the new place
        await fs.rename(ROOT_INODE, b"d", e.ino, b"d2")
        assert (b / "e" / "d2" / "f").read_bytes() == b"top"
        f = await fs.lookup((await fs.lookup(e.ino, b"d2")).ino, b"f")
        fh = await fs.open(f.ino, os.O_RDWR, Ctx())
        await fs.write(fh, 0, b"TOP")
        await fs.fsync(fh)
        await fs.release(fh)
        assert (b / "e" / "d2" / "f").read_bytes() == b"TOP"
        # a shadow replacing a created file removes that file's backing file
        await fs.symlink(ROOT_INODE, b"s", os.fsencode(tmp_path / "t"), Ctx())
        await fs.rename(ROOT_INODE, b"s", e.ino, b"g")
        assert not (b / "e" / "g").exists()
        assert (tmp_path / "t").read_bytes() == b"shadowed"
        g = await fs.lookup(e.ino, b"g")
        assert fs.getxattr(g.ino, XATTR_BACKING) == os.fsencode(tmp_path / "t")
    run(go)


def test_unlinked_open_file_keeps_serving_its_handle(fs, tmp_path):
    async def go():
        fh, attr = await fs.create(ROOT_INODE, b"f", REG, os.O_RDWR, Ctx())
        await fs.write(fh, 0, b"still here")
        await fs.unlink(ROOT_INODE, b"f")
        assert fs.getattr(attr.ino).nlink == 0
        assert await fails(fs.lookup(ROOT_INODE, b"f")) == errno.ENOENT
        assert await fs.read(fh, 0, 100) == b"still here"
        await fs.release(fh)
        assert attr.ino in fs.inodes            # the kernel still holds a reference
        fs.forget(attr.ino, 1)
        assert attr.ino not in fs.inodes
        assert await fails(lambda: fs.getattr(attr.ino)) == errno.ENOENT
    run(go)


def test_readdir_lists_sorted_entries_from_an_offset(fs):
    async def go():
        for name in (b"c", b"a", b"b"):
            await make(fs, ROOT_INODE, name)
        await fs.mkdir(ROOT_INODE, b"dir", 0o755, Ctx())
        dh = fs.opendir(ROOT_INODE)
        names = [(n, nxt) for n, _, nxt in await fs.readdir(dh, 0)]
        assert names == [(b"a", 1), (b"b", 2), (b"c", 3), (b"dir", 4)]
        await make(fs, ROOT_INODE, b"aa")            # the listing of this opendir stays
        assert [n for n, _, _ in await fs.readdir(dh, 2)] == [b"c", b"dir"]
        assert list(await fs.readdir(dh, 4)) == []
        fs.releasedir(dh)
        assert await fails(fs.readdir(dh, 0)) == errno.EBADF
        assert [n for n in await listdir(fs, ROOT_INODE)] == [b"a", b"aa", b"b", b"c", b"dir"]
        f = (await fs.lookup(ROOT_INODE, b"a")).ino
        assert await fails(lambda: fs.opendir(f)) == errno.ENOTDIR
        assert await fails(fs.rmdir(ROOT_INODE, b"a")) == errno.ENOTDIR
    run(go)


# -- the control xattrs ------------------------------------------------------

def test_listxattr_and_getxattr(fs, tmp_path):
    async def go():
        a = await make(fs, ROOT_INODE, b"f", b"x" * 5000)
        d = await fs.mkdir(ROOT_INODE, b"d", 0o755, Ctx())
        assert fs.listxattr(a.ino) == [XATTR_BACKING.encode(), XATTR_MULTIWRITE.encode(),
                                       XATTR_STATS.encode()]
        assert fs.listxattr(ROOT_INODE) == [XATTR_STATS.encode(), XATTR_PID.encode()]
        assert fs.listxattr(d.ino) == [XATTR_STATS.encode()]
        assert fs.getxattr(a.ino, XATTR_BACKING) == os.fsencode(tmp_path / "b" / "f")
        assert fs.getxattr(a.ino, XATTR_MULTIWRITE) == b"0"
        assert fs.getxattr(ROOT_INODE, XATTR_PID) == str(os.getpid()).encode()
        for ino, name in [(ROOT_INODE, XATTR_BACKING), (d.ino, XATTR_PID),
                          (a.ino, "user.other"), (a.ino, XATTR_SYNC)]:
            assert await fails(lambda: fs.getxattr(ino, name)) == errno.ENODATA
        st = json.loads(fs.getxattr(a.ino, XATTR_STATS))
        assert st["file"]["size"] == 5000 and st["file"]["shadow"] is False
        assert st["file"]["dirty_bytes"] == 0           # release wrote it back
        assert st["mount"]["files"] == 1
        assert "file" not in json.loads(fs.getxattr(ROOT_INODE, XATTR_STATS))
        assert await fails(fs.removexattr(a.ino, XATTR_STATS)) == errno.ENOTSUP
    run(go)


def test_sync_xattr_writes_back_a_file_or_the_mount(fs, tmp_path):
    b = tmp_path / "b"

    async def go():
        fh1, a1 = await fs.create(ROOT_INODE, b"one", REG, os.O_RDWR, Ctx())
        fh2, a2 = await fs.create(ROOT_INODE, b"two", REG, os.O_RDWR, Ctx())
        await fs.write(fh1, 0, b"first")
        await fs.write(fh2, 0, b"second")
        assert (b / "one").read_bytes() == b"" and (b / "two").read_bytes() == b""
        await fs.setxattr(a1.ino, XATTR_SYNC, b"")
        assert (b / "one").read_bytes() == b"first" and (b / "two").read_bytes() == b""
        await fs.setxattr(ROOT_INODE, XATTR_SYNC, b"")
        assert (b / "two").read_bytes() == b"second"
        assert json.loads(fs.getxattr(a2.ino, XATTR_STATS))["file"]["dirty_bytes"] == 0
        await fs.release(fh1)
        await fs.release(fh2)
    run(go)


def test_setxattr_refuses_bad_controls(fs):
    async def go():
        a = await make(fs, ROOT_INODE, b"f", b"abc")
        for name, value, err in [
            (XATTR_PREFIX + "nonsense", b"", errno.EINVAL),
            ("user.other", b"", errno.ENOTSUP),
            (XATTR_MULTIWRITE, b"yes", errno.EINVAL),
            (XATTR_REFRESH, b"lots", errno.EINVAL),
            (XATTR_REFRESH, b"-5 10", errno.EINVAL),
            (XATTR_REFRESH, b"1 2 3", errno.EINVAL),
            (XATTR_REFRESH, b"%d" % (1 << 20), errno.EINVAL),      # past the end
            (XATTR_STATS, b"", errno.EINVAL),
        ]:
            assert await fails(fs.setxattr(a.ino, name, value)) == err, (name, value)
        await fs.setxattr(a.ino, XATTR_MULTIWRITE, b"1")
        assert fs.getxattr(a.ino, XATTR_MULTIWRITE) == b"1"
        await fs.setxattr(a.ino, XATTR_MULTIWRITE, b"0\n")
        assert fs.getxattr(a.ino, XATTR_MULTIWRITE) == b"0"
    run(go)


def test_refresh_xattr_reloads_what_another_node_wrote(fs, tmp_path):
    async def go():
        a = await make(fs, ROOT_INODE, b"f", b"a" * 10000)
        fh = await fs.open(a.ino, os.O_RDONLY, Ctx())
        assert await fs.read(fh, 0, 10000) == b"a" * 10000       # now cached
        with open(tmp_path / "b" / "f", "r+b") as f:             # another node's write
            f.seek(4096)
            f.write(b"B" * 4096)
            f.write(b"tail" * 1000)
        await fs.setxattr(a.ino, XATTR_REFRESH, b"4096 4096")
        # The size follows the backing file, and the page that held the old
        # end of file shows the backing bytes, not the zeros past that end.
        assert fs.getattr(a.ino).size == 12192
        assert await fs.read(fh, 0, 12288) == b"a" * 4096 + b"B" * 4096 + b"tail" * 1000
        with open(tmp_path / "b" / "f", "r+b") as f:
            f.write(b"C" * 10)
        await fs.setxattr(a.ino, XATTR_REFRESH, b"8192")         # the rest only
        assert await fs.read(fh, 0, 10) == b"a" * 10
        await fs.setxattr(a.ino, XATTR_REFRESH, b"")             # the whole file
        assert await fs.read(fh, 0, 12288) == b"C" * 10 + b"a" * 4086 + b"B" * 4096 \
            + b"tail" * 1000
        await fs.release(fh)
    run(go)


@pytest.mark.parametrize("value, parsed", [(b"", (0, None)), (b"7", (7, None)),
                                           (b" 4096  100 ", (4096, 100))])
def test_parse_range(value, parsed):
    assert parse_range(value, "refresh") == parsed


# -- names shared with other nodes ---------------------------------------------

def test_a_file_removed_behind_the_mount_loses_its_name(fs, tmp_path):
    """The data-loss sequence: a write after another node removed the backing
    file must land in a new backing file, never in the removed one."""
    b = tmp_path / "b"

    async def go():
        a = await make(fs, ROOT_INODE, b"a.txt", b"one\n")
        (b / "a.txt").unlink()                           # rm BACKING/a.txt
        assert await fails(fs.open(a.ino, os.O_WRONLY | os.O_TRUNC, Ctx())) == errno.ESTALE
        assert await fails(fs.lookup(ROOT_INODE, b"a.txt")) == errno.ENOENT
        assert await listdir(fs, ROOT_INODE) == []
        fh, attr = await fs.create(ROOT_INODE, b"a.txt", REG, os.O_WRONLY | os.O_TRUNC, Ctx())
        assert attr.ino != a.ino
        await fs.write(fh, 0, b"two\n")
        await fs.release(fh)
    run(go)
    assert (b / "a.txt").read_bytes() == b"two\n"


def test_handles_open_on_a_removed_file_keep_it_and_cannot_claim_durability(fs, tmp_path):
    async def go():
        fh, a = await fs.create(ROOT_INODE, b"f", REG, os.O_RDWR, Ctx())
        await fs.write(fh, 0, b"first")
        await fs.fsync(fh)
        (tmp_path / "b" / "f").unlink()
        assert await fails(fs.open(a.ino, os.O_RDONLY, Ctx())) == errno.ESTALE
        assert await fs.read(fh, 0, 10) == b"first"      # the open handle still reads
        await fs.write(fh, 0, b"later")
        assert await fails(fs.fsync(fh)) == errno.ESTALE   # no home for the data: say so
        st = json.loads(fs.getxattr(a.ino, XATTR_STATS))["file"]
        assert st["backing_lost"] is True and st["dirty_bytes"] == 4096
        assert await fails(fs.setxattr(ROOT_INODE, XATTR_SYNC, b"")) == errno.ESTALE
        assert await fails(fs.release(fh)) == errno.ESTALE  # close: written nowhere, kept
        fs.forget(a.ino, 1)
        assert a.ino in fs.inodes                           # its unwritten data is kept
        assert json.loads(fs.getxattr(ROOT_INODE, XATTR_STATS))["mount"]["files"] == 1
        failed = await fs.sync_all()                        # what unmount reports
        assert [(p, e.errno) for p, e in failed] == [(str(tmp_path / "b" / "f"), errno.ESTALE)]
    run(go)


def test_a_replaced_backing_file_rebinds_the_name(fs, tmp_path):
    target = tmp_path / "t"
    target.write_bytes(b"old target")

    async def go():
        await fs.symlink(ROOT_INODE, b"s", os.fsencode(target), Ctx())
        old = await fs.lookup(ROOT_INODE, b"s")
        fh = await fs.open(old.ino, os.O_RDONLY, Ctx())
        await make(fs, ROOT_INODE, b"c", b"old created")
        for path, data in ((target, b"new target"), (tmp_path / "b" / "c", b"new created")):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.rename(tmp, path)                             # replaced by another node
        new = await fs.lookup(ROOT_INODE, b"s")
        assert new.ino != old.ino and new.size == len(b"new target")
        fh2 = await fs.open(new.ino, os.O_RDONLY, Ctx())
        assert await fs.read(fh2, 0, 100) == b"new target"
        assert await fs.read(fh, 0, 100) == b"old target"  # the old handle: the old file
        c = await fs.lookup(ROOT_INODE, b"c")
        fh3 = await fs.open(c.ino, os.O_RDONLY, Ctx())
        assert await fs.read(fh3, 0, 100) == b"new created"
        for h in (fh, fh2, fh3):
            await fs.release(h)
    run(go)


def test_exclusive_create_meets_a_file_another_node_made(fs, tmp_path):
    """ls, stat and O_EXCL agree: once a create meets the name, it exists."""
    (tmp_path / "b" / "b.txt").write_bytes(b"made elsewhere")

    async def go():
        assert await fails(fs.lookup(ROOT_INODE, b"b.txt")) == errno.ENOENT   # starts empty
        assert await fails(fs.create(ROOT_INODE, b"b.txt", REG, os.O_RDWR | os.O_EXCL,
                                     Ctx())) == errno.EEXIST
        a = await fs.lookup(ROOT_INODE, b"b.txt")
        assert a.size == len(b"made elsewhere")
        assert await listdir(fs, ROOT_INODE) == [b"b.txt"]
        fh, _ = await fs.create(ROOT_INODE, b"b.txt", REG, os.O_RDWR, Ctx())
        assert await fs.read(fh, 0, 100) == b"made elsewhere"
        await fs.release(fh)
    run(go)


def test_a_backing_file_renamed_away_keeps_its_open_handles(fs, tmp_path):
    b = tmp_path / "b"

    async def go():
        fh, a = await fs.create(ROOT_INODE, b"f", REG, os.O_RDWR, Ctx())
        os.rename(b / "f", b / "g")                      # another node renames it
        assert await fails(fs.lookup(ROOT_INODE, b"f")) == errno.ENOENT
        await fs.write(fh, 0, b"still lands")
        await fs.fsync(fh)                               # the file exists: durable
        await fs.release(fh)
    run(go)
    assert (b / "g").read_bytes() == b"still lands" and not (b / "f").exists()


# -- -o mirror ------------------------------------------------------------------

@pytest.fixture
def mirror(tmp_path):
    """A mirror over a backing tree that exists before the mount."""
    b = tmp_path / "b"
    (b / "sub" / "deeper").mkdir(parents=True)
    (b / "top.bin").write_bytes(b"top bytes")
    (b / "sub" / "inner").write_bytes(b"x" * 10000)
    (b / "sub" / "deeper" / "leaf").write_bytes(b"leaf")
    os.symlink("top.bin", b / "link")                 # not shown: not a regular file
    os.mkfifo(b / "fifo")
    return Vfs(Config(backing=str(b), cache_size=16 << 20, mirror=True))


def test_mirror_shows_the_backing_tree_lazily(mirror, tmp_path):
    fs = mirror

    async def go():
        assert await listdir(fs, ROOT_INODE) == [b"sub", b"top.bin"]
        sub = await fs.lookup(ROOT_INODE, b"sub")
        assert stat.S_ISDIR(sub.mode)
        assert await listdir(fs, sub.ino) == [b"deeper", b"inner"]
        inner = await fs.lookup(sub.ino, b"inner")
        assert stat.S_ISREG(inner.mode) and inner.size == 10000
        assert fs.namespace.by_fid == {}                 # listing and lookups open nothing
        st = json.loads(fs.getxattr(inner.ino, XATTR_STATS))["file"]
        assert st["opened"] is False and st["size"] == 10000
        deeper = await fs.lookup(sub.ino, b"deeper")
        leaf = await fs.lookup(deeper.ino, b"leaf")      # a lookup without a readdir first
        fh = await fs.open(leaf.ino, os.O_RDWR, Ctx())
        assert len(fs.namespace.by_fid) == 1
        assert await fs.read(fh, 0, 100) == b"leaf"
        await fs.write(fh, 4, b" grown")
        await fs.fsync(fh)
        await fs.release(fh)
        assert await fails(fs.lookup(ROOT_INODE, b"link")) == errno.ENOENT
        assert await fails(fs.lookup(ROOT_INODE, b"missing")) == errno.ENOENT
    run(go)
    assert (tmp_path / "b" / "sub" / "deeper" / "leaf").read_bytes() == b"leaf grown"


def test_mirror_lists_in_chunks_while_the_reader_goes_and_shows_each_name_once(tmp_path):
    """With the mount's nursery the backing directory is read in the
    background; names made in the mount during the listing appear once,
    whether the backing listing saw them or not, and a listing left
    half-read stops."""
    b = tmp_path / "b"
    b.mkdir()
    names = [b"f%04d" % i for i in range(1000)]
    for name in names:
        (b / os.fsdecode(name)).write_bytes(b"")
    fs = Vfs(Config(backing=str(b), cache_size=16 << 20, mirror=True))

    async def go():
        async with trio.open_nursery() as n:
            fs.cache.nursery = n
            dh = fs.opendir(ROOT_INODE)
            batch = list(await fs.readdir(dh, 0))
            assert len(batch) == READDIR_ENTRIES
            await make(fs, ROOT_INODE, b"f0000x")        # before and after the reader's place
            await make(fs, ROOT_INODE, b"zzz")
            os.unlink(b / "f0999")                       # the listing may have seen it or not
            shown = []
            while batch:
                shown += [name for name, _, _ in batch]
                batch = list(await fs.readdir(dh, batch[-1][2]))
            fs.releasedir(dh)
            assert len(shown) == len(set(shown))
            assert set(shown) - {b"f0999"} == set(names[:-1]) | {b"f0000x", b"zzz"}
            assert await fails(fs.lookup(ROOT_INODE, b"f0999")) == errno.ENOENT

            dh = fs.opendir(ROOT_INODE)
            await fs.readdir(dh, 0)
            left = fs.namespace.dirhandles[dh].listing
            fs.releasedir(dh)
            assert left is None or left.closed
            fs.cache.nursery = None
    run(go)


def test_mirror_follows_what_other_nodes_do(mirror, tmp_path):
    fs = mirror
    b = tmp_path / "b"

    async def go():
        assert await listdir(fs, ROOT_INODE) == [b"sub", b"top.bin"]
        (b / "new").write_bytes(b"made elsewhere")          # created by another node
        (b / "top.bin").unlink()                            # removed by another node
        assert await listdir(fs, ROOT_INODE) == [b"new", b"sub"]
        new = await fs.lookup(ROOT_INODE, b"new")
        fh = await fs.open(new.ino, os.O_RDONLY, Ctx())
        assert await fs.read(fh, 0, 100) == b"made elsewhere"
        await fs.release(fh)
        os.rename(b / "sub", b / "moved")                  # a directory renamed elsewhere
        assert await fails(fs.lookup(ROOT_INODE, b"sub")) == errno.ENOENT
        assert (await fs.lookup(ROOT_INODE, b"moved")).ino
        # and things made through the mount land in the backing tree
        await made(fs, b"mine", b"through the mount")
        await fs.unlink(ROOT_INODE, b"new")
    run(go)
    assert (b / "mine").read_bytes() == b"through the mount"
    assert not (b / "new").exists()


def test_mirror_keeps_shadows_beside_the_tree(mirror, tmp_path):
    fs = mirror
    (tmp_path / "elsewhere").write_bytes(b"linked in")

    async def go():
        await fs.symlink(ROOT_INODE, b"s", os.fsencode(tmp_path / "elsewhere"), Ctx())
        assert await listdir(fs, ROOT_INODE) == [b"s", b"sub", b"top.bin"]
        s = await fs.lookup(ROOT_INODE, b"s")
        fh = await fs.open(s.ino, os.O_RDONLY, Ctx())
        assert await fs.read(fh, 0, 100) == b"linked in"
        await fs.release(fh)
    run(go)


def test_mirror_readdir_shows_a_replaced_file_as_the_new_one(mirror, tmp_path):
    """Found by the stateful test: a file replaced by another node must not
    keep its old attributes in the next listing."""
    fs = mirror
    b = tmp_path / "b"

    async def go():
        await made(fs, b"z", b"1")
        (b / "z.tmp").write_bytes(b"")
        os.rename(b / "z.tmp", b / "z")                      # replaced, now empty
        assert (await listing(fs, ROOT_INODE))[b"z"].size == 0
    run(go)


def test_attributes_follow_a_file_another_node_wrote_in_place(mirror, tmp_path):
    """Found by the stateful test: an append by another node shows in the next
    listing and lookup while nobody here has the file open."""
    fs = mirror
    b = tmp_path / "b"

    async def go():
        a = await made(fs, b"a", b"12")
        with open(b / "a", "ab") as f:
            f.write(b"345")                                 # another node appends
        assert (await listing(fs, ROOT_INODE))[b"a"].size == 5
        assert (await fs.lookup(ROOT_INODE, b"a")).size == 5
        fh = await fs.open(a.ino, os.O_RDONLY, Ctx())
        assert await fs.read(fh, 0, 100) == b"12345"
        assert await fs.revalidate(a.ino) is False          # the kernel drops its pages
        await fs.release(fh)
    run(go)
