"""The pvfs2 stand-in: a GlusterFS volume on loopback, FUSE-mounted direct-I/O.

On it ``mmap(MAP_SHARED)`` fails with ENODEV, as on pvfs2, and 4 KiB reads are
many times slower than 4 MiB ones.  Tests, benchmarks and the demo share it::

    python -m shimfs.standin up        # start (or reuse); prints the mount dir
    python -m shimfs.standin up --clients 2   # and a second client mount
    python -m shimfs.standin down      # unmount, delete the volume, stop gluster

Everything stays on 127.0.0.0/8: gluster refuses localhost/127.0.0.1 as a
brick host, so the brick host is an /etc/hosts alias on 127.0.0.2, and
glusterd is told to bind there.  Needs root and Debian's glusterfs-server.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

HOST = "shimfs-standin"
ADDR = "127.0.0.2"
VOLUME = "shimfs"
STATE = "/var/lib/shimfs-standin"
BRICK = STATE + "/brick"
MOUNT_BASE = "/run/shimfs-standin"


class StandinError(RuntimeError):
    pass


def _run(*cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=timeout)
    if check and res.returncode:
        raise StandinError("%s failed: %s" % (" ".join(cmd), res.stdout.strip()))
    return res


def available() -> str | None:
    """None if the stand-in can run here, else why not."""
    if os.geteuid() != 0:
        return "the GlusterFS stand-in needs root"
    for tool in ("glusterd", "gluster", "mount.glusterfs"):
        if not shutil.which(tool) and not os.path.exists("/sbin/" + tool):
            return "%s is not installed (apt-get install glusterfs-server)" % tool
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def client_dir(n: int = 0) -> str:
    return os.path.join(MOUNT_BASE, "client%d" % n)


def _hosts_alias() -> None:
    with open("/etc/hosts") as f:
        lines = f.read().splitlines()
    if any(HOST in ln.split()[1:] for ln in lines if ln.strip() and not ln.startswith("#")):
        return
    with open("/etc/hosts", "a") as f:
        f.write("%s %s\n" % (ADDR, HOST))


def _glusterd_running() -> bool:
    return _run("pgrep", "-x", "glusterd", check=False).returncode == 0


def _answers() -> bool:
    return _run("gluster", "--mode=script", "volume", "list", check=False,
                timeout=30).returncode == 0


def _bind_glusterd() -> None:
    """Make glusterd listen on the alias only (idempotent)."""
    vol = "/etc/glusterfs/glusterd.vol"
    try:
        text = open(vol).read()
    except OSError:
        return
    if "transport.socket.bind-address" in text:
        return
    text = text.replace("    option working-directory",
                        "    option transport.socket.bind-address %s\n    option working-directory"
                        % ADDR, 1)
    with open(vol, "w") as f:
        f.write(text)


def _is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def up(clients: int = 1) -> str:
    """Start or reuse the stand-in; return the first client mount directory."""
    why = available()
    if why:
        raise StandinError(why)
    _hosts_alias()
    _bind_glusterd()
    deadline = time.monotonic() + 60
    while not _answers():
        if not _glusterd_running():
            _run("glusterd")
        time.sleep(0.2)
        if time.monotonic() > deadline:
            raise StandinError("glusterd does not answer (see /var/log/glusterfs/glusterd.log)")
    info = _run("gluster", "--mode=script", "volume", "info", VOLUME, check=False)
    if info.returncode:
        os.makedirs(BRICK, exist_ok=True)
        _run("gluster", "--mode=script", "volume", "create", VOLUME,
             "%s:%s" % (HOST, BRICK), "force")
        info = _run("gluster", "--mode=script", "volume", "info", VOLUME)
    if "Status: Started" not in info.stdout:
        _run("gluster", "--mode=script", "volume", "start", VOLUME, "force")
    for n in range(clients):
        d = client_dir(n)
        os.makedirs(d, exist_ok=True)
        if not _is_mounted(d):
            for attempt in range(50):
                res = _run("mount", "-t", "glusterfs", "-o", "direct-io-mode=enable",
                           "%s:/%s" % (HOST, VOLUME), d, check=False)
                if res.returncode == 0 and _is_mounted(d):
                    break
                time.sleep(0.2)
            else:
                raise StandinError("cannot mount the stand-in volume: %s" % res.stdout.strip())
    return client_dir(0)


def kill_brick() -> None:
    """Fault injection: kill the brick process (as a crashed storage server)."""
    _run("pkill", "-9", "-x", "glusterfsd", check=False)
    for _ in range(100):
        if _run("pgrep", "-x", "glusterfsd", check=False).returncode:
            return
        time.sleep(0.1)
    raise StandinError("the brick process does not die")


def start_brick(timeout: float = 60.0) -> None:
    """Bring a killed brick back and wait until every client reads again."""
    _run("gluster", "--mode=script", "volume", "start", VOLUME, "force")
    deadline = time.monotonic() + timeout
    for n in range(len(os.listdir(MOUNT_BASE)) if os.path.isdir(MOUNT_BASE) else 0):
        d = client_dir(n)
        while True:
            try:
                os.listdir(d)
                probe = os.path.join(d, ".standin-probe")
                with open(probe, "w") as f:
                    f.write("ok")
                os.unlink(probe)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise StandinError("client %s did not reconnect to the brick" % d)
                time.sleep(0.5)


def down() -> None:
    """Unmount every client, delete the volume and its brick, stop gluster."""
    if os.path.isdir(MOUNT_BASE):
        for name in os.listdir(MOUNT_BASE):
            d = os.path.join(MOUNT_BASE, name)
            if _is_mounted(d):
                _run("umount", "-l", d, check=False)
    if _glusterd_running():
        _run("gluster", "--mode=script", "volume", "stop", VOLUME, "force", check=False)
        _run("gluster", "--mode=script", "volume", "delete", VOLUME, check=False)
    for proc in ("glusterfs", "glusterfsd", "glusterd"):
        _run("pkill", "-x", proc, check=False)
    for _ in range(100):
        if all(_run("pgrep", "-x", p, check=False).returncode for p in
               ("glusterfs", "glusterfsd", "glusterd")):
            break
        time.sleep(0.1)
    shutil.rmtree(STATE, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shimfs.standin",
                                description="The GlusterFS stand-in for pvfs2 (root only).")
    p.add_argument("action", choices=["up", "down", "check"])
    p.add_argument("--clients", type=int, default=1, help="client mounts to make (up)")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            print(up(args.clients))
        elif args.action == "down":
            down()
        else:
            why = available()
            print(why or "ok")
            return 1 if why else 0
    except StandinError as exc:
        print("standin: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
