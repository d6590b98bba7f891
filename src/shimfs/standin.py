"""The pvfs2 stand-in: a GlusterFS volume on loopback, FUSE-mounted direct-I/O.

On it ``mmap(MAP_SHARED)`` fails with ENODEV, as on pvfs2, and 4 KiB reads are
many times slower than 4 MiB ones.  Tests, benchmarks and the demo share it::

    python -m shimfs.standin up        # start (or reuse); prints the mount dir
    python -m shimfs.standin up --clients 2   # and a second client mount
    python -m shimfs.standin down      # stop and remove what `up` made

Everything stays on 127.0.0.0/8: gluster refuses localhost/127.0.0.1 as a
brick host, so the brick host is an /etc/hosts alias on 127.0.0.2.

It stops only what it started, by pid, never by name: the machine may run
other GlusterFS volumes and mounts.  ``up`` writes down in ``STATE_FILE``
what it made: the glusterd it started (if none was running), whether it
added the /etc/hosts alias and set glusterd's bind address (only for a
glusterd it starts), and its client mounts.  ``down`` unmounts its own
clients, stops and deletes its own volume (which stops its brick), and
stops its glusterd and undoes its changes to /etc/hosts and glusterd.vol
only when no other volume is left in that glusterd.  Needs root and
Debian's glusterfs-server.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HOST = "shimfs-standin"
ADDR = "127.0.0.2"
VOLUME = "shimfs"
STATE = "/var/lib/shimfs-standin"
BRICK = STATE + "/brick"
MOUNT_BASE = "/run/shimfs-standin"
STATE_FILE = MOUNT_BASE + "/state.json"
GLUSTERD_PID = MOUNT_BASE + "/glusterd.pid"
GLUSTERD_VOL = "/etc/glusterfs/glusterd.vol"
HOSTS = "/etc/hosts"
HOSTS_LINE = "%s %s  # shimfs stand-in" % (ADDR, HOST)


#: GlusterFS client translators that keep data or attributes on a client for
#: up to a second (io-cache, quick-read, md-cache, read-ahead) or delay an
#: open: with them on, one client reads stale bytes another client has
#: written and fsynced, which no protocol above the file system can see.
#: pvfs2 keeps no such client cache; off, the stand-in behaves like it.
#: write-behind stays: it is flushed by fsync, which every give-up calls.
VOLUME_OPTIONS = {"performance.io-cache": "off", "performance.quick-read": "off",
                  "performance.stat-prefetch": "off", "performance.read-ahead": "off",
                  "performance.open-behind": "off"}


class StandinError(RuntimeError):
    pass


def _run(*cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=timeout)
    if check and res.returncode:
        raise StandinError("%s failed: %s" % (" ".join(cmd), res.stdout.strip()))
    return res


def _gluster(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    return _run("gluster", "--mode=script", *args, check=check, timeout=timeout)


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


# -- what `up` made -----------------------------------------------------------
def _load() -> dict:
    try:
        with open(STATE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save(state: dict) -> None:
    os.makedirs(MOUNT_BASE, exist_ok=True)
    tmp = STATE_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, STATE_FILE)


def _alive(pid: int | None, name: str) -> bool:
    """Process ``pid`` exists and is the program ``name`` (not a reused pid)."""
    if not pid:
        return False
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip() == name
    except OSError:
        return False


def _stop(pid: int, name: str, timeout: float = 20.0) -> None:
    """SIGTERM ``pid``, then SIGKILL; only while it still is ``name``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if not _alive(pid, name):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _alive(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
    if _alive(pid, name):
        raise StandinError("%s (pid %d) does not stop" % (name, pid))


def _mount_source(path: str) -> str | None:
    """The source field of the mount at ``path`` (``HOST:/VOLUME`` for ours),
    None if nothing is mounted there."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == path:
                return fields[0]
    return None


def _is_mounted(path: str) -> bool:
    return _mount_source(path) is not None


def _clear_dead_client(d: str) -> None:
    """Lazily unmount ``d`` if it is a mount of our volume whose client died.

    A glusterfs client killed from outside (a session torn down, the OOM
    killer) leaves its mount behind answering ENOTCONN; ``up`` would then
    find the directory neither mounted-and-working nor mountable.  Only a
    mount whose source is our own volume is touched."""
    if _mount_source(d) not in ("%s:/%s" % (HOST, VOLUME), "%s:%s" % (HOST, VOLUME)):
        return
    try:
        os.stat(d)
        return
    except OSError:
        pass
    _run("umount", "-l", d, check=False)


def _answers() -> bool:
    return _gluster("volume", "list", check=False, timeout=30).returncode == 0


def _add_hosts_alias(state: dict) -> None:
    with open(HOSTS) as f:
        lines = f.read().splitlines()
    if any(HOST in ln.split()[1:] for ln in lines if ln.strip() and not ln.startswith("#")):
        return
    with open(HOSTS, "a") as f:
        f.write(HOSTS_LINE + "\n")
    state["hosts_line"] = True


def _remove_hosts_alias() -> None:
    with open(HOSTS) as f:
        lines = f.read().splitlines()
    kept = [ln for ln in lines if ln.strip() != HOSTS_LINE]
    if len(kept) != len(lines):
        with open(HOSTS, "w") as f:
            f.write("\n".join(kept) + "\n")


def _bind_glusterd(state: dict) -> None:
    """Make a glusterd that we are about to start listen on the alias only;
    the original glusterd.vol is kept in the state, to be put back."""
    try:
        text = open(GLUSTERD_VOL).read()
    except OSError:
        return
    if "transport.socket.bind-address" in text:
        return
    new = text.replace("    option working-directory",
                       "    option transport.socket.bind-address %s\n    option working-directory"
                       % ADDR, 1)
    if new != text:
        state["glusterd_vol"] = text
        with open(GLUSTERD_VOL, "w") as f:
            f.write(new)


def _start_glusterd(state: dict) -> None:
    """Start glusterd unless one answers already (then it is not ours)."""
    if _answers():
        return
    if not _alive(state.get("glusterd_pid"), "glusterd"):
        _bind_glusterd(state)
        _save(state)
        _run("glusterd", "-p", GLUSTERD_PID)
        deadline = time.monotonic() + 10
        while not os.path.exists(GLUSTERD_PID) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(GLUSTERD_PID) as f:
            state["glusterd_pid"] = int(f.read().strip())
        _save(state)
    deadline = time.monotonic() + 60
    while not _answers():
        if time.monotonic() > deadline:
            raise StandinError("glusterd does not answer (see /var/log/glusterfs/glusterd.log)")
        time.sleep(0.2)


# -- the volume's processes, by pid -------------------------------------------
def brick_pid() -> int | None:
    """The pid of the stand-in's brick (glusterd's pid file for it), if it runs."""
    for path in glob.glob("/var/run/gluster/vols/%s/*.pid" % VOLUME):
        try:
            with open(path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if _alive(pid, "glusterfsd") and _cmdline_has(pid, BRICK):
            return pid
    return None


def client_pid(n: int = 0) -> int | None:
    """The pid of the GlusterFS client serving ``client_dir(n)``, if mounted."""
    return _client_of(client_dir(n))


def _client_of(d: str) -> int | None:
    for name in os.listdir("/proc"):
        if name.isdigit() and _alive(int(name), "glusterfs") and _cmdline_has(int(name), d):
            return int(name)
    return None


def _cmdline_has(pid: int, word: str) -> bool:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return word.encode() in f.read().split(b"\0")
    except OSError:
        return False


def up(clients: int = 1) -> str:
    """Start or reuse the stand-in; return the first client mount directory."""
    why = available()
    if why:
        raise StandinError(why)
    state = _load()
    state.setdefault("clients", [])
    _add_hosts_alias(state)
    _save(state)
    _start_glusterd(state)
    info = _gluster("volume", "info", VOLUME, check=False)
    if info.returncode:
        os.makedirs(BRICK, exist_ok=True)
        _gluster("volume", "create", VOLUME, "%s:%s" % (HOST, BRICK), "force")
        state["volume"] = True
        _save(state)
        info = _gluster("volume", "info", VOLUME)
    if state.get("volume"):
        for key, value in VOLUME_OPTIONS.items():
            if "%s: %s" % (key, value) not in info.stdout:
                _gluster("volume", "set", VOLUME, key, value)
    if "Status: Started" not in info.stdout:
        _gluster("volume", "start", VOLUME, "force")
    for n in range(clients):
        d = client_dir(n)
        _clear_dead_client(d)
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
            if d not in state["clients"]:
                state["clients"].append(d)
                _save(state)
    return client_dir(0)


def kill_brick() -> None:
    """Fault injection: kill the stand-in's brick process (a crashed storage
    server), by its pid; no other brick is touched."""
    pid = brick_pid()
    if pid is None:
        raise StandinError("the stand-in's brick is not running")
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not _alive(pid, "glusterfsd"):
            return
        time.sleep(0.1)
    raise StandinError("the brick process does not die")


def start_brick(timeout: float = 60.0) -> None:
    """Bring a killed brick back and wait until every client reads again."""
    _gluster("volume", "start", VOLUME, "force")
    deadline = time.monotonic() + timeout
    for d in _load().get("clients", []):
        while _is_mounted(d):
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
    """Stop and remove what ``up`` made, and nothing else."""
    state = _load()
    for d in state.get("clients", []):
        if _is_mounted(d):
            pid = _client_of(d)
            _run("umount", d, check=False)
            if _is_mounted(d):
                _run("umount", "-l", d, check=False)
            if pid:
                _stop(pid, "glusterfs")
    state["clients"] = []
    others = []
    if _answers():
        if _gluster("volume", "info", VOLUME, check=False).returncode == 0:
            _gluster("volume", "stop", VOLUME, "force", check=False)
            _gluster("volume", "delete", VOLUME, check=False)
        listed = _gluster("volume", "list", check=False).stdout.strip()
        if not listed.startswith("No volumes"):
            others = [v for v in listed.split() if v != VOLUME]
    shutil.rmtree(STATE, ignore_errors=True)
    state.pop("volume", None)
    if others:
        # Someone else's volume lives in this glusterd: leave it serving, with
        # the alias it may use; a later `down` finishes once it is alone.
        _save(state)
        return
    if state.get("glusterd_pid"):
        _stop(state["glusterd_pid"], "glusterd")
        if "glusterd_vol" in state:
            with open(GLUSTERD_VOL, "w") as f:
                f.write(state["glusterd_vol"])
    if state.get("hosts_line"):
        _remove_hosts_alias()
    for path in (STATE_FILE, GLUSTERD_PID):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


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
