"""Mount lifecycle: mount, serve, flush everything on the way out, unmount.

``serve()`` runs in the daemon process.  It mounts with pyfuse3, starts the
trio loop with a nursery for background work (prefetch, tuning), handles
SIGINT/SIGTERM by writing all dirty data back and leaving the main loop, and
always unmounts.  ``ready(notices)`` is called once the mount answers
requests, with one-line notices for the user (settings that were skipped).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import pyfuse3
import trio

from .config import Config
from .errors import UserError
from ._notify import SessionKernel
from .fuseops import ShimOperations
from .names import XATTR_PREFIX
from .tuning import tune
from .vfs import Vfs

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL = 0.0005


def _limit_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per
    core), and reply buffers of 1 MiB spread over a dozen worker threads keep
    several of them resident.  Two arenas are plenty: the data lives in the
    engine's own arena, not in malloc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)          # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _raise_fd_limit() -> None:
    """Every file the daemon holds open costs a descriptor (a mirror of a
    large tree opens each file at its first open, and keeps it until the
    kernel forgets the inode): allow as many as the hard limit does."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def find_session_fd() -> int | None:
    """The daemon's open /dev/fuse descriptor (there is one per session)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name) == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def fuse_options(config: Config) -> set[str]:
    opts = set(pyfuse3.default_options)     # default_permissions: the kernel checks modes
    opts |= {"fsname=shimfs", "subtype=shimfs"}
    if config.allow_other:
        opts.add("allow_other")
    opts.update(config.mount_flags)
    return opts


def serve(mountpoint: str, config: Config, ready=lambda notices: None) -> None:
    # The trio thread holds the GIL nearly all the time under load (pyfuse3
    # sends each reply with it held), and a worker thread that finished its
    # backing I/O waits up to the switch interval to get the GIL back.  At
    # Python's default 5 ms that wait dominated a 1 MiB request; 0.5 ms
    # doubled a tmpfs scan (201 -> 415 MB/s, docs/performance.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    _limit_malloc_arenas()
    _raise_fd_limit()
    vfs = Vfs(config)
    grants = None
    if config.coherence:
        from .cluster import from_config
        grants = from_config(config)        # a bad address fails here, before mounting
        vfs.attach_cluster(grants)
    ops = ShimOperations(vfs)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(config))
    except RuntimeError as exc:
        if grants is not None:
            grants.close()
        raise UserError("cannot mount %s: %s" % (mountpoint, exc), 1) from None
    fd = find_session_fd()
    wire = None
    if fd is not None:
        wire = _attach_wire(vfs, config, fd)
        # Refresh, multiwrite and pushes reach the kernel through it.
        vfs.attach_kernel(SessionKernel(wire.kernel_fd if wire is not None else fd))
    try:
        trio.run(_main, vfs, mountpoint, config, ready, wire, ops)
    finally:
        unmount = True
        if wire is not None:
            # First the device, as libfuse closes its own before unmounting;
            # after the kernel ended the session there is nothing to unmount.
            unmount = not wire.ended_by_kernel
            log.debug("requests by FUSE opcode: %s", wire.opcodes())
            wire.close()
        pyfuse3.close(unmount=unmount)


def _attach_wire(vfs: Vfs, config: Config, fd: int):
    """Put the compiled READ path (shimfs._wire) in front of pyfuse3, or None."""
    if not config.fast_reads:
        return None
    wire = vfs.cache.attach_wire(fd, control_prefix=XATTR_PREFIX.encode(),
                                 sparse_faults=config.read_ahead_bytes
                                 if config.sparse_faults else 0)
    if wire is not None:
        vfs.namespace.wire_attached()
    return wire


async def _main(vfs: Vfs, mountpoint: str, config: Config, ready, wire=None,
                ops: ShimOperations | None = None) -> None:
    if vfs.cluster is not None:
        vfs.cluster.start()
    async with trio.open_nursery() as nursery:
        vfs.cache.nursery = nursery
        nursery.start_soon(_signals, vfs)
        if wire is not None:
            nursery.start_soon(_kernel_gone, wire)
            nursery.start_soon(_side_requests, wire, ops, nursery)
            nursery.start_soon(_released, wire, ops)
        nursery.start_soon(_after_mount, vfs, mountpoint, config, ready)
        nursery.start_soon(vfs.flusher)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        finally:
            nursery.cancel_scope.cancel()
    vfs.cache.nursery = None
    if wire is not None:
        vfs.files.released()
        wire.clear()            # before the engine forgets the files
    await vfs.close_all(vfs.cluster.close if vfs.cluster is not None else None)


async def _side_requests(wire, ops: ShimOperations, nursery) -> None:
    """Serve the requests pyfuse3 has no handler for (FALLOCATE), which the
    compiled reader sets aside (Wire.take), each in a task of its own; take
    note of the handles whose WRITEs it took (OpenFiles.written); and show
    the read-ahead policy the READs it answered past their trigger
    (OpenFiles.noted)."""
    async def one(unique, fh, offset, length, mode) -> None:
        try:
            await ops.fallocate(fh, offset, length, mode)
            err = 0
        except pyfuse3.FUSEError as exc:
            err = exc.errno
        try:
            wire.reply_error(unique, err)
        except OSError as exc:          # the session is ending
            log.debug("fallocate reply: %s", exc)
    while True:
        await trio.lowlevel.wait_readable(wire.side_fd)
        fallocates, wrote, seen = wire.take()
        for fh in wrote:
            ops.vfs.files.written(fh)
        for fh, off, size in seen:
            ops.vfs.files.noted(fh, off, size)
        for unique, fh, offset, length, mode, _uid, _gid, _pid in fallocates:
            nursery.start_soon(one, unique, fh, offset, length, mode)


#: How long the RELEASEs the wire answered wait for Python's bookkeeping
#: (OpenFiles.released), so that one wake-up takes many: a many-file reader
#: closes a file every 1-2 ms.  An open takes them at once.
RELEASED_BATCH = 0.05


async def _released(wire, ops: ShimOperations) -> None:
    """Take note of the handles whose RELEASE the compiled reader answered."""
    while True:
        await trio.lowlevel.wait_readable(wire.released_fd)
        await trio.sleep(RELEASED_BATCH)
        ops.vfs.files.released()


async def _kernel_gone(wire) -> None:
    """The kernel ended the session (unmounted, aborted): stop pyfuse3's loop,
    which reads the socket pair and would not see it."""
    await trio.lowlevel.wait_readable(wire.ended_fd)
    pyfuse3.terminate()


async def _after_mount(vfs: Vfs, mountpoint: str, config: Config, ready) -> None:
    # stat() needs the kernel's INIT answered, which main() does: thread it.
    notices, vfs.files.window = await trio.to_thread.run_sync(tune, mountpoint,
                                                              config.read_ahead)
    for line in notices:
        log.info("%s", line)
    ready(notices)


async def _signals(vfs: Vfs) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("signal %d: writing back and unmounting", sig)
            failed = await vfs.sync_all()
            for path, exc in failed:
                log.error("could not write back %s: %s", path, exc)
            pyfuse3.terminate()
            return
