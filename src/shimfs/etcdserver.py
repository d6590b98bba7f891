"""A throw-away etcd server on loopback, for the tests and the demo.

Debian's ``etcd-server`` package provides the binary (scripts/setup.sh
installs it).  :class:`EtcdServer` starts one member on 127.0.0.1 with free
ports and its own data directory, waits until it answers, and stops exactly
the process it started, by pid, never by name (the machine may run other
etcd servers)::

    with EtcdServer(workdir) as srv:
        srv.url                 # "etcd://127.0.0.1:PORT"

``stop()`` and ``start()`` again reuse the same ports and data, which is how
the fault tests take the service away and bring it back.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

ETCD = "etcd"
HOST = "127.0.0.1"
#: etcd listens without TLS on loopback here
SCHEME = "http"


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started etcd dies, so a
    test run that crashes (a fatal signal skips every finally) leaves no
    server behind."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member on loopback, owned by whoever made it."""

    def __init__(self, workdir: str, name: str = "shimfs-test",
                 tls: tuple[str, str, str] | None = None, client_certs: bool = False):
        """``tls``: (CA, certificate, key): serve TLS only; ``client_certs``:
        and ask every client for a certificate signed by the CA.  The
        certificate must allow client use too: the start-up probe and
        ``etcdctl`` use it."""
        if shutil.which(ETCD) is None:
            raise FileNotFoundError("etcd is not installed (Debian: etcd-server)")
        self.workdir = workdir
        self.name = name
        self.data_dir = os.path.join(workdir, "etcd-data")
        self.log_path = os.path.join(workdir, "etcd.log")
        self.port = _free_port()
        self.peer_port = _free_port()
        self.tls = tls
        self.client_certs = client_certs
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return "%s:%d" % (HOST, self.port)

    @property
    def url(self) -> str:
        """The value of ``-o coherence=``."""
        return "etcd://" + self.endpoint

    def start(self, timeout: float = 30.0) -> None:
        client = "%s://%s" % ("https" if self.tls else SCHEME, self.endpoint)
        peer = "%s://%s:%d" % (SCHEME, HOST, self.peer_port)
        extra = []
        if self.tls:
            ca, cert, key = self.tls
            extra = ["--cert-file", cert, "--key-file", key]
            if self.client_certs:       # (etcd 3.4 asks for them once it has a CA)
                extra += ["--trusted-ca-file", ca, "--client-cert-auth"]
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", self.name, "--data-dir", self.data_dir,
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", "%s=%s" % (self.name, peer)] + extra,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
        from etcd3gw.client import Etcd3Client
        from .grants import Security, session
        ca, cert, key = self.tls or (None, None, None)
        probe = Etcd3Client(host=HOST, port=self.port, timeout=1, api_path="/v3/",
                            protocol="https" if self.tls else "http",
                            session=session(Security(ca=ca, cert=cert, key=key)))
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe.status()
                return
            except Exception:       # not answering yet: etcd3gw's errors, or requests'
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log_path, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError("etcd did not start:\n" + tail)
            time.sleep(0.1)

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run ``etcdctl`` against this server (as ``user``, "NAME:PASSWORD")."""
        cmd = ["etcdctl", "--endpoints", "%s://%s" % ("https" if self.tls else SCHEME, self.endpoint)]
        if self.tls:
            ca, cert, key = self.tls
            cmd += ["--cacert", ca, "--cert", cert, "--key", key]
        if user:
            cmd += ["--user", user]
        r = subprocess.run(cmd + list(args), capture_output=True, text=True,
                           env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode:
            raise RuntimeError("etcdctl %s: %s" % (" ".join(args), r.stderr.strip()))
        return r.stdout

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server this object started (SIGKILL: as if it crashed)."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> "EtcdServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
