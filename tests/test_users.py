"""shimfs mounted by an unprivileged user, through the setuid fusermount3."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from mounting import unavailable

USER = "shimfs-user1"


@pytest.fixture(scope="module")
def user():
    if os.geteuid() != 0:
        unavailable("creating a test user needs root")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    pw = pwd.getpwnam(USER)
    probe = subprocess.run(["runuser", "-u", USER, "--", sys.executable, "-c", "import shimfs"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if probe.returncode:
        unavailable("user %s cannot run %s: %s" % (USER, sys.executable, probe.stdout.strip()))
    return pw


def as_user(user, *cmd, check=True):
    res = subprocess.run(["runuser", "-u", user.pw_name, "--", *cmd], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=120, cwd="/")
    if check and res.returncode:
        raise AssertionError("%s failed: %s%s" % (cmd, res.stdout, res.stderr))
    return res


def test_unprivileged_mount_create_link_umount(user):
    top = tempfile.mkdtemp(prefix="shimfs-user-")   # under the run's TMPDIR
    os.chmod(top, 0o755)
    mnt, backing, data = (os.path.join(top, n) for n in ("mnt", "backing", "data"))
    for d in (mnt, backing, data):
        os.mkdir(d)
        os.chown(d, user.pw_uid, user.pw_gid)
    try:
        res = as_user(user, sys.executable, "-m", "shimfs", "mount", "-o", "backing=" + backing, mnt)
        assert "notice: not root" in res.stderr      # kernel tuning skipped, said in one line
        assert len(res.stderr.strip().splitlines()) == 1
        try:
            as_user(user, "sh", "-c", "printf hello > %s/made" % mnt)
            st = os.stat(os.path.join(backing, "made"))
            assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)
            with open(os.path.join(backing, "made"), "rb") as f:
                assert f.read() == b"hello"
            as_user(user, "sh", "-c", "printf data > %s/src && ln -s %s/src %s/shadow"
                    % (data, data, mnt))
            res = as_user(user, sys.executable, "-c",
                          "import mmap,os; fd=os.open(%r, os.O_RDWR); m=mmap.mmap(fd,0);"
                          "m[0:1]=b'D'; m.flush(); print(m[:].decode())" % (mnt + "/shadow"))
            assert res.stdout.strip() == "Data"
            with open(os.path.join(data, "src"), "rb") as f:
                assert f.read() == b"Data"
            # root is not the owner: without allow_other it cannot even look in
            with pytest.raises(PermissionError):
                os.listdir(mnt)
        finally:
            res = as_user(user, sys.executable, "-m", "shimfs", "umount", mnt, check=False)
            if res.returncode:
                subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        assert res.returncode == 0, res.stderr
        assert not os.path.ismount(mnt)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_unwritable_backing_directory_is_refused(user, tmp_path):
    top = tempfile.mkdtemp(prefix="shimfs-user-")   # under the run's TMPDIR
    os.chmod(top, 0o755)
    try:
        mnt = os.path.join(top, "mnt")
        os.mkdir(mnt)
        os.chown(mnt, user.pw_uid, user.pw_gid)
        ro = os.path.join(top, "ro")
        os.mkdir(ro, 0o755)                       # root's, not writable by the user
        res = as_user(user, sys.executable, "-m", "shimfs", "mount", "-o", "backing=" + ro, mnt,
                      check=False)
        assert res.returncode != 0 and "not writable" in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not os.path.ismount(mnt)
    finally:
        shutil.rmtree(top, ignore_errors=True)
