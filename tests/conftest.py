"""Fixtures: real shimfs mounts over a local directory and the GlusterFS
stand-in, and an etcd server run with TLS and users (``secured``).

Every mount is torn down in a finally block, even when the test fails.  A
test that cannot run here (no /dev/fuse, not root for gluster) is skipped,
except under CI=true, where a skip would hide a broken machine: it fails.
"""
from __future__ import annotations

import os
import shutil
import uuid

import pytest

from shimfs import standin
from shimfs.etcdserver import EtcdServer

from mounting import make_certs, shim_mount, unavailable

# A test fails when a daemon it mounted logged an unexpected warning or error.
pytest_plugins = ["checklogs"]


@pytest.fixture
def backing(tmp_path):
    d = tmp_path / "backing"
    d.mkdir()
    return str(d)


@pytest.fixture
def mnt(tmp_path, backing):
    """A shimfs mount over a local backing directory (cache 32M: eviction happens)."""
    with shim_mount(str(tmp_path / "mnt"), backing, "cache_size=32M",
                    log=str(tmp_path / "shimfs.log")) as m:
        yield m


@pytest.fixture(scope="session")
def gluster():
    """The stand-in's first client mount dir (started once per session)."""
    why = standin.available()
    if why:
        unavailable(why)
    d = standin.up(clients=2)
    try:
        yield d
    finally:
        if os.environ.get("SHIMFS_KEEP_STANDIN") != "1":
            standin.down()


@pytest.fixture(params=["local", "gluster"])
def data_dir(request, tmp_path):
    """Where backing data lives: a local directory, or a fresh dir on the stand-in."""
    if request.param == "local":
        d = tmp_path / "data"
        d.mkdir()
        yield str(d)
        return
    root = request.getfixturevalue("gluster")
    d = os.path.join(root, "t-" + uuid.uuid4().hex[:12])
    os.mkdir(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- etcd with TLS and users (test_grants.py, test_cluster.py) ----------------
@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """etcd with TLS and users: the node user may read and write only under
    /site/.  (No client certificates here: etcd's JSON gateway, which
    etcd3gw talks to, refuses requests that carry one once users are on.)"""
    d = str(tmp_path_factory.mktemp("etcd-tls"))
    c = make_certs(d)
    with EtcdServer(d, tls=(c["ca"][0], *c["server"])) as srv:
        srv.etcdctl("user", "add", "root:rootpw", "--interactive=false")
        srv.etcdctl("role", "add", "shimfs-node")
        srv.etcdctl("role", "grant-permission", "shimfs-node", "--prefix=true", "readwrite", "/site/")
        srv.etcdctl("user", "add", "node1:nodepw", "--interactive=false")
        srv.etcdctl("user", "grant-role", "node1", "shimfs-node")
        srv.etcdctl("auth", "enable")
        yield srv, c
