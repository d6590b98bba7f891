# Sourced by test.sh and bench.sh: the run's own temporary directory, the
# machine's DAMON page-out paused for the run, and on exit everything put back.
#
# * Everything the run mounts lives under "$run_tmp" ($TMPDIR for pytest and
#   the tests), and only those mounts are cleaned up at the end: other FUSE or
#   GlusterFS mounts on the machine are left alone.  The stand-in stops only
#   what it started (src/shimfs/standin.py); SHIMFS_KEEP_STANDIN=1 keeps it up.
# * DAMON: a kernel that runs a kdamond with a "pageout" scheme reclaims pages
#   that look cold, page cache included, with no memory pressure at all (seen
#   here: 859 MB paged out during six short test runs).  Pages pushed into the
#   kernel's cache and not yet touched look cold, so tests and benchmarks that
#   count the READs after a prefetch or a push saw a few, or dozens.  Such a
#   kdamond is stopped for the run and started again, with the same settings,
#   at exit.  SHIMFS_DAMON=keep leaves it running.  SHIMFS_DAMON_STATE says
#   which way it went (bench/results.md prints it).
run_tmp=$(mktemp -d "/tmp/shimfs-$1.XXXXXX")
chmod 755 "$run_tmp"          # the tests' unprivileged users reach their dirs in it
export TMPDIR="$run_tmp"
damon_paused=()
export SHIMFS_DAMON_STATE   # what pause_damon did, for the bench's header

pause_damon() {
  SHIMFS_DAMON_STATE="left as it was (SHIMFS_DAMON=keep)"
  [ "${SHIMFS_DAMON:-pause}" = keep ] && return 0
  local k
  for k in /sys/kernel/mm/damon/admin/kdamonds/*/; do
    [ "$(cat "$k/state" 2>/dev/null)" = on ] || continue
    grep -qx pageout "$k"contexts/*/schemes/*/action 2>/dev/null || continue
    if echo off > "$k/state" 2>/dev/null; then
      damon_paused+=("$k")
      echo "run-env: DAMON page-out paused for the run (${k%/})"
    fi
  done
  if [ ${#damon_paused[@]} -gt 0 ]; then
    SHIMFS_DAMON_STATE="paused for the run"
  else
    SHIMFS_DAMON_STATE="none running"
  fi
}

resume_damon() {
  local k
  for k in "${damon_paused[@]}"; do
    echo on > "$k/state" 2>/dev/null || echo "run-env: could not restart DAMON (${k%/})" >&2
  done
  damon_paused=()
}

cleanup() {
  # Mounts left under this run's directory by a crashed test, innermost first.
  awk -v base="$run_tmp/" 'index($2, base) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" || true; done
  [ "${SHIMFS_KEEP_STANDIN:-}" = 1 ] || .venv/bin/python -m shimfs.standin down || true
  rm -rf "$run_tmp"
  resume_damon
}
trap cleanup EXIT
pause_damon
