"""The C peer: libfuse's example ``passthrough_ll``, built from the copy that
ships with ``libfuse3-dev``.

The bench compares shimfs with libfuse's C pass-through daemon, with the
mount's kernel read-ahead raised to 4 MiB the way shimfs tunes its own
mounts ("the best tuned C daemon"), in the same rounds as shimfs and native
access.  Debian's ``libfuse3-dev`` ships the example's source in its
documentation (``dpkg -L libfuse3-dev`` lists
``/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c``), so nothing is
downloaded: it is compiled with ``gcc -O2`` and cached in ``bench/.cpeer/``.
The 3.14 example leaves ``max_threads`` of its loop config unset, so libfuse
prints "Ignoring invalid max threads value" on every mount and runs with its
default of 10 worker threads.

    python bench/cpeer.py          # build (or find) it and print its path
"""
from __future__ import annotations

import gzip
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cpeer")
FILES = ("passthrough_ll.c", "passthrough_helpers.h")


class Unavailable(Exception):
    """The C peer cannot be built here (the reason is the message)."""


def _installed_version() -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libfuse3-dev"],
                         capture_output=True, text=True, check=False)
    if res.returncode or not res.stdout:
        raise Unavailable("libfuse3-dev is not installed")
    return res.stdout.strip()


def _example_sources() -> dict[str, str]:
    """Where the package put each example file (Debian may gzip docs)."""
    res = subprocess.run(["dpkg", "-L", "libfuse3-dev"], capture_output=True, text=True,
                         check=False)
    found: dict[str, str] = {}
    for path in res.stdout.split():
        base = os.path.basename(path)
        for name in FILES:
            if "/examples/" in path and base in (name, name + ".gz"):
                found[name] = path
    missing = [n for n in FILES if n not in found]
    if missing:
        raise Unavailable("libfuse3-dev ships no example %s" % ", ".join(missing))
    return found


def _copy_source(src: str, dst: str) -> None:
    opener = gzip.open if src.endswith(".gz") else open
    with opener(src, "rb") as f, open(dst, "wb") as out:
        out.write(f.read())


def binary() -> str:
    """The path of a built ``passthrough_ll``; builds it on first use."""
    version = _installed_version()                 # e.g. 3.14.0-4
    upstream = version.split(":")[-1].rsplit("-", 1)[0]
    exe = os.path.join(CACHE, "passthrough_ll-" + upstream)
    if os.access(exe, os.X_OK):
        return exe
    os.makedirs(CACHE, exist_ok=True)
    for name, path in _example_sources().items():
        _copy_source(path, os.path.join(CACHE, name))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True, check=False)
    if flags.returncode:
        raise Unavailable("pkg-config knows no fuse3")
    res = subprocess.run(["gcc", "-O2", "-o", exe + ".tmp", os.path.join(CACHE, FILES[0]),
                          *flags.stdout.split(), "-lpthread"], capture_output=True, text=True,
                         check=False)
    if res.returncode:
        raise Unavailable("building passthrough_ll failed: %s" % res.stderr.strip()[-500:])
    os.rename(exe + ".tmp", exe)
    return exe


if __name__ == "__main__":
    print(binary())
