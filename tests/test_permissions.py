"""A root daemon with allow_other: every user reaches only what they could reach.

Real unprivileged users are created; each request is made by a process
running as that user.
"""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from mounting import mount_stats, read_file, shim_mount, unavailable

USERS = ("shimfs-user1", "shimfs-user2")


def _user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


@pytest.fixture(scope="module")
def users():
    if os.geteuid() != 0:
        unavailable("permission tests need root")
    return [_user(n) for n in USERS]


def run_as(user, code: str) -> tuple[int, str]:
    """Run Python ``code`` as ``user``; return (exit status, last line printed)."""
    res = subprocess.run(["runuser", "-u", user.pw_name, "--", sys.executable, "-c", code],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                         cwd="/")
    return res.returncode, (res.stdout.strip().splitlines() or [""])[-1]


def try_errno(user, code: str) -> int:
    """0 if ``code`` succeeds as the user, else the errno of its OSError."""
    status, out = run_as(user, "import os, errno\ntry:\n    %s\n    print(0)\nexcept OSError as e:\n"
                               "    print(e.errno)" % code)
    assert status == 0, out
    return int(out)


def shared_group(member) -> int:
    """The gid of a group that ``member`` is in as a supplementary group."""
    import grp
    group = "shimfs-grp"
    subprocess.run(["groupadd", "-f", group], check=True)
    subprocess.run(["usermod", "-a", "-G", group, member.pw_name], check=True)
    return grp.getgrnam(group).gr_gid


@pytest.fixture
def world():
    """A world-traversable tree: private and shared areas per user."""
    top = tempfile.mkdtemp(prefix="shimfs-perm-")   # under the run's TMPDIR
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def root_mount(world, users):
    backing = os.path.join(world, "backing")
    os.mkdir(backing)
    os.chmod(backing, 0o1777)
    allowed = os.path.join(world, "allowed")
    os.mkdir(allowed)
    os.chmod(allowed, 0o755)
    with shim_mount(os.path.join(world, "mnt"), backing, "allow_other",
                    "allowed_roots=%s:%s" % (world, "/tmp"),
                    log=os.path.join(world, "log")) as m:
        os.chmod(m, 0o1777)
        yield m, backing


def test_cannot_shadow_what_you_cannot_open(users, world, root_mount):
    mnt, backing = root_mount
    u1, u2 = users
    private = os.path.join(world, "u2private")
    os.mkdir(private, 0o700)
    os.chown(private, u2.pw_uid, u2.pw_gid)
    secret = os.path.join(private, "secret")
    with open(secret, "w") as f:
        f.write("u2 only")
    os.chmod(secret, 0o644)                       # readable, but its directory is not
    os.chown(secret, u2.pw_uid, u2.pw_gid)
    # u1 cannot make a shadow of it ...
    assert try_errno(u1, "os.symlink(%r, %r)" % (secret, mnt + "/steal")) == errno.EACCES
    # ... u2 can, and reads it ...
    assert try_errno(u2, "os.symlink(%r, %r)" % (secret, mnt + "/mine")) == 0
    assert run_as(u2, "print(open(%r).read())" % (mnt + "/mine"))[1] == "u2 only"
    # ... but u1 cannot read u2's shadow although the mode bits say 644
    assert try_errno(u1, "open(%r).read()" % (mnt + "/mine")) == errno.EACCES
    # nor truncate it by path when the mode bits would allow it
    os.chmod(secret, 0o666)
    assert try_errno(u1, "os.truncate(%r, 0)" % (mnt + "/mine")) == errno.EACCES
    with open(secret) as f:
        assert f.read() == "u2 only"
    # and root's own files stay root's
    assert try_errno(u1, "os.symlink('/etc/shadow', %r)" % (mnt + "/shadowfile")) in (
        errno.EACCES, errno.EPERM)


def test_created_files_belong_to_the_user_and_obey_backing_permissions(users, root_mount, world):
    mnt, backing = root_mount
    u1, u2 = users
    assert try_errno(u1, "open(%r, 'w').write('x')" % (mnt + "/u1file")) == 0
    st = os.stat(os.path.join(backing, "u1file"))
    assert (st.st_uid, st.st_gid) == (u1.pw_uid, u1.pw_gid)
    # u1 makes a directory; the backing directory is u1's and 0755 (umask 022)
    assert try_errno(u1, "os.mkdir(%r)" % (mnt + "/u1dir")) == 0
    assert os.stat(os.path.join(backing, "u1dir")).st_uid == u1.pw_uid
    os.chmod(os.path.join(backing, "u1dir"), 0o755)
    # u2 cannot create in it (checked on the backing directory)
    assert try_errno(u2, "open(%r, 'w')" % (mnt + "/u1dir/intruder")) == errno.EACCES
    assert not os.path.exists(os.path.join(backing, "u1dir", "intruder"))
    # sticky backing dir: u2 cannot delete u1's file
    assert try_errno(u2, "os.unlink(%r)" % (mnt + "/u1file")) in (errno.EACCES, errno.EPERM)
    assert os.path.exists(os.path.join(backing, "u1file"))
    assert try_errno(u1, "os.unlink(%r)" % (mnt + "/u1file")) == 0
    assert not os.path.exists(os.path.join(backing, "u1file"))


def test_allowed_roots_restricts_link_targets(users, root_mount, world):
    mnt, backing = root_mount
    u1, _ = users
    outside = "/var/tmp/shimfs-outside-%d" % os.getpid()
    with open(outside, "w") as f:
        f.write("x")
    os.chmod(outside, 0o644)
    try:
        assert try_errno(u1, "os.symlink(%r, %r)" % (outside, mnt + "/o")) == errno.EACCES
        inside = os.path.join(world, "allowed", "ok")
        with open(inside, "w") as f:
            f.write("fine")
        os.chmod(inside, 0o644)
        assert try_errno(u1, "os.symlink(%r, %r)" % (inside, mnt + "/i")) == 0
        assert run_as(u1, "print(open(%r).read())" % (mnt + "/i"))[1] == "fine"
        # Inside an allowed root is not enough: the root daemon resolves and
        # opens the target as the user, who cannot enter this directory.
        locked = os.path.join(world, "allowed", "locked")
        os.mkdir(locked, 0o700)
        with open(os.path.join(locked, "t"), "w") as f:
            f.write("root only")
        os.chmod(os.path.join(locked, "t"), 0o644)
        assert try_errno(u1, "os.symlink(%r, %r)" % (os.path.join(locked, "t"), mnt + "/l")) \
            == errno.EACCES
        assert not os.path.exists(os.path.join(mnt, "l"))
    finally:
        os.unlink(outside)


def test_bad_allowed_roots_option(tmp_path):
    from mounting import shimfs_cmd
    res = shimfs_cmd("mount", "-o", "allowed_roots=/nonexistent", str(tmp_path), check=False)
    assert res.returncode != 0 and "allowed_roots" in res.stderr and "Traceback" not in res.stderr


def test_supplementary_groups_count(users, root_mount, world):
    """A file readable by a group: a member through a supplementary group may
    shadow and read it; a non-member may not."""
    mnt, backing = root_mount
    u1, u2 = users
    gid = shared_group(u2)
    gdir = os.path.join(world, "groupdir")
    os.mkdir(gdir)
    os.chown(gdir, 0, gid)
    os.chmod(gdir, 0o750)                          # only the group can enter
    f = os.path.join(gdir, "g")
    with open(f, "w") as fh:
        fh.write("for the group")
    os.chmod(f, 0o644)
    assert try_errno(u1, "os.symlink(%r, %r)" % (f, mnt + "/g1")) == errno.EACCES
    assert try_errno(u2, "os.symlink(%r, %r)" % (f, mnt + "/g2")) == 0
    assert run_as(u2, "print(open(%r).read())" % (mnt + "/g2"))[1] == "for the group"
    assert try_errno(u1, "open(%r).read()" % (mnt + "/g2")) == errno.EACCES


def test_a_mirror_opens_and_looks_up_as_the_user(users, world):
    """With ``-o mirror`` the wire opens a listed file, and lstats a name
    looked up, before Python sees the request (Wire.expect): as the
    requester, supplementary groups included.  The backing modes change
    after the listing, so the kernel's check (the mount's cached modes)
    lets every user through and the backing decides."""
    u1, u2 = users
    gid = shared_group(u2)
    backing = os.path.join(world, "tree")
    os.mkdir(backing)
    os.chmod(backing, 0o755)
    g = os.path.join(backing, "g")
    with open(g, "w") as fh:
        fh.write("for the group")
    os.chown(g, 0, gid)
    os.chmod(g, 0o644)
    priv = os.path.join(backing, "priv")
    os.mkdir(priv)
    os.chmod(priv, 0o755)
    with open(os.path.join(backing, "first"), "w") as fh:
        fh.write("first")
    with shim_mount(os.path.join(world, "mnt"), backing, "mirror", "allow_other",
                    log=os.path.join(world, "log")) as mnt:
        assert sorted(os.listdir(mnt)) == ["first", "g", "priv"]
        os.listdir(mnt + "/priv")
        # the first file opened on a device is opened by Python (its fstatfs)
        assert read_file(mnt + "/first") == b"first"
        os.chmod(g, 0o640)                          # now for the group only
        os.chmod(priv, 0o700)                       # now root's only
        with open(os.path.join(priv, "later"), "w") as fh:
            fh.write("made after the listing")
        assert os.stat(mnt + "/g").st_mode & 0o777 == 0o644      # what the kernel checks
        assert try_errno(u1, "open(%r).read()" % (mnt + "/g")) == errno.EACCES
        assert run_as(u2, "print(open(%r).read())" % (mnt + "/g"))[1] == "for the group"
        assert try_errno(u1, "os.stat(%r)" % (mnt + "/priv/later")) == errno.EACCES
        assert read_file(mnt + "/priv/later") == b"made after the listing"      # root may
        counters = mount_stats(mnt)
        assert counters["opens_ahead"] >= 2 and counters["stats_ahead"] >= 2, counters
