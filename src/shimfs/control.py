"""The control interface: the ``user.shimfs.*`` xattrs (sync, refresh,
prefetch, multiwrite, stats, backing, pid) and the counters ``shimfs stat``
shows.

pyfuse3 has no ioctl handler, so control goes through xattrs, which any
language can set (the CLI and :mod:`shimfs.api` are two such callers).  This
room parses and answers them; the work is done by the room that owns it.
Runs on the trio thread.
"""
from __future__ import annotations

import errno
import json
import os

from .cache import AsyncCache
from .coherence import Coherence
from .errors import FsError
from .files import OpenFiles
from .names import (VERSION, XATTR_BACKING, XATTR_MULTIWRITE, XATTR_PID, XATTR_PREFETCH, XATTR_PREFIX,
                    XATTR_REFRESH, XATTR_STATS, XATTR_SYNC)
from .namespace import Namespace
from .nodes import Ctx, File, Node
from .writeback import WriteBack


class Control:
    """Answers the control xattrs of a mount's files and root."""

    def __init__(self, cache: AsyncCache, ns: Namespace, files: OpenFiles, wb: WriteBack,
                 coherence: Coherence):
        self.cache = cache
        self.ns = ns
        self.files = files
        self.wb = wb
        self.coherence = coherence
        self.cluster = None                 # cluster.Cluster on a coherent mount

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.ns.node(ino)
        names = [XATTR_STATS]
        if isinstance(node, File):
            names[:0] = [XATTR_BACKING, XATTR_MULTIWRITE]
        elif node is self.ns.root:
            names.append(XATTR_PID)
        return [n.encode() for n in names]

    def getxattr(self, ino: int, name: str) -> bytes:
        node = self.ns.node(ino)
        if name == XATTR_BACKING and isinstance(node, File):
            return os.fsencode(node.path)
        if name == XATTR_MULTIWRITE and isinstance(node, File):
            if not node.opened:
                return b"1" if self.ns.config.multiwrite else b"0"
            return b"1" if self.cache.file_stats(node.fid)["multiwrite"] else b"0"
        if name == XATTR_PID and node is self.ns.root:
            return str(os.getpid()).encode()
        if name == XATTR_STATS:
            return json.dumps(self.stats(node), sort_keys=True).encode()
        raise FsError(errno.ENODATA)

    async def setxattr(self, ino: int, name: str, value: bytes, ctx: Ctx = Ctx()) -> None:
        node = self.ns.node(ino)
        if name == XATTR_SYNC:
            if isinstance(node, File):
                if node.opened:             # an unopened file has nothing to write
                    await self.wb.writeback(node, durable=True)
                return
            failed = await self.wb.sync_all()
            if failed:
                raise FsError(failed[0][1].errno or errno.EIO)
            return
        if name == XATTR_PREFETCH:
            await self.prefetch(node, value, ctx)
            return
        if name == XATTR_REFRESH and isinstance(node, File):
            offset, length = parse_range(value, "refresh")
            await self.ns.ensure_open(node, ctx)
            await self.coherence.refresh(node, offset, length)
            return
        if name == XATTR_MULTIWRITE and isinstance(node, File):
            if value.strip() not in (b"0", b"1"):
                raise FsError(errno.EINVAL, "multiwrite takes 0 or 1")
            await self.ns.ensure_open(node, ctx)
            await self.coherence.set_multiwrite(node, value.strip() == b"1")
            return
        if name.startswith(XATTR_PREFIX):
            raise FsError(errno.EINVAL, "unknown control %s" % name)
        raise FsError(errno.ENOTSUP)

    async def prefetch(self, node: Node, value: bytes, ctx: Ctx) -> None:
        """``user.shimfs.prefetch``: the range into the kernel's page cache."""
        if not isinstance(node, File):
            raise FsError(errno.EINVAL, "prefetch takes a file, not a directory")
        offset, length = parse_range(value, "prefetch")
        await self.ns.ensure_open(node, ctx)
        await self.files.creds.check_reachable(node, ctx, os.R_OK)
        size = self.cache.size(node.fid)
        if length is None:
            length = max(size - offset, 0)
        if offset > size or offset + length > size:
            raise FsError(errno.EINVAL, "prefetch of %d bytes at %d is past the end of the "
                                        "file (%d bytes)" % (length, offset, size))
        if length:
            await self.cache.load_and_push(node.fid, node.ino, offset, length)

    async def removexattr(self, ino: int, name: str) -> None:
        raise FsError(errno.ENOTSUP)

    def stats(self, node: Node) -> dict:
        cache, coh = self.cache, self.coherence
        out = {"mount": dict(cache.stats(),
                             **(self.cluster.stats() if self.cluster is not None else {}),
                             version=VERSION,
                             kernel_drops=coh.kernel_drops,
                             kernel_drops_pending=coh.kernel_drops_pending,
                             narrow_opens=self.files.narrow_opens,
                             files=len(self.ns.by_fid), nodes=len(self.ns.inodes))}
        if isinstance(node, File) and not node.opened:
            out["file"] = dict(backing=node.path, shadow=False, backing_lost=node.lost,
                               opened=False, size=node.seen[0], dirty_bytes=0)
        elif isinstance(node, File):
            streams = self.files.streams(node)
            out["file"] = dict(cache.file_stats(node.fid), backing=node.path, shadow=node.shadow,
                               opened=True,
                               backing_lost=node.lost,
                               backing_in_memory=node.in_memory,
                               read_ahead_window=max((s.window for s in streams), default=0),
                               sequential_reads=sum(s.sequential for s in streams),
                               random_reads=sum(s.random for s in streams),
                               pushing=cache.pushing(node.fid),
                               open_for_writing=node.writers)
            if node.grant is not None:
                from .cluster import describe
                out["file"]["grant"] = describe(node.grant.fresh)
        return out


def parse_range(value: bytes, what: str) -> tuple[int, int | None]:
    """``b"OFFSET LENGTH"``, ``b"OFFSET"`` or ``b""`` (the whole file), for
    the control ``what``."""
    parts = value.decode("ascii", "replace").split()
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise FsError(errno.EINVAL, "%s takes \"OFFSET LENGTH\"" % what) from None
    if len(nums) > 2 or any(n < 0 for n in nums):
        raise FsError(errno.EINVAL, "%s takes \"OFFSET LENGTH\", both non-negative" % what)
    return (nums[0] if nums else 0), (nums[1] if len(nums) == 2 else None)
