"""The stand-in stops only what it started: a GlusterFS volume and client
mount that it does not know survive its ``up``, ``down`` and brick kill,
with their data readable."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from mounting import is_mounted, process_gone, read_file, wait_until
from shimfs import standin


def _gluster(*args, check=True):
    res = subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True,
                         timeout=120)
    if check and res.returncode:
        raise AssertionError("gluster %s: %s%s" % (" ".join(args), res.stdout, res.stderr))
    return res


def _foreign_brick_pid(volume: str) -> int:
    out = _gluster("volume", "status", volume, "detail").stdout
    for line in out.splitlines():
        if line.strip().startswith("Pid"):
            return int(line.split(":")[1])
    raise AssertionError("no brick pid for %s: %s" % (volume, out))


@pytest.fixture
def foreign(gluster, tmp_path):
    """A second volume, made here behind the stand-in's back, and a client
    mount of it holding a file."""
    name = "foreign-" + uuid.uuid4().hex[:8]
    brick = "/var/lib/shimfs-test-" + name
    mnt = str(tmp_path / "foreign")
    os.makedirs(brick)
    os.makedirs(mnt)
    _gluster("volume", "create", name, "%s:%s" % (standin.HOST, brick), "force")
    _gluster("volume", "start", name)
    try:
        subprocess.run(["mount", "-t", "glusterfs", "%s:/%s" % (standin.HOST, name), mnt],
                       check=True, capture_output=True, timeout=120)
        data = os.urandom(100_000)
        with open(os.path.join(mnt, "precious"), "wb") as f:
            f.write(data)
        yield name, mnt, data
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", mnt], check=False)
        _gluster("volume", "stop", name, "force", check=False)
        _gluster("volume", "delete", name, check=False)
        shutil.rmtree(brick, ignore_errors=True)


def test_foreign_volume_survives_up_down_and_brick_kill(foreign):
    name, mnt, data = foreign
    brick = _foreign_brick_pid(name)
    ours = standin.brick_pid()
    assert ours and ours != brick

    def still_fine():
        assert not process_gone(brick), "the foreign brick was stopped"
        assert is_mounted(mnt), "the foreign client mount is gone"
        assert read_file(os.path.join(mnt, "precious")) == data

    try:
        standin.kill_brick()                     # what the fault tests do
        wait_until(lambda: process_gone(ours), 10, "our brick to be gone")
        still_fine()
        standin.start_brick()
        still_fine()
        standin.down()
        assert not is_mounted(standin.client_dir(0))
        assert standin.brick_pid() is None
        still_fine()
        standin.up(clients=2)
        still_fine()
    finally:
        # The rest of the session needs the stand-in as the fixture left it.
        standin.up(clients=2)
        wait_until(lambda: standin.brick_pid(), 30, "the stand-in's brick")


def test_up_remounts_a_client_that_was_killed(gluster):
    """A client of ours killed from outside leaves a mount answering ENOTCONN
    (a torn-down session does this); ``up`` unmounts it and mounts again."""
    d = standin.client_dir(1)
    pid = standin.client_pid(1)
    assert pid, "the fixture mounts two clients"
    os.kill(pid, 9)
    wait_until(lambda: process_gone(pid), 10, "the killed client to be gone")
    with pytest.raises(OSError):
        os.stat(d)
    assert is_mounted(d)
    standin.up(clients=2)
    assert standin.client_pid(1) not in (None, pid)
    name = "after-kill-" + uuid.uuid4().hex[:8]
    with open(os.path.join(gluster, name), "wb") as f:
        f.write(b"seen by both clients")
    try:
        assert read_file(os.path.join(d, name)) == b"seen by both clients"
    finally:
        os.unlink(os.path.join(gluster, name))
