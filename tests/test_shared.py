"""Names shared with other nodes, on real mounts over a local directory and
over the stand-in: another node (or a script) removes, replaces and creates
files in the backing directory, and no write lands in a removed file."""
from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid

import pytest

from mounting import mount_stats, read_file, shim_mount, shimfs_cmd
from shimfs import standin
from shimfs.names import TIMEOUT


def _sh(cmd: str) -> None:
    subprocess.run(["sh", "-c", cmd], check=True, timeout=60)


@pytest.fixture
def shared(tmp_path, data_dir):
    """A mount whose backing directory is ``data_dir``; returns (mount, backing)."""
    with shim_mount(str(tmp_path / "mnt"), data_dir) as m:
        yield m, data_dir


def test_a_write_after_another_node_removed_the_file_lands_in_a_new_one(shared):
    mnt, backing = shared
    _sh("echo one > %s/a.txt" % mnt)
    assert read_file(os.path.join(backing, "a.txt")) == b"one\n"
    os.unlink(os.path.join(backing, "a.txt"))                 # rm BACKING/a.txt
    _sh("echo two > %s/a.txt" % mnt)                          # the kernel's dentry is cached
    assert read_file(os.path.join(mnt, "a.txt")) == b"two\n"
    assert read_file(os.path.join(backing, "a.txt")) == b"two\n"
    shimfs_cmd("sync", os.path.join(mnt, "a.txt"))
    os.unlink(os.path.join(backing, "a.txt"))
    with pytest.raises(FileNotFoundError):                    # a plain open: gone is gone
        open(os.path.join(mnt, "a.txt")).close()
    assert os.listdir(mnt) == []


def test_exclusive_create_and_stat_agree(shared):
    mnt, backing = shared
    with open(os.path.join(backing, "b.txt"), "wb") as f:    # another node makes it
        f.write(b"theirs")
    with pytest.raises(FileExistsError):
        os.close(os.open(os.path.join(mnt, "b.txt"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    assert os.stat(os.path.join(mnt, "b.txt")).st_size == 6
    assert "b.txt" in os.listdir(mnt)
    assert read_file(os.path.join(mnt, "b.txt")) == b"theirs"


def test_a_replaced_target_shows_through_its_shadow(shared, tmp_path):
    mnt, backing = shared
    target = os.path.join(backing, "t")
    with open(target, "wb") as f:
        f.write(b"version 1")
    os.symlink(target, os.path.join(mnt, "s"))
    assert read_file(os.path.join(mnt, "s")) == b"version 1"
    with open(target + ".new", "wb") as f:
        f.write(b"version two")
    os.rename(target + ".new", target)                        # replaced, as rsync does
    time.sleep(TIMEOUT + 0.2)                                 # the kernel's entry expires
    assert read_file(os.path.join(mnt, "s")) == b"version two"


def test_a_mirror_opens_what_the_names_hold_now(tmp_path, data_dir):
    """-o mirror: files listed, then replaced, removed or renamed on the
    backing side before their first open (which the wire makes ahead of
    Python, Wire.expect): each open reaches the file the name holds now,
    and a LOOKUP of each name sees it as it is."""
    for name in ("r", "d", "m", "same"):
        with open(os.path.join(data_dir, name), "wb") as f:
            f.write(b"old " + name.encode())
    with shim_mount(str(tmp_path / "mnt"), data_dir, "mirror") as mnt:
        assert sorted(os.listdir(mnt)) == ["d", "m", "r", "same"]
        assert read_file(os.path.join(mnt, "same")) == b"old same"
        with open(os.path.join(data_dir, "r.new"), "wb") as f:
            f.write(b"new r")
        os.rename(os.path.join(data_dir, "r.new"), os.path.join(data_dir, "r"))
        os.unlink(os.path.join(data_dir, "d"))
        os.rename(os.path.join(data_dir, "m"), os.path.join(data_dir, "m2"))
        assert read_file(os.path.join(mnt, "r")) == b"new r"
        with pytest.raises(FileNotFoundError):
            open(os.path.join(mnt, "d")).close()
        with pytest.raises(FileNotFoundError):
            open(os.path.join(mnt, "m")).close()
        assert read_file(os.path.join(mnt, "m2")) == b"old m"
        time.sleep(TIMEOUT + 0.2)                   # the kernel's entries expire: LOOKUPs
        assert os.stat(os.path.join(mnt, "r")).st_size == 5
        assert not os.path.exists(os.path.join(mnt, "d"))
        with open(os.path.join(data_dir, "same"), "ab") as f:
            f.write(b" and more")                   # changed in place by another node
        assert read_file(os.path.join(mnt, "same")) == b"old same and more"
        assert sorted(os.listdir(mnt)) == ["m2", "r", "same"]
        st = mount_stats(mnt)
        assert st["opens_ahead"] >= 2 and st["stats_ahead"] >= 2, st


@pytest.mark.daemon_logs(r"keeping .*: its unwritten data is retried",
                         r"could not write back .* at unmount")
def test_data_that_can_reach_no_file_blocks_umount_until_forced(tmp_path, data_dir):
    mnt = str(tmp_path / "mnt")
    with shim_mount(mnt, data_dir) as m:
        path = os.path.join(m, "c")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        os.pwrite(fd, b"precious", 0)
        os.unlink(os.path.join(data_dir, "c"))                # removed behind our back
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.ESTALE
        with pytest.raises(OSError) as e:
            os.close(fd)                                      # written nowhere: says so, kept
        assert e.value.errno == errno.ESTALE
        res = shimfs_cmd("umount", m, check=False)
        assert res.returncode == 1 and "Stale file handle" in res.stderr, res.stderr
        assert os.path.ismount(m)
        shimfs_cmd("umount", "--force", m)
        assert not os.path.ismount(m)


def test_two_nodes_see_each_others_names(gluster, tmp_path):
    """Two mounts over the stand-in's two clients share one backing directory."""
    rel = "shared-" + uuid.uuid4().hex[:8]
    os.mkdir(os.path.join(standin.client_dir(0), rel))
    try:
        with shim_mount(str(tmp_path / "a"), os.path.join(standin.client_dir(0), rel)) as a, \
                shim_mount(str(tmp_path / "b"), os.path.join(standin.client_dir(1), rel)) as b:
            with open(os.path.join(a, "x"), "wb") as f:
                f.write(b"from A")
            # B never saw x: an exclusive create meets it, then B shows it
            with pytest.raises(FileExistsError):
                os.close(os.open(os.path.join(b, "x"), os.O_CREAT | os.O_EXCL | os.O_RDWR))
            assert read_file(os.path.join(b, "x")) == b"from A"
            # A replaces x under B's name: B reads the new file
            with open(os.path.join(a, "x.new"), "wb") as f:
                f.write(b"A's second x")
            os.rename(os.path.join(a, "x.new"), os.path.join(a, "x"))
            time.sleep(TIMEOUT + 0.2)
            assert read_file(os.path.join(b, "x")) == b"A's second x"
            # A removes it: B's name goes, and a write through B makes a new file
            os.unlink(os.path.join(a, "x"))
            time.sleep(TIMEOUT + 0.2)
            assert not os.path.exists(os.path.join(b, "x"))
            _sh("echo B > %s/x" % b)
            assert read_file(os.path.join(standin.client_dir(0), rel, "x")) == b"B\n"
    finally:
        subprocess.run(["rm", "-rf", os.path.join(standin.client_dir(0), rel)], check=False)
