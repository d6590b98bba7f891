#!/usr/bin/env bash
# The whole test suite: set up, run, and leave no mounts or daemons behind.
# The run's temporary directory, its cleanup and the machine settings it
# changes for the run: scripts/run-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/run-env.sh test
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
