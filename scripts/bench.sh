#!/usr/bin/env bash
# The throughput benchmarks (root; several GiB of data; ~30 min): ratios to
# native access on the GlusterFS stand-in and on tmpfs.  Prints the table and
# writes bench/results.md (results-brick-warm.md with SHIMFS_BENCH_COLD=client,
# the default).  Extra arguments go to pytest.  As in test.sh,
# scripts/run-env.sh sets the run up and cleans up only what it made.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q -e '.[test,bench]' 2>&1 | grep -vE '^WARNING: Location|BuildBackendWarning' || true
source scripts/run-env.sh bench
.venv/bin/python -m pytest -p no:cacheprovider -s -q --benchmark-columns=min,median,max "$@" bench
