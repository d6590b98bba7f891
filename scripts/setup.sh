#!/usr/bin/env bash
# Install everything shimfs needs on a Debian machine, idempotently:
# apt packages (FUSE, GlusterFS for the pvfs2 stand-in, etcd for the
# coherence tests), a virtualenv in .venv, and the build of the Cython
# engine.  Run as root.  Nothing is started: the tests start their own etcd
# (src/shimfs/etcdserver.py).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev glusterfs-server glusterfs-client etcd-server etcd-client openssl attr procps passwd; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Without udev (containers) /dev/fuse can stay 0600; Debian's udev rule makes
# it 0666 so that users mount through the setuid fusermount3.  Do the same.
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then chmod 0666 /dev/fuse; fi

# Debian's own python3, not a per-user build under /root: unprivileged users
# (the tests make some) must be able to run the venv's interpreter.
PY=${PYTHON:-/usr/bin/python3}
[ -x "$PY" ] || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# The build runs every time: it is quick when nothing changed.
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -vE '^WARNING: Location|BuildBackendWarning' || true
.venv/bin/python -c 'import shimcore._engine, pyfuse3, trio' || { echo "setup: build failed" >&2; exit 1; }

# mount(8) runs a fuse.shimfs mount through mount.fuse3, which starts the
# command `shimfs` with the caller's PATH and no virtualenv: put a link to
# this checkout's command in /usr/local/bin (in root's PATH and systemd's).
# Only a link is replaced, never a file someone else installed there.
if [ "$(id -u)" = 0 ]; then
  link=/usr/local/bin/shimfs
  if [ ! -e "$link" ] || [ -L "$link" ]; then
    ln -sfn "$(pwd)/.venv/bin/shimfs" "$link"
  fi
fi
