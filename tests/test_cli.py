"""Bad input on the command line: one clear line, non-zero exit, no traceback."""
from __future__ import annotations


import pytest

from mounting import shimfs_cmd


def _one_line_error(res):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("opts, words", [
    ("bogus=1", "unknown mount option"),
    ("read_ahead=-1", "read_ahead"),
    ("cache_size=lots", "cache_size"),
    ("cache_size=1K", "too small"),
    ("verbose=maybe", "verbose"),
    ("writeback_interval=soon", "writeback_interval"),
    ("backing=/nonexistent/dir", "does not exist"),
    ("backing=/etc/hostname", "not a directory"),
])
def test_bad_mount_options(tmp_path, opts, words):
    res = shimfs_cmd("mount", "-o", opts, str(tmp_path), check=False)
    assert words in _one_line_error(res)


def test_bad_mountpoints(tmp_path):
    res = shimfs_cmd("mount", str(tmp_path / "missing"), check=False)
    assert "does not exist" in _one_line_error(res)
    f = tmp_path / "file"
    f.write_text("x")
    res = shimfs_cmd("mount", str(f), check=False)
    assert "not a directory" in _one_line_error(res)


def test_already_mounted(mnt, tmp_path):
    res = shimfs_cmd("mount", "-o", "backing=" + str(tmp_path), mnt, check=False)
    assert "already" in _one_line_error(res)


def test_control_outside_a_mount(tmp_path):
    f = tmp_path / "plain"
    f.write_text("x")
    for cmd in ("sync", "stat", "refresh"):
        res = shimfs_cmd(cmd, str(f), check=False)
        assert "not in a shimfs mount" in _one_line_error(res)
    res = shimfs_cmd("sync", str(tmp_path / "missing"), check=False)
    assert "does not exist" in _one_line_error(res)
    res = shimfs_cmd("umount", str(tmp_path), check=False)
    assert "not mounted" in _one_line_error(res)


def test_help_explains_itself():
    for args in ([], ["mount"], ["umount"], ["sync"], ["stat"]):
        res = shimfs_cmd(*args, "--help")
        assert "usage:" in res.stdout
    assert "read_ahead" in shimfs_cmd("mount", "--help").stdout
