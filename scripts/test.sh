#!/usr/bin/env bash
# The whole test suite: set up, run, and leave no mounts or daemons behind.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cleanup() {
  # Any shimfs mount a crashed test left, then the GlusterFS stand-in.
  awk '$3 == "fuse.shimfs" {print $2}' /proc/mounts | while read -r m; do fusermount3 -u -z "$m" || true; done
  .venv/bin/python -m shimfs.standin down || true
}
trap cleanup EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
