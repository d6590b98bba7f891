"""Mounting the way administrators mount everything else: ``mount -t
fuse.shimfs``, a line in /etc/fstab, ``umount``, from a plain root shell
with no virtualenv (mount.fuse3 runs the ``shimfs`` command that
scripts/setup.sh links into /usr/local/bin), the generic mount options,
and the Prometheus metrics of a mount."""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import subprocess

import pytest

from mounting import (DAEMON_LOGS, daemon_pid, is_mounted, shimfs_cmd, shim_mount, unavailable,
                      wait_gone)

#: What a root login shell on Debian has: no virtualenv, no PYTHONPATH.
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8"}
FSTAB = "/etc/fstab"


def plain(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=ROOT_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


@pytest.fixture
def admin(tmp_path):
    """(backing dir, mount point, log) for a mount made by mount(8); the
    mount is removed afterwards whatever happened."""
    if os.geteuid() != 0:
        unavailable("mount(8) of fuse.shimfs needs root")
    if not shutil.which("shimfs", path=ROOT_ENV["PATH"]):
        unavailable("no shimfs command in root's PATH: run scripts/setup.sh")
    if not shutil.which("mount.fuse3", path=ROOT_ENV["PATH"]):
        unavailable("mount.fuse3 is missing (Debian package fuse3)")
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    log = str(tmp_path / "daemon.log")
    DAEMON_LOGS.append((log, False))
    try:
        yield str(backing), str(mnt), log
    finally:
        if is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def mount_options(mnt: str) -> tuple[str, list[str]]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == mnt:
                return fields[2], fields[3].split(",")
    raise AssertionError("%s is not mounted" % mnt)


def write_mapped(path: str, data: bytes) -> None:
    """A new file filled through a shared mapping, closed without msync: the
    pages are still dirty in the kernel."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, len(data))
        with mmap.mmap(fd, len(data)) as m:
            m[:] = data
    finally:
        os.close(fd)


def unmount_and_wait(mnt: str) -> None:
    pid = daemon_pid(mnt)
    res = plain("umount", mnt)
    assert res.returncode == 0, res.stderr
    assert not is_mounted(mnt)
    assert wait_gone(pid, 60.0), "the daemon did not exit after umount"


def test_mount_t_fuse_shimfs_then_umount_keeps_the_last_writes(admin):
    backing, mnt, log = admin
    res = plain("mount", "-t", "fuse.shimfs", "shimfs", mnt,
                "-o", "backing=%s,log=%s,cache_size=32M" % (backing, log))
    assert res.returncode == 0, res.stderr
    fstype, _ = mount_options(mnt)
    assert fstype == "fuse.shimfs"
    data = os.urandom(3 * (1 << 20) + 5)
    write_mapped(os.path.join(mnt, "last.bin"), data)       # just before the umount
    with open(os.path.join(mnt, "small.txt"), "w") as f:
        f.write("written by write()")
    unmount_and_wait(mnt)
    with open(os.path.join(backing, "last.bin"), "rb") as f:
        assert f.read() == data
    with open(os.path.join(backing, "small.txt")) as f:
        assert f.read() == "written by write()"


@contextlib.contextmanager
def fstab_line(line: str):
    """/etc/fstab with ``line`` added; restored exactly afterwards."""
    try:
        with open(FSTAB) as f:
            before: str | None = f.read()
    except FileNotFoundError:
        before = None
    with open(FSTAB, "a") as f:
        if before and not before.endswith("\n"):
            f.write("\n")
        f.write(line)
    try:
        yield
    finally:
        if before is None:
            os.unlink(FSTAB)
        else:
            with open(FSTAB, "w") as f:
                f.write(before)


def test_an_fstab_line_with_the_generic_options(admin):
    backing, mnt, log = admin
    line = ("shimfs %s fuse.shimfs backing=%s,log=%s,defaults,noauto,nofail,_netdev,"
            "x-systemd.automount,x-systemd.idle-timeout=60,users,nosuid,nodev,noexec 0 0\n"
            % (mnt, backing, log))
    with fstab_line(line):
        res = plain("mount", mnt)
        assert res.returncode == 0, res.stderr
        _, opts = mount_options(mnt)
        assert {"nosuid", "nodev", "noexec"} <= set(opts)
        with open(os.path.join(mnt, "f.txt"), "w") as f:
            f.write("from fstab")
        unmount_and_wait(mnt)
    with open(os.path.join(backing, "f.txt")) as f:
        assert f.read() == "from fstab"


def test_ro_is_a_read_only_mount(admin):
    backing, mnt, log = admin
    with open(os.path.join(backing, "kept"), "w") as f:
        f.write("old")
    res = plain("mount", "-t", "fuse.shimfs", "shimfs", mnt,
                "-o", "backing=%s,log=%s,ro" % (backing, log))
    assert res.returncode == 0, res.stderr
    _, opts = mount_options(mnt)
    assert "ro" in opts
    with pytest.raises(OSError) as exc:
        open(os.path.join(mnt, "new"), "w").close()
    assert exc.value.errno == errno.EROFS
    unmount_and_wait(mnt)
    assert not os.path.exists(os.path.join(backing, "new"))


def test_a_bad_option_through_mount_is_one_line(admin):
    backing, mnt, log = admin
    res = plain("mount", "-t", "fuse.shimfs", "shimfs", mnt,
                "-o", "backing=%s,log=%s,bogus" % (backing, log))
    assert res.returncode != 0
    assert "unknown mount option 'bogus'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not is_mounted(mnt)


def test_the_helper_form_and_the_version(tmp_path):
    """``shimfs SOURCE MOUNTPOINT -o OPTIONS`` mounts as ``shimfs mount``
    does; ``--version`` and ``shimfs stat`` say the same version."""
    import shimfs
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    res = shimfs_cmd("--version")
    assert res.stdout.strip() == "shimfs %s" % shimfs.__version__
    log = str(tmp_path / "d.log")
    DAEMON_LOGS.append((log, False))
    shimfs_cmd("anything", str(mnt), "-o", "backing=%s" % backing, "-o", "log=" + log)
    try:
        assert shimfs.stats(str(mnt))["mount"]["version"] == shimfs.__version__
    finally:
        shimfs_cmd("umount", str(mnt))
    res = shimfs_cmd("only-one-argument", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_prometheus_metrics(tmp_path, backing):
    import shimfs
    with shim_mount(str(tmp_path / "mnt"), backing) as mnt:
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"x" * 100000)
        with open(os.path.join(mnt, "f"), "rb") as f:
            f.read()
        st = shimfs.stats(mnt)["mount"]
        res = shimfs_cmd("stat", "--prometheus", mnt)
    lines = res.stdout.splitlines()
    label = 'mountpoint="%s"' % mnt
    samples = {ln.split("{")[0]: ln for ln in lines if not ln.startswith("#")}
    assert samples["shimfs_build_info"] == \
        'shimfs_build_info{%s,version="%s"} 1' % (label, shimfs.__version__)
    assert samples["shimfs_write_requests_total"].startswith("shimfs_write_requests_total{%s} "
                                                             % label)
    assert int(samples["shimfs_write_requests_total"].split()[-1]) >= st["write_requests"] > 0
    assert "# TYPE shimfs_write_requests_total counter" in lines
    assert "# TYPE shimfs_used_bytes gauge" in lines
    for ln in lines:                         # the text format: HELP, TYPE, or a sample
        assert ln.startswith(("# HELP shimfs_", "# TYPE shimfs_", "shimfs_")), ln
