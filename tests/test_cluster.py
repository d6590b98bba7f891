"""Coherence across nodes with ``-o coherence=etcd://...``: real mounts.

Two (or three) daemons, each over one of the stand-in's two GlusterFS
clients (or over one local directory), share a backing directory; a real
etcd server started by this module keeps the book of grants.  No process
calls msync or refresh: every read on any node must return the latest write
made on any node.  Each test mounts with its own etcd prefix.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mounting import (daemon_pid, fill, mount_stats, read_file, shim_mount, shimfs_cmd, small_tmpfs,
                      wait_gone, wait_until)
from shimfs import standin
from shimfs.etcdserver import EtcdServer

TTL = 3


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with EtcdServer(str(tmp_path_factory.mktemp("etcd"))) as srv:
        yield srv


@pytest.fixture(params=["local", "gluster"])
def dirs(request, tmp_path):
    """Two paths of one shared backing directory: the stand-in's two clients,
    or one local directory twice."""
    rel = "coh-" + uuid.uuid4().hex[:10]
    if request.param == "local":
        d = tmp_path / rel
        d.mkdir()
        yield str(d), str(d)
        return
    request.getfixturevalue("gluster")
    a, b = (os.path.join(standin.client_dir(i), rel) for i in (0, 1))
    os.mkdir(a)
    try:
        wait_until(lambda: os.path.isdir(b), 10, "the directory on the second client")
        yield a, b
    finally:
        subprocess.run(["rm", "-rf", a], check=False)


def _opts(etcd, request, *more: str) -> tuple[str, ...]:
    prefix = "/t/%s-%s" % (request.node.name.replace("[", "-").replace("]", ""),
                           uuid.uuid4().hex[:6])
    return ("mirror", "coherence=" + etcd.url, "coherence_prefix=" + prefix,
            "coherence_ttl=%d" % TTL) + more


@pytest.fixture
def two(etcd, dirs, tmp_path, request):
    """Two coherent mounts (A, B) of one backing directory."""
    opts = _opts(etcd, request)
    with shim_mount(str(tmp_path / "a"), dirs[0], *opts) as a, \
            shim_mount(str(tmp_path / "b"), dirs[1], *opts) as b:
        yield a, b


def _new_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * size)


def test_an_unsynced_mapped_write_is_read_on_the_other_node(two):
    a, b = two
    _new_file(a + "/f", 3 * 4096)
    fd = os.open(a + "/f", os.O_RDWR)
    try:
        m = mmap.mmap(fd, 3 * 4096)
        m[4096:4101] = b"hello"              # no msync
        assert read_file(b + "/f")[4096:4101] == b"hello"
        with open(b + "/f", "rb") as f:      # and mapped on B
            mb = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            assert mb[4096:4101] == b"hello"
            m[4096:4101] = b"HELLO"          # A writes again: B's mapping sees it
            assert mb[4096:4101] == b"HELLO"
            mb.close()
        m.close()
    finally:
        os.close(fd)
    sa, sb = mount_stats(a), mount_stats(b)
    assert sa["grants_given_up"] >= 1 and sa["give_up_bytes_written"] >= 4096
    assert sb["grant_waits"] >= 1 and sb["grant_wait_seconds"] > 0


def test_shadows_of_one_file_at_two_paths_are_one_file(etcd, dirs, tmp_path, request):
    """Each node links the shared file from its own client's path (``ln -s``,
    no mirror): the book names it by inode, so both are one file."""
    with open(os.path.join(dirs[0], "shared.bin"), "wb") as f:
        f.write(bytes(8192))
    opts = _opts(etcd, request)[1:]                   # no mirror
    with shim_mount(str(tmp_path / "a"), str(tmp_path), *opts) as a, \
            shim_mount(str(tmp_path / "b"), str(tmp_path), *opts) as b:
        os.symlink(os.path.join(dirs[0], "shared.bin"), a + "/x")
        os.symlink(os.path.join(dirs[1], "shared.bin"), b + "/y")
        fd = os.open(a + "/x", os.O_RDWR)
        m = mmap.mmap(fd, 8192)
        m[5000:5005] = b"via A"
        with open(b + "/y", "r+b") as f:
            assert f.read()[5000:5005] == b"via A"
            f.seek(100)
            f.write(b"via B")
        assert m[100:105] == b"via B"
        m.close()
        os.close(fd)
        assert mount_stats(a)["coherent_files"] == 1


def test_writes_on_both_nodes_meet_in_one_file(two):
    """plain write() on B, a mapped read on A, a grow on B seen by A's stat."""
    a, b = two
    _new_file(a + "/g", 4096)
    with open(a + "/g", "rb") as fa:
        ma = mmap.mmap(fa.fileno(), 4096, prot=mmap.PROT_READ)
        assert ma[:4] == b"\0\0\0\0"
        with open(b + "/g", "r+b", buffering=0) as fb:
            fb.write(b"from B")
            assert ma[:6] == b"from B"
            fb.seek(10000)
            fb.write(b"tail")                  # grows the file, not synced
        assert os.stat(a + "/g").st_size == 10004
        assert read_file(a + "/g")[10000:] == b"tail"
        ma.close()


def test_truncate_on_one_node_is_seen_by_the_other(two):
    a, b = two
    data = os.urandom(20000)
    with open(a + "/t", "wb") as f:
        f.write(data)
    assert read_file(b + "/t") == data
    os.truncate(a + "/t", 5000)
    assert os.stat(b + "/t").st_size == 5000
    assert read_file(b + "/t") == data[:5000]
    os.truncate(b + "/t", 9000)
    assert read_file(a + "/t") == data[:5000] + b"\0" * 4000


def _turns(path: str, me: int, rounds: int, errors: list) -> None:
    """Node ``me`` (0 or 1) increments the counter whenever it is even/odd."""
    try:
        fd = os.open(path, os.O_RDWR)
        m = mmap.mmap(fd, 4096)
        done = 0
        deadline = time.monotonic() + 300
        while done < rounds:
            (v,) = struct.unpack_from("<Q", m, 0)
            if v % 2 == me:
                struct.pack_into("<Q", m, 0, v + 1)
                done += 1
            else:
                time.sleep(0.001)
            if time.monotonic() > deadline:
                raise AssertionError("node %d stuck at %d after %d turns" % (me, v, done))
        m.close()
        os.close(fd)
    except BaseException as exc:        # reported by the test
        errors.append(exc)


def test_two_nodes_take_turns_on_one_counter_and_lose_no_update(two):
    a, b = two
    _new_file(a + "/c", 4096)
    errors: list = []
    threads = [threading.Thread(target=_turns, args=(p + "/c", i, 100, errors))
               for i, p in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for p in (a, b):
        assert struct.unpack_from("<Q", read_file(p + "/c"), 0)[0] == 200


_INCREMENT = r"""
import mmap, os, struct, sys
path, slot, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 4096)
for _ in range(n):
    (v,) = struct.unpack_from("<Q", m, slot * 8)
    struct.pack_into("<Q", m, slot * 8, v + 1)
m.close()
"""


def test_processes_on_each_node_increment_their_own_counters(two):
    """Two processes per node, each with its own counter in one shared
    page: a whole-page write-back from a stale copy would undo the others."""
    a, b = two
    _new_file(a + "/p", 4096)
    n = 40
    procs = [subprocess.Popen([sys.executable, "-c", _INCREMENT, mnt + "/p", str(slot), str(n)])
             for slot, mnt in enumerate((a, a, b, b))]
    for p in procs:
        assert p.wait(timeout=300) == 0
    for mnt in (a, b):
        assert struct.unpack_from("<4Q", read_file(mnt + "/p"), 0) == (n, n, n, n)


def test_readers_share_a_file_with_one_round_trip_each(two):
    a, b = two
    data = os.urandom(1 << 20)
    with open(a + "/r", "wb") as f:
        f.write(data)
    before = {p: mount_stats(p) for p in (a, b)}
    # A's Exclusive grant (it wrote the file) turns Shared for B once A has
    # no writer; then neither node asks again, however often it reads.
    for _ in range(3):
        for p in (a, b):
            with open(p + "/r", "rb") as f:
                m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                assert m[:] == data
                m.close()
            assert read_file(p + "/r") == data
    after = {p: mount_stats(p) for p in (a, b)}
    assert after[b]["grants_asked"] - before[b]["grants_asked"] == 1
    assert after[a]["grants_asked"] - before[a]["grants_asked"] == 0
    assert after[a]["grants_given_up"] - before[a]["grants_given_up"] == 1     # E -> S
    assert after[b]["grants_given_up"] == before[b]["grants_given_up"]
    assert after[b]["grants_held"] >= 1 and after[a]["grants_held"] >= 1


def test_writers_of_disjoint_extents_write_at_once(two):
    """Extents: once B has taken the one extent it writes from A, each node
    faults and writes its own part with no ask, no wait and no give-up, and
    then each reads the other's latest bytes."""
    from shimfs.cluster import EXTENT
    a, b = two
    _new_file(a + "/x", 4 * EXTENT)
    far = 3 * EXTENT
    fds = [os.open(p + "/x", os.O_RDWR) for p in (a, b)]
    ma, mb = (mmap.mmap(fd, 4 * EXTENT) for fd in fds)
    try:
        ma[0:8] = b"A-start-"
        mb[far:far + 8] = b"B-start-"           # B takes extent 3 from A
        before = {p: mount_stats(p) for p in (a, b)}
        for i in range(1, 21):
            page = i * 4096 * 7                  # a page neither has touched
            ma[page:page + 8] = b"A%07d" % i
            mb[far + page:far + page + 8] = b"B%07d" % i
            ma[0:8] = b"A%07d" % i
            mb[far:far + 8] = b"B%07d" % i
        after = {p: mount_stats(p) for p in (a, b)}
        for p in (a, b):
            for name in ("grants_asked", "grants_given_up", "asks_sent", "grant_waits"):
                assert after[p][name] == before[p][name], (p, name)
        grant_b = json.loads(shimfs_cmd("stat", "--json", b + "/x").stdout)["file"]["grant"]
        # B holds extent 3 (and what the kernel's read-around took), not 0
        assert "M-16M" in grant_b and not grant_b.startswith("E 0M"), grant_b
        assert os.pread(fds[1], 8, 0) == b"A0000020"          # B now takes extent 0
        assert os.pread(fds[0], 8, far) == b"B0000020"        # and A extent 3
        assert os.pread(fds[0], 8, far + 20 * 4096 * 7) == b"B0000020"
        assert os.pread(fds[1], 8, 20 * 4096 * 7) == b"A0000020"
    finally:
        ma.close()
        mb.close()
        for fd in fds:
            os.close(fd)
    data = read_file(a + "/x")
    assert data[:8] == b"A0000020" and data[far:far + 8] == b"B0000020"


def test_a_node_killed_holding_dirty_pages_lets_the_others_go_on(etcd, dirs, tmp_path, request):
    """A writes and msyncs, writes again without msync, and is killed (-9):
    B waits at most for A's lease, then reads the msync'd bytes."""
    opts = _opts(etcd, request)
    with shim_mount(str(tmp_path / "b"), dirs[1], *opts) as b:
        with shim_mount(str(tmp_path / "a"), dirs[0], *opts) as a:
            _new_file(a + "/k", 8192)
            fd = os.open(a + "/k", os.O_RDWR)
            m = mmap.mmap(fd, 8192)
            m[:7] = b"durable"
            m.flush()                        # msync: in the backing file
            m[:7] = b"lost!!!"               # never synced
            pid = daemon_pid(a)
            os.kill(pid, signal.SIGKILL)
            assert wait_gone(pid, 10)
            start = time.monotonic()
            got = read_file(b + "/k")[:7]
            waited = time.monotonic() - start
            try:
                m.close()
            except OSError:
                pass
            try:
                os.close(fd)
            except OSError:
                pass
        assert got == b"durable"
        # the lease (TTL) plus one poll of the book, with room for a slow machine
        assert waited < TTL + 10, waited


def test_etcd_down_fails_with_enotconn_and_the_mount_works_again(tmp_path, dirs, request):
    """etcd stopped: an operation that needs a grant fails with ENOTCONN in
    bounded time; nothing msync'd is lost; once etcd is back the same
    mounts work again."""
    with EtcdServer(str(tmp_path / "etcd2")) as srv:
        opts = ("mirror", "coherence=" + srv.url, "coherence_ttl=%d" % TTL,
                "coherence_wait=10")
        with shim_mount(str(tmp_path / "a"), dirs[0], *opts) as a, \
                shim_mount(str(tmp_path / "b"), dirs[1], *opts) as b:
            with open(a + "/e", "wb") as f:
                f.write(b"synced")
                f.flush()
                os.fsync(f.fileno())
            srv.stop(signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(OSError) as exc:
                read_file(b + "/e")
            assert exc.value.errno == errno.ENOTCONN, exc.value
            assert time.monotonic() - start < 30
            srv.start()
            assert wait_until(lambda: _reads(b + "/e"), 60, "B to read again") == b"synced"
            with open(b + "/e", "r+b") as f:
                f.write(b"SYNCED")
            assert read_file(a + "/e") == b"SYNCED"


@pytest.mark.daemon_logs(r"lease lost")
def test_etcd_killed_while_a_node_waits_for_a_give_up(tmp_path, dirs, request):
    """etcd killed mid-protocol: B has asked A (stopped, so it cannot answer)
    for a grant and waits in line when etcd dies.  B's read fails with
    ENOTCONN in bounded time; A's unsynced mapped bytes are not lost: once
    A runs again and etcd is back, B reads them."""
    with EtcdServer(str(tmp_path / "etcd3")) as srv:
        opts = ("mirror", "coherence=" + srv.url, "coherence_ttl=%d" % TTL,
                "coherence_wait=20")
        with shim_mount(str(tmp_path / "a"), dirs[0], *opts) as a, \
                shim_mount(str(tmp_path / "b"), dirs[1], *opts) as b:
            _new_file(a + "/w", 8192)
            fd = os.open(a + "/w", os.O_RDWR)
            m = mmap.mmap(fd, 8192)
            m[4096:4104] = b"unsynced"              # dirty in A, no msync
            pid = daemon_pid(a)
            os.kill(pid, signal.SIGSTOP)
            got: list = []

            def read_on_b():
                start = time.monotonic()
                try:
                    got.append(read_file(b + "/w"))
                except OSError as exc:
                    got.append(exc)
                got.append(time.monotonic() - start)
            t = threading.Thread(target=read_on_b)
            try:
                t.start()
                # (nothing may fork meanwhile: a child closing its copy of
                # A's file descriptor waits for A to take the dirty page)
                time.sleep(2)                       # B has asked A and waits
                assert t.is_alive()
                srv.stop(signal.SIGKILL)
                t.join(60)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert not t.is_alive()
            assert isinstance(got[0], OSError) and got[0].errno == errno.ENOTCONN, got
            assert got[1] < 30
            assert mount_stats(b)["asks_sent"] >= 1
            srv.start()
            data = wait_until(lambda: _reads(b + "/w"), 60, "B to read again")
            assert data[4096:4104] == b"unsynced" and data[:4096] == bytes(4096)
            assert m[4096:4104] == b"unsynced"
            m.close()
            os.close(fd)


def _reads(path: str) -> bytes | None:
    try:
        return read_file(path)
    except OSError:
        return None


@pytest.mark.daemon_logs(r"could not give up the grant")
def test_a_give_up_whose_write_back_fails_keeps_the_data(etcd, tmp_path, request):
    """The holder's backing file system is full when another node asks: the
    holder keeps the grant and the dirty data, the asker gets ETIMEDOUT
    after coherence_wait; once there is space, the asker reads the
    holder's bytes."""
    with small_tmpfs(str(tmp_path / "small")) as small:
        opts = _opts(etcd, request, "coherence_wait=4")
        with shim_mount(str(tmp_path / "a"), small, *opts) as a, \
                shim_mount(str(tmp_path / "b"), small, *opts) as b:
            with open(a + "/d", "wb") as f:
                f.truncate(256 * 1024)                 # sparse: no blocks yet
            fd = os.open(a + "/d", os.O_RDWR)
            m = mmap.mmap(fd, 0)
            blob = os.urandom(256 * 1024)
            m[:] = blob                                # dirty, not synced
            filler = fill(small)
            start = time.monotonic()
            with pytest.raises(OSError) as exc:
                read_file(b + "/d")
            assert exc.value.errno == errno.ETIMEDOUT, exc.value
            assert time.monotonic() - start < 4 + 10
            st = json.loads(shimfs_cmd("stat", "--json", a + "/d").stdout)
            # A keeps its data Exclusive (B's open took only the size)
            assert st["file"]["dirty_bytes"] > 0 and st["file"]["grant"] == "E 0M-end, S size"
            assert st["mount"]["give_up_failures"] >= 1
            assert m[:] == blob                        # A still reads its own bytes
            os.unlink(filler)
            assert read_file(b + "/d") == blob
            m.close()
            os.close(fd)


@pytest.mark.parametrize("value, said", [
    ("coherence=tcp://127.0.0.1:2379", "coherence must be etcd://"),
    ("coherence=etcd://127.0.0.1:notaport", "bad etcd endpoint"),
    ("coherence_prefix=/x", "needs coherence="),
])
def test_bad_coherence_options_are_one_line(tmp_path, value, said):
    (tmp_path / "m").mkdir()
    res = shimfs_cmd("mount", "-o", "backing=%s,%s" % (tmp_path, value), str(tmp_path / "m"),
                     check=False)
    assert res.returncode != 0
    assert said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr


def test_a_port_nobody_listens_on_fails_the_mount(tmp_path):
    from shimfs.etcdserver import _free_port
    (tmp_path / "m").mkdir()
    res = shimfs_cmd("mount", "-o", "backing=%s,coherence=etcd://127.0.0.1:%d"
                     % (tmp_path, _free_port()), str(tmp_path / "m"), check=False)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "coherence=etcd://127.0.0.1:" in lines[0], res.stderr
    assert not os.path.ismount(str(tmp_path / "m"))


def test_tls_and_an_etcd_user_through_mount_options(secured, dirs, tmp_path):
    """etcd with TLS and users: mounts with the CA, the user and a password
    file are coherent; a wrong password, no user, or a prefix the role does
    not cover is refused at mount time with one line."""
    srv, c = secured
    good = tmp_path / "pw"
    good.write_text("nodepw\n")
    bad = tmp_path / "bad"
    bad.write_text("guess\n")
    base = ("mirror", "coherence=" + srv.url, "coherence_ca=" + c["ca"][0],
            "coherence_ttl=%d" % TTL)
    ok = base + ("coherence_prefix=/site/m-%s" % uuid.uuid4().hex[:6],
                 "coherence_user=node1", "coherence_password_file=%s" % good)
    with shim_mount(str(tmp_path / "a"), dirs[0], *ok) as a, \
            shim_mount(str(tmp_path / "b"), dirs[1], *ok) as b:
        _new_file(a + "/s", 4096)
        fd = os.open(a + "/s", os.O_RDWR)
        m = mmap.mmap(fd, 4096)
        m[:6] = b"secret"
        assert read_file(b + "/s")[:6] == b"secret"
        m.close()
        os.close(fd)
    (tmp_path / "m").mkdir()
    for opts, why in (
            (base + ("coherence_prefix=/site/x", "coherence_user=node1",
                     "coherence_password_file=%s" % bad), "authentication failed"),
            (base + ("coherence_prefix=/site/x",), "user name is empty"),
            (base + ("coherence_prefix=/other/", "coherence_user=node1",
                     "coherence_password_file=%s" % good), "permission denied")):
        res = shimfs_cmd("mount", "-o", ",".join(("backing=" + dirs[0],) + opts),
                         str(tmp_path / "m"), check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(lines) == 1, res.stderr
        assert why in lines[0].lower(), lines[0]
        assert not os.path.ismount(str(tmp_path / "m"))


# -- two nodes against one model file ------------------------------------------
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

NODES = st.sampled_from([0, 1])
OFFSETS = st.sampled_from([0, 1, 4095, 4096, 8190, 12288])
DATA = st.binary(min_size=1, max_size=5000)
SIZES = st.sampled_from([0, 1, 4096, 5000, 12289, 20000])
MAP = 16384                                  # each node keeps a mapping of this much

_nodes: dict = {}


@pytest.fixture(scope="module")
def coherent_pair(etcd, tmp_path_factory):
    """Two coherent mounts of one local directory, for the whole module's
    stateful examples (each example uses a file of its own)."""
    top = tmp_path_factory.mktemp("pair")
    d = top / "data"
    d.mkdir()
    opts = ("mirror", "coherence=" + etcd.url, "coherence_prefix=/t/pair-%s" % uuid.uuid4().hex[:6],
            "coherence_ttl=%d" % TTL)
    with shim_mount(str(top / "a"), str(d), *opts) as a, \
            shim_mount(str(top / "b"), str(d), *opts) as b:
        _nodes.update(mounts=(a, b))
        yield a, b
    _nodes.clear()


def _machine(map_size: int, offsets, sizes):
    """The state machine for files of ``map_size`` bytes (each node keeps a
    mapping of this much), touched at ``offsets`` and truncated to ``sizes``."""
    class Machine(RuleBasedStateMachine):
        """Mapped and plain reads and writes and truncates on two nodes, with no
        msync: every read on either node must show the model's bytes."""

        def __init__(self):
            super().__init__()
            name = "m-" + uuid.uuid4().hex[:10]
            self.paths = [os.path.join(m, name) for m in _nodes["mounts"]]
            with open(self.paths[0], "wb") as f:
                f.write(bytes(map_size))
            self.model = bytearray(map_size)
            self.fds = [os.open(p, os.O_RDWR) for p in self.paths]
            self.maps = [mmap.mmap(fd, map_size) for fd in self.fds]

        def _mapped_ok(self, off: int, n: int) -> bool:
            # stores through the mapping stay inside both the mapping and the file
            return off + n <= min(map_size, len(self.model))

        @rule(node=NODES, off=offsets, data=DATA)
        def mapped_write(self, node, off, data):
            data = data[:max(0, min(map_size, len(self.model)) - off)]
            if not data:
                return
            self.maps[node][off:off + len(data)] = data
            self.model[off:off + len(data)] = data

        @rule(node=NODES, off=offsets, data=DATA)
        def plain_write(self, node, off, data):
            os.pwrite(self.fds[node], data, off)
            if off > len(self.model):
                self.model.extend(bytes(off - len(self.model)))
            self.model[off:off + len(data)] = data

        @rule(node=NODES, size=sizes)
        def truncate(self, node, size):
            os.ftruncate(self.fds[node], size)
            if size < len(self.model):
                del self.model[size:]
            else:
                self.model.extend(bytes(size - len(self.model)))

        @rule(node=NODES)
        def plain_read(self, node):
            got = os.pread(self.fds[node], len(self.model) + 4096, 0)
            assert got == bytes(self.model), (node, len(got), len(self.model))

        @rule(node=NODES, off=offsets)
        def mapped_read(self, node, off):
            n = min(map_size, len(self.model)) - off
            if n <= 0:
                return
            assert self.maps[node][off:off + n] == bytes(self.model[off:off + n]), node

        @invariant()
        def sizes_agree(self):
            for fd in self.fds:
                assert os.fstat(fd).st_size == len(self.model)

        def teardown(self):
            for m in self.maps:
                m.close()
            for fd in self.fds:
                os.close(fd)

    return Machine


TwoNodesVsModel = _machine(MAP, OFFSETS, SIZES)
TwoNodesVsModel.TestCase.settings = settings(
    max_examples=8, stateful_step_count=20, deadline=None,
    suppress_health_check=list(HealthCheck))

# Across extents: a file of three, touched on both sides of their edges.
_EXT = 4 << 20
TwoNodesAcrossExtents = _machine(
    3 * _EXT, st.sampled_from([0, _EXT - 4096, _EXT - 1, _EXT, 2 * _EXT - 2, 2 * _EXT + 4096]),
    st.sampled_from([0, 4096, _EXT - 1, _EXT + 1, 2 * _EXT + 5000, 3 * _EXT]))
TwoNodesAcrossExtents.TestCase.settings = settings(
    max_examples=6, stateful_step_count=15, deadline=None,
    suppress_health_check=list(HealthCheck))


@pytest.mark.usefixtures("coherent_pair")
def test_two_nodes_behave_as_one_page_cache():
    TwoNodesVsModel.TestCase().runTest()


@pytest.mark.usefixtures("coherent_pair")
def test_two_nodes_behave_as_one_page_cache_across_extents():
    """The same, on a file of three extents: each node may hold some of them
    and not others."""
    from shimfs.cluster import EXTENT
    assert EXTENT == _EXT
    TwoNodesAcrossExtents.TestCase().runTest()
