"""The mutation check: does the suite catch the bugs that matter?

Each mutation below is one small deliberate bug.  For each, this copies the
repository to a scratch directory, applies the bug there (the text to
replace must occur exactly once), rebuilds the compiled modules if a .pyx
changed, and runs the tests that should catch it, with the scratch copy's
``src`` first on the path (the daemons the tests start inherit it).  A
mutation *survives* if those tests still pass.

    .venv/bin/python scripts/mutate.py            # all of them (~10 min, root)
    .venv/bin/python scripts/mutate.py fsync      # those whose name contains "fsync"

Not part of CI: it is slow.  Prints one line per mutation and exits 1 if any
survived.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str           # relative to the repository
    old: str
    new: str
    tests: tuple        # pytest arguments


MUTATIONS = [
    Mutation("fsync skipped", "src/shimfs/cache.py",
             "            await self.run(os.fsync, fd)\n",
             "            pass\n",
             ("tests/test_durability.py",)),
    Mutation("dirty state dropped on a write-back error", "src/shimcore/_engine.pyx",
             "self._set_dirty(fr, s)     # keep it for a retry",
             "pass",
             ("tests/test_engine.py", "tests/test_faults.py::test_enospc_msync_fails_keeps_data_and_retries")),
    Mutation("credential switch skipped", "src/shimfs/credentials.py",
             "        if not self.is_root or ctx.uid == 0:\n",
             "        if True:\n",
             ("tests/test_permissions.py",)),
    Mutation("short READ reply", "src/shimfs/fuseops.py",
             "        return await self.vfs.read(fh, off, size)\n",
             "        data = await self.vfs.read(fh, off, size)\n"
             "        return data[:size - 1] if len(data) == size > 1 else data\n",
             ("tests/test_mount.py",)),
    Mutation("truncate not reaching the backing file", "src/shimfs/files.py",
             "            await self.cache.run(os.ftruncate, node.fd, size)\n",
             "            pass\n",
             ("tests/test_mount.py", "tests/test_vfs.py")),
    Mutation("multiwrite writing whole pages", "src/shimcore/_engine.pyx",
             "                    if tmp[i] == tw[i]:\n",
             "                    if False:\n",
             ("tests/test_consistency.py", "tests/test_engine.py")),
    Mutation("dirty pages evicted", "src/shimcore/_engine.pyx",
             "            if self.slots[s].pins or self.slots[s].state != S_VALID or self.slots[s].dirty:\n",
             "            if self.slots[s].pins or self.slots[s].state != S_VALID:\n",
             ("tests/test_engine.py",)),
    Mutation("fallback forgetting dirty pages on eviction", "src/shimcore/fallback.py",
             "        for key in self._pages:\n            if key[1] not in self._files[key[0]].dirty:\n",
             "        for key in self._pages:\n            if True:\n",
             ("tests/test_engine.py::test_random_sequences_match_model",
              "tests/test_engine.py::test_refresh_and_multiwrite_agree_with_fallback")),
    Mutation("written pages still known zeros", "src/shimcore/_engine.pyx",
             "            fr.zero[p >> 6] &= ~bit\n",
             "            pass\n",
             ("tests/test_zeros_engine.py",)),
    Mutation("refresh trusting known zeros", "src/shimcore/_engine.pyx",
             "            self._zero_clear(fr, p0, p1)        # the backing file says what is there now\n",
             "            pass\n",
             ("tests/test_zeros_engine.py", "tests/test_checkpoint.py")),
    Mutation("reload trusting known zeros", "src/shimcore/_engine.pyx",
             "            pthread_mutex_lock(&self.mu)\n            self._zero_clear(fr, p0, p1)\n",
             "            pthread_mutex_lock(&self.mu)\n",
             ("tests/test_checkpoint.py",)),
    Mutation("a punched hole keeping the daemon's dirty pages", "src/shimcore/_engine.pyx",
             "                    if f0 <= pg < f1:\n                        if self.slots[s].dirty:",
             "                    if False:\n                        if self.slots[s].dirty:",
             ("tests/test_fallocate.py", "-k", "dirty and local")),
    Mutation("a punch leaving the cache as it was", "src/shimfs/files.py",
             "                self.cache.punch(node.fid, offset, length)\n",
             "                pass\n",
             ("tests/test_fallocate.py", "-k", "local")),
]


def _copy(dst: str) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", ".hypothesis",
                                    "__pycache__", ".cpeer", ".pytest_cache")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def _build(tree: str) -> None:
    import importlib.util
    if importlib.util.find_spec("Cython") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cython", "setuptools"],
                       check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(m: Mutation) -> tuple[bool, float]:
    """True if the mutation survived; and the seconds it took."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shimfs-mutant-") as tmp:
        tree = os.path.join(tmp, "tree")
        _copy(tree)
        path = os.path.join(tree, m.path)
        with open(path) as f:
            text = f.read()
        if text.count(m.old) != 1:
            raise SystemExit("mutation %r: its text occurs %d times in %s"
                             % (m.name, text.count(m.old), m.path))
        with open(path, "w") as f:
            f.write(text.replace(m.old, m.new))
        _build(tree)         # recompiles what the mutation changed (a .pyx)
        env = dict(os.environ, PYTHONPATH=os.path.join(tree, "src"),
                   SHIMFS_KEEP_STANDIN="1")
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              *m.tests], cwd=tree, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    return res.returncode == 0, time.monotonic() - t0


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(a in m.name for a in argv)]
    survived = []
    for m in chosen:
        alive, secs = run(m)
        print("%-48s %s  (%.0f s)" % (m.name, "SURVIVED" if alive else "caught", secs),
              flush=True)
        if alive:
            survived.append(m.name)
    print("%d of %d mutations caught" % (len(chosen) - len(survived), len(chosen)))
    if os.environ.get("SHIMFS_KEEP_STANDIN") != "1":
        subprocess.run([sys.executable, "-m", "shimfs.standin", "down"], cwd=ROOT, check=False)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
