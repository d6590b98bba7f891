"""Acting as the requesting user: every backing path the daemon opens,
creates or removes on a user's behalf is reached with that user's
credentials, and link targets stay inside ``allowed_roots``.

The daemon often runs as root.  The kernel checked the mount's own mode bits
(``default_permissions``); what this room adds is that the *backing* tree is
reached with the requester's fsuid, fsgid and supplementary groups, so the
kernel applies the very checks the user would meet there, search permission
on every directory on the way included.  New files and directories are owned
by the user as a result.  Runs on the trio thread; the work itself runs in a
worker thread of the façade, which switches that thread's credentials.
"""
from __future__ import annotations

import errno
import os

from .cache import AsyncCache
from .errors import FsError
from .nodes import Ctx, File


class Credentials:
    """Runs backing-tree work as the requester; checks reachability and roots."""

    def __init__(self, cache: AsyncCache, allowed_roots: tuple):
        self.cache = cache
        self.allowed_roots = allowed_roots
        self.is_root = os.geteuid() == 0

    async def as_user(self, ctx: Ctx, fn, *args):
        """Run ``fn(*args)`` in a worker thread with the requester's credentials."""
        if not self.is_root or ctx.uid == 0:
            return await self.cache.run(fn, *args)
        return await self.cache.run_as(ctx.uid, ctx.gid, sup_groups(ctx.pid, ctx.gid),
                                       fn, *args)

    async def check_reachable(self, node: File, ctx: Ctx, want: int) -> None:
        """The kernel checked the shadow's mode bits; a user must also be able
        to reach the backing file itself (every directory on the way)."""
        if self.is_root and ctx.uid != 0:
            if not await self.as_user(ctx, _reachable, node.path, want):
                raise FsError(errno.EACCES, "%s is not reachable by uid %d" % (node.path, ctx.uid))

    async def check_target(self, path: str, ctx: Ctx) -> str:
        """A link target, resolved as the user; EACCES outside ``allowed_roots``."""
        roots = self.allowed_roots
        if not roots:
            return path
        path = await self.as_user(ctx, os.path.realpath, path)
        if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            raise FsError(errno.EACCES, "%s is outside allowed_roots" % path)
        return path


def _reachable(path: str, mode: int) -> bool:
    """access() with the thread's fs credentials (AT_EACCESS), path walk included."""
    return os.access(path, mode, effective_ids=True)


def sup_groups(pid: int, gid: int) -> list[int]:
    """The requesting process's supplementary groups (from /proc)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return [gid]
