"""Command line: ``shimfs mount|umount|sync|refresh|prefetch|stat``.

``shimfs SOURCE MOUNTPOINT [-o OPTIONS]`` is a mount too: the form in which
``mount -t fuse.shimfs`` (through ``mount.fuse3``), ``/etc/fstab`` and
systemd mount units call a FUSE file system's command; SOURCE is free text.

Bad input is reported as one line on stderr with a non-zero exit status,
never as a traceback (see :class:`shimfs.errors.UserError`).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.handlers
import os
import select
import shutil
import subprocess
import sys
import time

from . import api
from .config import check_dir, parse_options
from .errors import ShimfsError, UserError
from .names import FSTYPE, VERSION, XATTR_PID, XATTR_SYNC

PROG = "shimfs"
READY_TIMEOUT = 60.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="shimfs: read/write mmap for files on file systems that cannot map them. "
                    "Mount it, then `ln -s /data/file MOUNTPOINT` and map MOUNTPOINT/file. "
                    "`shimfs SOURCE MOUNTPOINT -o OPTIONS` mounts too (the form mount(8) "
                    "and fstab use, with type fuse.shimfs).")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, VERSION))
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser("mount", help="mount shimfs on a directory",
                       description="Mount shimfs on MOUNTPOINT. Returns once the mount answers, "
                                   "unless -f is given.",
                       epilog="options (-o, comma-separated): backing=DIR (where new files are "
                              "created; default /dev/shm), read_ahead=PAGES (4 KiB pages, default "
                              "256), cache_size=SIZE (daemon cache, K/M/G suffixes, default 256M), "
                              "verbose, allow_other, multiwrite, push (also push prefetched "
                              "pages into the kernel's cache), fast_reads=0 (every READ through "
                              "Python), sparse_faults=0 (a random page fault fetches the "
                              "kernel's whole read-around window), mirror (show the backing directory's whole "
                              "tree), allowed_roots=DIR[:DIR...] (where link "
                              "targets may point), writeback_interval=SECONDS (default 30), "
                              "log=FILE, coherence=etcd://HOST:PORT[,HOST:PORT...] (keep files "
                              "coherent across nodes with no msync; docs/coherence.md) with "
                              "coherence_prefix=/PREFIX/, coherence_ca=FILE, coherence_cert=FILE, "
                              "coherence_key=FILE, coherence_user=NAME, "
                              "coherence_password_file=FILE, coherence_ttl=SECONDS (default 10), "
                              "coherence_wait=SECONDS (default 60), coherence_node=NAME; "
                              "and the generic ro, rw, nosuid, suid, nodev, dev, noexec, "
                              "exec; defaults, auto, noauto, nofail, _netdev, user, users, "
                              "x-* (ignored)")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma-separated (see below)")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    m.add_argument("mountpoint")

    u = sub.add_parser("umount", help="write everything back and unmount",
                       description="Write all dirty data back (fsynced), unmount and wait for "
                                   "the daemon to exit. Refuses if data cannot be written back, "
                                   "unless --force.")
    u.add_argument("--force", action="store_true",
                   help="unmount even if dirty data cannot be written back (it is lost), "
                        "or the daemon is gone")
    u.add_argument("mountpoint")

    s = sub.add_parser("sync", help="write a file's (or a whole mount's) dirty pages back",
                       description="Like msync(MS_SYNC) from a shell: dirty pages reach the "
                                   "backing file, which is fsynced, before this returns.")
    s.add_argument("path")

    r = sub.add_parser("refresh", help="reload a byte range from the backing file (reverse msync)",
                       description="Reload the pages covering [offset, offset+length) from the "
                                   "backing file into the daemon's cache and every mapping of "
                                   "FILE. Locally dirty bytes are kept (see docs/consistency.md).")
    r.add_argument("--offset", type=int, default=0, help="first byte (default 0)")
    r.add_argument("--length", type=int, default=None, help="bytes (default: to the end)")
    r.add_argument("path")

    pf = sub.add_parser("prefetch", help="read a byte range into the kernel's page cache",
                        description="Read the pages covering [offset, offset+length) of FILE "
                                    "with large parallel reads and push them into the kernel's "
                                    "page cache, so that touches of a mapping there are minor "
                                    "faults with no request to the daemon. Returns once the "
                                    "range is in; shows progress on a terminal. While FILE is "
                                    "open for writing, the range only reaches the daemon's "
                                    "cache (pages that may be dirty are never overwritten). The "
                                    "kernel may drop the pages again under memory pressure.")
    pf.add_argument("--offset", type=int, default=0, help="first byte (default 0)")
    pf.add_argument("--length", type=int, default=None, help="bytes (default: to the end)")
    pf.add_argument("path")

    st = sub.add_parser("stat", help="show cache counters of a file or mount")
    fmt = st.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--prometheus", action="store_true",
                     help="print the mount's counters in the Prometheus text format "
                          "(for node_exporter's textfile collector)")
    st.add_argument("path")
    return p


COMMANDS = ("mount", "umount", "sync", "refresh", "prefetch", "stat")


def _helper_form(argv: list[str]) -> list[str]:
    """``SOURCE MOUNTPOINT [-o OPTIONS]...`` (how mount.fuse3 runs the
    command of a ``fuse.shimfs`` mount) as ``mount -o OPTIONS MOUNTPOINT``."""
    p = argparse.ArgumentParser(prog=PROG, usage="%(prog)s SOURCE MOUNTPOINT [-o OPTIONS]")
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    args = p.parse_args(argv)
    out = ["mount"]
    for o in args.options:
        out += ["-o", o]
    return out + [args.mountpoint]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        argv = _helper_form(argv)
    args = _parser().parse_args(argv)
    try:
        return {"mount": cmd_mount, "umount": cmd_umount, "sync": cmd_sync,
                "refresh": cmd_refresh, "prefetch": cmd_prefetch, "stat": cmd_stat}[args.cmd](args)
    except UserError as exc:
        print("%s: %s" % (PROG, exc), file=sys.stderr)
        return exc.code
    except ShimfsError as exc:
        print("%s: %s" % (PROG, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _check_mountpoint(path: str) -> str:
    full = check_dir(path, "mountpoint")
    if os.path.ismount(full):
        raise UserError("%s is already a mount point" % full)
    return full


def _setup_logging(config, foreground: bool) -> None:
    level = logging.DEBUG if config.verbose else logging.INFO
    if config.log:
        handler: logging.Handler = logging.FileHandler(config.log)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s shimfs[%(process)d] %(levelname)s "
                                           "%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not config.verbose:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def cmd_mount(args) -> int:
    mnt = _check_mountpoint(args.mountpoint)
    config = parse_options(args.options)
    if not os.path.exists("/dev/fuse"):
        raise UserError("/dev/fuse is missing: load the fuse module", 1)
    if not args.foreground:
        return _spawn_daemon(args, mnt)
    from .mount import serve
    _setup_logging(config, foreground=args.ready_fd is None)

    def ready(notices):
        for line in notices:
            print("%s: notice: %s" % (PROG, line), file=sys.stderr, flush=True)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ok\n")
            os.close(args.ready_fd)
            # From now on nobody reads our stderr: send it to the log or nowhere.
            devnull = os.open(config.log or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.dup2(devnull, 2)
            os.close(devnull)
    serve(mnt, config, ready)
    return 0


def _spawn_daemon(args, mnt: str) -> int:
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "shimfs", "mount", "-f", "--ready-fd", str(w)]
    for o in args.options:
        cmd += ["-o", o]
    cmd.append(mnt)
    proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, cwd="/")
    os.close(w)
    deadline = time.monotonic() + READY_TIMEOUT
    status = b""
    while time.monotonic() < deadline:
        rl, _, _ = select.select([r], [], [], 0.5)
        if rl:
            status = os.read(r, 64)
            break
        if proc.poll() is not None:
            break
    os.close(r)
    # What the daemon said before it was ready (notices or the error).
    err = b""
    if status.startswith(b"ok"):
        # Notices written before "ok"; the daemon then closes its stderr.
        if select.select([proc.stderr], [], [], 5.0)[0]:
            notes = proc.stderr.read1(65536) if hasattr(proc.stderr, "read1") else b""
            sys.stderr.write(notes.decode(errors="replace"))
        proc.stderr.close()
    else:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        err = proc.stderr.read()
        proc.stderr.close()
    if not status.startswith(b"ok"):
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        msg = lines[-1] if lines else "the daemon did not start (exit status %s)" % proc.returncode
        if msg.startswith(PROG + ": "):
            msg = msg[len(PROG) + 2:]
        raise UserError(msg, 1)
    return 0


def cmd_umount(args) -> int:
    mnt = os.path.abspath(args.mountpoint)
    fstype = _mount_type(mnt)
    if fstype is None:
        raise UserError("%s is not mounted" % mnt)
    if fstype != FSTYPE:
        raise UserError("%s is not a shimfs mount (it is %s)" % (mnt, fstype))
    pid = None
    try:
        os.stat(mnt)
        dead = False
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UserError("cannot reach %s: %s" % (mnt, exc.strerror), 1)
        dead = True
    if dead:
        # kill -9 or a crash: nothing can be written back any more; what was
        # msync'd is in the backing files.  Clean the mount up.
        print("%s: notice: the daemon of %s is gone; removing the dead mount" % (PROG, mnt),
              file=sys.stderr)
    else:
        pid = int(os.getxattr(mnt, XATTR_PID))
        try:
            os.setxattr(mnt, XATTR_SYNC, b"")
        except OSError as exc:
            if not args.force:
                raise UserError("cannot write back the data of %s (%s); nothing unmounted. "
                                "Use --force to unmount anyway and lose unwritten data"
                                % (mnt, exc.strerror), 1)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [fusermount, "-u"] if fusermount else ["umount"]
    if args.force or dead:
        cmd += ["-z"] if fusermount else ["-l"]
    res = subprocess.run(cmd + [mnt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode:
        why = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "failed"
        raise UserError("cannot unmount %s: %s" % (mnt, why), 1)
    if pid:
        _wait_exit(pid, 60.0)
    return 0


def _mount_type(mnt: str) -> str | None:
    """The file system type mounted at ``mnt`` (the last one), or None."""
    found = None
    for point, fstype in api.mount_table():
        if point == mnt:
            found = fstype
    return found


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)


def cmd_sync(args) -> int:
    try:
        api.sync(args.path)
    except OSError as exc:
        raise UserError("sync %s failed: %s" % (args.path, exc.strerror), 1)
    return 0


def cmd_refresh(args) -> int:
    if args.offset < 0 or (args.length is not None and args.length < 0):
        raise UserError("--offset and --length must be non-negative")
    try:
        api.refresh(args.path, args.offset, args.length)
    except OSError as exc:
        raise UserError("refresh %s failed: %s" % (args.path, exc.strerror), 1)
    return 0


#: ``shimfs prefetch`` on a terminal asks for this much at a time, to show progress.
PROGRESS_STEP = 256 << 20


def cmd_prefetch(args) -> int:
    try:
        _, end = api.prefetch_range(args.path, args.offset, args.length)
    except OSError as exc:
        raise UserError("prefetch %s: %s" % (args.path, exc.strerror))
    show = sys.stderr.isatty() and end - args.offset > PROGRESS_STEP
    pos = args.offset
    pushed = api.stats(args.path)["mount"].get("prefetch_call_pushed_bytes", 0)
    try:
        while True:
            n = end - pos if not show else min(PROGRESS_STEP, end - pos)
            api.prefetch(args.path, pos, n if (show or args.length is not None) else None)
            pos += n
            if show:
                print("\r%s: prefetch %s: %d of %d MiB" % (
                    PROG, args.path, (pos - args.offset) >> 20, (end - args.offset) >> 20),
                    end="", file=sys.stderr, flush=True)
            if pos >= end:
                break
    except OSError as exc:
        raise UserError("prefetch %s failed: %s" % (args.path, exc.strerror), 1)
    finally:
        if show:
            print(file=sys.stderr)
    st = api.stats(args.path)
    if end > args.offset and st["mount"].get("prefetch_call_pushed_bytes", 0) == pushed:
        print("%s: notice: %s is open for writing, so the range is in the daemon's cache only "
              "(pages that may be dirty are never overwritten)" % (PROG, args.path),
              file=sys.stderr)
    return 0


def cmd_stat(args) -> int:
    data = api.stats(args.path)
    if args.prometheus:
        sys.stdout.write(prometheus(data["mount"], api.mount_of(args.path)[0]))
        return 0
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for section in ("file", "mount"):
        if section in data:
            print("%s:" % section)
            for k, v in sorted(data[section].items()):
                print("  %-24s %s" % (k, v))
    return 0


#: Mount counters that are levels, not running totals (Prometheus gauges).
_GAUGE_WORDS = ("in_flight", "dirty", "cached", "size", "window", "budget", "streams",
                "threads", "pending", "queued", "files", "slots", "resident", "free",
                "capacity", "known_zero", "used")


def prometheus(mount: dict, mountpoint: str) -> str:
    """The counters of one mount in the Prometheus text exposition format:
    ``shimfs_<name>_total`` for running totals, ``shimfs_<name>`` for levels,
    and ``shimfs_build_info{version=...} 1``; every sample labelled with the
    mount point."""
    label = 'mountpoint="%s"' % mountpoint.replace("\\", "\\\\").replace('"', '\\"')
    lines = ["# HELP shimfs_build_info The shimfs version serving the mount.",
             "# TYPE shimfs_build_info gauge",
             'shimfs_build_info{%s,version="%s"} 1' % (label, mount.get("version", ""))]
    for key, value in sorted(mount.items()):
        gauge = isinstance(value, bool) or any(w in key for w in _GAUGE_WORDS)
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            continue
        name = "shimfs_" + key + ("" if gauge else "_total")
        lines.append("# HELP %s shimfs stat: %s." % (name, key))
        lines.append("# TYPE %s %s" % (name, "gauge" if gauge else "counter"))
        lines.append("%s{%s} %s" % (name, label, value))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
