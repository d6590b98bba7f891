"""The layout's rules, checked: what imports what, one docstring a module,
one place for each name, nothing fetched by URL."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def _modules(package: str):
    d = os.path.join(SRC, package)
    for name in sorted(os.listdir(d)):
        if name.endswith(".py"):
            path = os.path.join(d, name)
            with open(path) as f:
                yield name, path, ast.parse(f.read(), path)


def test_engine_imports_without_fuse_trio_or_shimfs():
    res = _python("import sys\n"
                  "for name in ('shimfs', 'pyfuse3', 'trio'):\n"
                  "    sys.modules[name] = None\n"
                  "import shimcore, shimcore._engine, shimcore.fallback\n"
                  "pc = shimcore.PageCache(16 << 20)\n"
                  "print(shimcore.IMPLEMENTATION, pc.stats()['nslots'] if 'nslots' in pc.stats() else 'ok')\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("compiled")


def test_vfs_imports_and_works_without_pyfuse3(tmp_path):
    """The VFS core runs in-process with the FUSE binding absent."""
    (tmp_path / "b").mkdir()
    res = _python("import sys, os, stat, trio\n"
                  "sys.modules['pyfuse3'] = None\n"
                  "from shimfs.vfs import Vfs\n"
                  "from shimfs.config import Config\n"
                  "from shimfs.nodes import Ctx\n"
                  "vfs = Vfs(Config(backing=%r, cache_size=16 << 20))\n"
                  "async def go():\n"
                  "    fh, attr = await vfs.create(1, b'f', stat.S_IFREG | 0o644, os.O_RDWR, Ctx())\n"
                  "    await vfs.write(fh, 0, b'no kernel')\n"
                  "    await vfs.fsync(fh)\n"
                  "    await vfs.release(fh)\n"
                  "trio.run(go)\n"
                  "assert 'pyfuse3' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
                  % str(tmp_path / "b"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b" / "f").read_bytes() == b"no kernel"


def test_only_the_facade_reaches_the_engine():
    """Nothing in shimfs but cache.py imports shimcore or touches ``.engine``."""
    offenders = []
    for name, path, tree in _modules("shimfs"):
        if name == "cache.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                mods = []
            if any(m == "shimcore" or m.startswith("shimcore.") for m in mods):
                offenders.append("%s imports shimcore" % name)
            if isinstance(node, ast.Attribute) and node.attr == "engine":
                offenders.append("%s:%d uses .engine" % (name, node.lineno))
    assert offenders == []


def test_only_the_adapter_and_mount_import_pyfuse3():
    users = set()
    for name, path, tree in _modules("shimfs"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "pyfuse3" for a in node.names):
                users.add(name)
    assert users == {"fuseops.py", "mount.py"}


@pytest.mark.parametrize("package", ["shimfs", "shimcore"])
def test_every_module_says_its_job(package):
    missing = [name for name, path, tree in _modules(package)
               if not (ast.get_docstring(tree) or "").strip()]
    assert missing == []


def test_xattr_names_are_spelled_in_one_place():
    """Only shimfs/names.py spells a control xattr; everyone else imports it."""
    pattern = re.compile(r"[\"']user\.shimfs\.")
    spelled = []
    for top in ("src", "tests", "bench", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".py", ".pyx")):
                    path = os.path.join(dirpath, f)
                    with open(path, errors="replace") as fh:
                        if pattern.search(fh.read()):
                            spelled.append(os.path.relpath(path, ROOT))
    assert spelled == [os.path.join("src", "shimfs", "names.py")]


def test_nothing_fetches_by_url():
    """Packages come from their own clients (apt-get, pip); no code downloads."""
    # Built from pieces, so that this check is not itself taken for a download.
    fetch = re.compile("|".join(["url" "open", r"urllib\.re" "quest", r"requests\.g" "et",
                                 r"\bwg" r"et\b", r"\bcu" r"rl\b", r"https?:/" "/"]))
    found = []
    for top in ("src", "tests", "bench", "scripts", ".ci"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "/." in dirpath.replace(ROOT, ""):     # .cpeer and other build caches
                if not dirpath.endswith(".ci"):
                    continue
            for f in files:
                if f.endswith((".py", ".pyx", ".pxd", ".sh")) or top == ".ci":
                    path = os.path.join(dirpath, f)
                    if os.path.samefile(path, __file__):
                        continue        # its pattern, not a fetch
                    with open(path, errors="replace") as fh:
                        for i, line in enumerate(fh, 1):
                            if fetch.search(line):
                                found.append("%s:%d" % (os.path.relpath(path, ROOT), i))
    assert found == []


def test_checklogs_finds_unexpected_warnings_and_errors(tmp_path):
    """The plugin behind every mount test: warnings and errors fail the test
    unless a pattern declares them; info and debug lines never do."""
    from checklogs import unexpected_lines
    log = tmp_path / "shimfs.log"
    log.write_text(
        "2026-12-01 10:00:00,000 shimfs[7] INFO shimfs.mount: tuned\n"
        "2026-12-01 10:00:01,000 shimfs[7] ERROR shimfs.errors: internal error, answering EIO\n"
        "Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\n"
        "AttributeError: boom\n"
        "2026-12-01 10:00:02,000 shimfs[7] WARNING shimfs.namespace: keeping /x: retried\n"
        "2026-12-01 10:00:03,000 shimfs[7] DEBUG shimfs.files: nothing\n")
    bad = unexpected_lines([str(log)], [])
    assert len(bad) == 2
    assert "internal error" in bad[0] and "AttributeError: boom" in bad[0]
    assert unexpected_lines([str(log)], [r"keeping .*: retried"]) == bad[:1]
    assert unexpected_lines([str(log)], [r"internal error", r"keeping"]) == []
    assert unexpected_lines([str(tmp_path / "missing.log")], []) == []
