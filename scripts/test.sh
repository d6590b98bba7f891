#!/usr/bin/env bash
# The whole test suite: set up, run, and leave no mounts or daemons behind.
# Everything the run mounts lives under its own temporary directory ($TMPDIR
# for pytest and the tests), and only those mounts are cleaned up at the end:
# other FUSE or GlusterFS mounts on the machine are left alone.  The stand-in
# stops only what it started (src/shimfs/standin.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run_tmp=$(mktemp -d /tmp/shimfs-test.XXXXXX)
chmod 755 "$run_tmp"          # the tests' unprivileged users reach their dirs in it
export TMPDIR="$run_tmp"
cleanup() {
  # Mounts left under this run's directory by a crashed test, innermost first.
  awk -v base="$run_tmp/" 'index($2, base) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" || true; done
  [ "${SHIMFS_KEEP_STANDIN:-}" = 1 ] || .venv/bin/python -m shimfs.standin down || true
  rm -rf "$run_tmp"
}
trap cleanup EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
