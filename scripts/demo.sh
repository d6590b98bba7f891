#!/usr/bin/env bash
# The main job, end to end: the pvfs2 stand-in, a dataset on it that cannot be
# mapped, shimfs mounted over it, the dataset mapped and scanned through
# shimfs, and the throughput next to native pread of the same file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
