#!/usr/bin/env bash
# The throughput benchmarks (root; several GiB of data; ~30 min): ratios to
# native access on the GlusterFS stand-in and on tmpfs.  Prints the table and
# writes bench/results.md.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cleanup() {
  awk '$3 == "fuse.shimfs" || $3 == "fuse" {print $2}' /proc/mounts | while read -r m; do fusermount3 -u -z "$m" || true; done
  [ "${SHIMFS_KEEP_STANDIN:-}" = 1 ] || .venv/bin/python -m shimfs.standin down || true
}
trap cleanup EXIT
.venv/bin/python -m pytest -p no:cacheprovider -s -q --benchmark-columns=min,median,max "$@" bench
