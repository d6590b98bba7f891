"""Kernel tuning of a fresh mount (root only): read-ahead and FUSE queue depth.

* ``read_ahead_kb`` of the mount's bdi: the kernel's own read-ahead window.
  The default 128 KiB turns a sequential mmap scan into 128 KiB READs; the
  ``read_ahead`` option (pages) is applied here too, so the kernel asks for
  up to that much at once (measured: 303 -> 530 MB/s for a C daemon), and
  a mapping's fault reads that much around the faulting page (so
  ``read_ahead=4`` fetches 16 KiB per random touch).
* ``max_background`` = 64 and ``congestion_threshold`` = 48: the kernel keeps
  at most max_background async requests in flight and drops async read-ahead
  beyond the threshold; the default 12/9 starves parallel prefetch
  (Mountpoint for S3 measured +29% from 64).
* :class:`Window`: ``read_ahead_kb`` narrowed for a moment, while the OPEN
  of a file touched at random before is answered, so that this open's
  page faults read little around the page (files.py).
"""
from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger(__name__)

MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
FUSECTL = "/sys/fs/fuse/connections"


#: The read-around window (pages) of an open whose file was touched at
#: random before: a fault then fetches at most this much, in one READ that
#: is served (16 KiB: the 4 bytes fetched per byte touched that random
#: access may cost), instead of a 1 MiB window refused and a second READ.
NARROW_PAGES = 4
#: How long the bdi keeps the narrow window after an OPEN that asked for
#: it: the kernel copies the bdi's window into the new file when it has the
#: OPEN's reply (fs/open.c, ``do_dentry_open``: ``file_ra_state_init`` after
#: ``->open``), and the reply leaves through the wire's out thread after
#: the handler returns, within a millisecond unless the machine is busy;
#: 50 ms leaves room for that.  Another file opened meanwhile gets the
#: narrow window too (speed, never bytes).
NARROW_HOLD = 0.05


class Window:
    """The mount's ``read_ahead_kb``, narrowed to :data:`NARROW_PAGES` while
    any :meth:`narrow` holds it.  Runs on the trio thread: a write of the
    sysfs attribute does no I/O."""

    def __init__(self, path: str, wide_kb: int):
        self.path = path
        self.wide_kb = wide_kb
        self.narrow_kb = NARROW_PAGES * 4
        self.holders = 0
        self.usable = wide_kb > self.narrow_kb

    def narrow(self) -> bool:
        """Narrow the window (until :meth:`widen`); False if it cannot be."""
        if not self.usable:
            return False
        if self.holders == 0:
            try:
                _write(self.path, self.narrow_kb)
            except OSError as e:
                log.warning("read_ahead_kb not narrowed, not tried again: %s", e.strerror)
                self.usable = False
                return False
        self.holders += 1
        return True

    def widen(self) -> None:
        """The end of one :meth:`narrow`; the last puts the option's window back."""
        self.holders -= 1
        if self.holders == 0:
            try:
                _write(self.path, self.wide_kb)
            except FileNotFoundError:
                pass                # unmounted meanwhile: the bdi went with the mount
            except OSError as e:
                log.error("read_ahead_kb not put back to %d: %s", self.wide_kb, e.strerror)


def _write(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write("%d\n" % value)


def tune(mountpoint: str, read_ahead_pages: int) -> tuple[list[str], Window | None]:
    """Apply the settings; return one line per setting that could not be
    applied, and the mount's :class:`Window` where its ``read_ahead_kb``
    was set (None otherwise: not root, or the write failed)."""
    if os.geteuid() != 0:
        return ["not root: kernel tuning (read_ahead_kb, max_background) skipped"], None
    problems = []
    dev = os.stat(mountpoint).st_dev
    major, minor = os.major(dev), os.minor(dev)
    # exactly what the option asks for, small windows included: a 16 KiB
    # window is what keeps random faults from fetching more than they touch
    ra_kb = max(read_ahead_pages * 4, 4)
    bdi = "/sys/class/bdi/%d:%d/read_ahead_kb" % (major, minor)
    window = None
    try:
        _write(bdi, ra_kb)
        window = Window(bdi, ra_kb)
    except OSError as e:
        problems.append("read_ahead_kb not set: %s" % e.strerror)
    conn = os.path.join(FUSECTL, str(minor))
    mounted_here = False
    if not os.path.ismount(FUSECTL):
        # The values live in the connection, not in fusectl: mount it just
        # long enough to write them, and leave the machine as it was.
        mounted_here = subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      check=False).returncode == 0
    try:
        _write(os.path.join(conn, "max_background"), MAX_BACKGROUND)
        _write(os.path.join(conn, "congestion_threshold"), CONGESTION_THRESHOLD)
    except OSError as e:
        problems.append("max_background not set: %s" % e.strerror)
    finally:
        if mounted_here:
            subprocess.run(["umount", FUSECTL], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
    log.debug("tuned %s: read_ahead_kb=%d max_background=%d", mountpoint, ra_kb, MAX_BACKGROUND)
    return problems, window
