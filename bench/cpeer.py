"""The C peer: libfuse's example ``passthrough_ll``, built from Debian's source.

The engine issue compares shimfs with libfuse's C pass-through daemons, with
the mount's kernel read-ahead raised to 4 MiB ("the best tuned C daemon").
Those figures came from another machine.  This module builds the same
example so that the bench measures it in the same run as shimfs and native
access.

The source is the ``fuse3`` source package of the installed ``libfuse3-dev``
version, fetched from deb.debian.org.  Its SHA-256 is checked against the
package's ``.dsc``.  The binary is cached in ``bench/.cpeer/``.  The 3.14
example leaves ``max_threads`` of its loop config unset, so libfuse prints
"Ignoring invalid max threads value" on every mount and runs with its
default of 10 worker threads.

    python bench/cpeer.py          # build (or find) it and print its path
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cpeer")
POOL = "https://deb.debian.org/debian/pool/main/f/fuse3/"


class Unavailable(Exception):
    """The C peer cannot be built here (the reason is the message)."""


def _installed_version() -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libfuse3-dev"],
                         capture_output=True, text=True, check=False)
    if res.returncode or not res.stdout:
        raise Unavailable("libfuse3-dev is not installed")
    return res.stdout.strip()


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    except OSError as exc:
        raise Unavailable("cannot fetch %s: %s" % (url, exc)) from None


def binary() -> str:
    """The path of a built ``passthrough_ll``; builds it on first use."""
    version = _installed_version()                 # e.g. 3.14.0-4
    upstream = version.split(":")[-1].rsplit("-", 1)[0]
    exe = os.path.join(CACHE, "passthrough_ll-" + upstream)
    if os.access(exe, os.X_OK):
        return exe
    os.makedirs(CACHE, exist_ok=True)
    dsc = _fetch(POOL + "fuse3_%s.dsc" % version.split(":")[-1]).decode()
    orig = "fuse3_%s.orig.tar.xz" % upstream
    m = re.search(r"^ ([0-9a-f]{64}) \d+ %s$" % re.escape(orig), dsc, re.M)
    if not m:
        raise Unavailable("%s is not listed in the .dsc of fuse3 %s" % (orig, version))
    data = _fetch(POOL + orig)
    if hashlib.sha256(data).hexdigest() != m.group(1):
        raise Unavailable("%s: SHA-256 differs from the .dsc" % orig)
    tarball = os.path.join(CACHE, orig)
    with open(tarball, "wb") as f:
        f.write(data)
    src = os.path.join(CACHE, "passthrough_ll.c")
    with tarfile.open(tarball) as t:
        for name in ("passthrough_ll.c", "passthrough_helpers.h"):
            member = next((n for n in t.getnames() if n.endswith("/example/" + name)), None)
            if member is None:
                raise Unavailable("%s has no example/%s" % (orig, name))
            with open(os.path.join(CACHE, name), "wb") as f:
                f.write(t.extractfile(member).read())
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True, check=False)
    if flags.returncode:
        raise Unavailable("pkg-config knows no fuse3")
    res = subprocess.run(["gcc", "-O2", "-o", exe + ".tmp", src, *flags.stdout.split(),
                          "-lpthread"], capture_output=True, text=True, check=False)
    if res.returncode:
        raise Unavailable("building passthrough_ll failed: %s" % res.stderr.strip()[-500:])
    os.rename(exe + ".tmp", exe)
    return exe


if __name__ == "__main__":
    print(binary())
