"""Mount options: parsing ``-o a=b,c`` strings into a frozen, validated Config.

Every option is documented on its field.  Parsing raises :class:`UserError`
with a one-line message for anything unknown or malformed.
"""
from __future__ import annotations

import dataclasses
import os
import re

from .errors import UserError

PAGE = 4096
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_CACHE = 16 << 20


@dataclasses.dataclass(frozen=True)
class Config:
    #: Directory under which files created in the mount get their backing
    #: files; subdirectories of the mount are subdirectories there.  As in
    #: the original kernel module it defaults to /dev/shm.
    backing: str = "/dev/shm"
    #: Read-ahead, in 4 KiB pages (the original module's unit): the kernel's
    #: read_ahead_kb for the mount (as root), which is also how much a page
    #: fault of a mapping reads around the page, and the run of sequential
    #: reads after which the daemon starts prefetching.  The daemon's own
    #: window then grows up to ``window_factor`` (16) times this, at least
    #: 64 MiB (readahead.ReadAheadConfig), within a quarter of the cache
    #: shared by the mount's streams.  1 MiB: one FUSE request (max_pages),
    #: so a random fault's read-around, which ``sparse_faults`` refuses, is
    #: one READ and costs the kernel 256 page allocations, not 1,024
    #: (2,000 random touches 0.85x native against 0.71x at 4 MiB; scans,
    #: mapped writes and checkpoints no slower: docs/performance.md,
    #: "Sparse faults").  Below 256 every READ of a scan is smaller than a
    #: request can be, and mapped writes wait one round trip per window.
    read_ahead: int = 256
    #: Bytes of the daemon's page cache (the bound of its data memory).
    cache_size: int = 256 << 20
    #: Log every operation (debug level).
    verbose: bool = False
    #: Let users other than the mounting one use the mount (FUSE allow_other).
    allow_other: bool = False
    #: Keep a clean twin of every cached page and write back only the bytes
    #: that changed, so nodes writing disjoint bytes of a page do not undo each
    #: other's writes (per file: xattr user.shimfs.multiwrite).
    multiwrite: bool = False
    #: Also copy prefetched pages straight into the kernel's page cache (FUSE
    #: NOTIFY_STORE) while no process has the file open for writing, so the
    #: kernel asks for fewer of them.  With a small kernel window it helps a
    #: memcpy copy of a mapping (``read_ahead=4``: 0.76x -> 0.98x native on
    #: the stand-in), but it loses to the kernel's own read-ahead at the
    #: default window (10-15%) and at ``read_ahead=16`` (scan 1.23x against
    #: 1.56x; docs/performance.md), hence off by default.
    push: bool = False
    #: Show the backing directory's whole tree in the mount (built lazily:
    #: a lookup stats the backing path, a readdir lists the backing
    #: directory, a file is opened at its first open).  Off: the namespace
    #: starts empty, as the original module's, and holds what is linked or
    #: created through the mount.
    mirror: bool = False
    #: Answer READs whose pages the daemon's cache holds in compiled code,
    #: without Python (shimfs._wire); off sends every request through
    #: pyfuse3.  Needs socket buffers of 4 MiB, so a daemon that cannot set
    #: them (not root) runs without it.
    fast_reads: bool = True
    #: A random page fault of a mapping fetches the page it touches, not the
    #: kernel's read-around window (``read_ahead`` pages centred on it): the
    #: compiled READ path refuses that window, and the kernel then asks for
    #: the faulting page alone.  Scans, read(2) and files read whole are
    #: served as asked (docs/design.md, "Sparse faults").  Needs fast_reads.
    sparse_faults: bool = True
    #: Seconds between background write-backs of dirty files (0: only on
    #: msync, fsync, close and unmount).
    writeback_interval: int = 30
    #: If set, link targets must resolve inside one of these directories.
    allowed_roots: tuple = ()
    #: Append the daemon's log here (default: syslog when the daemon runs in
    #: the background, stderr in the foreground).
    log: str | None = None
    #: Generic mount flags passed on to the FUSE mount (``ro``, ``nosuid``,
    #: ``nodev``, ``noexec`` and their opposites), as mount(8) gives them.
    mount_flags: tuple = ()
    #: Keep this mount's files coherent with other nodes' mounts of the same
    #: shared file system, with no msync or refresh: the etcd cluster that
    #: keeps the book of grants, ``etcd://HOST:PORT[,HOST:PORT...]`` (the
    #: members of one cluster; a request that cannot reach one tries the
    #: next).  docs/coherence.md.  None: no coherence, as the shim module.
    coherence: str | None = None
    #: The etcd key prefix of the book; every node mounting the same shared
    #: file system names the same one, and one prefix serves one shared file
    #: system (files are named by inode number).  etcd roles are granted on it.
    coherence_prefix: str = "/shimfs/"
    #: TLS: the CA that signed the etcd servers' certificates (turns TLS on).
    coherence_ca: str | None = None
    #: TLS client certificate and its key, for servers run with client
    #: certificate authentication (needs coherence_ca).
    coherence_cert: str | None = None
    coherence_key: str | None = None
    #: An etcd user, and a file holding its password (never the password in
    #: an option: options show in /proc/mounts and in ps).
    coherence_user: str | None = None
    coherence_password_file: str | None = None
    #: Seconds of the node's etcd lease: a node that dies or loses etcd loses
    #: its grants this long after its last refresh.
    coherence_ttl: int = 10
    #: Seconds an operation waits for a grant before it fails with ETIMEDOUT.
    coherence_wait: int = 60
    #: This node's name in the book (default: host name and daemon pid).
    coherence_node: str | None = None

    @property
    def read_ahead_bytes(self) -> int:
        return self.read_ahead * PAGE


def parse_size(text: str, what: str) -> int:
    """``256M`` -> 268435456.  K/M/G/T suffixes are powers of 1024."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise UserError("%s: %r is not a size (use a number with an optional K, M or G suffix)"
                        % (what, text))
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def _parse_int(text: str, what: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise UserError("%s: %r is not a non-negative whole number" % (what, text))
    return int(text)


_FLAGS = {"verbose", "allow_other", "multiwrite", "push", "mirror", "fast_reads",
          "sparse_faults"}
#: Generic options of mount(8), fstab and systemd: passed to the FUSE mount...
_MOUNT_FLAGS = {"ro": "rw", "rw": "ro", "nosuid": "suid", "suid": "nosuid",
                "nodev": "dev", "dev": "nodev", "noexec": "exec", "exec": "noexec"}
#: ...or meaningless to the daemon (mount(8) and systemd act on them).
_IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser"}
_VALUED = {"backing", "read_ahead", "cache_size", "log", "allowed_roots", "writeback_interval",
           "coherence", "coherence_prefix", "coherence_ca", "coherence_cert", "coherence_key",
           "coherence_user", "coherence_password_file", "coherence_ttl", "coherence_wait",
           "coherence_node"}
_COHERENCE_FILES = ("coherence_ca", "coherence_cert", "coherence_key", "coherence_password_file")


def parse_options(opts: list[str]) -> Config:
    """Turn the ``-o`` arguments (each a comma-separated list) into a Config."""
    values: dict = {}
    for group in opts:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, val = item.partition("=")
            if key in _MOUNT_FLAGS and not sep:
                flags = values.setdefault("mount_flags", [])    # the last of a pair wins
                flags[:] = [f for f in flags if f not in (key, _MOUNT_FLAGS[key])] + [key]
            elif (key in _IGNORED and not sep) or key.startswith("x-"):
                continue
            elif key in _FLAGS:
                if sep and val not in ("1", "0", "true", "false", "yes", "no"):
                    raise UserError("option %s takes no value (got %r)" % (key, val))
                values[key] = (not sep) or val in ("1", "true", "yes")
            elif key in _VALUED:
                if not sep or val == "":
                    raise UserError("option %s needs a value: %s=..." % (key, key))
                values[key] = val
            else:
                raise UserError("unknown mount option %r (known: %s; and the generic %s)"
                                % (key, ", ".join(sorted(_FLAGS | _VALUED)),
                                   ", ".join(sorted(_MOUNT_FLAGS))))
    kw: dict = {}
    if "backing" in values:
        kw["backing"] = values["backing"]
    if "read_ahead" in values:
        kw["read_ahead"] = _parse_int(values["read_ahead"], "read_ahead")
    if "writeback_interval" in values:
        kw["writeback_interval"] = _parse_int(values["writeback_interval"], "writeback_interval")
    if "cache_size" in values:
        kw["cache_size"] = parse_size(values["cache_size"], "cache_size")
        if kw["cache_size"] < MIN_CACHE:
            raise UserError("cache_size: %s is too small (at least 16M)" % values["cache_size"])
    if "allowed_roots" in values:
        roots = []
        for r in values["allowed_roots"].split(":"):
            if r:
                roots.append(os.path.realpath(check_dir(r, "allowed_roots directory")))
        kw["allowed_roots"] = tuple(roots)
    if "log" in values:
        kw["log"] = os.path.abspath(values["log"])
    for flag in _FLAGS:
        if flag in values:
            kw[flag] = values[flag]
    if "mount_flags" in values:
        kw["mount_flags"] = tuple(values["mount_flags"])
    kw.update(_coherence_options(values))
    cfg = Config(**kw)
    return dataclasses.replace(cfg, backing=check_backing(cfg.backing))


def _coherence_options(values: dict) -> dict:
    """The ``coherence*`` options, checked: a bad URL, a missing file or a
    setting without ``coherence`` is one line."""
    from .grants import parse_endpoints       # no etcd client needed for this
    kw: dict = {}
    given = sorted(k for k in values if k.startswith("coherence"))
    if not given:
        return kw
    if "coherence" not in values:
        raise UserError("option %s needs coherence=etcd://HOST:PORT" % given[0])
    try:
        parse_endpoints(values["coherence"])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    kw["coherence"] = values["coherence"]
    if "coherence_prefix" in values:
        prefix = values["coherence_prefix"]
        if not prefix.startswith("/") or " " in prefix:
            raise UserError("coherence_prefix: %r must start with / and hold no space" % prefix)
        kw["coherence_prefix"] = prefix if prefix.endswith("/") else prefix + "/"
    for key in _COHERENCE_FILES:
        if key in values:
            path = os.path.abspath(values[key])
            if not os.path.isfile(path):
                raise UserError("%s: %s is not a file" % (key, path))
            kw[key] = path
    for key in ("coherence_ttl", "coherence_wait"):
        if key in values:
            kw[key] = _parse_int(values[key], key)
            if kw[key] < 2:
                raise UserError("%s: at least 2 seconds (got %s)" % (key, values[key]))
    if "coherence_user" in values:
        kw["coherence_user"] = values["coherence_user"]
    if "coherence_node" in values:
        node = values["coherence_node"]
        if "/" in node or " " in node:
            raise UserError("coherence_node: %r may hold no '/' or space" % node)
        kw["coherence_node"] = node
    if ("coherence_cert" in kw) != ("coherence_key" in kw):
        raise UserError("coherence_cert and coherence_key go together")
    if "coherence_cert" in kw and "coherence_ca" not in kw:
        raise UserError("coherence_cert needs coherence_ca (TLS)")
    if ("coherence_user" in kw) != ("coherence_password_file" in kw):
        raise UserError("coherence_user and coherence_password_file go together")
    return kw


def check_dir(path: str, what: str) -> str:
    """The absolute path of an existing directory, or a UserError naming ``what``."""
    full = os.path.abspath(path)
    if not os.path.exists(full):
        raise UserError("%s %s does not exist" % (what, full))
    if not os.path.isdir(full):
        raise UserError("%s %s is not a directory" % (what, full))
    return full


def check_backing(path: str) -> str:
    """The absolute backing directory, or a UserError saying what is wrong with it."""
    full = check_dir(path, "backing directory")
    if not os.access(full, os.W_OK | os.X_OK):
        raise UserError("backing directory %s is not writable" % full)
    return os.path.realpath(full)
