#!/usr/bin/env bash
# The throughput benchmarks (root; several GiB of data; ~30 min): ratios to
# native access on the GlusterFS stand-in and on tmpfs.  Prints the table and
# writes bench/results.md.  Extra arguments go to pytest.  As in test.sh,
# only the mounts this run made (under its own $TMPDIR) are cleaned up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q -e '.[test,bench]' 2>&1 | grep -vE '^WARNING: Location|BuildBackendWarning' || true
run_tmp=$(mktemp -d /tmp/shimfs-bench.XXXXXX)
export TMPDIR="$run_tmp"
cleanup() {
  awk -v base="$run_tmp/" 'index($2, base) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" || true; done
  [ "${SHIMFS_KEEP_STANDIN:-}" = 1 ] || .venv/bin/python -m shimfs.standin down || true
  rm -rf "$run_tmp"
}
trap cleanup EXIT
.venv/bin/python -m pytest -p no:cacheprovider -s -q --benchmark-columns=min,median,max "$@" bench
